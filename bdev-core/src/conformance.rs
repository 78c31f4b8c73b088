//! Device conformance checks (feature `test-util`).
//!
//! Each check takes a [`Registry`] and the name of a registered device (or a [`Descriptor`])
//! and panics with a message when the device or the layer around it misbehaves. They run
//! synchronously (with `futures::executor::block_on`) so any test can call them. Checks that
//! say "consumes the device" unregister it; run them last, or on a fresh device.
//!
//! The checks assume nobody else holds a descriptor or a claim on the device.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::oneshot;
use futures::{FutureExt, StreamExt};
use uuid::Uuid;

use crate::backend::malloc::MallocBdev;
use crate::{BdevError, BdevEvent, ClaimType, Descriptor, IoBuf, IoType, Registry};

thread_local! {
    static REACTOR: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes the checks run on this thread with [`crate::reactor::block_on`] (`true`) or
/// `futures::executor::block_on` (`false`, the default).
pub fn use_reactor(on: bool) {
    REACTOR.with(|r| r.set(on));
}

/// Runs a future with the executor chosen by [`use_reactor`].
pub fn block_on<T>(fut: impl std::future::Future<Output = T>) -> T {
    if REACTOR.with(|r| r.get()) {
        crate::reactor::block_on(fut)
    } else {
        futures::executor::block_on(fut)
    }
}

/// Time after which a check that waits (hot-remove, unregister) is declared hung.
pub const HANG_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `fut` to completion, panicking with `what` if it takes longer than `timeout`.
pub fn with_timeout<T>(
    timeout: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    block_on(async {
        let mut fut = std::pin::pin!(fut.fuse());
        let mut delay = futures_timer::Delay::new(timeout).fuse();
        futures::select! {
            v = fut => v,
            _ = delay => panic!("{what}: still not done after {timeout:?} (hang)"),
        }
    })
}

/// A buffer of `blocks` blocks filled with a pattern derived from `seed` and `lba`.
pub fn pattern(desc: &Descriptor, lba: u64, blocks: u64, seed: u8) -> IoBuf {
    let bl = desc.block_len() as usize;
    let mut b = IoBuf::new(bl * blocks as usize, desc.device().buf_align());
    for (i, chunk) in b.chunks_mut(bl).enumerate() {
        let tag = (lba + i as u64).to_le_bytes();
        for (j, x) in chunk.iter_mut().enumerate() {
            *x = tag[j % 8] ^ seed ^ (j as u8).wrapping_mul(31);
        }
    }
    b
}

fn zeroed(desc: &Descriptor, blocks: u64) -> IoBuf {
    IoBuf::new(
        desc.block_len() as usize * blocks as usize,
        desc.device().buf_align(),
    )
}

fn errno_of<T: std::fmt::Debug>(r: crate::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.errno(),
    }
}

/// Offsets worth testing on a device of `n` blocks of `bl` bytes: the ends, and both sides of
/// power-of-two and 1 MiB boundaries.
fn interesting_offsets(n: u64, bl: u64, len: u64) -> Vec<u64> {
    let mut v = vec![0, 1, 7, 8, 63];
    let mib = (1 << 20) / bl;
    for k in 1..4 {
        v.push(k * mib - 1);
        v.push(k * mib);
        v.push(k * mib + 1);
    }
    v.push(n / 2 + 3);
    v.push(n.saturating_sub(len));
    v.push(n.saturating_sub(len + 1));
    v.retain(|&o| o + len <= n);
    v.sort_unstable();
    v.dedup();
    v
}

/// Writes patterns of several lengths at many offsets and reads each back; also checks that
/// neighbours of a write are untouched.
pub fn check_read_write_round_trip(reg: &Registry, name: &str) {
    let desc = reg.open(name, true).expect("open rw");
    let n = desc.num_blocks();
    let bl = desc.block_len() as u64;
    block_on(async {
        for (seed, len) in [(1u8, 1u64), (2, 8), (3, 33)] {
            if len > n {
                continue;
            }
            for off in interesting_offsets(n, bl, len) {
                let w = pattern(&desc, off, len, seed);
                let w = desc.write(off, w).await.expect("write");
                let r = desc.read(off, zeroed(&desc, len)).await.expect("read");
                assert!(
                    r[..] == w[..],
                    "{name}: data mismatch at lba {off} len {len}"
                );
            }
        }
        // A write does not touch its neighbours.
        if n >= 3 {
            let mid = n / 2;
            let a = pattern(&desc, mid - 1, 3, 9);
            desc.write(mid - 1, a).await.expect("write 3");
            desc.write(mid, pattern(&desc, mid, 1, 10))
                .await
                .expect("write 1");
            let r = desc.read(mid - 1, zeroed(&desc, 3)).await.expect("read 3");
            let bl = bl as usize;
            assert!(
                r[..bl] == pattern(&desc, mid - 1, 1, 9)[..],
                "{name}: left neighbour changed"
            );
            assert!(
                r[bl..2 * bl] == pattern(&desc, mid, 1, 10)[..],
                "{name}: middle"
            );
            assert!(
                r[2 * bl..] == pattern(&desc, mid + 1, 1, 9)[..],
                "{name}: right neighbour changed"
            );
        }
    });
}

/// Vectored write then reads back with a different split, with readv and read.
pub fn check_vectored(reg: &Registry, name: &str) {
    let desc = reg.open(name, true).expect("open rw");
    let n = desc.num_blocks();
    if n < 8 {
        return;
    }
    let off = n / 3;
    block_on(async {
        let parts = vec![
            pattern(&desc, off, 1, 21),
            pattern(&desc, off + 1, 4, 21),
            pattern(&desc, off + 5, 3, 21),
        ];
        let expect: Vec<u8> = parts.iter().flat_map(|b| b.to_vec()).collect();
        let back = desc.writev(off, parts).await.expect("writev");
        assert_eq!(back.len(), 3, "{name}: writev returns every buffer");
        let got = desc
            .readv(
                off,
                vec![zeroed(&desc, 2), zeroed(&desc, 5), zeroed(&desc, 1)],
            )
            .await
            .expect("readv");
        let got: Vec<u8> = got.iter().flat_map(|b| b.to_vec()).collect();
        assert!(got == expect, "{name}: readv data mismatch");
        let one = desc.read(off, zeroed(&desc, 8)).await.expect("read");
        assert!(one[..] == expect[..], "{name}: read after writev mismatch");
        // Empty vectors are a no-op.
        assert!(desc
            .readv(off, Vec::new())
            .await
            .expect("empty readv")
            .is_empty());
        // A vector running past the end is refused.
        let past = vec![zeroed(&desc, 1), zeroed(&desc, 1)];
        assert_eq!(errno_of(desc.readv(n - 1, past).await), libc::EINVAL);
    });
}

/// I/O outside the device is EINVAL (OutOfRange), never a panic, even with offsets near
/// `u64::MAX`.
pub fn check_bounds(reg: &Registry, name: &str) {
    let desc = reg.open(name, true).expect("open rw");
    let n = desc.num_blocks();
    block_on(async {
        let cases = [
            (n, 1u64),
            (n - 1, 2),
            (u64::MAX, 1),
            (u64::MAX - 1, 2),
            (n + 1, 1),
        ];
        for (off, len) in cases {
            let e = desc.read(off, zeroed(&desc, len)).await.unwrap_err();
            assert!(
                matches!(e, BdevError::OutOfRange { .. }),
                "{name}: read {off}+{len}: {e}"
            );
            assert_eq!(e.errno(), libc::EINVAL);
            let e = desc.write(off, zeroed(&desc, len)).await.unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{name}: write {off}+{len}");
            let e = desc
                .writev(off, vec![zeroed(&desc, len)])
                .await
                .unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{name}: writev {off}+{len}");
            if desc.io_type_supported(IoType::Unmap) {
                assert_eq!(errno_of(desc.unmap(off, len).await), libc::EINVAL);
            }
            assert_eq!(errno_of(desc.write_zeroes(off, len).await), libc::EINVAL);
        }
        for (off, len) in [(0, u64::MAX), (1, u64::MAX), (u64::MAX, u64::MAX)] {
            assert_eq!(errno_of(desc.write_zeroes(off, len).await), libc::EINVAL);
            if desc.io_type_supported(IoType::Unmap) {
                assert_eq!(errno_of(desc.unmap(off, len).await), libc::EINVAL);
            }
        }
        // The last block itself is fine.
        desc.write(n - 1, pattern(&desc, n - 1, 1, 5))
            .await
            .expect("last block");
        let r = desc.read(n - 1, zeroed(&desc, 1)).await.expect("read last");
        assert!(r[..] == pattern(&desc, n - 1, 1, 5)[..]);
    });
}

/// A buffer whose length is not a multiple of the block length is EINVAL; one whose start
/// is not aligned to `buf_align` works (the device bounces it) and moves the right bytes.
pub fn check_alignment(reg: &Registry, name: &str) {
    let desc = reg.open(name, true).expect("open rw");
    let bl = desc.block_len() as usize;
    let align = desc.device().buf_align();
    block_on(async {
        for len in [1, bl - 1, bl + 1, bl + 512 / 2] {
            let b = IoBuf::new(len, align);
            assert_eq!(
                errno_of(desc.read(0, b).await),
                libc::EINVAL,
                "{name}: len {len}"
            );
            let b = IoBuf::new(len, align);
            assert_eq!(
                errno_of(desc.write(0, b).await),
                libc::EINVAL,
                "{name}: len {len}"
            );
        }
        if align > 1 {
            // Find a buffer that happens to be misaligned (keep the others alive so the
            // allocator hands out a different address each time).
            let mut keep = Vec::new();
            let mis = loop {
                let b = IoBuf::new(bl, 8);
                if !(b.as_ptr() as usize).is_multiple_of(align) {
                    break Some(b);
                }
                keep.push(b);
                if keep.len() > 64 {
                    break None;
                }
            };
            if let Some(mut b) = mis {
                b.copy_from_slice(&pattern(&desc, 3, 1, 9));
                let b = desc.write(3, b).await.expect("misaligned write");
                let mut r = b;
                r.fill(0);
                let r = desc.read(3, r).await.expect("misaligned read");
                assert!(
                    r[..] == pattern(&desc, 3, 1, 9)[..],
                    "{name}: misaligned read back"
                );
                let got = desc.read(3, IoBuf::new(bl, align)).await.expect("read");
                assert!(
                    got[..] == pattern(&desc, 3, 1, 9)[..],
                    "{name}: misaligned write"
                );
            }
            let ok = IoBuf::new(bl, align);
            desc.read(0, ok).await.expect("aligned read");
        }
    });
}

/// Writes through a read-only descriptor fail with EBADF; reads work.
pub fn check_read_only_descriptor(reg: &Registry, name: &str) {
    let desc = reg.open(name, false).expect("open ro");
    assert!(!desc.is_writable());
    block_on(async {
        assert_eq!(errno_of(desc.write(0, zeroed(&desc, 1)).await), libc::EBADF);
        assert_eq!(
            errno_of(desc.writev(0, vec![zeroed(&desc, 1)]).await),
            libc::EBADF
        );
        assert_eq!(errno_of(desc.unmap(0, 1).await), libc::EBADF);
        assert_eq!(errno_of(desc.write_zeroes(0, 1).await), libc::EBADF);
        desc.read(0, zeroed(&desc, 1))
            .await
            .expect("read through ro desc");
    });
}

/// Unsupported I/O types fail with ENOTSUP; write_zeroes is emulated when the device can
/// write; supported unmap / write_zeroes leave zeroes.
pub fn check_io_types(reg: &Registry, name: &str) {
    let desc = reg.open(name, true).expect("open rw");
    let dev = desc.device().clone();
    let n = desc.num_blocks();
    block_on(async {
        for (t, r) in [
            (IoType::Unmap, desc.unmap(0, 1).await),
            (IoType::Flush, desc.flush().await),
            (IoType::Reset, desc.reset().await),
        ] {
            if dev.io_type_supported(t) {
                r.unwrap_or_else(|e| panic!("{name}: {t:?} supported but failed: {e}"));
            } else {
                assert_eq!(errno_of(r), libc::ENOTSUP, "{name}: {t:?}");
            }
        }
        // write_zeroes works natively or emulated, and really zeroes.
        let len = 5.min(n);
        let off = n - len;
        desc.write(off, pattern(&desc, off, len, 77))
            .await
            .expect("write");
        desc.write_zeroes(off, len).await.expect("write_zeroes");
        let r = desc
            .read(off, pattern(&desc, 0, len, 1))
            .await
            .expect("read");
        assert!(r.iter().all(|&b| b == 0), "{name}: write_zeroes left data");
        if dev.io_type_supported(IoType::Unmap) {
            desc.write(off, pattern(&desc, off, len, 78))
                .await
                .expect("write");
            desc.unmap(off, len).await.expect("unmap");
            assert_eq!(
                errno_of(desc.unmap(off, 0).await),
                libc::EINVAL,
                "unmap 0 blocks"
            );
        }
    });
}

/// Flush is supported, and a flush after writes (plain and vectored, several places)
/// completes with Ok and leaves the data readable; a second flush with nothing new to write
/// back completes too. A device without a volatile cache still accepts the flush.
pub fn check_flush(reg: &Registry, name: &str) {
    let desc = reg.open(name, true).expect("open rw");
    let dev = desc.device().clone();
    assert!(
        dev.io_type_supported(IoType::Flush),
        "{name}: flush is not supported"
    );
    let n = desc.num_blocks();
    let len = 4.min(n);
    block_on(async {
        let offs = [0, n / 2, n - len];
        for (i, &off) in offs.iter().enumerate() {
            desc.write(off, pattern(&desc, off, len, 40 + i as u8))
                .await
                .expect("write");
        }
        let half = (len / 2).max(1);
        let bufs = vec![
            pattern(&desc, 0, half, 50),
            pattern(&desc, half, len - half, 50),
        ];
        if len > half {
            desc.writev(0, bufs).await.expect("writev");
        }
        desc.flush()
            .await
            .unwrap_or_else(|e| panic!("{name}: flush after writes failed: {e}"));
        desc.flush()
            .await
            .unwrap_or_else(|e| panic!("{name}: idle flush failed: {e}"));
        for (i, &off) in offs.iter().enumerate().skip(1) {
            let r = desc.read(off, zeroed(&desc, len)).await.expect("read");
            if off >= len {
                assert!(
                    r[..] == pattern(&desc, off, len, 40 + i as u8)[..],
                    "{name}: data changed by flush at lba {off}"
                );
            }
        }
    });
}

fn is_eperm<T: std::fmt::Debug>(r: crate::Result<T>, what: &str) {
    match r {
        Err(e) => assert_eq!(e.errno(), libc::EPERM, "{what}: {e}"),
        Ok(v) => panic!("{what}: expected EPERM, got Ok({v:?})"),
    }
}

/// Every claim conflict pair (EPERM), shared read-many-write-none claims, release on
/// `release_claim` and on drop, and write opens refused while claimed.
pub fn check_claims(reg: &Registry, name: &str) {
    assert_eq!(reg.claim_of(name), None, "{name}: claimed before the check");
    let w = reg.open(name, true).expect("open rw");
    let r1 = reg.open(name, false).expect("open ro");
    let r2 = reg.open(name, false).expect("open ro");

    // A read-only-many claim is refused while a descriptor is open for writing.
    is_eperm(
        r1.claim(ClaimType::ReadManyWriteNone),
        "rmwn with a writer open",
    );
    // Write claims need a writable descriptor; rmwn a read-only one.
    assert_eq!(
        errno_of(r1.claim(ClaimType::ReadManyWriteOne)),
        libc::EINVAL
    );
    assert_eq!(
        errno_of(w.claim(ClaimType::ReadManyWriteNone)),
        libc::EINVAL
    );

    // read_many_write_one.
    w.claim(ClaimType::ReadManyWriteOne).expect("rmwo");
    assert_eq!(reg.claim_of(name), Some(ClaimType::ReadManyWriteOne));
    assert_eq!(w.claim_type(), Some(ClaimType::ReadManyWriteOne));
    is_eperm(reg.open(name, true), "write open while rmwo");
    drop(reg.open(name, false).expect("read open while rmwo"));
    is_eperm(
        w.claim(ClaimType::ReadManyWriteOne),
        "second claim, same desc",
    );
    is_eperm(w.claim(ClaimType::ExclusiveWrite), "ew over rmwo");
    is_eperm(r1.claim(ClaimType::ReadManyWriteNone), "rmwn over rmwo");
    is_eperm(r1.claim(ClaimType::ReadManyWriteOne), "second rmwo");
    is_eperm(
        r1.claim(ClaimType::ExclusiveWrite),
        "ew over rmwo (ro desc)",
    );
    block_on(async {
        let b = w
            .write(0, pattern(&w, 0, 1, 3))
            .await
            .expect("write through claimer");
        drop(b);
    });
    w.release_claim();
    assert_eq!(reg.claim_of(name), None);

    // exclusive_write.
    w.claim(ClaimType::ExclusiveWrite).expect("ew");
    assert_eq!(reg.claim_of(name), Some(ClaimType::ExclusiveWrite));
    is_eperm(reg.open(name, true), "write open while ew");
    is_eperm(r1.claim(ClaimType::ReadManyWriteNone), "rmwn over ew");
    is_eperm(r1.claim(ClaimType::ExclusiveWrite), "second ew");
    is_eperm(r1.claim(ClaimType::ReadManyWriteOne), "rmwo over ew");
    // Closing the claiming descriptor releases the claim.
    drop(w);
    assert_eq!(reg.claim_of(name), None, "claim released on drop");

    // read_many_write_none is shared.
    r1.claim(ClaimType::ReadManyWriteNone).expect("rmwn 1");
    r2.claim(ClaimType::ReadManyWriteNone)
        .expect("rmwn 2 (shared)");
    assert_eq!(reg.claim_of(name), Some(ClaimType::ReadManyWriteNone));
    is_eperm(reg.open(name, true), "write open while rmwn");
    is_eperm(
        r1.claim(ClaimType::ReadManyWriteNone),
        "rmwn twice on one desc",
    );
    let r3 = reg.open(name, false).expect("ro open while rmwn");
    is_eperm(r3.claim(ClaimType::ReadManyWriteOne), "rmwo over rmwn");
    is_eperm(r3.claim(ClaimType::ExclusiveWrite), "ew over rmwn");
    drop(r1);
    assert_eq!(
        reg.claim_of(name),
        Some(ClaimType::ReadManyWriteNone),
        "still held by r2"
    );
    r2.release_claim();
    assert_eq!(reg.claim_of(name), None);

    // rmwo is refused while another descriptor is open for writing.
    let w1 = reg.open(name, true).expect("open rw 1");
    let w2 = reg.open(name, true).expect("open rw 2");
    is_eperm(
        w1.claim(ClaimType::ReadManyWriteOne),
        "rmwo with another writer",
    );
    drop(w2);
    w1.claim(ClaimType::ReadManyWriteOne)
        .expect("rmwo once alone");
    drop(w1);
    assert_eq!(reg.claim_of(name), None);
    drop((r2, r3));
    let w = reg
        .open(name, true)
        .expect("write open after all claims are gone");
    drop(w);
}

/// Registers a small malloc bdev named `name` with `uuid`.
fn small_malloc(name: &str, uuid: Uuid) -> Arc<MallocBdev> {
    MallocBdev::create(name, 64, 512, Some(uuid)).expect("malloc")
}

/// Lookups by name, alias and UUID; a duplicate name, alias or UUID is EEXIST.
pub fn check_names(reg: &Registry, name: &str) {
    let dev = reg.get(name).expect("registered");
    let uuid = dev.uuid();
    let by_uuid = reg.get(&uuid.to_string()).expect("by uuid string");
    assert_eq!(by_uuid.name(), name);
    assert_eq!(reg.get_by_uuid(&uuid).expect("by uuid").name(), name);
    let upper = uuid.to_string().to_uppercase();
    assert_eq!(reg.get(&upper).expect("by upper-case uuid").name(), name);

    let alias = format!("{name}-alias-conformance");
    reg.add_alias(name, &alias).expect("add alias");
    assert_eq!(reg.get(&alias).expect("by alias").name(), name);
    assert!(reg.aliases(name).contains(&alias));
    assert_eq!(
        errno_of(reg.add_alias(name, &alias)),
        libc::EEXIST,
        "same alias twice"
    );
    assert_eq!(
        errno_of(reg.add_alias(name, name)),
        libc::EEXIST,
        "alias = name"
    );
    assert_eq!(
        errno_of(reg.add_alias(name, &uuid.to_string())),
        libc::EEXIST,
        "alias = uuid"
    );
    drop(reg.open(&alias, false).expect("open by alias"));
    drop(reg.open(&uuid.to_string(), false).expect("open by uuid"));

    block_on(async {
        let e = reg
            .register(small_malloc(name, Uuid::new_v4()))
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST, "duplicate name");
        let e = reg
            .register(small_malloc(&alias, Uuid::new_v4()))
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST, "name = existing alias");
        let e = reg
            .register(small_malloc(&format!("{name}-other"), uuid))
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST, "duplicate uuid");
        let e = reg
            .register(small_malloc(&uuid.to_string(), Uuid::new_v4()))
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST, "name = existing uuid");
    });
    assert!(
        reg.get(&format!("{name}-other")).is_none(),
        "refused device not registered"
    );
    reg.remove_alias(name, &alias).expect("remove alias");
    assert!(reg.get(&alias).is_none());
    assert!(!reg.aliases(name).contains(&alias));
    assert!(reg.get("no-such-bdev-conformance").is_none());
    assert_eq!(
        errno_of(reg.open("no-such-bdev-conformance", false)),
        libc::ENODEV
    );
    assert!(reg.list().iter().any(|d| d.name() == name));
}

/// Hot-remove with 64 I/Os in flight (consumes the device): two descriptors both receive
/// `Remove`, their holders close them when their I/O is done, unregister completes (no hang),
/// every I/O completed or failed, and the device is gone afterwards.
pub fn check_hot_remove_with_inflight(reg: &Registry, name: &str) {
    const IOS: usize = 64;
    let mut main = reg.open(name, true).expect("open rw");
    let mut other = reg.open(name, false).expect("open ro");
    let main_events = main.take_events().expect("events");
    let mut other_events = other.take_events().expect("events");
    let main = Arc::new(main);
    let n = main.num_blocks();
    let finished = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let mut done_rx = Vec::new();
    for i in 0..IOS {
        let d = main.clone();
        let finished = finished.clone();
        let failed = failed.clone();
        let started_tx = started_tx.clone();
        let (tx, rx) = oneshot::channel::<()>();
        done_rx.push(rx);
        reg.spawn(
            async move {
                let lba = (i as u64 * 7) % n;
                let _ = started_tx.send(());
                let r = if i % 2 == 0 {
                    d.write(lba, pattern(&d, lba, 1, i as u8)).await.map(drop)
                } else {
                    d.read(lba, zeroed(&d, 1)).await.map(drop)
                };
                if let Err(e) = r {
                    assert_eq!(e.errno(), libc::ENODEV, "in-flight I/O failed oddly: {e}");
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                finished.fetch_add(1, Ordering::SeqCst);
                drop(d);
                let _ = tx.send(());
            }
            .boxed(),
        );
    }
    drop(started_tx);
    for _ in 0..IOS {
        started_rx.recv().expect("I/O task started");
    }
    // The holder of `main` closes it on Remove; its in-flight I/Os hold it until they end.
    let holder = {
        let mut ev = main_events;
        let main_slot = main;
        async move {
            let e = ev.next().await;
            drop(main_slot);
            e
        }
    };
    let (ev_tx, ev_rx) = oneshot::channel();
    reg.spawn(
        async move {
            let _ = ev_tx.send(holder.await);
        }
        .boxed(),
    );
    let reg2 = reg.clone();
    let name2 = name.to_string();
    let (un_tx, un_rx) = oneshot::channel();
    reg.spawn(
        async move {
            let _ = un_tx.send(reg2.unregister(&name2).await);
        }
        .boxed(),
    );
    // The second descriptor gets Remove too, and is closed by its holder.
    let ev = with_timeout(
        HANG_TIMEOUT,
        "Remove on the second descriptor",
        other_events.next(),
    );
    assert_eq!(ev, Some(BdevEvent::Remove));
    drop(other);
    let ev = with_timeout(HANG_TIMEOUT, "Remove on the first descriptor", ev_rx).expect("holder");
    assert_eq!(ev, Some(BdevEvent::Remove));
    let r = with_timeout(HANG_TIMEOUT, "unregister with 64 I/Os in flight", un_rx).expect("task");
    r.expect("unregister");
    for rx in done_rx {
        with_timeout(HANG_TIMEOUT, "in-flight I/O", rx).expect("I/O task ended");
    }
    assert_eq!(
        finished.load(Ordering::SeqCst),
        IOS,
        "every I/O completed or failed"
    );
    assert!(
        reg.get(name).is_none(),
        "{name}: still registered after unregister"
    );
    assert_eq!(errno_of(reg.open(name, false)), libc::ENODEV);
    assert!(!reg.list().iter().any(|d| d.name() == name));
}

/// Unregister waits until every descriptor is closed (consumes the device); I/O through the
/// open descriptors keeps working meanwhile, new opens fail with ENODEV.
pub fn check_unregister_waits_for_descriptors(reg: &Registry, name: &str) {
    let mut a = reg.open(name, true).expect("open a");
    let mut b = reg.open(name, false).expect("open b");
    let mut ev_a = a.take_events().expect("events a");
    let mut ev_b = b.take_events().expect("events b");
    assert!(a.take_events().is_none(), "events can be taken once");
    let reg2 = reg.clone();
    let name2 = name.to_string();
    let (tx, mut rx) = oneshot::channel();
    reg.spawn(
        async move {
            let _ = tx.send(reg2.unregister(&name2).await);
        }
        .boxed(),
    );
    assert_eq!(
        with_timeout(HANG_TIMEOUT, "Remove a", ev_a.next()),
        Some(BdevEvent::Remove)
    );
    assert_eq!(
        with_timeout(HANG_TIMEOUT, "Remove b", ev_b.next()),
        Some(BdevEvent::Remove)
    );
    assert_eq!(
        errno_of(reg.open(name, false)),
        libc::ENODEV,
        "open while removing"
    );
    // A second unregister while the first waits is EBUSY.
    assert_eq!(errno_of(block_on(reg.unregister(name))), libc::EBUSY);
    // I/O still works through the open descriptors (an lvol store writes its super block).
    block_on(async {
        let w = a
            .write(0, pattern(&a, 0, 1, 42))
            .await
            .expect("write while removing");
        let r = b.read(0, zeroed(&b, 1)).await.expect("read while removing");
        assert!(r[..] == w[..]);
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        matches!(rx.try_recv(), Ok(None)),
        "unregister finished with descriptors open"
    );
    drop(a);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        matches!(rx.try_recv(), Ok(None)),
        "unregister finished with one descriptor open"
    );
    drop(b);
    let r = with_timeout(HANG_TIMEOUT, "unregister after close", rx).expect("task");
    r.expect("unregister");
    assert!(reg.get(name).is_none());
}

/// A `Resize` event reaches every descriptor after `notify_resize`; `grow` changes the
/// device's size and returns the new size in blocks.
pub fn check_resize_event(reg: &Registry, name: &str, grow: impl FnOnce() -> u64) {
    let mut a = reg.open(name, false).expect("open a");
    let mut b = reg.open(name, false).expect("open b");
    let mut ev_a = a.take_events().expect("events");
    let mut ev_b = b.take_events().expect("events");
    let before = a.num_blocks();
    let after = grow();
    assert!(after > before, "{name}: did not grow ({before} -> {after})");
    assert_eq!(a.num_blocks(), after);
    reg.notify_resize(name);
    let want = Some(BdevEvent::Resize { num_blocks: after });
    assert_eq!(with_timeout(HANG_TIMEOUT, "resize a", ev_a.next()), want);
    assert_eq!(with_timeout(HANG_TIMEOUT, "resize b", ev_b.next()), want);
    // The new blocks are usable.
    block_on(async {
        let r = a.read(after - 1, zeroed(&a, 1)).await;
        r.expect("read of a grown block");
    });
}

/// Runs every non-destructive check, then the hot-remove check (which consumes the device).
pub fn check_all(reg: &Registry, name: &str) {
    check_read_write_round_trip(reg, name);
    check_vectored(reg, name);
    check_bounds(reg, name);
    check_alignment(reg, name);
    check_read_only_descriptor(reg, name);
    check_io_types(reg, name);
    check_flush(reg, name);
    check_claims(reg, name);
    check_names(reg, name);
    check_hot_remove_with_inflight(reg, name);
}
