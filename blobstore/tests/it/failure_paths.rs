//! Regressions for the reliability findings 2 and 3: thick claims never show stale bytes, and
//! failed metadata operations release their opens and leave memory matching the disk.

use std::collections::BTreeMap;

use blobstore::testing::{Fault, MemBsDev};
use blobstore::{BlobId, Blobstore, BsOpts, ClearMethod, IoBuf, Parent};
use futures::executor::block_on;
use test_support::prelude::*;

const BLK: u32 = 4096;
const CLUSTER: u32 = 16384;
const LPC: u64 = (CLUSTER / BLK) as u64;

fn opts(cm: ClearMethod) -> BsOpts {
    BsOpts {
        cluster_size: CLUSTER,
        clear_method: cm,
        ..Default::default()
    }
}

fn secret(len: usize) -> IoBuf {
    let mut b = IoBuf::new(len, 4096);
    for (i, x) in b.iter_mut().enumerate() {
        *x = 0xA5 ^ (i as u8 & 0x0f);
    }
    b
}

async fn read_all(bs: &Blobstore, id: BlobId) -> Vec<u8> {
    let b = bs.open_blob(id).await.unwrap();
    let n = b.num_clusters() * u64::from(CLUSTER);
    let d = b.read(0, IoBuf::new(n as usize, 4096)).await.unwrap();
    b.close().await.unwrap();
    d.to_vec()
}

async fn thick(bs: &Blobstore, n: u64, cm: ClearMethod) -> BlobId {
    create(bs, clusters(n).clear(cm)).await
}

/// A store with clear method Unmap on a new device of `blocks` blocks.
async fn unmap_store(blocks: u64) -> (std::sync::Arc<MemBsDev>, Blobstore) {
    mem_store(BLK, blocks, opts(ClearMethod::Unmap)).await
}

async fn write_secret(bs: &Blobstore, id: BlobId) {
    let b = bs.open_blob(id).await.unwrap();
    let n = b.num_clusters() as usize * CLUSTER as usize;
    b.write(0, secret(n)).await.unwrap();
    b.close().await.unwrap();
}

/// Creates a thick blob of `n / 2` clusters and grows a 1-cluster thick blob to `n - n / 2`;
/// both must read as zeroes.
async fn thick_claims_read_zeroes(bs: &Blobstore, n: u64, what: &str) {
    let c = thick(bs, n / 2, ClearMethod::Default).await;
    let t = thick(bs, 1, ClearMethod::Default).await;
    let b = bs.open_blob(t).await.unwrap();
    b.resize(n - n / 2).await.unwrap();
    b.sync_md().await.unwrap();
    b.close().await.unwrap();
    for (how, id) in [("create", c), ("grow", t)] {
        assert!(
            read_all(bs, id).await.iter().all(|&x| x == 0),
            "{what}: thick {how} shows stale bytes"
        );
    }
}

#[test]
fn thick_claims_after_an_uncleared_delete_read_zeroes() {
    block_on(async {
        for store_cm in CLEAR_METHODS {
            let (_dev, bs) = mem_store(BLK, 256, opts(store_cm)).await;
            let n = bs.free_clusters();
            let a = thick(&bs, n, ClearMethod::None).await;
            write_secret(&bs, a).await;
            bs.delete_blob(a).await.unwrap();
            thick_claims_read_zeroes(&bs, n, &format!("store {store_cm:?}")).await;
        }
    });
}

#[test]
fn thick_claims_after_a_clean_reload_read_zeroes() {
    block_on(async {
        let (dev, bs) = unmap_store(256).await;
        let n = bs.free_clusters();
        let a = thick(&bs, n, ClearMethod::None).await;
        write_secret(&bs, a).await;
        bs.delete_blob(a).await.unwrap();
        let bs = reload(&dev, bs, opts(ClearMethod::Unmap)).await;
        thick_claims_read_zeroes(&bs, n, "after reload").await;
    });
}

#[test]
fn thick_create_on_a_store_initialised_without_clearing_reads_zeroes() {
    block_on(async {
        let dev = MemBsDev::from_bytes(BLK, vec![0xEE; 256 * BLK as usize]);
        let bs = init_store(&dev, opts(ClearMethod::None)).await;
        let n = bs.free_clusters();
        thick_claims_read_zeroes(&bs, n, "init clear none").await;
    });
}

#[test]
fn thick_create_fast_path_writes_no_data_on_a_cleared_store() {
    block_on(async {
        let (dev, bs) = unmap_store(256).await;
        let n = bs.free_clusters();
        let w0 = dev.writes();
        let id = thick(&bs, n, ClearMethod::Default).await;
        // Only metadata: the super block (dirty), the extent page(s) and the root page.
        assert!(dev.writes() - w0 <= 4, "{} writes", dev.writes() - w0);
        assert!(read_all(&bs, id).await.iter().all(|&x| x == 0));
    });
}

/// A first write returns before its map change is written; when that commit fails (at the
/// client's flush), the flush fails and the write keeps its cluster: it reads back, no thick
/// claim gets the cluster (every free cluster a thick claim takes reads zeroes), and the next
/// flush commits it, durably (it reads back after a reload).
#[test]
fn a_thin_write_whose_commit_failed_keeps_its_cluster_and_is_retried() {
    block_on(async {
        let (dev, bs) = unmap_store(64).await;
        let thin = create(&bs, clusters(2).thin()).await;
        let b = bs.open_blob(thin).await.unwrap();
        b.write(0, secret(CLUSTER as usize)).await.unwrap();
        // The commit's metadata writes fail.
        dev.set_fault(Fault::FailAfter(0));
        let r = b.flush().await;
        assert_eq!(r.err().map(|e| e.errno()), Some(libc::EIO));
        dev.set_fault(Fault::None);
        assert_eq!(b.num_allocated_clusters(), 1);
        let got = b.read(0, IoBuf::new(CLUSTER as usize, 4096)).await.unwrap();
        assert_eq!(&got[..], &secret(CLUSTER as usize)[..]);
        let n = bs.free_clusters();
        thick_claims_read_zeroes(&bs, n, "after a failed commit").await;
        b.flush().await.unwrap();
        b.close().await.unwrap();
        bs.unload().await.unwrap();
        let bs = Blobstore::load(dev.clone(), opts(ClearMethod::Unmap))
            .await
            .unwrap();
        assert_eq!(
            read_all(&bs, thin).await[..CLUSTER as usize],
            secret(CLUSTER as usize)[..]
        );
    });
}

/// A first write whose data write fails returns EIO and gives its cluster back.
#[test]
fn a_thin_write_whose_data_write_failed_allocates_nothing() {
    block_on(async {
        let (dev, bs) = unmap_store(64).await;
        let thin = create(&bs, clusters(2).thin()).await;
        let b = bs.open_blob(thin).await.unwrap();
        let free = bs.free_clusters();
        dev.set_fault(Fault::FailAfter(0));
        let r = b.write(0, secret(CLUSTER as usize)).await;
        assert_eq!(r.err().map(|e| e.errno()), Some(libc::EIO));
        dev.set_fault(Fault::None);
        assert_eq!(b.num_allocated_clusters(), 0);
        assert_eq!(bs.free_clusters(), free);
        b.close().await.unwrap();
        thick_claims_read_zeroes(&bs, free, "after a failed thin allocation").await;
    });
}

/// Every blob with its parent and bytes.
async fn listing(bs: &Blobstore) -> BTreeMap<BlobId, (u64, Parent, bool, Vec<u8>)> {
    let mut m = BTreeMap::new();
    for id in bs.blob_ids() {
        let b = bs.open_blob(id).await.unwrap();
        let n = b.num_clusters() * u64::from(CLUSTER);
        let d = b.read(0, IoBuf::new(n as usize, 4096)).await.unwrap();
        m.insert(id, (b.num_clusters(), b.parent(), b.is_thin(), d.to_vec()));
        b.close().await.unwrap();
    }
    m
}

/// Runs `op` with every write after the k-th failing, for k = 0..limit; then checks the
/// store unloads (no leaked open), and that a reload shows exactly what memory showed.
fn sweep<F>(
    what: &str,
    limit: u64,
    setup: fn(&Blobstore) -> futures::future::BoxFuture<'_, Vec<BlobId>>,
    op: F,
) where
    F: for<'a> Fn(
        &'a Blobstore,
        &'a [BlobId],
    ) -> futures::future::BoxFuture<'a, blobstore::Result<()>>,
{
    block_on(async {
        let mut completed = false;
        for k in 0..limit {
            let (dev, bs) = unmap_store(128).await;
            let ids = setup(&bs).await;
            dev.set_fault(Fault::FailAfter(k));
            let r = op(&bs, &ids).await;
            dev.set_fault(Fault::None);
            if let Err(e) = &r {
                assert_eq!(e.errno(), libc::EIO, "{what} fail after {k}: {e}");
            } else {
                completed = true;
            }
            assert_eq!(
                bs.open_blobs_count(),
                0,
                "{what} fail after {k}: open leaked"
            );
            let mem = listing(&bs).await;
            bs.unload()
                .await
                .unwrap_or_else(|e| panic!("{what} fail after {k}: unload: {e}"));
            let bs = Blobstore::load(dev.clone(), opts(ClearMethod::Unmap))
                .await
                .unwrap();
            let disk = listing(&bs).await;
            assert_eq!(
                mem.keys().collect::<Vec<_>>(),
                disk.keys().collect::<Vec<_>>(),
                "{what} fail after {k} ({r:?}): blobs in memory vs after reload"
            );
            for (id, v) in &mem {
                let d = &disk[id];
                assert!(
                    v.0 == d.0 && v.1 == d.1 && v.2 == d.2 && v.3 == d.3,
                    "{what} fail after {k} ({r:?}): blob {id:#x} in memory {:?} vs disk {:?}",
                    (v.0, &v.1, v.2),
                    (d.0, &d.1, d.2)
                );
            }
            let what = format!("{what} fail after {k}: check after reload and unload");
            unload_and_check_for(&dev, bs, &what).await;
        }
        assert!(completed, "{what}: no fault point let the operation finish");
    });
}

fn one_blob(bs: &Blobstore) -> futures::future::BoxFuture<'_, Vec<BlobId>> {
    Box::pin(async move {
        let id = thick(bs, 2, ClearMethod::Default).await;
        write_secret(bs, id).await;
        vec![id]
    })
}

fn clone_of_snapshot(bs: &Blobstore) -> futures::future::BoxFuture<'_, Vec<BlobId>> {
    Box::pin(async move {
        let id = create(bs, clusters(3).thin()).await;
        let b = bs.open_blob(id).await.unwrap();
        b.write(LPC, secret(CLUSTER as usize)).await.unwrap();
        b.close().await.unwrap();
        let s = bs.create_snapshot(id, vec![]).await.unwrap();
        let s2 = bs.create_snapshot(id, vec![]).await.unwrap();
        let b = bs.open_blob(id).await.unwrap();
        b.write(0, secret(BLK as usize)).await.unwrap();
        b.close().await.unwrap();
        vec![id, s, s2]
    })
}

#[test]
fn failed_snapshot_releases_its_opens_and_rolls_back() {
    // The brief's repro first: 2 clusters, FailAfter(2), EIO, then unload must work.
    block_on(async {
        let (dev, bs) = unmap_store(128).await;
        let id = one_blob(&bs).await[0];
        let before = bs.blob_ids();
        dev.set_fault(Fault::FailAfter(2));
        let r = bs.create_snapshot(id, vec![]).await;
        dev.set_fault(Fault::None);
        assert_eq!(r.err().map(|e| e.errno()), Some(libc::EIO));
        assert_eq!(bs.blob_ids(), before);
        let b = bs.open_blob(id).await.unwrap();
        assert_eq!(b.parent(), Parent::None);
        assert!(!b.is_thin());
        b.close().await.unwrap();
        bs.unload().await.unwrap();
    });
    sweep("snapshot", 8, one_blob, |bs, ids| {
        Box::pin(async move { bs.create_snapshot(ids[0], vec![]).await.map(|_| ()) })
    });
}

#[test]
fn failed_inflate_and_decouple_roll_back() {
    sweep("inflate", 8, clone_of_snapshot, |bs, ids| {
        Box::pin(async move { bs.inflate_blob(ids[0]).await })
    });
    sweep("decouple", 8, clone_of_snapshot, |bs, ids| {
        Box::pin(async move { bs.decouple_parent(ids[0]).await })
    });
}

#[test]
fn failed_clone_and_delete_leave_memory_matching_disk() {
    sweep("clone", 6, clone_of_snapshot, |bs, ids| {
        Box::pin(async move { bs.create_clone(ids[1], vec![]).await.map(|_| ()) })
    });
    sweep("delete merge", 8, clone_of_snapshot, |bs, ids| {
        Box::pin(async move { bs.delete_blob(ids[2]).await })
    });
}

#[test]
fn failed_resize_sync_restores_the_old_size() {
    for grow in [true, false] {
        sweep("resize", 4, one_blob, move |bs, ids| {
            Box::pin(async move {
                let b = bs.open_blob(ids[0]).await?;
                let r = async {
                    b.resize(if grow { 4 } else { 1 }).await?;
                    b.sync_md().await
                }
                .await;
                let c = b.close().await;
                r.and(c)
            })
        });
    }
    // Direct check of the in-memory size and free count.
    block_on(async {
        let (dev, bs) = unmap_store(128).await;
        let id = one_blob(&bs).await[0];
        let free = bs.free_clusters();
        let b = bs.open_blob(id).await.unwrap();
        // A resize is durable when it returns, so its md write fails inside it.
        dev.set_fault(Fault::FailAfter(0));
        assert_eq!(b.resize(4).await.err().map(|e| e.errno()), Some(libc::EIO));
        dev.set_fault(Fault::None);
        assert_eq!(b.num_clusters(), 2);
        assert_eq!(bs.free_clusters(), free);
        dev.set_fault(Fault::FailAfter(0));
        assert_eq!(b.resize(1).await.err().map(|e| e.errno()), Some(libc::EIO));
        dev.set_fault(Fault::None);
        assert_eq!(b.num_clusters(), 2);
        assert_eq!(bs.free_clusters(), free);
        let d = b
            .read(0, IoBuf::new(2 * CLUSTER as usize, 4096))
            .await
            .unwrap();
        assert_eq!(&d[..], &secret(2 * CLUSTER as usize)[..]);
        b.close().await.unwrap();
        let bs = reload(&dev, bs, opts(ClearMethod::Unmap)).await;
        assert_eq!(bs.free_clusters(), free);
        bs.unload().await.unwrap();
    });
}

#[test]
fn failed_set_parent_keeps_the_old_parent() {
    sweep("set_parent", 4, clone_of_snapshot, |bs, ids| {
        Box::pin(async move { bs.set_parent(ids[0], ids[1]).await })
    });
}
