//! The embedded default keeps what was configured at run time across a restart, a kill -9
//! included (`tgt-data/config.json`, saved atomically after each change).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;

fn kill9(t: &mut Tgt) {
    let mut c = t.child.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
}

/// Waits for the default setup to finish (the RPC socket opens before it): its last step
/// is the first save.
fn wait_saved(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.join("tgt-data/config.json").exists() {
        assert!(
            Instant::now() < deadline,
            "no config.json after the default setup"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn saved(dir: &Path) -> Value {
    let text = std::fs::read(dir.join("tgt-data/config.json")).unwrap();
    serde_json::from_slice(&text).expect("config.json is a whole JSON document")
}

fn methods(doc: &Value) -> Vec<(String, Value)> {
    doc["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["config"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            (
                e["method"].as_str().unwrap().to_string(),
                e["params"].clone(),
            )
        })
        .collect()
}

/// Waits until the replay after a restart has registered `ro1` and both exports.
fn wait_replayed(t: &Tgt) {
    t.ok(&["bdev_get_bdevs", "-b", "ro1", "-t", "20000"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while t.ok(&["nbd_get_exports"]).as_array().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "exports not replayed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn embedded_default_config_survives_kill_9() {
    let Some(tools) = tools() else { return };
    let _lock = DefaultSocketLock::take();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut t = Tgt::start_default(&tools, d);
    wait_saved(d);
    // The first start already saved the default setup.
    let m = methods(&saved(d));
    assert!(
        m.iter()
            .any(|(k, p)| k == "bdev_aio_create" && p["name"] == "store0"),
        "{m:?}"
    );
    assert!(m.iter().any(|(k, _)| k == "nbd_server_start"));

    let f = d.join("a.img");
    std::fs::File::create(&f)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    t.ok(&["bdev_aio_create", f.to_str().unwrap(), "aio1", "4096"]);
    t.ok(&["bdev_ro_create", "aio1", "-n", "ro1"]);
    t.ok(&["bdev_lvol_create", "-l", "lvs0", "-t", "vol0", "8"]);
    t.ok(&["nbd_export_add", "lvs0/vol0", "-n", "vol0"]);
    t.ok(&["nbd_export_add", "ro1", "-n", "ro1"]);
    let nbd = d.join("tgt-data/nbd.sock");
    qemu_io_ok(&tools, &nbd_uri("vol0", &nbd), &["write -P 0x5a 0 64k"]);

    // Saved before each answer: the file already holds all of it.
    let m = methods(&saved(d));
    for (k, name) in [
        ("bdev_aio_create", "aio1"),
        ("bdev_ro_create", "ro1"),
        ("nbd_export_add", "vol0"),
        ("nbd_export_add", "ro1"),
    ] {
        assert!(
            m.iter().any(|(mk, p)| mk == k && p["name"] == name),
            "{k} {name}: {m:?}"
        );
    }

    // Kill -9 in the middle of a stream of changes (each one a save): the file is the old
    // or the new document, never a torn one.
    let sock = t.sock.clone();
    let churn = std::thread::spawn(move || {
        for i in 0..200 {
            let req = format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"bdev_malloc_create","params":{{"name":"tmp{i}","num_blocks":8,"block_size":512}}}}"#
            );
            if std::os::unix::net::UnixStream::connect(&sock).is_err() {
                return i;
            }
            let (r, closed) = raw_exchange(&sock, req.as_bytes(), 1);
            if closed && r.is_empty() {
                return i;
            }
        }
        200
    });
    std::thread::sleep(Duration::from_millis(300));
    kill9(&mut t);
    let done = churn.join().unwrap();
    assert!(done > 0, "some saves happened before the kill");
    let m = methods(&saved(d));
    assert!(
        m.iter()
            .any(|(k, p)| k == "bdev_ro_create" && p["name"] == "ro1"),
        "{m:?}"
    );

    // Restart: everything is back.
    let start = Instant::now();
    let mut t = Tgt::start_default(&tools, d);
    // The replay runs after the socket opened: wait for its last entries.
    wait_replayed(&t);
    let names: Vec<String> = t
        .ok(&["bdev_get_bdevs"])
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    for n in ["store0", "aio1", "ro1"] {
        assert!(
            names.iter().any(|x| x == n),
            "{n} missing after restart: {names:?}"
        );
    }
    let exports = t.ok(&["nbd_get_exports"]);
    let ex: Vec<&str> = exports
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(ex.contains(&"vol0") && ex.contains(&"ro1"), "{exports}");
    // The export serves the lvol's data again.
    qemu_io_ok(&tools, &nbd_uri("vol0", &nbd), &["read -P 0x5a 0 64k"]);
    // The read-only bdev refuses writes as before.
    let (ok, _) = qemu_io(&tools, &nbd_uri("ro1", &nbd), false, &["write -P 1 0 4k"]);
    assert!(!ok);
    assert!(start.elapsed() < Duration::from_secs(60));

    // A clean stop and start changes nothing in the file.
    let before = std::fs::read(d.join("tgt-data/config.json")).unwrap();
    assert_eq!(t.stop(), 0);
    let mut t = Tgt::start_default(&tools, d);
    wait_replayed(&t);
    assert_eq!(
        std::fs::read(d.join("tgt-data/config.json")).unwrap(),
        before
    );

    // Deleting is saved too.
    t.ok(&["nbd_export_remove", "ro1"]);
    t.ok(&["bdev_ro_delete", "ro1"]);
    let m = methods(&saved(d));
    assert!(!m.iter().any(|(k, _)| k == "bdev_ro_create"), "{m:?}");
    assert_eq!(t.stop(), 0);
}
