//! Parallel I/O: allocations of the same cluster never double-allocate, writes racing a
//! snapshot or a resize land whole, threads share one store.

use blobstore::testing::MemBsDev;
use blobstore::{BlobOpts, Blobstore, BsOpts, IoBuf};
use futures::executor::block_on;
use futures::future::join_all;

fn blk(i: u64) -> IoBuf {
    let mut b = IoBuf::new(4096, 4096);
    b.fill((i % 200) as u8 + 1);
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

#[test]
fn same_cluster_allocated_once() {
    block_on(async {
        let d = MemBsDev::new(4096, 16384);
        let bs = Blobstore::init(d.clone(), BsOpts::default()).await.unwrap();
        let id = bs
            .create_blob(BlobOpts {
                num_clusters: 4,
                thin: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let b = bs.open_blob(id).await.unwrap();
        let free = bs.free_clusters();
        d.set_yield(true);
        let blocks: Vec<u64> = (0..32).map(|i| i * 7 % 256).chain(300..310).collect();
        let futs = blocks.iter().map(|&i| {
            let b = b.clone();
            async move { b.write(i, blk(i)).await.map(|_| ()) }
        });
        for r in join_all(futs).await {
            r.unwrap();
        }
        assert_eq!(b.num_allocated_clusters(), 2);
        assert_eq!(bs.free_clusters(), free - 2);
        for &i in &blocks {
            let r = b.read(i, IoBuf::new(4096, 4096)).await.unwrap();
            assert_eq!(&r[..], &blk(i)[..], "block {i}");
        }
        b.close().await.unwrap();
        bs.unload().await.unwrap();
        let rep = blobstore::inspect::check(d).await.unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    });
}

#[test]
fn writes_racing_a_snapshot_land_whole() {
    block_on(async {
        let d = MemBsDev::new(4096, 16384);
        let bs = Blobstore::init(d.clone(), BsOpts::default()).await.unwrap();
        let id = bs
            .create_blob(BlobOpts {
                num_clusters: 4,
                thin: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let b = bs.open_blob(id).await.unwrap();
        d.set_yield(true);
        let writes = join_all((0..40u64).map(|i| {
            let b = b.clone();
            async move { b.write(i * 20, blk(i)).await.map(|_| ()) }
        }));
        let (w, s) = futures::join!(writes, bs.create_snapshot(id, vec![]));
        let s = s.unwrap();
        for r in w {
            r.unwrap();
        }
        let hs = bs.open_blob(s).await.unwrap();
        for i in 0..40u64 {
            let r = b.read(i * 20, IoBuf::new(4096, 4096)).await.unwrap();
            assert_eq!(&r[..], &blk(i)[..]);
            // The snapshot holds either the block or zeroes, never a torn mix.
            let r = hs.read(i * 20, IoBuf::new(4096, 4096)).await.unwrap();
            assert!(r[..] == blk(i)[..] || r.iter().all(|&x| x == 0));
        }
        hs.close().await.unwrap();
        b.close().await.unwrap();
        bs.unload().await.unwrap();
        let rep = blobstore::inspect::check(d).await.unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    });
}

#[test]
fn threads_share_one_store() {
    let d = MemBsDev::new(4096, 16384);
    let bs = block_on(Blobstore::init(d.clone(), BsOpts::default())).unwrap();
    let ids: Vec<_> = (0..4)
        .map(|_| {
            block_on(bs.create_blob(BlobOpts {
                num_clusters: 8,
                thin: true,
                ..Default::default()
            }))
            .unwrap()
        })
        .collect();
    let hs: Vec<_> = ids
        .iter()
        .map(|&id| {
            let bs = bs.clone();
            std::thread::spawn(move || {
                block_on(async {
                    let b = bs.open_blob(id).await.unwrap();
                    for i in 0..64u64 {
                        b.write(i * 29 % 2048, blk(i + id)).await.unwrap();
                    }
                    b.set_xattr("done", b"1").unwrap();
                    b.close().await.unwrap();
                })
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    block_on(async {
        for &id in &ids {
            let b = bs.open_blob(id).await.unwrap();
            for i in 0..64u64 {
                let r = b.read(i * 29 % 2048, IoBuf::new(4096, 4096)).await.unwrap();
                assert_eq!(&r[..], &blk(i + id)[..]);
            }
            assert_eq!(b.get_xattr("done").unwrap(), b"1");
            b.close().await.unwrap();
        }
        bs.unload().await.unwrap();
        let rep = blobstore::inspect::check(d).await.unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    });
}
