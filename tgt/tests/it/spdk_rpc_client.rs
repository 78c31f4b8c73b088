//! The target driven by SPDK's own client `spdk-rpc`, data moved with qemu-io / qemu-img over
//! NBD. Each test starts its own `tgt` on a socket in a temp dir.

use std::time::Duration;

use crate::common::*;
use nbd_proto as proto;
use serde_json::{json, Value};

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn bdev_lifecycle_and_errors() {
    let Some((tools, dir)) = setup() else { return };
    let t = start(&tools, dir.path());
    let uuid = "7e5a0000-e5a0-4e5a-8e5a-000000000001";
    assert_eq!(
        t.ok(&["bdev_malloc_create", "-b", "M0", "32", "512"]),
        json!("M0")
    );
    assert_eq!(
        t.ok(&["bdev_malloc_create", "-b", "M1", "-u", uuid, "8", "4096"]),
        json!("M1")
    );
    let all = t.ok(&["bdev_get_bdevs"]);
    assert_eq!(names(&all), ["M0", "M1"]);
    let m1 = &t.ok(&["bdev_get_bdevs", "-b", uuid])[0];
    assert_eq!(m1["name"], json!("M1"));
    assert_eq!(m1["block_size"], json!(4096));
    assert_eq!(m1["num_blocks"], json!(2048));
    assert_eq!(m1["product_name"], json!("Malloc disk"));
    assert_eq!(m1["aliases"], json!([uuid]));
    assert_eq!(m1["claimed"], json!(false));
    assert_eq!(m1["supported_io_types"].as_object().unwrap().len(), 22);
    assert_eq!(m1["driver_specific"], json!({}));

    // Duplicates, bad sizes, missing devices.
    assert_eq!(
        t.err(&["bdev_malloc_create", "-b", "M0", "32", "512"]).code,
        -17
    );
    let e = t.err(&["bdev_malloc_create", "-b", "Mx", "1", "1000"]);
    assert_eq!(e.code, -22);
    assert!(
        e.message.starts_with("Invalid argument: block_size 1000 "),
        "{}",
        e.message
    );
    let e = t.err(&["bdev_get_bdevs", "-b", "nope"]);
    assert_eq!((e.code, e.message.as_str()), (-19, "No such device"));
    assert_eq!(t.err(&["bdev_malloc_delete", "nope"]).code, -19);
    assert_eq!(t.err(&["bdev_aio_delete", "M0"]).code, -19);

    // aio over a file, with the parameters the client always sends.
    let f = sparse_in(dir.path(), "f.img", 16 << 20);
    let fs = f.to_str().unwrap();
    assert_eq!(
        t.ok(&["bdev_aio_create", fs, "aio0", "4096"]),
        json!("aio0")
    );
    let a = &t.ok(&["bdev_get_bdevs", "-b", "aio0"])[0];
    assert_eq!(a["product_name"], json!("AIO disk"));
    assert_eq!(a["num_blocks"], json!(4096));
    assert_eq!(a["driver_specific"]["aio"]["filename"], json!(fs));
    assert_eq!(a["driver_specific"]["aio"]["readonly"], json!(false));
    assert_eq!(t.err(&["bdev_aio_create", fs, "aio0", "4096"]).code, -17);
    let missing = dir.path().join("missing.img");
    assert_eq!(
        t.err(&["bdev_aio_create", missing.to_str().unwrap(), "aio1", "4096"])
            .code,
        -2
    );

    // Error bdev over M0, with a failure injected on writes.
    assert_eq!(t.ok(&["bdev_error_create", "M0"]), json!("EE_M0"));
    assert_eq!(t.err(&["bdev_error_create", "M0"]).code, -17);
    assert_eq!(
        t.ok(&[
            "bdev_error_inject_error",
            "EE_M0",
            "write",
            "failure",
            "-n",
            "5"
        ]),
        Value::Null
    );
    assert_eq!(
        t.err(&["bdev_error_inject_error", "nope", "write", "failure"])
            .code,
        -19
    );
    assert_eq!(
        t.ok(&[
            "bdev_error_inject_error",
            "EE_M0",
            "read",
            "nomem",
            "-n",
            "1"
        ]),
        Value::Null
    );
    assert_eq!(
        t.err(&["bdev_error_inject_error", "EE_M0", "read", "nvme_failure"])
            .code,
        -22
    );
    // Ours: writes after the first 2 are dropped (acknowledged, not written).
    assert_eq!(
        t.ok(&["bdev_error_inject_error_ext", "EE_M0", "clear", "failure"]),
        json!(true)
    );
    assert_eq!(
        t.ok(&[
            "bdev_error_inject_error_ext",
            "EE_M0",
            "write",
            "drop_writes",
            "-a",
            "2",
            "-f"
        ]),
        json!(true)
    );
    let n = dir.path().join("n.sock");
    t.ok(&["nbd_server_start", &format!("unix:{}", n.display())]);
    t.ok(&["nbd_export_add", "EE_M0"]);
    qemu_io_ok(
        &tools,
        &nbd_uri("EE_M0", &n),
        &["write -P 1 0 4k", "write -P 2 4k 4k", "write -P 3 8k 4k"],
    );
    qemu_io_ok(
        &tools,
        &nbd_uri("EE_M0", &n),
        &["read -P 1 0 4k", "read -P 2 4k 4k", "read -P 0 8k 4k"],
    );
    t.ok(&["nbd_export_remove", "EE_M0"]);
    assert_eq!(t.ok(&["bdev_error_delete", "EE_M0"]), Value::Null);

    assert_eq!(t.ok(&["bdev_malloc_delete", "M0"]), Value::Null);
    assert_eq!(t.ok(&["bdev_aio_delete", "aio0"]), Value::Null);
    assert_eq!(names(&t.ok(&["bdev_get_bdevs"])), ["M1"]);
    assert_eq!(t.ok(&["bdev_wait_for_examine"]), Value::Null);

    // Framework methods.
    let methods = t.ok(&["rpc_get_methods"]);
    for m in [
        "bdev_malloc_create",
        "nbd_export_add",
        "framework_get_config",
        "spdk_kill_instance",
    ] {
        assert!(methods.as_array().unwrap().contains(&json!(m)), "{m}");
    }
    let current = t.ok(&["rpc_get_methods", "--current"]);
    assert!(!current
        .as_array()
        .unwrap()
        .contains(&json!("framework_start_init")));
    assert!(t.ok(&["spdk_get_version"])["version"].is_string());
    let subs = t.ok(&["framework_get_subsystems"]);
    assert_eq!(subs[0]["subsystem"], json!("bdev"));
    assert_eq!(t.err(&["framework_get_config", "nope"]).code, -32602);
    assert_eq!(t.err(&["framework_start_init"]).code, -1);
}

#[test]
fn bad_requests_get_spdk_codes_and_the_target_stays_up() {
    let Some((tools, dir)) = setup() else { return };
    let t = start(&tools, dir.path());
    let sock = &t.sock;

    let (r, closed) = raw_exchange(
        sock,
        br#"{"jsonrpc":"2.0","method":"no_such_method","id":1}"#,
        1,
    );
    assert_eq!(
        r[0]["error"],
        json!({"code": -32601, "message": "Method not found"})
    );
    assert_eq!(r[0]["id"], json!(1));
    assert!(!closed);

    // Malformed JSON: -32700, then the connection is closed.
    let (r, closed) = raw_exchange(sock, b"{\"method\": nope}", 1);
    assert_eq!(r[0]["error"]["code"], json!(-32700));
    assert!(closed);

    // Invalid requests, an empty batch, bad params, a notification (no answer), a batch.
    let reqs = concat!(
        r#"{"jsonrpc":"1.0","method":"spdk_get_version","id":2}"#,
        r#"[]"#,
        r#"{"jsonrpc":"2.0","method":"bdev_malloc_create","params":{"num_blocks":8},"id":3}"#,
        r#"{"jsonrpc":"2.0","method":"bdev_malloc_create","params":{"num_blocks":8,"block_size":512,"bogus":1},"id":4}"#,
        r#"{"jsonrpc":"2.0","method":"bdev_malloc_create","params":{"num_blocks":"8","block_size":512},"id":5}"#,
        r#"{"jsonrpc":"2.0","method":"spdk_get_version"}"#,
        r#"{"jsonrpc":"2.0","method":"spdk_get_version","id":null}"#,
        r#"[{"jsonrpc":"2.0","method":"spdk_get_version","id":6},{"method":"x"},{"jsonrpc":"2.0","method":"bdev_get_bdevs","params":{"name":"zz"},"id":7}]"#,
        r#"{"jsonrpc":"2.0","method":"bdev_malloc_delete","params":["M0"],"id":8}"#,
    );
    let (r, closed) = raw_exchange(sock, reqs.as_bytes(), 7);
    assert!(!closed);
    assert_eq!(r.len(), 7, "{r:?}");
    assert_eq!(
        (r[0]["id"].clone(), r[0]["error"]["code"].clone()),
        (json!(2), json!(-32600))
    );
    assert_eq!(
        (r[1]["id"].clone(), r[1]["error"]["code"].clone()),
        (Value::Null, json!(-32600))
    );
    let decode = json!({"code": -32603, "message": "spdk_json_decode_object failed"});
    assert_eq!(r[2]["error"], decode);
    assert_eq!(r[3]["error"], decode);
    assert_eq!(r[4]["error"], decode);
    let batch = r[5].as_array().expect("batch answer is an array");
    assert_eq!(batch.len(), 2);
    assert_eq!(batch[0]["id"], json!(6));
    assert!(batch[0]["result"]["version"].is_string());
    assert_eq!(
        batch[1]["error"],
        json!({"code": -19, "message": "No such device"})
    );
    assert_eq!(r[6]["error"], decode);

    // A request split in small pieces is still one request.
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    use std::io::{BufRead, Write};
    for piece in br#"{"jsonrpc":"2.0","method":"spdk_get_version","id":9}"#.chunks(3) {
        s.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&line).unwrap()["id"],
        json!(9)
    );

    // The client still works.
    assert!(t.ok(&["spdk_get_version"])["version"].is_string());
    assert_eq!(t.ok(&["bdev_get_bdevs"]), json!([]));
}

#[test]
fn many_clients_and_garbage() {
    let Some((tools, dir)) = setup() else { return };
    let t = start(&tools, dir.path());
    let sock = t.sock.clone();
    use std::io::{BufRead, Write};
    // 128 clients connected at once, each with a request in flight.
    let mut conns: Vec<_> = (0..128)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).expect("connect"))
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let req = format!(r#"{{"jsonrpc":"2.0","method":"spdk_get_version","id":{i}}}"#);
        c.write_all(req.as_bytes()).unwrap();
    }
    // Meanwhile 10 MiB of garbage on another connection.
    let garbage: Vec<u8> = (0..10 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let (r, closed) = raw_exchange(&sock, &garbage, 1);
    assert_eq!(r[0]["error"]["code"], json!(-32700));
    assert!(closed);
    // And 10 MiB of one never-ending string: no answer needed, the target must not stall.
    let g2 = sock.clone();
    let hog = std::thread::spawn(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&g2).unwrap();
        let _ = s.write_all(b"{\"method\":\"");
        let _ = s.write_all(&vec![b'a'; 10 << 20]);
        s
    });
    for (i, c) in conns.iter().enumerate() {
        let mut line = String::new();
        std::io::BufReader::new(c).read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["id"], json!(i));
        assert!(v["result"]["version"].is_string());
    }
    let _hog = hog.join().unwrap();
    // A request over the 32 MiB limit: a parse error, then the connection is closed.
    let mut big =
        b"{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get_version\",\"id\":1,\"params\":{\"x\":\""
            .to_vec();
    big.extend(std::iter::repeat_n(b'a', 33 << 20));
    let (r, closed) = raw_exchange(&sock, &big, 1);
    assert_eq!(r[0]["error"]["code"], json!(-32700));
    assert!(closed);
    assert!(t.ok(&["spdk_get_version"])["version"].is_string());
}

#[test]
fn nbd_round_trip_with_qemu() {
    let Some((tools, dir)) = setup() else { return };
    let t = start(&tools, dir.path());
    let (nbd, listen) = nbd_listen(dir.path());
    let f = sparse_in(dir.path(), "disk.img", 64 << 20);
    t.ok(&["bdev_aio_create", f.to_str().unwrap(), "aio0", "4096"]);
    t.ok(&["bdev_malloc_create", "-b", "M0", "16", "512"]);
    assert_eq!(t.ok(&["nbd_server_start", &listen]), json!(true));
    assert_eq!(t.err(&["nbd_server_start", &listen]).code, -17);
    assert_eq!(
        t.ok(&["nbd_export_add", "aio0", "-n", "disk"]),
        json!("disk")
    );
    assert_eq!(t.ok(&["nbd_export_add", "M0"]), json!("M0"));
    assert_eq!(t.err(&["nbd_export_add", "M0"]).code, -17);
    assert_eq!(t.err(&["nbd_export_add", "nope"]).code, -19);
    let ex = t.ok(&["nbd_get_exports"]);
    assert_eq!(
        ex,
        json!([
            {"name": "M0", "bdev_name": "M0", "writable": true, "connections": 0},
            {"name": "disk", "bdev_name": "aio0", "writable": true, "connections": 0},
        ])
    );

    let uri = nbd_uri("disk", &nbd);
    qemu_io_ok(
        &tools,
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 1M 64k",
            "write -P 0x11 3000 1000",
            "write -z 8M 1M",
            "write -P 0x22 63M 1M",
            "flush",
            "discard 20M 1M",
        ],
    );
    qemu_io_ok(
        &tools,
        &uri,
        &[
            "read -P 0xab 0 3000",
            "read -P 0x11 3000 1000",
            "read -P 0xab 4000 96k",
            "read -P 0xcd 1M 64k",
            "read -P 0 8M 1M",
            "read -P 0x22 63M 1M",
        ],
    );
    // Reading past the end fails.
    let (ok, _) = qemu_io(&tools, &uri, false, &["read 63M 2M"]);
    assert!(!ok);
    // The bytes reached the file.
    let data = std::fs::read(&f).unwrap();
    assert!(data[..3000].iter().all(|&b| b == 0xab));
    assert!(data[3000..4000].iter().all(|&b| b == 0x11));
    assert!(data[(63 << 20)..].iter().all(|&b| b == 0x22));

    // qemu-img reads the whole export (many requests in flight) and writes an image into
    // another export.
    let copy = dir.path().join("copy.img");
    qemu_img_convert(&tools, &[], &uri, copy.to_str().unwrap());
    assert_eq!(std::fs::read(&copy).unwrap(), data);
    let src = dir.path().join("src.img");
    let pattern: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &pattern).unwrap();
    qemu_img_convert(&tools, &["-n"], src.to_str().unwrap(), &nbd_uri("M0", &nbd));
    let back = dir.path().join("back.img");
    qemu_img_convert(&tools, &[], &nbd_uri("M0", &nbd), back.to_str().unwrap());
    assert_eq!(std::fs::read(&back).unwrap(), pattern);

    assert_eq!(t.ok(&["nbd_export_remove", "disk"]), json!(true));
    assert_eq!(t.err(&["nbd_export_remove", "disk"]).code, -19);
    let (ok, _) = qemu_io(&tools, &uri, true, &["read 0 4k"]);
    assert!(!ok);
    // Non-loopback TCP needs allow_remote.
    assert_eq!(t.ok(&["nbd_server_stop"]), json!(true));
    assert_eq!(t.err(&["nbd_server_start", "192.0.2.1:10809"]).code, -1);
    // Loopback TCP is fine.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    assert_eq!(t.ok(&["nbd_server_start", &listen]), json!(true));
    let cfg = t.ok(&["framework_get_config", "nbd"]);
    assert_eq!(cfg[0]["params"], json!({"listen": listen}));
    qemu_io_ok(
        &tools,
        &format!("nbd://127.0.0.1:{port}/M0"),
        &["write -P 0x44 0 4k", "read -P 0x44 0 4k"],
    );
}

#[test]
fn read_only_exports_refuse_writes() {
    let Some((tools, dir)) = setup() else { return };
    let (t, nbd) = start_with_nbd(&tools, dir.path());
    t.ok(&["bdev_malloc_create", "-b", "M0", "8", "512"]);
    t.ok(&["nbd_export_add", "M0", "-n", "rw"]);
    qemu_io_ok(&tools, &nbd_uri("rw", &nbd), &["write -P 0x5a 0 64k"]);
    t.ok(&["nbd_export_add", "M0", "-n", "ro", "--read-only"]);
    let ex = t.ok(&["nbd_get_exports"]);
    assert_eq!(ex[0]["name"], json!("ro"));
    assert_eq!(ex[0]["writable"], json!(false));

    // qemu-io reads it read-only and sees the data.
    qemu_io_ro_ok(&tools, &nbd_uri("ro", &nbd), &["read -P 0x5a 0 64k"]);
    // A client that writes anyway gets EPERM, and the data is unchanged.
    let mut c = NbdClient::connect(&nbd, "ro").unwrap();
    assert_ne!(c.flags & proto::TFLAG_READ_ONLY, 0);
    assert_eq!(c.size, 8 << 20);
    let (err, _) = c.request(proto::CMD_WRITE, 0, 4096, &[0u8; 4096]).unwrap();
    assert_eq!(err, proto::EPERM);
    let (err, _) = c.request(proto::CMD_WRITE_ZEROES, 0, 4096, &[]).unwrap();
    assert_eq!(err, proto::EPERM);
    let (err, _) = c.request(proto::CMD_TRIM, 0, 4096, &[]).unwrap();
    assert_eq!(err, proto::EPERM);
    let (err, data) = c.request(proto::CMD_READ, 0, 4096, &[]).unwrap();
    assert_eq!(err, 0);
    assert!(data.iter().all(|&b| b == 0x5a));
    let (err, _) = c.request(proto::CMD_READ, 8 << 20, 4096, &[]).unwrap();
    assert_eq!(err, proto::EINVAL);
    let (err, _) = c.request(proto::CMD_FLUSH, 0, 0, &[]).unwrap();
    assert_eq!(err, 0);

    // A read-only aio bdev is exported read-only even when writable is asked for.
    let f = dir.path().join("ro.img");
    std::fs::write(&f, vec![0x77u8; 1 << 20]).unwrap();
    t.ok(&["bdev_aio_create", "-r", f.to_str().unwrap(), "aioro", "512"]);
    t.ok(&["nbd_export_add", "aioro"]);
    let ex = t.ok(&["nbd_get_exports"]);
    let e = ex
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "aioro")
        .unwrap();
    assert_eq!(e["writable"], json!(false));
    let mut c = NbdClient::connect(&nbd, "aioro").unwrap();
    let (err, _) = c.request(proto::CMD_WRITE, 512, 512, &[0u8; 512]).unwrap();
    assert_eq!(err, proto::EPERM);
    assert!(std::fs::read(&f).unwrap().iter().all(|&b| b == 0x77));
}

#[test]
fn hot_removal_ends_nbd_connections() {
    let Some((tools, dir)) = setup() else { return };
    let (t, nbd) = start_with_nbd(&tools, dir.path());
    t.ok(&["bdev_malloc_create", "-b", "M0", "8", "512"]);
    t.ok(&["nbd_export_add", "M0"]);
    let mut c = NbdClient::connect(&nbd, "M0").unwrap();
    let (err, _) = c.request(proto::CMD_WRITE, 0, 4096, &[1u8; 4096]).unwrap();
    assert_eq!(err, 0);
    assert_eq!(t.ok(&["nbd_get_exports"])[0]["connections"], json!(1));
    // Deleting the bdev completes although a client is connected, ends the connection and
    // removes the export.
    assert_eq!(t.ok(&["bdev_malloc_delete", "M0"]), Value::Null);
    assert!(c.wait_closed());
    assert_eq!(t.ok(&["nbd_get_exports"]), json!([]));
    assert_eq!(t.ok(&["bdev_get_bdevs"]), json!([]));
}

#[test]
fn save_config_and_restart() {
    let Some((tools, dir)) = setup() else { return };
    let (mut t, sock, nbd) = start_restartable(&tools, dir.path());
    let f = sparse_in(dir.path(), "disk.img", 32 << 20);
    let uuid = "7e5a0000-e5a0-4e5a-8e5a-000000000001";
    t.ok(&["bdev_malloc_create", "-b", "M0", "-u", uuid, "8", "512"]);
    t.ok(&[
        "bdev_aio_create",
        "-u",
        "7e5a0000-e5a0-4e5a-8e5a-000000000002",
        f.to_str().unwrap(),
        "aio0",
        "4096",
    ]);
    t.ok(&["bdev_error_create", "M0"]);
    t.ok(&["nbd_server_start", &format!("unix:{}", nbd.display())]);
    t.ok(&["nbd_export_add", "aio0", "-n", "disk"]);
    t.ok(&["nbd_export_add", "EE_M0", "-n", "err", "--read-only"]);
    qemu_io_ok(&tools, &nbd_uri("disk", &nbd), &["write -P 0x3c 1M 1M"]);

    let cfg_path = dir.path().join("config.json");
    let cfg = t.save_config(false);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let bdev_cfg = &cfg["subsystems"][0]["config"];
    assert_eq!(
        methods(bdev_cfg),
        [
            "bdev_set_options",
            "bdev_malloc_create",
            "bdev_aio_create",
            "bdev_error_create",
            "bdev_wait_for_examine"
        ]
    );
    assert_eq!(bdev_cfg[1]["params"]["uuid"], json!(uuid));
    assert_eq!(cfg["subsystems"][1]["subsystem"], json!("nbd"));
    assert_eq!(
        methods(&cfg["subsystems"][1]["config"]),
        ["nbd_server_start", "nbd_export_add", "nbd_export_add"]
    );
    let before = t.ok(&["bdev_get_bdevs"]);

    assert_eq!(t.stop(), 0);
    assert!(!sock.exists(), "socket file removed at shutdown");

    let t = Tgt::start_json(&tools, dir.path(), &sock, &cfg_path);
    let after = t.ok(&["bdev_get_bdevs"]);
    assert_eq!(names(&after), names(&before));
    for (a, b) in after
        .as_array()
        .unwrap()
        .iter()
        .zip(before.as_array().unwrap())
    {
        // bdev-core's error bdev takes a fresh UUID each time it is created.
        if a["product_name"] != json!("Error disk") {
            assert_eq!(a["uuid"], b["uuid"]);
        }
    }
    assert_eq!(t.save_config(false), cfg);
    assert_eq!(t.ok(&["nbd_get_exports"]).as_array().unwrap().len(), 2);
    qemu_io_ok(
        &tools,
        &nbd_uri("disk", &nbd),
        &["read -P 0x3c 1M 1M", "read -P 0 0 1M"],
    );

    // load_config into a fresh empty target replays the same file through the client.
    drop(t);
    let sock2 = dir.path().join("rpc2.sock");
    let _ = std::fs::remove_file(&nbd);
    let t2 = Tgt::start(&tools, dir.path(), &sock2, &[]);
    let out = std::process::Command::new(&tools.rpc)
        .arg("-s")
        .arg(&sock2)
        .arg("load_config")
        .stdin(std::fs::File::open(&cfg_path).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("skipped"));
    assert_eq!(names(&t2.ok(&["bdev_get_bdevs"])), names(&before));
}

#[test]
fn kill_instance_and_bad_config() {
    let Some((tools, dir)) = setup() else { return };
    let sock = dir.path().join("rpc.sock");
    let mut t = Tgt::start(&tools, dir.path(), &sock, &[]);
    // The client only offers valid signal names; an unknown one over the raw socket.
    let (r, _) = raw_exchange(
        &sock,
        br#"{"jsonrpc":"2.0","method":"spdk_kill_instance","params":{"sig_name":"SIGFOO"},"id":1}"#,
        1,
    );
    assert_eq!(r[0]["error"]["code"], json!(-32602));
    assert!(t.alive());
    // Clients that stall in the NBD handshake, or sit idle on an export, do not hold up the
    // shutdown.
    let nbd = t.nbd_server_start(dir.path());
    t.ok(&["bdev_malloc_create", "-b", "M0", "8", "512"]);
    t.ok(&["nbd_export_add", "M0"]);
    let _stalled = std::os::unix::net::UnixStream::connect(&nbd).unwrap();
    let _idle = NbdClient::connect(&nbd, "M0").unwrap();
    let started = std::time::Instant::now();
    assert_eq!(t.stop(), 0);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!sock.exists());
    assert!(!nbd.exists());

    // A config whose method fails stops the start with an error.
    let cfg = dir.path().join("bad.json");
    std::fs::write(
        &cfg,
        serde_json::to_vec(&json!({"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create", "params": {"name": "A", "num_blocks": 16, "block_size": 512}},
            {"method": "bdev_malloc_create", "params": {"name": "A", "num_blocks": 16, "block_size": 512}}
        ]}]}))
        .unwrap(),
    )
    .unwrap();
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_tgt"))
        .arg("-r")
        .arg(&sock)
        .arg("--json")
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(1));
    assert!(!sock.exists());
    // With SPDK's --json-ignore-init-errors the failure is skipped; SPDK's -m is accepted.
    let cfg_s = cfg.to_str().unwrap();
    let t = Tgt::start(
        &tools,
        dir.path(),
        &sock,
        &["--json", cfg_s, "--json-ignore-init-errors", "-m", "0x1"],
    );
    assert_eq!(names(&t.ok(&["bdev_get_bdevs"])), ["A"]);
}

#[test]
fn read_only_bdev_over_nbd_and_config() {
    let Some((tools, dir)) = setup() else { return };
    let (mut t, sock, nbd) = start_restartable(&tools, dir.path());
    let f = sparse_in(dir.path(), "base.img", 8 << 20);
    t.ok(&["nbd_server_start", &format!("unix:{}", nbd.display())]);
    t.ok(&["bdev_aio_create", f.to_str().unwrap(), "B", "512"]);
    t.ok(&["nbd_export_add", "B"]);
    qemu_io_ok(&tools, &nbd_uri("B", &nbd), &["write -P 0x42 0 1M"]);
    t.ok(&["nbd_export_remove", "B"]);

    assert_eq!(t.ok(&["bdev_ro_create", "B", "-n", "ro0"]), json!("ro0"));
    assert_eq!(t.err(&["bdev_ro_create", "nope", "-n", "ro1"]).code, -19);
    let ro = &t.ok(&["bdev_get_bdevs", "-b", "ro0"])[0];
    assert_eq!(ro["num_blocks"], json!(16384));
    assert_eq!(ro["supported_io_types"]["read"], json!(true));
    assert_eq!(ro["supported_io_types"]["write"], json!(false));
    assert_eq!(ro["supported_io_types"]["unmap"], json!(false));
    assert_eq!(ro["supported_io_types"]["write_zeroes"], json!(false));
    let b = &t.ok(&["bdev_get_bdevs", "-b", "B"])[0];
    assert_eq!(b["claimed"], json!(true));
    assert_eq!(b["claim_type"], json!("read_many_write_none"));
    // The claimed base cannot be exported writable any more.
    assert_eq!(t.err(&["nbd_export_add", "B"]).code, -1);

    assert_eq!(t.ok(&["nbd_export_add", "ro0"]), json!("ro0"));
    assert_eq!(t.ok(&["nbd_get_exports"])[0]["writable"], json!(false));
    qemu_io_ro_ok(
        &tools,
        &nbd_uri("ro0", &nbd),
        &["read -P 0x42 0 1M", "read -P 0 1M 7M"],
    );
    let mut c = NbdClient::connect(&nbd, "ro0").unwrap();
    let (err, _) = c.request(proto::CMD_WRITE, 0, 512, &[0u8; 512]).unwrap();
    assert_eq!(err, proto::EPERM);
    drop(c);

    let cfg = t.save_config(false);
    assert_eq!(
        methods(&cfg["subsystems"][0]["config"]),
        [
            "bdev_set_options",
            "bdev_aio_create",
            "bdev_ro_create",
            "bdev_wait_for_examine"
        ]
    );
    let ro_entry = &cfg["subsystems"][0]["config"][2]["params"];
    assert_eq!(ro_entry["name"], json!("ro0"));
    assert_eq!(ro_entry["base_bdev_name"], json!("B"));
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_eq!(t.stop(), 0);

    let t = Tgt::start_json(&tools, dir.path(), &sock, &cfg_path);
    assert_eq!(names(&t.ok(&["bdev_get_bdevs"])), ["B", "ro0"]);
    qemu_io_ro_ok(&tools, &nbd_uri("ro0", &nbd), &["read -P 0x42 0 1M"]);
    assert_eq!(t.save_config(false), cfg);

    // Removing the base takes the read-only bdev and its export with it.
    assert_eq!(t.ok(&["bdev_aio_delete", "B"]), Value::Null);
    assert_eq!(t.ok(&["bdev_get_bdevs"]), json!([]));
    assert_eq!(t.ok(&["nbd_get_exports"]), json!([]));
    assert_eq!(t.err(&["bdev_ro_delete", "ro0"]).code, -19);
}

#[test]
fn nbd_client_bdev_over_our_own_export() {
    let Some((tools, dir)) = setup() else { return };
    let t = start(&tools, dir.path());
    let (nbd, listen) = nbd_listen(dir.path());
    t.ok(&["nbd_server_start", &listen]);
    t.ok(&["bdev_malloc_create", "-b", "M0", "8", "4096"]);
    t.ok(&["nbd_export_add", "M0"]);
    qemu_io_ok(&tools, &nbd_uri("M0", &nbd), &["write -P 0x9c 0 1M"]);
    // A client bdev in the same target, over the export, re-exported under another name.
    let u = "7e5a0000-e5a0-4e5a-8e5a-00000000000c";
    assert_eq!(
        t.ok(&["bdev_nbd_client_create", "C0", &listen, "M0", "-u", u]),
        json!("C0")
    );
    let c = &t.ok(&["bdev_get_bdevs", "-b", u])[0];
    assert_eq!(c["name"], json!("C0"));
    assert_eq!(c["num_blocks"], json!(2048));
    t.ok(&["nbd_export_add", "C0"]);
    qemu_io_ok(
        &tools,
        &nbd_uri("C0", &nbd),
        &["read -P 0x9c 0 1M", "write -P 0x9d 1M 1M"],
    );
    qemu_io_ok(&tools, &nbd_uri("M0", &nbd), &["read -P 0x9d 1M 1M"]);
    let cfg = t.save_config(false);
    let text = serde_json::to_string(&cfg["subsystems"][0]).unwrap();
    assert!(text.contains("bdev_nbd_client_create"), "{text}");
    let info = t.ok(&["bdev_nbd_client_get", "-b", "C0"]);
    assert_eq!(info[0]["state"], json!("connected"));
    assert_eq!(info[0]["registered"], json!(true));
    // A client waiting for an absent server is saved too (it is not in the registry).
    assert_eq!(waiting_client(&t, dir.path()), json!("C1"));
    assert_eq!(t.err(&["bdev_get_bdevs", "-b", "C1"]).code, -19);
    let cfg = t.ok(&["framework_get_config", "bdev"]);
    let c1 = cfg
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["params"]["name"] == json!("C1"))
        .expect("C1 in the config");
    assert_eq!(c1["method"], json!("bdev_nbd_client_create"));
    assert_eq!(t.ok(&["bdev_nbd_client_delete", "C1"]), json!(true));
    assert_eq!(t.ok(&["bdev_nbd_client_delete", "C0"]), json!(true));
    assert_eq!(t.err(&["bdev_nbd_client_delete", "C0"]).code, -19);
    assert_eq!(t.ok(&["nbd_get_exports"]).as_array().unwrap().len(), 1);
}
