//! Failed creates, deletes and loads on a failing store device (error bdev): what the process
//! lists is what a reload finds, and I/O errors are reported as EIO.

use std::sync::Arc;

use bdev_core::backend::error::ErrorBdev;
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
