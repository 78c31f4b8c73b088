//! Our own target as the NBD server: a `tgt` process exports a read-only bdev over a pattern
//! file, and the NBD client bdev reads it. When a second `tgt` serves
//! `bdev_nbd_client_create` and the lvol methods, the golden image goes from the first
//! target to an esnap clone in the second, which is exported again and read back here;
//! killing and restarting the first target degrades and heals the clone.
//!
//! The `tgt` binary is built by the harness (`test_support::tgt`) when the test starts.

use std::path::Path;
use std::time::Instant;

use crate::common::*;
use bdev_core::BlockDevice;
use bdev_nbd::NbdClientOpts;
use serde_json::json;
use test_support::tgt::Tgt;

/// Sets up the golden target: a read-only bdev over the pattern file, exported read-only.
fn serve_golden(t: &Tgt, file: &Path, nbd_sock: &Path) {
    t.ok(
        "bdev_aio_create",
        json!({"name": "golden_file", "filename": file, "readonly": true}),
    );
    t.ok(
        "bdev_ro_create",
        json!({"base_bdev_name": "golden_file", "name": "golden_ro"}),
    );
    t.ok(
        "nbd_server_start",
        json!({"listen": format!("unix:{}", nbd_sock.display())}),
    );
    t.ok(
        "nbd_export_add",
        json!({"bdev_name": "golden_ro", "name": "golden", "writable": false}),
    );
}

fn bdev_names(t: &Tgt) -> Vec<String> {
    t.ok("bdev_get_bdevs", json!({}))
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn degraded(t: &Tgt, lvol: &str) -> bool {
    let lvols = t.ok("bdev_lvol_get_lvols", json!({}));
    lvols
        .as_array()
        .and_then(|a| a.iter().find(|l| l["alias"] == lvol))
        .map(|l| l["is_degraded"] == true)
        .unwrap_or_else(|| panic!("no lvol {lvol} in {lvols}"))
}

#[test]
fn tgt_exports_a_golden_image_to_clients_and_to_a_second_tgt() {
    let name = "tgt_exports_a_golden_image";
    let dir = tempfile::tempdir().unwrap();
    let file = pattern_file(dir.path(), "golden.raw", 4 * MIB);
    let golden_sock = dir.path().join("golden.nbd.sock");
    let mut a = Tgt::start(dir.path(), "a");
    serve_golden(&a, &file, &golden_sock);

    // 1. This process reads the golden image from the first target.
    let (reg, clients) = nbd_clients();
    block_within(20, async {
        let addr = format!("unix:{}", golden_sock.display());
        let mut o = NbdClientOpts::new("g", &addr, "golden");
        o.num_connections = 2;
        let dev = clients.create(o).await.unwrap();
        assert!(dev.is_read_only());
        assert_eq!(dev.num_blocks() * u64::from(dev.block_len()), 4 * MIB);
        // Our target allows several connections per export.
        assert_eq!(dev.connections(), 2);
        let desc = reg.open("g", false).unwrap();
        check_pattern(&desc, 0, dev.num_blocks()).await.unwrap();
        drop(desc);
        clients.delete("g").await.unwrap();
    });

    // 2. A second target attaches it and clones it.
    let b = Tgt::start(dir.path(), "b");
    let uuid = "5e1f0000-aaaa-4bbb-8ccc-0000000000e5";
    let created = b.call(
        "bdev_nbd_client_create",
        json!({"name": "golden", "address": format!("unix:{}", golden_sock.display()),
            "export": "golden", "uuid": uuid, "reconnect_attempts": 2,
            "reconnect_delay_ms": 100}),
    );
    assert_eq!(created, Ok(json!("golden")));
    let bdevs = b.ok("bdev_get_bdevs", json!({"name": "golden"}));
    assert_eq!(bdevs[0]["product_name"], "NBD client");
    assert_eq!(bdevs[0]["uuid"], uuid);
    assert_eq!(bdevs[0]["driver_specific"]["nbd_client"]["connected"], true);
    assert_eq!(bdevs[0]["driver_specific"]["nbd_client"]["read_only"], true);
    // save_config re-creates it with the same UUID.
    let cfg = b.ok("framework_get_config", json!({"name": "bdev"}));
    let entry = cfg
        .as_array()
        .and_then(|a| a.iter().find(|e| e["method"] == "bdev_nbd_client_create"))
        .unwrap_or_else(|| panic!("no bdev_nbd_client_create in {cfg}"));
    assert_eq!(entry["params"]["uuid"], uuid);
    assert_eq!(entry["params"]["export"], "golden");
    let store = b.call(
        "bdev_malloc_create",
        json!({"name": "store", "num_blocks": 65536, "block_size": 512}),
    );
    assert!(store.is_ok(), "{store:?}");
    b.ok(
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "store", "lvs_name": "lvs", "cluster_sz": 1048576}),
    );
    b.ok(
        "bdev_lvol_clone_bdev",
        json!({"bdev": uuid, "lvs_name": "lvs", "clone_name": "vm1"}),
    );
    let clone_sock = dir.path().join("b.nbd.sock");
    b.ok(
        "nbd_server_start",
        json!({"listen": format!("unix:{}", clone_sock.display())}),
    );
    b.ok(
        "nbd_export_add",
        json!({"bdev_name": "lvs/vm1", "name": "vm1"}),
    );
    let (reg, clients) = nbd_clients();
    let clone_addr = format!("unix:{}", clone_sock.display());
    block_within(20, async {
        clients
            .create(NbdClientOpts::new("vm1", &clone_addr, "vm1"))
            .await
            .unwrap();
        let desc = reg.open("vm1", false).unwrap();
        check_pattern(&desc, 0, 8192).await.unwrap();
    });
    assert!(!degraded(&b, "lvs/vm1"));

    // 3. The golden target dies: the second target drops its NBD bdev, the clone degrades.
    a.kill();
    let t0 = Instant::now();
    wait_until(15, "golden bdev hot-removed in tgt b", || {
        !bdev_names(&b).contains(&"golden".to_string())
    });
    eprintln!("{name}: hot-removed after {:?}", t0.elapsed());
    assert!(degraded(&b, "lvs/vm1"));

    // 4. It comes back with the same export: the clone heals by itself.
    a.spawn();
    serve_golden(&a, &file, &golden_sock);
    wait_until(15, "clone healed in tgt b", || !degraded(&b, "lvs/vm1"));
    block_within(20, async {
        let desc = reg.open("vm1", false).unwrap();
        check_pattern(&desc, 0, 8192).await.unwrap();
        drop(desc);
        clients.delete("vm1").await.unwrap();
    });
}
