//! Issue 14, finding 2 (blobstore side): sizes are checked against what the store can
//! describe before anything is allocated (a clean EFBIG / ENOSPC, never an abort), and a
//! thin blob's cluster map costs memory for what it owns, not for its size. A counting
//! allocator measures the heap the calling thread holds at its peak.

use blobstore::testing::MemBsDev;
use blobstore::{BlobOpts, Blobstore, BsOpts, IoBuf};
use futures::executor::block_on;
use test_support::alloc::{peak_during, CountingAlloc};

#[global_allocator]
static A: CountingAlloc = CountingAlloc;

const BLK: u32 = 4096;
const CLUSTER: u32 = 16384;
const LPC: u64 = (CLUSTER / BLK) as u64;
/// The largest blob a store describes, in clusters (2^28).
const MAX: u64 = 1 << 28;

fn opts() -> BsOpts {
    BsOpts {
        cluster_size: CLUSTER,
        ..Default::default()
    }
}

fn thin(n: u64) -> BlobOpts {
    BlobOpts {
        num_clusters: n,
        thin: true,
        ..Default::default()
    }
}

#[test]
fn oversized_requests_get_a_clean_error_before_any_allocation() {
    let dev = MemBsDev::new(BLK, 256);
    let bs = block_on(Blobstore::init(dev.clone(), opts())).unwrap();
    // 2^44 and 2^64-1 bytes worth of clusters, thin and thick.
    for n in [
        MAX + 1,
        (1u64 << 44) / u64::from(CLUSTER),
        u64::MAX / u64::from(CLUSTER),
        u64::MAX,
    ] {
        for t in [true, false] {
            let o = BlobOpts { thin: t, ..thin(n) };
            let mut r = None;
            let peak = peak_during(|| r = Some(block_on(bs.create_blob(o))));
            let e = r
                .unwrap()
                .err()
                .unwrap_or_else(|| panic!("create of {n} clusters succeeded"));
            assert_eq!(
                e.errno(),
                libc::EFBIG,
                "create of {n} clusters (thin {t}): {e}"
            );
            assert!(peak < 64 << 10, "refusing {n} clusters cost {peak} bytes");
        }
    }
    block_on(async {
        // Thick within the limit but beyond the free space: ENOSPC, nothing left behind.
        let free = bs.free_clusters();
        let e = bs
            .create_blob(BlobOpts {
                num_clusters: MAX,
                ..Default::default()
            })
            .await
            .err()
            .unwrap();
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(bs.free_clusters(), free);
        assert!(bs.blob_ids().is_empty());
        // Resize past the limit: EFBIG, size unchanged.
        let id = bs.create_blob(thin(2)).await.unwrap();
        let b = bs.open_blob(id).await.unwrap();
        for n in [MAX + 1, u64::MAX] {
            assert_eq!(b.resize(n).await.err().unwrap().errno(), libc::EFBIG);
            assert_eq!(b.num_clusters(), 2);
        }
        b.close().await.unwrap();
        bs.unload().await.unwrap();
    });
}

#[test]
fn a_huge_thin_blob_costs_what_it_owns() {
    let dev = MemBsDev::new(BLK, 256);
    let bs = block_on(Blobstore::init(dev.clone(), opts())).unwrap();
    // 2^28 clusters of 16 KiB: a 4 TiB thin blob on a 1 MiB device (1 PiB with 4 MiB
    // clusters, as lvol uses). A map sized by the virtual size would be 1 GiB.
    let peak = peak_during(|| {
        block_on(async {
            let id = bs.create_blob(thin(MAX)).await.unwrap();
            let b = bs.open_blob(id).await.unwrap();
            assert_eq!(b.num_clusters(), MAX);
            // Write the last block and the first: two clusters, two extent pages.
            let last = MAX * LPC - 1;
            let mut buf = IoBuf::new(BLK as usize, 4096);
            buf.fill(0x5a);
            b.write(last, buf.clone()).await.unwrap();
            b.write(0, buf).await.unwrap();
            assert_eq!(b.num_allocated_clusters(), 2);
            let r = b.read(last, IoBuf::new(BLK as usize, 4096)).await.unwrap();
            assert!(r.iter().all(|&x| x == 0x5a));
            let r = b
                .read(LPC * 1000, IoBuf::new(BLK as usize, 4096))
                .await
                .unwrap();
            assert!(r.iter().all(|&x| x == 0));
            assert_eq!(b.next_allocated_io_unit(LPC), Some(last - last % LPC));
            // Shrink below the last cluster and grow back: nothing materialises.
            b.resize(MAX / 2).await.unwrap();
            assert_eq!(b.num_allocated_clusters(), 1);
            b.resize(MAX).await.unwrap();
            b.close().await.unwrap();
            // Inflating it would need 2^28 clusters: refused before any list is built.
            let e = bs.inflate_blob(id).await.err().unwrap();
            assert_eq!(e.errno(), libc::ENOSPC);
            // A snapshot and a clone of it are as cheap.
            let s = bs.create_snapshot(id, vec![]).await.unwrap();
            let c = bs.create_clone(s, vec![]).await.unwrap();
            let b = bs.open_blob(c).await.unwrap();
            let r = b.read(0, IoBuf::new(BLK as usize, 4096)).await.unwrap();
            assert!(r.iter().all(|&x| x == 0x5a));
            b.close().await.unwrap();
        })
    });
    eprintln!("2^28-cluster thin blob: peak heap {peak} bytes");
    assert!(
        peak < 1 << 20,
        "a 2^28-cluster thin blob cost {peak} bytes of heap"
    );
    // And after a reload (clean and dirty), from disk.
    block_on(bs.unload()).unwrap();
    let peak = peak_during(|| {
        block_on(async {
            for recover in [false, true] {
                let bs = Blobstore::load(
                    dev.clone(),
                    BsOpts {
                        force_recover: recover,
                        ..opts()
                    },
                )
                .await
                .unwrap();
                for id in bs.blob_ids() {
                    let b = bs.open_blob(id).await.unwrap();
                    assert_eq!(b.num_clusters(), MAX);
                    b.close().await.unwrap();
                }
                bs.unload().await.unwrap();
            }
        })
    });
    eprintln!("2^28-cluster thin blob: peak heap {peak} bytes over two loads");
    assert!(
        peak < 1 << 20,
        "loading a 2^28-cluster thin blob cost {peak} bytes"
    );
    let rep = block_on(blobstore::inspect::check(dev)).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}
