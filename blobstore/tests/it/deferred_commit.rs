//! The deferred commit of first writes: an allocating write returns once its cluster's data
//! is written and the in-memory map names it; the map change is written at the client's
//! flush, at a metadata operation of the blob (sync_md, snapshot, an unmap that releases,
//! close), or when the store holds `PENDING_LIMIT` pending allocations. A power
//! cut before that loses the write (the blob reads what it read before, the cluster is free
//! again); after it, the write reads back.

use std::sync::Arc;

use blobstore::testing::{CrashPlan, MemBsDev};
use blobstore::{BlobId, Blobstore, BsOpts, IoBuf, PENDING_LIMIT};
use futures::executor::block_on;
use test_support::prelude::*;

const BLK: u32 = 4096;
const CLUSTER: u32 = 16384;
const LPC: u64 = (CLUSTER / BLK) as u64;

fn opts() -> BsOpts {
    BsOpts {
        cluster_size: CLUSTER,
        ..Default::default()
    }
}

fn block(byte: u8) -> IoBuf {
    let mut b = IoBuf::new(BLK as usize, 4096);
    b.fill(byte);
    b
}

/// Loads the store a power cut (`plan`) leaves on `dev` and returns it with the device.
async fn crash_load(dev: &MemBsDev, plan: CrashPlan) -> (Arc<MemBsDev>, Blobstore) {
    let copy = MemBsDev::from_bytes(BLK, dev.crash_image(plan));
    let bs = Blobstore::load(copy.clone(), opts()).await.unwrap();
    (copy, bs)
}

/// The first block of cluster `c` of blob `id`.
async fn first_block(bs: &Blobstore, id: BlobId, c: u64) -> Vec<u8> {
    let b = bs.open_blob(id).await.unwrap();
    let r = b
        .read(c * LPC, IoBuf::new(BLK as usize, 4096))
        .await
        .unwrap();
    b.close().await.unwrap();
    r.to_vec()
}

/// A store on a write-back device with a thin blob of `n` clusters, open.
async fn thin_store(blocks: u64, n: u64) -> (Arc<MemBsDev>, Blobstore, blobstore::Blob) {
    let dev = MemBsDev::write_back(BLK, blocks);
    let bs = init_store(&dev, opts()).await;
    let id = create(&bs, clusters(n).thin()).await;
    let b = bs.open_blob(id).await.unwrap();
    (dev, bs, b)
}

/// First writes not followed by a flush are lost in a power cut even when the device kept
/// every write (the map never named their clusters: the blob reads zeroes, the clusters are
/// free and the store is consistent); after a flush they survive a cut that loses every
/// unflushed write.
#[test]
fn first_writes_need_a_flush_to_survive_a_power_cut() {
    block_on(async {
        let (dev, bs, b) = thin_store(4096, 8).await;
        let free = bs.free_clusters();
        for c in 0..4 {
            b.write(c * LPC, block(0x10 + c as u8)).await.unwrap();
        }
        assert_eq!(bs.free_clusters(), free - 4);
        let (copy, bs2) = crash_load(&dev, CrashPlan::KeepAll).await;
        assert_eq!(
            bs2.free_clusters(),
            free,
            "uncommitted clusters are free after the cut"
        );
        for c in 0..4 {
            assert_eq!(first_block(&bs2, b.id(), c).await, vec![0u8; BLK as usize]);
        }
        unload_and_check(&copy, bs2).await;

        b.flush().await.unwrap();
        let (copy, bs2) = crash_load(&dev, CrashPlan::LoseAll).await;
        assert_eq!(bs2.free_clusters(), free - 4);
        for c in 0..4 {
            assert_eq!(
                first_block(&bs2, b.id(), c).await,
                vec![0x10 + c as u8; BLK as usize]
            );
        }
        unload_and_check(&copy, bs2).await;
        b.close().await.unwrap();
        unload_and_check(&dev, bs).await;
    });
}

/// sync_md of a blob with nothing else to write commits its pending first writes, durably.
#[test]
fn sync_md_commits_pending_first_writes() {
    block_on(async {
        let (dev, _bs, b) = thin_store(4096, 4).await;
        b.write(LPC + 1, block(0x5a)).await.unwrap();
        b.sync_md().await.unwrap();
        let (copy, bs2) = crash_load(&dev, CrashPlan::LoseAll).await;
        let r = bs2.open_blob(b.id()).await.unwrap();
        let got = r
            .read(LPC + 1, IoBuf::new(BLK as usize, 4096))
            .await
            .unwrap();
        assert_eq!(&got[..], &block(0x5a)[..]);
        r.close().await.unwrap();
        unload_and_check(&copy, bs2).await;
    });
}

/// A snapshot taken while first writes are pending holds them (they are committed first and
/// move to the snapshot), durably; the blob reads them through the snapshot.
#[test]
fn a_snapshot_takes_pending_first_writes() {
    block_on(async {
        let (dev, bs, b) = thin_store(4096, 4).await;
        b.write(2 * LPC, block(0x77)).await.unwrap();
        let s = bs.create_snapshot(b.id(), vec![]).await.unwrap();
        assert_eq!(b.num_allocated_clusters(), 0);
        let (copy, bs2) = crash_load(&dev, CrashPlan::LoseAll).await;
        assert_eq!(first_block(&bs2, s, 2).await, vec![0x77; BLK as usize]);
        assert_eq!(first_block(&bs2, b.id(), 2).await, vec![0x77; BLK as usize]);
        unload_and_check(&copy, bs2).await;
    });
}

/// An unmap that releases a cluster whose first write is still pending releases it for good:
/// after a flush and a power cut the blob reads zeroes there and the cluster is free.
#[test]
fn unmap_releases_a_pending_first_write() {
    block_on(async {
        let (dev, bs, b) = thin_store(4096, 4).await;
        let free = bs.free_clusters();
        b.write(LPC, IoBuf::from_slice(&[0x42; CLUSTER as usize], 4096))
            .await
            .unwrap();
        b.write(2 * LPC, block(0x43)).await.unwrap();
        b.unmap(LPC, LPC).await.unwrap();
        assert_eq!(bs.free_clusters(), free - 1);
        b.flush().await.unwrap();
        let (copy, bs2) = crash_load(&dev, CrashPlan::LoseAll).await;
        assert_eq!(bs2.free_clusters(), free - 1);
        assert_eq!(first_block(&bs2, b.id(), 1).await, vec![0u8; BLK as usize]);
        assert_eq!(first_block(&bs2, b.id(), 2).await, vec![0x43; BLK as usize]);
        unload_and_check(&copy, bs2).await;
    });
}

/// The pending state is bounded: the first write that finds `PENDING_LIMIT` uncommitted
/// allocations in the store commits them all before it adds its own (with every write kept
/// by the device, the map then names all of them but that write's; one write earlier,
/// none).
#[test]
fn pending_first_writes_are_bounded() {
    block_on(async {
        let n = PENDING_LIMIT as u64 + 1;
        // n clusters of 16 KiB and as many for the md and spare.
        let (dev, bs, b) = thin_store(2 * n * LPC, n).await;
        for c in 0..n - 1 {
            b.write(c * LPC, block(1 + (c % 250) as u8)).await.unwrap();
        }
        {
            let (copy, bs2) = crash_load(&dev, CrashPlan::KeepAll).await;
            let r = bs2.open_blob(b.id()).await.unwrap();
            assert_eq!(r.num_allocated_clusters(), 0, "committed before the bound");
            r.close().await.unwrap();
            unload_and_check(&copy, bs2).await;
        }
        b.write((n - 1) * LPC, block(0xfe)).await.unwrap();
        let (copy, bs2) = crash_load(&dev, CrashPlan::KeepAll).await;
        let r = bs2.open_blob(b.id()).await.unwrap();
        assert_eq!(
            r.num_allocated_clusters(),
            n - 1,
            "the write at the bound committed the others"
        );
        for c in (0..n - 1).step_by(97) {
            let got = r
                .read(c * LPC, IoBuf::new(BLK as usize, 4096))
                .await
                .unwrap();
            assert_eq!(&got[..], &block(1 + (c % 250) as u8)[..], "cluster {c}");
        }
        r.close().await.unwrap();
        unload_and_check(&copy, bs2).await;
        b.close().await.unwrap();
        unload_and_check(&dev, bs).await;
    });
}
