//! The steady-state fast path of an lvol (`Blob::direct`: a request on an allocated cluster
//! goes straight to the store's device) follows every change of where the data lives: after
//! a snapshot the clusters belong to the snapshot, and a write must copy on write instead of
//! overwriting them; after a shrink and a grow the lvol reads its new clusters, not the old.

use bdev_core::Registry;
use futures::executor::block_on;
use lvol::{Lvol, LvolModule, LvolStore};
use test_support::prelude::*;

const MIB: u64 = 1 << 20;

/// A store of 64 MiB with 1 MiB clusters on a malloc bdev, and a thick lvol `lvs/v` of 4 MiB
/// filled with pattern `seed`: the registry, the module, the store and the lvol.
async fn filled_lvol(
    seed: u8,
) -> (
    Registry,
    LvolModule,
    std::sync::Arc<LvolStore>,
    std::sync::Arc<Lvol>,
) {
    let (reg, m, s) = malloc_store(64 * MIB, "lvs", MIB as u32).await;
    let l = thick_lvol(&m, &s, "v", 4 * MIB).await;
    fill_pattern(&reg, "lvs/v", seed).await;
    (reg, m, s, l)
}

#[test]
fn writes_after_a_snapshot_copy_on_write_and_leave_the_snapshot_alone() {
    block_on(async {
        let (reg, m, _, l) = filled_lvol(1).await;
        let d = open(&reg, "lvs/v", true);
        // Allocated clusters: these reads and writes take the fast path.
        let mut want = pattern(1, 0, 4 * MIB as usize);
        assert_eq!(read_all(&d).await, want);
        let snap = m.create_snapshot(&l, "snap").await.unwrap();
        assert_eq!(
            l.num_allocated_clusters(),
            0,
            "the clusters moved to the snapshot"
        );
        // A 4 KiB write into cluster 1: copy-on-write of that cluster only.
        let at = MIB + 8192;
        let new = pattern(2, at, 4096);
        write_at(&d, at, &new).await.unwrap();
        want[at as usize..at as usize + 4096].copy_from_slice(&new);
        assert_eq!(l.num_allocated_clusters(), 1);
        // The clone's own cluster now: the next write there takes the fast path again.
        let at2 = MIB + MIB / 2;
        let new2 = pattern(3, at2, 8192);
        write_at(&d, at2, &new2).await.unwrap();
        want[at2 as usize..at2 as usize + 8192].copy_from_slice(&new2);
        assert_eq!(l.num_allocated_clusters(), 1);
        assert_eq!(read_all(&d).await, want);
        let ds = open(&reg, snap.unique_id(), false);
        assert_eq!(
            read_all(&ds).await,
            pattern(1, 0, 4 * MIB as usize),
            "the snapshot keeps the data it was taken with"
        );
    });
}

#[test]
fn a_shrink_and_grow_reads_the_new_clusters() {
    block_on(async {
        let (reg, m, s, l) = filled_lvol(4).await;
        m.resize_lvol(&l, 2 * MIB).await.unwrap();
        let d = open(&reg, "lvs/v", true);
        assert_errno!(read_at(&d, 3 * MIB, 4096).await, libc::EINVAL);
        // Another lvol takes the freed clusters and writes over them.
        let other = thick_lvol(&m, &s, "w", 2 * MIB).await;
        fill_pattern(&reg, other.unique_id(), 5).await;
        m.resize_lvol(&l, 4 * MIB).await.unwrap();
        let all = read_all(&d).await;
        assert_eq!(
            &all[..2 * MIB as usize],
            &pattern(4, 0, 2 * MIB as usize)[..]
        );
        assert!(
            all[2 * MIB as usize..].iter().all(|&b| b == 0),
            "a grown thick lvol reads zeroes, not another lvol's data"
        );
        let ow = open(&reg, other.unique_id(), false);
        assert_eq!(read_all(&ow).await, pattern(5, 0, 2 * MIB as usize));
    });
}
