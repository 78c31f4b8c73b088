//! lvol operations with data checks: create, naming, lookups, snapshot, clone, rename, resize,
//! read-only, inflate, decouple, set_parent, delete, ENOSPC, shallow copy.

use std::sync::Arc;

use bdev_core::IoType;
use blobstore::ClearMethod;
use futures::executor::block_on;
use test_support::prelude::*;

/// Lvol `name` of `size` bytes (thin or thick) in store `s`, open for writing, with its first
/// 4 KiB written with `byte`.
async fn lvol_with_block(
    reg: &bdev_core::Registry,
    m: &lvol::LvolModule,
    s: &std::sync::Arc<lvol::LvolStore>,
    name: &str,
    size: u64,
    thin: bool,
    byte: u8,
) -> (std::sync::Arc<lvol::Lvol>, bdev_core::Descriptor) {
    let l = if thin {
        thin_lvol(m, s, name, size).await
    } else {
        thick_lvol(m, s, name, size).await
    };
    let d = open_fill(reg, &format!("{}/{name}", s.name()), 0, 4096, byte).await;
    (l, d)
}

#[test]
fn create_thick_and_thin_with_data_and_bdev_shape() {
    block_on(async {
        let (reg, m, s) = malloc_store(128 * MIB, "lvs_test", 4 << 20).await;
        // 5 MiB rounds up to two 4 MiB clusters.
        let l = thick_lvol(&m, &s, "lvol_test", 5 * MIB).await;
        assert_eq!(l.size_bytes(), 8 * MIB);
        assert_eq!(s.free_clusters(), 29);
        let dev = reg.get(l.unique_id()).expect("bdev");
        assert_eq!(dev.name(), l.uuid().hyphenated().to_string());
        assert_eq!(dev.uuid(), l.uuid());
        assert_eq!(dev.product_name(), "Logical Volume");
        assert_eq!(dev.module_name(), "lvol");
        assert_eq!(dev.block_len(), 512);
        assert_eq!(dev.num_blocks(), 8 * MIB / 512);
        assert_eq!(dev.optimal_io_boundary(), (4 * MIB / 512) as u32);
        assert!(dev.write_config().is_none());
        assert_eq!(
            reg.aliases(l.unique_id()),
            vec!["lvs_test/lvol_test".to_string()]
        );
        for t in [
            IoType::Read,
            IoType::Write,
            IoType::Unmap,
            IoType::WriteZeroes,
            IoType::Reset,
            IoType::SeekHole,
            IoType::SeekData,
            IoType::Flush,
        ] {
            assert!(dev.io_type_supported(t), "{t:?}");
        }
        let ds = dev.driver_specific();
        let lv = &ds["lvol"];
        assert_eq!(lv["lvol_store_uuid"], s.uuid().hyphenated().to_string());
        assert_eq!(lv["base_bdev"], "M");
        assert_eq!(lv["thin_provision"], false);
        assert_eq!(lv["num_allocated_clusters"], 2);
        assert_eq!(lv["snapshot"], false);
        assert_eq!(lv["clone"], false);
        assert_eq!(lv["esnap_clone"], false);
        assert!(lv.get("base_snapshot").is_none());
        assert!(lv.get("clones").is_none());
        assert!(lv.get("external_snapshot_name").is_none());
        // xattrs as SPDK writes them at create.
        let name_x = l.blob().get_xattr("name").unwrap();
        assert_eq!(name_x.len(), 64);
        assert_eq!(&name_x[..10], b"lvol_test\0");
        assert_eq!(
            l.blob().xattr_names(),
            vec!["name".to_string(), "uuid".to_string()]
        );
        let uuid_x = l.blob().get_xattr("uuid").unwrap();
        assert_eq!(uuid_x, lvol::esnap_id_for(&l.uuid()));

        let d = open(&reg, "lvs_test/lvol_test", true);
        write_at(&d, 0, &pattern(3, 0, 1 << 20)).await.unwrap();
        write_at(&d, 8 * MIB - 4096, &fill(0xcc, 4096))
            .await
            .unwrap();
        assert_eq!(
            read_at(&d, 0, 1 << 20).await.unwrap(),
            pattern(3, 0, 1 << 20)
        );
        assert_eq!(
            read_at(&d, 8 * MIB - 4096, 4096).await.unwrap(),
            fill(0xcc, 4096)
        );
        // Out of range.
        assert!(write_at(&d, 8 * MIB, &fill(1, 512)).await.is_err());

        let t = thin_lvol(&m, &s, "thin", 124 * MIB).await;
        assert_eq!(t.num_allocated_clusters(), 0);
        assert_eq!(s.free_clusters(), 29);
        let d = open(&reg, "lvs_test/thin", true);
        assert_eq!(read_at(&d, 64 * MIB, 4096).await.unwrap(), fill(0, 4096));
        write_at(&d, 64 * MIB, &fill(0xab, 4096)).await.unwrap();
        assert_eq!(t.num_allocated_clusters(), 1);
        assert_eq!(s.free_clusters(), 28);
        assert_eq!(read_at(&d, 64 * MIB, 4096).await.unwrap(), fill(0xab, 4096));
        assert_eq!(
            read_at(&d, 64 * MIB + 4096, 4096).await.unwrap(),
            fill(0, 4096)
        );
    });
}

#[test]
fn lvol_naming_rules_and_lookups() {
    block_on(async {
        let specs = [("lvs", 64 * MIB, 1 << 20), ("lvs2", 64 * MIB, 1 << 20)];
        let (reg, m, [s, s2]) = malloc_stores(specs).await;
        let l1 = thin_lvol(&m, &s, "lvol", MIB).await;
        let _l2 = thin_lvol(&m, &s, "lvol2", MIB).await;
        let l3 = thin_lvol(&m, &s2, "lvol", MIB).await;
        assert_errno!(
            m.create_lvol(&s, "lvol", MIB, true, ClearMethod::Default)
                .await,
            libc::EEXIST
        );
        assert_errno!(
            m.create_lvol(&s, "", MIB, true, ClearMethod::Default).await,
            libc::EINVAL
        );
        assert_errno!(
            m.create_lvol(&s, &"n".repeat(64), MIB, true, ClearMethod::Default)
                .await,
            libc::EINVAL
        );
        assert!(m
            .create_lvol(&s, &"n".repeat(63), MIB, true, ClearMethod::Default)
            .await
            .is_ok());

        assert!(Arc::ptr_eq(&m.find_lvol("lvs/lvol").unwrap(), &l1));
        assert!(m.find_lvol("lvs/lvoll").is_none());
        assert!(m.find_lvol("lvs/lvo").is_none());
        assert!(m.find_lvol("lvss/lvol").is_none());
        assert!(m.find_lvol("lv/lvol").is_none());
        assert!(Arc::ptr_eq(&m.find_lvol("lvs2/lvol").unwrap(), &l3));
        let copy = l1.uuid().hyphenated().to_string().clone();
        assert!(Arc::ptr_eq(&m.find_lvol(&copy).unwrap(), &l1));
        assert!(reg.get("lvs/lvo").is_none());

        // Two concurrent creates with the same name: exactly one wins.
        let (a, b) = futures::join!(
            m.create_lvol(&s, "race", MIB, true, ClearMethod::Default),
            m.create_lvol(&s, "race", MIB, true, ClearMethod::Default)
        );
        assert!(a.is_ok() != b.is_ok());
        let err = a.err().or(b.err()).unwrap();
        assert_eq!(err.errno(), libc::EEXIST);
    });
}

#[test]
fn snapshot_and_clone_relations_and_data() {
    block_on(async {
        let (reg, m, s) = malloc_store(128 * MIB, "lvs_test", 4 << 20).await;
        let l = thick_lvol(&m, &s, "lvol", 8 * MIB).await;
        let d = open_fill(&reg, "lvs_test/lvol", 0, 8 * MIB, 0xcc).await;
        let snap = m.create_snapshot(&l, "snap").await.unwrap();
        assert!(snap.is_read_only());
        assert!(l.is_clone());
        assert_eq!(l.parent_lvol().unwrap().name(), "snap");
        // Snapshot of a snapshot, bad names.
        assert_errno!(m.create_snapshot(&snap, "s2").await, libc::EINVAL);
        assert_errno!(m.create_snapshot(&l, "").await, libc::EINVAL);
        assert_errno!(m.create_snapshot(&l, "snap").await, libc::EEXIST);
        // Clone of a writable lvol.
        assert_errno!(m.create_clone(&l, "bad").await, libc::EINVAL);
        let c1 = m.create_clone(&snap, "c1").await.unwrap();
        let c2 = m.create_clone(&snap, "c2").await.unwrap();
        let dc1 = open_fill(&reg, "lvs_test/c1", 0, 4 * MIB, 0xaa).await;
        let ds = reg.get(snap.unique_id()).unwrap().driver_specific();
        assert_eq!(ds["lvol"]["snapshot"], true);
        let mut clones: Vec<String> = ds["lvol"]["clones"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        clones.sort();
        assert_eq!(clones, vec!["c1", "c2", "lvol"]);
        let dc = reg.get(c1.unique_id()).unwrap().driver_specific();
        assert_eq!(dc["lvol"]["clone"], true);
        assert_eq!(dc["lvol"]["base_snapshot"], "snap");
        let dsn = open(&reg, "lvs_test/snap", false);
        let dc2 = open(&reg, "lvs_test/c2", false);
        assert_eq!(read_all(&dc2).await, read_all(&dsn).await);
        let c1data = read_all(&dc1).await;
        assert!(c1data[..(4 * MIB) as usize].iter().all(|&b| b == 0xaa));
        assert!(c1data[(4 * MIB) as usize..].iter().all(|&b| b == 0xcc));
        // Snapshot is read-only: no writes.
        let snapdev = reg.get(snap.unique_id()).unwrap();
        assert!(!snapdev.io_type_supported(IoType::Write));
        assert!(
            reg.open(snap.unique_id(), true).is_err() || {
                let w = reg.open(snap.unique_id(), true).unwrap();
                write_at(&w, 0, &fill(1, 512)).await.is_err()
            }
        );
        // A snapshot with three clones cannot be deleted.
        drop((d, dc1, dc2, dsn));
        assert_errno!(m.delete_lvol(&snap).await, libc::EPERM);
        m.delete_lvol(&c1).await.unwrap();
        assert!(reg.get(c1.unique_id()).is_none());
        let mut clones: Vec<String> = snap.clones().iter().map(|c| c.name()).collect();
        clones.sort();
        assert_eq!(clones, vec!["c2", "lvol"]);
        assert_errno!(m.delete_lvol(&snap).await, libc::EPERM);
        m.delete_lvol(&c2).await.unwrap();
        // One clone left: deleting the snapshot merges it into the clone.
        m.delete_lvol(&snap).await.unwrap();
        assert!(!l.is_clone());
        assert_filled(&reg, "lvs_test/lvol", 0xcc).await;
    });
}

#[test]
fn rename_lvol_rules() {
    block_on(async {
        let (reg, m, s) = malloc_store(64 * MIB, "lvs", 1 << 20).await;
        let a = thin_lvol(&m, &s, "a", MIB).await;
        let _b = thin_lvol(&m, &s, "b", MIB).await;
        assert_errno!(m.rename_lvol(&a, "b").await, libc::EEXIST);
        assert_errno!(m.rename_lvol(&a, "").await, libc::EINVAL);
        assert_errno!(m.rename_lvol(&a, &"z".repeat(64)).await, libc::EINVAL);
        assert_eq!(reg.aliases(a.unique_id()), vec!["lvs/a".to_string()]);
        m.rename_lvol(&a, "a").await.unwrap();
        m.rename_lvol(&a, "new").await.unwrap();
        assert_eq!(a.name(), "new");
        assert_eq!(reg.aliases(a.unique_id()), vec!["lvs/new".to_string()]);
        assert!(s.lvol_by_name("a").is_none());
        assert!(m.find_lvol("lvs/new").is_some());
        // The old name is free again.
        thin_lvol(&m, &s, "a", MIB).await;
    });
}

#[test]
fn resize_follows_and_bounds_io() {
    block_on(async {
        let (reg, m, s) = malloc_store(128 * MIB, "lvs", 4 << 20).await;
        let l = thick_lvol(&m, &s, "v", 28 * MIB).await;
        let dev = reg.get(l.unique_id()).unwrap();
        m.resize_lvol(&l, 56 * MIB).await.unwrap();
        assert_eq!(dev.num_blocks(), 56 * 2048);
        let d = open_fill(&reg, "lvs/v", 50 * MIB, 4096, 9).await;
        assert_eq!(read_at(&d, 50 * MIB, 4096).await.unwrap(), fill(9, 4096));
        // Larger than the store.
        assert_errno!(m.resize_lvol(&l, 200 * MIB).await, libc::ENOSPC);
        assert_eq!(dev.num_blocks(), 56 * 2048);
        m.resize_lvol(&l, 4 * MIB).await.unwrap();
        assert_eq!(dev.num_blocks(), 4 * 2048);
        assert!(write_at(&d, 4 * MIB, &fill(1, 512)).await.is_err());
        m.resize_lvol(&l, 0).await.unwrap();
        assert_eq!(dev.num_blocks(), 0);
        assert_eq!(s.free_clusters(), 31);
    });
}

#[test]
fn read_only_lvol_io_types_and_refused_writes() {
    block_on(async {
        let (reg, m, s) = malloc_store(64 * MIB, "lvs", 1 << 20).await;
        let (l, d) = lvol_with_block(&reg, &m, &s, "v", 2 * MIB, false, 5).await;
        m.set_read_only(&l).await.unwrap();
        let dev = reg.get(l.unique_id()).unwrap();
        for t in [
            IoType::Write,
            IoType::Unmap,
            IoType::WriteZeroes,
            IoType::Flush,
        ] {
            assert!(!dev.io_type_supported(t), "{t:?}");
        }
        for t in [
            IoType::Read,
            IoType::Reset,
            IoType::SeekData,
            IoType::SeekHole,
        ] {
            assert!(dev.io_type_supported(t), "{t:?}");
        }
        assert!(write_at(&d, 0, &fill(6, 4096)).await.is_err());
        assert_eq!(read_at(&d, 0, 4096).await.unwrap(), fill(5, 4096));
        assert_errno!(m.resize_lvol(&l, 4 * MIB).await, libc::EPERM);
    });
}

#[test]
fn thin_store_runs_out_with_enospc_and_stays_usable() {
    block_on(async {
        let (reg, m, s) = malloc_store(128 * MIB, "lvs_test", 4 << 20).await;
        let a = thin_lvol(&m, &s, "a", 124 * MIB).await;
        let _b = thin_lvol(&m, &s, "b", 124 * MIB).await;
        assert_eq!(s.free_clusters(), 31);
        let da = open(&reg, "lvs_test/a", true);
        let half = (62 * MIB) as usize;
        let mut off = 0u64;
        while off < half as u64 {
            write_at(&da, off, &fill(0xcc, (4 * MIB) as usize))
                .await
                .unwrap();
            off += 4 * MIB;
        }
        let db = open(&reg, "lvs_test/b", true);
        let mut off = 0u64;
        let err = loop {
            match write_at(&db, off, &fill(0xdd, 4096)).await {
                Ok(()) => off += 4 * MIB,
                Err(e) => break e,
            }
            assert!(off < 124 * MIB, "never ran out");
        };
        assert_eq!(err.errno(), libc::ENOSPC);
        assert_eq!(s.free_clusters(), 0);
        // Still usable where it has clusters.
        write_at(&db, 0, &fill(0xee, 4096)).await.unwrap();
        assert_eq!(read_at(&db, 0, 4096).await.unwrap(), fill(0xee, 4096));
        assert_eq!(read_at(&db, off, 4096).await.unwrap(), fill(0, 4096));
        for o in (0..half as u64).step_by((4 * MIB) as usize) {
            assert_eq!(read_at(&da, o, 4096).await.unwrap(), fill(0xcc, 4096));
        }
        // Creating a thick lvol fails too.
        assert_errno!(
            m.create_lvol(&s, "c", 4 * MIB, false, ClearMethod::Default)
                .await,
            libc::ENOSPC
        );
        assert!(s.lvol_by_name("c").is_none());
        drop(a);
    });
}

#[test]
fn inflate_and_decouple() {
    block_on(async {
        let (reg, m, s) = malloc_store(64 * MIB, "lvs", 1 << 20).await;
        let (base, d) = lvol_with_block(&reg, &m, &s, "base", 4 * MIB, true, 1).await;
        write_at(&d, 2 * MIB, &fill(2, 4096)).await.unwrap();
        let s1 = m.create_snapshot(&base, "s1").await.unwrap();
        write_at(&d, MIB, &fill(3, 4096)).await.unwrap();
        let s2 = m.create_snapshot(&base, "s2").await.unwrap();
        assert_eq!(s2.parent_lvol().unwrap().name(), "s1");
        let c = m.create_clone(&s2, "c").await.unwrap();
        let dc = open(&reg, "lvs/c", false);
        let want = read_all(&dc).await;
        // Decouple: c copies s2's clusters and points at s1.
        m.decouple_parent(&c).await.unwrap();
        assert_eq!(c.parent_lvol().unwrap().name(), "s1");
        assert_eq!(c.num_allocated_clusters(), 1);
        assert_eq!(read_all(&dc).await, want);
        // Inflate: thick and parentless.
        m.inflate_lvol(&c).await.unwrap();
        assert!(c.parent_lvol().is_none());
        assert!(!c.is_clone());
        assert!(!c.is_thin());
        assert_eq!(c.num_allocated_clusters(), 4);
        assert_eq!(read_all(&dc).await, want);
        // Decouple without a parent.
        assert_errno!(m.decouple_parent(&c).await, libc::EINVAL);
        drop(s1);
    });
}

#[test]
fn set_parent_moves_a_thin_lvol_under_a_snapshot() {
    block_on(async {
        let specs = [("lvs", 128 * MIB, 4 << 20), ("other", 64 * MIB, 4 << 20)];
        let (reg, m, [s, other]) = malloc_stores(specs).await;
        let lvol1 = thin_lvol(&m, &s, "lvol1", 20 * MIB).await;
        let snap1 = m.create_snapshot(&lvol1, "snap1").await.unwrap();
        let lvol2 = m.create_clone(&snap1, "lvol2").await.unwrap();
        let d2 = open_fill(&reg, "lvs/lvol2", 0, 12 * MIB, 0xcc).await;
        let tmp = thin_lvol(&m, &s, "lvol2_temp", 20 * MIB).await;
        let dt = open_fill(&reg, "lvs/lvol2_temp", 0, 20 * MIB, 0xbb).await;
        let snap2 = m.create_snapshot(&tmp, "snap2").await.unwrap();
        m.set_parent(&lvol2, &snap2).await.unwrap();
        assert_eq!(lvol2.parent_lvol().unwrap().name(), "snap2");
        let data = read_all(&d2).await;
        assert!(data[..(12 * MIB) as usize].iter().all(|&b| b == 0xcc));
        assert!(data[(12 * MIB) as usize..].iter().all(|&b| b == 0xbb));
        assert_errno!(m.set_parent(&lvol2, &snap2).await, libc::EEXIST);
        drop((dt, d2));
        m.delete_lvol(&tmp).await.unwrap();
        assert_eq!(snap2.clones().len(), 1);
        // Thick lvol, parent in another store.
        let thick = thick_lvol(&m, &s, "thick", 20 * MIB).await;
        assert_errno!(m.set_parent(&thick, &snap2).await, libc::EINVAL);
        let o = thin_lvol(&m, &other, "o", 20 * MIB).await;
        assert_errno!(m.set_parent(&o, &snap2).await, libc::EINVAL);
        // A standalone thin lvol.
        let t = thin_lvol(&m, &s, "t", 20 * MIB).await;
        m.set_parent(&t, &snap2).await.unwrap();
        assert_filled(&reg, "lvs/t", 0xbb).await;
    });
}

#[test]
fn delete_lvol_frees_clusters_and_names() {
    block_on(async {
        let (reg, m, s) = malloc_store(64 * MIB, "lvs", 1 << 20).await;
        let free = s.free_clusters();
        let l = thick_lvol(&m, &s, "v", 8 * MIB).await;
        assert_eq!(s.free_clusters(), free - 8);
        let uid = l.unique_id().to_string();
        m.delete_lvol(&l).await.unwrap();
        assert_eq!(s.free_clusters(), free);
        assert!(reg.get(&uid).is_none());
        assert!(m.find_lvol(&uid).is_none());
        thick_lvol(&m, &s, "v", 8 * MIB).await;
    });
}

/// Polls shallow copy `op` until it is no longer in progress.
async fn shallow_copy_result(m: &lvol::LvolModule, op: u32) -> lvol::ShallowCopyStatus {
    loop {
        let st = m.check_shallow_copy(op).expect("operation known");
        if st.state != lvol::ShallowCopyState::InProgress {
            return st;
        }
        futures_timer::Delay::new(std::time::Duration::from_millis(5)).await;
    }
}

#[test]
fn shallow_copy_copies_allocated_clusters() {
    block_on(async {
        let (reg, m, s) = malloc_store(64 * MIB, "lvs", 1 << 20).await;
        malloc(&reg, "D", 8 * MIB, 512).await;
        let l = thin_lvol(&m, &s, "v", 8 * MIB).await;
        let d = open_fill(&reg, "lvs/v", MIB, MIB, 0x11).await;
        write_at(&d, 5 * MIB, &fill(0x55, 4096)).await.unwrap();
        drop(d);
        // Not read-only: the copy starts and reports EPERM.
        let op = m.start_shallow_copy(&l, "D").unwrap();
        assert!(op >= 1);
        let st = shallow_copy_result(&m, op).await;
        assert_eq!(st.state, lvol::ShallowCopyState::Error);
        assert_eq!(st.error, Some(libc::EPERM));
        assert!(m.check_shallow_copy(op).is_none());

        m.set_read_only(&l).await.unwrap();
        let op2 = m.start_shallow_copy(&l, "D").unwrap();
        assert_eq!(op2, op + 1);
        let st = shallow_copy_result(&m, op2).await;
        assert_eq!(st.state, lvol::ShallowCopyState::Complete);
        assert_eq!(st.total_clusters, 2);
        assert_eq!(st.copied_clusters, 2);
        let dd = open(&reg, "D", false);
        assert_eq!(
            read_at(&dd, MIB, MIB as usize).await.unwrap(),
            fill(0x11, MIB as usize)
        );
        assert_eq!(read_at(&dd, 5 * MIB, 4096).await.unwrap(), fill(0x55, 4096));
        assert_eq!(reg.claim_of("D"), None);
        // Missing destination.
        assert_errno!(m.start_shallow_copy(&l, "nope"), libc::ENODEV);
    });
}

#[test]
fn snapshot_under_concurrent_writes_keeps_every_acknowledged_write() {
    block_on(async {
        let (reg, m, s) = malloc_store(64 * MIB, "lvs", 1 << 20).await;
        let l = thin_lvol(&m, &s, "v", 8 * MIB).await;
        let d = open(&reg, "lvs/v", true);
        let blocks = 8 * MIB / 4096;
        let writer = async {
            for b in 0..blocks {
                write_at(&d, b * 4096, &pattern((b % 200) as u8 + 1, b, 4096))
                    .await
                    .unwrap();
            }
        };
        let snapper = async {
            futures_timer::Delay::new(std::time::Duration::from_millis(1)).await;
            m.create_snapshot(&l, "snap").await.unwrap()
        };
        let ((), snap) = futures::join!(writer, snapper);
        let all = read_all(&d).await;
        for b in 0..blocks as usize {
            assert_eq!(
                &all[b * 4096..(b + 1) * 4096],
                &pattern((b % 200) as u8 + 1, b as u64, 4096)[..],
                "block {b}"
            );
        }
        // The snapshot holds, block by block, either the data or zeroes (never a torn block).
        let ds = open(&reg, snap.unique_id(), false);
        let snapdata = read_all(&ds).await;
        for b in 0..blocks as usize {
            let blk = &snapdata[b * 4096..(b + 1) * 4096];
            let want = pattern((b % 200) as u8 + 1, b as u64, 4096);
            assert!(blk == &want[..] || blk.iter().all(|&x| x == 0), "block {b}");
        }
    });
}

#[test]
fn many_concurrent_creates_and_deletes() {
    block_on(async {
        let (reg, m) = setup();
        malloc(&reg, "M", 256 * MIB, 4096).await;
        let s = lvs(&m, "M", "lvs", 1 << 20).await;
        let creates = (0..64).map(|i| {
            let m = m.clone();
            let s = s.clone();
            async move {
                m.create_lvol(&s, &format!("v{i}"), MIB, i % 2 == 0, ClearMethod::Default)
                    .await
            }
        });
        let made: Vec<_> = futures::future::join_all(creates).await;
        let made: Vec<_> = made.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(s.lvols().len(), 64);
        let mut uuids: Vec<_> = made.iter().map(|l| l.uuid()).collect();
        uuids.sort();
        uuids.dedup();
        assert_eq!(uuids.len(), 64);
        for l in &made {
            assert!(reg.get(l.unique_id()).is_some());
        }
        let dels = made.iter().map(|l| m.delete_lvol(l));
        for r in futures::future::join_all(dels).await {
            r.unwrap();
        }
        assert!(s.lvols().is_empty());
        assert_eq!(s.free_clusters(), s.total_data_clusters());
    });
}

#[test]
fn zero_sized_lvol_can_be_created_and_grown() {
    block_on(async {
        let (reg, m, s) = malloc_store(32 * MIB, "lvs", 1 << 20).await;
        let l = thick_lvol(&m, &s, "z", 0).await;
        assert_eq!(reg.get(l.unique_id()).unwrap().num_blocks(), 0);
        m.resize_lvol(&l, 1).await.unwrap();
        assert_eq!(l.size_bytes(), MIB);
        let d = open_fill(&reg, "lvs/z", 0, 512, 4).await;
        assert_eq!(read_at(&d, 0, 512).await.unwrap(), fill(4, 512));
    });
}
