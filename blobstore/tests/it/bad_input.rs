//! Bad input (issue 3 part 6): hostile or damaged metadata gives a clear error, never a
//! panic, a hang or a write during a failed load. Also checks `inspect::check` findings.

use std::sync::Arc;

use blobstore::inspect::{self, check};
use blobstore::testing::{Fault, MemBsDev};
use blobstore::{Blobstore, BsOpts, IoBuf};
use futures::executor::block_on;
use test_support::prelude::*;

const MIB: u64 = 1 << 20;

fn reseal(page: &mut [u8]) {
    let c = crc32c::crc32c(&page[..4092]);
    page[4092..4096].copy_from_slice(&c.to_le_bytes());
}

/// A clean 16 MiB store with one multi-page blob (id 0x1_0000_0000) and one thick blob.
fn store() -> (Vec<u8>, u64, u64) {
    block_on(async {
        let (d, bs) = mem_store(4096, 16 * MIB / 4096, BsOpts::default()).await;
        let o = clusters(2).thin().xattr("x1", &[1; 3000]);
        let a = create(&bs, o.xattr("x2", &[2; 3000])).await;
        let b = create(&bs, clusters(3)).await;
        let h = bs.open_blob(a).await.unwrap();
        h.write(0, IoBuf::from_slice(&[7u8; 4096], 4096))
            .await
            .unwrap();
        h.close().await.unwrap();
        bs.unload().await.unwrap();
        (d.snapshot(), a, b)
    })
}

fn md_page(img: &mut [u8], md_start: usize, p: usize) -> &mut [u8] {
    &mut img[(md_start + p) * 4096..(md_start + p + 1) * 4096]
}

fn load_err(img: Vec<u8>) -> (i32, String, u64) {
    block_on(async {
        let d = MemBsDev::from_bytes(4096, img);
        d.set_fault(Fault::None);
        let e = Blobstore::load(d.clone(), BsOpts::default())
            .await
            .err()
            .expect("load must fail");
        (e.errno(), e.to_string(), d.writes())
    })
}

#[test]
fn wrong_signature_bad_crc_unknown_version() {
    let (img, ..) = store();
    let mut a = img.clone();
    a[0] = b'X';
    reseal(&mut a[..4096]);
    let (e, m, w) = load_err(a);
    assert_eq!((e, w), (libc::EILSEQ, 0));
    assert!(m.contains("signature"), "{m}");
    let mut b = img.clone();
    b[200] = 1;
    let (e, m, w) = load_err(b);
    assert_eq!((e, w), (libc::EILSEQ, 0));
    assert!(m.contains("crc"), "{m}");
    let mut c = img.clone();
    c[8] = 4;
    reseal(&mut c[..4096]);
    let (e, m, _) = load_err(c);
    assert_eq!(e, libc::EILSEQ);
    assert!(m.contains("version"), "{m}");
    let mut d = img.clone();
    d[80..88].copy_from_slice(&(32 * MIB).to_le_bytes());
    reseal(&mut d[..4096]);
    let (e, m, _) = load_err(d);
    assert_eq!(e, libc::EILSEQ);
    assert!(m.contains("larger than the device"), "{m}");
    // md region outside the device.
    let mut f = img.clone();
    f[52..56].copy_from_slice(&u32::MAX.to_le_bytes());
    reseal(&mut f[..4096]);
    assert_eq!(load_err(f).0, libc::EILSEQ);
    // Unsupported md page size.
    let mut g = img.clone();
    g[92..96].copy_from_slice(&8192u32.to_le_bytes());
    reseal(&mut g[..4096]);
    assert_eq!(load_err(g).0, libc::EINVAL);
    // Too small for a super block.
    assert!(load_err(vec![0; 512]).0 != 0);
}

fn chain_pages(img: &[u8], md_start: usize, root: usize) -> Vec<usize> {
    let mut v = vec![root];
    let mut p = root;
    loop {
        let info = inspect::parse_md_page(&img[(md_start + p) * 4096..][..4096]).unwrap();
        if info.next == u32::MAX {
            return v;
        }
        p = info.next as usize;
        v.push(p);
    }
}

#[test]
fn looping_or_escaping_chain_is_an_error() {
    let (img, a, _) = store();
    let sb = inspect::parse_super(&img[..4096]).unwrap();
    let ms = sb.md_start as usize;
    let chain = chain_pages(&img, ms, (a as u32) as usize);
    assert!(chain.len() >= 2, "{chain:?}");
    for (next, clean) in [
        (chain[0] as u32, 1u8),
        (999_999u32, 1),
        (chain[0] as u32, 0),
    ] {
        let mut m = img.clone();
        let last = *chain.last().unwrap();
        let pg = md_page(&mut m, ms, last);
        pg[4088..4092].copy_from_slice(&next.to_le_bytes());
        reseal(pg);
        m[16] = clean;
        reseal(&mut m[..4096]);
        block_on(async {
            let d = MemBsDev::from_bytes(4096, m);
            let bs = Blobstore::load(d.clone(), BsOpts::default()).await.unwrap();
            let e = bs.open_blob(a).await.err().unwrap();
            assert_eq!(e.errno(), libc::EINVAL, "{e}");
            let r = check(d.clone()).await.unwrap();
            assert!(
                r.problems
                    .iter()
                    .any(|p| p.contains("loops") || p.contains("outside")),
                "{:?}",
                r.problems
            );
        });
    }
}

#[test]
fn bad_md_crc_and_bad_flags() {
    let (img, a, b) = store();
    let sb = inspect::parse_super(&img[..4096]).unwrap();
    let ms = sb.md_start as usize;
    let mut m = img.clone();
    md_page(&mut m, ms, (b as u32) as usize)[40] ^= 0x55;
    block_on(async {
        let d = MemBsDev::from_bytes(4096, m);
        let bs = Blobstore::load(d.clone(), BsOpts::default()).await.unwrap();
        let e = bs.open_blob(b).await.err().unwrap();
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().contains("crc"), "{e}");
        bs.open_blob(a).await.unwrap().close().await.unwrap();
        bs.unload().await.unwrap();
        let r = check(d).await.unwrap();
        assert!(
            r.problems
                .iter()
                .any(|p| p.contains(&format!("bad crc at md page {}", b as u32))),
            "{:?}",
            r.problems
        );
    });
    // Unknown invalid flag bit.
    let mut m = img.clone();
    let pg = md_page(&mut m, ms, (b as u32) as usize);
    pg[16 + 5] |= 0x10;
    reseal(pg);
    block_on(async {
        let d = MemBsDev::from_bytes(4096, m);
        let bs = Blobstore::load(d, BsOpts::default()).await.unwrap();
        let e = bs.open_blob(b).await.err().unwrap();
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().contains("invalid_flags"), "{e}");
    });
}

#[test]
fn check_reports_leaks_and_double_ownership() {
    let (img, a, b) = store();
    let sb = inspect::parse_super(&img[..4096]).unwrap();
    block_on(async {
        let r = check(MemBsDev::from_bytes(4096, img.clone()))
            .await
            .unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.blobs, 2);
    });
    // Leaked cluster: set an extra bit in the cluster mask.
    let mut m = img.clone();
    let off = sb.used_cluster_mask_start as usize * 4096 + 5 + 1;
    m[off] |= 0x80; // cluster 15
    block_on(async {
        let r = check(MemBsDev::from_bytes(4096, m)).await.unwrap();
        assert_eq!(
            r.problems,
            vec!["leaked cluster 15: set in the mask, owned by no blob"]
        );
    });
    // Double ownership: point blob a's extent page at one of b's clusters.
    let ms = sb.md_start as usize;
    let ep_of = |id: u64| {
        chain_pages(&img, ms, (id as u32) as usize)
            .into_iter()
            .find_map(|p| {
                let pg = inspect::parse_md_page(&img[(ms + p) * 4096..][..4096]).unwrap();
                pg.descriptors.iter().find_map(|d| match d {
                    inspect::Descriptor::ExtentTable { entries, .. } => {
                        entries.iter().find(|e| e.0 != 0).map(|e| e.0 as usize)
                    }
                    _ => None,
                })
            })
            .unwrap()
    };
    let (epa, epb) = (ep_of(a), ep_of(b));
    let bpage = inspect::parse_md_page(&img[(ms + epb) * 4096..][..4096]).unwrap();
    let bc = match &bpage.descriptors[0] {
        inspect::Descriptor::ExtentPage { clusters, .. } => clusters[0],
        _ => panic!(),
    };
    let mut m = img.clone();
    let pg = md_page(&mut m, ms, epa);
    pg[16 + 9..16 + 13].copy_from_slice(&bc.to_le_bytes());
    reseal(pg);
    block_on(async {
        let r = check(MemBsDev::from_bytes(4096, m)).await.unwrap();
        assert!(
            r.problems
                .iter()
                .any(|p| p.contains(&format!("cluster {bc} is owned twice"))),
            "{:?}",
            r.problems
        );
    });
}

/// A descriptor cut short (a header cut by the end of the descriptor area, an xattr body too
/// short for its length fields) is reported as malformed and refused at open, never read as
/// zero-valued fields.
#[test]
fn truncated_descriptors_are_rejected() {
    let (mut img, a, _) = store();
    let sb = inspect::parse_super(&img[..4096]).unwrap();
    let ms = sb.md_start as usize;
    let root = (a & 0xffff_ffff) as usize;
    // Short buffers are errors, not pages of zeroes.
    for n in [0usize, 4, 4095] {
        let e = inspect::parse_md_page(&img[(ms + root) * 4096..][..n]).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "{e}");
        assert!(inspect::parse_super(&img[..n]).is_err());
    }
    assert!(inspect::parse_mask(&[0u8; 4]).is_err());

    // Root page: padding up to 3 bytes before the end of the area, then a FLAGS type byte
    // whose length field is cut off.
    let orig = md_page(&mut img, ms, root).to_vec();
    {
        let pg = md_page(&mut img, ms, root);
        let area = &mut pg[16..16 + 4072];
        area.fill(0);
        area[0] = 0; // padding descriptor
        area[1..5].copy_from_slice(&(4072u32 - 5 - 3).to_le_bytes());
        area[4069] = 3;
        area[4070] = 24;
        reseal(pg);
    }
    let info = inspect::parse_md_page(md_page(&mut img, ms, root)).unwrap();
    assert!(info.crc_ok);
    assert_eq!(
        info.descriptors.last(),
        Some(&inspect::Descriptor::Unknown {
            desc_type: 3,
            length: 0
        }),
        "{:?}",
        info.descriptors
    );
    let e = block_on(async {
        let d = MemBsDev::from_bytes(4096, img.clone());
        let bs = Blobstore::load(d, BsOpts::default()).await.unwrap();
        bs.open_blob(a).await.err().expect("open must fail")
    });
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(e.to_string().contains("malformed descriptor"), "{e}");

    // An xattr descriptor whose body (3 bytes) cannot hold its two length fields.
    {
        let pg = md_page(&mut img, ms, root);
        pg.copy_from_slice(&orig);
        let area = &mut pg[16..16 + 4072];
        area.fill(0);
        area[0] = 2;
        area[1..5].copy_from_slice(&3u32.to_le_bytes());
        area[5..8].copy_from_slice(&[9, 0, 1]);
        reseal(pg);
    }
    let info = inspect::parse_md_page(md_page(&mut img, ms, root)).unwrap();
    assert_eq!(
        info.descriptors,
        vec![inspect::Descriptor::Unknown {
            desc_type: 2,
            length: 3
        }]
    );
}

#[test]
fn failed_load_writes_nothing() {
    let (mut img, ..) = store();
    // Dirty store whose md region is fine but whose super has a bad bstype request.
    img[16] = 0;
    reseal(&mut img[..4096]);
    block_on(async {
        let d = MemBsDev::from_bytes(4096, img.clone());
        let o = BsOpts {
            bstype: *b"NOPE\0\0\0\0\0\0\0\0\0\0\0\0",
            ..Default::default()
        };
        assert_eq!(
            Blobstore::load(d.clone(), o).await.err().unwrap().errno(),
            libc::ENXIO
        );
        assert!(d.snapshot() == img);
    });
}

#[test]
fn fuzz_corpus_and_regressions_replay() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for dir in ["corpus/super_block", "corpus/md_page", "regressions"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in rd.flatten() {
            let data = std::fs::read(e.path()).unwrap();
            replay(&data);
            n += 1;
        }
    }
    assert!(n > 0, "no fuzz inputs found under {}", root.display());
}

/// What the fuzz targets do: parse, then try a full load on a device made of the bytes.
fn replay(data: &[u8]) {
    let _ = inspect::parse_super(data);
    let _ = inspect::parse_md_page(data);
    let _ = inspect::parse_mask(data);
    let mut img = data.to_vec();
    img.resize(img.len().max(64 * 4096).div_ceil(4096) * 4096, 0);
    // As the fuzz target: inputs with an odd first byte get every page's CRC fixed.
    if data.first().is_some_and(|b| b & 1 == 1) {
        for page in img.chunks_mut(4096) {
            reseal(page);
        }
    }
    block_on(async {
        let d: Arc<MemBsDev> = MemBsDev::from_bytes(4096, img);
        if let Ok(bs) = Blobstore::load(d.clone(), BsOpts::default()).await {
            for id in bs.blob_ids() {
                if let Ok(b) = bs.open_blob(id).await {
                    let _ = b.read(0, IoBuf::new(4096, 4096)).await;
                    let _ = b.close().await;
                }
            }
        }
        let _ = check(d).await;
    });
}
