//! Issue 14, finding 1 (blobstore side): a released cluster counts as cleared only when the
//! device guarantees it reads zeroes. On a device whose unmap keeps the old bytes (an aio
//! file without hole punching, a disk that treats unmap as a hint), a cluster released by
//! delete, shrink, snapshot merge or unmap stays stale and is scrubbed before a thick claim,
//! with no restart between the steps.

use blobstore::testing::MemBsDev;
use blobstore::{BlobId, BlobOpts, Blobstore, BsOpts, ClearMethod, IoBuf};
use futures::executor::block_on;

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

async fn create(bs: &Blobstore, n: u64, thin: bool) -> BlobId {
    bs.create_blob(BlobOpts {
        num_clusters: n,
        thin,
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn write_secret(bs: &Blobstore, id: BlobId, cluster: u64, n: u64) {
    let b = bs.open_blob(id).await.unwrap();
    let mut buf = IoBuf::new((n * u64::from(CLUSTER)) as usize, 4096);
    buf.fill(SECRET);
    b.write(cluster * LPC, buf).await.unwrap();
    b.close().await.unwrap();
}

/// A thick blob of every free cluster reads zeroes only.
async fn thick_claim_reads_zeroes(bs: &Blobstore, dev: &MemBsDev, what: &str) {
    assert!(
        dev.snapshot().contains(&SECRET),
        "{what}: the secret is not on the device, the test proves nothing"
    );
    let n = bs.free_clusters();
    assert!(n > 0, "{what}: no free cluster");
    let id = create(bs, n, false).await;
    let b = bs.open_blob(id).await.unwrap();
    let d = b
        .read(0, IoBuf::new((n * u64::from(CLUSTER)) as usize, 4096))
        .await
        .unwrap();
    b.close().await.unwrap();
    let leaked = d.iter().filter(|&&x| x == SECRET).count();
    assert_eq!(
        leaked, 0,
        "{what}: a thick claim shows {leaked} bytes of a released blob"
    );
}

#[test]
fn released_clusters_stay_stale_when_unmap_does_not_zero() {
    block_on(async {
        for clear in [ClearMethod::Default, ClearMethod::Unmap] {
            // Delete.
            let (dev, bs) = store(clear).await;
            let a = create(&bs, 8, false).await;
            write_secret(&bs, a, 0, 8).await;
            bs.delete_blob(a).await.unwrap();
            thick_claim_reads_zeroes(&bs, &dev, "delete").await;

            // Shrink of a thick blob.
            let (dev, bs) = store(clear).await;
            let a = create(&bs, 8, false).await;
            write_secret(&bs, a, 0, 8).await;
            let b = bs.open_blob(a).await.unwrap();
            b.resize(2).await.unwrap();
            b.close().await.unwrap();
            thick_claim_reads_zeroes(&bs, &dev, "shrink").await;

            // Snapshot merge: the clone overwrote cluster 0, so deleting the snapshot
            // releases the snapshot's cluster 0.
            let (dev, bs) = store(clear).await;
            let a = create(&bs, 4, false).await;
            write_secret(&bs, a, 0, 4).await;
            let s = bs.create_snapshot(a, vec![]).await.unwrap();
            let b = bs.open_blob(a).await.unwrap();
            let mut buf = IoBuf::new(CLUSTER as usize, 4096);
            buf.fill(0x11);
            b.write(0, buf).await.unwrap();
            b.close().await.unwrap();
            bs.delete_blob(s).await.unwrap();
            thick_claim_reads_zeroes(&bs, &dev, "merge").await;

            // Unmap of a whole cluster of a thin blob.
            let (dev, bs) = store(clear).await;
            let t = create(&bs, 4, true).await;
            write_secret(&bs, t, 1, 2).await;
            let b = bs.open_blob(t).await.unwrap();
            b.unmap(LPC, 2 * LPC).await.unwrap();
            assert_eq!(b.num_allocated_clusters(), 0, "unmap released nothing");
            b.close().await.unwrap();
            thick_claim_reads_zeroes(&bs, &dev, "unmap").await;

            // Inflate, then the snapshot it no longer needs is deleted.
            let (dev, bs) = store(clear).await;
            let a = create(&bs, 4, false).await;
            write_secret(&bs, a, 0, 4).await;
            let s = bs.create_snapshot(a, vec![]).await.unwrap();
            bs.inflate_blob(a).await.unwrap();
            let b = bs.open_blob(a).await.unwrap();
            let mut buf = IoBuf::new(4 * CLUSTER as usize, 4096);
            buf.fill(0x22);
            b.write(0, buf).await.unwrap();
            b.close().await.unwrap();
            bs.delete_blob(s).await.unwrap();
            thick_claim_reads_zeroes(&bs, &dev, "inflate then delete").await;
        }
    });
}

/// A write_zeroes clear method does clear, and a device whose unmap zeroes is trusted: the
/// thick claim then needs no scrub (no write to the claimed clusters).
#[test]
fn cleared_clusters_are_not_scrubbed_again() {
    block_on(async {
        let dev = MemBsDev::new(BLK, 256);
        let bs = Blobstore::init(
            dev.clone(),
            BsOpts {
                cluster_size: CLUSTER,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let a = create(&bs, 8, false).await;
        write_secret(&bs, a, 0, 8).await;
        bs.delete_blob(a).await.unwrap();
        dev.set_fault(blobstore::testing::Fault::None);
        let id = create(&bs, 8, false).await;
        // The store is dirty already: the create writes its extent page and its root page,
        // and no write_zeroes over the claimed clusters.
        assert_eq!(
            dev.writes(),
            2,
            "a thick claim of zeroed clusters scrubbed them"
        );
        let b = bs.open_blob(id).await.unwrap();
        let d = b
            .read(0, IoBuf::new(8 * CLUSTER as usize, 4096))
            .await
            .unwrap();
        b.close().await.unwrap();
        assert!(d.iter().all(|&x| x == 0));
    });
}
