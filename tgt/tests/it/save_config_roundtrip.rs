//! `save_config` is a fixed point: save, restart from the saved file (`tgt --json`), save
//! again gives the same document, for every kind of bdev (issue 16), flattened and with
//! batches as SPDK's `framework_get_config` writes them.

use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

const ESNAP_UUID: &str = "3c1d5e2a-77f0-4b8e-9a61-5e2f9d0c4b11";
const GONE_UUID: &str = "3c1d5e2a-77f0-4b8e-9a61-5e2f9d0c4b22";

/// Waits until `bdev_get_bdevs` lists `n` bdevs (a `--json` start replays before it serves,
/// but tasting and NBD clients settle in the background).
fn wait_bdevs(t: &Tgt, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = t.ok(&["bdev_get_bdevs"]).as_array().unwrap().len();
        if got == n {
            return;
        }
        assert!(Instant::now() < deadline, "{got} bdevs, want {n}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn save_config_is_a_fixed_point_for_every_bdev_kind() {
    let Some(tools) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("rpc.sock");
    let mut t = Tgt::start(&tools, d, &sock, &[]);
    let f = |n: &str| d.join(n).to_str().unwrap().to_string();
    sparse_file(&d.join("store.img"), 64 << 20);
    sparse_file(&d.join("late.img"), 8 << 20);
    sparse_file(&d.join("gone.img"), 8 << 20);

    t.ok(&[
        "bdev_malloc_create",
        "-b",
        "M0",
        "-u",
        "4e1d0000-0000-4000-8000-000000000001",
        "4",
        "4096",
    ]);
    t.ok(&["bdev_null_create", "N0", "4", "512"]);
    t.ok(&["bdev_malloc_create", "-b", "M1", "2", "512"]);
    t.ok(&["bdev_error_create", "M1"]);
    t.ok(&["bdev_aio_create", &f("store.img"), "A0", "4096"]);
    t.ok(&["bdev_lvol_create_lvstore", "-c", "1048576", "A0", "lvs"]);
    t.ok(&["bdev_lvol_create", "-l", "lvs", "-t", "v0", "4"]);
    t.ok(&["bdev_lvol_snapshot", "lvs/v0", "s0"]);
    t.ok(&["bdev_lvol_clone", "lvs/s0", "c0"]);
    // A read-only bdev whose base is created after the lvol store, under an esnap clone.
    t.ok(&[
        "bdev_aio_create",
        "-u",
        ESNAP_UUID,
        &f("late.img"),
        "B0",
        "4096",
    ]);
    t.ok(&["bdev_ro_create", "B0", "-n", "R0"]);
    let ro_uuid = t.ok(&["bdev_get_bdevs", "-b", "R0"])[0]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    t.ok(&["bdev_lvol_clone_bdev", &ro_uuid, "lvs", "ec"]);
    // A degraded esnap clone: its base (an aio bdev) is deleted while the store is unloaded.
    t.ok(&[
        "bdev_aio_create",
        "-r",
        "-u",
        GONE_UUID,
        &f("gone.img"),
        "G0",
        "4096",
    ]);
    t.ok(&["bdev_lvol_clone_bdev", GONE_UUID, "lvs", "dg"]);
    t.ok(&["bdev_aio_delete", "A0"]);
    t.ok(&["bdev_aio_delete", "G0"]);
    t.ok(&["bdev_aio_create", &f("store.img"), "A0", "4096"]);
    t.ok(&["bdev_wait_for_examine"]);
    let dg = named(&t.ok(&["bdev_lvol_get_lvols", "-l", "lvs"]), "dg");
    assert_eq!(dg["is_degraded"], json!(true), "{dg}");
    // A read-only bdev over a lvol, and a histogram on a lvol and on a malloc bdev.
    t.ok(&["bdev_ro_create", "lvs/s0", "-n", "R1"]);
    t.ok(&[
        "bdev_enable_histogram",
        "--histogram",
        "lvs/v0",
        "-o",
        "write",
    ]);
    t.ok(&["bdev_enable_histogram", "--histogram", "M0"]);
    // NBD: a server, exports, a client bdev over an export and one waiting for its server.
    let (_, listen) = nbd_listen(d);
    t.ok(&["nbd_server_start", &listen]);
    t.ok(&["nbd_export_add", "lvs/c0", "-n", "c0"]);
    t.ok(&["nbd_export_add", "R0", "-n", "r0"]);
    t.ok(&[
        "bdev_nbd_client_create",
        "C0",
        &listen,
        "c0",
        "-u",
        "4e1d0000-0000-4000-8000-0000000000c0",
    ]);
    waiting_client(&t, d);
    let n_bdevs = t.ok(&["bdev_get_bdevs"]).as_array().unwrap().len();

    // The whole listings are written straight as text (tgt/src/listing.rs); each element is
    // what the Value path gives for that one bdev or store, keys in the same order.
    let all = t.ok(&["bdev_get_bdevs"]);
    for e in all.as_array().unwrap() {
        let one = t.ok(&["bdev_get_bdevs", "-b", e["name"].as_str().unwrap()]);
        assert_eq!(e.to_string(), one[0].to_string());
    }
    assert_eq!(
        t.ok(&["bdev_lvol_get_lvols"]).to_string(),
        t.ok(&["bdev_lvol_get_lvols", "-l", "lvs"]).to_string()
    );

    let first = t.save_config(false);
    let first_b = t.save_config(true);
    std::fs::write(
        d.join("saved.json"),
        serde_json::to_vec_pretty(&first).unwrap(),
    )
    .unwrap();
    assert_eq!(t.stop(), 0);

    // Every kind is in the file.
    let methods = methods(&Value::Array(bdev_config(&first)));
    for m in [
        "bdev_malloc_create",
        "bdev_null_create",
        "bdev_error_create",
        "bdev_aio_create",
        "bdev_ro_create",
        "bdev_nbd_client_create",
        "bdev_enable_histogram",
    ] {
        assert!(methods.iter().any(|x| x == m), "{m} missing: {methods:?}");
    }
    for round in 0..2 {
        let mut t = Tgt::start_json(&tools, d, &sock, &d.join("saved.json"));
        wait_bdevs(&t, n_bdevs);
        let again = t.save_config(false);
        assert_eq!(
            serde_json::to_string_pretty(&again).unwrap(),
            serde_json::to_string_pretty(&first).unwrap(),
            "round {round}: save_config after a restart differs"
        );
        assert_eq!(t.save_config(true), first_b, "round {round}: with batches");
        let dg = named(&t.ok(&["bdev_lvol_get_lvols", "-l", "lvs"]), "dg");
        assert_eq!(dg["is_degraded"], json!(true));
        assert_eq!(
            t.ok(&["bdev_get_histogram", "lvs/v0"])["granularity"],
            json!(7)
        );
        assert_eq!(t.stop(), 0);
    }

    // With batches: the malloc and null bdevs are each one batch (an array), as SPDK's
    // modules write them; flattened, the same entries in the same order.
    let b = bdev_config(&first_b);
    let arrays: Vec<&Value> = b.iter().filter(|e| e.is_array()).collect();
    assert_eq!(arrays.len(), 2, "{b:?}");
    assert!(arrays[0]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["method"] == "bdev_malloc_create"));
    assert_eq!(arrays[0].as_array().unwrap().len(), 2);
    assert!(arrays[1]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["method"] == "bdev_null_create"));
    let flat: Vec<Value> = b
        .iter()
        .flat_map(|e| match e {
            Value::Array(a) => a.clone(),
            e => vec![e.clone()],
        })
        .collect();
    assert_eq!(flat, bdev_config(&first));
}
