//! The NBD client bdev against real qemu-nbd servers started by the tests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use bdev_core::rpc::RpcModule;
use bdev_core::{BlockDevice, IoBuf, IoType, Registry};
use bdev_nbd::{NbdClientOpts, NbdRpc};
use serde_json::json;

fn opts(name: &str, srv: &QemuNbd, export: &str) -> NbdClientOpts {
    let mut o = NbdClientOpts::new(name, &srv.address(), export);
    o.reconnect_attempts = 3;
    o.reconnect_delay_ms = 100;
    o.io_timeout_ms = 5000;
    o
}

#[test]
fn raw_export_reads_the_pattern() {
    let Some((_dir, srv)) =
        serve_pattern("raw_export_reads_the_pattern", 4 * MIB, "golden", &["-r"])
    else {
        return;
    };
    let (reg, clients) = nbd_clients();
    block_within(20, async {
        let dev = clients.create(opts("nbd0", &srv, "golden")).await.unwrap();
        assert_eq!(dev.block_len(), 512);
        assert_eq!(dev.num_blocks(), 4 * MIB / 512);
        assert_eq!(dev.product_name(), "NBD client");
        assert_eq!(dev.module_name(), "nbd");
        assert!(reg.get("nbd0").is_some());
        assert!(reg.get_by_uuid(&dev.uuid()).is_some());
        let ds = reg.get("nbd0").unwrap().driver_specific();
        assert_eq!(
            ds,
            json!({"nbd_client": {"address": srv.address(), "export": "golden",
                "read_only": true, "connected": true}})
        );
        let cfg = dev.write_config().unwrap();
        assert_eq!(cfg["method"], "bdev_nbd_client_create");
        assert_eq!(cfg["params"]["name"], "nbd0");
        assert_eq!(cfg["params"]["address"], srv.address());
        assert_eq!(cfg["params"]["export"], "golden");
        assert_eq!(cfg["params"]["uuid"], dev.uuid().to_string());
        // The requested read-only flag, not the server's: re-creating asks the same.
        assert_eq!(cfg["params"]["read_only"], false);

        let desc = reg.open("nbd0", false).unwrap();
        check_pattern(&desc, 0, 8192).await.unwrap();
        for lba in [1u64, 7, 100, 4095, 8191] {
            check_pattern(&desc, lba, 1).await.unwrap();
        }
        // Reads past the end are refused before they reach the server.
        let err = desc.read(8192, IoBuf::new(512, 1)).await.unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL);
        drop(desc);
        clients.delete("nbd0").await.unwrap();
        assert!(reg.get("nbd0").is_none());
    });
}

#[test]
fn qcow2_over_raw_backing_reads_base_and_keeps_writes_in_the_overlay() {
    if !have_qemu("qcow2_over_raw_backing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = pattern_file(dir.path(), "base.raw", 2 * MIB);
    let before = std::fs::read(&raw).unwrap();
    let q = qcow2_over(dir.path(), &raw, "top.qcow2");
    let srv = QemuNbd::unix(dir.path(), &q, "qcow2", "top", &[]);
    let (reg, clients) = nbd_clients();
    block_within(20, async {
        let dev = clients.create(opts("q0", &srv, "top")).await.unwrap();
        assert_eq!(dev.num_blocks() * 512, 2 * MIB);
        assert!(!dev.is_read_only());
        let desc = reg.open("q0", true).unwrap();
        check_pattern(&desc, 0, 4096).await.unwrap();
        let data = IoBuf::from_slice(&[0xc3; 4096], 1);
        desc.write(64, data).await.unwrap();
        desc.flush().await.unwrap();
        let back = desc.read(64, IoBuf::new(4096, 1)).await.unwrap();
        assert!(back.iter().all(|&b| b == 0xc3));
        check_pattern(&desc, 0, 64).await.unwrap();
        check_pattern(&desc, 72, 100).await.unwrap();
        drop(desc);
        clients.delete("q0").await.unwrap();
    });
    assert_eq!(
        std::fs::read(&raw).unwrap(),
        before,
        "the backing file changed"
    );
}

#[test]
fn writes_round_trip_to_the_file() {
    let Some((_dir, srv)) = serve_pattern("writes_round_trip_to_the_file", MIB, "disk", &[]) else {
        return;
    };
    let (reg, clients) = nbd_clients();
    let raw = srv.file().to_path_buf();
    block_within(20, async {
        let dev = clients.create(opts("w0", &srv, "disk")).await.unwrap();
        assert!(dev.io_type_supported(IoType::Write));
        assert!(dev.io_type_supported(IoType::Flush));
        let desc = reg.open("w0", true).unwrap();
        // Several sizes and places, including one larger than a page.
        for (lba, len, byte) in [
            (0u64, 512usize, 0x11u8),
            (9, 4096, 0x22),
            (100, 65536, 0x33),
        ] {
            desc.write(lba, IoBuf::from_slice(&vec![byte; len], 1))
                .await
                .unwrap();
            let back = desc.read(lba, IoBuf::new(len, 1)).await.unwrap();
            assert!(back.iter().all(|&b| b == byte), "lba {lba}");
        }
        desc.flush().await.unwrap();
        // Write zeroes (native when the server offers it, emulated otherwise).
        desc.write_zeroes(300, 16).await.unwrap();
        let z = desc.read(300, IoBuf::new(16 * 512, 1)).await.unwrap();
        assert!(z.iter().all(|&b| b == 0));
        if dev.io_type_supported(IoType::Unmap) {
            desc.unmap(400, 8).await.unwrap();
        }
        check_pattern(&desc, 316, 84).await.unwrap();
        desc.flush().await.unwrap();
        drop(desc);
        clients.delete("w0").await.unwrap();
    });
    let f = std::fs::read(&raw).unwrap();
    assert!(f[..512].iter().all(|&b| b == 0x11));
    assert!(f[9 * 512..9 * 512 + 4096].iter().all(|&b| b == 0x22));
    assert!(f[100 * 512..100 * 512 + 65536].iter().all(|&b| b == 0x33));
    assert!(f[300 * 512..316 * 512].iter().all(|&b| b == 0));
    assert!(f[316 * 512..400 * 512] == pattern(TAG, 316 * 512, 84 * 512)[..]);
}

#[test]
fn many_requests_in_flight() {
    let Some((_dir, srv)) = serve_pattern("many_requests_in_flight", 4 * MIB, "disk", &[]) else {
        return;
    };
    let (reg, clients) = nbd_clients();
    block_within(30, async {
        clients.create(opts("m0", &srv, "disk")).await.unwrap();
        let desc = reg.open("m0", true).unwrap();
        // 512 reads of 4 KiB, all submitted before any is awaited.
        read_all_at_once(&desc, (0..512u64).map(|i| (i * 37 % 1024) * 8)).await;
        // 256 writes to distinct places at once, then read back; the blocks between them
        // keep the pattern.
        let writes: Vec<(u64, u8)> = (0..256u64).map(|i| (i * 16, (i % 251) as u8 + 1)).collect();
        write_all_at_once(&desc, &writes).await;
        for i in 0..256u64 {
            check_pattern(&desc, i * 16 + 8, 8).await.unwrap();
        }
        // A vectored read goes out as concurrent requests and fills each piece.
        let bufs = vec![IoBuf::new(512, 1), IoBuf::new(8192, 1), IoBuf::new(1024, 1)];
        let bufs = desc.readv(6000, bufs).await.unwrap();
        assert!(bufs[0][..] == pattern(TAG, 6000 * 512, 512)[..]);
        assert!(bufs[1][..] == pattern(TAG, 6001 * 512, 8192)[..]);
        assert!(bufs[2][..] == pattern(TAG, 6017 * 512, 1024)[..]);
        drop(desc);
        clients.delete("m0").await.unwrap();
    });
}

#[test]
fn several_connections_when_the_server_allows_them() {
    // A qemu-nbd shared by several clients advertises NBD_FLAG_CAN_MULTI_CONN.
    let Some((dir, srv)) =
        serve_pattern("several_connections", 2 * MIB, "base", &["-r", "-e", "8"])
    else {
        return;
    };
    let (reg, clients) = nbd_clients();
    block_within(20, async {
        let mut o = opts("mc0", &srv, "base");
        o.num_connections = 4;
        let dev = clients.create(o).await.unwrap();
        assert_eq!(dev.connections(), 4);
        let desc = reg.open("mc0", false).unwrap();
        let reads = (0..64u64).map(|i| check_pattern(&desc, i * 64, 64));
        for r in futures::future::join_all(reads).await {
            r.unwrap();
        }
        drop(desc);
        clients.delete("mc0").await.unwrap();
    });
    // An export for one client only does not allow more: one connection, whatever was asked.
    let raw2 = pattern_file(dir.path(), "rw.raw", MIB);
    let srv2 = QemuNbd::unix(dir.path(), &raw2, "raw", "rw", &[]);
    block_within(20, async {
        let mut o = opts("mc1", &srv2, "rw");
        o.num_connections = 4;
        let dev = clients.create(o).await.unwrap();
        assert_eq!(dev.connections(), 1);
        clients.delete("mc1").await.unwrap();
    });
}

#[test]
fn read_only_is_refused_locally_and_by_the_server() {
    if !have_qemu("read_only_refusal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = pattern_file(dir.path(), "base.raw", MIB);
    let before = std::fs::read(&raw).unwrap();
    let ro_srv = QemuNbd::unix(dir.path(), &raw, "raw", "ro", &["-r", "-e", "4"]);
    let rw_srv = QemuNbd::unix(dir.path(), &raw, "raw", "rw", &["-e", "4"]);
    let (reg, clients) = nbd_clients();
    block_within(20, async {
        // The server says read-only.
        let a = clients.create(opts("ro_a", &ro_srv, "ro")).await.unwrap();
        // The export is writable, but read-only was asked for.
        let mut o = opts("ro_b", &rw_srv, "rw");
        o.read_only = true;
        let b = clients.create(o).await.unwrap();
        for dev in [&a, &b] {
            assert!(dev.is_read_only());
            assert!(!dev.io_type_supported(IoType::Write));
            assert!(!dev.io_type_supported(IoType::Unmap));
            assert!(!dev.io_type_supported(IoType::WriteZeroes));
            assert_eq!(dev.driver_specific()["nbd_client"]["read_only"], true);
            let desc = reg.open(dev.name(), true).unwrap();
            let err = desc.write(0, IoBuf::new(512, 1)).await.unwrap_err();
            assert_eq!(err.errno(), libc::ENOTSUP);
            let err = desc.write_zeroes(0, 1).await.unwrap_err();
            assert_eq!(err.errno(), libc::ENOTSUP);
            // The device itself refuses too, for callers that bypass descriptors.
            let err = dev.write(0, IoBuf::new(512, 1)).await.unwrap_err();
            assert_eq!(err.errno(), libc::EPERM);
            check_pattern(&desc, 0, 16).await.unwrap();
            desc.flush().await.unwrap();
        }
        assert_eq!(b.write_config().unwrap()["params"]["read_only"], true);
        clients.delete("ro_a").await.unwrap();
        clients.delete("ro_b").await.unwrap();
    });
    assert_eq!(std::fs::read(&raw).unwrap(), before);
}

#[test]
fn server_killed_and_restarted_during_reads() {
    let Some((_dir, mut srv)) =
        serve_pattern("server_killed_and_restarted", 2 * MIB, "base", &["-r"])
    else {
        return;
    };
    let (reg, clients) = nbd_clients();
    let mut o = opts("rs0", &srv, "base");
    o.reconnect_attempts = 30;
    o.reconnect_delay_ms = 100;
    o.io_timeout_ms = 2000;
    let dev = block_within(10, clients.create(o)).unwrap();
    let uuid = dev.uuid();
    drop(dev);

    // A reader hammers the bdev through a descriptor until it is removed; every read must
    // complete (right data, or an error) within a bound.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let reader = {
        let (reg, stop, ok, failed) = (reg.clone(), stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut desc = reg.open("rs0", false).unwrap();
            let mut events = desc.take_events().unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                if removed(&mut events) {
                    return true;
                }
                let lba = (i * 13) % 4096;
                i += 1;
                match block_within(10, check_pattern(&desc, lba, 1)) {
                    Ok(()) => ok.fetch_add(1, Ordering::AcqRel),
                    Err(e) => {
                        assert_eq!(e.errno(), libc::EIO, "{e}");
                        failed.fetch_add(1, Ordering::AcqRel)
                    }
                };
            }
            false
        })
    };
    wait_until(5, "first reads", || ok.load(Ordering::Acquire) > 10);

    // 1. Within the reconnect budget: reads wait and then succeed; the bdev stays.
    srv.kill();
    std::thread::sleep(Duration::from_millis(150));
    srv.restart();
    let seen = ok.load(Ordering::Acquire);
    wait_until(10, "reads after the restart", || {
        ok.load(Ordering::Acquire) > seen + 10
    });
    assert!(reg.get("rs0").is_some(), "hot-removed within the budget");
    assert_eq!(
        failed.load(Ordering::Acquire),
        0,
        "reads failed within the budget"
    );

    // 2. Past the budget: the bdev is hot-removed and the reader sees Remove.
    srv.kill();
    wait_until(10, "hot-removal", || reg.get("rs0").is_none());
    assert!(reader.join().unwrap(), "the reader did not see Remove");
    let handle = clients
        .get("rs0")
        .expect("client kept while its server is away");
    assert!(!handle.is_connected());
    assert_eq!(handle.driver_specific()["nbd_client"]["connected"], false);
    let info = &clients.info(Some("rs0")).unwrap()[0];
    assert_eq!(info["state"], "disconnected");
    assert_eq!(info["registered"], false);
    // A config saved now must still re-create it.
    let pending = clients.unregistered_config();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["params"]["uuid"], uuid.to_string());
    // Direct I/O on the removed bdev fails at once instead of waiting.
    let err = block_within(5, handle.read(0, IoBuf::new(512, 1))).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);

    // 3. The server comes back: the same bdev (same name, same UUID) is registered again.
    srv.restart();
    wait_until(10, "re-registration", || reg.get_by_uuid(&uuid).is_some());
    let again = reg.get_by_uuid(&uuid).unwrap();
    assert_eq!(again.name(), "rs0");
    wait_until(5, "registered flag", || {
        clients.unregistered_config().is_empty()
    });
    let desc = reg.open("rs0", false).unwrap();
    block_within(10, check_pattern(&desc, 0, 4096)).unwrap();
    drop(desc);
    stop.store(true, Ordering::Release);
    block_within(10, clients.delete("rs0")).unwrap();
    assert!(reg.get("rs0").is_none());
    assert!(clients.get("rs0").is_none());
}

#[test]
fn zero_attempts_remove_at_once_and_delete_works_while_removed() {
    let Some((_dir, mut srv)) = serve_pattern("zero_attempts", MIB, "base", &["-r"]) else {
        return;
    };
    let (reg, clients) = nbd_clients();
    let mut o = opts("z0", &srv, "base");
    o.reconnect_attempts = 0;
    o.reconnect_delay_ms = 50;
    block_within(10, clients.create(o)).unwrap();
    let desc = reg.open("z0", false).unwrap();
    srv.kill();
    // The reader sees the connection close; with no attempts the bdev goes at once (once
    // this descriptor is closed).
    let err = block_within(10, desc.read(0, IoBuf::new(512, 1))).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    drop(desc);
    wait_until(10, "hot-removal", || reg.get("z0").is_none());
    // The name stays taken while the client waits for its server.
    let err = block_within(10, clients.create(opts("z0", &srv, "base"))).unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST);
    block_within(10, clients.delete("z0")).unwrap();
    assert!(clients.names().is_empty());
    // After the delete nothing comes back, even with the server up again.
    srv.restart();
    std::thread::sleep(Duration::from_millis(200));
    assert!(reg.get("z0").is_none());
}

#[test]
fn rpc_methods_follow_spdk_conventions() {
    let Some((dir, srv)) = serve_pattern("rpc_methods", MIB, "base", &["-r", "-e", "4"]) else {
        return;
    };
    let reg = Registry::new();
    let rpc = NbdRpc::new(reg.clone());
    assert_eq!(
        rpc.methods(),
        [
            "bdev_nbd_client_create",
            "bdev_nbd_client_delete",
            "bdev_nbd_client_get"
        ]
    );
    let uuid = "0b0c0d0e-1111-4222-8333-444455556666";
    block_within(20, async {
        let p = json!({"name": "r0", "address": srv.address(), "export": "base",
            "uuid": uuid, "read_only": true, "reconnect_attempts": 2, "reconnect_delay_ms": 50});
        assert_eq!(rpc!(rpc, "bdev_nbd_client_create", p.clone()), json!("r0"));
        assert_eq!(reg.get(uuid).unwrap().name(), "r0");
        // Same name again.
        assert_eq!(
            rpc_err!(rpc, "bdev_nbd_client_create", p),
            (-17, "File exists")
        );
        // Same UUID, other name.
        let p = json!({"name": "r1", "address": srv.address(), "export": "base", "uuid": uuid});
        assert_eq!(rpc_err!(rpc, "bdev_nbd_client_create", p).code, -17);
        // Decode failures: missing field, unknown field, wrong type.
        for bad in [
            json!({"name": "r2", "address": srv.address()}),
            json!({"name": "r2", "address": srv.address(), "export": "base", "bogus": 1}),
            json!({"name": "r2", "address": srv.address(), "export": 5}),
        ] {
            assert_eq!(
                rpc_err!(rpc, "bdev_nbd_client_create", bad),
                (-32603, "spdk_json_decode_object failed")
            );
        }
        // Connection failures carry the errno, as do a bad name and a bad address.
        let missing = format!("unix:{}", dir.path().join("nobody.sock").display());
        let _plain = std::fs::File::create(dir.path().join("plain.sock")).unwrap();
        let plain = format!("unix:{}", dir.path().join("plain.sock").display());
        let served = srv.address();
        for (name, address, export, errno) in [
            ("r3", missing.as_str(), "base", libc::ENOENT),
            ("r3", plain.as_str(), "base", libc::ECONNREFUSED),
            ("r3", "127.0.0.1:1", "base", libc::ECONNREFUSED),
            ("r3", served.as_str(), "nope", libc::ENOENT),
            ("r\u{0}", served.as_str(), "base", libc::EINVAL),
            ("r3", "no-port-here", "base", libc::EINVAL),
        ] {
            let p = json!({"name": name, "address": address, "export": export});
            let e = rpc_err!(rpc, "bdev_nbd_client_create", p);
            assert_eq!(e.code, -errno, "{p}");
        }
        assert!(reg.get("r3").is_none());
        // Get: every client, or one.
        let all = rpc!(rpc, "bdev_nbd_client_get");
        assert_eq!(all.as_array().unwrap().len(), 1);
        let one = rpc!(rpc, "bdev_nbd_client_get", {"name": "r0"});
        assert_eq!(
            one,
            json!([{"name": "r0", "uuid": uuid, "address": srv.address(), "export": "base",
                "read_only": true, "state": "connected", "registered": true, "connections": 1,
                "block_size": 512, "num_blocks": 2048}])
        );
        assert_eq!(
            rpc_err!(rpc, "bdev_nbd_client_get", {"name": "zz"}).code,
            -19
        );
        // Delete.
        assert_eq!(
            rpc_err!(rpc, "bdev_nbd_client_delete", {"name": "nope"}),
            (-19, "No such device")
        );
        assert_eq!(rpc_err!(rpc, "bdev_nbd_client_delete").code, -32603);
        assert_eq!(
            rpc!(rpc, "bdev_nbd_client_delete", {"name": "r0"}),
            json!(true)
        );
        assert!(reg.get("r0").is_none());
        assert_eq!(rpc_err!(rpc, "bdev_nbd_client_other").code, -32601);
        // The name is free again.
        rpc!(rpc, "bdev_nbd_client_create", {"name": "r0", "address": served, "export": "base"});
        // The saved config entry re-creates the same bdev.
        let saved = reg.get("r0").unwrap().write_config().unwrap();
        let uuid0 = reg.get("r0").unwrap().uuid();
        rpc!(rpc, "bdev_nbd_client_delete", {"name": "r0"});
        let method = saved["method"].as_str().unwrap();
        assert_eq!(rpc!(rpc, method, saved["params"]), json!("r0"));
        assert_eq!(reg.get("r0").unwrap().uuid(), uuid0);
        assert_eq!(reg.get("r0").unwrap().write_config().unwrap(), saved);
        rpc.clients().delete_all().await;
        assert!(reg.get("r0").is_none());
    });
}

#[test]
fn registry_delete_from_outside_stops_the_client() {
    let Some((_dir, srv)) = serve_pattern("registry_delete_from_outside", MIB, "base", &["-r"])
    else {
        return;
    };
    let (reg, clients) = nbd_clients();
    block_within(20, async {
        let dev = clients.create(opts("x0", &srv, "base")).await.unwrap();
        reg.unregister("x0").await.unwrap();
        assert!(dev.is_deleted());
        assert!(clients.get("x0").is_none());
        // The name can be used again at once (the server allows one client: the old
        // connection is closed).
        clients.create(opts("x0", &srv, "base")).await.unwrap();
        clients.delete("x0").await.unwrap();
    });
}

#[test]
fn background_connect_waits_for_a_server_that_is_not_there_yet() {
    let Some((_dir, mut srv)) = serve_pattern("background_connect", MIB, "base", &["-r"]) else {
        return;
    };
    let (reg, clients) = nbd_clients();
    srv.kill();
    // Without background_connect the create fails.
    let err = block_within(10, clients.create(opts("bg0", &srv, "base"))).unwrap_err();
    assert_eq!(err.errno(), libc::ECONNREFUSED);
    let mut o = opts("bg0", &srv, "base");
    o.background_connect = true;
    o.reconnect_delay_ms = 50;
    let dev = block_within(10, clients.create(o)).unwrap();
    assert!(reg.get("bg0").is_none());
    assert_eq!(
        clients.info(Some("bg0")).unwrap()[0]["state"],
        "disconnected"
    );
    let cfg = dev.write_config().unwrap();
    assert_eq!(cfg["params"]["background_connect"], true);
    // Direct I/O before the server exists fails at once.
    let err = block_within(5, dev.read(0, IoBuf::new(512, 1))).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    srv.restart();
    wait_until(10, "registration", || {
        reg.get_by_uuid(&dev.uuid()).is_some()
    });
    assert_eq!(dev.num_blocks(), MIB / 512);
    assert!(dev.is_read_only());
    let desc = reg.open("bg0", false).unwrap();
    block_within(10, check_pattern(&desc, 0, 2048)).unwrap();
    drop(desc);
    wait_until(5, "registered flag", || {
        clients.info(None).unwrap()[0]["registered"] == true
    });
    assert_eq!(clients.info(None).unwrap()[0]["state"], "connected");
    block_within(10, clients.delete("bg0")).unwrap();
    assert!(reg.get("bg0").is_none());
}

#[test]
fn writes_in_flight_survive_a_server_restart() {
    let Some((_dir, mut srv)) = serve_pattern(
        "writes_in_flight_survive_a_server_restart",
        4 * MIB,
        "disk",
        &[],
    ) else {
        return;
    };
    let (reg, clients) = nbd_clients();
    let raw = srv.file().to_path_buf();
    let mut o = opts("wr0", &srv, "disk");
    o.reconnect_attempts = 50;
    o.reconnect_delay_ms = 50;
    block_within(10, clients.create(o)).unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let writers = {
        let (reg, written) = (reg.clone(), written.clone());
        std::thread::spawn(move || {
            let desc = reg.open("wr0", true).unwrap();
            // 32 writers, each rewriting its own 8 KiB block 40 times with a new value.
            let tasks = (0..32u64).map(|w| {
                let (d, written) = (&desc, &written);
                async move {
                    for round in 1..=40u8 {
                        let buf = IoBuf::from_slice(&[round.wrapping_add(w as u8); 8192], 1);
                        d.write(w * 16, buf).await.unwrap();
                        written.fetch_add(1, Ordering::AcqRel);
                    }
                }
            });
            block_within(25, futures::future::join_all(tasks));
        })
    };
    wait_until(10, "some writes", || written.load(Ordering::Acquire) > 100);
    srv.kill();
    let at_kill = written.load(Ordering::Acquire);
    std::thread::sleep(Duration::from_millis(100));
    srv.restart();
    writers.join().unwrap();
    assert!(at_kill < 32 * 40, "every write finished before the kill");
    assert_eq!(written.load(Ordering::Acquire), 32 * 40);
    let desc = reg.open("wr0", false).unwrap();
    block_within(10, async {
        for w in 0..32u64 {
            let b = desc.read(w * 16, IoBuf::new(8192, 1)).await.unwrap();
            let want = 40u8.wrapping_add(w as u8);
            assert!(b.iter().all(|&x| x == want), "writer {w}");
        }
    });
    drop(desc);
    block_within(10, clients.delete("wr0")).unwrap();
    let f = std::fs::read(&raw).unwrap();
    for w in 0..32usize {
        let want = 40u8.wrapping_add(w as u8);
        assert!(
            f[w * 8192..(w + 1) * 8192].iter().all(|&x| x == want),
            "file, writer {w}"
        );
    }
}
