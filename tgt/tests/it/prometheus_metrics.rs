//! The Prometheus endpoint (`tgt --metrics`), scraped over HTTP and parsed with the
//! reference parser (`prometheus_client.parser` in the spdk-rpc venv).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use nbd_proto as proto;
use serde_json::Value;

const ESNAP_UUID: &str = "7d2f8f34-3a1c-4d4e-9c55-0b8f6d1e2a01";

/// The python next to spdk-rpc, if it has prometheus_client; else the test is recorded as
/// skipped (a failure under CI).
fn parser_python(tools: &Tools) -> Option<PathBuf> {
    let py = tools.rpc.parent().map(|d| d.join("python"));
    let ok = py.as_ref().is_some_and(|p| {
        Command::new(p)
            .args(["-c", "import prometheus_client.parser"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        test_support::skip(
            std::thread::current().name().unwrap_or("metrics"),
            &format!("needs prometheus_client in the python beside spdk-rpc ({py:?}): pip install prometheus_client"),
        );
        return None;
    }
    py
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` over HTTP/1.0: (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "connect metrics: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("header end");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Parses the exposition with prometheus_client: [[family, type, [[sample, labels, value]]]].
fn parse(py: &Path, text: &str) -> Vec<Value> {
    let script = "import sys, json\n\
from prometheus_client.parser import text_string_to_metric_families as f\n\
print(json.dumps([[m.name, m.type, [[s.name, s.labels, s.value] for s in m.samples]] for m in f(sys.stdin.read())]))\n";
    let mut child = Command::new(py)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().unwrap().clone()
}

/// The value of sample `name` with exactly the labels `labels`.
fn sample(fams: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    fams.iter()
        .flat_map(|f| f[2].as_array().unwrap().iter())
        .find(|s| {
            s[0] == name
                && s[1].as_object().unwrap().len() == labels.len()
                && labels.iter().all(|(k, v)| s[1][*k] == *v)
        })
        .map(|s| s[2].as_f64().unwrap())
}

fn family_type(fams: &[Value], name: &str) -> Option<String> {
    fams.iter()
        .find(|f| f[0] == name)
        .map(|f| f[1].as_str().unwrap().to_string())
}

#[test]
fn metrics_endpoint_parses_and_counts_what_happened() {
    let Some(tools) = tools() else { return };
    let Some(py) = parser_python(&tools) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let t = Tgt::start(
        &tools,
        dir.path(),
        &dir.path().join("rpc.sock"),
        &["--metrics", &addr],
    );
    let img = dir.path().join("store.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let imgs = img.to_str().unwrap();
    t.ok(&["bdev_aio_create", imgs, "aio0", "4096"]);
    t.ok(&["bdev_lvol_create_lvstore", "-c", "1048576", "aio0", "lvs"]);
    t.ok(&["bdev_lvol_create", "-l", "lvs", "-t", "v", "8"]);
    t.ok(&[
        "bdev_malloc_create",
        "-b",
        "E",
        "-u",
        ESNAP_UUID,
        "4",
        "4096",
    ]);
    t.ok(&["bdev_lvol_clone_bdev", ESNAP_UUID, "lvs", "ec"]);
    // The esnap base goes away while the store is unloaded: the clone comes back degraded.
    t.ok(&["bdev_aio_delete", "aio0"]);
    t.ok(&["bdev_malloc_delete", "E"]);
    t.ok(&["bdev_aio_create", imgs, "aio0", "4096"]);
    t.ok(&["bdev_wait_for_examine"]);
    t.ok(&["bdev_lvol_set_esnap_retry", "-r", "2", "-d", "1"]);
    let v = t.ok(&["bdev_get_bdevs", "-b", "lvs/v"])[0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    t.ok(&["bdev_enable_histogram", "--histogram", "lvs/v"]);

    let nbd = t.nbd_server_start(dir.path());
    t.ok(&["nbd_export_add", "lvs/v", "-n", "v"]);
    t.ok(&["nbd_export_add", "lvs/ec", "-n", "ec"]);
    let mut c = NbdClient::connect(&nbd, "v").unwrap();
    for i in 0..9u64 {
        let (e, _) = c
            .request(proto::CMD_WRITE, i << 16, 8192, &[i as u8; 8192])
            .unwrap();
        assert_eq!(e, 0);
    }
    for i in 0..4u64 {
        let (e, _) = c.request(proto::CMD_READ, i << 16, 4096, &[]).unwrap();
        assert_eq!(e, 0);
    }
    // A read of the degraded clone needs the missing base: 2 retries, then EIO.
    let mut d = NbdClient::connect(&nbd, "ec").unwrap();
    let (e, _) = d.request(proto::CMD_READ, 0, 4096, &[]).unwrap();
    assert_ne!(e, 0);

    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, "HTTP/1.0 200 OK");
    let fams = parse(&py, &body);
    let ops = |ty: &str| sample(&fams, "tgt_bdev_ops_total", &[("bdev", &v), ("type", ty)]);
    assert_eq!(ops("write"), Some(9.0), "{body}");
    assert_eq!(ops("read"), Some(4.0));
    assert_eq!(ops("unmap"), Some(0.0));
    assert_eq!(
        sample(
            &fams,
            "tgt_bdev_bytes_total",
            &[("bdev", &v), ("type", "write")]
        ),
        Some(9.0 * 8192.0)
    );
    assert_eq!(
        family_type(&fams, "tgt_bdev_ops").as_deref(),
        Some("counter")
    );
    assert_eq!(
        family_type(&fams, "tgt_bdev_io_latency_seconds").as_deref(),
        Some("histogram")
    );
    assert_eq!(
        sample(&fams, "tgt_bdev_io_latency_seconds_count", &[("bdev", &v)]),
        Some(13.0)
    );
    assert_eq!(
        sample(
            &fams,
            "tgt_bdev_io_latency_seconds_bucket",
            &[("bdev", &v), ("le", "+Inf")]
        ),
        Some(13.0)
    );
    assert!(
        sample(
            &fams,
            "tgt_bdev_latency_seconds_total",
            &[("bdev", &v), ("type", "write")]
        )
        .unwrap()
            > 0.0
    );
    let ec = t.ok(&["bdev_get_bdevs", "-b", "lvs/ec"])[0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        sample(&fams, "tgt_bdev_io_errors_total", &[("bdev", &ec)]),
        Some(1.0)
    );
    // The store's cluster counts are the ones bdev_lvol_get_lvstores reports; v's writes
    // allocated a cluster.
    let total = sample(&fams, "tgt_lvol_store_clusters", &[("lvs", "lvs")]).unwrap();
    let free = sample(&fams, "tgt_lvol_store_free_clusters", &[("lvs", "lvs")]).unwrap();
    let lvs = &t.ok(&["bdev_lvol_get_lvstores", "-l", "lvs"])[0];
    assert_eq!(total, lvs["total_data_clusters"].as_f64().unwrap());
    assert_eq!(free, lvs["free_clusters"].as_f64().unwrap());
    assert!(free < total);
    assert_eq!(
        sample(
            &fams,
            "tgt_lvol_store_cluster_size_bytes",
            &[("lvs", "lvs")]
        ),
        Some(1048576.0)
    );
    assert_eq!(sample(&fams, "tgt_lvol_degraded", &[]), Some(1.0));
    assert_eq!(
        sample(&fams, "tgt_lvol_esnap_retries_total", &[]),
        Some(2.0)
    );
    assert_eq!(sample(&fams, "tgt_lvol_esnap_eio_total", &[]), Some(1.0));
    assert_eq!(
        sample(&fams, "tgt_nbd_connections", &[("export", "v")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&fams, "tgt_nbd_connections", &[("export", "ec")]),
        Some(1.0)
    );
    drop(c);
    drop(d);

    // Other paths and methods.
    assert_eq!(http_get(port, "/nope").0, "HTTP/1.0 404 Not Found");
}

#[test]
fn metrics_refuse_a_non_loopback_address_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("rpc.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_tgt"))
        .arg("-r")
        .arg(&sock)
        .args(["--metrics", "0.0.0.0:0"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address"), "{err}");
    assert!(!sock.exists(), "the RPC socket is removed on that exit");

    // With the flag it serves.
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tgt"))
        .arg("-r")
        .arg(&sock)
        .args([
            "--metrics",
            &format!("0.0.0.0:{port}"),
            "--metrics-allow-remote",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert!(body.contains("# TYPE tgt_bdev_ops counter"), "{body}");
    let _ = child.kill();
    let _ = child.wait();
}

/// `--metrics` (and `--metrics-allow-remote`) only add observability: the target still runs
/// its embedded default (store, lvol store `lvs0`, NBD server) and serves metrics about it.
#[test]
fn metrics_alone_keep_the_embedded_default() {
    let Some(tools) = tools() else { return };
    let Some(py) = parser_python(&tools) else {
        return;
    };
    let _lock = DefaultSocketLock::take();
    for extra in [&[][..], &["--metrics-allow-remote"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let sock = PathBuf::from("/var/tmp/spdk.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tgt"))
            .args(["--metrics", &addr])
            .args(extra)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "no RPC socket");
            assert!(matches!(child.try_wait(), Ok(None)), "tgt exited early");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut t = Tgt {
            child: Some(child),
            sock,
            tools: tools.clone(),
        };
        t.ok(&["framework_wait_init"]);
        let lvs = t.ok(&["bdev_lvol_get_lvstores"]);
        assert_eq!(lvs[0]["name"], "lvs0", "{lvs}");
        assert_eq!(lvs[0]["base_bdev"], "store0", "{lvs}");
        assert!(dir.path().join("tgt-data/store.img").exists());
        assert!(t.ok(&["nbd_get_exports"]).is_array());
        let (status, body) = http_get(port, "/metrics");
        assert!(status.contains("200"), "{status}");
        let fams = parse(&py, &body);
        let clusters = sample(&fams, "tgt_lvol_store_clusters", &[("lvs", "lvs0")])
            .expect("lvs0 in the metrics");
        assert!(clusters > 0.0);
        assert_eq!(t.stop(), 0);
    }
}
