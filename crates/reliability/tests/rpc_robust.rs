//! RPC robustness (issue 9 part 7): the real `tgt` binary on a Unix socket, 100 clients at
//! once with valid and invalid requests, half-closed connections, and clients sending 10 MiB
//! of garbage. Every valid request is answered correctly and the target stays up.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Builds the `tgt` binary (same profile and target dir as this test) and returns its path.
fn tgt_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf(); // target/<profile>
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", "tgt", "--bin", "tgt"]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("run cargo build -p tgt");
    assert!(st.success(), "cargo build -p tgt failed");
    let p = dir.join("tgt");
    assert!(p.is_file(), "{} missing", p.display());
    p
}

struct Tgt(Child);

impl Drop for Tgt {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let bin = tgt_binary();
    common::with_timeout(110, move || {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("rpc.sock");
        let child = Command::new(&bin)
            .arg("-r")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut tgt = Tgt(child);
        let t0 = Instant::now();
        while UnixStream::connect(&sock).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(20), "tgt did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = call(
            &sock,
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
        assert!(tgt.0.try_wait().unwrap().is_none(), "tgt exited");
        let r = call(
            &sock,
            &json!({"jsonrpc":"2.0","method":"bdev_get_bdevs","id":"last"}),
        );
        assert_eq!(r["result"][0]["name"], json!("m0"), "{r}");
        eprintln!("rpc robustness: 100 clients, {answered} valid/invalid requests answered, 20 garbage clients, in {:?}", t0.elapsed());
    });
}
