//! No data crosses between volumes (issue 9 part 6): a secret written into one blob never
//! reads back through another blob after the first is deleted or shrunk, whatever clear
//! method the store and the blobs use. The uncovered part of a newly allocated cluster reads
//! as zeroes (thin, no parent) or as the parent's data.

use blobstore::testing::{Fault, MemBsDev};
use std::sync::Arc;

use blobstore::{BlobId, BlobOpts, Blobstore, BsOpts, ClearMethod, IoBuf};
use futures::executor::block_on;
use test_support::prelude::*;

const BLK: usize = 4096;
const CLUSTER: usize = 16384;
const LPC: u64 = (CLUSTER / BLK) as u64;
const METHODS: [ClearMethod; 4] = [
    ClearMethod::Default,
    ClearMethod::None,
    ClearMethod::Unmap,
    ClearMethod::WriteZeroes,
];

fn secret(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    for (i, c) in v.chunks_mut(16).enumerate() {
        c.copy_from_slice(format!("SECRET{i:010}").as_bytes());
    }
    v
}

fn holds_secret(d: &[u8]) -> bool {
    d.windows(6).any(|w| w == b"SECRET")
}

/// A store on a new 1 MiB device, with the store-wide clear method `clear`.
async fn store(clear: ClearMethod) -> (Arc<MemBsDev>, Blobstore) {
    let dev = MemBsDev::new(BLK as u32, 256);
    let o = BsOpts {
        cluster_size: CLUSTER as u32,
        clear_method: clear,
        ..Default::default()
    };
    let bs = Blobstore::init(dev.clone(), o).await.unwrap();
    (dev, bs)
}

/// A blob of `clusters` clusters with its own clear method.
async fn blob_with(bs: &Blobstore, clusters: u64, thin: bool, clear: ClearMethod) -> BlobId {
    let o = BlobOpts {
        num_clusters: clusters,
        thin,
        clear_method: clear,
        ..Default::default()
    };
    bs.create_blob(o).await.unwrap()
}

/// Fills the whole data region with the secret through blob A, frees A (delete or shrink),
/// then allocates in a new thin blob B one block per cluster and checks every byte of B.
async fn case(store_cm: ClearMethod, blob_cm: ClearMethod, thick: bool, shrink: bool) {
    let (dev, bs) = store(store_cm).await;
    let n = bs.free_clusters();
    let a = blob_with(&bs, n, !thick, blob_cm).await;
    write_blob(&bs, a, 0, &secret(n as usize * CLUSTER))
        .await
        .unwrap();
    assert_eq!(bs.free_clusters(), 0);
    if shrink {
        let b = bs.open_blob(a).await.unwrap();
        b.resize(1).await.unwrap();
        b.sync_md().await.unwrap();
        b.close().await.unwrap();
    } else {
        bs.delete_blob(a).await.unwrap();
    }
    let free = bs.free_clusters();
    assert!(free >= n - 1, "{free} of {n} clusters freed");
    let b = new_blob(&bs, free, true).await;
    // One block in the middle of every cluster: the rest of each cluster is uncovered.
    for c in 0..free {
        write_blob(&bs, b, c * LPC + 1, &[0xab; BLK]).await.unwrap();
    }
    assert_eq!(bs.free_clusters(), 0, "every freed cluster was reused");
    let d = read_blob(&bs, b).await;
    for (i, blk) in d.chunks(BLK).enumerate() {
        let want = if i as u64 % LPC == 1 { 0xab } else { 0 };
        assert!(
            blk.iter().all(|&x| x == want),
            "store {store_cm:?} blob {blob_cm:?} thick {thick} shrink {shrink}: block {i} holds {:?}",
            String::from_utf8_lossy(&blk[..16])
        );
    }
    bs.unload().await.unwrap();
    // And the same after a reload.
    let bs = Blobstore::load(dev, BsOpts::default()).await.unwrap();
    assert!(!holds_secret(&read_blob(&bs, b).await));
}

#[test]
fn thin_allocation_never_shows_a_deleted_volumes_bytes() {
    block_on(async {
        for store_cm in METHODS {
            for blob_cm in METHODS {
                for thick in [false, true] {
                    case(store_cm, blob_cm, thick, false).await;
                }
            }
        }
    });
}

#[test]
fn thin_allocation_never_shows_a_shrunk_volumes_bytes() {
    block_on(async {
        for store_cm in METHODS {
            for blob_cm in METHODS {
                case(store_cm, blob_cm, true, true).await;
            }
        }
    });
}

#[test]
fn uncovered_part_of_a_clone_cluster_reads_the_parent() {
    block_on(async {
        let (_, bs) = store(ClearMethod::None).await;
        // Leave secrets in freed clusters first.
        let junk = blob_with(&bs, 8, false, ClearMethod::None).await;
        write_blob(&bs, junk, 0, &secret(8 * CLUSTER))
            .await
            .unwrap();
        bs.delete_blob(junk).await.unwrap();
        let v = new_blob(&bs, 2, false).await;
        let parent_data: Vec<u8> = (0..2 * CLUSTER).map(|i| (i / BLK) as u8 + 1).collect();
        write_blob(&bs, v, 0, &parent_data).await.unwrap();
        let s = bs.create_snapshot(v, vec![]).await.unwrap();
        let c = bs.create_clone(s, vec![]).await.unwrap();
        write_blob(&bs, c, 2, &[0xcd; BLK]).await.unwrap();
        write_blob(&bs, v, LPC + 3, &[0xef; BLK]).await.unwrap();
        let mut want_c = parent_data.clone();
        want_c[2 * BLK..3 * BLK].fill(0xcd);
        assert_eq!(read_blob(&bs, c).await, want_c);
        let mut want_v = parent_data.clone();
        want_v[(LPC as usize + 3) * BLK..(LPC as usize + 4) * BLK].fill(0xef);
        assert_eq!(read_blob(&bs, v).await, want_v);
    });
}

/// FINDING (fails today): a thick blob's clusters are claimed without clearing, so after a
/// power cut that lost a thin allocation (its data reached the disk, its metadata did not),
/// the next thick create or thick grow reads the lost write's bytes: data of one volume shows
/// in another. Found by the model test (`model.rs`), reduced by hand.
#[test]
fn thick_grow_after_a_power_cut_does_not_show_lost_bytes() {
    block_on(async {
        let o = || BsOpts {
            cluster_size: CLUSTER as u32,
            ..Default::default()
        };
        let dev2 = MemBsDev::new(BLK as u32, 256);
        let bs = Blobstore::init(dev2.clone(), o()).await.unwrap();
        let thick2 = new_blob(&bs, 1, false).await;
        let thin2 = new_blob(&bs, 2, true).await;
        bs.unload().await.unwrap();
        let bs = Blobstore::load(dev2.clone(), o()).await.unwrap();
        let b = bs.open_blob(thin2).await.unwrap();
        // Find the cut that keeps the data write and drops the metadata.
        let mut found = false;
        for k in 1..8 {
            let img = MemBsDev::from_bytes(BLK as u32, dev2.snapshot());
            let bs3 = Blobstore::load(img.clone(), o()).await.unwrap();
            let b3 = bs3.open_blob(thin2).await.unwrap();
            img.set_fault(Fault::DropAfter(k));
            b3.write(0, IoBuf::from_slice(&secret(CLUSTER), BLK))
                .await
                .unwrap();
            drop(b3);
            drop(bs3);
            let crashed = MemBsDev::from_bytes(BLK as u32, img.snapshot());
            let bs4 = Blobstore::load(crashed.clone(), o()).await.unwrap();
            let t = bs4.open_blob(thin2).await.unwrap();
            let lost = t.num_allocated_clusters() == 0;
            t.close().await.unwrap();
            if !lost || !holds_secret(&crashed.snapshot()) {
                continue;
            }
            found = true;
            // The lost write's bytes are on a free cluster. Grow the thick blob onto it.
            let g = bs4.open_blob(thick2).await.unwrap();
            g.resize(bs4.total_data_clusters()).await.ok();
            g.resize(2).await.unwrap();
            g.sync_md().await.unwrap();
            g.close().await.unwrap();
            let d = read_blob(&bs4, thick2).await;
            assert!(
                !holds_secret(&d),
                "cut after {k} writes: a thick grow reads bytes of a write lost in the power cut"
            );
            let c = new_blob(&bs4, 4, false).await;
            assert!(
                !holds_secret(&read_blob(&bs4, c).await),
                "thick create reads lost bytes"
            );
        }
        b.close().await.unwrap();
        assert!(found, "no cut kept the data and lost the allocation");
    });
}

/// A thick blob created or grown after a delete or a shrink, for every store and blob clear
/// method: its clusters never show the old volume's bytes.
#[test]
fn thick_allocation_never_shows_a_deleted_volumes_bytes() {
    block_on(async {
        let mut bad = Vec::new();
        for store_cm in METHODS {
            for blob_cm in METHODS {
                let (_, bs) = store(store_cm).await;
                let n = bs.free_clusters();
                let a = blob_with(&bs, n, false, blob_cm).await;
                write_blob(&bs, a, 0, &secret(n as usize * CLUSTER))
                    .await
                    .unwrap();
                bs.delete_blob(a).await.unwrap();
                let c = new_blob(&bs, n / 2, false).await;
                let t = new_blob(&bs, 1, false).await;
                let b = bs.open_blob(t).await.unwrap();
                b.resize(n - n / 2).await.unwrap();
                b.sync_md().await.unwrap();
                b.close().await.unwrap();
                for (what, id) in [("thick create", c), ("thick grow", t)] {
                    if holds_secret(&read_blob(&bs, id).await) {
                        bad.push(format!("store {store_cm:?} blob {blob_cm:?}: {what}"));
                    }
                }
            }
        }
        assert!(
            bad.is_empty(),
            "stale bytes of a deleted volume in:\n{}",
            bad.join("\n")
        );
    });
}
