//! Out of space (issue 9 part 5): a thin store that runs out of clusters fails exactly the
//! write that needed a new cluster with ENOSPC (through the lvol bdev, not a generic EIO),
//! keeps serving everything else, and recovers when space is freed.

use crate::common::*;

#[test]
fn thin_store_runs_out_serves_the_rest_and_recovers() {
    lvol_test(|reg, m| async move {
        malloc(&reg, "m0", 4 * MIB, 512).await;
        let s = lvs(&m, "m0", "lvs", CLUSTER).await;
        let cs = u64::from(CLUSTER);
        let free = s.free_clusters();
        assert!(free > 8, "{free}");
        // Two thin volumes, each as large as the whole store: overcommitted.
        let a = thin_lvol(&m, &s, "a", free * cs).await;
        let b = thin_lvol(&m, &s, "b", free * cs).await;
        let da = reg.open(a.unique_id(), true).unwrap();
        let db = reg.open(b.unique_id(), true).unwrap();
        // Fill: a takes half, b the rest (one 4 KiB write per cluster).
        let half = free / 2;
        for c in 0..half {
            write_at(&da, c * cs + 4096, &pattern(c as u8, 0, 4096))
                .await
                .unwrap();
        }
        for c in 0..free - half {
            write_at(&db, c * cs, &pattern(0x80 ^ c as u8, 0, 4096))
                .await
                .unwrap();
        }
        assert_eq!(s.free_clusters(), 0);
        // The write that needs a cluster fails with ENOSPC, on both volumes.
        let e = write_at(&da, half * cs, &[1; 4096]).await.unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
        let e = write_at(&db, (free - 1) * cs, &[1; 4096])
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
        assert_eq!(s.free_clusters(), 0, "a failed allocation leaked");
        // Everything else works: overwrite in allocated clusters, reads everywhere.
        write_at(&da, 0, &[9; 4096]).await.unwrap();
        assert_eq!(read_at(&da, 0, 4096).await.unwrap(), vec![9; 4096]);
        for c in 0..half {
            assert_eq!(
                read_at(&da, c * cs + 4096, 4096).await.unwrap(),
                pattern(c as u8, 0, 4096)
            );
        }
        assert_eq!(read_at(&da, half * cs, 4096).await.unwrap(), vec![0; 4096]);
        // A snapshot and a clone need no clusters and still work.
        let snap = m.create_snapshot(&b, "bsnap").await.unwrap();
        let clone = m.create_clone(&snap, "bclone").await.unwrap();
        let dc = reg.open(clone.unique_id(), false).unwrap();
        assert_eq!(read_at(&dc, 0, 4096).await.unwrap(), pattern(0x80, 0, 4096));
        drop(dc);
        // Thick create fails cleanly.
        let e = m
            .create_lvol(&s, "thick", cs, false, Default::default())
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
        assert!(s.lvol_by_name("thick").is_none());
        // Free space: delete the clone (nothing allocated) then a (half the store).
        m.delete_lvol(&clone).await.unwrap();
        drop(da);
        m.delete_lvol(&a).await.unwrap();
        assert_eq!(s.free_clusters(), half);
        // The write that failed now succeeds, on the same open descriptor.
        write_at(&db, (free - 1) * cs, &[1; 4096]).await.unwrap();
        assert_eq!(
            read_at(&db, (free - 1) * cs, 4096).await.unwrap(),
            vec![1; 4096]
        );
        // And everything survives a reload.
        drop(db);
        m.unload_lvstore(&s).await.unwrap();
        let s = m.load_lvstore("m0").await.unwrap();
        let b = s.lvol_by_name("b").unwrap();
        let db = reg.open(b.unique_id(), false).unwrap();
        assert_eq!(
            read_at(&db, (free - 1) * cs, 4096).await.unwrap(),
            vec![1; 4096]
        );
        assert_eq!(read_at(&db, 0, 4096).await.unwrap(), pattern(0x80, 0, 4096));
        assert_consistent(&s).await;
    });
}
