//! A reactor: runs a future on the current thread and serves the aio bdevs' io_uring I/O
//! inline (SPDK's reactor with its io_uring poller).
//!
//! [`block_on`] polls its future, and between polls submits the I/O the future queued and
//! reaps completions from the thread's own ring. When nothing is ready it sleeps in
//! `io_uring_enter` rather than on a futex, so a completion wakes exactly this thread, which
//! then runs the woken tasks at once: one wake-up per completion batch, as in fio. Wakers
//! called from other threads write to an eventfd the ring is reading.
//!
//! Any future works here (malloc, lvol, channels...); only aio I/O issued from this thread
//! while [`block_on`] runs goes through the thread's ring (aio I/O issued elsewhere uses the
//! bdev's own ring and completion thread). Never block inside the future (no nested foreign
//! `block_on` waiting for aio I/O): the reactor would not get to reap it. Nested
//! [`block_on`] calls are fine. `block_on` returns only once every request it queued has
//! completed, so no buffer outlives its owner in the kernel.
//!
//! Without io_uring, [`block_on`] is `futures::executor::block_on`.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use io_uring::{opcode, types};

use crate::backend::uring::{Ring, SubmitMode, EVENTFD_KEY};

/// Ring size of a reactor.
const ENTRIES: u32 = 512;

/// The per-thread ring and its wake-up eventfd.
struct ThreadRing {
    ring: Arc<Ring>,
    efd: Arc<OwnedFd>,
    /// Target of the in-flight eventfd read; boxed so it does not move.
    efd_buf: Box<[u8; 8]>,
    efd_armed: bool,
}

impl ThreadRing {
    fn new() -> Option<ThreadRing> {
        let ring = Ring::new(ENTRIES, SubmitMode::Owner)
            .map_err(|e| tracing::debug!(target: "uring", "no reactor ring: {e}"))
            .ok()?;
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let efd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        Some(ThreadRing {
            ring: Arc::new(ring),
            efd,
            efd_buf: Box::new([0; 8]),
            efd_armed: false,
        })
    }

    /// Keeps one read of the eventfd in flight, so a cross-thread wake ends the sleep.
    fn arm(&mut self) {
        if self.efd_armed {
            return;
        }
        let sqe = opcode::Read::new(
            types::Fd(self.efd.as_raw_fd()),
            self.efd_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(EVENTFD_KEY);
        if self.ring.push_raw(&sqe).is_ok() {
            self.efd_armed = true;
        }
    }
}

impl Drop for ThreadRing {
    fn drop(&mut self) {
        // Complete the eventfd read (its buffer is ours) and every request still in flight
        // before the ring and the buffers go away.
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our own eventfd.
        unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        let (mut cqes, mut ready) = (Vec::new(), Vec::new());
        while self.efd_armed || self.ring.pending() > 0 {
            self.ring.submit_and_wait(1);
            if self.ring.drain(&mut cqes, &mut ready).eventfd {
                self.efd_armed = false;
            }
        }
    }
}

thread_local! {
    static RING: RefCell<Option<ThreadRing>> = const { RefCell::new(None) };
    static RING_TRIED: Cell<bool> = const { Cell::new(false) };
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// The ring of the reactor running on this thread, if any.
pub(crate) fn current_ring() -> Option<Arc<Ring>> {
    if DEPTH.with(|d| d.get()) == 0 {
        return None;
    }
    RING.with(|r| r.borrow().as_ref().map(|t| t.ring.clone()))
}

/// Whether the current thread is inside [`block_on`] with an io_uring ring.
pub fn in_reactor() -> bool {
    current_ring().is_some()
}

struct WakeState {
    woken: AtomicBool,
    sleeping: AtomicBool,
    efd: Arc<OwnedFd>,
}

impl Wake for WakeState {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to an eventfd kept open by the Arc.
            unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

/// Runs `fut` to completion on this thread, serving aio io_uring I/O inline (see the module
/// documentation).
pub fn block_on<F: Future>(fut: F) -> F::Output {
    let have_ring = RING.with(|r| {
        if r.borrow().is_none() && !RING_TRIED.with(|t| t.replace(true)) {
            *r.borrow_mut() = ThreadRing::new();
        }
        r.borrow().is_some()
    });
    if !have_ring {
        return futures::executor::block_on(fut);
    }
    let (ring, efd) = RING.with(|r| {
        let b = r.borrow();
        let t = b.as_ref().expect("checked above");
        (t.ring.clone(), t.efd.clone())
    });
    let state = Arc::new(WakeState {
        woken: AtomicBool::new(true),
        sleeping: AtomicBool::new(false),
        efd,
    });
    let waker = Waker::from(state.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let mut cqes = Vec::with_capacity(ENTRIES as usize);
    let mut ready = Vec::with_capacity(ENTRIES as usize);
    DEPTH.with(|d| d.set(d.get() + 1));
    struct Depth;
    impl Drop for Depth {
        fn drop(&mut self) {
            DEPTH.with(|d| d.set(d.get() - 1));
        }
    }
    let _depth = Depth;
    let out = loop {
        if state.woken.swap(false, Ordering::SeqCst) {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                break v;
            }
        }
        // Submit what the future queued and take what has completed.
        ring.flush();
        let d = ring.drain(&mut cqes, &mut ready);
        if d.eventfd {
            RING.with(|r| {
                if let Some(t) = r.borrow_mut().as_mut() {
                    t.efd_armed = false;
                }
            });
        }
        if state.woken.load(Ordering::SeqCst) {
            continue;
        }
        RING.with(|r| {
            if let Some(t) = r.borrow_mut().as_mut() {
                t.arm();
            }
        });
        state.sleeping.store(true, Ordering::SeqCst);
        if !state.woken.load(Ordering::SeqCst) {
            ring.submit_and_wait(1);
        }
        state.sleeping.store(false, Ordering::SeqCst);
        let d = ring.drain(&mut cqes, &mut ready);
        if d.eventfd {
            RING.with(|r| {
                if let Some(t) = r.borrow_mut().as_mut() {
                    t.efd_armed = false;
                }
            });
        }
    };
    // Requests of futures dropped inside `fut` may still be in flight: wait for them, so
    // nothing this call queued outlives it (the eventfd read stays armed).
    if DEPTH.with(|d| d.get()) == 1 {
        while ring.pending() > 0 {
            ring.submit_and_wait(1);
            if ring.drain(&mut cqes, &mut ready).eventfd {
                RING.with(|r| {
                    if let Some(t) = r.borrow_mut().as_mut() {
                        t.efd_armed = false;
                    }
                });
            }
        }
    }
    out
}
