//! Compatibility: every store written by SPDK v24.09 opens, lists and reads exactly as the
//! manifest says, survives our writes, snapshots and a reload.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use blobstore::testing::MemBsDev;
use blobstore::{
    inspect, BlobId, Blobstore, BsDev, BsOpts, EsnapDevFactory, IoBuf, Parent, Result,
};
use futures::executor::block_on;
use serde_json::Value;
use test_support::prelude::*;
use test_support::{fixture_copy, manifest, pattern_block, sha256_hex};

fn load_img(rel: &str) -> Arc<MemBsDev> {
    let (_d, p) = fixture_copy(rel);
    MemBsDev::from_bytes(4096, std::fs::read(p).unwrap())
}

/// Manifest, device and store (loaded with default options) of fixture `dir/img`.
async fn load_fixture(dir: &str, img: &str) -> (Value, Arc<MemBsDev>, Blobstore) {
    let dev = load_img(&format!("{dir}/{img}"));
    let bs = Blobstore::load(dev.clone(), BsOpts::default())
        .await
        .unwrap();
    (manifest(dir), dev, bs)
}

/// A new store of type `LVOLSTORE` with clusters of `cluster_size` bytes on a 64 MiB device.
async fn lvolstore_like(cluster_size: u32) -> (Arc<MemBsDev>, Blobstore) {
    let mut bstype = [0u8; 16];
    bstype[..9].copy_from_slice(b"LVOLSTORE");
    let o = BsOpts {
        cluster_size,
        bstype,
        ..Default::default()
    };
    mem_store(4096, 64 * 256, o).await
}

fn hexid(s: &str) -> BlobId {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

struct FixtureEsnaps {
    dev: Arc<MemBsDev>,
    calls: std::sync::atomic::AtomicU64,
}

#[async_trait]
impl EsnapDevFactory for FixtureEsnaps {
    async fn create(&self, _blob: BlobId, id: &[u8]) -> Result<Option<Arc<dyn BsDev>>> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(id, b"7e5a0000-e5a0-4e5a-8e5a-000000000001\0");
        Ok(Some(self.dev.clone() as Arc<dyn BsDev>))
    }
}

async fn read_all(bs: &Blobstore, id: BlobId) -> Vec<u8> {
    let b = bs.open_blob(id).await.unwrap();
    let n = b.num_io_units() as usize * bs.io_unit_size() as usize;
    let buf = b.read(0, IoBuf::new(n, 4096)).await.unwrap();
    b.close().await.unwrap();
    buf.to_vec()
}

/// Checks every lvol of a manifest against the loaded store.
async fn check_lvols(bs: &Blobstore, m: &Value) {
    let names: BTreeMap<String, BlobId> = m["lvols"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap().to_string(),
                hexid(l["blob_id"].as_str().unwrap()),
            )
        })
        .collect();
    let lvs = &m["lvstores"][0];
    assert_eq!(
        bs.cluster_size() as u64,
        lvs["cluster_size"].as_u64().unwrap()
    );
    assert_eq!(
        bs.total_data_clusters(),
        lvs["total_data_clusters"].as_u64().unwrap()
    );
    assert_eq!(bs.free_clusters(), lvs["free_clusters"].as_u64().unwrap());
    assert_eq!(
        bs.super_blob(),
        Some(hexid(lvs["super_blob_id"].as_str().unwrap()))
    );
    let mut want_ids: Vec<BlobId> = names.values().copied().collect();
    want_ids.push(hexid(lvs["super_blob_id"].as_str().unwrap()));
    want_ids.sort();
    assert_eq!(bs.blob_ids(), want_ids);
    for l in m["lvols"].as_array().unwrap() {
        let id = hexid(l["blob_id"].as_str().unwrap());
        let name = l["name"].as_str().unwrap();
        let b = bs.open_blob(id).await.unwrap();
        let size = b.num_clusters() * u64::from(bs.cluster_size());
        let got = [
            ("size_bytes", size.into()),
            ("thin", b.is_thin().into()),
            ("is_clone", b.is_clone().into()),
            ("is_snapshot", b.is_snapshot().into()),
            ("is_esnap_clone", b.is_esnap_clone().into()),
            ("num_allocated_clusters", b.num_allocated_clusters().into()),
        ];
        assert_manifest(name, l, &got);
        match l["base_snapshot"].as_str() {
            Some(s) => assert_eq!(b.parent(), Parent::Snapshot(names[s])),
            None if l["is_esnap_clone"].as_bool().unwrap() => {
                assert!(matches!(b.parent(), Parent::External(_)))
            }
            None => {}
        }
        if let Some(cl) = l["clones"].as_array() {
            let want: Vec<BlobId> = cl.iter().map(|c| names[c.as_str().unwrap()]).collect();
            let mut got = bs.clones_of(id);
            got.sort();
            let mut w = want.clone();
            w.sort();
            assert_eq!(got, w, "{name} clones");
        }
        if let Some(e) = l["external_snapshot_name"].as_str() {
            let mut want = e.as_bytes().to_vec();
            want.push(0);
            assert_eq!(b.esnap_id().unwrap(), want);
        }
        for (k, v) in l["internal_xattrs"].as_object().unwrap() {
            assert_eq!(
                hex::encode(b.get_internal_xattr(k).unwrap()),
                v.as_str().unwrap(),
                "{name} internal {k}"
            );
            assert!(b.get_xattr(k).is_err());
        }
        let dump = &m["blobs_from_md_dump"][l["blob_id"].as_str().unwrap()];
        for (k, v) in dump["xattrs"].as_object().unwrap() {
            assert_eq!(
                hex::encode(b.get_xattr(k).unwrap()),
                v["hex"].as_str().unwrap(),
                "{name} xattr {k}"
            );
        }
        b.close().await.unwrap();
        let data = read_all(bs, id).await;
        assert_eq!(data.len() as u64, l["sha256_len"].as_u64().unwrap());
        assert_eq!(
            sha256_hex(&data),
            l["sha256"].as_str().unwrap(),
            "{name} data"
        );
    }
}

/// Writes, snapshots, unloads, reloads and checks that everything (old and new) holds.
async fn write_snapshot_reload(dev: Arc<MemBsDev>, opts: BsOpts, m: &Value) {
    let bs = Blobstore::load(dev.clone(), opts.clone()).await.unwrap();
    let lvols = m["lvols"].as_array().unwrap();
    // Pick a writable lvol that is not a snapshot.
    let l = lvols
        .iter()
        .find(|l| !l["is_snapshot"].as_bool().unwrap())
        .unwrap();
    let id = hexid(l["blob_id"].as_str().unwrap());
    let before = read_all(&bs, id).await;
    let b = bs.open_blob(id).await.unwrap();
    let pat = pattern_block("RUST", 3);
    b.write(3, IoBuf::from_slice(&pat, 4096)).await.unwrap();
    b.close().await.unwrap();
    let snap = bs
        .create_snapshot(id, vec![("name".into(), b"rsnap\0".to_vec())])
        .await
        .unwrap();
    let b = bs.open_blob(id).await.unwrap();
    let pat2 = pattern_block("RUST2", 4);
    b.write(4, IoBuf::from_slice(&pat2, 4096)).await.unwrap();
    b.close().await.unwrap();
    bs.unload().await.unwrap();
    let rep = inspect::check(dev.clone()).await.unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    let bs = Blobstore::load(dev.clone(), opts).await.unwrap();
    let mut want = before.clone();
    want[3 * 4096..4 * 4096].copy_from_slice(&pat);
    let snap_data = read_all(&bs, snap).await;
    assert_eq!(sha256_hex(&snap_data), sha256_hex(&want));
    want[4 * 4096..5 * 4096].copy_from_slice(&pat2);
    assert_eq!(sha256_hex(&read_all(&bs, id).await), sha256_hex(&want));
    assert_eq!(bs.clones_of(snap), vec![id]);
    // Everything else is unchanged.
    for o in lvols {
        let oid = hexid(o["blob_id"].as_str().unwrap());
        if oid != id {
            assert_eq!(
                sha256_hex(&read_all(&bs, oid).await),
                o["sha256"].as_str().unwrap()
            );
        }
    }
    bs.unload().await.unwrap();
}

#[test]
fn basic_fixture_matches_manifest() {
    block_on(async {
        let (m, dev, bs) = load_fixture("basic", "store.img.gz").await;
        assert_eq!(&bs.bstype()[..10], b"LVOLSTORE\0");
        assert_eq!((bs.md_start(), bs.md_len()), (4, 64));
        check_lvols(&bs, &m).await;
        unload_and_check(&dev, bs).await;
        write_snapshot_reload(dev, BsOpts::default(), &m).await;
    });
}

#[test]
fn basic_fixture_wrong_bstype_is_enxio() {
    block_on(async {
        let dev = load_img("basic/store.img.gz");
        let mut o = BsOpts::default();
        o.bstype[..5].copy_from_slice(b"OTHER");
        let e = Blobstore::load(dev, o).await.err().unwrap();
        assert_eq!(e.errno(), libc::ENXIO);
    });
}

#[test]
fn dirty_fixture_recovers() {
    block_on(async {
        let m = manifest("dirty");
        let dev = load_img("dirty/store.img.gz");
        let before = dev.snapshot();
        let sb = inspect::parse_super(&before[..4096]).unwrap();
        assert_eq!(sb.clean, 0);
        let bs = Blobstore::load(dev.clone(), BsOpts::default())
            .await
            .unwrap();
        // Loading wrote nothing.
        assert!(dev.snapshot() == before);
        check_lvols(&bs, &m).await;
        unload_and_check(&dev, bs).await;
        let sb = inspect::parse_super(&dev.snapshot()[..4096]).unwrap();
        assert_eq!(sb.clean, 1);
        write_snapshot_reload(dev, BsOpts::default(), &m).await;
    });
}

fn esnap_opts() -> (BsOpts, Arc<FixtureEsnaps>) {
    let (_d, p) = fixture_copy("esnap/esnap.img.gz");
    let f = Arc::new(FixtureEsnaps {
        dev: MemBsDev::read_only(4096, std::fs::read(p).unwrap()),
        calls: Default::default(),
    });
    let o = BsOpts {
        esnap_factory: Some(f.clone()),
        ..Default::default()
    };
    (o, f)
}

#[test]
fn esnap_fixture_matches_manifest() {
    block_on(async {
        let m = manifest("esnap");
        let dev = load_img("esnap/store.img.gz");
        let (opts, f) = esnap_opts();
        let bs = Blobstore::load(dev.clone(), opts.clone()).await.unwrap();
        check_lvols(&bs, &m).await;
        assert!(f.calls.load(std::sync::atomic::Ordering::SeqCst) > 0);
        bs.unload().await.unwrap();
        write_snapshot_reload(dev, opts, &m).await;
    });
}

#[test]
fn esnap_fixture_without_base_is_degraded() {
    block_on(async {
        let dev = load_img("esnap/store.img.gz");
        // No factory: esnap clones do not open.
        let bs = Blobstore::load(dev.clone(), BsOpts::default())
            .await
            .unwrap();
        let e = bs.open_blob(0x1_0000_0002).await.err().unwrap();
        assert_eq!(e.errno(), libc::ENOTSUP);
        bs.unload().await.unwrap();
        // A factory with no device: opens degraded, owned clusters read, others EIO.
        struct Missing;
        #[async_trait]
        impl EsnapDevFactory for Missing {
            async fn create(&self, _b: BlobId, _id: &[u8]) -> Result<Option<Arc<dyn BsDev>>> {
                Ok(None)
            }
        }
        let opts = BsOpts {
            esnap_factory: Some(Arc::new(Missing)),
            ..Default::default()
        };
        let bs = Blobstore::load(dev, opts).await.unwrap();
        let snap = bs.open_blob(0x1_0000_0004).await.unwrap();
        assert!(snap.is_degraded());
        let clone = bs.open_blob(0x1_0000_0001).await.unwrap();
        assert!(clone.is_degraded());
        // eclone1 cluster 0 is its own (EC1B 1 after COW): readable.
        let b = clone.read(1, IoBuf::new(4096, 4096)).await.unwrap();
        assert_eq!(&b[..], &pattern_block("EC1B", 1)[..]);
        // Cluster 12 is unallocated in the clone and its snapshot: needs the base.
        assert!(!clone.is_cluster_allocated(12) && !snap.is_cluster_allocated(12));
        assert_errno!(
            clone.read(12 * 256, IoBuf::new(4096, 4096)).await,
            libc::EIO
        );
        let free = bs.free_clusters();
        assert_errno!(
            clone.write(13 * 256, IoBuf::new(4096, 4096)).await,
            libc::EIO
        );
        assert_eq!(bs.free_clusters(), free);
        clone.close().await.unwrap();
        snap.close().await.unwrap();
        bs.unload().await.unwrap();
    });
}

#[test]
fn blobcli_fixture_matches_manifest() {
    block_on(async {
        let (m, dev, bs) = load_fixture("blobcli", "bs.img.gz").await;
        assert_eq!(bs.bstype(), [0u8; 16]);
        assert_eq!(bs.super_blob(), Some(0x1_0000_0004));
        let mut ids: Vec<BlobId> = m["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| hexid(b["blob_id"].as_str().unwrap()))
            .collect();
        ids.sort();
        assert_eq!(bs.blob_ids(), ids);
        for bl in m["blobs"].as_array().unwrap() {
            let id = hexid(bl["blob_id"].as_str().unwrap());
            let b = bs.open_blob(id).await.unwrap();
            assert_eq!(b.num_clusters(), bl["num_clusters"].as_u64().unwrap());
            assert_eq!(b.is_thin(), bl["thin"].as_bool().unwrap());
            let dump = &m["blobs_from_md_dump"][bl["blob_id"].as_str().unwrap()];
            let mut names = b.xattr_names();
            names.sort();
            let mut want: Vec<String> = dump["xattrs"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            want.sort();
            assert_eq!(names, want);
            for (k, v) in dump["xattrs"].as_object().unwrap() {
                let got = b.get_xattr(k).unwrap();
                assert_eq!(got.len() as u64, v["len"].as_u64().unwrap());
                assert_eq!(hex::encode(got), v["hex"].as_str().unwrap());
            }
            b.close().await.unwrap();
            assert_eq!(
                sha256_hex(&read_all(&bs, id).await),
                bl["sha256"].as_str().unwrap()
            );
        }
        for d in m["deleted_blob_ids"].as_array().unwrap() {
            let e = bs
                .open_blob(hexid(d.as_str().unwrap()))
                .await
                .err()
                .unwrap();
            assert_eq!(e.errno(), libc::ENOENT);
        }
        bs.unload().await.unwrap();
        let rep = inspect::check(dev).await.unwrap();
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    });
}

#[test]
fn new_store_super_block_matches_spdk() {
    block_on(async {
        let dev = load_img("basic/store.img.gz");
        let theirs = inspect::parse_super(&dev.snapshot()[..4096]).unwrap();
        let (ours_dev, bs) = lvolstore_like(1 << 20).await;
        let raw = ours_dev.snapshot();
        let ours = inspect::parse_super(&raw[..4096]).unwrap();
        assert_eq!(ours.clean, 0);
        assert_eq!(&raw[92..96], &[0, 0, 0, 0]);
        assert_eq!(ours.signature, theirs.signature);
        assert_eq!(ours.version, theirs.version);
        assert_eq!(ours.length, theirs.length);
        assert_eq!(ours.cluster_size, theirs.cluster_size);
        assert_eq!(ours.used_page_mask_start, theirs.used_page_mask_start);
        assert_eq!(ours.used_page_mask_len, theirs.used_page_mask_len);
        assert_eq!(ours.used_cluster_mask_start, theirs.used_cluster_mask_start);
        assert_eq!(ours.used_cluster_mask_len, theirs.used_cluster_mask_len);
        assert_eq!(ours.used_blobid_mask_start, theirs.used_blobid_mask_start);
        assert_eq!(ours.used_blobid_mask_len, theirs.used_blobid_mask_len);
        assert_eq!(ours.md_start, theirs.md_start);
        assert_eq!(ours.md_len, theirs.md_len);
        assert_eq!(ours.bstype, theirs.bstype);
        assert_eq!(ours.size, theirs.size);
        assert_eq!(ours.io_unit_size, theirs.io_unit_size);
        assert_eq!(ours.md_page_size, theirs.md_page_size);
        assert!(ours.crc_ok);
        // First blob after the super blob gets the same ids SPDK gave.
        let sb = bs.create_blob(Default::default()).await.unwrap();
        assert_eq!(sb, 0x1_0000_0000);
        bs.set_super_blob(sb).await.unwrap();
        let t = bs
            .create_blob(blobstore::BlobOpts {
                num_clusters: 8,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(t, 0x1_0000_0001);
        bs.unload().await.unwrap();
        let raw = ours_dev.snapshot();
        // Thick blob 1: extent page at md page 2 with clusters 1..8, as in the fixture.
        let ep = inspect::parse_md_page(&raw[(4 + 2) * 4096..(4 + 3) * 4096]).unwrap();
        assert_eq!(
            ep.descriptors,
            vec![inspect::Descriptor::ExtentPage {
                start_cluster: 0,
                clusters: (1..=8).collect()
            }]
        );
    });
}

/// Recreates the first blobs of the `basic` store with the same options and xattrs and
/// checks our md pages are byte-identical to SPDK's (CRC included).
#[test]
fn our_md_pages_are_byte_identical_to_spdk() {
    block_on(async {
        let theirs = load_img("basic/store.img.gz").snapshot();
        let md = |img: &[u8], p: usize| img[(4 + p) * 4096..(5 + p) * 4096].to_vec();
        let xattrs_of = |page: &[u8]| -> Vec<(String, Vec<u8>)> {
            inspect::parse_md_page(page)
                .unwrap()
                .descriptors
                .into_iter()
                .filter_map(|d| match d {
                    inspect::Descriptor::Xattr {
                        internal: false,
                        name,
                        value,
                    } => Some((String::from_utf8(name).unwrap(), value)),
                    _ => None,
                })
                .collect()
        };
        // Cluster size 0: the store's default.
        let (dev, bs) = lvolstore_like(0).await;
        let sb = bs
            .create_blob(blobstore::BlobOpts {
                xattrs: xattrs_of(&md(&theirs, 0)),
                ..Default::default()
            })
            .await
            .unwrap();
        bs.set_super_blob(sb).await.unwrap();
        let thick = bs
            .create_blob(blobstore::BlobOpts {
                num_clusters: 8,
                xattrs: xattrs_of(&md(&theirs, 1)),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!((sb, thick), (0x1_0000_0000, 0x1_0000_0001));
        bs.unload().await.unwrap();
        let ours = dev.snapshot();
        for p in 0..3 {
            assert!(
                md(&ours, p) == md(&theirs, p),
                "md page {p} differs from SPDK's"
            );
        }
    });
}

/// Same for an esnap clone: `eclone2` of the esnap store (never written) at md page 2.
#[test]
fn our_esnap_clone_md_page_is_byte_identical_to_spdk() {
    block_on(async {
        let theirs = load_img("esnap/store.img.gz").snapshot();
        let md = |img: &[u8], p: usize| img[(4 + p) * 4096..(5 + p) * 4096].to_vec();
        let page = inspect::parse_md_page(&md(&theirs, 2)).unwrap();
        let mut xattrs = Vec::new();
        let mut esnap = None;
        for d in page.descriptors {
            if let inspect::Descriptor::Xattr {
                internal,
                name,
                value,
            } = d
            {
                if internal {
                    assert_eq!(name, b"EXTSNAP");
                    esnap = Some(value);
                } else {
                    xattrs.push((String::from_utf8(name).unwrap(), value));
                }
            }
        }
        let dev = MemBsDev::new(4096, 64 * 256);
        let (opts, _f) = esnap_opts();
        let bs = Blobstore::init(dev.clone(), opts).await.unwrap();
        for _ in 0..2 {
            bs.create_blob(Default::default()).await.unwrap();
        }
        let e = bs
            .create_blob(blobstore::BlobOpts {
                num_clusters: 16,
                xattrs,
                esnap_id: esnap,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(e, 0x1_0000_0002);
        assert!(md(&dev.snapshot(), 2) == md(&theirs, 2));
    });
}
