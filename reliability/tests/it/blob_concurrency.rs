//! Concurrency (issue 9 part 2): operations issued at the same time on the same store and
//! blob, interleaved at every I/O (the device yields to the executor on each request), and
//! on a thread pool. Each operation succeeds or fails with a clear errno; nothing panics or
//! hangs (every test runs under a timeout) and no data is lost.

use std::sync::Arc;

use blobstore::testing::MemBsDev;
use blobstore::{inspect, BlobId, BlobOpts, Blobstore, BsDev, BsOpts, IoBuf};
use futures::executor::block_on;
use futures::task::SpawnExt;
use test_support::prelude::*;

const BLK: usize = 4096;
const CLUSTER: usize = 16384;
const LPC: u64 = 4;

fn opts() -> BsOpts {
    BsOpts {
        cluster_size: CLUSTER as u32,
        ..Default::default()
    }
}

async fn store() -> (Arc<MemBsDev>, Blobstore) {
    let dev = MemBsDev::new(BLK as u32, 512);
    let bs = Blobstore::init(dev.clone(), opts()).await.unwrap();
    dev.set_yield(true);
    (dev, bs)
}

/// A thick blob of `clusters` clusters filled with `byte`, and a snapshot of it.
async fn snapshotted_blob(bs: &Blobstore, clusters: u64, byte: u8) -> (BlobId, BlobId) {
    let id = new_blob(bs, clusters, false).await;
    let data = vec![byte; clusters as usize * CLUSTER];
    write_blob(bs, id, 0, &data).await.unwrap();
    (id, bs.create_snapshot(id, vec![]).await.unwrap())
}

async fn consistent(dev: &Arc<MemBsDev>, bs: &Blobstore) {
    let copy = MemBsDev::from_bytes(BLK as u32, dev.snapshot());
    let rep = inspect::check(copy.clone()).await.unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    assert_eq!(
        bs.total_clusters() - bs.free_clusters(),
        rep.used_clusters,
        "leak"
    );
    let bs2 = Blobstore::load(copy.clone(), opts()).await.unwrap();
    bs2.unload().await.unwrap();
    let rep = inspect::check(copy).await.unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

/// Runs `test` on a new store under a 60 s timeout, then checks that the store is consistent.
fn on_store<F, Fut>(test: F)
where
    F: FnOnce(Blobstore) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    with_timeout(60, move || {
        block_on(async {
            let (dev, bs) = store().await;
            test(bs.clone()).await;
            consistent(&dev, &bs).await;
        })
    });
}

fn allowed(e: &blobstore::BsError, ok: &[i32]) {
    assert!(
        ok.contains(&e.errno()),
        "unexpected error {e} (errno {})",
        e.errno()
    );
}

#[test]
fn io_while_the_blob_is_snapshotted() {
    on_store(|bs| async move {
        let id = new_blob(&bs, 4, true).await;
        let b = bs.open_blob(id).await.unwrap();
        let writes = async {
            for i in 0..16u64 {
                b.write(i, IoBuf::from_slice(&[i as u8 + 1; BLK], BLK))
                    .await
                    .unwrap();
            }
        };
        let snaps = async {
            let mut v = Vec::new();
            for _ in 0..3 {
                v.push(bs.create_snapshot(id, vec![]).await.unwrap());
            }
            v
        };
        let ((), snaps) = futures::join!(writes, snaps);
        b.close().await.unwrap();
        // Every acknowledged write is in the blob.
        let d = read_blob(&bs, id).await;
        for i in 0..16usize {
            assert!(
                d[i * BLK..(i + 1) * BLK].iter().all(|&x| x == i as u8 + 1),
                "block {i}"
            );
        }
        // Each snapshot holds, per block, the old (zero) or the new data.
        for s in snaps {
            let d = read_blob(&bs, s).await;
            for i in 0..16usize {
                let blk = &d[i * BLK..(i + 1) * BLK];
                assert!(blk.iter().all(|&x| x == 0) || blk.iter().all(|&x| x == i as u8 + 1));
            }
        }
    });
}

#[test]
fn two_decouples_at_once() {
    on_store(|bs| async move {
        let (_, s) = snapshotted_blob(&bs, 4, 5).await;
        let c = bs.create_clone(s, vec![]).await.unwrap();
        let (r1, r2) = futures::join!(bs.decouple_parent(c), bs.decouple_parent(c));
        let oks = [&r1, &r2].iter().filter(|r| r.is_ok()).count();
        for r in [&r1, &r2] {
            if let Err(e) = r {
                allowed(e, &[libc::EBUSY, libc::EINVAL, libc::EAGAIN]);
            }
        }
        assert!(oks >= 1, "{r1:?} {r2:?}");
        assert_eq!(read_blob(&bs, c).await, vec![5; 4 * CLUSTER]);
        assert!(bs.clones_of(s).iter().all(|&x| x != c));
    });
}

#[test]
fn delete_while_a_clone_is_made() {
    on_store(|bs| async move {
        let (id, s) = snapshotted_blob(&bs, 2, 7).await;
        let (clone, del) = futures::join!(bs.create_clone(s, vec![]), bs.delete_blob(s));
        match (&clone, &del) {
            (Ok(c), Err(e)) => {
                allowed(e, &[libc::EBUSY, libc::EPERM]);
                assert_eq!(read_blob(&bs, *c).await, vec![7; 2 * CLUSTER]);
            }
            (Err(e), Ok(())) => allowed(e, &[libc::ENOENT, libc::EBUSY]),
            (Ok(c), Ok(())) => {
                // The delete merged the snapshot into its (then single) clone: both the
                // original and the new clone still read the data.
                assert_eq!(read_blob(&bs, *c).await, vec![7; 2 * CLUSTER]);
            }
            (Err(a), Err(b)) => panic!("both failed: {a} / {b}"),
        }
        assert_eq!(read_blob(&bs, id).await, vec![7; 2 * CLUSTER]);
    });
}

#[test]
fn hot_remove_of_the_esnap_base_during_copy_on_write() {
    with_timeout(60, || {
        block_on(async {
            let (dev, bs0) = store().await;
            drop(bs0);
            let base = MemBsDev::read_only(BLK as u32, vec![0x42; 8 * CLUSTER]);
            base.set_yield(true);
            let id = {
                let bs = Blobstore::load(dev.clone(), opts()).await.unwrap();
                let id = bs
                    .create_blob(BlobOpts {
                        num_clusters: 8,
                        thin: true,
                        esnap_id: Some(b"base".to_vec()),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                bs.unload().await.unwrap();
                id
            };
            struct F(Arc<MemBsDev>);
            #[async_trait::async_trait]
            impl blobstore::EsnapDevFactory for F {
                async fn create(
                    &self,
                    _: BlobId,
                    _: &[u8],
                ) -> blobstore::Result<Option<Arc<dyn BsDev>>> {
                    Ok(Some(self.0.clone() as Arc<dyn BsDev>))
                }
            }
            let o = BsOpts {
                esnap_factory: Some(Arc::new(F(base.clone()))),
                ..opts()
            };
            let bs = Blobstore::load(dev.clone(), o).await.unwrap();
            let b = bs.open_blob(id).await.unwrap();
            let free0 = bs.free_clusters();
            let writes = async {
                let mut res = Vec::new();
                for c in 0..8u64 {
                    // Partial-cluster writes: each needs a copy from the base.
                    res.push(
                        b.write(c * LPC + 1, IoBuf::from_slice(&[c as u8; BLK], BLK))
                            .await
                            .map(|_| ()),
                    );
                }
                res
            };
            let remove = async {
                for _ in 0..6 {
                    futures::future::ready(()).await;
                    blobstore::testing::yield_now().await;
                }
                b.set_esnap_dev(None).await
            };
            let (res, rm) = futures::join!(writes, remove);
            rm.unwrap();
            let mut done = 0;
            for (c, r) in res.iter().enumerate() {
                match r {
                    Ok(()) => {
                        done += 1;
                        assert!(b.is_cluster_allocated(c as u64));
                        let d = b
                            .read(c as u64 * LPC, IoBuf::new(CLUSTER, BLK))
                            .await
                            .unwrap();
                        assert!(
                            d[..BLK].iter().all(|&x| x == 0x42),
                            "copied part of cluster {c}"
                        );
                        assert!(
                            d[BLK..2 * BLK].iter().all(|&x| x == c as u8),
                            "written part of {c}"
                        );
                    }
                    Err(e) => {
                        allowed(e, &[libc::EIO, libc::ENODEV]);
                        assert!(
                            !b.is_cluster_allocated(c as u64),
                            "failed copy-on-write left cluster {c}"
                        );
                    }
                }
            }
            assert_eq!(
                free0 - bs.free_clusters(),
                done,
                "clusters used vs writes done"
            );
            b.close().await.unwrap();
            consistent(&dev, &bs).await;
        })
    });
}

#[test]
fn unload_with_io_in_flight() {
    with_timeout(60, || {
        block_on(async {
            let (dev, bs) = store().await;
            let id = new_blob(&bs, 4, true).await;
            let b = bs.open_blob(id).await.unwrap();
            let writes = async {
                let mut ok = Vec::new();
                for i in 0..16u64 {
                    if b.write(i, IoBuf::from_slice(&[i as u8 + 1; BLK], BLK))
                        .await
                        .is_ok()
                    {
                        ok.push(i);
                    }
                }
                ok
            };
            let (ok, un) = futures::join!(writes, bs.unload());
            // The blob is open: the unload must refuse (EBUSY) rather than cut the writes.
            allowed(&un.unwrap_err(), &[libc::EBUSY]);
            assert_eq!(ok.len(), 16);
            b.close().await.unwrap();
            bs.unload().await.unwrap();
            let bs = Blobstore::load(dev.clone(), opts()).await.unwrap();
            let d = read_blob(&bs, id).await;
            for i in ok {
                let i = i as usize;
                assert!(d[i * BLK..(i + 1) * BLK].iter().all(|&x| x == i as u8 + 1));
            }
        })
    });
}

#[test]
fn many_writers_and_snapshots_on_a_thread_pool() {
    with_timeout(90, || {
        let pool = futures::executor::ThreadPool::builder()
            .pool_size(4)
            .create()
            .unwrap();
        let (dev, bs) = block_on(store());
        let ids: Vec<BlobId> = block_on(async {
            let mut v = Vec::new();
            for _ in 0..4 {
                v.push(new_blob(&bs, 4, true).await);
            }
            v
        });
        let mut handles = Vec::new();
        for (n, &id) in ids.iter().enumerate() {
            let bs = bs.clone();
            handles.push(
                pool.spawn_with_handle(async move {
                    let b = bs.open_blob(id).await.unwrap();
                    for i in 0..16u64 {
                        b.write(
                            i,
                            IoBuf::from_slice(&[(n * 16) as u8 + i as u8 + 1; BLK], BLK),
                        )
                        .await
                        .unwrap();
                        if i % 5 == 0 {
                            bs.create_snapshot(id, vec![]).await.unwrap();
                        }
                    }
                    b.close().await.unwrap();
                })
                .unwrap(),
            );
        }
        block_on(futures::future::join_all(handles));
        block_on(async {
            for (n, &id) in ids.iter().enumerate() {
                let d = read_blob(&bs, id).await;
                for i in 0..16usize {
                    assert!(d[i * BLK..(i + 1) * BLK]
                        .iter()
                        .all(|&x| x == (n * 16 + i) as u8 + 1));
                }
            }
            consistent(&dev, &bs).await;
        });
    });
}
