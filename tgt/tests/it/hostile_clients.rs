//! Hardening of the target against hostile or mistaken clients and operators (issue 14),
//! each finding driven the way it was found: `spdk-rpc`, raw NBD and JSON-RPC over the
//! socket, qemu-io, a second process. Limits are in `docs/reliability.md` ("Limits").

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use nbd_proto as proto;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// The common setup, failing (not skipping) when a tool is missing.
fn setup() -> (Tools, tempfile::TempDir) {
    crate::common::setup().expect("spdk-rpc, qemu-io and qemu-img are needed")
}

/// Runs `tgt ARGS` to its end (it must fail at start); returns (exit code, stderr).
fn tgt_fails(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tgt"));
    c.args(args);
    let mut child = c
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st.code().unwrap_or(-1), err);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("tgt {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `f` is true (or panics after `secs`).
fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn exports_connections(t: &Tgt) -> u64 {
    t.ok(&["nbd_get_exports"])[0]["connections"]
        .as_u64()
        .unwrap()
}

/// Finding 3 (and 9: a long path answered -5): socket paths of `tgt -r` and
/// `nbd_server_start` only ever replace a stale socket.
#[test]
fn socket_paths_never_clobber_files() {
    let (tools, dir) = setup();
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, b"a store image given by mistake").unwrap();

    // tgt -r on a regular file: refused, the file keeps its bytes.
    let (code, err) = tgt_fails(&["-r".as_ref(), precious.as_os_str()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("not a socket") && err.contains("regular file"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&precious).unwrap(),
        b"a store image given by mistake"
    );
    // On a directory, and on a path too long for a socket address.
    let (code, err) = tgt_fails(&["-r".as_ref(), dir.path().as_os_str()]);
    assert!(code != 0 && err.contains("a directory"), "{err}");
    assert!(dir.path().is_dir());
    let long = dir.path().join("l".repeat(200));
    let (code, err) = tgt_fails(&["-r".as_ref(), long.as_os_str()]);
    assert!(code != 0 && err.contains("File name too long"), "{err}");

    // A live target's socket: the second target is refused, the first goes on.
    let sock = dir.path().join("rpc.sock");
    let mut t = Tgt::start(&tools, dir.path(), &sock, &[]);
    let (code, err) = tgt_fails(&["-r".as_ref(), sock.as_os_str()]);
    assert!(code != 0 && err.contains("Address already in use"), "{err}");
    assert!(t.ok(&["spdk_get_version"])["version"].is_string());

    // nbd_server_start on a regular file: -17, the file untouched.
    let listen = |p: &Path| format!("unix:{}", p.display());
    let e = t.err(&["nbd_server_start", &listen(&precious)]);
    assert_eq!(e.code, -17, "{e:?}");
    assert!(e.message.contains("not a socket"), "{e:?}");
    assert_eq!(
        std::fs::read(&precious).unwrap(),
        b"a store image given by mistake"
    );
    let e = t.err(&["nbd_server_start", &listen(dir.path())]);
    assert_eq!(e.code, -17, "{e:?}");
    // A 220-character path: ENAMETOOLONG, not EIO.
    let long = format!("/tmp/{}", "n".repeat(215));
    let e = t.err(&["nbd_server_start", &format!("unix:{long}")]);
    assert_eq!(e.code, -libc::ENAMETOOLONG as i64, "{e:?}");
    assert!(e.message.contains("File name too long"), "{e:?}");
    // A live socket of another process: -98.
    let other = dir.path().join("other.sock");
    let held = std::os::unix::net::UnixListener::bind(&other).unwrap();
    assert_eq!(t.err(&["nbd_server_start", &listen(&other)]).code, -98);
    drop(held);
    // Now stale (nobody listens): replaced.
    assert!(std::fs::symlink_metadata(&other).is_ok());
    t.ok(&["nbd_server_start", &listen(&other)]);
    assert!(UnixStream::connect(&other).is_ok());
    t.ok(&["nbd_server_stop"]);
    assert!(!other.exists(), "our own socket is removed at stop");
    assert_eq!(t.stop(), 0);
    assert!(!sock.exists());
}

/// Finding 4: 128 reads of 32 MiB whose replies are never read. With the default limits the
/// connection holds at most 128 MiB, other clients keep working, and it is dropped after the
/// stall timeout.
#[test]
fn an_nbd_client_that_never_reads_is_bounded_then_dropped() {
    let (tools, dir) = setup();
    let sock = dir.path().join("rpc.sock");
    let t = Tgt::start(&tools, dir.path(), &sock, &["--stall-timeout-ms", "3000"]);
    let f = sparse_in(dir.path(), "disk.img", 256 * MIB);
    t.ok(&["bdev_aio_create", f.to_str().unwrap(), "aio0", "4096"]);
    let nbd = t.nbd_server_start(dir.path());
    t.ok(&["nbd_export_add", "aio0", "-n", "d"]);
    let uri = nbd_uri("d", &nbd);
    qemu_io_ok(&tools, &uri, &["write -P 0x5a 0 1M"]);
    let pid = t.pid();
    let base = proc_status_bytes(pid, "VmHWM");

    let mut c = NbdClient::connect(&nbd, "d").unwrap();
    let mut msg = Vec::new();
    for i in 0..128u64 {
        msg.extend(proto::encode_request(&proto::Request {
            flags: 0,
            cmd: proto::CMD_READ,
            cookie: i,
            offset: (i % 7) * MIB,
            len: proto::MAX_PAYLOAD,
        }));
    }
    c.stream().write_all(&msg).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // Another client is served meanwhile.
    qemu_io_ok(&tools, &uri, &["read -P 0x5a 0 1M"]);
    let grown = proc_status_bytes(pid, "VmHWM").saturating_sub(base);
    eprintln!("VmHWM grew by {} MiB", grown / MIB);
    // 128 MiB per connection plus buffers; the finding was 2.6 GiB.
    assert!(grown < 200 * MIB, "VmHWM grew by {} MiB", grown / MIB);
    // Dropped after the stall timeout (3 s): the export has no connection left.
    wait_for(20, "the stalled client is dropped", || {
        exports_connections(&t) == 0
    });
    let rss = proc_status_bytes(pid, "VmRSS");
    eprintln!("VmRSS after the drop {} MiB", rss / MIB);
    // Reading now drains what was sent before the drop, then EOF.
    c.stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut sink = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        match c.stream().read(&mut sink) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) => panic!("read after drop: {e}"),
        }
    }
    assert!(got < 128 * u64::from(proto::MAX_PAYLOAD), "{got}");
    qemu_io_ok(&tools, &uri, &["read -P 0x5a 0 1M"]);
}

/// Finding 9: a write over 32 MiB gets EOVERFLOW and the connection goes on.
#[test]
fn an_oversized_nbd_write_gets_eoverflow() {
    let (tools, dir) = setup();
    let t = start(&tools, dir.path());
    t.ok(&["bdev_malloc_create", "-b", "M", "64", "4096"]);
    let nbd = t.nbd_server_start(dir.path());
    t.ok(&["nbd_export_add", "M"]);
    let mut c = NbdClient::connect(&nbd, "M").unwrap();
    let big = proto::MAX_PAYLOAD + 4096;
    let payload = vec![0xeeu8; big as usize];
    let (err, _) = c.request(proto::CMD_WRITE, 0, big, &payload).unwrap();
    assert_eq!(err, proto::EOVERFLOW);
    // The payload was skipped: the next requests on the same connection work.
    assert_eq!(
        c.request(proto::CMD_WRITE, 0, 4096, &[3u8; 4096])
            .unwrap()
            .0,
        0
    );
    let (err, data) = c.request(proto::CMD_READ, 0, 4096, &[]).unwrap();
    assert_eq!((err, data), (0, vec![3u8; 4096]));
    // A read that large too.
    assert_eq!(
        c.request(proto::CMD_READ, 0, big, &[]).unwrap().0,
        proto::EOVERFLOW
    );
}

/// Issue 13 item 1 on our export: FUA writes and FLUSH reach the device. The error bdev fails
/// the device's next flush: a plain write succeeds, a FUA write and a FLUSH fail.
#[test]
fn nbd_fua_and_flush_reach_the_device() {
    let (tools, dir) = setup();
    let t = start(&tools, dir.path());
    t.ok(&["bdev_malloc_create", "-b", "M", "16", "4096"]);
    t.ok(&["bdev_error_create", "M"]);
    let nbd = t.nbd_server_start(dir.path());
    t.ok(&["nbd_export_add", "EE_M", "-n", "e"]);
    let mut c = NbdClient::connect(&nbd, "e").unwrap();
    assert_ne!(c.flags & proto::TFLAG_SEND_FUA, 0);
    assert_ne!(c.flags & proto::TFLAG_SEND_FLUSH, 0);
    // Arms one flush failure on the error bdev.
    let fail_next_flush = || {
        t.ok(&[
            "bdev_error_inject_error",
            "EE_M",
            "flush",
            "failure",
            "-n",
            "1",
        ])
    };
    fail_next_flush();
    // No flush: the pending flush failure is not consumed.
    let (e, _) = c.request(proto::CMD_WRITE, 0, 4096, &[1u8; 4096]).unwrap();
    assert_eq!(e, 0);
    // One FUA write of 4 KiB at 4 KiB; returns the reply's error.
    let fua_write = |c: &mut NbdClient| {
        c.request_flags(
            proto::CMD_WRITE,
            proto::CMD_FLAG_FUA,
            4096,
            4096,
            &[2u8; 4096],
        )
        .unwrap()
        .0
    };
    let e = fua_write(&mut c);
    assert_eq!(e, proto::EIO, "a FUA write must flush the device");
    // The failure was used up by that flush: the same FUA write now succeeds.
    let e = fua_write(&mut c);
    assert_eq!(e, 0);
    fail_next_flush();
    assert_eq!(
        c.request(proto::CMD_FLUSH, 0, 0, &[]).unwrap().0,
        proto::EIO
    );
    assert_eq!(c.request(proto::CMD_FLUSH, 0, 0, &[]).unwrap().0, 0);
    let (e, data) = c.request(proto::CMD_READ, 0, 8192, &[]).unwrap();
    assert_eq!(e, 0);
    assert!(data[..4096].iter().all(|&b| b == 1) && data[4096..].iter().all(|&b| b == 2));
}

/// Finding 6: 100 clients send `bdev_get_bdevs {name: "nope", timeout: 3600000}` and hang
/// up; their fds (and waits) are gone at once. A half-closed client still gets its answer.
/// Timeouts above the bound are -22.
#[test]
fn hung_up_rpc_clients_leave_nothing_behind() {
    let (tools, dir) = setup();
    let sock = dir.path().join("rpc.sock");
    let t = Tgt::start(&tools, dir.path(), &sock, &[]);
    let pid = t.pid();
    t.ok(&["spdk_get_version"]);
    std::thread::sleep(Duration::from_millis(200));
    let base = fd_count(pid);
    let req = br#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","id":1,"params":{"name":"nope","timeout":3600000}}"#;
    let clients: Vec<UnixStream> = (0..100)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.write_all(req).unwrap();
            s
        })
        .collect();
    wait_for(10, "100 connections open", || fd_count(pid) >= base + 100);
    std::thread::sleep(Duration::from_millis(300));
    assert!(fd_count(pid) >= base + 100, "the waits ended early");
    drop(clients);
    let t0 = Instant::now();
    wait_for(5, "fds back to the baseline", || fd_count(pid) <= base);
    eprintln!("fds back to {base} in {:?}", t0.elapsed());

    // A client that half-closes after sending is still answered.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(br#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","id":2,"params":{"name":"nope","timeout":500}}"#)
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_to_string(&mut out).unwrap();
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["error"]["code"], json!(-19));

    // Upper bounds.
    let e = t.err(&["bdev_get_bdevs", "-b", "nope", "-t", "3600001"]);
    assert_eq!(e.code, -22, "{e:?}");
    // (spdk-rpc cannot send u64::MAX itself: its socket timeout overflows.)
    let (r, _) = raw_exchange(
        &sock,
        br#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","id":3,"params":{"name":"nope","timeout":18446744073709551615}}"#,
        1,
    );
    assert_eq!(r[0]["error"]["code"], json!(-22), "{}", r[0]);
}

/// Finding 8 and the other retry/timeout parameters: values above the documented bounds are
/// -22, values at the bound are accepted.
#[test]
fn retry_and_timeout_parameters_are_bounded() {
    let (tools, dir) = setup();
    let t = start(&tools, dir.path());
    for args in [
        &["-d", "9223372036854775808"][..],
        &["-d", "60001"],
        &["-r", "1001"],
        &["-r", "4294967295", "-d", "1"],
    ] {
        let mut a = vec!["bdev_lvol_set_esnap_retry"];
        a.extend_from_slice(args);
        assert_eq!(t.err(&a).code, -22, "{args:?}");
    }
    assert_eq!(
        t.ok(&["bdev_lvol_get_esnap_retry"]),
        json!({"retries": 3, "delay_ms": 100})
    );
    t.ok(&["bdev_lvol_set_esnap_retry", "-r", "1000", "-d", "60000"]);
    assert_eq!(
        t.ok(&["bdev_lvol_get_esnap_retry"]),
        json!({"retries": 1000, "delay_ms": 60000})
    );
    for (k, v) in [
        ("io_timeout_ms", 3_600_001u64),
        ("reconnect_delay_ms", 3_600_001),
        ("reconnect_attempts", 1001),
    ] {
        let mut p = json!({"name": "n", "address": "unix:/nonexistent", "export": "",
            "background_connect": true});
        p[k] = json!(v);
        let (r, _) = raw_exchange(
            &t.sock,
            &serde_json::to_vec(
                &json!({"jsonrpc": "2.0", "id": 1, "method": "bdev_nbd_client_create", "params": p}),
            )
            .unwrap(),
            1,
        );
        assert_eq!(r[0]["error"]["code"], json!(-22), "{k}: {}", r[0]);
    }
    assert_eq!(t.ok(&["bdev_nbd_client_get"]), json!([]));
}

/// Finding 4, RPC side: 20 connections each sending a 31 MiB unterminated string. Memory
/// stays under the documented total, small requests are served meanwhile, and connections
/// that wait for budget longer than the stall timeout are dropped.
#[test]
fn rpc_partial_requests_share_a_bounded_budget() {
    let (tools, dir) = setup();
    let sock = dir.path().join("rpc.sock");
    let t = Tgt::start(&tools, dir.path(), &sock, &["--stall-timeout-ms", "3000"]);
    let pid = t.pid();
    t.ok(&["spdk_get_version"]);
    let base = proc_status_bytes(pid, "VmHWM");
    let senders: Vec<_> = (0..20)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).unwrap();
                s.set_write_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let mut sent = 0usize;
                let head = b"{\"method\":\"";
                s.write_all(head).unwrap();
                let chunk = vec![b'a'; 1 << 20];
                let t0 = Instant::now();
                let mut off = 0usize;
                // Send 31 MiB, or until the server gives up on us.
                while sent < 31 << 20 && t0.elapsed() < Duration::from_secs(60) {
                    match s.write(&chunk[off..]) {
                        Ok(n) => {
                            sent += n;
                            off = (off + n) % chunk.len();
                        }
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => return (sent, true, s),
                    }
                }
                (sent, false, s)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    // Small requests never wait for the budget: answered while the attack still runs.
    let (r, _) = raw_exchange(
        &sock,
        br#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","id":1}"#,
        1,
    );
    assert_eq!(r[0]["result"], json!([]));
    let running = senders.iter().filter(|h| !h.is_finished()).count();
    assert!(
        running > 0,
        "the attack was over before the small request was answered"
    );
    let results: Vec<(usize, bool, UnixStream)> =
        senders.into_iter().map(|h| h.join().unwrap()).collect();
    let grown = proc_status_bytes(pid, "VmHWM").saturating_sub(base);
    let dropped = results.iter().filter(|r| r.1).count();
    let done = results.iter().filter(|r| r.0 >= 31 << 20).count();
    eprintln!(
        "VmHWM grew by {} MiB; {done} sent everything, {dropped} were dropped",
        grown / MIB
    );
    // The RPC total (128 MiB) plus 64 KiB free per connection and the read buffers; the
    // finding was 676 MB.
    assert!(grown < 200 * MIB, "VmHWM grew by {} MiB", grown / MIB);
    assert_eq!(dropped + done, 20, "every sender finished or was dropped");
    assert!(dropped >= 10, "only {dropped} dropped");
    drop(results);
    assert_eq!(t.ok(&["bdev_get_bdevs"]), json!([]));
}

/// Finding 9: ids that do not fit a 64-bit integer come back exactly as sent; malloc block
/// sizes outside 512..=65536 (powers of two) are -22; `uuid`/`lvs_uuid` together with
/// `lvs_name` is -22 on every method that takes both.
#[test]
fn error_quality() {
    let (tools, dir) = setup();
    let t = start(&tools, dir.path());
    for id in [
        "18446744073709551616",
        "-18446744073709551617",
        "1e2",
        "1.50",
    ] {
        let req = format!(r#"{{"jsonrpc":"2.0","method":"spdk_get_version","id":{id}}}"#);
        let mut s = UnixStream::connect(&t.sock).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        let line = String::from_utf8(line).unwrap();
        assert!(
            line.starts_with(&format!(r#"{{"jsonrpc":"2.0","id":{id},"result":"#)),
            "{line}"
        );
    }
    // A batch with a big id among small ones.
    let (r, _) = raw_exchange(
        &t.sock,
        br#"[{"method":"spdk_get_version","id":36893488147419103232},{"method":"nope","id":5}]"#,
        1,
    );
    assert_eq!(r[0][1]["id"], json!(5));
    assert_eq!(r[0][1]["error"]["code"], json!(-32601));

    // spdk-rpc takes the total size in MiB: 1024 MiB is at least one block of each size.
    for bs in ["1073741824", "131072", "520", "256", "1536"] {
        let e = t.err(&["bdev_malloc_create", "-b", "Mx", "1024", bs]);
        assert_eq!(e.code, -22, "{bs}");
        // SPDK's strerror text, then which parameter is wrong.
        assert!(
            e.message
                .starts_with(&format!("Invalid argument: block_size {bs} ")),
            "{bs}: {}",
            e.message
        );
    }
    assert_eq!(
        t.ok(&["bdev_malloc_create", "-b", "M", "16", "65536"]),
        json!("M")
    );
    assert_eq!(
        t.ok(&["bdev_malloc_create", "-b", "L", "16", "512"]),
        json!("L")
    );
    let uuid = t.ok(&["bdev_lvol_create_lvstore", "L", "lvs"]);
    let u = uuid.as_str().unwrap();
    for m in [
        &["bdev_lvol_get_lvols", "-u", u, "-l", "lvs"][..],
        &["bdev_lvol_get_lvstores", "-u", u, "-l", "lvs"],
        &["bdev_lvol_create", "-u", u, "-l", "lvs", "v", "4"],
        &["bdev_lvol_delete_lvstore", "-u", u, "-l", "lvs"],
        &["bdev_lvol_grow_lvstore", "-u", u, "-l", "lvs"],
    ] {
        assert_eq!(t.err(m).code, -22, "{m:?}");
    }
    assert_eq!(
        t.ok(&["bdev_lvol_get_lvstores"]).as_array().unwrap().len(),
        1
    );
}

/// Finding 2 at the RPC layer: sizes that do not fit in 64 bits are -22 before anything is
/// allocated, and the target survives a 1 PiB thin resize. The target runs with a 4 GiB
/// address-space limit so that an allocation sized by the request kills it instead of the
/// machine.
#[test]
fn huge_lvol_sizes_do_not_kill_the_target() {
    let (tools, dir) = setup();
    let sock = dir.path().join("rpc.sock");
    let mut t = Tgt::start_limited(&tools, dir.path(), &sock, 4 << 30);
    let f = sparse_in(dir.path(), "store.img", 128 * MIB);
    t.ok(&["bdev_aio_create", f.to_str().unwrap(), "aioL", "4096"]);
    t.ok(&["bdev_lvol_create_lvstore", "aioL", "lvsL"]);
    for size in ["17592186044416", "18446744073709551615"] {
        for thin in [true, false] {
            let mut a = vec!["bdev_lvol_create", "-l", "lvsL"];
            if thin {
                a.push("-t");
            }
            a.extend(["huge", size]);
            let e = t.err(&a);
            assert_eq!(e.code, -22, "{a:?}: {e:?}");
            assert!(t.alive());
        }
    }
    assert_eq!(
        t.err(&["bdev_lvol_create", "-l", "lvsL", "zero", "0"]).code,
        -22
    );
    // Thick and bigger than the store: ENOSPC from the blobstore, as SPDK.
    let e = t.err(&["bdev_lvol_create", "-l", "lvsL", "big", "1024"]);
    assert_eq!(e.code, -32602, "{e:?}");
    assert!(e.message.contains("No space left"), "{e:?}");
    t.ok(&["bdev_lvol_create", "-l", "lvsL", "-t", "x", "16"]);
    assert_eq!(
        t.err(&["bdev_lvol_resize", "lvsL/x", "18446744073709551615"])
            .code,
        -22
    );
    // 1 PiB thin: an answer (success or an error), and the target lives on.
    let r = t.rpc(&["bdev_lvol_resize", "lvsL/x", "1073741824"]);
    eprintln!("1 PiB thin resize: {r:?}");
    assert!(t.alive(), "the target died on a 1 PiB thin resize");
    let rss = proc_status_bytes(t.pid(), "VmHWM");
    eprintln!("VmHWM after the 1 PiB resize: {} MiB", rss / MIB);
    assert!(rss < 1 << 30, "VmHWM {} MiB", rss / MIB);
    t.ok(&["bdev_lvol_resize", "lvsL/x", "16"]);
    let lvols = t.ok(&["bdev_lvol_get_lvols"]);
    assert_eq!(lvols.as_array().unwrap().len(), 1);
    assert_eq!(t.stop(), 0);
}

/// Finding 5 at the RPC layer: one file cannot back two aio bdevs, in one target or in two.
#[test]
fn an_aio_file_is_opened_once() {
    let (tools, dir) = setup();
    let data = dir.path().join("tgt-data");
    std::fs::create_dir(&data).unwrap();
    let store = data.join("store.img");
    sparse_file(&store, 64 * MIB);
    let fs = store.to_str().unwrap();
    let a = Tgt::start(&tools, dir.path(), &dir.path().join("a.sock"), &[]);
    a.ok(&["bdev_aio_create", fs, "store0", "4096"]);
    a.ok(&["bdev_lvol_create_lvstore", "store0", "lvs0"]);
    let e = a.err(&["bdev_aio_create", fs, "store1", "4096"]);
    eprintln!("second bdev_aio_create in one target: {e:?}");
    assert_eq!(e.code, -16, "{e:?}");
    assert!(e.message.contains("store0"), "the holder is named: {e:?}");
    assert_eq!(a.ok(&["bdev_get_bdevs"]).as_array().unwrap().len(), 1);
    // A second target process on the same store.
    let b = Tgt::start(&tools, dir.path(), &dir.path().join("b.sock"), &[]);
    let e = b.err(&["bdev_aio_create", fs, "store0", "4096"]);
    eprintln!("bdev_aio_create in a second target: {e:?}");
    assert_eq!(e.code, -16, "{e:?}");
    assert!(e.message.contains("another process"), "{e:?}");
    assert_eq!(b.ok(&["bdev_lvol_get_lvstores"]), json!([]));
    // The first target still owns a working store.
    a.ok(&["bdev_lvol_create", "-l", "lvs0", "v", "4"]);
    assert_eq!(a.ok(&["bdev_lvol_get_lvols"]).as_array().unwrap().len(), 1);
}

/// One persistent JSON-RPC connection (requests answered in order, one line each).
struct Conn {
    s: UnixStream,
    r: std::io::BufReader<UnixStream>,
    id: u64,
}

impl Conn {
    fn new(sock: &Path) -> Conn {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let r = std::io::BufReader::new(s.try_clone().unwrap());
        Conn { s, r, id: 0 }
    }
    /// (code, message); code 0 on success.
    fn call(&mut self, method: &str, params: Value) -> (i64, String) {
        use std::io::BufRead;
        self.id += 1;
        let req = json!({"jsonrpc": "2.0", "id": self.id, "method": method, "params": params});
        self.s
            .write_all(&serde_json::to_vec(&req).unwrap())
            .unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["id"], json!(self.id));
        match v.get("error") {
            None => (0, String::new()),
            Some(e) => (
                e["code"].as_i64().unwrap(),
                e["message"].as_str().unwrap().to_string(),
            ),
        }
    }
}

/// Finding 9: creates, snapshots, resizes and deletes racing the deletion of their lvol
/// store (and of each other) answer one code when the object is gone: -19 "No such device",
/// never -2, -9 or -32602/-32603 with those texts.
#[test]
fn racing_requests_answer_one_code_for_a_vanished_object() {
    let (tools, dir) = setup();
    let sock = dir.path().join("rpc.sock");
    let t = Tgt::start(&tools, dir.path(), &sock, &[]);
    t.ok(&["bdev_malloc_create", "-b", "M", "128", "4096"]);
    let stop = Instant::now() + Duration::from_secs(8);
    let results = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, i64, String)>::new()));
    let mut hs = Vec::new();
    type Step = fn(&mut Conn, u64) -> Vec<(&'static str, (i64, String))>;
    let steps: [Step; 4] = [
        |c, _| {
            vec![
                (
                    "create_lvstore",
                    c.call(
                        "bdev_lvol_create_lvstore",
                        json!({"bdev_name": "M", "lvs_name": "lvs"}),
                    ),
                ),
                (
                    "delete_lvstore",
                    c.call("bdev_lvol_delete_lvstore", json!({"lvs_name": "lvs"})),
                ),
            ]
        },
        |c, n| {
            vec![(
                "create",
                c.call(
                    "bdev_lvol_create",
                    json!({"lvs_name": "lvs", "lvol_name": format!("v{}", n % 3),
                        "size_in_mib": 4, "thin_provision": true}),
                ),
            )]
        },
        |c, n| {
            let v = format!("lvs/v{}", n % 3);
            vec![
                (
                    "snapshot",
                    c.call(
                        "bdev_lvol_snapshot",
                        json!({"lvol_name": v, "snapshot_name": format!("s{n}")}),
                    ),
                ),
                (
                    "resize",
                    c.call("bdev_lvol_resize", json!({"name": v, "size_in_mib": 8})),
                ),
                ("delete", c.call("bdev_lvol_delete", json!({"name": v}))),
            ]
        },
        |c, n| {
            vec![(
                "create",
                c.call(
                    "bdev_lvol_create",
                    json!({"lvs_name": "lvs", "lvol_name": format!("w{}", n % 2),
                        "size_in_mib": 4}),
                ),
            )]
        },
    ];
    for step in steps {
        let sock = sock.clone();
        let results = results.clone();
        hs.push(std::thread::spawn(move || {
            let mut c = Conn::new(&sock);
            let mut n = 0u64;
            while Instant::now() < stop {
                n += 1;
                for (m, (code, msg)) in step(&mut c, n) {
                    results.lock().unwrap().push((m.to_string(), code, msg));
                }
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    let results = results.lock().unwrap();
    let mut seen = std::collections::BTreeMap::<(String, i64, String), usize>::new();
    for r in results.iter() {
        *seen.entry(r.clone()).or_default() += 1;
    }
    eprintln!("{seen:#?}");
    let gone_texts = [
        "No such device",
        "No such file or directory",
        "Bad file descriptor",
    ];
    for (m, code, msg) in seen.keys() {
        if gone_texts.contains(&msg.as_str()) {
            assert_eq!(
                (*code, msg.as_str()),
                (-19, "No such device"),
                "{m} answered {code} {msg}"
            );
        }
    }
    assert!(
        seen.keys().any(|(m, c, _)| m == "create" && *c == 0),
        "no create succeeded: the race was not exercised"
    );
    assert!(seen.keys().any(|(_, c, _)| *c == -19));
    assert!(t.ok(&["spdk_get_version"])["version"].is_string());
}

/// Finding 1, driven as it was found: a store on an aio bdev created without `--fallocate`,
/// default clear methods; a thick lvol is filled with 0xcc through an NBD export by qemu-io,
/// then freed (deleted, or shrunk), and a new thick lvol over the freed clusters must read
/// back zeroes and no byte of 0xcc, with no restart in between.
#[test]
fn a_new_thick_lvol_never_shows_a_freed_lvols_bytes() {
    let (tools, dir) = setup();
    for shrink in [false, true] {
        let sub = dir.path().join(if shrink { "shrink" } else { "delete" });
        std::fs::create_dir(&sub).unwrap();
        let mut t = Tgt::start(&tools, &sub, &sub.join("rpc.sock"), &[]);
        let f = sub.join("leak.img");
        sparse_file(&f, 128 * MIB);
        t.ok(&["bdev_aio_create", f.to_str().unwrap(), "aioL", "4096"]);
        t.ok(&["bdev_lvol_create_lvstore", "aioL", "lvsL"]);
        let a = t.ok(&["bdev_lvol_create", "-l", "lvsL", "A", "64"]);
        let a = a.as_str().unwrap().to_string();
        let nbd = t.nbd_server_start(&sub);
        t.ok(&["nbd_export_add", &a, "-n", "a"]);
        qemu_io_ok(
            &tools,
            &nbd_uri("a", &nbd),
            &["write -P 0xcc 0 64M", "flush"],
        );
        t.ok(&["nbd_export_remove", "a"]);
        if shrink {
            t.ok(&["bdev_lvol_resize", "lvsL/A", "16"]);
        } else {
            t.ok(&["bdev_lvol_delete", "lvsL/A"]);
        }
        let b_size = if shrink { "48" } else { "64" };
        let b = t.ok(&["bdev_lvol_create", "-l", "lvsL", "B", b_size]);
        t.ok(&["nbd_export_add", b.as_str().unwrap(), "-n", "b"]);
        let uri = nbd_uri("b", &nbd);
        let len = format!("{b_size}M");
        let (leak, text) = qemu_io(&tools, &uri, true, &[&format!("read -P 0xcc 0 {len}")]);
        assert!(!leak, "shrink={shrink}: B reads A's bytes: {text}");
        let (zero, text) = qemu_io(&tools, &uri, true, &[&format!("read -P 0 0 {len}")]);
        assert!(zero, "shrink={shrink}: B is not zeroes: {text}");
        if shrink {
            // What A kept is still A's.
            t.ok(&["nbd_export_add", &a, "-n", "a2"]);
            let (kept, text) = qemu_io(&tools, &nbd_uri("a2", &nbd), true, &["read -P 0xcc 0 16M"]);
            assert!(kept, "A lost its first 16 MiB: {text}");
        }
        assert_eq!(t.stop(), 0);
    }
}
