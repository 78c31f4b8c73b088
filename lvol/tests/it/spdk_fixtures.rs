//! SPDK-made lvol store images (basic, dirty, esnap) tasted with names, UUIDs, sizes,
//! relations and content as in their manifests; the esnap one also without its base.

use std::path::PathBuf;

use bdev_core::Registry;
use futures::executor::block_on;
use lvol::LvolModule;
use serde_json::Value;
use test_support::prelude::*;
use uuid::Uuid;

const ESNAP_UUID: &str = "7e5a0000-e5a0-4e5a-8e5a-000000000001";

fn sha256(data: &[u8]) -> String {
    test_support::sha256_hex(data)
}

/// Checks every lvol of the manifest against the loaded module.
async fn check_manifest(reg: &Registry, m: &LvolModule, man: &Value, content: bool) {
    let lvs = &man["lvstores"][0];
    let s = m
        .lvstore_by_name(lvs["name"].as_str().unwrap())
        .expect("store tasted");
    assert_eq!(s.uuid().hyphenated().to_string(), lvs["uuid"]);
    assert_eq!(
        u64::from(s.cluster_size()),
        lvs["cluster_size"].as_u64().unwrap()
    );
    assert_eq!(
        u64::from(s.block_size()),
        lvs["block_size"].as_u64().unwrap()
    );
    assert_eq!(
        s.total_data_clusters(),
        lvs["total_data_clusters"].as_u64().unwrap()
    );
    assert_eq!(s.free_clusters(), lvs["free_clusters"].as_u64().unwrap());
    assert_eq!(format!("{:#x}", s.super_blob_id()), lvs["super_blob_id"]);
    let want = man["lvols"].as_array().unwrap();
    assert_eq!(s.lvols().len(), want.len());
    for w in want {
        let name = w["name"].as_str().unwrap();
        let l = m
            .find_lvol(w["alias"].as_str().unwrap())
            .unwrap_or_else(|| panic!("{name}"));
        assert_eq!(l.name(), name);
        assert_eq!(l.uuid().hyphenated().to_string(), w["uuid"], "{name}");
        assert_eq!(format!("{:#x}", l.blob_id()), w["blob_id"], "{name}");
        assert_eq!(l.size_bytes(), w["size_bytes"].as_u64().unwrap(), "{name}");
        assert_eq!(l.is_thin(), w["thin"].as_bool().unwrap(), "{name}");
        assert_eq!(
            l.is_snapshot(),
            w["is_snapshot"].as_bool().unwrap(),
            "{name}"
        );
        assert_eq!(l.is_clone(), w["is_clone"].as_bool().unwrap(), "{name}");
        assert_eq!(
            l.is_esnap_clone(),
            w["is_esnap_clone"].as_bool().unwrap(),
            "{name}"
        );
        assert_eq!(
            l.num_allocated_clusters(),
            w["num_allocated_clusters"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            l.parent_lvol().map(|p| p.name()),
            w["base_snapshot"].as_str().map(str::to_string),
            "{name}"
        );
        let mut clones: Vec<String> = l.clones().iter().map(|c| c.name()).collect();
        let mut wc: Vec<String> = w["clones"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        clones.sort();
        wc.sort();
        assert_eq!(clones, wc, "{name}");
        assert_eq!(
            l.external_snapshot_name(),
            w["external_snapshot_name"].as_str().map(str::to_string),
            "{name}"
        );
        let dev = reg.get(l.unique_id()).expect("bdev");
        assert_eq!(dev.num_blocks(), w["num_blocks"].as_u64().unwrap());
        assert_eq!(
            u64::from(dev.block_len()),
            w["block_size"].as_u64().unwrap()
        );
        assert_eq!(
            reg.aliases(l.unique_id()),
            vec![w["alias"].as_str().unwrap().to_string()]
        );
        if content {
            assert_eq!(
                l.is_degraded(),
                w["is_degraded"].as_bool().unwrap(),
                "{name}"
            );
            let d = open(reg, l.unique_id(), false);
            let data = read_all(&d).await;
            assert_eq!(data.len() as u64, w["sha256_len"].as_u64().unwrap());
            assert_eq!(sha256(&data), w["sha256"], "{name} content");
        }
    }
}

fn copy(rel: &str) -> (tempfile::TempDir, PathBuf) {
    test_support::fixture_copy(rel)
}

/// A registry with the lvol module and a copy of fixture `dir/store.img` registered as aio
/// bdev `aio_<dir>` (and tasted); the copy (keep its dir alive) and the manifest.
async fn tasted(dir: &str) -> (Registry, LvolModule, (tempfile::TempDir, PathBuf), Value) {
    let (reg, m) = setup();
    let img = copy(&format!("{dir}/store.img.gz"));
    aio(&reg, &format!("aio_{dir}"), &img.1, 4096, None, false).await;
    (reg, m, img, test_support::manifest(dir))
}

/// The esnap fixture: its base (`esnap`, registered first when `with_base`) and its store,
/// tasted; returns the base's file copy too, to register it later.
async fn esnap_fixture(
    with_base: bool,
) -> (Registry, LvolModule, [tempfile::TempDir; 2], PathBuf, Value) {
    let (reg, m) = setup();
    let (d1, esnap) = copy("esnap/esnap.img.gz");
    if with_base {
        let u = Uuid::parse_str(ESNAP_UUID).unwrap();
        aio(&reg, "esnap", &esnap, 4096, Some(u), true).await;
    }
    let (d2, img) = copy("esnap/store.img.gz");
    aio(&reg, "aio_esnap", &img, 4096, None, false).await;
    let man = test_support::manifest("esnap");
    check_manifest(&reg, &m, &man, with_base).await;
    (reg, m, [d1, d2], esnap, man)
}

#[test]
fn basic_fixture_is_tasted_as_in_its_manifest() {
    block_on(async {
        let (reg, m, (_dir, img), man) = tasted("basic").await;
        check_manifest(&reg, &m, &man, true).await;
        // Writes work and survive an unload and re-taste.
        let d = open_fill(&reg, "lvs_basic/clone1", 0, 4096, 0x3c).await;
        drop(d);
        let s = m.lvstore_by_name("lvs_basic").unwrap();
        m.unload_lvstore(&s).await.unwrap();
        reg.unregister("aio_basic").await.unwrap();
        aio(&reg, "aio_basic", &img, 4096, None, false).await;
        let d = open(&reg, "lvs_basic/clone1", false);
        assert_eq!(read_at(&d, 0, 4096).await.unwrap(), fill(0x3c, 4096));
        let thick = m.find_lvol("lvs_basic/thick").unwrap();
        let dt = open(&reg, thick.unique_id(), false);
        assert_eq!(
            sha256(&read_all(&dt).await),
            man["lvols"][0]["sha256"].as_str().unwrap()
        );
    });
}

#[test]
fn dirty_fixture_is_recovered_and_tasted() {
    block_on(async {
        let (reg, m, _img, man) = tasted("dirty").await;
        check_manifest(&reg, &m, &man, true).await;
    });
}

#[test]
fn esnap_fixture_with_its_base() {
    block_on(async {
        let (reg, m, _dirs, _esnap, _man) = esnap_fixture(true).await;
        assert_eq!(
            reg.claim_of("esnap"),
            Some(bdev_core::ClaimType::ReadManyWriteNone)
        );
        let s = m.lvstore_by_name("lvs_esnap").unwrap();
        assert!(s.missing_esnaps().is_empty());
    });
}

#[test]
fn esnap_fixture_degraded_without_base_then_heals() {
    block_on(async {
        let (reg, m, _dirs, esnap, man) = esnap_fixture(false).await;
        let s = m.lvstore_by_name("lvs_esnap").unwrap();
        let u = Uuid::parse_str(ESNAP_UUID).unwrap();
        assert_eq!(s.missing_esnaps(), vec![lvol::esnap_id_for(&u)]);
        for l in s.lvols() {
            assert!(l.is_degraded(), "{}", l.name());
            assert!(l.is_registered());
        }
        // eclone1 owns cluster 0 (EC1A 0 then EC1B 1) -> readable; eclone2 owns nothing.
        let d1 = open(&reg, "lvs_esnap/eclone1", false);
        let blk0 = read_at(&d1, 0, 4096).await.unwrap();
        assert_eq!(blk0, test_support::pattern_block("EC1A", 0));
        let blk1 = read_at(&d1, 4096, 4096).await.unwrap();
        assert_eq!(blk1, test_support::pattern_block("EC1B", 1));
        // Cluster 11 of eclone1: blocks 3000..3003 were written (EC1B).
        let b = read_at(&d1, 3000 * 4096, 4096).await.unwrap();
        assert_eq!(b, test_support::pattern_block("EC1B", 3000));
        // Cluster 8 belongs to esnap_snap (EC1A 2048..2303, a whole cluster).
        let b = read_at(&d1, 2048 * 4096, 4096).await.unwrap();
        assert_eq!(b, test_support::pattern_block("EC1A", 2048));
        // Needs the base: EIO.
        assert_errno!(read_at(&d1, 5 * MIB, 4096).await, libc::EIO);
        let d2 = open(&reg, "lvs_esnap/eclone2", false);
        assert_errno!(read_at(&d2, 0, 4096).await, libc::EIO);
        // get_lvols says so.
        let rpc = lvol::rpc::LvolRpc::new(m.clone());
        let v = bdev_core::rpc::RpcModule::call(&rpc, "bdev_lvol_get_lvols", None)
            .await
            .unwrap();
        for e in v.as_array().unwrap() {
            assert_eq!(e["is_degraded"], true);
        }
        // The base arrives: everything heals in place, through the same descriptors.
        aio(&reg, "esnap", &esnap, 4096, Some(u), true).await;
        assert!(s.missing_esnaps().is_empty());
        for l in s.lvols() {
            assert!(!l.is_degraded(), "{}", l.name());
        }
        assert_eq!(
            read_at(&d2, 0, 4096).await.unwrap(),
            test_support::pattern_block("ESNAP", 0)
        );
        drop((d1, d2));
        check_manifest(&reg, &m, &man, true).await;
    });
}
