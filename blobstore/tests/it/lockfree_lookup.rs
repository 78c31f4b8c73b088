//! The lock-free lookup of the direct path (`Blob::direct`, issue 15): its mirror of the
//! cluster map, flags and back device says what the blob's state says after every kind of
//! operation, a request goes to the right place while clusters are allocated, released,
//! moved to a snapshot, copied back and resized under it, and no request ever lands in a
//! cluster of another blob.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use blobstore::testing::{Fault, MemBsDev};
use blobstore::{Blob, BlobId, BsDev, BsOpts, DirectTarget, EsnapDevFactory, IoBuf};
use futures::executor::block_on;
use test_support::prelude::*;

const BLK: usize = 4096;
/// Blocks (io units) per 1 MiB cluster.
const LPC: u64 = 256;

/// A block whose every byte says `tag`, with the block number and tag at the front.
fn tagged(blk: u64, tag: u64) -> IoBuf {
    let mut b = IoBuf::new(BLK, 4096);
    b.fill((tag % 251) as u8 + 1);
    b[..8].copy_from_slice(&blk.to_le_bytes());
    b[8..16].copy_from_slice(&tag.to_le_bytes());
    b
}

fn check_live(b: &Blob, what: &str) {
    assert!(
        b.live_map_matches(),
        "blob {:#x}: the lock-free mirror differs from the state after {what}",
        b.id()
    );
}

/// A write the way lvol issues it: straight to the store's device when `direct` allows,
/// else the general path. Returns whether it went direct.
async fn write_as_lvol(b: &Blob, dev: &MemBsDev, blk: u64, buf: IoBuf) -> bool {
    if let Some(d) = b.direct(blk, BLK, true) {
        if let DirectTarget::Dev(lba) = d.target() {
            dev.write(lba, buf).await.unwrap();
            return true;
        }
    }
    b.write(blk, buf).await.unwrap();
    false
}

/// A read the way lvol issues it (see [`write_as_lvol`]).
async fn read_as_lvol(b: &Blob, dev: &MemBsDev, blk: u64) -> (IoBuf, bool) {
    let buf = IoBuf::new(BLK, 4096);
    if let Some(d) = b.direct(blk, BLK, false) {
        match d.target() {
            DirectTarget::Dev(lba) => return (dev.read(lba, buf).await.unwrap(), true),
            DirectTarget::Zero => {
                let mut buf = buf;
                buf.fill(0);
                return (buf, true);
            }
            DirectTarget::Esnap(e, lba) => return (e.read(lba, buf).await.unwrap(), true),
        }
    }
    (b.read(blk, buf).await.unwrap(), false)
}

/// What the mutator's part of the blob holds: per cluster, the byte of every block, 0 for
/// zeroes.
struct Region {
    first: u64,
    bytes: Vec<u8>,
}

impl Region {
    async fn verify(&self, b: &Blob, what: &str) {
        for (j, &want) in self.bytes.iter().enumerate() {
            let c = self.first + j as u64;
            let r = b
                .read(c * LPC, IoBuf::new(LPC as usize * BLK, 4096))
                .await
                .unwrap();
            assert!(
                r.iter().all(|&x| x == want),
                "cluster {c} after {what}: want {want:#x}, found {:#x}",
                r.iter().find(|&&x| x != want).unwrap()
            );
        }
    }
}

/// Several threads issue direct reads and writes on the allocated clusters of one blob
/// while another allocates its other clusters, releases them, snapshots it (the clusters
/// move to the snapshot) and copies them back (decouple, inflate, the merge of a delete),
/// deletes the snapshot (its clusters freed and reused) and resizes it. Every block read
/// holds what its thread last wrote, the mutator's clusters hold what it wrote, and a thick
/// blob and a second thin blob written by the mutator are never touched.
#[test]
fn direct_io_stays_right_while_the_map_changes_under_it() {
    const THREADS: u64 = 3;
    const HOT: u64 = 4; // clusters the I/O threads use
    const N: u64 = 12; // clusters of the blob
    let (dev, bs) = block_on(mem_store(4096, 32768, BsOpts::default()));
    let (b, victim, w) = block_on(async {
        let victim = create(&bs, clusters(4)).await;
        let v = bs.open_blob(victim).await.unwrap();
        v.write(0, filled(4 * LPC as usize * BLK, 0xee))
            .await
            .unwrap();
        v.close().await.unwrap();
        let id = create(&bs, clusters(N).thin()).await;
        let w = create(&bs, clusters(8).thin()).await;
        let b = bs.open_blob(id).await.unwrap();
        for blk in 0..HOT * LPC {
            b.write(blk, tagged(blk, 0)).await.unwrap();
        }
        b.flush().await.unwrap();
        (b, victim, w)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let direct_ios = Arc::new(AtomicU64::new(0));
    let ios: Vec<_> = (0..THREADS)
        .map(|t| {
            let (b, dev, stop, direct_ios) =
                (b.clone(), dev.clone(), stop.clone(), direct_ios.clone());
            std::thread::spawn(move || {
                block_on(async move {
                    let mut model: HashMap<u64, u64> = HashMap::new();
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) || n < 200 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let blk = (x % (HOT * LPC / THREADS)) * THREADS + t;
                        n += 1;
                        let went = if x & 0x300 == 0 {
                            let tag = (t << 32) | n;
                            model.insert(blk, tag);
                            write_as_lvol(&b, &dev, blk, tagged(blk, tag)).await
                        } else {
                            let (r, went) = read_as_lvol(&b, &dev, blk).await;
                            let want = tagged(blk, model.get(&blk).copied().unwrap_or(0));
                            assert!(
                                r[..] == want[..],
                                "thread {t}: block {blk} holds other data"
                            );
                            went
                        };
                        if went {
                            direct_ios.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n
                })
            })
        })
        .collect();
    block_on(async {
        let mut region = Region {
            first: HOT,
            bytes: vec![0; (N - HOT) as usize],
        };
        let wb = bs.open_blob(w).await.unwrap();
        let mut wbytes = [0u8; 8];
        let mut snap: Option<BlobId> = None;
        for round in 0..36u64 {
            let fill = (round % 200) as u8 + 2;
            let what;
            match round % 6 {
                0 => {
                    // First writes (or overwrites) of half the mutator's clusters.
                    for j in (round as usize / 6 % 2..region.bytes.len()).step_by(2) {
                        let c = HOT + j as u64;
                        b.write(c * LPC, filled(LPC as usize * BLK, fill))
                            .await
                            .unwrap();
                        region.bytes[j] = fill;
                    }
                    what = "first writes";
                }
                1 => {
                    // Whole clusters released (a thin blob with nothing behind it) or
                    // unmapped in place.
                    let j = (round as usize / 6) % region.bytes.len();
                    b.unmap((HOT + j as u64) * LPC, LPC).await.unwrap();
                    b.unmap((HOT + 1 + j as u64 % 3) * LPC, LPC).await.unwrap();
                    region.bytes[j] = 0;
                    region.bytes[1 + j % 3] = 0;
                    what = "unmap";
                }
                2 => {
                    let s = bs.create_snapshot(b.id(), vec![]).await.unwrap();
                    check_live(&b, "snapshot");
                    region.verify(&b, "snapshot").await;
                    if round % 12 == 2 {
                        bs.decouple_parent(b.id()).await.unwrap();
                        what = "snapshot, decouple";
                    } else {
                        bs.inflate_blob(b.id()).await.unwrap();
                        what = "snapshot, inflate";
                    }
                    snap = Some(s);
                }
                3 => {
                    // The copied-from snapshot goes: its clusters are freed, and the other
                    // blob's first writes reuse them.
                    bs.delete_blob(snap.take().unwrap()).await.unwrap();
                    for (k, wb_byte) in wbytes.iter_mut().enumerate() {
                        if *wb_byte == 0 || k as u64 % 2 == round % 2 {
                            let byte = fill.wrapping_add(k as u8) | 1;
                            wb.write(k as u64 * LPC, filled(LPC as usize * BLK, byte))
                                .await
                                .unwrap();
                            *wb_byte = byte;
                        }
                    }
                    what = "snapshot delete";
                }
                4 => {
                    // A snapshot deleted while the blob is its clone: merged back.
                    let s = bs.create_snapshot(b.id(), vec![]).await.unwrap();
                    b.write(HOT * LPC, filled(LPC as usize * BLK, fill))
                        .await
                        .unwrap();
                    region.bytes[0] = fill;
                    bs.delete_blob(s).await.unwrap();
                    what = "snapshot, merge on delete";
                }
                _ => {
                    b.resize(N + 3).await.unwrap();
                    b.write((N + 1) * LPC, filled(LPC as usize * BLK, fill))
                        .await
                        .unwrap();
                    check_live(&b, "grow");
                    b.resize(N - 1).await.unwrap();
                    region.bytes[(N - 1 - HOT) as usize] = 0;
                    check_live(&b, "shrink");
                    b.resize(N).await.unwrap();
                    what = "resize";
                }
            }
            check_live(&b, what);
            check_live(&wb, what);
            region.verify(&b, what).await;
        }
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for h in ios {
            total += h.join().expect("an I/O thread failed");
        }
        let direct = direct_ios.load(Ordering::Relaxed);
        assert!(
            direct > 0 && direct < total,
            "{direct} of {total} requests went direct"
        );
        region.verify(&b, "the end").await;
        for (k, &byte) in wbytes.iter().enumerate() {
            let r = wb
                .read(k as u64 * LPC, IoBuf::new(LPC as usize * BLK, 4096))
                .await
                .unwrap();
            assert!(
                r.iter().all(|&x| x == byte),
                "the other thin blob's cluster {k}"
            );
        }
        wb.close().await.unwrap();
        b.close().await.unwrap();
        let v = read_units(&bs, victim, 0, 4 * LPC).await;
        assert!(
            v.iter().all(|&x| x == 0xee),
            "a request landed in the thick blob"
        );
        unload_and_check(&dev, bs).await;
    });
}

/// A released cluster leaves the direct path at once (a write goes to the general path, a
/// read reads zeroes), and a first write brings it back.
#[test]
fn direct_follows_unmap_and_first_write() {
    block_on(async {
        let (dev, bs) = mem_store(4096, 16384, BsOpts::default()).await;
        let id = create(&bs, clusters(4).thin()).await;
        let b = bs.open_blob(id).await.unwrap();
        assert!(
            b.direct(LPC, BLK, true).is_none(),
            "unallocated: no direct write"
        );
        assert!(matches!(
            b.direct(LPC, BLK, false).unwrap().target(),
            DirectTarget::Zero
        ));
        assert!(!write_as_lvol(&b, &dev, LPC + 3, tagged(LPC + 3, 1)).await);
        let lba = match b.direct(LPC + 3, BLK, true).unwrap().target() {
            DirectTarget::Dev(lba) => lba,
            _ => panic!("a written cluster must go direct"),
        };
        let r = dev.read(lba, IoBuf::new(BLK, 4096)).await.unwrap();
        assert_eq!(
            &r[..],
            &tagged(LPC + 3, 1)[..],
            "direct target is the cluster written"
        );
        check_live(&b, "a first write");
        b.unmap(LPC, LPC).await.unwrap();
        check_live(&b, "unmap");
        assert!(
            b.direct(LPC + 3, BLK, true).is_none(),
            "released: no direct write"
        );
        assert!(matches!(
            b.direct(LPC + 3, BLK, false).unwrap().target(),
            DirectTarget::Zero
        ));
        let (r, _) = read_as_lvol(&b, &dev, LPC + 3).await;
        assert!(r.iter().all(|&x| x == 0));
        assert!(!write_as_lvol(&b, &dev, LPC + 5, tagged(LPC + 5, 2)).await);
        assert!(
            b.direct(LPC + 5, BLK, true).is_some(),
            "written again: direct"
        );
        assert!(write_as_lvol(&b, &dev, LPC + 6, tagged(LPC + 6, 3)).await);
        let (r, went) = read_as_lvol(&b, &dev, LPC + 6).await;
        assert!(went);
        assert_eq!(&r[..], &tagged(LPC + 6, 3)[..]);
        // A read-only blob takes no direct writes, and still direct reads.
        b.set_read_only().unwrap();
        b.sync_md().await.unwrap();
        check_live(&b, "set_read_only");
        assert!(b.direct(LPC + 5, BLK, true).is_none());
        assert!(b.direct(LPC + 5, BLK, false).is_some());
        b.close().await.unwrap();
        unload_and_check(&dev, bs).await;
    });
}

const EID: &[u8] = b"lockfree-esnap\0";

struct Factory(Arc<MemBsDev>);

#[async_trait]
impl EsnapDevFactory for Factory {
    async fn create(&self, _b: BlobId, _id: &[u8]) -> blobstore::Result<Option<Arc<dyn BsDev>>> {
        Ok(Some(self.0.clone() as Arc<dyn BsDev>))
    }
}

/// The esnap device of an unallocated cluster is lent for the hold, and a swap of the
/// device (or its removal) is what the next request sees.
#[test]
fn esnap_target_follows_the_device() {
    block_on(async {
        let mut base = vec![0u8; 4 << 20];
        for (i, b) in base.chunks_mut(BLK).enumerate() {
            b.fill((i % 250) as u8 + 1);
        }
        let esnap = MemBsDev::read_only(4096, base.clone());
        let dev = MemBsDev::new(4096, 16384);
        let opts = BsOpts {
            esnap_factory: Some(Arc::new(Factory(esnap.clone()))),
            ..Default::default()
        };
        let bs = init_store(&dev, opts).await;
        let id = create(&bs, clusters(4).esnap(EID)).await;
        let b = bs.open_blob(id).await.unwrap();
        check_live(&b, "open of an esnap clone");
        let (r, went) = read_as_lvol(&b, &dev, 7).await;
        assert!(
            went,
            "an unallocated cluster of a healthy esnap goes direct"
        );
        assert_eq!(&r[..], &base[7 * BLK..8 * BLK]);
        {
            let d = b.direct(7, BLK, false).unwrap();
            match d.target() {
                DirectTarget::Esnap(e, lba) => {
                    assert_eq!(lba, 7);
                    assert!(std::ptr::addr_eq(e, Arc::as_ptr(&esnap)), "not the esnap");
                }
                _ => panic!("an unallocated cluster of an esnap clone reads the esnap"),
            }
        }
        b.set_esnap_dev(None).await.unwrap();
        check_live(&b, "set_esnap_dev(None)");
        assert!(
            b.direct(7, BLK, false).is_none(),
            "no device: the general path"
        );
        let other = MemBsDev::read_only(4096, vec![0x42; 4 << 20]);
        b.set_esnap_dev(Some(other.clone() as Arc<dyn BsDev>))
            .await
            .unwrap();
        check_live(&b, "set_esnap_dev(other)");
        let (r, went) = read_as_lvol(&b, &dev, 7).await;
        assert!(went);
        assert!(
            r.iter().all(|&x| x == 0x42),
            "the swapped-in device is read"
        );
        other.set_degraded(true);
        assert!(
            b.direct(7, BLK, false).is_none(),
            "degraded: the general path"
        );
        other.set_degraded(false);
        b.close().await.unwrap();
        bs.unload().await.unwrap();
    });
}

/// The mirror says what the state says after each kind of operation, on both kinds of
/// extent layout, for a blob spanning several mirror directories (2^18 clusters each).
#[test]
fn the_mirror_matches_after_every_operation() {
    for rle in [false, true] {
        block_on(async {
            let (dev, bs) = mem_store(4096, 16384, BsOpts::default()).await;
            let opts = if rle {
                clusters(8).thin().rle()
            } else {
                clusters(8).thin()
            };
            let id = create(&bs, opts).await;
            let b = bs.open_blob(id).await.unwrap();
            check_live(&b, "open");
            b.write(2 * LPC, tagged(0, 1)).await.unwrap();
            check_live(&b, "a first write");
            b.write_zeroes(3 * LPC, LPC).await.unwrap();
            check_live(&b, "write_zeroes");
            b.flush().await.unwrap();
            check_live(&b, "flush");
            b.unmap(2 * LPC, LPC).await.unwrap();
            check_live(&b, "unmap");
            b.write(5 * LPC, tagged(0, 2)).await.unwrap();
            // Huge and back: directories appear and go.
            let big = (1u64 << 19) + 7;
            b.resize(big).await.unwrap();
            check_live(&b, "a grow across directories");
            b.write((big - 1) * LPC, tagged(0, 3)).await.unwrap();
            b.write((1 << 18) * LPC, tagged(0, 4)).await.unwrap();
            check_live(&b, "first writes far out");
            assert!(b.direct((big - 1) * LPC, BLK, true).is_some());
            b.unmap((1 << 18) * LPC, LPC).await.unwrap();
            check_live(&b, "the last cluster of a directory released");
            b.resize(9).await.unwrap();
            check_live(&b, "a shrink");
            assert!(b.direct(8 * LPC, BLK, false).is_some());
            assert!(b.direct(9 * LPC, BLK, false).is_none(), "beyond the end");
            // A failed md write puts the old map back.
            dev.set_fault(Fault::FailAfter(0));
            assert!(b.resize(12).await.is_err());
            dev.set_fault(Fault::None);
            check_live(&b, "a failed resize");
            assert_eq!(b.num_clusters(), 9);
            let s = bs.create_snapshot(id, vec![]).await.unwrap();
            check_live(&b, "snapshot");
            assert!(
                b.direct(5 * LPC, BLK, false).is_none(),
                "a clone reads its parent"
            );
            let sb = bs.open_blob(s).await.unwrap();
            check_live(&sb, "open of the snapshot");
            assert!(sb.direct(5 * LPC, BLK, false).is_some());
            assert!(
                sb.direct(5 * LPC, BLK, true).is_none(),
                "a snapshot is read-only"
            );
            let c = bs.create_clone(s, vec![]).await.unwrap();
            let cb = bs.open_blob(c).await.unwrap();
            check_live(&cb, "open of a clone");
            bs.inflate_blob(c).await.unwrap();
            check_live(&cb, "inflate");
            assert!(cb.direct(5 * LPC, BLK, true).is_some());
            cb.close().await.unwrap();
            bs.decouple_parent(id).await.unwrap();
            check_live(&b, "decouple");
            bs.set_parent(id, s).await.unwrap();
            check_live(&b, "set_parent");
            sb.close().await.unwrap();
            bs.delete_blob(c).await.unwrap();
            bs.delete_blob(s).await.unwrap();
            check_live(&b, "the merge of a delete");
            assert!(b.direct(5 * LPC, BLK, true).is_some());
            let b2 = bs.open_blob(id).await.unwrap();
            check_live(&b2, "a second open");
            b2.close().await.unwrap();
            check_live(&b, "a close of a second handle");
            b.close().await.unwrap();
            let b = bs.open_blob(id).await.unwrap();
            check_live(&b, "reopen");
            b.close().await.unwrap();
            unload_and_check(&dev, bs).await;
        });
    }
}
