//! Issue 14, finding 1 (blobstore side): a released cluster counts as cleared only when the
//! device guarantees it reads zeroes. On a device whose unmap keeps the old bytes (an aio
//! file without hole punching, a disk that treats unmap as a hint), a cluster released by
//! delete, shrink, snapshot merge or unmap stays stale and is scrubbed before a thick claim,
//! with no restart between the steps.

use blobstore::testing::MemBsDev;
use blobstore::{BlobId, Blobstore, BsOpts, ClearMethod};
use futures::executor::block_on;
use test_support::prelude::*;

const BLK: u32 = 4096;
const CLUSTER: u32 = 16384;
const LPC: u64 = (CLUSTER / BLK) as u64;
const SECRET: u8 = 0xcc;

/// A store on a device whose unmap succeeds but leaves the bytes.
async fn store(clear: ClearMethod) -> (std::sync::Arc<MemBsDev>, Blobstore) {
    let dev = MemBsDev::new(BLK, 256);
    dev.set_unmap_zeroes(false);
    let bs = Blobstore::init(
        dev.clone(),
        BsOpts {
            cluster_size: CLUSTER,
            clear_method: clear,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    (dev, bs)
}

async fn write_secret(bs: &Blobstore, id: BlobId, cluster: u64, n: u64) {
    write_units(bs, id, cluster * LPC, n * LPC, SECRET).await;
}

/// A thick blob of every free cluster reads zeroes only.
async fn thick_claim_reads_zeroes(bs: &Blobstore, dev: &MemBsDev, what: &str) {
    assert!(
        dev.snapshot().contains(&SECRET),
        "{what}: the secret is not on the device, the test proves nothing"
    );
    let n = bs.free_clusters();
    assert!(n > 0, "{what}: no free cluster");
    let id = new_blob(bs, n, false).await;
    let d = read_units(bs, id, 0, n * LPC).await;
    let leaked = d.iter().filter(|&&x| x == SECRET).count();
    assert_eq!(
        leaked, 0,
        "{what}: a thick claim shows {leaked} bytes of a released blob"
    );
}

/// How a test releases the clusters that hold the secret.
#[derive(Clone, Copy, Debug)]
enum Release {
    /// Delete a thick blob.
    Delete,
    /// Shrink a thick blob.
    Shrink,
    /// Snapshot merge: the clone overwrote cluster 0, so deleting the snapshot releases the
    /// snapshot's cluster 0.
    Merge,
    /// Unmap of whole clusters of a thin blob.
    Unmap,
    /// Inflate, then the snapshot it no longer needs is deleted.
    InflateThenDelete,
}

/// Writes the secret into a new blob and releases its clusters `how`.
async fn release(bs: &Blobstore, how: Release) {
    let (n, thin) = match how {
        Release::Delete | Release::Shrink => (8, false),
        Release::Unmap => (4, true),
        Release::Merge | Release::InflateThenDelete => (4, false),
    };
    let a = new_blob(bs, n, thin).await;
    match how {
        Release::Unmap => write_secret(bs, a, 1, 2).await,
        _ => write_secret(bs, a, 0, n).await,
    }
    match how {
        Release::Delete => bs.delete_blob(a).await.unwrap(),
        Release::Shrink => {
            let b = bs.open_blob(a).await.unwrap();
            b.resize(2).await.unwrap();
            b.close().await.unwrap();
        }
        Release::Unmap => {
            let b = bs.open_blob(a).await.unwrap();
            b.unmap(LPC, 2 * LPC).await.unwrap();
            assert_eq!(b.num_allocated_clusters(), 0, "unmap released nothing");
            b.close().await.unwrap();
        }
        Release::Merge | Release::InflateThenDelete => {
            let s = bs.create_snapshot(a, vec![]).await.unwrap();
            let (units, byte) = match how {
                Release::Merge => (LPC, 0x11),
                _ => {
                    bs.inflate_blob(a).await.unwrap();
                    (4 * LPC, 0x22)
                }
            };
            write_units(bs, a, 0, units, byte).await;
            bs.delete_blob(s).await.unwrap();
        }
    }
}

#[test]
fn released_clusters_stay_stale_when_unmap_does_not_zero() {
    block_on(async {
        for clear in [ClearMethod::Default, ClearMethod::Unmap] {
            for how in [
                Release::Delete,
                Release::Shrink,
                Release::Merge,
                Release::Unmap,
                Release::InflateThenDelete,
            ] {
                let (dev, bs) = store(clear).await;
                release(&bs, how).await;
                thick_claim_reads_zeroes(&bs, &dev, &format!("{how:?}, store {clear:?}")).await;
            }
        }
    });
}

/// A write_zeroes clear method does clear, and a device whose unmap zeroes is trusted: the
/// thick claim then needs no scrub (no write to the claimed clusters).
#[test]
fn cleared_clusters_are_not_scrubbed_again() {
    block_on(async {
        let o = BsOpts {
            cluster_size: CLUSTER,
            ..Default::default()
        };
        let (dev, bs) = mem_store(BLK, 256, o).await;
        let a = new_blob(&bs, 8, false).await;
        write_secret(&bs, a, 0, 8).await;
        bs.delete_blob(a).await.unwrap();
        dev.set_fault(blobstore::testing::Fault::None);
        let id = new_blob(&bs, 8, false).await;
        // The store is dirty already: the create writes its extent page and its root page,
        // and no write_zeroes over the claimed clusters.
        assert_eq!(
            dev.writes(),
            2,
            "a thick claim of zeroed clusters scrubbed them"
        );
        let d = read_units(&bs, id, 0, 8 * LPC).await;
        assert!(d.iter().all(|&x| x == 0));
    });
}

/// A request that went the direct way (`Blob::direct`: translated to a device LBA, the
/// freeze held shared until the device request completes) may still be in flight when an
/// unmap releases its cluster; the release must wait for it, or its write could land after
/// the cluster has a new owner. So the unmap does not finish, and the cluster stays claimed,
/// until that request is done.
#[test]
fn an_unmap_release_waits_for_direct_requests_in_flight() {
    use futures::FutureExt;
    block_on(async {
        let (_dev, bs) = store(ClearMethod::Unmap).await;
        let id = new_blob(&bs, 2, true).await;
        write_secret(&bs, id, 0, 2).await;
        let b = bs.open_blob(id).await.unwrap();
        let free = bs.free_clusters();
        let direct = b.direct(0, BLK as usize, true).expect("allocated: direct");
        let mut unmap = Box::pin(b.unmap(0, LPC));
        assert!(
            (&mut unmap).now_or_never().is_none(),
            "the unmap released the cluster under a request in flight"
        );
        assert_eq!(
            bs.free_clusters(),
            free,
            "released under a request in flight"
        );
        drop(direct);
        unmap.await.unwrap();
        assert_eq!(
            bs.free_clusters(),
            free + 1,
            "released once the request is done"
        );
        // A partial unmap releases nothing and does not wait.
        let direct = b
            .direct(LPC, BLK as usize, false)
            .expect("allocated: direct");
        assert!(Box::pin(b.unmap(LPC, 1)).now_or_never().is_some());
        drop(direct);
        b.close().await.unwrap();
    });
}
