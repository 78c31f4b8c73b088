//! The device conformance suite over every backend: malloc, cached RAM, aio on io_uring (O_DIRECT and
//! buffered) and aio on the thread pool (O_DIRECT), with 512- and 4096-byte blocks.

use std::path::PathBuf;
use std::sync::Arc;

use bdev_core::backend::aio::{uring_available, AioBdev, AioEngine};
use bdev_core::backend::cached::CachedBdev;
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::conformance as c;
use bdev_core::{BlockDevice, Registry};
use rstest::rstest;
use tempfile::TempDir;
use test_support::bdev::aio_dev;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Malloc,
    /// RAM behind the crash model's write-back cache.
    Cached,
    UringDirect,
    UringBuffered,
    /// io_uring with O_DIRECT, driven by `reactor::block_on`.
    UringReactor,
    PoolDirect,
}

const SIZE: u64 = 4 << 20;

/// A registry with one device named `dev`, or `None` (with a message) when the backend is not
/// available here.
struct Setup {
    reg: Registry,
    aio: Option<Arc<AioBdev>>,
    path: Option<PathBuf>,
    _dir: TempDir,
}

fn direct_io_works(dir: &TempDir) -> bool {
    let p = dir.path().join("probe");
    if std::fs::write(&p, vec![0u8; 4096]).is_err() {
        return false;
    }
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .is_ok()
}

fn setup(backend: Backend, block_len: u32) -> Option<Setup> {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = Registry::new();
    let (dev, aio, path): (Arc<dyn BlockDevice>, _, _) = match backend {
        Backend::Malloc => {
            let m = MallocBdev::create("dev", SIZE / block_len as u64, block_len, None).unwrap();
            (m, None, None)
        }
        Backend::Cached => {
            let m = CachedBdev::create("dev", SIZE / block_len as u64, block_len, None).unwrap();
            (m, None, None)
        }
        _ => {
            let (engine, direct) = match backend {
                Backend::UringDirect | Backend::UringReactor => (AioEngine::Uring, true),
                Backend::UringBuffered => (AioEngine::Uring, false),
                _ => (AioEngine::ThreadPool, true),
            };
            if engine == AioEngine::Uring && !uring_available() {
                test_support::skip(&format!("{backend:?}"), "io_uring is not available");
                return None;
            }
            if direct && !direct_io_works(&dir) {
                test_support::skip(
                    &format!("{backend:?}"),
                    "O_DIRECT is not supported in the temp dir",
                );
                return None;
            }
            let path = dir.path().join("disk.img");
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(SIZE).unwrap();
            let a = aio_dev("dev", &path, |o| {
                o.block_len = Some(block_len);
                o.direct = direct;
                o.engine = engine;
            });
            assert_eq!(a.engine(), engine);
            (a.clone(), Some(a), Some(path))
        }
    };
    c::use_reactor(matches!(backend, Backend::UringReactor));
    c::block_on(reg.register(dev)).unwrap();
    Some(Setup {
        reg,
        aio,
        path,
        _dir: dir,
    })
}

macro_rules! conformance {
    ($($test:ident => $check:path;)*) => {$(
        #[rstest]
        fn $test(
            #[values(
                Backend::Malloc,
                Backend::Cached,
                Backend::UringDirect,
                Backend::UringBuffered,
                Backend::UringReactor,
                Backend::PoolDirect
            )]
            backend: Backend,
            #[values(512, 4096)] block_len: u32,
        ) {
            let Some(s) = setup(backend, block_len) else { return };
            $check(&s.reg, "dev");
        }
    )*};
}

conformance! {
    read_write_round_trip => c::check_read_write_round_trip;
    vectored => c::check_vectored;
    bounds => c::check_bounds;
    alignment => c::check_alignment;
    read_only_descriptor => c::check_read_only_descriptor;
    io_types => c::check_io_types;
    flush => c::check_flush;
    claims => c::check_claims;
    names => c::check_names;
    hot_remove_with_64_inflight => c::check_hot_remove_with_inflight;
    unregister_waits_for_descriptors => c::check_unregister_waits_for_descriptors;
}

#[rstest]
fn resize_event_after_rescan(
    #[values(
        Backend::UringDirect,
        Backend::PoolDirect,
        Backend::UringBuffered,
        Backend::UringReactor
    )]
    backend: Backend,
) {
    let Some(s) = setup(backend, 4096) else {
        return;
    };
    let aio = s.aio.clone().unwrap();
    let path = s.path.clone().unwrap();
    c::check_resize_event(&s.reg, "dev", || {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(SIZE * 2).unwrap();
        aio.rescan().unwrap()
    });
    assert_eq!(aio.num_blocks(), SIZE * 2 / 4096);
}

#[rstest]
fn data_survives_reopen(
    #[values(Backend::UringDirect, Backend::PoolDirect, Backend::UringReactor)] backend: Backend,
) {
    let Some(s) = setup(backend, 512) else {
        return;
    };
    let desc = s.reg.open("dev", true).unwrap();
    let w = c::pattern(&desc, 100, 16, 9);
    let expect = w.to_vec();
    c::block_on(desc.write(100, w)).unwrap();
    c::block_on(desc.flush()).unwrap();
    drop(desc);
    c::block_on(s.reg.unregister("dev")).unwrap();
    let raw = std::fs::read(s.path.as_ref().unwrap()).unwrap();
    assert_eq!(&raw[100 * 512..116 * 512], &expect[..]);
}
