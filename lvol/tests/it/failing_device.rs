//! Failed creates, deletes and loads on a failing store device (error bdev): what the process
//! lists is what a reload finds, and I/O errors are reported as EIO.

use std::sync::Arc;

use bdev_core::backend::error::{ErrorBdev, Injection};
use bdev_core::{IoType, Registry};
use blobstore::ClearMethod;
use futures::executor::block_on;
use lvol::{LvolModule, LvolStore};
use test_support::prelude::*;

const CLUSTER: u32 = 64 * 1024;

/// A registry with the lvol module ([`setup`]) and store `lvs` on the error bdev `EE_m0` over
/// an 8 MiB malloc.
async fn error_store() -> (Registry, LvolModule, Arc<ErrorBdev>, Arc<LvolStore>) {
    let (reg, m) = setup();
    let e = error_over_malloc(&reg, "m0", 8 * MIB).await;
    let s = lvs(&m, "EE_m0", "lvs", CLUSTER).await;
    (reg, m, e, s)
}

#[test]
fn a_create_failing_on_reads_leaves_no_lvol_after_reload() {
    block_on(async {
        let (reg, m, ee, s) = error_store().await;
        let snap_src = thin_lvol(&m, &s, "a", u64::from(CLUSTER)).await;
        let snap = m.create_snapshot(&snap_src, "snap").await.unwrap();
        let free = s.free_clusters();
        // Every read fails: the new blob is written but cannot be opened, nor deleted.
        ee.inject(fail_from(IoType::Read, 0));
        assert_errno!(
            m.create_lvol(
                &s,
                "new",
                2 * u64::from(CLUSTER),
                false,
                ClearMethod::Default,
            )
            .await,
            libc::EIO
        );
        assert_errno!(m.create_clone(&snap, "clone").await, libc::EIO);
        assert_eq!(lvol_names(&s), vec!["a", "snap"]);
        assert!(reg.get("lvs/new").is_none());
        ee.clear();
        m.unload_lvstore(&s).await.unwrap();
        let s = m.load_lvstore("EE_m0").await.unwrap();
        // The load deleted the uncommitted blobs and gave their clusters back.
        assert_eq!(lvol_names(&s), vec!["a", "snap"]);
        assert_eq!(s.blobstore().blob_ids().len(), 3);
        assert_eq!(s.free_clusters(), free);
        // The names are free again.
        thin_lvol(&m, &s, "new", u64::from(CLUSTER)).await;
        let snap = s.lvol_by_name("snap").unwrap();
        m.create_clone(&snap, "clone").await.unwrap();
        m.unload_lvstore(&s).await.unwrap();
        let s = m.load_lvstore("EE_m0").await.unwrap();
        assert_eq!(lvol_names(&s), vec!["a", "clone", "new", "snap"]);
    });
}

#[test]
fn a_delete_failing_on_its_first_write_keeps_the_lvol_and_its_bdev() {
    block_on(async {
        let (reg, m, ee, s) = error_store().await;
        let l = thick_lvol(&m, &s, "keep", u64::from(CLUSTER)).await;
        {
            let d = reg.open(l.unique_id(), true).unwrap();
            write_at(&d, 0, &fill(5, 4096)).await.unwrap();
        }
        ee.inject(fail_from(IoType::Write, 0));
        assert_errno!(m.delete_lvol(&l).await, libc::EIO);
        ee.clear();
        assert_eq!(lvol_names(&s), vec!["keep"]);
        let d = reg.open("lvs/keep", false).unwrap();
        assert_eq!(read_at(&d, 0, 4096).await.unwrap(), fill(5, 4096));
        drop(d);
        m.unload_lvstore(&s).await.unwrap();
        let s = m.load_lvstore("EE_m0").await.unwrap();
        assert_eq!(lvol_names(&s), vec!["keep"]);
        let d = reg.open("lvs/keep", false).unwrap();
        assert_eq!(read_at(&d, 0, 4096).await.unwrap(), fill(5, 4096));
    });
}

#[test]
fn a_delete_failing_on_reads_is_finished_by_the_next_load() {
    block_on(async {
        let (_reg, m, ee, s) = error_store().await;
        let free = s.free_clusters();
        let l = thick_lvol(&m, &s, "gone", u64::from(CLUSTER)).await;
        ee.inject(fail_from(IoType::Read, 0));
        assert_errno!(m.delete_lvol(&l).await, libc::EIO);
        ee.clear();
        // The blob could not be opened again: the lvol is not listed, and its delete mark
        // is on disk.
        assert!(lvol_names(&s).is_empty());
        m.unload_lvstore(&s).await.unwrap();
        let s = m.load_lvstore("EE_m0").await.unwrap();
        assert!(lvol_names(&s).is_empty());
        assert_eq!(s.free_clusters(), free);
    });
}

#[test]
fn read_errors_while_loading_are_eio() {
    block_on(async {
        let (_reg, m, ee, s) = error_store().await;
        thin_lvol(&m, &s, "x", u64::from(CLUSTER)).await;
        m.unload_lvstore(&s).await.unwrap();
        let mut failed = 0;
        for k in 0..40 {
            ee.inject(fail_from(IoType::Read, k));
            match m.load_lvstore("EE_m0").await {
                Err(e) => {
                    assert_eq!(e.errno(), libc::EIO, "read {k}: {e}");
                    failed += 1;
                    ee.clear();
                }
                Ok(s) => {
                    ee.clear();
                    assert_eq!(lvol_names(&s), vec!["x"]);
                    break;
                }
            }
        }
        assert!(failed > 1, "only {failed} loads failed");
    });
}

/// A thick lvol's steady-state request is the store device's own (no future of the lvol's
/// in between): it still counts in both bdevs' statistics, and a failure of the device
/// reaches the lvol's caller as EIO, at once, for reads and writes alike.
#[test]
fn steady_state_requests_count_on_both_bdevs_and_fail_as_eio() {
    block_on(async {
        let (reg, m, ee, s) = error_store().await;
        let l = thick_lvol(&m, &s, "v", 4 * u64::from(CLUSTER)).await;
        let d = open(&reg, l.unique_id(), true);
        let data = pattern(9, 8192, 4096);
        write_at(&d, 8192, &data).await.unwrap();
        let dev_stats = reg.stats("EE_m0").unwrap();
        let before = dev_stats.get();
        let f = d.read_io(16, bdev_core::IoBuf::new(4096, 4096));
        assert!(
            !f.is_pooled(),
            "the store device's request, not one nesting it"
        );
        assert_eq!(&f.await.unwrap()[..], &data[..]);
        let (lv, dev) = (
            reg.stats(l.unique_id()).unwrap().get(),
            reg.stats("EE_m0").unwrap().get(),
        );
        assert_eq!((lv.read.ops, lv.write.ops), (1, 1));
        assert_eq!(
            (
                dev.read.ops - before.read.ops,
                dev.read.bytes - before.read.bytes
            ),
            (1, 4096),
            "the lvol's read is one read of the store's device"
        );
        let dev_reads = dev.read.ops;
        for io in [IoType::Read, IoType::Write] {
            ee.inject(fail_from(io, 0));
            let e = if io == IoType::Read {
                d.read(16, bdev_core::IoBuf::new(4096, 4096))
                    .await
                    .unwrap_err()
            } else {
                write_at(&d, 8192, &data).await.unwrap_err()
            };
            assert_eq!(e.errno(), libc::EIO, "{io:?}: {e}");
            ee.clear();
        }
        let (lv, dev) = (
            reg.stats(l.unique_id()).unwrap().get(),
            reg.stats("EE_m0").unwrap().get(),
        );
        assert_eq!(lv.failed, 2);
        assert_eq!(
            dev.read.ops, dev_reads,
            "the failed read did not count as done"
        );
        // Once the device heals, the lvol reads what it wrote.
        let back = d.read(16, bdev_core::IoBuf::new(4096, 4096)).await.unwrap();
        assert_eq!(&back[..], &data[..]);
    });
}

/// A fresh esnap clone (`ec`, store `lvs` on malloc `m0`) of an error-injecting base
/// (`EE_b0` over malloc `b0`) holding 2 MiB of pattern `seed` (returned).
async fn esnap_clone_of_failing_base(
    seed: u8,
) -> (
    Registry,
    LvolModule,
    Arc<ErrorBdev>,
    Vec<u8>,
    Arc<lvol::Lvol>,
) {
    let (reg, m) = setup();
    let ee = error_over_malloc(&reg, "b0", 4 * MIB).await;
    let base = pattern(seed, 0, 2 * MIB as usize);
    write_at(&open(&reg, "EE_b0", true), 0, &base)
        .await
        .unwrap();
    malloc(&reg, "m0", 16 * MIB, 512).await;
    let s = lvs(&m, "m0", "lvs", CLUSTER).await;
    let ec = m.create_esnap_clone("EE_b0", &s, "ec").await.unwrap();
    (reg, m, ee, base, ec)
}

/// An esnap clone's read of a base cluster is the base's own request (nothing pooled); a
/// failure of the base goes to the retry loop, which reads again and either gets the data
/// or ends in EIO; the base counts every failed try, the clone one result per request.
#[test]
fn esnap_base_reads_are_the_bases_requests_and_base_failures_are_retried() {
    block_on(async {
        let (reg, m, ee, base, ec) = esnap_clone_of_failing_base(3).await;
        let d = open(&reg, ec.unique_id(), false);
        let stats = || {
            (
                reg.stats(ec.unique_id()).unwrap().get(),
                reg.stats("EE_b0").unwrap().get(),
            )
        };
        let (_, b0) = stats();
        let f = d.read_io(16, bdev_core::IoBuf::new(4096, 4096));
        assert!(!f.is_pooled(), "the base's request, not one nesting it");
        assert_eq!(&f.await.unwrap()[..], &base[8192..12288]);
        let (c1, b1) = stats();
        assert_eq!((c1.read.ops, b1.read.ops - b0.read.ops), (1, 1));

        // Two failures, three retries allowed: the read gets the base's data.
        m.set_esnap_retry(3, std::time::Duration::from_millis(1));
        ee.inject(Injection {
            count: 2,
            ..fail_from(IoType::Read, 0)
        });
        let got = d.read(24, bdev_core::IoBuf::new(4096, 4096)).await.unwrap();
        assert_eq!(&got[..], &base[12288..16384]);
        let (c2, b2) = stats();
        assert_eq!(
            (c2.read.ops, c2.failed),
            (2, 0),
            "one success for the clone"
        );
        assert_eq!(
            (b2.failed - b1.failed, b2.read.ops - b1.read.ops),
            (2, 1),
            "the base saw two failed tries and one read"
        );

        // A base that keeps failing: EIO once the retries are spent.
        m.set_esnap_retry(1, std::time::Duration::from_millis(1));
        ee.inject(fail_from(IoType::Read, 0));
        let e = d
            .read(32, bdev_core::IoBuf::new(4096, 4096))
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        let (c3, b3) = stats();
        assert_eq!((c3.read.ops, c3.failed), (2, 1));
        assert_eq!(b3.failed - b2.failed, 2, "the first try and one retry");
        ee.clear();
        let got = d.read(32, bdev_core::IoBuf::new(4096, 4096)).await.unwrap();
        assert_eq!(&got[..], &base[16384..20480]);
        assert!(!ec.is_degraded(), "a failing base is not a missing one");
    });
}

/// A read of an esnap clone's base that fails and waits in its retries does not keep the
/// clone frozen: a snapshot of the clone (which needs the freeze) completes meanwhile, and
/// the read then gets the base's data once the base heals.
#[test]
fn a_retrying_esnap_read_does_not_hold_the_clone_frozen() {
    block_on(async {
        let (reg, m, ee, base, ec) = esnap_clone_of_failing_base(5).await;
        let d = open(&reg, ec.unique_id(), false);
        // Up to 2 s of retries: far longer than the snapshot needs once the freeze is free.
        m.set_esnap_retry(200, std::time::Duration::from_millis(10));
        ee.inject(fail_from(IoType::Read, 0));
        let snapped = std::cell::Cell::new(false);
        let read = d.read(40, bdev_core::IoBuf::new(4096, 4096));
        let snapshot_then_heal = async {
            futures_timer::Delay::new(std::time::Duration::from_millis(30)).await;
            m.create_snapshot(&ec, "snap").await.unwrap();
            snapped.set(true);
            ee.clear();
        };
        // A deadline, so a read that kept the freeze fails the test instead of hanging it.
        let both = Box::pin(async { futures::join!(read, snapshot_then_heal) });
        let deadline = futures_timer::Delay::new(std::time::Duration::from_secs(20));
        let (got, ()) = match futures::future::select(both, deadline).await {
            futures::future::Either::Left((out, _)) => out,
            futures::future::Either::Right(_) => panic!("the snapshot waited for the read"),
        };
        assert!(snapped.get());
        assert_eq!(&got.unwrap()[..], &base[20480..24576]);
        let got = d.read(40, bdev_core::IoBuf::new(4096, 4096)).await.unwrap();
        assert_eq!(&got[..], &base[20480..24576], "through the snapshot");
    });
}
