//! aio-specific behaviour: configuration output, fallocate, read-only files, block size
//! detection, engine choice and dropped futures.

use std::path::PathBuf;
use std::sync::Arc;

use bdev_core::backend::aio::{uring_available, AioBdev, AioEngine};
use bdev_core::conformance::{self as c, pattern};
use bdev_core::{BlockDevice, IoBuf, IoType, Registry};
use futures::executor::block_on;
use futures::FutureExt;
use rstest::rstest;
use test_support::bdev::{aio_dev, aio_opts, sparse_file};
use uuid::Uuid;

fn engines() -> Vec<AioEngine> {
    if uring_available() {
        vec![AioEngine::Uring, AioEngine::ThreadPool]
    } else {
        test_support::skip("aio io_uring variants", "io_uring is not available");
        vec![AioEngine::ThreadPool]
    }
}

#[test]
fn config_and_driver_specific_follow_spdk() {
    let dir = tempfile::tempdir().unwrap();
    let p = sparse_file(dir.path(), "f.img", 1 << 20);
    let u = Uuid::parse_str("7e5a0000-e5a0-4e5a-8e5a-000000000001").unwrap();
    let a = aio_dev("aio0", &p, |o| o.uuid = Some(u));
    assert_eq!(a.block_len(), 512, "auto block size of a regular file");
    assert_eq!(a.num_blocks(), 2048);
    assert_eq!(a.product_name(), "AIO disk");
    assert_eq!(a.module_name(), "aio");
    let fname = p.to_string_lossy().to_string();
    assert_eq!(
        a.write_config().unwrap(),
        serde_json::json!({"method": "bdev_aio_create", "params": {
            "name": "aio0", "filename": fname, "readonly": false, "fallocate": false,
            "uuid": "7e5a0000-e5a0-4e5a-8e5a-000000000001", "nowait": false}})
    );
    let keys: Vec<String> = a.write_config().unwrap()["params"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        keys,
        [
            "name",
            "filename",
            "readonly",
            "fallocate",
            "uuid",
            "nowait"
        ]
    );
    assert_eq!(
        a.driver_specific(),
        serde_json::json!({"aio": {"filename": fname, "block_size_override": false,
            "readonly": false, "fallocate": false, "nowait": false,
            "direct_io": a.is_direct()}})
    );
    drop(a);
    let b = aio_dev("aio1", &p, |o| {
        o.block_len = Some(4096);
        o.fallocate = true;
        o.nowait = true;
    });
    let cfg = b.write_config().unwrap();
    let keys: Vec<String> = cfg["params"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        [
            "name",
            "block_size",
            "filename",
            "readonly",
            "fallocate",
            "uuid",
            "nowait"
        ]
    );
    assert_eq!(cfg["params"]["block_size"], 4096);
    assert_eq!(cfg["params"]["nowait"], true);
    assert_eq!(b.driver_specific()["aio"]["block_size_override"], true);
    assert!(b.io_type_supported(IoType::Unmap));
    assert!(b.io_type_supported(IoType::WriteZeroes));
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = sparse_file(dir.path(), "f.img", 100);
    let e = AioBdev::create(aio_opts("a", &p, |_| {})).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "file smaller than a block");
    let p = sparse_file(dir.path(), "f.img", 1 << 20);
    for bl in [0, 100, 513] {
        let e = AioBdev::create(aio_opts("a", &p, |o| o.block_len = Some(bl))).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "block size {bl}");
    }
    let e = AioBdev::create(aio_opts("a", &dir.path().join("missing"), |_| {})).unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT);
}

#[test]
fn auto_engine_prefers_uring() {
    let dir = tempfile::tempdir().unwrap();
    let a = aio_dev("a", &sparse_file(dir.path(), "f.img", 1 << 20), |_| {});
    let want = if uring_available() {
        AioEngine::Uring
    } else {
        AioEngine::ThreadPool
    };
    assert_eq!(a.engine(), want);
}

/// Engine `which` of [`engines`] and a sparse file `f.img` of `size` bytes in a new temp dir
/// (returned to keep it alive); None when this machine has no such engine.
fn engine_and_file(which: usize, size: u64) -> Option<(AioEngine, tempfile::TempDir, PathBuf)> {
    let Some(&engine) = engines().get(which) else {
        // Only the thread-pool engine exists here: this case is recorded as skipped.
        test_support::skip(
            &format!("aio_backend engine case {which}"),
            "io_uring is not available",
        );
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let p = sparse_file(dir.path(), "f.img", size);
    Some((engine, dir, p))
}

#[rstest]
fn fallocate_unmap_and_write_zeroes(#[values(0, 1)] which: usize) {
    let Some((engine, _dir, p)) = engine_and_file(which, 4 << 20) else {
        return;
    };
    let reg = Registry::new();
    let a = aio_dev("a", &p, |o| {
        o.block_len = Some(4096);
        o.fallocate = true;
        o.engine = engine;
    });
    block_on(reg.register(a)).unwrap();
    c::check_io_types(&reg, "a");
    let d = reg.open("a", true).unwrap();
    block_on(async {
        d.write(0, pattern(&d, 0, 256, 3)).await.unwrap();
        d.unmap(16, 16).await.unwrap();
        d.write_zeroes(64, 8).await.unwrap();
        let r = d.read(0, IoBuf::new(256 * 4096, 1)).await.unwrap();
        let want = pattern(&d, 0, 256, 3);
        for blk in 0..256usize {
            let got = &r[blk * 4096..(blk + 1) * 4096];
            if (16..32).contains(&blk) || (64..72).contains(&blk) {
                assert!(got.iter().all(|&b| b == 0), "block {blk} zeroed");
            } else {
                assert_eq!(got, &want[blk * 4096..(blk + 1) * 4096], "block {blk} kept");
            }
        }
    });
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        4 << 20,
        "keeps the size"
    );
}

#[rstest]
fn readonly_file_refuses_writes(#[values(0, 1)] which: usize) {
    let Some(&engine) = engines().get(which) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::new();
    let a = aio_dev("ro", &sparse_file(dir.path(), "f.img", 1 << 20), |o| {
        o.readonly = true;
        o.engine = engine;
    });
    assert_eq!(a.driver_specific()["aio"]["readonly"], true);
    block_on(reg.register(a)).unwrap();
    let d = reg.open("ro", true).unwrap();
    let e = block_on(d.write(0, IoBuf::new(512, 1))).unwrap_err();
    assert_eq!(e.errno(), libc::EBADF);
    block_on(d.read(0, IoBuf::new(512, 1))).unwrap();
}

#[rstest]
fn dropped_futures_do_not_free_buffers_in_flight(#[values(0, 1)] which: usize) {
    let Some((engine, _dir, p)) = engine_and_file(which, 8 << 20) else {
        return;
    };
    let a = aio_dev("a", &p, |o| {
        o.block_len = Some(4096);
        o.engine = engine;
    });
    let reg = Registry::new();
    block_on(reg.register(a.clone())).unwrap();
    let d = reg.open("a", true).unwrap();
    for i in 0..128u64 {
        // Poll once (submits), then drop the future while the request is in flight.
        let _ = d.write(i * 8, pattern(&d, i * 8, 8, 1)).now_or_never();
        let _ = d.read(i * 8 + 1, IoBuf::new(4096 * 8, 1)).now_or_never();
    }
    drop(d);
    block_on(reg.unregister("a")).unwrap();
    drop(a); // Waits for the kernel to finish with every buffer.
             // A fresh bdev over the same file works.
    let b = aio_dev("b", &p, |o| {
        o.block_len = Some(4096);
        o.engine = engine;
    });
    let r = block_on(b.read(0, IoBuf::new(4096, 1))).unwrap();
    assert_eq!(r.len(), 4096);
}

#[rstest]
fn large_and_many_vectored_io(#[values(0, 1)] which: usize) {
    let Some(&engine) = engines().get(which) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a: Arc<dyn BlockDevice> = aio_dev("a", &sparse_file(dir.path(), "f.img", 16 << 20), |o| {
        o.block_len = Some(512);
        o.engine = engine;
    });
    let reg = Registry::new();
    block_on(reg.register(a)).unwrap();
    let d = reg.open("a", true).unwrap();
    block_on(async {
        let big = pattern(&d, 0, 16384, 4); // 8 MiB
        let big = d.write(0, big).await.unwrap();
        let r = d.read(0, IoBuf::new(8 << 20, 1)).await.unwrap();
        assert!(r == big);
        // More buffers than one io_uring request can carry.
        let bufs: Vec<IoBuf> = (0..1500u64).map(|i| pattern(&d, 20000 + i, 1, 6)).collect();
        let want: Vec<u8> = bufs.iter().flat_map(|b| b.to_vec()).collect();
        d.writev(20000, bufs).await.unwrap();
        let got = d.read(20000, IoBuf::new(1500 * 512, 1)).await.unwrap();
        assert!(got[..] == want[..]);
    });
}

#[test]
fn a_future_polled_once_and_kept_does_not_strand_other_io() {
    if !uring_available() {
        test_support::skip(
            "a_future_polled_once_and_kept_does_not_strand_other_io",
            "io_uring is not available",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = aio_dev("a", &sparse_file(dir.path(), "f.img", 1 << 20), |o| {
        o.engine = AioEngine::Uring
    });
    let reg = Registry::new();
    block_on(reg.register(a)).unwrap();
    let d = reg.open("a", true).unwrap();
    // Polled once (it owes the batch its submit), then parked without being dropped.
    let mut parked = Box::pin(d.write(0, pattern(&d, 0, 1, 1)));
    assert!((&mut parked).now_or_never().is_none());
    let r = c::with_timeout(
        std::time::Duration::from_secs(10),
        "I/O behind a parked flusher",
        d.read(8, IoBuf::new(512, 1)),
    );
    assert!(r.is_ok());
    // The parked write completes too once polled again.
    block_on(parked).unwrap();
    let back = block_on(d.read(0, IoBuf::new(512, 1))).unwrap();
    assert_eq!(back, pattern(&d, 0, 1, 1));
}

/// The flags the process opened `path` with (from `/proc/self/fdinfo`), for every open fd.
fn open_flags(path: &std::path::Path) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if std::fs::read_link(e.path()).ok().as_deref() != Some(path) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        if let Some(l) = info.lines().find(|l| l.starts_with("flags:")) {
            out.push(u32::from_str_radix(l[6..].trim(), 8).unwrap());
        }
    }
    out
}

#[test]
fn default_open_is_o_direct_and_buffered_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let p = sparse_file(dir.path(), "f.img", 1 << 20);
    let p = p.canonicalize().unwrap();
    // Whether this file system takes O_DIRECT at all (else the default falls back).
    let fs_direct = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
            .is_ok()
    };
    let a = aio_dev("d", &p, |_| {});
    assert_eq!(a.is_direct(), fs_direct);
    assert_eq!(a.driver_specific()["aio"]["direct_io"], fs_direct);
    let flags = open_flags(&p);
    assert!(!flags.is_empty());
    assert!(
        flags
            .iter()
            .all(|f| (f & libc::O_DIRECT as u32 != 0) == fs_direct),
        "{flags:?}"
    );
    // Data goes through: a write read back.
    let mut w = IoBuf::new(4096, a.buf_align());
    w.fill(0x5a);
    futures::executor::block_on(a.write(8, w)).unwrap();
    let r = futures::executor::block_on(a.read(8, IoBuf::new(4096, a.buf_align()))).unwrap();
    assert!(r.iter().all(|&b| b == 0x5a));
    drop(a);
    let b = aio_dev("b", &p, |o| o.direct = false);
    assert!(!b.is_direct());
    assert_eq!(b.driver_specific()["aio"]["direct_io"], false);
    assert_eq!(b.buf_align(), 1);
    let flags = open_flags(&p);
    assert!(
        flags.iter().all(|f| f & libc::O_DIRECT as u32 == 0),
        "{flags:?}"
    );
}

/// A request taken through a slot's guard (`DescGuard::into_read_io`, the path a thick lvol's
/// steady-state read takes) keeps the descriptor open after the slot is closed: the device's
/// unregister waits until the request ends, and the request reads what was written.
#[test]
fn a_guarded_request_keeps_the_closed_slots_descriptor_until_it_ends() {
    block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new();
        test_support::bdev::aio_sparse(&reg, dir.path(), "a", 1 << 20).await;
        let slot = bdev_core::DescSlot::new(reg.open("a", true).unwrap());
        let want = {
            let g = slot.get().unwrap();
            let b = pattern(&g, 8, 1, 5);
            g.write(8, b.clone()).await.unwrap();
            b
        };
        // Not polled yet: an aio request is pending, so the guard is kept, not dropped.
        let fut = slot.get().unwrap().into_read_io(8, IoBuf::new(512, 512));
        assert!(slot.close());
        assert!(slot.get().is_none(), "closed for new requests");
        let mut unreg = Box::pin(reg.unregister("a"));
        assert!(
            futures::poll!(unreg.as_mut()).is_pending(),
            "the request holds the descriptor"
        );
        let got = fut.await.unwrap();
        assert_eq!(&got[..], &want[..]);
        unreg.await.unwrap();
        assert!(reg.open("a", false).is_err(), "the device is gone");
    });
}

/// Page-cache writes (on a reactor with the ring engine: written on the reactor's thread;
/// elsewhere through the ring or the pool): once a write or a vectored write returns, the
/// file holds its bytes at the right offsets (read straight from the file, no flush),
/// unaligned buffers included, and the bdev reads them back.
#[rstest]
fn buffered_writes_are_in_the_file_when_they_return(
    #[values(0, 1)] which: usize,
    #[values(false, true)] on_reactor: bool,
) {
    let Some((engine, _dir, p)) = engine_and_file(which, 1 << 20) else {
        return;
    };
    let a = aio_dev("a", &p, |o| {
        o.engine = engine;
        o.direct = false;
    });
    assert!(!a.is_direct());
    assert_eq!(a.engine(), engine);
    let bytes = |n: usize, seed: u8| -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    };
    let run = async {
        // A buffer starting one byte into its allocation: the page cache takes any address.
        let mut big = IoBuf::new(4096 + 1, 1);
        let one = bytes(4096, 7);
        big[1..].copy_from_slice(&one);
        let unaligned = IoBuf::from_slice(&big[1..], 1);
        a.write_io(8, unaligned).await.unwrap();
        let file = std::fs::read(&p).unwrap();
        assert_eq!(&file[8 * 512..8 * 512 + 4096], &one[..]);

        let (x, y) = (bytes(1024, 11), bytes(2048, 13));
        let bufs = vec![IoBuf::from_slice(&x, 1), IoBuf::from_slice(&y, 1)];
        a.writev(100, bufs).await.unwrap();
        let file = std::fs::read(&p).unwrap();
        assert_eq!(&file[100 * 512..102 * 512], &x[..]);
        assert_eq!(&file[102 * 512..106 * 512], &y[..]);
        assert!(file[106 * 512..107 * 512].iter().all(|&b| b == 0));

        let back = a.read(100, IoBuf::new(3072, 1)).await.unwrap();
        assert_eq!(&back[..1024], &x[..]);
        assert_eq!(&back[1024..], &y[..]);
    };
    if on_reactor {
        bdev_core::reactor::block_on(run);
    } else {
        block_on(run);
    }
}
