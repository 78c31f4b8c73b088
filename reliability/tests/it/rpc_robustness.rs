//! RPC robustness (issue 9 part 7): the real `tgt` binary on a Unix socket, 100 clients at
//! once with valid and invalid requests, half-closed connections, and clients sending 10 MiB
//! of garbage. Every valid request is answered correctly and the target stays up.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use test_support::prelude::with_timeout;
use test_support::tgt::{tgt_binary, NbdClient, Tgt};

/// Starts `tgt` (built first, outside the timeout) on a socket in a new temp dir and runs
/// `test` (given the dir, the target and its socket) under a 110 s timeout.
fn with_target(test: impl FnOnce(&std::path::Path, &mut Tgt, &PathBuf) + Send + 'static) {
    tgt_binary();
    with_timeout(110, move || {
        let dir = tempfile::tempdir().unwrap();
        let mut tgt = Tgt::start(dir.path(), "robust");
        let sock = tgt.sock().to_path_buf();
        test(dir.path(), &mut tgt, &sock);
    });
}

fn call(sock: &PathBuf, req: &Value) -> Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&serde_json::to_vec(req).unwrap()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

#[test]
fn hundred_clients_garbage_and_half_closed_connections() {
    with_target(|_, tgt, sock| {
        let t0 = Instant::now();
        let r = call(
            sock,
            &json!({"jsonrpc": "2.0", "method": "bdev_malloc_create", "id": 1,
            "params": {"name": "m0", "num_blocks": 2048, "block_size": 512}}),
        );
        assert_eq!(r["result"], json!("m0"), "{r}");

        let mut threads = Vec::new();
        for c in 0..100u64 {
            let sock = sock.clone();
            threads.push(std::thread::spawn(move || -> (u64, u64) {
                let mut s = UnixStream::connect(&sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                match c % 10 {
                    // Garbage: 10 MiB that is not JSON. The target answers a parse error and
                    // closes; our write may then fail with EPIPE, which is fine.
                    0 => {
                        let junk = vec![b'#'; 10 << 20];
                        let _ = s.write_all(&junk);
                        let mut out = Vec::new();
                        let _ = s.read_to_end(&mut out);
                        return (0, 0);
                    }
                    // An unterminated 10 MiB string, then hang up.
                    1 => {
                        let mut junk = b"{\"method\":\"".to_vec();
                        junk.extend(std::iter::repeat_n(b'a', 10 << 20));
                        let _ = s.write_all(&junk);
                        return (0, 0);
                    }
                    _ => {}
                }
                // A mix: valid requests, unknown methods, bad params, invalid envelopes.
                let mut reqs = Vec::new();
                let mut expect = Vec::new();
                for i in 0..10u64 {
                    let id = c * 1000 + i;
                    let (req, code) = match i % 5 {
                        0 => (json!({"jsonrpc":"2.0","method":"bdev_get_bdevs","id":id,"params":{"name":"m0"}}), 0),
                        1 => (json!({"jsonrpc":"2.0","method":"no_such_method","id":id}), -32601),
                        2 => (json!({"jsonrpc":"2.0","method":"bdev_get_bdevs","id":id,"params":{"bogus":[1,2]}}), -32602),
                        3 => (json!({"jsonrpc":"2.0","method":7,"id":id}), -32600),
                        _ => (json!({"jsonrpc":"2.0","method":"rpc_get_methods","id":id}), 0),
                    };
                    reqs.extend(serde_json::to_vec(&req).unwrap());
                    expect.push((id, code));
                }
                s.write_all(&reqs).unwrap();
                if c % 10 == 2 {
                    // Half-closed: no more requests, but the answers must still come.
                    s.shutdown(std::net::Shutdown::Write).unwrap();
                }
                let mut rd = BufReader::new(s);
                let mut ok = 0;
                for (id, code) in expect {
                    let mut line = String::new();
                    rd.read_line(&mut line).unwrap();
                    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                    assert_eq!(v["id"], json!(id), "answers in order: {v}");
                    if code == 0 {
                        assert!(v.get("error").is_none(), "{v}");
                        if v["result"].is_array() && v["result"].get(0).is_some_and(|b| b.get("name").is_some()) {
                            assert_eq!(v["result"][0]["name"], json!("m0"));
                        }
                    } else {
                        let got = v["error"]["code"].as_i64().unwrap();
                        // Bad params: SPDK answers -32602 (invalid params) or -32603.
                        assert!(got == code || (code == -32602 && got == -32603), "{v}");
                    }
                    ok += 1;
                }
                (ok, 1)
            }));
        }
        let mut answered = 0;
        let mut clients = 0;
        for t in threads {
            let (a, c) = t.join().expect("client thread");
            answered += a;
            clients += c;
        }
        assert_eq!(clients, 80);
        assert_eq!(answered, 800);
        // Still up and answering.
        assert!(!tgt.exited(), "tgt exited");
        let r = call(
            sock,
            &json!({"jsonrpc":"2.0","method":"bdev_get_bdevs","id":"last"}),
        );
        assert_eq!(r["result"][0]["name"], json!("m0"), "{r}");
        eprintln!("rpc robustness: 100 clients, {answered} valid/invalid requests answered, 20 garbage clients, in {:?}", t0.elapsed());
    });
}

#[test]
fn nbd_server_survives_hostile_clients() {
    use nbd_proto as proto;
    with_target(|dir, tgt, sock| {
        let nbd = dir.join("nbd.sock");
        for req in [
            json!({"jsonrpc":"2.0","method":"bdev_malloc_create","id":1,"params":{"name":"m0","num_blocks":2048,"block_size":512}}),
            json!({"jsonrpc":"2.0","method":"nbd_server_start","id":2,"params":{"listen":format!("unix:{}", nbd.display())}}),
            json!({"jsonrpc":"2.0","method":"nbd_export_add","id":3,"params":{"bdev_name":"m0","name":"m0"}}),
        ] {
            let r = call(sock, &req);
            assert!(r.get("error").is_none(), "{r}");
        }
        // Hostile clients: every NBD corpus file, 1 MiB of garbage, a header announcing a
        // 4 GiB option; twice each, all at once; each then hangs up.
        let corpus =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/nbd_request");
        let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(corpus)
            .unwrap()
            .flatten()
            .map(|e| std::fs::read(e.path()).unwrap())
            .collect();
        inputs.push(vec![0xa5; 1 << 20]);
        let mut big = 3u32.to_be_bytes().to_vec();
        big.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        big.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        big.extend_from_slice(&u32::MAX.to_be_bytes());
        inputs.push(big);
        let mut threads = Vec::new();
        for input in inputs.clone().into_iter().chain(inputs) {
            let nbd = nbd.clone();
            threads.push(std::thread::spawn(move || {
                let mut s = UnixStream::connect(&nbd).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut g = [0u8; 18];
                s.read_exact(&mut g).unwrap();
                let _ = s.write_all(&input);
                let _ = s.shutdown(std::net::Shutdown::Write);
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }));
        }
        // Meanwhile a well-behaved client writes and reads back.
        let mut c = NbdClient::connect(&nbd, "m0").unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        let len = data.len() as u32;
        assert_eq!(c.request(proto::CMD_WRITE, 4096, len, &data).unwrap().0, 0);
        let (e, back) = c.request(proto::CMD_READ, 4096, len, &[]).unwrap();
        assert_eq!(e, 0);
        assert_eq!(back, data);
        // Out-of-range and oversized requests get errors, not a dropped connection.
        assert_ne!(c.request(proto::CMD_READ, 1 << 40, 512, &[]).unwrap().0, 0);
        assert_eq!(
            c.request(proto::CMD_READ, 0, u32::MAX, &[]).unwrap().0,
            proto::EOVERFLOW
        );
        for t in threads {
            t.join().expect("hostile client thread");
        }
        // Still serving both sockets.
        let mut c2 = NbdClient::connect(&nbd, "m0").unwrap();
        let (e, back) = c2.request(proto::CMD_READ, 4096, len, &[]).unwrap();
        assert_eq!((e, back), (0, data));
        assert!(!tgt.exited(), "tgt exited");
        let r = call(
            sock,
            &json!({"jsonrpc":"2.0","method":"nbd_get_exports","id":9}),
        );
        assert!(r.get("error").is_none(), "{r}");
    });
}

/// Every method the target lists, called with hostile params (wrong types, huge numbers,
/// long strings, nesting): each call is answered (result or error) and the target stays up.
/// Methods that would stop the target or touch files and sockets are left out.
#[test]
fn every_method_with_hostile_params() {
    with_target(|_, tgt, sock| {
        let r = call(
            sock,
            &json!({"jsonrpc":"2.0","method":"rpc_get_methods","id":0}),
        );
        let methods: Vec<String> = r["result"]
            .as_array()
            .expect("method list")
            .iter()
            .filter_map(|m| m.as_str().map(String::from))
            .collect();
        assert!(methods.len() > 10, "{methods:?}");
        let skip = [
            "kill",
            "shutdown",
            "aio",
            "uring",
            "file",
            "nbd_server_start",
            "load",
            "save",
            "framework_start_init",
            "wait",
        ];
        let long = "x".repeat(5000);
        let params = [
            json!({}),
            json!([]),
            json!([1, "a", null]),
            json!({"name": 1}),
            json!({"name": long}),
            json!({"name": "m0", "num_blocks": 1e30, "block_size": 512}),
            json!({"name": "m1", "num_blocks": -1, "block_size": 0}),
            json!({"name": "m2", "num_blocks": u64::MAX, "block_size": 4096}),
            json!({"bdev_name": {"a": [1, {"b": null}]}, "lvs_name": [], "size_in_mib": "9"}),
            json!({"lvol_name": "\u{0}\u{ffff}", "uuid": "not-a-uuid", "cluster_sz": 3}),
        ];
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut rd = BufReader::new(s.try_clone().unwrap());
        let mut calls = 0;
        for (i, m) in methods.iter().enumerate() {
            if skip.iter().any(|k| m.contains(k)) {
                continue;
            }
            for (j, p) in params.iter().enumerate() {
                let id = (i * 100 + j) as u64;
                let req = json!({"jsonrpc":"2.0","method":m,"params":p,"id":id});
                s.write_all(&serde_json::to_vec(&req).unwrap()).unwrap();
                let mut line = String::new();
                rd.read_line(&mut line)
                    .unwrap_or_else(|e| panic!("{m} {p}: {e}"));
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{m}: {e}: {line:?}"));
                assert_eq!(v["id"], json!(id), "{m}: {v}");
                assert!(
                    v.get("result").is_some() != v.get("error").is_some(),
                    "{m}: {v}"
                );
                calls += 1;
            }
        }
        assert!(!tgt.exited(), "tgt exited");
        let r = call(
            sock,
            &json!({"jsonrpc":"2.0","method":"bdev_get_bdevs","id":"last"}),
        );
        assert!(r["result"].is_array(), "{r}");
        eprintln!(
            "hostile params: {calls} calls over {} methods",
            methods.len()
        );
    });
}
