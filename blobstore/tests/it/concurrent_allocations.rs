//! Parallel I/O: allocations of the same cluster never double-allocate, writes racing a
//! snapshot or a resize land whole, threads share one store.

use std::sync::Arc;

use blobstore::testing::{CrashPlan, MemBsDev};
use blobstore::{Blob, Blobstore, BsOpts, DirectTarget, IoBuf};
use futures::executor::block_on;
use futures::future::join_all;
use test_support::prelude::*;

fn blk(i: u64) -> IoBuf {
    let mut b = IoBuf::new(4096, 4096);
    b.fill((i % 200) as u8 + 1);
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

/// A 64 MiB store with one thin blob of 4 clusters, open; the device yields on every I/O.
async fn yielding_thin_blob() -> (Arc<MemBsDev>, Blobstore, Blob) {
    let (d, bs) = mem_store(4096, 16384, BsOpts::default()).await;
    let id = create(&bs, clusters(4).thin()).await;
    let b = bs.open_blob(id).await.unwrap();
    d.set_yield(true);
    (d, bs, b)
}

#[test]
fn same_cluster_allocated_once() {
    block_on(async {
        let (d, bs, b) = yielding_thin_blob().await;
        let free = bs.free_clusters();
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
        unload_and_check(&d, bs).await;
    });
}

#[test]
fn writes_racing_a_snapshot_land_whole() {
    block_on(async {
        let (d, bs, b) = yielding_thin_blob().await;
        let id = b.id();
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
        unload_and_check(&d, bs).await;
    });
}

#[test]
fn threads_share_one_store() {
    let (d, bs) = block_on(mem_store(4096, 16384, BsOpts::default()));
    let ids: Vec<_> = (0..4)
        .map(|_| block_on(create(&bs, clusters(8).thin())))
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
        unload_and_check(&d, bs).await;
    });
}

/// Group commit: N concurrent first writes, to clusters of one blob and of two blobs, share
/// commits. Each allocation alone costs a data write, a `PreCommit` flush and an extent-page
/// write; together they need far fewer flushes and metadata writes than N, and every byte
/// reads back after a client flush and a reload.
#[test]
fn concurrent_allocations_share_commits() {
    block_on(async {
        const N: u64 = 16;
        let d = MemBsDev::write_back(4096, 16384); // 64 MiB, 1 MiB clusters
        let bs = init_store(&d, BsOpts::default()).await;
        let mut blobs = Vec::new();
        for _ in 0..2 {
            let id = create(&bs, clusters(2 * N).thin()).await;
            let b = bs.open_blob(id).await.unwrap();
            // The first allocation creates the extent page; the ones measured rewrite it.
            b.write(0, blk(0)).await.unwrap();
            b.flush().await.unwrap();
            blobs.push(b);
        }
        let lpc = 256; // 4 KiB blocks per 1 MiB cluster
                       // (blob, block): clusters 1..=N of blob 0, then N/2 of each blob.
        let rounds: [Vec<(usize, u64)>; 2] = [
            (1..=N).map(|c| (0, c * lpc + c)).collect(),
            (0..N)
                .map(|i| ((i % 2) as usize, (N + 1 + i / 2) * lpc + 3))
                .collect(),
        ];
        d.set_yield(true);
        for round in &rounds {
            let (w0, f0) = (d.writes(), d.flushes());
            let futs = round.iter().map(|&(bi, off)| {
                let b = blobs[bi].clone();
                async move { b.write(off, blk(off)).await.map(|_| ()) }
            });
            for r in join_all(futs).await {
                r.unwrap();
            }
            let md_writes = d.writes() - w0 - N; // minus one data write per cluster
            let flushes = d.flushes() - f0;
            eprintln!("{N} concurrent allocations: {flushes} flushes, {md_writes} md writes");
            assert!(
                flushes < N / 2 && md_writes < N / 2,
                "{N} concurrent allocations took {flushes} flushes and {md_writes} md writes"
            );
            blobs[0].flush().await.unwrap();
        }
        d.set_yield(false);
        // What a power cut after the client flush leaves (every unflushed write lost).
        let image = d.crash_image(CrashPlan::LoseAll);
        let ids: Vec<_> = blobs.iter().map(|b| b.id()).collect();
        for (b, n) in blobs.into_iter().zip([1 + N + N / 2, 1 + N / 2]) {
            assert_eq!(b.num_allocated_clusters(), n);
            b.close().await.unwrap();
        }
        let copy = MemBsDev::from_bytes(4096, image);
        let bs2 = Blobstore::load(copy, BsOpts::default()).await.unwrap();
        for round in &rounds {
            for &(bi, off) in round {
                let b = bs2.open_blob(ids[bi]).await.unwrap();
                let got = b.read(off, IoBuf::new(4096, 4096)).await.unwrap();
                assert_eq!(&got[..], &blk(off)[..], "blob {bi} block {off}");
                b.close().await.unwrap();
            }
        }
    });
}

/// A first write returns once its cluster's data is written and the in-memory map names it:
/// no metadata write, no flush. From then on the cluster goes direct (`Blob::direct`) like
/// any allocated one, and a later failed commit (the client's flush) does not take it away:
/// the same device LBA, the bytes still there. The next flush commits it.
#[test]
fn a_first_write_is_direct_at_once_and_a_failed_commit_keeps_it() {
    block_on(async {
        let (d, _bs, b) = yielding_thin_blob().await;
        let (w0, f0) = (d.writes(), d.flushes());
        b.write(0, blk(0)).await.unwrap();
        assert_eq!(
            d.writes() - w0,
            1,
            "the first write wrote more than its cluster"
        );
        assert_eq!(d.flushes() - f0, 0, "the first write flushed");
        let lba = match b.direct(8, 4096, true).as_ref().map(|x| x.target()) {
            Some(DirectTarget::Dev(lba)) => lba,
            _ => panic!("the written cluster does not go direct"),
        };
        d.set_fault(blobstore::testing::Fault::FailAfter(0));
        assert!(b.flush().await.is_err(), "the commit's writes failed");
        d.set_fault(blobstore::testing::Fault::None);
        match b.direct(8, 4096, true).as_ref().map(|x| x.target()) {
            Some(DirectTarget::Dev(l)) => assert_eq!(l, lba, "the cluster moved"),
            _ => panic!("a failed commit took the cluster away"),
        }
        let r = b.read(0, IoBuf::new(4096, 4096)).await.unwrap();
        assert_eq!(&r[..], &blk(0)[..]);
        let w1 = d.writes();
        b.flush().await.unwrap();
        assert!(
            d.writes() > w1,
            "the next flush did not commit the allocation"
        );
    });
}
