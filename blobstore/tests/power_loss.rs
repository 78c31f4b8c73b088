//! Power-loss sweep (issue 3 part 5): for every operation, drop every write after the k-th
//! for every k, reload dirty and check the store loads, nothing is leaked or owned twice,
//! relations are whole and every blob reads its before or after data.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use blobstore::testing::{Fault, MemBsDev};
use blobstore::{inspect, BlobId, BlobOpts, Blobstore, BsOpts, IoBuf, Parent};
use futures::executor::block_on;

const BLK: u32 = 4096;
const CLUSTER: u32 = 16384;

type Op = for<'a> fn(&'a Blobstore, &'a [BlobId]) -> Pin<Box<dyn Future<Output = ()> + 'a>>;
type Setup = for<'a> fn(&'a Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + 'a>>;

struct Base;

#[async_trait::async_trait]
impl blobstore::EsnapDevFactory for Base {
    async fn create(
        &self,
        _b: BlobId,
        _id: &[u8],
    ) -> blobstore::Result<Option<Arc<dyn blobstore::BsDev>>> {
        static DEV: std::sync::OnceLock<Arc<MemBsDev>> = std::sync::OnceLock::new();
        let d = DEV.get_or_init(|| {
            let v: Vec<u8> = (0..8 * CLUSTER as usize)
                .map(|i| (i / 4096 + 0x80) as u8)
                .collect();
            MemBsDev::read_only(BLK, v)
        });
        Ok(Some(d.clone() as Arc<dyn blobstore::BsDev>))
    }
}

fn opts() -> BsOpts {
    BsOpts {
        cluster_size: CLUSTER,
        esnap_factory: Some(Arc::new(Base)),
        ..Default::default()
    }
}

async fn fill(bs: &Blobstore, id: BlobId, cluster: u64, byte: u8) {
    let b = bs.open_blob(id).await.unwrap();
    let lpc = u64::from(CLUSTER / BLK);
    let mut buf = IoBuf::new(BLK as usize, 4096);
    buf.fill(byte);
    b.write(cluster * lpc + 1, buf).await.unwrap();
    b.close().await.unwrap();
}

/// Content and parent of every blob.
async fn state(bs: &Blobstore) -> BTreeMap<BlobId, (Vec<u8>, Parent)> {
    let mut m = BTreeMap::new();
    for id in bs.blob_ids() {
        let b = bs.open_blob(id).await.unwrap();
        let n = b.num_io_units() as usize * BLK as usize;
        let d = b.read(0, IoBuf::new(n, 4096)).await.unwrap().to_vec();
        m.insert(id, (d, b.parent()));
        b.close().await.unwrap();
    }
    m
}

async fn fresh(setup: Setup) -> (Arc<MemBsDev>, Blobstore, Vec<BlobId>) {
    let dev = MemBsDev::new(BLK, 256); // 1 MiB, 64 clusters of 16 KiB
    let bs = Blobstore::init(dev.clone(), opts()).await.unwrap();
    let ids = setup(&bs).await;
    // Start from a clean store so the dirty-marking write is part of every sweep.
    bs.unload().await.unwrap();
    let bs = Blobstore::load(dev.clone(), opts()).await.unwrap();
    (dev, bs, ids)
}

fn sweep(name: &str, setup: Setup, op: Op) {
    block_on(async {
        // Reference run.
        let (dev, bs, ids) = fresh(setup).await;
        let before = state(&bs).await;
        dev.set_fault(Fault::None);
        op(&bs, &ids).await;
        let total = dev.writes();
        let after = state(&bs).await;
        assert!(total > 0, "{name}: operation wrote nothing");
        eprintln!("{name}: {total} writes swept");
        for k in 0..=total {
            let (dev, bs, ids) = fresh(setup).await;
            dev.set_fault(Fault::DropAfter(k));
            op(&bs, &ids).await;
            drop(bs);
            let img = MemBsDev::from_bytes(BLK, dev.snapshot());
            let bs = Blobstore::load(img.clone(), opts())
                .await
                .unwrap_or_else(|e| panic!("{name}: k={k}: load failed: {e}"));
            let now = state(&bs).await;
            for (id, (data, parent)) in &now {
                let b = before.get(id);
                let a = after.get(id);
                let ok_b = b.is_some_and(|(d, p)| d == data && p == parent);
                let ok_a = a.is_some_and(|(d, p)| d == data && p == parent);
                assert!(
                    ok_b || ok_a,
                    "{name}: k={k}: blob {id:#x} is neither before nor after (parent {parent:?})"
                );
            }
            // Blobs of the before state that vanished must be gone in the after state too,
            // and the other way round.
            let all_before = before.keys().all(|id| now.contains_key(id));
            let all_after = after.keys().all(|id| now.contains_key(id));
            assert!(
                all_before
                    || all_after
                    || now
                        .keys()
                        .all(|id| before.contains_key(id) || after.contains_key(id)),
                "{name}: k={k}: blob set {:x?} matches neither side",
                now.keys().collect::<Vec<_>>()
            );
            for id in before.keys().filter(|id| !after.contains_key(id)) {
                // Deleted by the op: either still fully there, or gone.
                let _ = id;
            }
            bs.unload().await.unwrap();
            let rep = inspect::check(img.clone()).await.unwrap();
            assert!(rep.problems.is_empty(), "{name}: k={k}: {:?}", rep.problems);
        }
        // Failing writes (EIO) must not panic, and a reload is still consistent.
        for k in (0..=total).step_by(((total / 6) as usize).max(1)) {
            let (dev, bs, ids) = fresh(setup).await;
            dev.set_fault(Fault::FailAfter(k));
            let _ =
                futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(op(&bs, &ids))).await;
            drop(bs);
            let img = MemBsDev::from_bytes(BLK, dev.snapshot());
            let bs = Blobstore::load(img.clone(), opts()).await.unwrap();
            bs.unload().await.unwrap();
            let rep = inspect::check(img).await.unwrap();
            assert!(
                rep.problems.is_empty(),
                "{name}: fail k={k}: {:?}",
                rep.problems
            );
        }
    });
}

fn setup_thin(bs: &Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + '_>> {
    Box::pin(async move {
        let id = bs
            .create_blob(BlobOpts {
                num_clusters: 4,
                thin: true,
                xattrs: vec![("name".into(), b"t\0".to_vec())],
                ..Default::default()
            })
            .await
            .unwrap();
        fill(bs, id, 0, 0x11).await;
        fill(bs, id, 2, 0x22).await;
        let thick = bs
            .create_blob(BlobOpts {
                num_clusters: 2,
                ..Default::default()
            })
            .await
            .unwrap();
        fill(bs, thick, 1, 0x33).await;
        vec![id, thick]
    })
}

/// thin blob T with snapshot S (T is S's only clone); T overwrote cluster 2.
fn setup_chain(bs: &Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + '_>> {
    Box::pin(async move {
        let ids = setup_thin(bs).await;
        let s = bs.create_snapshot(ids[0], vec![]).await.unwrap();
        fill(bs, ids[0], 2, 0x44).await;
        fill(bs, ids[0], 3, 0x55).await;
        vec![ids[0], s]
    })
}

/// S0 <- S1 <- T.
fn setup_chain2(bs: &Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + '_>> {
    Box::pin(async move {
        let ids = setup_chain(bs).await;
        let s1 = bs.create_snapshot(ids[0], vec![]).await.unwrap();
        fill(bs, ids[0], 1, 0x66).await;
        vec![ids[0], ids[1], s1]
    })
}

#[test]
fn power_loss_thin_allocation() {
    sweep("thin allocation", setup_thin, |bs, ids| {
        Box::pin(async move {
            let b = bs.open_blob(ids[0]).await.unwrap();
            let mut buf = IoBuf::new(BLK as usize, 4096);
            buf.fill(0x77);
            let _ = b.write(3 * u64::from(CLUSTER / BLK), buf).await;
            let _ = b.close().await;
        })
    });
}

#[test]
fn power_loss_xattr_sync() {
    sweep("xattr sync", setup_thin, |bs, ids| {
        Box::pin(async move {
            let b = bs.open_blob(ids[0]).await.unwrap();
            b.set_xattr("big", &vec![7u8; 3000]).unwrap();
            b.set_xattr("big2", &vec![8u8; 3000]).unwrap();
            let _ = b.sync_md().await;
            let _ = b.close().await;
        })
    });
}

#[test]
fn power_loss_resize() {
    sweep("resize", setup_thin, |bs, ids| {
        Box::pin(async move {
            let b = bs.open_blob(ids[1]).await.unwrap();
            let _ = b.resize(5).await;
            let _ = b.sync_md().await;
            let _ = b.close().await;
            let b = bs.open_blob(ids[0]).await.unwrap();
            let _ = b.resize(1).await;
            let _ = b.sync_md().await;
            let _ = b.close().await;
        })
    });
}

#[test]
fn power_loss_snapshot_create() {
    sweep("snapshot create", setup_thin, |bs, ids| {
        Box::pin(async move {
            let _ = bs
                .create_snapshot(ids[0], vec![("name".into(), b"s\0".to_vec())])
                .await;
        })
    });
}

#[test]
fn power_loss_snapshot_of_thick() {
    sweep("snapshot of thick", setup_thin, |bs, ids| {
        Box::pin(async move {
            let _ = bs.create_snapshot(ids[1], vec![]).await;
        })
    });
}

#[test]
fn power_loss_clone() {
    sweep("clone", setup_chain, |bs, ids| {
        Box::pin(async move {
            let _ = bs
                .create_clone(ids[1], vec![("name".into(), b"c\0".to_vec())])
                .await;
        })
    });
}

#[test]
fn power_loss_snapshot_delete() {
    sweep("snapshot delete", setup_chain, |bs, ids| {
        Box::pin(async move {
            let _ = bs.delete_blob(ids[1]).await;
        })
    });
}

#[test]
fn power_loss_middle_snapshot_delete() {
    sweep("middle snapshot delete", setup_chain2, |bs, ids| {
        Box::pin(async move {
            let _ = bs.delete_blob(ids[2]).await;
        })
    });
}

#[test]
fn power_loss_inflate() {
    sweep("inflate", setup_chain, |bs, ids| {
        Box::pin(async move {
            let _ = bs.inflate_blob(ids[0]).await;
        })
    });
}

#[test]
fn power_loss_decouple() {
    sweep("decouple", setup_chain2, |bs, ids| {
        Box::pin(async move {
            let _ = bs.decouple_parent(ids[0]).await;
        })
    });
}

#[test]
fn power_loss_delete() {
    sweep("delete", setup_thin, |bs, ids| {
        Box::pin(async move {
            let _ = bs.delete_blob(ids[0]).await;
            let _ = bs.delete_blob(ids[1]).await;
        })
    });
}

#[test]
fn power_loss_unmap_release() {
    sweep("unmap release", setup_thin, |bs, ids| {
        Box::pin(async move {
            let b = bs.open_blob(ids[0]).await.unwrap();
            let _ = b.unmap(0, u64::from(CLUSTER / BLK)).await;
            let _ = b.close().await;
        })
    });
}

/// setup_thin plus a thin blob that never allocated (no extent page yet).
fn setup_unallocated(bs: &Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + '_>> {
    Box::pin(async move {
        let mut ids = setup_thin(bs).await;
        let id = bs
            .create_blob(BlobOpts {
                num_clusters: 3,
                thin: true,
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push(id);
        ids
    })
}

#[test]
fn power_loss_first_allocation_new_extent_page() {
    sweep("first allocation", setup_unallocated, |bs, ids| {
        Box::pin(async move {
            let b = bs.open_blob(ids[2]).await.unwrap();
            let mut buf = IoBuf::new(BLK as usize, 4096);
            buf.fill(0x42);
            let _ = b.write(1, buf).await;
            let _ = b.close().await;
        })
    });
}

/// An esnap clone with one copied-on-write cluster, and a thick blob.
fn setup_esnap(bs: &Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + '_>> {
    Box::pin(async move {
        let e = bs
            .create_blob(BlobOpts {
                num_clusters: 4,
                esnap_id: Some(b"base".to_vec()),
                ..Default::default()
            })
            .await
            .unwrap();
        fill(bs, e, 1, 0x31).await;
        vec![e]
    })
}

/// setup_esnap, then a snapshot of the esnap clone (which takes the link) and one more write.
fn setup_esnap_snap(bs: &Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + '_>> {
    Box::pin(async move {
        let mut ids = setup_esnap(bs).await;
        let s = bs.create_snapshot(ids[0], vec![]).await.unwrap();
        fill(bs, ids[0], 2, 0x32).await;
        ids.push(s);
        ids
    })
}

#[test]
fn power_loss_esnap_snapshot_create() {
    sweep("esnap snapshot create", setup_esnap, |bs, ids| {
        Box::pin(async move {
            let _ = bs.create_snapshot(ids[0], vec![]).await;
        })
    });
}

#[test]
fn power_loss_esnap_snapshot_delete() {
    sweep("esnap snapshot delete", setup_esnap_snap, |bs, ids| {
        Box::pin(async move {
            let _ = bs.delete_blob(ids[1]).await;
        })
    });
}

#[test]
fn power_loss_esnap_inflate() {
    sweep("esnap inflate", setup_esnap, |bs, ids| {
        Box::pin(async move {
            let _ = bs.inflate_blob(ids[0]).await;
        })
    });
}
