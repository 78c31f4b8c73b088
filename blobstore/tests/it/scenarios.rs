//! Acceptance scenarios A-01 .. A-29 (library level), on an in-memory device.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use blobstore::testing::MemBsDev;
use blobstore::{
    Blob, BlobId, BlobOpts, Blobstore, BsDev, BsOpts, ClearMethod, EsnapDevFactory, IoBuf, Parent,
    Result, BLOBID_INVALID,
};
use futures::executor::block_on;
use test_support::prelude::*;

const MIB: u64 = 1 << 20;

fn dev64(bl: u32) -> Arc<MemBsDev> {
    MemBsDev::new(bl, 64 * MIB / u64::from(bl))
}

fn bstype(s: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..s.len()].copy_from_slice(s.as_bytes());
    b
}

async fn fx() -> (Arc<MemBsDev>, Blobstore) {
    let d = dev64(4096);
    let bs = Blobstore::init(d.clone(), BsOpts::default()).await.unwrap();
    (d, bs)
}

/// [`fx`] with one blob of `n` clusters (thin or thick).
async fn fx_blob(thin: bool, n: u64) -> (Arc<MemBsDev>, Blobstore, BlobId) {
    let (d, bs) = fx().await;
    let id = new_blob(&bs, n, thin).await;
    (d, bs, id)
}

/// [`fx`], its free cluster count, and a blob made empty (thin or thick), opened and
/// resized to `n` clusters.
async fn fx_resized(thin: bool, n: u64) -> (Blobstore, Blob, u64) {
    let (_d, bs) = fx().await;
    let free = bs.free_clusters();
    let id = new_blob(&bs, 0, thin).await;
    let b = bs.open_blob(id).await.unwrap();
    b.resize(n).await.unwrap();
    (bs, b, free)
}

/// Runs `test` on [`fx_blob`]`(thin, n)`.
fn with_blob<F: Future<Output = ()>>(
    thin: bool,
    n: u64,
    test: impl FnOnce(Arc<MemBsDev>, Blobstore, BlobId) -> F,
) {
    block_on(async {
        let (d, bs, id) = fx_blob(thin, n).await;
        test(d, bs, id).await
    })
}

/// Runs `test` on [`fx_resized`]`(thin, n)`.
fn with_resized<F: Future<Output = ()>>(
    thin: bool,
    n: u64,
    test: impl FnOnce(Blobstore, Blob, u64) -> F,
) {
    block_on(async {
        let (bs, b, free) = fx_resized(thin, n).await;
        test(bs, b, free).await
    })
}

async fn reload(d: &Arc<MemBsDev>, bs: Blobstore) -> Blobstore {
    bs.unload().await.unwrap();
    Blobstore::load(d.clone(), BsOpts::default()).await.unwrap()
}

async fn dirty_reload(d: &Arc<MemBsDev>, bs: Blobstore) -> Blobstore {
    drop(bs);
    Blobstore::load(d.clone(), BsOpts::default()).await.unwrap()
}

fn errno<T>(r: Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.errno(),
    }
}

fn filled(len: usize, b: u8) -> IoBuf {
    let mut x = IoBuf::new(len, 4096);
    x.fill(b);
    x
}

async fn thick(bs: &Blobstore, n: u64) -> BlobId {
    new_blob(bs, n, false).await
}

async fn thin(bs: &Blobstore, n: u64) -> BlobId {
    new_blob(bs, n, true).await
}

/// Writes `byte` over io units [off, off+len) of blob `id`.
async fn wr(bs: &Blobstore, id: BlobId, off: u64, len: u64, byte: u8) {
    let b = bs.open_blob(id).await.unwrap();
    b.write(off, filled(len as usize * 4096, byte))
        .await
        .unwrap();
    b.close().await.unwrap();
}

/// [`wr`], then a snapshot of the blob.
async fn wr_snap(bs: &Blobstore, id: BlobId, off: u64, len: u64, byte: u8) -> BlobId {
    wr(bs, id, off, len, byte).await;
    bs.create_snapshot(id, vec![]).await.unwrap()
}

async fn rd(bs: &Blobstore, id: BlobId, off: u64, len: u64) -> Vec<u8> {
    let b = bs.open_blob(id).await.unwrap();
    let r = b
        .read(off, IoBuf::new(len as usize * 4096, 4096))
        .await
        .unwrap();
    b.close().await.unwrap();
    r.to_vec()
}

fn all(v: &[u8], b: u8) -> bool {
    v.iter().all(|&x| x == b)
}

#[test]
fn a01_init_unload_load_roundtrip() {
    block_on(async {
        let bad = MemBsDev::new(500, 1000);
        assert_eq!(
            errno(Blobstore::init(bad, BsOpts::default()).await),
            libc::EINVAL
        );
        let d = dev64(4096);
        let o = BsOpts {
            bstype: bstype("TESTTYPE"),
            ..Default::default()
        };
        let bs = Blobstore::init(d.clone(), o.clone()).await.unwrap();
        let id = bs.create_blob(BlobOpts::default()).await.unwrap();
        let b = bs.open_blob(id).await.unwrap();
        b.set_xattr("name", b"test").unwrap();
        b.resize(10).await.unwrap();
        b.close().await.unwrap();
        bs.unload().await.unwrap();
        let sb = blobstore::inspect::parse_super(&d.snapshot()[..4096]).unwrap();
        assert_eq!(sb.clean, 1);
        let other = BsOpts {
            bstype: bstype("OTHER"),
            ..Default::default()
        };
        assert_ne!(errno(Blobstore::load(d.clone(), other).await), 0);
        let bs = Blobstore::load(d.clone(), BsOpts::default()).await.unwrap();
        bs.unload().await.unwrap();
        let bs = Blobstore::load(d.clone(), o).await.unwrap();
        let b = bs.open_blob(id).await.unwrap();
        assert_eq!(b.get_xattr("name").unwrap(), b"test");
        assert_eq!(b.num_clusters(), 10);
        assert_eq!(errno(b.get_xattr("foobar")), libc::ENOENT);
        assert_eq!(errno(bs.open_blob(0).await), libc::ENOENT);
        assert_eq!(errno(bs.open_blob(id & 0xFFFF_FFFF).await), libc::ENOENT);
        b.close().await.unwrap();
        bs.unload().await.unwrap();
        let mut img = d.snapshot();
        img[100] ^= 0xFF;
        let d2 = MemBsDev::from_bytes(4096, img);
        assert_eq!(
            errno(Blobstore::load(d2, BsOpts::default()).await),
            libc::EILSEQ
        );
    });
}

#[test]
fn a02_super_blob() {
    block_on(async {
        let (d, bs) = fx().await;
        assert_eq!(bs.super_blob(), None);
        let b = thin(&bs, 1).await;
        bs.set_super_blob(b).await.unwrap();
        assert_eq!(bs.super_blob(), Some(b));
        let bs = reload(&d, bs).await;
        assert_eq!(bs.super_blob(), Some(b));
        let bs = dirty_reload(&d, bs).await;
        assert_eq!(bs.super_blob(), Some(b));
    });
}

#[test]
fn a03_unload_busy_while_open() {
    with_blob(true, 1, |_d, bs, id| async move {
        let b = bs.open_blob(id).await.unwrap();
        assert_eq!(errno(bs.unload().await), libc::EBUSY);
        assert_eq!(errno(bs.destroy().await), libc::EBUSY);
        b.write(0, filled(4096, 1)).await.unwrap();
        b.close().await.unwrap();
        bs.unload().await.unwrap();
        // A device that fails during unload: the error is reported and the store is gone.
        let (d, bs) = fx().await;
        d.set_fault(blobstore::testing::Fault::FailAfter(0));
        assert_eq!(errno(bs.unload().await), libc::EIO);
        assert_ne!(errno(bs.create_blob(BlobOpts::default()).await), 0);
    });
}

#[test]
fn a04_cluster_size_validation() {
    block_on(async {
        let with = |c: u32| BsOpts {
            cluster_size: c,
            ..Default::default()
        };
        assert_eq!(
            errno(Blobstore::init(dev64(4096), with(4096)).await),
            libc::ENOMEM
        );
        assert_eq!(
            errno(Blobstore::init(dev64(4096), with(4095)).await),
            libc::EINVAL
        );
        let d = dev64(4096);
        let bs = Blobstore::init(d.clone(), with(2 * MIB as u32))
            .await
            .unwrap();
        let n = bs.total_data_clusters();
        let bs = reload(&d, bs).await;
        assert_eq!(bs.cluster_size(), 2 * MIB as u32);
        assert_eq!(bs.total_data_clusters(), n);
        // Smaller than one cluster.
        assert_eq!(
            errno(Blobstore::init(MemBsDev::new(4096, 16), BsOpts::default()).await),
            libc::ENOSPC
        );
    });
}

#[test]
fn a05_smaller_device_rejected_larger_accepted() {
    with_blob(false, 3, |d, bs, id| async move {
        wr(&bs, id, 5, 1, 0xAB).await;
        bs.unload().await.unwrap();
        let img = d.snapshot();
        let small = MemBsDev::from_bytes(4096, img[..img.len() - 4096].to_vec());
        assert_eq!(
            errno(Blobstore::load(small, BsOpts::default()).await),
            libc::EILSEQ
        );
        let mut big = img.clone();
        big.resize(img.len() + 8 * MIB as usize, 0);
        let big = MemBsDev::from_bytes(4096, big);
        let bs = Blobstore::load(big, BsOpts::default()).await.unwrap();
        assert!(all(&rd(&bs, id, 5, 1).await, 0xAB));
    });
}

#[test]
fn a06_create_sizes_enospc_open_delete_iterate() {
    block_on(async {
        let (_d, bs) = fx().await;
        assert!(bs.blob_ids().is_empty());
        let a = thick(&bs, 10).await;
        let b = thick(&bs, 0).await;
        let c = bs.create_blob(BlobOpts::default()).await.unwrap();
        for (id, n) in [(a, 10), (b, 0), (c, 0)] {
            let h = bs.open_blob(id).await.unwrap();
            assert_eq!((h.num_clusters(), h.num_allocated_clusters()), (n, n));
            h.close().await.unwrap();
        }
        let total = bs.total_clusters();
        assert_eq!(
            errno(
                bs.create_blob(BlobOpts {
                    num_clusters: total + 1,
                    ..Default::default()
                })
                .await
            ),
            libc::ENOSPC
        );
        let h1 = bs.open_blob(a).await.unwrap();
        let h2 = bs.open_blob(a).await.unwrap();
        assert_eq!(h1.id(), h2.id());
        h1.close().await.unwrap();
        h2.close().await.unwrap();
        bs.delete_blob(b).await.unwrap();
        assert_eq!(errno(bs.open_blob(b).await), libc::ENOENT);
        assert_eq!(bs.blob_ids(), vec![a, c]);
    });
}

#[test]
fn a07_io_range_checks() {
    with_blob(false, 0, |_d, bs, id| async move {
        let b = bs.open_blob(id).await.unwrap();
        assert_eq!(errno(b.write(0, filled(4096, 1)).await), libc::EINVAL);
        assert_eq!(errno(b.read(0, IoBuf::new(4096, 4096)).await), libc::EINVAL);
        b.resize(5).await.unwrap();
        let n = b.num_io_units();
        assert_eq!(n, 5 * 256);
        assert_eq!(errno(b.write(n, filled(4096, 1)).await), libc::EINVAL);
        assert_eq!(
            errno(b.read(n - 1, IoBuf::new(8192, 4096)).await),
            libc::EINVAL
        );
        b.write(n - 2, filled(8192, 0x5A)).await.unwrap();
        let r = b.read(n - 2, IoBuf::new(8192, 4096)).await.unwrap();
        assert!(all(&r, 0x5A));
        // Across a cluster boundary.
        b.write(255, filled(8192, 0x6B)).await.unwrap();
        assert!(all(
            &b.read(255, IoBuf::new(8192, 4096)).await.unwrap(),
            0x6B
        ));
        b.close().await.unwrap();
    });
}

#[test]
fn a08_read_only_blob() {
    with_blob(false, 2, |d, bs, id| async move {
        let b = bs.open_blob(id).await.unwrap();
        b.set_read_only().unwrap();
        assert!(!b.is_read_only());
        b.sync_md().await.unwrap();
        assert!(b.is_read_only());
        assert_eq!(errno(b.write(0, filled(4096, 1)).await), libc::EPERM);
        assert_eq!(errno(b.writev(0, vec![filled(4096, 1)]).await), libc::EPERM);
        b.read(0, IoBuf::new(4096, 4096)).await.unwrap();
        assert_eq!(errno(b.resize(3).await), libc::EPERM);
        assert_eq!(errno(b.set_xattr("a", b"b")), libc::EPERM);
        b.close().await.unwrap();
        let b = bs.open_blob(id).await.unwrap();
        assert!(b.is_read_only());
        b.close().await.unwrap();
        let bs = reload(&d, bs).await;
        let b = bs.open_blob(id).await.unwrap();
        assert!(b.is_read_only());
        b.close().await.unwrap();
    });
}

#[test]
fn a09_public_xattrs() {
    block_on(async {
        let (d, bs) = fx().await;
        let pages0 = {
            bs.unload().await.unwrap();
            blobstore::inspect::check(d.clone())
                .await
                .unwrap()
                .used_md_pages
        };
        let bs = Blobstore::load(d.clone(), BsOpts::default()).await.unwrap();
        let id = thin(&bs, 1).await;
        let b = bs.open_blob(id).await.unwrap();
        b.set_xattr("name", b"log.txt\0").unwrap();
        b.set_xattr("length", &2345u64.to_le_bytes()).unwrap();
        b.set_xattr("length", &3456u64.to_le_bytes()).unwrap();
        assert_eq!(b.get_xattr("length").unwrap(), 3456u64.to_le_bytes());
        assert_eq!(errno(b.get_xattr("foobar")), libc::ENOENT);
        assert_eq!(
            b.xattr_names(),
            vec!["name".to_string(), "length".to_string()]
        );
        b.remove_xattr("name").unwrap();
        assert_eq!(errno(b.remove_xattr("foobar")), libc::ENOENT);
        assert_eq!(errno(b.set_xattr("big", &vec![0u8; 5000])), libc::ENOMEM);
        b.set_xattr("spill", &vec![9u8; 4000]).unwrap();
        b.sync_md().await.unwrap();
        b.close().await.unwrap();
        let bs = reload(&d, bs).await;
        let b = bs.open_blob(id).await.unwrap();
        assert_eq!(b.get_xattr("spill").unwrap(), vec![9u8; 4000]);
        b.close().await.unwrap();
        let c = bs
            .create_blob(BlobOpts {
                xattrs: vec![
                    ("a".into(), b"1".to_vec()),
                    ("bb".into(), b"22".to_vec()),
                    ("ccc".into(), b"333\0".to_vec()),
                ],
                ..Default::default()
            })
            .await
            .unwrap();
        let h = bs.open_blob(c).await.unwrap();
        assert_eq!(h.get_xattr("ccc").unwrap().len(), 4);
        h.close().await.unwrap();
        bs.delete_blob(id).await.unwrap();
        bs.delete_blob(c).await.unwrap();
        bs.unload().await.unwrap();
        let r = blobstore::inspect::check(d.clone()).await.unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.used_md_pages, pages0);
    });
}

#[test]
fn a10_internal_xattrs() {
    block_on(async {
        let (d, bs) = fx().await;
        let id = bs
            .create_blob(BlobOpts {
                internal_xattrs: vec![("internal".into(), 7898u64.to_le_bytes().to_vec())],
                ..Default::default()
            })
            .await
            .unwrap();
        let b = bs.open_blob(id).await.unwrap();
        assert_eq!(errno(b.get_xattr("internal")), libc::ENOENT);
        assert!(b.xattr_names().is_empty());
        b.close().await.unwrap();
        let bs = reload(&d, bs).await;
        let b = bs.open_blob(id).await.unwrap();
        assert_eq!(
            b.get_internal_xattr("internal").unwrap(),
            7898u64.to_le_bytes()
        );
        assert_eq!(errno(b.set_internal_xattr("SNAP", b"x")), libc::EINVAL);
        b.set_internal_xattr("other", b"v").unwrap();
        b.remove_internal_xattr("other").unwrap();
        assert_eq!(errno(b.remove_internal_xattr("other")), libc::ENOENT);
        b.close().await.unwrap();
        assert_eq!(bs.open_blobs_count(), 0);
        bs.unload().await.unwrap();
        // The INTERNAL_XATTR flag is on disk.
        let page = blobstore::inspect::parse_md_page(
            &d.snapshot()[4 * 4096 + 4096 * (id as u32) as usize..][..4096],
        )
        .unwrap();
        let inv = page
            .descriptors
            .iter()
            .find_map(|d| match d {
                blobstore::inspect::Descriptor::Flags { invalid, .. } => Some(*invalid),
                _ => None,
            })
            .unwrap();
        assert_ne!(inv & 0x2, 0);
    });
}

#[test]
fn a11_thick_resize() {
    with_resized(false, 5, |bs, b, free| async move {
        assert_eq!(bs.free_clusters(), free - 5);
        assert_eq!(b.num_allocated_clusters(), 5);
        // A resize is durable when it returns (unlike SPDK, where it waits for a sync), so
        // the clusters a shrink drops are free at once.
        b.resize(3).await.unwrap();
        assert_eq!(bs.free_clusters(), free - 3);
        assert_eq!(b.num_allocated_clusters(), 3);
        b.sync_md().await.unwrap();
        assert_eq!(bs.free_clusters(), free - 3);
        b.resize(10).await.unwrap();
        assert_eq!(bs.free_clusters(), free - 10);
        assert_eq!(errno(b.resize(bs.total_clusters() + 1).await), libc::ENOSPC);
        assert_eq!(b.num_clusters(), 10);
        b.close().await.unwrap();
    });
}

#[test]
fn a12_thin_provisioning() {
    with_resized(true, 5, |bs, b, free| async move {
        assert!(all(&b.read(0, IoBuf::new(40960, 4096)).await.unwrap(), 0));
        assert_eq!(b.num_allocated_clusters(), 0);
        b.write(0, filled(40960, 0xE5)).await.unwrap();
        assert_eq!(b.num_allocated_clusters(), 1);
        assert_eq!(bs.free_clusters(), free - 1);
        assert!(all(
            &b.read(0, IoBuf::new(40960, 4096)).await.unwrap(),
            0xE5
        ));
        // The rest of the new cluster reads zero.
        assert!(all(
            &b.read(10, IoBuf::new(4096 * 246, 4096)).await.unwrap(),
            0
        ));
        b.resize(1 << 20).await.unwrap();
        b.sync_md().await.unwrap();
        assert_eq!(bs.free_clusters(), free - 1);
        b.unmap(0, 256).await.unwrap();
        assert!(all(&b.read(0, IoBuf::new(40960, 4096)).await.unwrap(), 0));
        assert_eq!(bs.free_clusters(), free);
        b.close().await.unwrap();
    });
}

#[test]
fn a13_thin_shrink_releases_at_resize() {
    with_resized(true, 6, |bs, b, free| async move {
        assert_eq!(bs.free_clusters(), free);
        for c in [0u64, 2, 4, 5] {
            b.write(c * 256, filled(256 * 4096, c as u8 + 1))
                .await
                .unwrap();
        }
        assert_eq!(b.num_allocated_clusters(), 4);
        assert_eq!(bs.free_clusters(), free - 4);
        let c0 = b.read(0, IoBuf::new(512 * 4096, 4096)).await.unwrap();
        assert!(all(&c0[..MIB as usize], 1) && all(&c0[MIB as usize..], 0));
        b.resize(2).await.unwrap();
        assert_eq!((b.num_clusters(), b.num_allocated_clusters()), (2, 1));
        assert_eq!(bs.free_clusters(), free - 1);
        b.sync_md().await.unwrap();
        assert_eq!(bs.free_clusters(), free - 1);
        b.close().await.unwrap();
    });
}

#[test]
fn a14_thin_across_dirty_shutdown() {
    block_on(async {
        let d = dev64(4096);
        let o = BsOpts {
            bstype: bstype("TESTTYPE"),
            ..Default::default()
        };
        let bs = Blobstore::init(d.clone(), o.clone()).await.unwrap();
        let id = thin(&bs, 10).await;
        let free = bs.free_clusters();
        drop(bs);
        let bs = Blobstore::load(d.clone(), o).await.unwrap();
        let b = bs.open_blob(id).await.unwrap();
        assert!(b.is_thin());
        assert_eq!(b.num_allocated_clusters(), 0);
        assert_eq!(bs.free_clusters(), free);
        b.close().await.unwrap();
    });
}

#[test]
fn a15_snapshot_basics() {
    with_blob(false, 10, |_d, bs, b| async move {
        let s1 = bs.create_snapshot(b, vec![]).await.unwrap();
        let x: Vec<(String, Vec<u8>)> = (0..3)
            .map(|i| (format!("k{i}"), vec![i as u8 + 1; 3]))
            .collect();
        let s2 = bs.create_snapshot(b, x.clone()).await.unwrap();
        let h1 = bs.open_blob(s1).await.unwrap();
        assert!(h1.is_read_only() && !h1.is_clone());
        assert_eq!((h1.num_clusters(), h1.num_allocated_clusters()), (10, 10));
        assert!(!h1.is_thin(), "a snapshot of a thick blob is thick");
        let hb = bs.open_blob(b).await.unwrap();
        assert!(hb.is_thin() && hb.is_clone());
        assert_eq!(hb.num_allocated_clusters(), 0);
        let h2 = bs.open_blob(s2).await.unwrap();
        assert_eq!((h2.num_clusters(), h2.num_allocated_clusters()), (10, 0));
        assert!(h2.is_snapshot() && h2.is_clone());
        assert_eq!(h2.parent(), Parent::Snapshot(s1));
        for (k, v) in &x {
            assert_eq!(&h2.get_xattr(k).unwrap(), v);
        }
        assert_eq!(hb.parent(), Parent::Snapshot(s2));
        assert_eq!(bs.clones_of(s2), vec![b]);
        assert_eq!(bs.clones_of(s1), vec![s2]);
        assert_eq!(errno(bs.create_snapshot(s1, vec![]).await), libc::EINVAL);
        for h in [h1, hb, h2] {
            h.close().await.unwrap();
        }
        bs.delete_blob(b).await.unwrap();
        assert!(bs.clones_of(s2).is_empty());
        bs.delete_blob(s2).await.unwrap();
        assert_eq!(bs.blob_ids(), vec![s1]);
    });
}

#[test]
fn a16_snapshot_isolation() {
    with_blob(true, 5, |_d, bs, b| async move {
        let s = wr_snap(&bs, b, 0, 10, 0xE5).await;
        wr(&bs, b, 0, 10, 0xAA).await;
        assert!(all(&rd(&bs, b, 0, 10).await, 0xAA));
        assert!(all(&rd(&bs, s, 0, 10).await, 0xE5));
        // Copy-on-write kept the rest of the cluster.
        assert!(all(&rd(&bs, b, 10, 246).await, 0));
        let h = bs.open_blob(b).await.unwrap();
        assert_eq!(h.num_allocated_clusters(), 1);
        h.close().await.unwrap();
        let hs = bs.open_blob(s).await.unwrap();
        assert_eq!(errno(hs.write(0, filled(4096, 1)).await), libc::EPERM);
        hs.close().await.unwrap();
    });
}

#[test]
fn a17_clone_rules() {
    with_blob(false, 4, |_d, bs, b| async move {
        assert_eq!(errno(bs.create_clone(b, vec![]).await), libc::EINVAL);
        let s = bs.create_snapshot(b, vec![]).await.unwrap();
        let c = bs
            .create_clone(s, vec![("name".into(), b"c1".to_vec())])
            .await
            .unwrap();
        let h = bs.open_blob(c).await.unwrap();
        assert!(!h.is_read_only() && h.is_thin());
        assert_eq!((h.num_clusters(), h.num_allocated_clusters()), (4, 0));
        assert_eq!(h.get_xattr("name").unwrap(), b"c1");
        assert_eq!(h.parent(), Parent::Snapshot(s));
        h.close().await.unwrap();
        // Clone of a blob made read-only.
        let r = thin(&bs, 2).await;
        let rc = bs.create_clone(r, vec![]).await;
        assert_eq!(errno(rc), libc::EINVAL);
        let hr = bs.open_blob(b).await.unwrap();
        hr.set_read_only().unwrap();
        hr.sync_md().await.unwrap();
        hr.close().await.unwrap();
        let c2 = bs.create_clone(b, vec![]).await.unwrap();
        let hr = bs.open_blob(b).await.unwrap();
        assert!(hr.is_read_only() && hr.is_clone() && hr.is_snapshot());
        hr.close().await.unwrap();
        let h2 = bs.open_blob(c2).await.unwrap();
        assert_eq!(h2.parent(), Parent::Snapshot(b));
        h2.write(0, filled(4096, 3)).await.unwrap();
        h2.close().await.unwrap();
    });
}

#[test]
fn a18_snapshot_delete_rules() {
    with_blob(false, 10, |_d, bs, b| async move {
        let s = wr_snap(&bs, b, 0, 2560, 0x11).await;
        let c2 = bs.create_clone(s, vec![]).await.unwrap();
        assert_eq!(errno(bs.delete_blob(s).await), libc::EBUSY);
        bs.delete_blob(c2).await.unwrap();
        let hs = bs.open_blob(s).await.unwrap();
        assert_eq!(errno(bs.delete_blob(s).await), libc::EBUSY);
        hs.close().await.unwrap();
        wr(&bs, b, 256, 1, 0x22).await;
        let free = bs.free_clusters();
        bs.delete_blob(s).await.unwrap();
        // The clone overwrote one cluster: only that one of S's is freed.
        assert_eq!(bs.free_clusters(), free + 1);
        let h = bs.open_blob(b).await.unwrap();
        assert_eq!(h.num_allocated_clusters(), 10);
        assert!(!h.is_clone());
        assert_eq!(h.parent(), Parent::Zeroes);
        h.close().await.unwrap();
        let d = rd(&bs, b, 0, 2560).await;
        assert!(all(&d[..256 * 4096], 0x11));
        assert!(all(&d[256 * 4096..257 * 4096], 0x22));
        assert!(all(&d[257 * 4096..], 0x11));
        // Middle of a chain S1 <- S2 <- L: L and S1 unchanged.
        let l = thin(&bs, 3).await;
        let s1 = wr_snap(&bs, l, 0, 1, 0xA1).await;
        let s2 = wr_snap(&bs, l, 256, 1, 0xA2).await;
        wr(&bs, l, 512, 1, 0xA3).await;
        bs.delete_blob(s2).await.unwrap();
        assert_eq!(bs.clones_of(s1), vec![l]);
        let dl = rd(&bs, l, 0, 768).await;
        assert!(all(&dl[..4096], 0xA1) && all(&dl[256 * 4096..257 * 4096], 0xA2));
        assert!(all(&dl[512 * 4096..513 * 4096], 0xA3));
        assert!(all(&rd(&bs, s1, 0, 1).await, 0xA1));
        assert!(all(&rd(&bs, s1, 256, 1).await, 0));
    });
}

#[test]
fn a19_relations_survive_reload() {
    with_blob(false, 2, |d, bs, b| async move {
        let snap = bs.create_snapshot(b, vec![]).await.unwrap();
        let snap2 = bs.create_snapshot(b, vec![]).await.unwrap();
        let clone = bs.create_clone(snap2, vec![]).await.unwrap();
        let clone2 = bs.create_clone(snap, vec![]).await.unwrap();
        let before: Vec<_> = [snap, snap2, b, clone]
            .iter()
            .map(|&i| bs.clones_of(i))
            .collect();
        let bs = reload(&d, bs).await;
        let after: Vec<_> = [snap, snap2, b, clone]
            .iter()
            .map(|&i| bs.clones_of(i))
            .collect();
        assert_eq!(before, after);
        let h = bs.open_blob(clone).await.unwrap();
        assert_eq!(h.parent(), Parent::Snapshot(snap2));
        h.close().await.unwrap();
        assert_ne!(errno(bs.delete_blob(snap2).await), 0);
        assert_ne!(errno(bs.delete_blob(snap).await), 0);
        bs.delete_blob(clone).await.unwrap();
        bs.delete_blob(clone2).await.unwrap();
        bs.delete_blob(b).await.unwrap();
        bs.delete_blob(snap2).await.unwrap();
        bs.delete_blob(snap).await.unwrap();
        assert!(bs.blob_ids().is_empty());
    });
}

/// The 5-cluster pre of blob_ut `_blob_inflate_rw`: snapshot (0-3 = X), snapshot2 (1,3 = Y),
/// blob (1 = Z).
async fn inflate_pre(bs: &Blobstore) -> (BlobId, BlobId, BlobId) {
    let b = thin(bs, 5).await;
    wr(bs, b, 0, 1024, b'X').await;
    let s = bs.create_snapshot(b, vec![]).await.unwrap();
    wr(bs, b, 256, 256, b'Y').await;
    wr(bs, b, 768, 256, b'Y').await;
    let s2 = bs.create_snapshot(b, vec![]).await.unwrap();
    wr(bs, b, 256, 256, b'Z').await;
    (b, s, s2)
}

async fn check_xzxy0(bs: &Blobstore, b: BlobId) {
    let d = rd(bs, b, 0, 1280).await;
    let c = |i: usize| &d[i * MIB as usize..(i + 1) * MIB as usize];
    assert!(all(c(0), b'X') && all(c(1), b'Z') && all(c(2), b'X'));
    assert!(all(c(3), b'Y') && all(c(4), 0));
}

#[test]
fn a20_inflate() {
    block_on(async {
        let (_d, bs) = fx().await;
        let (b, s, s2) = inflate_pre(&bs).await;
        let free = bs.free_clusters();
        bs.inflate_blob(b).await.unwrap();
        assert_eq!(free - bs.free_clusters(), 4);
        let h = bs.open_blob(b).await.unwrap();
        assert!(!h.is_thin());
        assert_eq!(h.parent(), Parent::None);
        h.close().await.unwrap();
        assert!(bs.clones_of(s2).is_empty());
        check_xzxy0(&bs, b).await;
        bs.delete_blob(s2).await.unwrap();
        bs.delete_blob(s).await.unwrap();
        check_xzxy0(&bs, b).await;
        let t = thin(&bs, 10).await;
        bs.inflate_blob(t).await.unwrap();
        let h = bs.open_blob(t).await.unwrap();
        assert!(!h.is_thin());
        assert_eq!(h.num_allocated_clusters(), 10);
        h.close().await.unwrap();
    });
}

#[test]
fn a21_decouple_parent() {
    with_blob(true, 2, |_d, bs, lone| async move {
        assert_ne!(errno(bs.decouple_parent(lone).await), 0);
        let (b, s, s2) = inflate_pre(&bs).await;
        let free = bs.free_clusters();
        bs.decouple_parent(b).await.unwrap();
        assert_eq!(free - bs.free_clusters(), 1);
        let h = bs.open_blob(b).await.unwrap();
        assert!(h.is_thin());
        assert_eq!(h.parent(), Parent::Snapshot(s));
        h.close().await.unwrap();
        let mut cl = bs.clones_of(s);
        cl.sort();
        assert_eq!(cl, vec![b, s2]);
        assert!(bs.clones_of(s2).is_empty());
        check_xzxy0(&bs, b).await;
        bs.delete_blob(s2).await.unwrap();
        check_xzxy0(&bs, b).await;
        // Decoupling from a parent with no data allocates nothing.
        let e = thin(&bs, 2).await;
        let es = bs.create_snapshot(e, vec![]).await.unwrap();
        let free = bs.free_clusters();
        bs.decouple_parent(e).await.unwrap();
        assert_eq!(bs.free_clusters(), free);
        assert!(bs.clones_of(es).is_empty());
    });
}

#[test]
fn a22_decouple_inside_chain() {
    with_blob(true, 3, |_d, bs, b| async move {
        let s0 = wr_snap(&bs, b, 0, 1, 1).await;
        let s1 = wr_snap(&bs, b, 256, 1, 2).await;
        let s2 = wr_snap(&bs, b, 512, 1, 3).await;
        bs.decouple_parent(b).await.unwrap();
        bs.decouple_parent(s2).await.unwrap();
        let h = bs.open_blob(s2).await.unwrap();
        assert_eq!(h.parent(), Parent::Snapshot(s0));
        assert!(h.is_cluster_allocated(1));
        h.close().await.unwrap();
        assert!(all(&rd(&bs, s2, 256, 1).await, 2));
        for id in [b, s2, s1, s0] {
            bs.delete_blob(id).await.unwrap();
        }
    });
}

#[test]
fn a23_concurrent_delete_refused() {
    block_on(async {
        let (d, bs) = fx().await;
        d.set_yield(true);
        let b = thick(&bs, 2).await;
        let (r1, r2) = futures::join!(bs.create_snapshot(b, vec![]), bs.delete_blob(b));
        let s = r1.unwrap();
        assert_eq!(errno(r2), libc::EBUSY);
        let (r1, r2) = futures::join!(bs.inflate_blob(b), bs.delete_blob(b));
        r1.unwrap();
        assert_eq!(errno(r2), libc::EBUSY);
        let (r1, r2) = futures::join!(bs.create_clone(s, vec![]), bs.delete_blob(s));
        r1.unwrap();
        assert_eq!(errno(r2), libc::EBUSY);
        let h = bs.open_blob(b).await.unwrap();
        let (r1, r2) = futures::join!(h.resize(4), bs.delete_blob(b));
        r1.unwrap();
        assert_eq!(errno(r2), libc::EBUSY);
        h.set_xattr("x", b"1").unwrap();
        let (r1, r2) = futures::join!(h.sync_md(), h.sync_md());
        r1.unwrap();
        r2.unwrap();
        h.close().await.unwrap();
    });
}

#[test]
fn a24_resized_clone() {
    with_blob(false, 10, |_d, bs, b| async move {
        let s1 = bs.create_snapshot(b, vec![]).await.unwrap();
        let c = bs.create_clone(s1, vec![]).await.unwrap();
        let h = bs.open_blob(c).await.unwrap();
        h.resize(20).await.unwrap();
        h.sync_md().await.unwrap();
        h.close().await.unwrap();
        let s2 = bs.create_snapshot(c, vec![]).await.unwrap();
        for (id, n) in [(s1, 10), (s2, 20)] {
            let h = bs.open_blob(id).await.unwrap();
            assert_eq!(h.num_clusters(), n);
            assert!(h.is_read_only());
            h.close().await.unwrap();
        }
        wr(&bs, c, 5 * 256, 1, 0xE5).await;
        wr(&bs, c, 15 * 256, 1, 0xE5).await;
        assert!(all(&rd(&bs, c, 5 * 256, 1).await, 0xE5));
        assert!(all(&rd(&bs, c, 15 * 256, 1).await, 0xE5));
        let free = bs.free_clusters();
        bs.inflate_blob(c).await.unwrap();
        assert_eq!(free - bs.free_clusters(), 18);
    });
}

#[test]
fn a25_shallow_copy() {
    with_blob(true, 4, |_d, bs, b| async move {
        wr(&bs, b, 256, 256, 1).await;
        let _s = wr_snap(&bs, b, 768, 256, 3).await;
        wr(&bs, b, 0, 256, 10).await;
        wr(&bs, b, 512, 256, 12).await;
        let ok = MemBsDev::new(4096, 1024);
        let noop = |_n: u64| {};
        assert_eq!(
            errno(bs.shallow_copy(b, ok.clone(), &noop).await),
            libc::EPERM
        );
        let h = bs.open_blob(b).await.unwrap();
        h.set_read_only().unwrap();
        h.sync_md().await.unwrap();
        h.close().await.unwrap();
        assert_eq!(
            errno(bs.shallow_copy(b, MemBsDev::new(4096, 1), &noop).await),
            libc::EINVAL
        );
        assert_eq!(
            errno(bs.shallow_copy(b, MemBsDev::new(8192, 512), &noop).await),
            libc::EINVAL
        );
        let dst = MemBsDev::from_bytes(4096, vec![0xFF; 4 * MIB as usize]);
        let seen = std::sync::Mutex::new(Vec::new());
        let prog = |n: u64| seen.lock().unwrap().push(n);
        assert_eq!(bs.shallow_copy(b, dst.clone(), &prog).await.unwrap(), 2);
        assert_eq!(*seen.lock().unwrap(), vec![1, 2]);
        let img = dst.snapshot();
        let c = |i: usize| &img[i * MIB as usize..(i + 1) * MIB as usize];
        assert!(all(c(0), 10) && all(c(2), 12) && all(c(1), 0xFF) && all(c(3), 0xFF));
    });
}

struct Esnaps(Arc<MemBsDev>);

/// Runs `test` on [`esnap_fx`].
fn with_esnap<F: Future<Output = ()>>(
    test: impl FnOnce(Arc<MemBsDev>, Arc<MemBsDev>, BsOpts, Blobstore) -> F,
) {
    block_on(async {
        let (esnap, d, o, bs) = esnap_fx().await;
        test(esnap, d, o, bs).await
    })
}

/// A 64 MiB store whose esnap clones read a 4 MiB base of 7s: the base, the store's device,
/// the options (to load it again) and the store.
async fn esnap_fx() -> (Arc<MemBsDev>, Arc<MemBsDev>, BsOpts, Blobstore) {
    let esnap = MemBsDev::read_only(4096, vec![7u8; 4 * MIB as usize]);
    let d = dev64(4096);
    let o = BsOpts {
        esnap_factory: Some(Arc::new(Esnaps(esnap.clone()))),
        ..Default::default()
    };
    let bs = Blobstore::init(d.clone(), o.clone()).await.unwrap();
    (esnap, d, o, bs)
}

#[async_trait]
impl EsnapDevFactory for Esnaps {
    async fn create(&self, _b: BlobId, _id: &[u8]) -> Result<Option<Arc<dyn BsDev>>> {
        Ok(Some(self.0.clone() as Arc<dyn BsDev>))
    }
}

#[test]
fn a26_set_parent() {
    with_esnap(|_esnap, _d, _o, bs| async move {
        let b1 = thin(&bs, 0).await;
        let s1 = bs.create_snapshot(b1, vec![]).await.unwrap();
        let s2 = bs.create_snapshot(b1, vec![]).await.unwrap();
        let e = create(&bs, clusters(4).esnap(b"ESNAP")).await;
        let b3 = thin(&bs, 4).await;
        let s3 = bs.create_snapshot(b3, vec![]).await.unwrap();
        let b4 = thick(&bs, 1).await;
        let b5 = thin(&bs, 0).await;
        assert_eq!(errno(bs.set_parent(b1, BLOBID_INVALID).await), libc::EINVAL);
        assert_eq!(errno(bs.set_parent(b1, b1).await), libc::EINVAL);
        assert_eq!(errno(bs.set_parent(b1, s2).await), libc::EEXIST);
        assert_eq!(errno(bs.set_parent(e, b1).await), libc::EINVAL);
        assert_eq!(errno(bs.set_parent(e, s1).await), libc::EINVAL);
        bs.set_parent(b1, s1).await.unwrap();
        let c = bs.clones_of(s1);
        assert_eq!(c.len(), 2);
        assert_eq!(*c.last().unwrap(), b1);
        bs.set_parent(e, s3).await.unwrap();
        let h = bs.open_blob(e).await.unwrap();
        assert!(!h.is_esnap_clone() && h.is_clone());
        assert_eq!(h.parent(), Parent::Snapshot(s3));
        h.close().await.unwrap();
        assert_eq!(bs.clones_of(s3).len(), 2);
        assert_eq!(errno(bs.set_parent(b4, s2).await), libc::EINVAL);
        // s2 lost its only clone above but stays in the snapshot list (as in SPDK).
        bs.set_parent(b5, s2).await.unwrap();
        assert_eq!(bs.clones_of(s2), vec![b5]);
    });
}

#[test]
fn a27_degraded_predicate() {
    with_esnap(|esnap, d, _o, bs| async move {
        let plain = thick(&bs, 1).await;
        let e = create(&bs, clusters(4).esnap(b"E")).await;
        let hp = bs.open_blob(plain).await.unwrap();
        assert!(!hp.is_degraded());
        let he = bs.open_blob(e).await.unwrap();
        assert!(!he.is_degraded());
        he.write(0, filled(4096, 9)).await.unwrap();
        // A base that is gone: every read fails with EIO and the device says it is degraded.
        let gone = MemBsDev::read_only(4096, vec![0; 4 * MIB as usize]);
        gone.set_degraded(true);
        he.set_esnap_dev(Some(gone)).await.unwrap();
        assert!(he.is_degraded());
        he.close().await.unwrap();
        // A clone of a degraded chain is degraded too.
        let s = bs.create_snapshot(e, vec![]).await.unwrap();
        let hs = bs.open_blob(s).await.unwrap();
        hs.set_esnap_dev(None).await.unwrap();
        let he = bs.open_blob(e).await.unwrap();
        assert!(he.is_degraded());
        // Owned data still reads; data that needs the base fails with EIO, nothing leaks.
        assert!(all(&he.read(0, IoBuf::new(4096, 4096)).await.unwrap(), 9));
        assert_eq!(errno(he.read(256, IoBuf::new(4096, 4096)).await), libc::EIO);
        let free = bs.free_clusters();
        assert_eq!(errno(he.write(257, filled(4096, 1)).await), libc::EIO);
        assert_eq!(bs.free_clusters(), free);
        // Heal.
        hs.set_esnap_dev(Some(esnap.clone())).await.unwrap();
        assert!(!he.is_degraded());
        assert!(all(&he.read(256, IoBuf::new(4096, 4096)).await.unwrap(), 7));
        he.close().await.unwrap();
        hs.close().await.unwrap();
        // The store device itself degraded.
        d.set_degraded(true);
        assert!(hp.is_degraded());
        d.set_degraded(false);
        hp.close().await.unwrap();
    });
}

#[test]
fn a28_esnap_clone_creation_and_growth() {
    with_esnap(|_esnap, d, o, bs| async move {
        let n = thin(&bs, 1).await;
        let e = create(&bs, clusters(4).esnap(b"E")).await;
        let e0 = create(&bs, clusters(0).esnap(b"E")).await;
        let h = bs.open_blob(n).await.unwrap();
        assert!(!h.is_esnap_clone());
        h.close().await.unwrap();
        let h = bs.open_blob(e).await.unwrap();
        assert!(h.is_esnap_clone() && !h.is_clone() && h.is_thin());
        assert_eq!(h.num_clusters(), 4);
        assert_eq!(h.esnap_id().unwrap(), b"E");
        h.close().await.unwrap();
        let h = bs.open_blob(e0).await.unwrap();
        for s in [1, 4, 5] {
            h.resize(s).await.unwrap();
            assert_eq!(h.num_clusters(), s);
        }
        h.close().await.unwrap();
        bs.unload().await.unwrap();
        let bs = Blobstore::load(d.clone(), o).await.unwrap();
        let h = bs.open_blob(e0).await.unwrap();
        assert_eq!(h.num_clusters(), 5);
        assert!(h.is_esnap_clone());
        h.close().await.unwrap();
        bs.unload().await.unwrap();
        let bs = Blobstore::load(d.clone(), BsOpts::default()).await.unwrap();
        assert_ne!(errno(bs.open_blob(e0).await), 0);
    });
}

fn esnap_content(bl: u32, bytes: usize) -> Vec<u8> {
    let mut v = vec![0u8; bytes];
    for (i, blk) in v.chunks_mut(bl as usize).enumerate() {
        let s = format!("esnap block {i:8}");
        blk[..s.len()].copy_from_slice(s.as_bytes());
    }
    v
}

#[test]
fn a29_esnap_read_through_block_sizes() {
    block_on(async {
        for (bs_bl, es_bl) in [(4096u32, 4096u32), (512, 512), (4096, 512)] {
            let cluster = 4 * bs_bl.max(4096);
            let esz = 4 * cluster as usize;
            let content = esnap_content(es_bl, esz);
            let esnap = MemBsDev::read_only(es_bl, content.clone());
            let d = MemBsDev::new(bs_bl, 16 * MIB / u64::from(bs_bl));
            let o = BsOpts {
                cluster_size: cluster,
                esnap_factory: Some(Arc::new(Esnaps(esnap))),
                ..Default::default()
            };
            let bs = Blobstore::init(d, o).await.unwrap();
            let e = create(&bs, clusters(4).esnap(b"E")).await;
            let h = bs.open_blob(e).await.unwrap();
            let all_data = h.read(0, IoBuf::new(esz, 4096)).await.unwrap();
            assert!(all_data[..] == content[..], "({bs_bl},{es_bl}) whole read");
            let bl = bs_bl as usize;
            let n = esz / bl;
            for i in 0..n {
                let r = h.read(i as u64, IoBuf::new(bl, 4096)).await.unwrap();
                assert!(r[..] == content[i * bl..(i + 1) * bl]);
            }
            let mut expect = content.clone();
            for i in 0..n {
                let mut pat = vec![0u8; bl];
                let s = format!("new {i}");
                pat[..s.len()].copy_from_slice(s.as_bytes());
                pat[bl - 1] = 0xEE;
                h.write(i as u64, IoBuf::from_slice(&pat, 4096))
                    .await
                    .unwrap();
                expect[i * bl..(i + 1) * bl].copy_from_slice(&pat);
                for j in [i.saturating_sub(1), i, (i + 1).min(n - 1)] {
                    let r = h.read(j as u64, IoBuf::new(bl, 4096)).await.unwrap();
                    assert!(
                        r[..] == expect[j * bl..(j + 1) * bl],
                        "({bs_bl},{es_bl}) blk {j} after write {i}"
                    );
                }
            }
            h.close().await.unwrap();
        }
        // 512-byte io unit over a 4096-byte esnap: creation works, open fails EINVAL.
        let esnap = MemBsDev::read_only(4096, vec![0u8; 64 * 1024]);
        let d = MemBsDev::new(512, 16 * MIB / 512);
        let o = BsOpts {
            cluster_size: 16384,
            esnap_factory: Some(Arc::new(Esnaps(esnap))),
            ..Default::default()
        };
        let bs = Blobstore::init(d, o).await.unwrap();
        let e = create(&bs, clusters(4).esnap(b"E")).await;
        assert_eq!(errno(bs.open_blob(e).await), libc::EINVAL);
    });
}

#[test]
fn clear_method_is_stored() {
    block_on(async {
        let (d, bs) = fx().await;
        let id = create(&bs, clusters(1).clear(ClearMethod::WriteZeroes)).await;
        let bs = reload(&d, bs).await;
        let h = bs.open_blob(id).await.unwrap();
        assert_eq!(h.clear_method(), ClearMethod::WriteZeroes);
        h.clone().close().await.unwrap();
        assert_eq!(errno(h.close().await), libc::EBADF);
    });
}

#[test]
fn vectored_io_and_unmap_on_clone() {
    with_blob(true, 3, |_d, bs, id| async move {
        let b = bs.open_blob(id).await.unwrap();
        // Three buffers straddling the cluster 0/1 boundary.
        let bufs = vec![filled(4096, 1), filled(8192, 2), filled(4096, 3)];
        b.writev(254, bufs).await.unwrap();
        let got = b
            .readv(254, vec![IoBuf::new(8192, 4096), IoBuf::new(8192, 4096)])
            .await
            .unwrap();
        assert!(all(&got[0][..4096], 1) && all(&got[0][4096..], 2));
        assert!(all(&got[1][..4096], 2) && all(&got[1][4096..], 3));
        assert_eq!(b.num_allocated_clusters(), 2);
        b.close().await.unwrap();
        let s = bs.create_snapshot(id, vec![]).await.unwrap();
        let b = bs.open_blob(id).await.unwrap();
        b.write(0, filled(4096, 9)).await.unwrap();
        // Unmap of a clone's whole cluster keeps the cluster (it has a parent) and zeroes it.
        b.unmap(0, 256).await.unwrap();
        assert_eq!(b.num_allocated_clusters(), 1);
        assert!(all(&b.read(0, IoBuf::new(4096, 4096)).await.unwrap(), 0));
        // Unallocated ranges: no-op, still reads the snapshot.
        b.unmap(256, 256).await.unwrap();
        assert!(all(&b.read(256, IoBuf::new(4096, 4096)).await.unwrap(), 2));
        b.close().await.unwrap();
        assert!(all(&rd(&bs, s, 254, 1).await, 1));
    });
}

#[test]
fn seek_allocated_and_unallocated() {
    with_blob(true, 6, |_d, bs, id| async move {
        wr(&bs, id, 256 + 3, 1, 1).await;
        wr(&bs, id, 4 * 256, 1, 1).await;
        let b = bs.open_blob(id).await.unwrap();
        assert_eq!(b.next_allocated_io_unit(0), Some(256));
        assert_eq!(b.next_allocated_io_unit(300), Some(300));
        assert_eq!(b.next_allocated_io_unit(512), Some(1024));
        assert_eq!(b.next_unallocated_io_unit(256), Some(512));
        assert_eq!(b.next_unallocated_io_unit(1030), Some(1280));
        assert_eq!(b.next_allocated_io_unit(1281), None);
        assert_eq!(b.next_unallocated_io_unit(6 * 256), None);
        b.close().await.unwrap();
    });
}

#[test]
fn dirty_shutdown_keeps_every_synced_change() {
    block_on(async {
        let (d, bs) = fx().await;
        let free0 = bs.free_clusters();
        let a = thick(&bs, 10).await;
        bs.set_super_blob(a).await.unwrap();
        let h = bs.open_blob(a).await.unwrap();
        h.set_xattr("name", b"a").unwrap();
        h.set_xattr("page", &vec![5u8; 4000]).unwrap();
        h.sync_md().await.unwrap();
        h.close().await.unwrap();
        let bs = dirty_reload(&d, bs).await;
        assert_eq!(bs.free_clusters(), free0 - 10);
        assert_eq!(bs.super_blob(), Some(a));
        let h = bs.open_blob(a).await.unwrap();
        assert_eq!(h.get_xattr("page").unwrap(), vec![5u8; 4000]);
        h.resize(20).await.unwrap();
        h.sync_md().await.unwrap();
        h.close().await.unwrap();
        let bs = dirty_reload(&d, bs).await;
        assert_eq!(bs.free_clusters(), free0 - 20);
        let b2 = thick(&bs, 3).await;
        let bs = dirty_reload(&d, bs).await;
        assert_eq!(bs.free_clusters(), free0 - 23);
        bs.delete_blob(b2).await.unwrap();
        let bs = dirty_reload(&d, bs).await;
        assert_eq!(bs.free_clusters(), free0 - 20);
        assert_eq!(bs.blob_ids(), vec![a]);
        let h = bs.open_blob(a).await.unwrap();
        assert_eq!(h.num_clusters(), 20);
        assert_eq!(h.get_xattr("name").unwrap(), b"a");
        h.close().await.unwrap();
    });
}
