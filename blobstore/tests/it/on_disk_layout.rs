//! Encodings less common in SPDK's own images: RLE extents, multi-page chains, blobs with
//! several extent pages, shrink freeing extent pages, grow, 512-byte io units.

use std::sync::Arc;

use blobstore::inspect::{self, Descriptor};
use blobstore::testing::MemBsDev;
use blobstore::{BlobId, Blobstore, BsOpts, IoBuf};
use futures::executor::block_on;
use test_support::prelude::*;

const C16K: u32 = 16384;

fn opts16k() -> BsOpts {
    BsOpts {
        cluster_size: C16K,
        ..Default::default()
    }
}

/// Unloads `bs`, checks the store and loads it again.
async fn reload(d: &Arc<MemBsDev>, bs: Blobstore, o: BsOpts) -> Blobstore {
    unload_and_check(d, bs).await;
    Blobstore::load(d.clone(), o).await.unwrap()
}

/// The RLE extents of blob `id` in image `img`.
fn rle_extents(img: &[u8], id: BlobId) -> Vec<(u32, u32)> {
    descriptors(img, id)
        .into_iter()
        .find_map(|d| match d {
            Descriptor::ExtentRle(r) => Some(r),
            _ => None,
        })
        .unwrap()
}

fn pat(i: u64, bl: usize) -> Vec<u8> {
    let mut v = vec![(i % 250) as u8 + 1; bl];
    v[..8].copy_from_slice(&i.to_le_bytes());
    v
}

async fn write_blocks(bs: &Blobstore, id: BlobId, blocks: &[u64]) {
    let b = bs.open_blob(id).await.unwrap();
    let bl = bs.io_unit_size() as usize;
    for &i in blocks {
        b.write(i, IoBuf::from_slice(&pat(i, bl), 4096))
            .await
            .unwrap();
    }
    b.close().await.unwrap();
}

async fn check_blocks(bs: &Blobstore, id: BlobId, blocks: &[u64], zero: &[u64]) {
    let b = bs.open_blob(id).await.unwrap();
    let bl = bs.io_unit_size() as usize;
    for &i in blocks {
        let r = b.read(i, IoBuf::new(bl, 4096)).await.unwrap();
        assert_eq!(&r[..], &pat(i, bl)[..], "block {i}");
    }
    for &i in zero {
        let r = b.read(i, IoBuf::new(bl, 4096)).await.unwrap();
        assert!(r.iter().all(|&x| x == 0), "block {i} not zero");
    }
    b.close().await.unwrap();
}

fn descriptors(img: &[u8], id: BlobId) -> Vec<Descriptor> {
    let sb = inspect::parse_super(&img[..4096]).unwrap();
    let ms = sb.md_start as usize;
    let mut p = (id as u32) as usize;
    let mut out = Vec::new();
    loop {
        let pg = inspect::parse_md_page(&img[(ms + p) * 4096..][..4096]).unwrap();
        assert!(pg.crc_ok);
        out.extend(pg.descriptors.clone());
        if pg.next == u32::MAX {
            return out;
        }
        p = pg.next as usize;
    }
}

#[test]
fn rle_blobs_thick_and_thin() {
    block_on(async {
        let (d, bs) = mem_store(4096, 1024, opts16k()).await;
        let thick = create(&bs, clusters(10).rle()).await;
        let thin = create(&bs, clusters(10).thin().rle()).await;
        write_blocks(&bs, thick, &[0, 17, 39]).await;
        write_blocks(&bs, thin, &[5, 21, 38]).await;
        let snap = bs.create_snapshot(thin, vec![]).await.unwrap();
        write_blocks(&bs, thin, &[22]).await;
        let bs = reload(&d, bs, opts16k()).await;
        let img = d.snapshot();
        let rle = rle_extents(&img, thin);
        assert_eq!(rle.iter().map(|r| r.1).sum::<u32>(), 10);
        let thick_rle = rle_extents(&img, thick);
        assert_eq!(thick_rle.len(), 1, "contiguous clusters merge into one run");
        check_blocks(&bs, thick, &[0, 17, 39], &[1, 16]).await;
        check_blocks(&bs, thin, &[5, 21, 22, 38], &[0, 23, 39]).await;
        check_blocks(&bs, snap, &[5, 21, 38], &[22]).await;
        // Dirty reload rebuilds the same masks from RLE descriptors.
        let free = bs.free_clusters();
        drop(bs);
        let bs = Blobstore::load(d.clone(), opts16k()).await.unwrap();
        assert_eq!(bs.free_clusters(), free);
        bs.delete_blob(thick).await.unwrap();
        let _ = reload(&d, bs, opts16k()).await;
    });
}

#[test]
fn many_extent_pages_and_shrink() {
    block_on(async {
        // 64 MiB of 16 KiB clusters: 4096 clusters, so blobs can span several extent pages.
        let (d, bs) = mem_store(4096, 16384, opts16k()).await;
        let big = create(&bs, clusters(1300)).await;
        let thin = create(&bs, clusters(2000).thin()).await;
        let blocks: Vec<u64> = vec![0, 4 * 511 + 3, 4 * 512, 4 * 1100, 4 * 1299 + 3];
        write_blocks(&bs, big, &blocks).await;
        let tb: Vec<u64> = vec![4 * 1600, 4 * 3];
        write_blocks(&bs, thin, &tb).await;
        let bs = reload(&d, bs, opts16k()).await;
        let img = d.snapshot();
        let table = descriptors(&img, thin)
            .into_iter()
            .find_map(|d| match d {
                Descriptor::ExtentTable {
                    num_clusters,
                    entries,
                } => Some((num_clusters, entries)),
                _ => None,
            })
            .unwrap();
        assert_eq!(table.0, 2000);
        // Pages for chunks 0 and 3, a run of two unallocated chunk pages between.
        assert_eq!(table.1.len(), 3);
        assert_eq!(table.1[1], (0, 2));
        check_blocks(&bs, big, &blocks, &[1]).await;
        check_blocks(&bs, thin, &tb, &[4 * 700]).await;
        let pages_before = inspect::check(d.clone()).await.unwrap().used_md_pages;
        let b = bs.open_blob(big).await.unwrap();
        let free = bs.free_clusters();
        b.resize(100).await.unwrap();
        b.sync_md().await.unwrap();
        assert_eq!(bs.free_clusters(), free + 1200);
        b.resize(600).await.unwrap();
        b.sync_md().await.unwrap();
        b.close().await.unwrap();
        let bs = reload(&d, bs, opts16k()).await;
        let r = inspect::check(d.clone()).await.unwrap();
        let img = d.snapshot();
        let et = descriptors(&img, big)
            .into_iter()
            .find_map(|d| match d {
                Descriptor::ExtentTable { entries, .. } => Some(entries),
                _ => None,
            })
            .unwrap();
        assert_eq!(et.len(), 2, "two extent pages for 600 clusters");
        assert_eq!(
            r.used_md_pages,
            pages_before - 1,
            "one extent page fewer than at 1300"
        );
        check_blocks(&bs, big, &[0], &[]).await;
        // Dirty reload agrees.
        let free = bs.free_clusters();
        drop(bs);
        let bs = Blobstore::load(d.clone(), opts16k()).await.unwrap();
        assert_eq!(bs.free_clusters(), free);
    });
}

#[test]
fn long_md_chains() {
    block_on(async {
        let (d, bs) = mem_store(4096, 4096, BsOpts::default()).await;
        let x: Vec<(String, Vec<u8>)> = (0..12)
            .map(|i| (format!("attr{i}"), vec![i as u8; 1500]))
            .collect();
        let o = x.iter().fold(clusters(2), |o, (k, v)| o.xattr(k, v));
        let id = create(&bs, o).await;
        let bs = reload(&d, bs, BsOpts::default()).await;
        let h = bs.open_blob(id).await.unwrap();
        for (k, v) in &x {
            assert_eq!(&h.get_xattr(k).unwrap(), v);
        }
        // Shrinking the chain frees its continuation pages.
        for (k, _) in &x[2..] {
            h.remove_xattr(k).unwrap();
        }
        h.sync_md().await.unwrap();
        h.close().await.unwrap();
        let bs = reload(&d, bs, BsOpts::default()).await;
        let r = inspect::check(d.clone()).await.unwrap();
        assert_eq!(r.used_md_pages, 2, "root and one extent page");
        drop(bs);
    });
}

#[test]
fn grow_store() {
    block_on(async {
        let (d, bs) = mem_store(4096, 16 * 256, BsOpts::default()).await;
        let id = create(&bs, clusters(2)).await;
        let total = bs.total_clusters();
        assert_eq!(total, 16);
        assert!(bs.max_growable_size() >= 32 << 20);
        d.resize(32 * 256);
        bs.grow().await.unwrap();
        assert_eq!(bs.total_clusters(), 32);
        let big = create(&bs, clusters(20)).await;
        let bs = reload(&d, bs, BsOpts::default()).await;
        assert_eq!(bs.total_clusters(), 32);
        let h = bs.open_blob(big).await.unwrap();
        assert_eq!(h.num_allocated_clusters(), 20);
        h.close().await.unwrap();
        bs.open_blob(id).await.unwrap().close().await.unwrap();
        // A device that shrank: ENOSPC, nothing changes.
        d.resize(20 * 256);
        assert_eq!(bs.grow().await.unwrap_err().errno(), libc::ENOSPC);
        assert_eq!(bs.total_clusters(), 32);
    });
}

#[test]
fn io_unit_512() {
    block_on(async {
        let (d, bs) = mem_store(512, 8 * 2048, opts16k()).await;
        assert_eq!(bs.io_unit_size(), 512);
        let t = create(&bs, clusters(8).thin()).await;
        write_blocks(&bs, t, &[0, 1, 31, 32, 100]).await;
        let s = bs.create_snapshot(t, vec![]).await.unwrap();
        let c = bs.create_clone(s, vec![]).await.unwrap();
        write_blocks(&bs, c, &[33]).await;
        let bs = reload(&d, bs, opts16k()).await;
        check_blocks(&bs, t, &[0, 1, 31, 32, 100], &[2, 99]).await;
        check_blocks(&bs, c, &[0, 1, 31, 32, 33, 100], &[34]).await;
        let h = bs.open_blob(c).await.unwrap();
        h.write_zeroes(32, 2).await.unwrap();
        h.unmap(100, 1).await.unwrap();
        let r = h.read(31, IoBuf::new(512 * 3, 512)).await.unwrap();
        assert_eq!(&r[..512], &pat(31, 512)[..]);
        assert!(r[512..].iter().all(|&x| x == 0));
        h.close().await.unwrap();
        let _ = reload(&d, bs, opts16k()).await;
    });
}

#[test]
fn version_2_store_without_blobid_mask() {
    block_on(async {
        let (d, bs) = mem_store(4096, 4096, BsOpts::default()).await;
        let a = create(&bs, clusters(2)).await;
        write_blocks(&bs, a, &[3]).await;
        bs.unload().await.unwrap();
        let mut img = d.snapshot();
        img[8..12].copy_from_slice(&2u32.to_le_bytes());
        img[72..80].fill(0);
        let c = crc32c::crc32c(&img[..4092]);
        img[4092..4096].copy_from_slice(&c.to_le_bytes());
        let d = MemBsDev::from_bytes(4096, img);
        for _ in 0..2 {
            let bs = Blobstore::load(d.clone(), BsOpts::default()).await.unwrap();
            assert_eq!(bs.blob_ids(), vec![a]);
            check_blocks(&bs, a, &[3], &[4]).await;
            bs.unload().await.unwrap();
            let sb = inspect::parse_super(&d.snapshot()[..4096]).unwrap();
            assert_eq!((sb.version, sb.used_blobid_mask_len, sb.clean), (2, 0, 1));
        }
    });
}
