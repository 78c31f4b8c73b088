//! External snapshots (issue 5 parts 1-2): every move of the esnap link, with data and
//! on-disk flags checked, across reloads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use blobstore::inspect::{parse_md_page, Descriptor};
use blobstore::testing::MemBsDev;
use blobstore::{BlobId, Blobstore, BsDev, BsOpts, EsnapDevFactory, IoBuf, Parent, Result};
use futures::executor::block_on;
use test_support::prelude::*;

const MIB: usize = 1 << 20;
const ID: &[u8] = b"7e5a0000-e5a0-4e5a-8e5a-000000000001\0";

struct Factory {
    dev: Arc<MemBsDev>,
    calls: AtomicU64,
}

#[async_trait]
impl EsnapDevFactory for Factory {
    async fn create(&self, _b: BlobId, id: &[u8]) -> Result<Option<Arc<dyn BsDev>>> {
        assert_eq!(id, ID);
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Some(self.dev.clone() as Arc<dyn BsDev>))
    }
}

fn base() -> Vec<u8> {
    let mut v = vec![0u8; 4 * MIB];
    for (i, b) in v.chunks_mut(4096).enumerate() {
        let s = format!("BASE {i:6}");
        b[..s.len()].copy_from_slice(s.as_bytes());
        b[4095] = (i % 251) as u8;
    }
    v
}

struct Fx {
    dev: Arc<MemBsDev>,
    f: Arc<Factory>,
    base: Vec<u8>,
}

impl Fx {
    fn new() -> Fx {
        let base = base();
        Fx {
            dev: MemBsDev::new(4096, (64 * MIB / 4096) as u64),
            f: Arc::new(Factory {
                dev: MemBsDev::read_only(4096, base.clone()),
                calls: AtomicU64::new(0),
            }),
            base,
        }
    }
    fn opts(&self) -> BsOpts {
        BsOpts {
            esnap_factory: Some(self.f.clone()),
            ..Default::default()
        }
    }
    async fn reload(&self, bs: Blobstore) -> Blobstore {
        reload(&self.dev, bs, self.opts()).await
    }
    /// A new store on the fixture's device.
    async fn store(&self) -> Blobstore {
        init_store(&self.dev, self.opts()).await
    }
    /// A fixture, its store and an esnap clone made by [`eclone`], with the bytes the clone
    /// must read.
    async fn with_eclone() -> (Fx, Blobstore, BlobId, Vec<u8>) {
        let fx = Fx::new();
        let bs = fx.store().await;
        let mut want = fx.base.clone();
        let e = eclone(&bs, &mut want).await;
        (fx, bs, e, want)
    }
    /// Invalid flags of a blob as stored on disk (store must be unloaded or synced).
    fn disk_flags(&self, id: BlobId) -> u64 {
        let img = self.dev.snapshot();
        let p = (4 + (id as u32) as usize) * 4096;
        let page = parse_md_page(&img[p..p + 4096]).unwrap();
        page.descriptors
            .iter()
            .find_map(|d| match d {
                Descriptor::Flags { invalid, .. } => Some(*invalid),
                _ => None,
            })
            .unwrap()
    }
}

/// An esnap clone of 4 clusters with two blocks written (one copy-on-write each).
async fn eclone(bs: &Blobstore, expect: &mut [u8]) -> BlobId {
    let e = create(bs, clusters(4).esnap(ID)).await;
    let h = bs.open_blob(e).await.unwrap();
    for blk in [3usize, 600] {
        let mut p = vec![0xC1u8; 4096];
        p[0] = blk as u8;
        h.write(blk as u64, IoBuf::from_slice(&p, 4096))
            .await
            .unwrap();
        expect[blk * 4096..(blk + 1) * 4096].copy_from_slice(&p);
    }
    h.close().await.unwrap();
    e
}

#[test]
fn esnap_clone_reads_base_and_copies_on_write() {
    block_on(async {
        let (fx, bs, e, want) = Fx::with_eclone().await;
        assert!(read_blob(&bs, e).await == want);
        let h = bs.open_blob(e).await.unwrap();
        assert_eq!(h.num_allocated_clusters(), 2);
        assert_eq!(h.esnap_id().unwrap(), ID);
        assert_eq!(h.parent(), Parent::External(ID.to_vec()));
        assert_eq!(h.get_internal_xattr("EXTSNAP").unwrap(), ID);
        h.close().await.unwrap();
        let bs = fx.reload(bs).await;
        assert_eq!(fx.disk_flags(e) & 0xF, 0xF);
        assert!(read_blob(&bs, e).await == want);
        assert!(fx.f.calls.load(Ordering::SeqCst) >= 2);
    });
}

#[test]
fn snapshot_of_esnap_clone_takes_the_link_and_delete_moves_it_back() {
    block_on(async {
        let (fx, bs, e, mut want) = Fx::with_eclone().await;
        let s = bs.create_snapshot(e, vec![]).await.unwrap();
        let bs = fx.reload(bs).await;
        assert_eq!(
            fx.disk_flags(s) & 0xF,
            0xF,
            "snapshot: thin+internal+et+esnap"
        );
        assert_eq!(fx.disk_flags(e) & 0x8, 0);
        let hs = bs.open_blob(s).await.unwrap();
        assert!(hs.is_esnap_clone() && hs.is_snapshot());
        assert_eq!(hs.esnap_id().unwrap(), ID);
        hs.close().await.unwrap();
        let he = bs.open_blob(e).await.unwrap();
        assert!(he.is_clone() && !he.is_esnap_clone());
        assert_eq!(he.parent(), Parent::Snapshot(s));
        assert!(he.get_internal_xattr("EXTSNAP").is_err());
        assert!(he.esnap_id().is_err());
        // New writes go to the clone; the snapshot keeps the old data.
        let p = vec![0xD2u8; 4096];
        he.write(1000, IoBuf::from_slice(&p, 4096)).await.unwrap();
        he.close().await.unwrap();
        let snap_data = want.clone();
        want[1000 * 4096..1001 * 4096].copy_from_slice(&p);
        assert!(read_blob(&bs, s).await == snap_data);
        assert!(read_blob(&bs, e).await == want);
        // Delete the snapshot: the link moves back.
        bs.delete_blob(s).await.unwrap();
        let he = bs.open_blob(e).await.unwrap();
        assert!(he.is_esnap_clone() && !he.is_clone());
        assert_eq!(he.esnap_id().unwrap(), ID);
        he.close().await.unwrap();
        assert!(read_blob(&bs, e).await == want);
        let bs = fx.reload(bs).await;
        assert_eq!(fx.disk_flags(e) & 0x8, 0x8);
        assert!(read_blob(&bs, e).await == want);
        unload_and_check(&fx.dev, bs).await;
    });
}

#[test]
fn deleting_the_clone_leaves_the_link_on_the_snapshot_and_clones_are_plain() {
    block_on(async {
        let (fx, bs, e, want) = Fx::with_eclone().await;
        let s = bs.create_snapshot(e, vec![]).await.unwrap();
        bs.delete_blob(e).await.unwrap();
        assert!(bs.clones_of(s).is_empty());
        let hs = bs.open_blob(s).await.unwrap();
        assert!(hs.is_esnap_clone());
        hs.close().await.unwrap();
        let c = bs.create_clone(s, vec![]).await.unwrap();
        let hc = bs.open_blob(c).await.unwrap();
        assert!(hc.is_clone() && !hc.is_esnap_clone());
        assert!(hc.get_internal_xattr("EXTSNAP").is_err());
        hc.close().await.unwrap();
        assert!(read_blob(&bs, c).await == want);
        let bs = fx.reload(bs).await;
        assert_eq!(fx.disk_flags(c) & 0x8, 0);
        assert_eq!(fx.disk_flags(s) & 0x8, 0x8);
        assert!(read_blob(&bs, c).await == want);
    });
}

#[test]
fn inflate_and_decouple_of_esnap_clone_cut_the_link() {
    block_on(async {
        for decouple in [false, true] {
            let (fx, bs, e, want) = Fx::with_eclone().await;
            if decouple {
                bs.decouple_parent(e).await.unwrap();
            } else {
                bs.inflate_blob(e).await.unwrap();
            }
            let h = bs.open_blob(e).await.unwrap();
            assert!(!h.is_esnap_clone() && !h.is_thin() && !h.is_clone());
            assert_eq!(h.num_allocated_clusters(), 4);
            assert!(h.get_internal_xattr("EXTSNAP").is_err());
            h.close().await.unwrap();
            let bs = fx.reload(bs).await;
            assert_eq!(fx.disk_flags(e) & 0x9, 0);
            assert!(read_blob(&bs, e).await == want);
            // Works without any factory now.
            bs.unload().await.unwrap();
            let bs = Blobstore::load(fx.dev.clone(), BsOpts::default())
                .await
                .unwrap();
            assert!(read_blob(&bs, e).await == want);
        }
    });
}

#[test]
fn set_external_parent_and_esnap_dev_swap() {
    block_on(async {
        let fx = Fx::new();
        let bs = fx.store().await;
        let t = create(&bs, clusters(4).thin()).await;
        let thick = create(&bs, clusters(4)).await;
        let dev: Arc<dyn BsDev> = fx.f.dev.clone();
        assert_errno!(
            bs.set_external_parent(thick, dev.clone(), ID).await,
            libc::EINVAL
        );
        let odd: Arc<dyn BsDev> = MemBsDev::read_only(4096, vec![0; 4096 * 3]);
        assert_errno!(bs.set_external_parent(t, odd, ID).await, libc::EINVAL);
        bs.set_external_parent(t, dev.clone(), ID).await.unwrap();
        assert_errno!(bs.set_external_parent(t, dev, ID).await, libc::EEXIST);
        assert!(read_blob(&bs, t).await == fx.base);
        let h = bs.open_blob(t).await.unwrap();
        assert!(h.is_esnap_clone());
        // Degrade then heal in place.
        h.set_esnap_dev(None).await.unwrap();
        assert!(h.is_degraded());
        assert_errno!(h.read(0, IoBuf::new(4096, 4096)).await, libc::EIO);
        h.set_esnap_dev(Some(fx.f.dev.clone())).await.unwrap();
        assert!(!h.is_degraded());
        assert_eq!(
            &h.read(7, IoBuf::new(4096, 4096)).await.unwrap()[..],
            &fx.base[7 * 4096..8 * 4096]
        );
        h.close().await.unwrap();
        let bs = fx.reload(bs).await;
        assert!(read_blob(&bs, t).await == fx.base);
    });
}

#[test]
fn chain_esnap_clone_snapshot_clone() {
    block_on(async {
        // esnap <- S <- E and S <- C: both read through S to the base.
        let (fx, bs, e, want) = Fx::with_eclone().await;
        let s = bs.create_snapshot(e, vec![]).await.unwrap();
        let c = bs.create_clone(s, vec![]).await.unwrap();
        let hc = bs.open_blob(c).await.unwrap();
        let p = vec![0x99u8; 4096];
        hc.write(900, IoBuf::from_slice(&p, 4096)).await.unwrap();
        hc.close().await.unwrap();
        let mut wc = want.clone();
        wc[900 * 4096..901 * 4096].copy_from_slice(&p);
        let bs = fx.reload(bs).await;
        assert!(read_blob(&bs, c).await == wc);
        assert!(read_blob(&bs, e).await == want);
        let hc = bs.open_blob(c).await.unwrap();
        assert!(!hc.is_degraded());
        hc.close().await.unwrap();
    });
}

/// Copy-on-write through a device's in-kernel copy capability and through memory leave the
/// same bytes: of an esnap base (partial writes, a write_zeroes, a write spanning clusters)
/// and of a parent snapshot's clusters (a copy inside the store's device). The capability
/// is used only where both devices offer it.
#[test]
fn copy_on_write_in_kernel_and_through_memory_agree() {
    let mut results = Vec::new();
    for copy in [false, true] {
        results.push(block_on(async {
            let fx = Fx::new();
            fx.dev.set_copy(copy);
            fx.f.dev.set_copy(copy);
            assert_eq!(fx.dev.copy_source().is_some(), copy);
            let bs = fx.store().await;
            let e = create(&bs, clusters(4).esnap(ID)).await;
            let h = bs.open_blob(e).await.unwrap();
            let mut expect = fx.base.clone();
            let put = |expect: &mut Vec<u8>, blk: usize, n: usize, byte: u8| {
                expect[blk * 4096..(blk + n) * 4096].fill(byte);
                IoBuf::from_slice(&vec![byte; n * 4096], 4096)
            };
            // Cluster 0: one block; clusters 0-1: a write across their boundary.
            h.write(5, put(&mut expect, 5, 1, 0xA1)).await.unwrap();
            h.write(250, put(&mut expect, 250, 12, 0xA2)).await.unwrap();
            // Cluster 3: write_zeroes of two blocks.
            h.write_zeroes(3 * 256 + 7, 2).await.unwrap();
            expect[(3 * 256 + 7) * 4096..(3 * 256 + 9) * 4096].fill(0);
            h.close().await.unwrap();
            // A snapshot takes those clusters; the clone's next partial write of cluster 0
            // copies it from the snapshot (inside the store's device); cluster 2, which the
            // snapshot does not own, is read through the chain (memory).
            let s = bs.create_snapshot(e, vec![]).await.unwrap();
            let snap_bytes = expect.clone();
            let h = bs.open_blob(e).await.unwrap();
            h.write(9, put(&mut expect, 9, 1, 0xB1)).await.unwrap();
            h.write(2 * 256 + 100, put(&mut expect, 2 * 256 + 100, 1, 0xB2))
                .await
                .unwrap();
            h.flush().await.unwrap();
            h.close().await.unwrap();
            let bs = fx.reload(bs).await;
            assert_eq!(read_blob(&bs, e).await, expect, "clone (copy={copy})");
            assert_eq!(
                read_blob(&bs, s).await,
                snap_bytes,
                "snapshot (copy={copy})"
            );
            if copy {
                // Clusters 0, 1 and 3 from the base, cluster 0 again from the snapshot.
                assert_eq!(fx.dev.copies(), 4);
            } else {
                assert_eq!(fx.dev.copies(), 0);
            }
            bs.unload().await.unwrap();
            expect
        }));
    }
    assert_eq!(results[0], results[1]);
}
