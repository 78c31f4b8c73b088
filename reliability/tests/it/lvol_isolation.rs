//! No volume's bytes in another, at the lvol level, without a restart between the steps
//! (issue 14 finding 1): for every backend (aio with and without `fallocate`, malloc), store
//! clear method and lvol clear method, a thick lvol is filled with a secret, then freed by a
//! path (delete, shrink, inflate of a clone then delete of it and its snapshot, a thick
//! create that fails half-way after the delete), and a new thick lvol over every free
//! cluster must read back no byte of the secret.

use std::sync::Arc;

use crate::common::*;
use bdev_core::backend::aio::{AioBdev, AioOpts};
use bdev_core::backend::error::{ErrorBdev, Injection};
use bdev_core::IoType;
use blobstore::ClearMethod;
use futures::executor::block_on;
use lvol::{LvolModule, LvsClearMethod, LvsOpts};

const STORE: u64 = 8 * MIB;
const SECRET: u8 = 0xcc;

/// Creates made to fail half-way in their zeroing (the path must not be vacuous).
static SCRUB_FAILURES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[derive(Clone, Copy, Debug)]
enum Backend {
    Aio { fallocate: bool },
    Malloc,
}

#[derive(Clone, Copy, Debug)]
enum Path {
    Delete,
    Shrink,
    InflateThenDelete,
    /// Delete, then a thick create over the freed clusters fails: its metadata write (or,
    /// with `scrub`, its first zeroing write) gets EIO after its clusters were claimed.
    DeleteThenFailedCreate {
        scrub: bool,
    },
}

async fn open_bdev(reg: &bdev_core::Registry, lvol: &lvol::Lvol) -> Arc<bdev_core::Descriptor> {
    Arc::new(reg.open(lvol.unique_id(), true).expect("open lvol bdev"))
}

fn no_secret(data: &[u8]) -> Option<usize> {
    data.iter().position(|&b| b == SECRET)
}

fn case(backend: Backend, store_cm: LvsClearMethod, lvol_cm: ClearMethod, path: Path) {
    let dir = tempfile::tempdir().unwrap();
    let label = format!("{backend:?} store {store_cm:?} lvol {lvol_cm:?} {path:?}");
    block_on(async {
        let (reg, m): (_, LvolModule) = setup();
        match backend {
            Backend::Aio { fallocate } => {
                let file = dir.path().join("store.img");
                std::fs::File::create(&file)
                    .unwrap()
                    .set_len(STORE)
                    .unwrap();
                let dev = AioBdev::create(AioOpts {
                    name: "base".into(),
                    filename: file,
                    block_len: Some(4096),
                    fallocate,
                    ..Default::default()
                })
                .unwrap();
                reg.register(dev).await.unwrap();
            }
            Backend::Malloc => malloc(&reg, "base", STORE, 4096).await,
        }
        // Every store sits on an error bdev, so a path can make an I/O fail.
        let ee = ErrorBdev::create("", reg.open("base", true).unwrap()).unwrap();
        reg.register(ee.clone()).await.unwrap();
        let mut o = LvsOpts::new("lvs");
        o.cluster_size = MIB as u32;
        o.clear_method = store_cm;
        let store = m
            .create_lvstore("EE_base", o)
            .await
            .expect("create lvstore");
        let free = store.free_clusters();
        assert!(free >= 4, "{label}: {free} free clusters");
        // A thick volume over half the free space, filled with the secret and flushed.
        let a_size = free / 2 * MIB;
        let a = m
            .create_lvol(&store, "a", a_size, false, lvol_cm)
            .await
            .expect("create a");
        let d = open_bdev(&reg, &a).await;
        write_at(&d, 0, &vec![SECRET; a_size as usize])
            .await
            .unwrap();
        d.flush().await.unwrap();
        drop(d);
        match path {
            Path::Delete => m.delete_lvol(&a).await.expect("delete a"),
            Path::Shrink => m.resize_lvol(&a, MIB).await.expect("shrink a"),
            Path::InflateThenDelete => {
                let snap = m.create_snapshot(&a, "snap").await.expect("snapshot");
                let clone = m.create_clone(&snap, "clone").await.expect("clone");
                m.inflate_lvol(&clone).await.expect("inflate clone");
                m.delete_lvol(&clone).await.expect("delete clone");
                m.delete_lvol(&a).await.expect("delete a");
                m.delete_lvol(&snap).await.expect("delete snapshot");
            }
            Path::DeleteThenFailedCreate { scrub } => {
                m.delete_lvol(&a).await.expect("delete a");
                let free = store.free_clusters();
                let mut inj = Injection::fail(Some(if scrub {
                    IoType::WriteZeroes
                } else {
                    IoType::Write
                }));
                inj.after = 0;
                inj.count = 1;
                ee.inject(inj);
                let r = m
                    .create_lvol(&store, "b0", free * MIB, false, lvol_cm)
                    .await;
                ee.clear();
                if let Ok(b0) = r {
                    // With clear method none nothing may zero, and unmap-cleared clusters
                    // need no zeroing: then the create has no write to fail but the md one.
                    assert!(scrub, "{label}: a create whose md write failed succeeded");
                    m.delete_lvol(&b0).await.expect("delete b0");
                } else if scrub {
                    SCRUB_FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                assert_eq!(store.free_clusters(), free, "{label}: clusters leaked");
                assert!(
                    store.lvol_by_name("b0").is_none(),
                    "{label}: a failed create left its lvol"
                );
            }
        }
        // Every free cluster goes to a new thick volume, which must read as zeroes.
        let free = store.free_clusters();
        assert!(free > 0, "{label}: nothing freed");
        let b = m
            .create_lvol(&store, "b", free * MIB, false, lvol_cm)
            .await
            .unwrap_or_else(|e| panic!("{label}: create b: {e}"));
        let d = open_bdev(&reg, &b).await;
        let data = read_at(&d, 0, (free * MIB) as usize).await.unwrap();
        if let Some(i) = no_secret(&data) {
            panic!("{label}: the new thick volume shows the deleted volume's bytes at {i}");
        }
        assert!(data.iter().all(|&x| x == 0), "{label}: not zeroes");
        drop(d);
        m.unload_lvstore(&store).await.unwrap();
    });
}

#[test]
fn no_thick_volume_shows_freed_bytes_on_any_backend_or_clear_method() {
    with_timeout(600, || {
        let mut n = 0;
        for backend in [
            Backend::Aio { fallocate: false },
            Backend::Aio { fallocate: true },
            Backend::Malloc,
        ] {
            for store_cm in [
                LvsClearMethod::Unmap,
                LvsClearMethod::WriteZeroes,
                LvsClearMethod::None,
            ] {
                for lvol_cm in [
                    ClearMethod::Default,
                    ClearMethod::Unmap,
                    ClearMethod::WriteZeroes,
                    ClearMethod::None,
                ] {
                    for path in [
                        Path::Delete,
                        Path::Shrink,
                        Path::InflateThenDelete,
                        Path::DeleteThenFailedCreate { scrub: false },
                        Path::DeleteThenFailedCreate { scrub: true },
                    ] {
                        case(backend, store_cm, lvol_cm, path);
                        n += 1;
                    }
                }
            }
        }
        assert_eq!(n, 3 * 3 * 4 * 5);
        let scrub_failed = SCRUB_FAILURES.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("creates failed while zeroing: {scrub_failed} of 36");
        assert!(
            scrub_failed >= 9,
            "{scrub_failed}: the zeroing failure path barely ran"
        );
    });
}
