//! The RPC module: result shapes against what SPDK printed for the fixtures, and SPDK's error
//! codes and messages.

use bdev_core::rpc::RpcModule;
use bdev_core::IoType;
use futures::executor::block_on;
use lvol::rpc::LvolRpc;
use serde_json::{json, Value};
use test_support::prelude::*;

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

async fn call(r: &LvolRpc, method: &str, params: Value) -> Result<Value, bdev_core::rpc::RpcError> {
    r.call(method, Some(params)).await
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

            let got = call(&r, "bdev_lvol_get_lvstores", json!({})).await.unwrap();
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
            let by_name = call(
                &r,
                "bdev_lvol_get_lvstores",
                json!({"lvs_name": want[0]["name"]}),
            )
            .await
            .unwrap();
            assert_eq!(by_name, got);

            let got = call(&r, "bdev_lvol_get_lvols", json!({})).await.unwrap();
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
        let (reg, m) = setup();
        let r = LvolRpc::new(m.clone());
        malloc(&reg, "M", 128 * MIB, 512).await;
        malloc(&reg, "M2", 64 * MIB, 512).await;
        // Decode failures.
        let e = call(&r, "bdev_lvol_create_lvstore", json!({"bdev_name": "M"}))
            .await
            .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (-32603, "spdk_json_decode_object failed")
        );
        let e = call(
            &r,
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "M", "lvs_name": "a", "bogus": 1}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, -32603);
        let e = call(
            &r,
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "nonexistent", "lvs_name": "a"}),
        )
        .await
        .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-19, "No such device"));
        let u = call(
            &r,
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "M", "lvs_name": "lvs_test"}),
        )
        .await
        .unwrap();
        let u = u.as_str().unwrap().to_string();
        let e = call(
            &r,
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "M2", "lvs_name": "lvs_test"}),
        )
        .await
        .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-17, "File exists"));
        let e = call(
            &r,
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "M", "lvs_name": "x"}),
        )
        .await
        .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (-1, "Operation not permitted")
        );
        let e = call(
            &r,
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "M2", "lvs_name": "x", "clear_method": "bad"}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, -22);
        let got = call(&r, "bdev_lvol_get_lvstores", json!({"uuid": u}))
            .await
            .unwrap();
        assert_eq!(got[0]["total_data_clusters"], 31);
        assert_eq!(got[0]["cluster_size"], 4194304);
        let e = call(
            &r,
            "bdev_lvol_get_lvstores",
            json!({"uuid": u, "lvs_name": "lvs_test"}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, -22);
        let e = call(
            &r,
            "bdev_lvol_delete_lvstore",
            json!({"uuid": "00000000-0000-0000-0000-000000000000"}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, -19);
        let e = call(
            &r,
            "bdev_lvol_rename_lvstore",
            json!({"old_name": "nope", "new_name": "x"}),
        )
        .await
        .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (-2, "Lvol store nope not found")
        );

        // lvols.
        let id = call(&r, "bdev_lvol_create", json!({"lvol_name": "lvol_test", "size_in_mib": 28, "thin_provision": false, "uuid": u})).await.unwrap();
        let id = id.as_str().unwrap().to_string();
        assert!(reg.get(&id).is_some());
        let e = call(
            &r,
            "bdev_lvol_create",
            json!({"lvol_name": "lvol_test", "size_in_mib": 4, "lvs_name": "lvs_test"}),
        )
        .await
        .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-17, "File exists"));
        let e = call(
            &r,
            "bdev_lvol_create",
            json!({"lvol_name": "", "size_in_mib": 4, "lvs_name": "lvs_test"}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, -22);
        let e = call(
            &r,
            "bdev_lvol_create",
            json!({"lvol_name": "big", "size_in_mib": 200, "lvs_name": "lvs_test"}),
        )
        .await
        .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (-32602, "No space left on device")
        );
        let e = call(
            &r,
            "bdev_lvol_create",
            json!({"lvol_name": "x", "size_in_mib": 4}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, -22);
        let e = call(
            &r,
            "bdev_lvol_resize",
            json!({"name": "NOTEXIST", "size_in_mib": 4}),
        )
        .await
        .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-19, "No such device"));
        assert_eq!(
            call(
                &r,
                "bdev_lvol_resize",
                json!({"name": "lvs_test/lvol_test", "size_in_mib": 56})
            )
            .await
            .unwrap(),
            json!(true)
        );
        assert_eq!(reg.get(&id).unwrap().num_blocks(), 56 * 2048);
        let sn = call(
            &r,
            "bdev_lvol_snapshot",
            json!({"lvol_name": id, "snapshot_name": "snap"}),
        )
        .await
        .unwrap();
        let e = call(
            &r,
            "bdev_lvol_snapshot",
            json!({"lvol_name": id, "snapshot_name": "snap"}),
        )
        .await
        .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32602, "File exists"));
        let e = call(
            &r,
            "bdev_lvol_snapshot",
            json!({"lvol_name": sn, "snapshot_name": "s2"}),
        )
        .await
        .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32602, "Invalid argument"));
        let e = call(
            &r,
            "bdev_lvol_clone",
            json!({"snapshot_name": id, "clone_name": "c0"}),
        )
        .await
        .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32602, "Invalid argument"));
        call(
            &r,
            "bdev_lvol_clone",
            json!({"snapshot_name": "lvs_test/snap", "clone_name": "c1"}),
        )
        .await
        .unwrap();
        let e = call(&r, "bdev_lvol_delete", json!({"name": "lvs_test/snap"}))
            .await
            .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (-32603, "Operation not permitted")
        );
        let e = call(
            &r,
            "bdev_lvol_rename",
            json!({"old_name": "lvs_test/c1", "new_name": "lvol_test"}),
        )
        .await
        .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32602, "File exists"));
        assert_eq!(
            call(
                &r,
                "bdev_lvol_rename",
                json!({"old_name": "lvs_test/c1", "new_name": "c1b"})
            )
            .await
            .unwrap(),
            json!(true)
        );
        let e = call(
            &r,
            "bdev_lvol_decouple_parent",
            json!({"name": "lvs_test/snap"}),
        )
        .await
        .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32602, "Invalid argument"));
        assert_eq!(
            call(
                &r,
                "bdev_lvol_set_read_only",
                json!({"name": "lvs_test/c1b"})
            )
            .await
            .unwrap(),
            json!(true)
        );
        let e = call(
            &r,
            "bdev_lvol_resize",
            json!({"name": "lvs_test/c1b", "size_in_mib": 4}),
        )
        .await
        .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (-32602, "Operation not permitted")
        );
        let e = call(
            &r,
            "bdev_lvol_set_parent",
            json!({"lvol_name": "lvs_test/c1b", "parent_name": "M"}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, -19);

        // clone_bdev messages.
        let e = call(
            &r,
            "bdev_lvol_clone_bdev",
            json!({"bdev": "M2", "lvs_name": "nope", "clone_name": "e"}),
        )
        .await
        .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32602, "lvs does not exist"));
        let e = call(
            &r,
            "bdev_lvol_clone_bdev",
            json!({"bdev": "nope", "lvs_name": "lvs_test", "clone_name": "e"}),
        )
        .await
        .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (-32602, "bdev does not exist")
        );
        let e = call(
            &r,
            "bdev_lvol_clone_bdev",
            json!({"bdev": id, "lvs_name": "lvs_test", "clone_name": "e"}),
        )
        .await
        .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (
                -32602,
                "bdev is an lvol in same lvs as clone; use bdev_lvol_clone instead"
            )
        );
        malloc(&reg, "odd", 3 * MIB, 512).await;
        let e = call(
            &r,
            "bdev_lvol_clone_bdev",
            json!({"bdev": "odd", "lvs_name": "lvs_test", "clone_name": "e"}),
        )
        .await
        .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32602, "Invalid argument"));
        let ec = call(
            &r,
            "bdev_lvol_clone_bdev",
            json!({"bdev": "M2", "lvs_name": "lvs_test", "clone_name": "e"}),
        )
        .await
        .unwrap();
        let lv = call(&r, "bdev_lvol_get_lvols", json!({"lvs_name": "lvs_test"}))
            .await
            .unwrap();
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
        let e = call(
            &r,
            "bdev_lvol_check_shallow_copy",
            json!({"operation_id": 77}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, -19);
        let e = call(
            &r,
            "bdev_lvol_start_shallow_copy",
            json!({"src_lvol_name": "lvs_test/snap", "dst_bdev_name": "nope"}),
        )
        .await
        .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32602, "No such device"));
        let e = call(
            &r,
            "bdev_lvol_start_shallow_copy",
            json!({"src_lvol_name": "nope", "dst_bdev_name": "odd"}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, -19);

        // Our retry knob.
        assert_eq!(
            call(
                &r,
                "bdev_lvol_set_esnap_retry",
                json!({"retries": 7, "delay_ms": 25})
            )
            .await
            .unwrap(),
            json!(true)
        );
        assert_eq!(
            call(&r, "bdev_lvol_get_esnap_retry", json!({}))
                .await
                .unwrap(),
            json!({"retries": 7, "delay_ms": 25})
        );
        assert_eq!(m.esnap_retry().0, 7);

        // Delete everything through RPC.
        assert_eq!(
            call(&r, "bdev_lvol_delete", json!({"name": "lvs_test/c1b"}))
                .await
                .unwrap(),
            json!(true)
        );
        assert_eq!(
            call(&r, "bdev_lvol_delete", json!({"name": "lvs_test/snap"}))
                .await
                .unwrap(),
            json!(true)
        );
        let e = call(&r, "bdev_lvol_delete", json!({"name": "lvs_test/snap"}))
            .await
            .unwrap_err();
        assert_eq!(e.code, -19);
        assert_eq!(
            call(
                &r,
                "bdev_lvol_delete_lvstore",
                json!({"lvs_name": "lvs_test"})
            )
            .await
            .unwrap(),
            json!(true)
        );
        assert_eq!(
            call(&r, "bdev_lvol_get_lvstores", json!({})).await.unwrap(),
            json!([])
        );
        assert!(reg.get(&id).is_none());
        let e = call(
            &r,
            "bdev_lvol_delete_lvstore",
            json!({"lvs_name": "lvs_test"}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, -19);
        let methods = r.methods();
        assert!(methods.contains(&"bdev_lvol_start_shallow_copy"));
        assert_eq!(
            r.call("bdev_lvol_nope", None).await.unwrap_err().code,
            -32601
        );
    });
}

#[test]
fn shallow_copy_over_rpc_reports_progress_then_forgets() {
    block_on(async {
        let (reg, m) = setup();
        let r = LvolRpc::new(m.clone());
        malloc(&reg, "M", 64 * MIB, 512).await;
        malloc(&reg, "D", 4 * MIB, 512).await;
        call(
            &r,
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "M", "lvs_name": "lvs", "cluster_sz": 1048576}),
        )
        .await
        .unwrap();
        call(
            &r,
            "bdev_lvol_create",
            json!({"lvol_name": "v", "size_in_mib": 4, "thin_provision": true, "lvs_name": "lvs"}),
        )
        .await
        .unwrap();
        let d = open(&reg, "lvs/v", true);
        write_at(&d, 0, &fill(0x61, 4096)).await.unwrap();
        drop(d);
        call(&r, "bdev_lvol_set_read_only", json!({"name": "lvs/v"}))
            .await
            .unwrap();
        let op = call(
            &r,
            "bdev_lvol_start_shallow_copy",
            json!({"src_lvol_name": "lvs/v", "dst_bdev_name": "D"}),
        )
        .await
        .unwrap();
        let id = op["operation_id"].as_u64().unwrap();
        assert!(id >= 1);
        let st = loop {
            let st = call(
                &r,
                "bdev_lvol_check_shallow_copy",
                json!({"operation_id": id}),
            )
            .await
            .unwrap();
            if st["state"] != "in progress" {
                break st;
            }
            futures_timer::Delay::new(std::time::Duration::from_millis(5)).await;
        };
        assert_eq!(
            st,
            json!({"copied_clusters": 1, "total_clusters": 1, "state": "complete"})
        );
        let e = call(
            &r,
            "bdev_lvol_check_shallow_copy",
            json!({"operation_id": id}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, -19);
        let dd = open(&reg, "D", false);
        assert_eq!(read_at(&dd, 0, 4096).await.unwrap(), fill(0x61, 4096));
    });
}

#[test]
fn listings_follow_creation_order() {
    block_on(async {
        let (reg, m) = setup();
        let r = LvolRpc::new(m.clone());
        malloc(&reg, "M1", 32 * MIB, 512).await;
        malloc(&reg, "M2", 32 * MIB, 512).await;
        call(
            &r,
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "M1", "lvs_name": "zz", "cluster_sz": 1048576}),
        )
        .await
        .unwrap();
        call(
            &r,
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "M2", "lvs_name": "aa", "cluster_sz": 1048576}),
        )
        .await
        .unwrap();
        for n in ["a", "b", "c"] {
            call(
                &r,
                "bdev_lvol_create",
                json!({"lvol_name": n, "size_in_mib": 1, "lvs_name": "zz"}),
            )
            .await
            .unwrap();
        }
        call(&r, "bdev_lvol_delete", json!({"name": "zz/a"}))
            .await
            .unwrap();
        call(
            &r,
            "bdev_lvol_create",
            json!({"lvol_name": "d", "size_in_mib": 1, "lvs_name": "zz"}),
        )
        .await
        .unwrap();
        let stores = call(&r, "bdev_lvol_get_lvstores", json!({})).await.unwrap();
        let names: Vec<&str> = stores
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["zz", "aa"]);
        let lvols = call(&r, "bdev_lvol_get_lvols", json!({"lvs_name": "zz"}))
            .await
            .unwrap();
        let names: Vec<&str> = lvols
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["b", "c", "d"]);
    });
}
