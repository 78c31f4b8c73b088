//! The reactor: aio I/O served inline by `reactor::block_on`, cross-thread wakes, dropped
//! futures, nesting, and hot-remove under the reactor.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bdev_core::backend::aio::{uring_available, AioEngine};
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::conformance::pattern;
use bdev_core::{reactor, BdevEvent, IoBuf, Registry};
use futures::{FutureExt, StreamExt};
use test_support::bdev::{aio_dev, sparse_file};

fn aio_registry(dir: &tempfile::TempDir, engine: AioEngine) -> Option<Registry> {
    if !uring_available() {
        test_support::skip("reactor aio_registry", "io_uring is not available");
        return None;
    }
    let p = sparse_file(dir.path(), "d.img", 8 << 20);
    let a = aio_dev("a", &p, |o| {
        o.block_len = Some(4096);
        o.engine = engine;
    });
    let reg = Registry::new();
    reactor::block_on(reg.register(a)).unwrap();
    Some(reg)
}

/// Runs `f` on a thread with a deadline, so a hang fails the test instead of blocking it.
fn guarded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("reactor test hung")
}

/// Runs `f` under [`guarded`] with a registry holding `a`, an 8 MiB aio bdev on io_uring;
/// when io_uring is unavailable the test is recorded as skipped instead.
fn with_aio(f: impl FnOnce(&Registry) + Send + 'static) {
    guarded(|| {
        let dir = tempfile::tempdir().unwrap();
        let Some(reg) = aio_registry(&dir, AioEngine::Uring) else {
            return;
        };
        f(&reg);
    })
}

#[test]
fn concurrent_io_round_trips_inline() {
    with_aio(|reg| {
        let d = reg.open("a", true).unwrap();
        reactor::block_on(async {
            assert!(reactor::in_reactor());
            let writes = (0..64u64).map(|i| {
                let d = &d;
                async move { d.write(i * 3, pattern(d, i * 3, 2, 7)).await.unwrap() }
            });
            futures::future::join_all(writes).await;
            let reads = (0..64u64).map(|i| {
                let d = &d;
                async move {
                    let r = d.read(i * 3, IoBuf::new(8192, 1)).await.unwrap();
                    assert_eq!(r, pattern(d, i * 3, 2, 7), "lba {}", i * 3);
                }
            });
            futures::future::join_all(reads).await;
            let v = d
                .readv(0, vec![IoBuf::new(4096, 1), IoBuf::new(8192, 1)])
                .await
                .unwrap();
            assert_eq!(v[0], pattern(&d, 0, 1, 7));
        });
        assert!(!reactor::in_reactor());
    });
}

#[test]
fn cross_thread_wake_and_timers() {
    guarded(|| {
        let (tx, rx) = futures::channel::oneshot::channel();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send(5u32).unwrap();
        });
        let v = reactor::block_on(async {
            futures_timer::Delay::new(Duration::from_millis(10)).await;
            rx.await.unwrap()
        });
        assert_eq!(v, 5);
        // Malloc (no io_uring at all) works under the reactor too.
        let reg = Registry::new();
        let m = MallocBdev::create("m", 16, 512, None).unwrap();
        reactor::block_on(reg.register(m)).unwrap();
        let d = reg.open("m", true).unwrap();
        let r = reactor::block_on(async {
            d.write(1, pattern(&d, 1, 1, 3)).await.unwrap();
            d.read(1, IoBuf::new(512, 1)).await.unwrap()
        });
        assert_eq!(r, pattern(&d, 1, 1, 3));
    });
}

#[test]
fn dropped_futures_complete_before_block_on_returns_and_nesting_works() {
    with_aio(|reg| {
        let d = reg.open("a", true).unwrap();
        reactor::block_on(async {
            for i in 0..100u64 {
                // Poll once (queues the request), then drop the future.
                let _ = d.read(i % 2000, IoBuf::new(4096, 1)).now_or_never();
                let _ = d.write(i % 2000, pattern(&d, i, 1, 1)).now_or_never();
            }
            // A nested block_on serves the same ring. Its block is one no dropped write
            // touches: a dropped write is still in flight and may land after a new one.
            let inner = reactor::block_on(async {
                d.write(1000, pattern(&d, 1000, 1, 9)).await.unwrap();
                d.read(1000, IoBuf::new(4096, 1)).await.unwrap()
            });
            assert_eq!(inner, pattern(&d, 1000, 1, 9));
        });
        // Everything has completed: the descriptor can be closed and the device removed.
        drop(d);
        reactor::block_on(reg.unregister("a")).unwrap();
    });
}

#[test]
fn hot_remove_with_inflight_io_under_the_reactor() {
    with_aio(|reg| {
        let mut d = reg.open("a", true).unwrap();
        let mut events = d.take_events().unwrap();
        let d = Arc::new(d);
        let done = reactor::block_on(async {
            let ios = (0..64u64).map(|i| {
                let d = d.clone();
                async move {
                    let r = d.write(i, pattern(&d, i, 1, 2)).await;
                    r.map(drop).map_err(|e| e.errno())
                }
            });
            let ios = futures::future::join_all(ios);
            let remove = async {
                let (unreg, ev) = futures::join!(reg.unregister("a"), async {
                    let ev = events.next().await;
                    ev
                });
                (unreg, ev)
            };
            let holder = d.clone();
            drop(d);
            let closer = async move {
                // The holder closes its descriptor once the I/O is done.
                futures_timer::Delay::new(Duration::from_millis(5)).await;
                drop(holder);
            };
            let (results, (unreg, ev), ()) = futures::join!(ios, remove, closer);
            assert_eq!(ev, Some(BdevEvent::Remove));
            unreg.unwrap();
            results
        });
        assert_eq!(done.len(), 64);
        assert!(done.iter().all(|r| r.is_ok() || *r == Err(libc::ENODEV)));
        assert!(reg.get("a").is_none());
    });
}

#[test]
fn foreign_block_on_inside_the_reactor_does_not_hang() {
    with_aio(|reg| {
        let d = reg.open("a", true).unwrap();
        reactor::block_on(async {
            // Misuse (blocking the reactor), rescued by the backstop thread.
            let w = futures::executor::block_on(d.write(3, pattern(&d, 3, 1, 4))).unwrap();
            let r = futures::executor::block_on(d.read(3, IoBuf::new(4096, 1))).unwrap();
            assert_eq!(r, w);
        });
    });
}

/// A ring attached to a foreign event loop (the target's reactors): requests issued on the
/// thread are queued on its ring, the loop's submit waker fires, and `pass` submits and
/// completes them once the ring's fd is readable; the data round-trips.
#[test]
fn an_attached_ring_serves_requests_from_a_foreign_loop() {
    with_aio(attached_round_trip);
}

/// The same on an SQPOLL ring (where the kernel allows it): its SQ thread submits, and the
/// ring's fd still turns readable at completions.
#[test]
fn an_attached_sqpoll_ring_serves_requests_from_a_foreign_loop() {
    guarded(|| {
        reactor::set_sqpoll(Some(reactor::SqPoll::default()));
        let dir = tempfile::tempdir().unwrap();
        let Some(reg) = aio_registry(&dir, AioEngine::Uring) else {
            return;
        };
        if !reactor::is_sqpoll() {
            test_support::skip(
                "an_attached_sqpoll_ring_serves_requests_from_a_foreign_loop",
                "the kernel refused an IORING_SETUP_SQPOLL ring",
            );
            return;
        }
        attached_round_trip(&reg);
    })
}

/// Body of the attached-ring tests: a write then a read of `a`, served by a hand-written
/// poll loop around [`reactor::attach`].
fn attached_round_trip(reg: &Registry) {
    let mut ring = reactor::attach().expect("a ring");
    let d = reg.open("a", true).unwrap();
    struct Flag(std::sync::atomic::AtomicBool);
    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let submit = Arc::new(Flag(false.into()));
    ring.register_submit(&std::task::Waker::from(submit.clone()));
    let task = Arc::new(Flag(false.into()));
    let waker = std::task::Waker::from(task.clone());
    let mut cx = std::task::Context::from_waker(&waker);
    let mut w = Box::pin(d.write_io(16, pattern(&d, 16, 2, 5)));
    assert!(
        w.as_mut().poll(&mut cx).is_pending(),
        "queued, not submitted"
    );
    assert!(
        submit.0.load(std::sync::atomic::Ordering::SeqCst),
        "the loop is told to submit"
    );
    // The loop: submit, wait for the ring fd, complete.
    let done = loop {
        ring.pass();
        if let std::task::Poll::Ready(r) = w.as_mut().poll(&mut cx) {
            break r;
        }
        let mut p = libc::pollfd {
            fd: ring.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        unsafe { libc::poll(&mut p, 1, 1000) };
    };
    done.unwrap();
    assert!(
        task.0.load(std::sync::atomic::Ordering::SeqCst),
        "the request's task was woken"
    );
    let mut r = Box::pin(d.read_io(16, IoBuf::new(2 * 4096, 4096)));
    let got = loop {
        ring.pass();
        if let std::task::Poll::Ready(r) = r.as_mut().poll(&mut cx) {
            break r.unwrap();
        }
        let mut p = libc::pollfd {
            fd: ring.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        unsafe { libc::poll(&mut p, 1, 1000) };
    };
    assert_eq!(got, pattern(&d, 16, 2, 5));
}

/// 256 requests at depth 64 on an exclusive reactor (single-issuer ring, batched completion
/// waits), optionally busy polling: every block reads back what was written to it.
fn exclusive_round_trip(busy_poll: bool) {
    guarded(move || {
        reactor::set_exclusive();
        reactor::set_busy_poll(busy_poll);
        let dir = tempfile::tempdir().unwrap();
        let Some(reg) = aio_registry(&dir, AioEngine::Uring) else {
            return;
        };
        let d = reg.open("a", true).unwrap();
        reactor::block_on(async {
            let lbas: Vec<u64> = (0..256u64).map(|i| (i * 7) % 2048).collect();
            futures::stream::iter(lbas.iter().copied())
                .for_each_concurrent(64, |lba| {
                    let d = &d;
                    async move {
                        d.write(lba, pattern(d, lba, 1, 5)).await.unwrap();
                    }
                })
                .await;
            futures::stream::iter(lbas.iter().copied())
                .for_each_concurrent(64, |lba| {
                    let d = &d;
                    async move {
                        let r = d.read(lba, IoBuf::new(4096, 4096)).await.unwrap();
                        assert_eq!(r, pattern(d, lba, 1, 5), "lba {lba}");
                    }
                })
                .await;
        });
        drop(d);
        reactor::block_on(reg.unregister("a")).unwrap();
    })
}

#[test]
fn exclusive_reactor_with_batched_completion_waits_round_trips() {
    exclusive_round_trip(false);
}

#[test]
fn busy_polling_reactor_round_trips() {
    exclusive_round_trip(true);
}

/// The first CPU this thread may run on (an SQ thread bound there is allowed by the kernel
/// under any `taskset`).
fn first_allowed_cpu() -> u32 {
    // SAFETY: a zeroed cpu_set_t is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: fills `set`, whose size is passed, for this thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    assert_eq!(r, 0, "sched_getaffinity");
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, inside `set`.
        .find(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .expect("some allowed CPU") as u32
}

/// The kernel's SQ poll thread of a ring created by thread `tid`: `iou-sqp-TID` among the
/// process's tasks; returns its `/proc/self/task` directory. The thread names itself when
/// it first runs, so this looks for up to `wait`.
fn sq_thread_of(tid: i32, wait: Duration) -> Option<std::path::PathBuf> {
    let name = format!("iou-sqp-{tid}");
    let deadline = std::time::Instant::now() + wait;
    loop {
        let found = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim_end() == name.as_str())
            });
        if found.is_some() || std::time::Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether this thread's SQPOLL ring's kernel thread, idle now, flags within 2 s that it
/// sleeps (its idle time is a few ms, but on a loaded machine it may wait to be scheduled).
fn sq_thread_falls_asleep() -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        if reactor::sq_thread_sleeping() == Some(true) {
            return true;
        }
    }
    false
}

/// Writes a pattern (seed `seed`) to 256 scattered blocks at depth 64, flushes, and reads
/// every block back at depth 64, checking its bytes.
fn pattern_round_trip(d: &bdev_core::Descriptor, seed: u8) {
    reactor::block_on(async {
        let lbas: Vec<u64> = (0..256u64).map(|i| (i * 13) % 2048).collect();
        futures::stream::iter(lbas.iter().copied())
            .for_each_concurrent(64, |lba| async move {
                d.write(lba, pattern(d, lba, 1, seed)).await.unwrap();
            })
            .await;
        d.flush().await.unwrap();
        futures::stream::iter(lbas.iter().copied())
            .for_each_concurrent(64, |lba| async move {
                let r = d.read(lba, IoBuf::new(4096, 4096)).await.unwrap();
                assert_eq!(r, pattern(d, lba, 1, seed), "lba {lba} seed {seed}");
            })
            .await;
    });
}

/// An exclusive reactor with SQPOLL: the ring is SQPOLL (the kernel's `iou-sqp-TID` thread
/// exists, bound to the CPU asked for), writes at depth 64 read back, the SQ thread goes to
/// sleep when idle (`IORING_SQ_NEED_WAKEUP`), and I/O after that still completes (the
/// reactor woke it).
#[test]
fn sqpoll_reactor_round_trips_and_wakes_its_idle_sq_thread() {
    guarded(|| {
        let cpu = first_allowed_cpu();
        reactor::set_exclusive();
        reactor::set_sqpoll(Some(reactor::SqPoll {
            cpu: Some(cpu),
            idle: Duration::from_millis(2),
        }));
        let dir = tempfile::tempdir().unwrap();
        let Some(reg) = aio_registry(&dir, AioEngine::Uring) else {
            return;
        };
        if !reactor::is_sqpoll() {
            test_support::skip(
                "sqpoll_reactor_round_trips_and_wakes_its_idle_sq_thread",
                "the kernel refused an IORING_SETUP_SQPOLL ring",
            );
            return;
        }
        // SAFETY: gettid has no arguments.
        let tid = unsafe { libc::gettid() };
        let sq = sq_thread_of(tid, Duration::from_secs(5)).expect("the ring's iou-sqp thread");
        let status = std::fs::read_to_string(sq.join("status")).unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(str::trim);
        assert_eq!(
            allowed,
            Some(cpu.to_string().as_str()),
            "SQ thread affinity"
        );
        println!("sqpoll ring, single issuer {}", reactor::is_single_issuer());

        let d = reg.open("a", true).unwrap();
        pattern_round_trip(&d, 5);
        // Idle well past the SQ thread's idle time: it sleeps and flags that it needs a
        // wake-up.
        assert!(
            sq_thread_falls_asleep(),
            "SQ thread still awake after 2 s idle"
        );
        // The next submissions must wake it, or nothing completes (and `guarded` fails).
        pattern_round_trip(&d, 9);
        // Several idle/busy cycles, each request alone in flight.
        for i in 0..5u64 {
            assert!(sq_thread_falls_asleep(), "cycle {i}: SQ thread still awake");
            reactor::block_on(async {
                d.write(i, pattern(&d, i, 1, 3)).await.unwrap();
                let r = d.read(i, IoBuf::new(4096, 4096)).await.unwrap();
                assert_eq!(r, pattern(&d, i, 1, 3), "cycle {i}");
            });
        }
        drop(d);
        reactor::block_on(reg.unregister("a")).unwrap();
    })
}

/// SQPOLL asked for where the kernel refuses it (a CPU that does not exist): the reactor
/// falls back to its normal ring, without error, and I/O through it reads back.
#[test]
fn refused_sqpoll_falls_back_to_the_normal_ring() {
    guarded(|| {
        reactor::set_exclusive();
        reactor::set_sqpoll(Some(reactor::SqPoll {
            cpu: Some(1 << 20),
            idle: Duration::from_millis(2),
        }));
        let dir = tempfile::tempdir().unwrap();
        let Some(reg) = aio_registry(&dir, AioEngine::Uring) else {
            return;
        };
        assert!(!reactor::is_sqpoll());
        assert_eq!(reactor::sq_thread_sleeping(), None);
        // SAFETY: gettid has no arguments.
        assert!(sq_thread_of(unsafe { libc::gettid() }, Duration::from_millis(300)).is_none());
        let d = reg.open("a", true).unwrap();
        pattern_round_trip(&d, 11);
        drop(d);
        reactor::block_on(reg.unregister("a")).unwrap();
    })
}
