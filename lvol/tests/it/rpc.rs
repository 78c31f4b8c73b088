//! The RPC module: result shapes against what SPDK printed for the fixtures, and SPDK's error
//! codes and messages.

use bdev_core::rpc::RpcModule;
use bdev_core::IoType;
use futures::executor::block_on;
use lvol::rpc::LvolRpc;
use serde_json::{json, Value};
use test_support::prelude::*;

/// A registry with the lvol module, its RPC module and malloc bdevs `(name, bytes)` of
/// 512-byte blocks.
async fn rpc_setup(bdevs: &[(&str, u64)]) -> (bdev_core::Registry, lvol::LvolModule, LvolRpc) {
    let (reg, m) = setup();
    let r = LvolRpc::new(m.clone());
    for &(name, size) in bdevs {
        malloc(&reg, name, size, 512).await;
    }
    (reg, m, r)
}

fn fixture_json(dir: &str, file: &str) -> Value {
    let p = test_support::spdk_fixture(dir).join("rpc").join(file);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Every key of `want` is in `got` with the same value (recursively for objects).
fn assert_subset(got: &Value, want: &Value, ctx: &str) {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            for (k, wv) in w {
                let gv = g.get(k).unwrap_or_else(|| panic!("{ctx}: missing key {k}"));
                assert_subset(gv, wv, &format!("{ctx}.{k}"));
            }
        }
        (Value::Array(g), Value::Array(w)) => {
            assert_eq!(g.len(), w.len(), "{ctx}: length");
            for (i, (gv, wv)) in g.iter().zip(w).enumerate() {
                assert_subset(gv, wv, &format!("{ctx}[{i}]"));
            }
        }
        _ => assert_eq!(got, want, "{ctx}"),
    }
}

#[test]
fn result_shapes_match_spdk_for_the_fixtures() {
    block_on(async {
        for (dir, base, esnap) in [
            ("basic", "aio_basic", false),
            ("esnap", "aio_esnap", true),
            ("dirty", "aio_dirty", false),
        ] {
            let (reg, m) = setup();
            let r = LvolRpc::new(m.clone());
            let _e = if esnap {
                let (d, p) = test_support::fixture_copy("esnap/esnap.img.gz");
                let u = uuid::Uuid::parse_str("7e5a0000-e5a0-4e5a-8e5a-000000000001").unwrap();
                aio(&reg, "esnap", &p, 4096, Some(u), true).await;
                Some(d)
            } else {
                None
            };
            let (_d, img) = test_support::fixture_copy(&format!("{dir}/store.img.gz"));
            aio(&reg, base, &img, 4096, None, false).await;

            let got = rpc!(r, "bdev_lvol_get_lvstores", {});
            let want = fixture_json(dir, "bdev_lvol_get_lvstores.json");
            assert_eq!(got.as_array().unwrap().len(), 1);
            assert_subset(&got, &want, "get_lvstores");
            let keys: Vec<&String> = got[0].as_object().unwrap().keys().collect();
            assert_eq!(
                keys,
                [
                    "uuid",
                    "name",
                    "base_bdev",
                    "total_data_clusters",
                    "free_clusters",
                    "block_size",
                    "cluster_size",
                    "max_growable_size"
                ]
            );
            let by_name = rpc!(r, "bdev_lvol_get_lvstores", {"lvs_name": want[0]["name"]});
            assert_eq!(by_name, got);

            let got = rpc!(r, "bdev_lvol_get_lvols", {});
            let want = fixture_json(dir, "bdev_lvol_get_lvols.json");
            assert_subset(&got, &want, "get_lvols");
            assert_eq!(
                got.as_array().unwrap().len(),
                want.as_array().unwrap().len()
            );
            for e in got.as_array().unwrap() {
                assert!(e.get("num_allocated_clusters").is_some());
            }

            let bdevs = fixture_json(dir, "bdev_get_bdevs.json");
            for b in bdevs.as_array().unwrap() {
                if b["product_name"] != "Logical Volume" {
                    continue;
                }
                let name = b["name"].as_str().unwrap();
                let dev = reg.get(name).unwrap_or_else(|| panic!("{name}"));
                assert_eq!(dev.name(), name);
                assert_eq!(json!(reg.aliases(name)), b["aliases"]);
                assert_eq!(dev.uuid().hyphenated().to_string(), b["uuid"]);
                assert_eq!(json!(dev.block_len()), b["block_size"]);
                assert_eq!(json!(dev.num_blocks()), b["num_blocks"]);
                assert_eq!(dev.product_name(), "Logical Volume");
                // Our writable lvols support flush (SPDK's do not: issue 13), the rest is
                // SPDK's.
                assert_eq!(
                    json!(dev.io_type_supported(IoType::Flush)),
                    b["supported_io_types"]["write"],
                    "{name}"
                );
                for t in IoType::ALL.into_iter().filter(|&t| t != IoType::Flush) {
                    assert_eq!(
                        json!(dev.io_type_supported(t)),
                        b["supported_io_types"][t.spdk_name()],
                        "{name} {t:?}"
                    );
                }
                assert_eq!(dev.driver_specific(), b["driver_specific"], "{name}");
            }
        }
    });
}

#[test]
fn error_codes_follow_spdk() {
    block_on(async {
        let (reg, m, r) = rpc_setup(&[("M", 128 * MIB), ("M2", 64 * MIB)]).await;
        // Decode failures.
        assert_rpc_err!((-32603, "spdk_json_decode_object failed"), r, "bdev_lvol_create_lvstore", {"bdev_name": "M"});
        assert_eq!(
            rpc_err!(r, "bdev_lvol_create_lvstore", {"bdev_name": "M", "lvs_name": "a", "bogus": 1}).code,
            -32603
        );
        assert_rpc_err!((-19, "No such device"), r, "bdev_lvol_create_lvstore", {"bdev_name": "nonexistent", "lvs_name": "a"});
        let u = rpc!(r, "bdev_lvol_create_lvstore", {"bdev_name": "M", "lvs_name": "lvs_test"});
        let u = u.as_str().unwrap().to_string();
        assert_rpc_err!((-17, "File exists"), r, "bdev_lvol_create_lvstore", {"bdev_name": "M2", "lvs_name": "lvs_test"});
        assert_rpc_err!((-1, "Operation not permitted"), r, "bdev_lvol_create_lvstore", {"bdev_name": "M", "lvs_name": "x"});
        assert_eq!(
            rpc_err!(r, "bdev_lvol_create_lvstore", {"bdev_name": "M2", "lvs_name": "x", "clear_method": "bad"}).code,
            -22
        );
        let got = rpc!(r, "bdev_lvol_get_lvstores", {"uuid": u});
        assert_eq!(got[0]["total_data_clusters"], 31);
        assert_eq!(got[0]["cluster_size"], 4194304);
        assert_eq!(
            rpc_err!(r, "bdev_lvol_get_lvstores", {"uuid": u, "lvs_name": "lvs_test"}).code,
            -22
        );
        assert_eq!(
            rpc_err!(r, "bdev_lvol_delete_lvstore", {"uuid": "00000000-0000-0000-0000-000000000000"}).code,
            -19
        );
        assert_rpc_err!((-2, "Lvol store nope not found"), r, "bdev_lvol_rename_lvstore", {"old_name": "nope", "new_name": "x"});

        // lvols.
        let id = rpc!(r, "bdev_lvol_create", {"lvol_name": "lvol_test", "size_in_mib": 28, "thin_provision": false, "uuid": u});
        let id = id.as_str().unwrap().to_string();
        assert!(reg.get(&id).is_some());
        assert_rpc_err!((-17, "File exists"), r, "bdev_lvol_create", {"lvol_name": "lvol_test", "size_in_mib": 4, "lvs_name": "lvs_test"});
        assert_eq!(
            rpc_err!(r, "bdev_lvol_create", {"lvol_name": "", "size_in_mib": 4, "lvs_name": "lvs_test"}).code,
            -22
        );
        assert_rpc_err!((-32602, "No space left on device"), r, "bdev_lvol_create", {"lvol_name": "big", "size_in_mib": 200, "lvs_name": "lvs_test"});
        assert_eq!(
            rpc_err!(r, "bdev_lvol_create", {"lvol_name": "x", "size_in_mib": 4}).code,
            -22
        );
        assert_rpc_err!((-19, "No such device"), r, "bdev_lvol_resize", {"name": "NOTEXIST", "size_in_mib": 4});
        assert_eq!(
            rpc!(r, "bdev_lvol_resize", {"name": "lvs_test/lvol_test", "size_in_mib": 56}),
            true
        );
        assert_eq!(reg.get(&id).unwrap().num_blocks(), 56 * 2048);
        let sn = rpc!(r, "bdev_lvol_snapshot", {"lvol_name": id, "snapshot_name": "snap"});
        assert_rpc_err!((-32602, "File exists"), r, "bdev_lvol_snapshot", {"lvol_name": id, "snapshot_name": "snap"});
        assert_rpc_err!((-32602, "Invalid argument"), r, "bdev_lvol_snapshot", {"lvol_name": sn, "snapshot_name": "s2"});
        assert_rpc_err!((-32602, "Invalid argument"), r, "bdev_lvol_clone", {"snapshot_name": id, "clone_name": "c0"});
        rpc!(r, "bdev_lvol_clone", {"snapshot_name": "lvs_test/snap", "clone_name": "c1"});
        assert_rpc_err!((-32603, "Operation not permitted"), r, "bdev_lvol_delete", {"name": "lvs_test/snap"});
        assert_rpc_err!((-32602, "File exists"), r, "bdev_lvol_rename", {"old_name": "lvs_test/c1", "new_name": "lvol_test"});
        assert_eq!(
            rpc!(r, "bdev_lvol_rename", {"old_name": "lvs_test/c1", "new_name": "c1b"}),
            true
        );
        assert_rpc_err!((-32602, "Invalid argument"), r, "bdev_lvol_decouple_parent", {"name": "lvs_test/snap"});
        assert_eq!(
            rpc!(r, "bdev_lvol_set_read_only", {"name": "lvs_test/c1b"}),
            true
        );
        assert_rpc_err!((-32602, "Operation not permitted"), r, "bdev_lvol_resize", {"name": "lvs_test/c1b", "size_in_mib": 4});
        assert_eq!(
            rpc_err!(r, "bdev_lvol_set_parent", {"lvol_name": "lvs_test/c1b", "parent_name": "M"})
                .code,
            -19
        );

        // clone_bdev messages.
        assert_rpc_err!((-32602, "lvs does not exist"), r, "bdev_lvol_clone_bdev", {"bdev": "M2", "lvs_name": "nope", "clone_name": "e"});
        assert_rpc_err!((-32602, "bdev does not exist"), r, "bdev_lvol_clone_bdev", {"bdev": "nope", "lvs_name": "lvs_test", "clone_name": "e"});
        let e = rpc_err!(r, "bdev_lvol_clone_bdev", {"bdev": id, "lvs_name": "lvs_test", "clone_name": "e"});
        assert_eq!(
            (e.code, e.message.as_str()),
            (
                -32602,
                "bdev is an lvol in same lvs as clone; use bdev_lvol_clone instead"
            )
        );
        malloc(&reg, "odd", 3 * MIB, 512).await;
        assert_rpc_err!((-32602, "Invalid argument"), r, "bdev_lvol_clone_bdev", {"bdev": "odd", "lvs_name": "lvs_test", "clone_name": "e"});
        let ec = rpc!(r, "bdev_lvol_clone_bdev", {"bdev": "M2", "lvs_name": "lvs_test", "clone_name": "e"});
        let lv = rpc!(r, "bdev_lvol_get_lvols", {"lvs_name": "lvs_test"});
        let e_entry = lv
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["uuid"] == ec)
            .unwrap()
            .clone();
        assert_eq!(e_entry["is_esnap_clone"], true);
        assert_eq!(e_entry["alias"], "lvs_test/e");
        assert_eq!(e_entry["lvs"]["name"], "lvs_test");

        // Shallow copy.
        assert_eq!(
            rpc_err!(r, "bdev_lvol_check_shallow_copy", {"operation_id": 77}).code,
            -19
        );
        assert_rpc_err!((-32602, "No such device"), r, "bdev_lvol_start_shallow_copy", {"src_lvol_name": "lvs_test/snap", "dst_bdev_name": "nope"});
        assert_eq!(
            rpc_err!(r, "bdev_lvol_start_shallow_copy", {"src_lvol_name": "nope", "dst_bdev_name": "odd"}).code,
            -19
        );

        // Our retry knob.
        assert_eq!(
            rpc!(r, "bdev_lvol_set_esnap_retry", {"retries": 7, "delay_ms": 25}),
            true
        );
        assert_eq!(
            rpc!(r, "bdev_lvol_get_esnap_retry", {}),
            json!({"retries": 7, "delay_ms": 25})
        );
        assert_eq!(m.esnap_retry().0, 7);

        // Delete everything through RPC.
        assert_eq!(rpc!(r, "bdev_lvol_delete", {"name": "lvs_test/c1b"}), true);
        assert_eq!(rpc!(r, "bdev_lvol_delete", {"name": "lvs_test/snap"}), true);
        assert_eq!(
            rpc_err!(r, "bdev_lvol_delete", {"name": "lvs_test/snap"}).code,
            -19
        );
        assert_eq!(
            rpc!(r, "bdev_lvol_delete_lvstore", {"lvs_name": "lvs_test"}),
            true
        );
        assert_eq!(rpc!(r, "bdev_lvol_get_lvstores", {}), json!([]));
        assert!(reg.get(&id).is_none());
        assert_eq!(
            rpc_err!(r, "bdev_lvol_delete_lvstore", {"lvs_name": "lvs_test"}).code,
            -19
        );
        let methods = r.methods();
        assert!(methods.contains(&"bdev_lvol_start_shallow_copy"));
        assert_eq!(rpc_err!(r, "bdev_lvol_nope").code, -32601);
    });
}

#[test]
fn shallow_copy_over_rpc_reports_progress_then_forgets() {
    block_on(async {
        let (reg, _m, r) = rpc_setup(&[("M", 64 * MIB), ("D", 4 * MIB)]).await;
        rpc!(r, "bdev_lvol_create_lvstore", {"bdev_name": "M", "lvs_name": "lvs", "cluster_sz": 1048576});
        rpc!(r, "bdev_lvol_create", {"lvol_name": "v", "size_in_mib": 4, "thin_provision": true, "lvs_name": "lvs"});
        let d = open_fill(&reg, "lvs/v", 0, 4096, 0x61).await;
        drop(d);
        rpc!(r, "bdev_lvol_set_read_only", {"name": "lvs/v"});
        let op = rpc!(r, "bdev_lvol_start_shallow_copy", {"src_lvol_name": "lvs/v", "dst_bdev_name": "D"});
        let id = op["operation_id"].as_u64().unwrap();
        assert!(id >= 1);
        let st = loop {
            let st = rpc!(r, "bdev_lvol_check_shallow_copy", {"operation_id": id});
            if st["state"] != "in progress" {
                break st;
            }
            futures_timer::Delay::new(std::time::Duration::from_millis(5)).await;
        };
        assert_eq!(
            st,
            json!({"copied_clusters": 1, "total_clusters": 1, "state": "complete"})
        );
        assert_eq!(
            rpc_err!(r, "bdev_lvol_check_shallow_copy", {"operation_id": id}).code,
            -19
        );
        let dd = open(&reg, "D", false);
        assert_eq!(read_at(&dd, 0, 4096).await.unwrap(), fill(0x61, 4096));
    });
}

/// The `name` members of a listing, in order.
fn names(listing: &Value) -> Vec<&str> {
    let items = listing.as_array().expect("a listing is an array");
    items.iter().map(|s| s["name"].as_str().unwrap()).collect()
}

#[test]
fn listings_follow_creation_order() {
    block_on(async {
        let (_reg, _m, r) = rpc_setup(&[("M1", 32 * MIB), ("M2", 32 * MIB)]).await;
        rpc!(r, "bdev_lvol_create_lvstore", {"bdev_name": "M1", "lvs_name": "zz", "cluster_sz": 1048576});
        rpc!(r, "bdev_lvol_create_lvstore", {"bdev_name": "M2", "lvs_name": "aa", "cluster_sz": 1048576});
        for n in ["a", "b", "c"] {
            rpc!(r, "bdev_lvol_create", {"lvol_name": n, "size_in_mib": 1, "lvs_name": "zz"});
        }
        rpc!(r, "bdev_lvol_delete", {"name": "zz/a"});
        rpc!(r, "bdev_lvol_create", {"lvol_name": "d", "size_in_mib": 1, "lvs_name": "zz"});
        let stores = rpc!(r, "bdev_lvol_get_lvstores", {});
        assert_eq!(names(&stores), ["zz", "aa"]);
        let lvols = rpc!(r, "bdev_lvol_get_lvols", {"lvs_name": "zz"});
        assert_eq!(names(&lvols), ["b", "c", "d"]);
    });
}
