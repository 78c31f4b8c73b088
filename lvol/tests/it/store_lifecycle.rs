//! lvol store lifecycle: create, naming rules, listing, rename, unload and tasting, destroy,
//! grow, hot-remove and re-add of the base bdev.

use bdev_core::ClaimType;
use futures::executor::block_on;
use lvol::{LvsOpts, NAME_MAX};
use test_support::prelude::*;

#[test]
fn create_lvstore_lists_like_spdk_and_writes_super_xattrs() {
    block_on(async {
        let (reg, m) = setup();
        malloc(&reg, "M", 128 * MIB, 512).await;
        let s = m
            .create_lvstore("M", LvsOpts::new("lvs_test"))
            .await
            .expect("create");
        assert_eq!(s.name(), "lvs_test");
        assert_eq!(s.cluster_size(), 4 << 20);
        assert_eq!(s.block_size(), 512);
        assert_eq!(s.total_data_clusters(), 31);
        assert_eq!(s.free_clusters(), 31);
        assert_eq!(reg.claim_of("M"), Some(ClaimType::ReadManyWriteOne));
        let info = s.info_json();
        assert_eq!(info["name"], "lvs_test");
        assert_eq!(info["base_bdev"], "M");
        assert_eq!(info["uuid"], s.uuid().hyphenated().to_string());
        assert_eq!(s.blobstore().bstype(), lvol::LVS_BSTYPE);

        // The super blob's xattrs, byte for byte.
        let sb = s.blobstore().open_blob(s.super_blob_id()).await.unwrap();
        assert_eq!(
            sb.xattr_names(),
            vec!["uuid".to_string(), "name".to_string()]
        );
        assert!(!sb.is_thin());
        assert_eq!(sb.num_clusters(), 0);
        assert_eq!(sb.get_xattr("name").unwrap(), b"lvs_test\0".to_vec());
        let u = sb.get_xattr("uuid").unwrap();
        assert_eq!(u.len(), 37);
        assert_eq!(&u[..36], s.uuid().hyphenated().to_string().as_bytes());
        assert_eq!(u[36], 0);
        sb.close().await.unwrap();
    });
}

#[test]
fn lvstore_name_and_cluster_rules() {
    block_on(async {
        let (reg, m) = setup();
        malloc(&reg, "M", 64 * MIB, 512).await;
        malloc(&reg, "M2", 64 * MIB, 4096).await;
        assert_errno!(m.create_lvstore("M", LvsOpts::new("")).await, libc::EINVAL);
        let long = "x".repeat(NAME_MAX + 1);
        assert_errno!(
            m.create_lvstore("M", LvsOpts::new(&long)).await,
            libc::EINVAL
        );
        // Cluster smaller than the block or not a multiple of it.
        let mut o = LvsOpts::new("a");
        o.cluster_size = 2048;
        assert_errno!(m.create_lvstore("M2", o).await, libc::EINVAL);
        let mut o = LvsOpts::new("a");
        o.cluster_size = 4096 * 3 + 512;
        assert_errno!(m.create_lvstore("M2", o).await, libc::EINVAL);
        // Missing bdev.
        assert_errno!(
            m.create_lvstore("nonexistent", LvsOpts::new("a")).await,
            libc::ENODEV
        );
        // A failed create leaves no claim behind.
        assert_eq!(reg.claim_of("M2"), None);

        let _s = m
            .create_lvstore("M", LvsOpts::new(&"y".repeat(NAME_MAX)))
            .await
            .unwrap();
        // Same name again, even on another bdev.
        assert_errno!(
            m.create_lvstore("M2", LvsOpts::new(&"y".repeat(NAME_MAX)))
                .await,
            libc::EEXIST
        );
        // Second store on the same (claimed) bdev.
        assert_errno!(
            m.create_lvstore("M", LvsOpts::new("other")).await,
            libc::EPERM
        );
        assert_eq!(m.lvstores().len(), 1);
    });
}

#[test]
fn destroy_frees_name_and_base_and_is_not_tasted_again() {
    block_on(async {
        let (_dir, reg, m, s, f) = aio_store_tmp(64 * MIB, "lvs", 1 << 20).await;
        let l = thick_lvol(&m, &s, "v", 4 * MIB).await;
        let uid = l.unique_id().to_string();
        assert!(reg.get(&uid).is_some());
        m.destroy_lvstore(&s).await.unwrap();
        assert!(reg.get(&uid).is_none());
        assert!(m.lvstore_by_name("lvs").is_none());
        assert_eq!(reg.claim_of("aio0"), None);
        // The name is free again.
        malloc(&reg, "M", 32 * MIB, 512).await;
        let s2 = lvs(&m, "M", "lvs", 1 << 20).await;
        m.destroy_lvstore(&s2).await.unwrap();
        // Re-adding the destroyed base finds nothing.
        reg.unregister("aio0").await.unwrap();
        aio(&reg, "aio0", &f, 512, None, false).await;
        assert!(m.lvstores().is_empty());
        assert_eq!(reg.claim_of("aio0"), None);
    });
}

#[test]
fn unload_and_tasting_bring_back_everything() {
    block_on(async {
        let (_dir, reg, m, s, f) = aio_store_tmp(64 * MIB, "lvs_t", 1 << 20).await;
        let uuid = s.uuid();
        let a = thick_lvol(&m, &s, "a", 3 * MIB).await;
        let b = thin_lvol(&m, &s, "b", 5 * MIB).await;
        let (au, bu) = (a.unique_id().to_string(), b.unique_id().to_string());
        {
            let d = open(&reg, &au, true);
            write_at(&d, 0, &pattern(1, 0, 65536)).await.unwrap();
            let d = open(&reg, "lvs_t/b", true);
            write_at(&d, 2 * MIB, &pattern(2, 0, 4096)).await.unwrap();
        }
        let free = s.free_clusters();
        let before = s.info_json();
        m.unload_lvstore(&s).await.unwrap();
        assert!(reg.get(&au).is_none());
        assert!(m.lvstores().is_empty());
        assert_eq!(reg.claim_of("aio0"), None);
        assert_eq!(super_clean_flag(&f), 1);

        // Tasting: re-register the base.
        reg.unregister("aio0").await.unwrap();
        aio(&reg, "aio0", &f, 512, None, false).await;
        let s = m.lvstore_by_name("lvs_t").expect("store tasted");
        assert_eq!(s.uuid(), uuid);
        assert_eq!(s.free_clusters(), free);
        assert_eq!(s.info_json(), before);
        assert_eq!(reg.claim_of("aio0"), Some(ClaimType::ReadManyWriteOne));
        let a = m.find_lvol("lvs_t/a").expect("a");
        assert_eq!(a.unique_id(), au);
        assert_eq!(a.size_bytes(), 3 * MIB);
        assert!(!a.is_thin());
        let b = m.find_lvol(&bu).expect("b by uuid");
        assert!(b.is_thin());
        assert_eq!(b.num_allocated_clusters(), 1);
        let d = open(&reg, &au, false);
        assert_eq!(read_at(&d, 0, 65536).await.unwrap(), pattern(1, 0, 65536));
        let d = open(&reg, "lvs_t/b", false);
        assert_eq!(
            read_at(&d, 2 * MIB, 4096).await.unwrap(),
            pattern(2, 0, 4096)
        );
        assert_eq!(read_at(&d, 0, 4096).await.unwrap(), fill(0, 4096));
        assert_eq!(reg.aliases(&bu), vec!["lvs_t/b".to_string()]);
    });
}

#[test]
fn rename_lvstore_swaps_aliases_and_persists() {
    block_on(async {
        let (_dir, reg, m, s, f) = aio_store_tmp(64 * MIB, "lvs_test", 1 << 20).await;
        malloc(&reg, "M2", 32 * MIB, 512).await;
        let _other = lvs(&m, "M2", "lvs_other", 1 << 20).await;
        let l = thick_lvol(&m, &s, "lvol_test0", 2 * MIB).await;
        let uid = l.unique_id().to_string();
        // Taken name.
        assert_errno!(m.rename_lvstore(&s, "lvs_other").await, libc::EEXIST);
        assert_eq!(s.name(), "lvs_test");
        // Same name is fine.
        m.rename_lvstore(&s, "lvs_test").await.unwrap();
        m.rename_lvstore(&s, "lvs_new").await.unwrap();
        assert_eq!(s.name(), "lvs_new");
        assert!(m.lvstore_by_name("lvs_test").is_none());
        assert_eq!(reg.aliases(&uid), vec!["lvs_new/lvol_test0".to_string()]);
        assert!(reg.get("lvs_test/lvol_test0").is_none());
        assert!(reg.get("lvs_new/lvol_test0").is_some());
        // Rename the lvol too, then reload.
        m.rename_lvol(&l, "lbd_new0").await.unwrap();
        assert_eq!(reg.aliases(&uid), vec!["lvs_new/lbd_new0".to_string()]);
        let name_x = l.blob().get_xattr("name").unwrap();
        assert_eq!(name_x, b"lbd_new0\0".to_vec());
        let su = s.uuid();
        m.unload_lvstore(&s).await.unwrap();
        reg.unregister("aio0").await.unwrap();
        aio(&reg, "aio0", &f, 512, None, false).await;
        let s = m.lvstore_by_name("lvs_new").expect("renamed store");
        assert_eq!(s.uuid(), su);
        assert!(s.lvol_by_name("lbd_new0").is_some());
        assert_eq!(reg.aliases(&uid), vec!["lvs_new/lbd_new0".to_string()]);
    });
}

#[test]
fn store_name_clash_at_tasting_is_skipped() {
    block_on(async {
        let (_dir, reg, m, s, f) = aio_store_tmp(32 * MIB, "same", 1 << 20).await;
        m.unload_lvstore(&s).await.unwrap();
        reg.unregister("aio0").await.unwrap();
        malloc(&reg, "M", 32 * MIB, 512).await;
        let other = lvs(&m, "M", "same", 1 << 20).await;
        aio(&reg, "aio0", &f, 512, None, false).await;
        assert_eq!(m.lvstores().len(), 1);
        assert_eq!(reg.claim_of("aio0"), None);
        // Once the other is destroyed, an explicit load works.
        m.destroy_lvstore(&other).await.unwrap();
        let s = m.load_lvstore("aio0").await.unwrap();
        assert_eq!(s.name(), "same");
    });
}

#[test]
fn hot_remove_of_base_unloads_cleanly_and_readd_restores() {
    block_on(async {
        let (_dir, reg, m, s, f) = aio_store_tmp(64 * MIB, "lvs_h", 1 << 20).await;
        let v = thin_lvol(&m, &s, "v", 4 * MIB).await;
        let snap = m.create_snapshot(&v, "snap").await.unwrap();
        let c = m.create_clone(&snap, "c").await.unwrap();
        let ids: Vec<String> = [&v, &snap, &c]
            .iter()
            .map(|l| l.unique_id().to_string())
            .collect();
        {
            let d = open(&reg, "lvs_h/c", true);
            write_at(&d, MIB, &pattern(7, 0, 8192)).await.unwrap();
        }
        drop((v, snap, c, s));
        // Hot-remove: the lvol bdevs and the store vanish; the super block is clean.
        reg.unregister("aio0").await.unwrap();
        for id in &ids {
            assert!(reg.get(id).is_none());
        }
        assert!(m.lvstores().is_empty());
        assert!(m.lvols().is_empty());
        assert_eq!(super_clean_flag(&f), 1);
        // Re-add.
        aio(&reg, "aio0", &f, 512, None, false).await;
        for id in &ids {
            assert!(reg.get(id).is_some(), "{id} back");
        }
        let d = open(&reg, "lvs_h/c", false);
        assert_eq!(read_at(&d, MIB, 8192).await.unwrap(), pattern(7, 0, 8192));
        let c = m.find_lvol("lvs_h/c").unwrap();
        assert_eq!(c.parent_lvol().unwrap().name(), "snap");
    });
}

#[test]
fn grow_lvstore_after_base_grows() {
    block_on(async {
        let (_dir, reg, m, s, f) = aio_store_tmp(32 * MIB, "lvs_g", 1 << 20).await;
        let before = s.total_data_clusters();
        assert!(s.blobstore().max_growable_size() >= 32 * MIB);
        m.unload_lvstore(&s).await.unwrap();
        reg.unregister("aio0").await.unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();
        aio(&reg, "aio0", &f, 512, None, false).await;
        let s = m.lvstore_by_name("lvs_g").unwrap();
        assert_eq!(s.total_data_clusters(), before);
        m.grow_lvstore(&s).await.unwrap();
        assert_eq!(s.total_data_clusters(), before + 32);
        assert_eq!(s.free_clusters(), before + 32);
    });
}

#[test]
fn hot_remove_waits_for_lvol_users_who_get_a_remove_event() {
    block_on(async {
        let (_dir, reg, m, s, f) = aio_store_tmp(32 * MIB, "lvs_u", 1 << 20).await;
        let uid = thick_lvol(&m, &s, "v", 2 * MIB)
            .await
            .unique_id()
            .to_string();
        drop(s);
        let mut d = open(&reg, "lvs_u/v", true);
        let mut events = d.take_events().unwrap();
        write_at(&d, 0, &fill(0x21, 4096)).await.unwrap();
        let user = async {
            use futures::StreamExt;
            let ev = events.next().await;
            assert_eq!(ev, Some(bdev_core::BdevEvent::Remove));
            // Acknowledged writes made before closing are kept.
            write_at(&d, 4096, &fill(0x22, 4096)).await.unwrap();
            drop(d);
        };
        let (removed, ()) = futures::join!(reg.unregister("aio0"), user);
        removed.unwrap();
        assert!(reg.get(&uid).is_none());
        aio(&reg, "aio0", &f, 512, None, false).await;
        let d = open(&reg, "lvs_u/v", false);
        assert_eq!(read_at(&d, 0, 4096).await.unwrap(), fill(0x21, 4096));
        assert_eq!(read_at(&d, 4096, 4096).await.unwrap(), fill(0x22, 4096));
    });
}

#[test]
fn corrupt_or_foreign_bdevs_are_skipped_quietly() {
    block_on(async {
        let (reg, m) = setup();
        let dir = tempfile::tempdir().unwrap();
        // A zeroed file and a file with garbage: no store, no claim.
        let z = sparse_file(dir.path(), "z.img", 8 * MIB);
        aio(&reg, "zero", &z, 512, None, false).await;
        let g = dir.path().join("g.img");
        std::fs::write(&g, pattern(9, 0, (8 * MIB) as usize)).unwrap();
        aio(&reg, "garbage", &g, 512, None, false).await;
        assert!(m.lvstores().is_empty());
        assert_eq!(reg.claim_of("zero"), None);
        assert_eq!(reg.claim_of("garbage"), None);
        // Nothing was written by the failed tastings.
        assert_eq!(
            std::fs::read(&g).unwrap(),
            pattern(9, 0, (8 * MIB) as usize)
        );
        assert!(m.load_lvstore("zero").await.is_err());
    });
}

#[test]
fn flags_and_relations_survive_reload() {
    block_on(async {
        use blobstore::ClearMethod;
        let (_dir, reg, m, s, f) = aio_store_tmp(64 * MIB, "lvs_p", 1 << 20).await;
        let a = m
            .create_lvol(&s, "a", 2 * MIB, true, ClearMethod::WriteZeroes)
            .await
            .unwrap();
        let b = m
            .create_lvol(&s, "b", 2 * MIB, false, ClearMethod::None)
            .await
            .unwrap();
        m.set_read_only(&b).await.unwrap();
        let snap = m.create_snapshot(&a, "snap").await.unwrap();
        let c = m.create_clone(&snap, "c").await.unwrap();
        m.resize_lvol(&c, 5 * MIB).await.unwrap();
        drop((a, b, snap, c, s));
        reg.unregister("aio0").await.unwrap();
        aio(&reg, "aio0", &f, 512, None, false).await;
        let s = m.lvstore_by_name("lvs_p").unwrap();
        let a = s.lvol_by_name("a").unwrap();
        let b = s.lvol_by_name("b").unwrap();
        let snap = s.lvol_by_name("snap").unwrap();
        let c = s.lvol_by_name("c").unwrap();
        assert_eq!(a.blob().clear_method(), ClearMethod::WriteZeroes);
        assert_eq!(b.blob().clear_method(), ClearMethod::None);
        assert!(b.is_read_only() && !b.is_thin());
        assert!(!reg
            .get(b.unique_id())
            .unwrap()
            .io_type_supported(bdev_core::IoType::Write));
        assert!(snap.is_read_only());
        assert_eq!(a.parent_lvol().unwrap().name(), "snap");
        assert_eq!(c.parent_lvol().unwrap().name(), "snap");
        assert_eq!(c.size_bytes(), 5 * MIB);
        let mut clones: Vec<String> = snap.clones().iter().map(|l| l.name()).collect();
        clones.sort();
        assert_eq!(clones, vec!["a", "c"]);
    });
}
