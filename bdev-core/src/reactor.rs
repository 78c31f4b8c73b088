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
//! bdev's own ring and completion thread). Do not block inside the future: a nested foreign
//! `block_on` waiting for aio I/O still completes, because a backstop thread reaps the ring
//! when the reactor has not for 10 ms, but it is slow. Nested [`block_on`] calls are fine.
//! `block_on` returns only once every request it queued has completed, so no buffer
//! outlives its owner in the kernel.
//!
//! A thread that only runs reactor work (the target's reactors, the benchmark driver) calls
//! [`set_exclusive`] first: its ring is then set up `SINGLE_ISSUER | DEFER_TASKRUN` where the
//! kernel has them, completion work runs only when the reactor enters the kernel, and there
//! is no backstop thread (nothing may block inside its futures). Files are registered with
//! the ring on first use (see the aio bdev).
//!
//! Every poll pass ends with at most one `io_uring_enter`: it submits what the pass queued
//! and collects completions without waiting while tasks are still runnable, or submits and
//! sleeps until a completion (or a cross-thread wake) when none is.
//!
//! Polling is adaptive ([`set_poll_window`], `BDEV_REACTOR_POLL`): while requests are in
//! flight an exclusive reactor keeps polling the completion queue (no syscall unless it has
//! something to submit or the kernel flags completion work) for up to a window (default
//! 50 µs) after the last completion or submission, then sleeps; it does not poll while its
//! core is shared with other runnable threads (checked every 10 ms from the thread's
//! run-queue wait). An idle reactor (nothing in flight) always sleeps in the kernel and uses
//! no CPU. [`poll_stats`] counts what it did.
//!
//! Optionally ([`set_sqpoll`], or `BDEV_REACTOR_SQPOLL=1` in the environment) the ring is
//! set up `IORING_SETUP_SQPOLL`: a kernel thread (`iou-sqp-TID`, bound to
//! `BDEV_REACTOR_SQPOLL_CPU` if given) takes the queued requests, so a pass submits without
//! a syscall while that thread is awake; after its idle time without submissions it sleeps
//! and the next submission wakes it (`IORING_ENTER_SQ_WAKEUP`). Completions are still
//! waited for in `io_uring_enter`. An SQPOLL ring cannot have `DEFER_TASKRUN`; an exclusive
//! one keeps `SINGLE_ISSUER`. Where the kernel refuses SQPOLL the normal ring is used.
//!
//! Without io_uring, [`block_on`] is `futures::executor::block_on`.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use io_uring::{opcode, types};

use crate::backend::uring::{Ring, EVENTFD_KEY};
pub use crate::backend::uring::{SqPoll, DEFAULT_SUBMIT_CAP};

/// Ring size of a reactor.
const ENTRIES: u32 = 512;

/// The per-thread ring, its wake-up eventfd and its backstop thread.
struct ThreadRing {
    ring: Arc<Ring>,
    efd: Arc<OwnedFd>,
    /// Target of the in-flight eventfd read; boxed so it does not move.
    efd_buf: Box<[u8; 8]>,
    stop: Arc<AtomicBool>,
    backstop: Option<std::thread::JoinHandle<()>>,
    /// Longest sleep in the kernel while idle.
    idle_wait: std::time::Duration,
    /// How long to poll without sleeping while requests are in flight (see
    /// [`set_poll_window`]); zero: sleep at once.
    poll_window: std::time::Duration,
    /// While sleeping with `n` requests in flight, wait for `n / batch` completions
    /// (exclusive rings: 4, or `BDEV_REACTOR_BATCH`; 1 = wake at the first).
    batch: usize,
}

/// How often a polling reactor looks at how long it waited for its CPU.
const CONTENTION_TICK: std::time::Duration = std::time::Duration::from_millis(10);

/// Run-queue wait, as a fraction (1/N) of a [`CONTENTION_TICK`], above which the core is
/// taken to be shared and polling is suspended for the next tick.
const CONTENTION_SHARE: u32 = 20;

/// Whether this thread's core is shared with other runnable threads: the scheduler's
/// run-queue wait of the thread (`/proc/thread-self/schedstat`, second field) over the last
/// [`CONTENTION_TICK`]. Polling pays only on a core of its own: on a shared one a poller
/// burns the time slice others (fio over NBD, another reactor) need, and waits for its own
/// next slice where a woken sleeper runs at once.
struct Contention {
    /// `None`: no schedstat (never contended).
    file: Option<std::fs::File>,
    /// [`crate::stats::now`] of the last evaluation.
    last_check: u64,
    last_delay: u64,
    contended: bool,
}

impl Contention {
    fn new() -> Contention {
        let file = std::fs::File::open("/proc/thread-self/schedstat").ok();
        let mut c = Contention {
            file,
            last_check: crate::stats::now(),
            last_delay: 0,
            contended: false,
        };
        c.last_delay = c.run_delay().unwrap_or(0);
        c
    }

    /// Nanoseconds this thread has waited on a run queue so far.
    fn run_delay(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let f = self.file.as_ref()?;
        let mut buf = [0u8; 96];
        let n = f.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    }

    /// Whether the core is shared (re-evaluated once per [`CONTENTION_TICK`]).
    fn contended(&mut self) -> bool {
        let now = crate::stats::now();
        let dt = std::time::Duration::from_nanos(now.saturating_sub(self.last_check));
        if dt < CONTENTION_TICK {
            return self.contended;
        }
        if let Some(d) = self.run_delay() {
            let waited = d.saturating_sub(self.last_delay);
            self.contended = waited > (dt / CONTENTION_SHARE).as_nanos() as u64;
            self.last_delay = d;
            if self.contended {
                count(|s| s.contended_ticks += 1);
            }
        }
        self.last_check = now;
        self.contended
    }
}

/// [`Contention::contended`] of this thread (its state created on first use).
fn core_contended() -> bool {
    CONTENTION.with(|c| match c.try_borrow_mut() {
        Ok(mut c) => c.get_or_insert_with(Contention::new).contended(),
        Err(_) => false,
    })
}

/// Longest wait for a batch of completions.
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

/// Longest idle sleep of an exclusive reactor: a wake-up goes through the eventfd, so this
/// only bounds the cost of a lost one.
const EXCLUSIVE_IDLE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// How often the backstop looks for completions the reactor did not reap.
const BACKSTOP_TICK: std::time::Duration = std::time::Duration::from_millis(10);

/// Submits and reaps for the reactor when its thread has not drained the ring for a whole
/// tick: the thread is then blocked inside its future (for instance in a foreign
/// `block_on`), and this turns what would be a hang into a delay.
fn backstop(ring: Arc<Ring>, stop: Arc<AtomicBool>) {
    let (mut cqes, mut ready) = (Vec::new(), Vec::new());
    let mut last = ring.drain_count();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(BACKSTOP_TICK);
        let now = ring.drain_count();
        if now == last && ring.pending() > 0 {
            // Submit what the stalled reactor queued, then reap what has completed.
            ring.flush();
            if ring.has_completions() {
                tracing::debug!(target: "uring", "reactor stalled; backstop reaps");
                ring.drain(&mut cqes, &mut ready);
            }
        }
        last = ring.drain_count();
    }
}

impl ThreadRing {
    fn new(exclusive: bool) -> Option<ThreadRing> {
        let ring = Ring::owned(ENTRIES, exclusive, SQPOLL.with(|s| s.get()))
            .map_err(|e| tracing::debug!(target: "uring", "no reactor ring: {e}"))
            .ok()?;
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let efd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let single = ring.single_issuer;
        let ring = Arc::new(ring);
        let stop = Arc::new(AtomicBool::new(false));
        let (r2, s2) = (ring.clone(), stop.clone());
        // A single-issuer ring cannot be entered from another thread: no backstop.
        let backstop = if single {
            None
        } else {
            Some(
                std::thread::Builder::new()
                    .name("bdev-reactor-bs".into())
                    .spawn(move || backstop(r2, s2))
                    .ok()?,
            )
        };
        Some(ThreadRing {
            ring,
            efd,
            efd_buf: Box::new([0; 8]),
            stop,
            backstop,
            idle_wait: if exclusive {
                EXCLUSIVE_IDLE_WAIT
            } else {
                BACKSTOP_TICK
            },
            poll_window: if exclusive {
                POLL_WINDOW.with(|w| w.get())
            } else {
                std::time::Duration::ZERO
            },
            batch: if exclusive {
                std::env::var("BDEV_REACTOR_BATCH")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(4)
            } else {
                1
            },
        })
    }

    /// Keeps one read of the eventfd in flight, so a cross-thread wake ends the sleep.
    fn arm(&mut self) {
        if self.ring.efd_armed.swap(true, Ordering::SeqCst) {
            return;
        }
        let sqe = opcode::Read::new(
            types::Fd(self.efd.as_raw_fd()),
            self.efd_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(EVENTFD_KEY);
        if self.ring.push_raw(&sqe).is_err() {
            self.ring.efd_armed.store(false, Ordering::SeqCst);
        }
    }
}

impl Drop for ThreadRing {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.backstop.take() {
            let _ = t.join();
        }
        // Complete the eventfd read (its buffer is ours) and every request still in flight
        // before the ring and the buffers go away.
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our own eventfd.
        unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        let (mut cqes, mut ready) = (Vec::new(), Vec::new());
        while self.ring.efd_armed.load(Ordering::SeqCst) || self.ring.pending() > 0 {
            self.ring.wait_timeout(BACKSTOP_TICK);
            self.ring.drain(&mut cqes, &mut ready);
        }
    }
}

thread_local! {
    static RING: RefCell<Option<ThreadRing>> = const { RefCell::new(None) };
    static RING_TRIED: Cell<bool> = const { Cell::new(false) };
    static DEPTH: Cell<usize> = const { Cell::new(0) };
    static EXCLUSIVE: Cell<bool> = const { Cell::new(false) };
    static ATTACHED: Cell<bool> = const { Cell::new(false) };
    static POLL_WINDOW: Cell<std::time::Duration> = Cell::new(poll_window_from_env());
    static ATTACHED_POLL_WINDOW: Cell<std::time::Duration> =
        Cell::new(attached_poll_window_from_env());
    static CONTENTION: RefCell<Option<Contention>> = const { RefCell::new(None) };
    static STATS: Cell<PollStats> =
        const { Cell::new(PollStats { poll_passes: 0, sleeps: 0, contended_ticks: 0 }) };
    static SQPOLL: Cell<Option<SqPoll>> = Cell::new(sqpoll_from_env());
}

/// The SQPOLL setting in the environment: `BDEV_REACTOR_SQPOLL=1` turns it on,
/// `BDEV_REACTOR_SQPOLL_CPU=N` binds the SQ thread to CPU `N`, and
/// `BDEV_REACTOR_SQPOLL_IDLE_MS=M` sets its idle time (default 2 ms). Values that do not
/// parse are ignored (with a log line).
fn sqpoll_from_env() -> Option<SqPoll> {
    let on = std::env::var("BDEV_REACTOR_SQPOLL").ok()?;
    if on.is_empty() || on == "0" {
        return None;
    }
    let num = |var: &str| {
        let v = std::env::var(var).ok()?;
        v.trim()
            .parse::<u32>()
            .map_err(|e| tracing::warn!(target: "uring", "{var}={v:?} ignored: {e}"))
            .ok()
    };
    let idle = num("BDEV_REACTOR_SQPOLL_IDLE_MS")
        .map(|ms| std::time::Duration::from_millis(u64::from(ms.max(1))))
        .unwrap_or(SqPoll::default().idle);
    Some(SqPoll {
        cpu: num("BDEV_REACTOR_SQPOLL_CPU"),
        idle,
    })
}

/// Whether the reactor ring created later on this thread (by its first [`block_on`] or
/// [`attach`]) is set up `IORING_SETUP_SQPOLL`, and how (default: off, or what
/// `BDEV_REACTOR_SQPOLL` and `BDEV_REACTOR_SQPOLL_CPU` in the environment say). Where the
/// kernel refuses SQPOLL the ring is set up without it (see [`is_sqpoll`]). The SQ thread's
/// CPU time is the kernel's, not this thread's: bind it (`cpu`) to a core of its own to
/// measure or to keep it off the reactor's core. Calls after the ring exists have no effect
/// on it.
pub fn set_sqpoll(cfg: Option<SqPoll>) {
    SQPOLL.with(|s| s.set(cfg));
}

/// Whether this thread's ring was set up `IORING_SETUP_SQPOLL` (after its first
/// [`block_on`] or [`attach`]).
pub fn is_sqpoll() -> bool {
    RING.with(|r| r.borrow().as_ref().is_some_and(|t| t.ring.sqpoll))
}

/// For an SQPOLL ring of this thread, whether its kernel thread is asleep
/// (`IORING_SQ_NEED_WAKEUP`: it went idle, and the next submission wakes it); `None`
/// without an SQPOLL ring.
pub fn sq_thread_sleeping() -> Option<bool> {
    RING.with(|r| {
        r.borrow()
            .as_ref()
            .and_then(|t| t.ring.sq_thread_sleeping())
    })
}

/// Default [`set_poll_window`] of an exclusive reactor: poll for up to 50 µs after the last
/// completion (or submission) while requests are in flight, then sleep.
pub const DEFAULT_POLL_WINDOW: std::time::Duration = std::time::Duration::from_micros(50);

/// Default [`set_attached_poll_window`] of a reactor served by a foreign event loop
/// ([`attach`]): zero, it sleeps in its loop as soon as nothing is runnable.
pub const DEFAULT_ATTACHED_POLL_WINDOW: std::time::Duration = std::time::Duration::ZERO;

/// Parses a poll setting: `0`/`off`/`no`/`false` -> zero (sleep at once), `N` or `Nus` ->
/// `N` µs, anything else (`1`, `on`, empty...) -> busy polling ([`std::time::Duration::MAX`]).
/// `1` means busy, not 1 µs, as it always has for `BDEV_REACTOR_POLL`.
fn parse_poll(v: &str) -> std::time::Duration {
    let v = v.trim();
    match v {
        "0" | "off" | "no" | "false" => return std::time::Duration::ZERO,
        "1" | "" | "on" | "yes" | "true" | "busy" => return std::time::Duration::MAX,
        _ => {}
    }
    match v.strip_suffix("us").unwrap_or(v).trim().parse::<u64>() {
        Ok(us) => std::time::Duration::from_micros(us),
        Err(_) => std::time::Duration::MAX,
    }
}

/// `BDEV_REACTOR_POLL` (see [`set_poll_window`]), or [`DEFAULT_POLL_WINDOW`].
fn poll_window_from_env() -> std::time::Duration {
    std::env::var("BDEV_REACTOR_POLL")
        .map(|v| parse_poll(&v))
        .unwrap_or(DEFAULT_POLL_WINDOW)
}

/// `BDEV_REACTOR_ATTACHED_POLL` (see [`set_attached_poll_window`]), or
/// [`DEFAULT_ATTACHED_POLL_WINDOW`].
fn attached_poll_window_from_env() -> std::time::Duration {
    std::env::var("BDEV_REACTOR_ATTACHED_POLL")
        .map(|v| parse_poll(&v))
        .unwrap_or(DEFAULT_ATTACHED_POLL_WINDOW)
}

/// How an exclusive reactor created later on this thread waits while its requests are in
/// flight: it polls without sleeping until `window` has passed since the last completion
/// (or submission), then sleeps in `io_uring_enter` until completions arrive. Zero: sleep
/// as soon as no task is runnable (batched completion waits, see the module docs);
/// [`std::time::Duration::MAX`]: poll for as long as anything is in flight, as SPDK's
/// reactor does. Default [`DEFAULT_POLL_WINDOW`]; `BDEV_REACTOR_POLL` in the environment
/// sets it (`0` sleep, `N` or `Nus` a window of N µs, `1` or any other value busy polling).
///
/// A finite window polls only while the core is the reactor's own: every 10 ms of polling
/// it reads how long the thread waited on the run queue (`/proc/thread-self/schedstat`),
/// and when that was more than 5 % of the time (other threads runnable on its core) it
/// sleeps at once until the next check, as with a zero window (counted in
/// [`PollStats::contended_ticks`]). Busy polling (`Duration::MAX`) does not check.
///
/// A polling pass enters the kernel only when it has requests to submit or the kernel flags
/// completion work (`IORING_SQ_TASKRUN`), and reads the completion queue in user space.
/// Either way an idle reactor (nothing in flight) sleeps, so it uses no CPU. A non-exclusive
/// `block_on` never polls. Call it before the thread's first [`block_on`].
pub fn set_poll_window(window: std::time::Duration) {
    POLL_WINDOW.with(|w| w.set(window));
}

/// `set_poll_window(Duration::MAX)` (`true`: poll while anything is in flight) or
/// `set_poll_window(Duration::ZERO)` (`false`: sleep at once); see [`set_poll_window`].
pub fn set_busy_poll(on: bool) {
    set_poll_window(if on {
        std::time::Duration::MAX
    } else {
        std::time::Duration::ZERO
    });
}

/// Like [`set_poll_window`], for the ring [`attach`] creates later on this thread: how long
/// [`AttachedRing::keep_polling`] says to keep polling after the last completion (or
/// submission) while requests are in flight. Default [`DEFAULT_ATTACHED_POLL_WINDOW`] (zero:
/// the loop sleeps); `BDEV_REACTOR_ATTACHED_POLL` in the environment sets it (same values as
/// `BDEV_REACTOR_POLL`).
pub fn set_attached_poll_window(window: std::time::Duration) {
    ATTACHED_POLL_WINDOW.with(|w| w.set(window));
}

/// What this thread's reactor did while waiting (for tests and diagnostics; counts since the
/// thread started, over every [`block_on`] and [`AttachedRing`] of the thread).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollStats {
    /// Polling passes: checks of the completion queue made instead of sleeping while
    /// requests were in flight.
    pub poll_passes: u64,
    /// Sleeping waits: `io_uring_enter` calls that waited for a completion or a wake.
    pub sleeps: u64,
    /// Checks (one per 10 ms of polling at most) that found the core shared, so polling was
    /// suspended until the next check (see [`set_poll_window`]).
    pub contended_ticks: u64,
}

/// This thread's [`PollStats`].
pub fn poll_stats() -> PollStats {
    STATS.with(|s| s.get())
}

fn count(f: impl FnOnce(&mut PollStats)) {
    STATS.with(|s| {
        let mut v = s.get();
        f(&mut v);
        s.set(v);
    });
}

/// Declares the current thread a dedicated reactor thread: its ring (created at its first
/// [`block_on`]) is single-issuer with deferred task running where the kernel allows it, and
/// has no backstop thread. Nothing run under its [`block_on`] may block the thread waiting
/// for aio I/O (a nested [`block_on`] is fine). Call it before the thread's first
/// [`block_on`]; later calls have no effect on an existing ring.
pub fn set_exclusive() {
    EXCLUSIVE.with(|e| e.set(true));
}

/// Whether this thread's ring was set up `SINGLE_ISSUER` (after its first [`block_on`]),
/// with `DEFER_TASKRUN` unless it is an SQPOLL ring ([`is_sqpoll`]).
pub fn is_single_issuer() -> bool {
    RING.with(|r| r.borrow().as_ref().is_some_and(|t| t.ring.single_issuer))
}

/// Whether a reactor runs on this thread (inside [`block_on`], or on a thread whose event
/// loop serves the thread's ring, see [`attach`]).
pub(crate) fn on_reactor() -> bool {
    DEPTH.with(|d| d.get()) != 0 || ATTACHED.with(|a| a.get())
}

/// The ring of the reactor running on this thread, if any (see [`on_reactor`]).
pub(crate) fn current_ring() -> Option<Arc<Ring>> {
    if !on_reactor() {
        return None;
    }
    RING.with(|r| r.borrow().as_ref().map(|t| t.ring.clone()))
}

/// This thread's ring, served by a foreign event loop instead of [`block_on`] (the target's
/// reactors run a single-threaded tokio loop): aio requests issued on the thread go to its
/// ring, and the loop calls [`AttachedRing::pass`] when the ring's fd is readable (a
/// completion) and when [`AttachedRing::register_submit`]'s waker fires (a request was
/// queued). The ring is not exclusive, so its backstop thread covers a loop that is busy
/// elsewhere for more than a tick.
pub struct AttachedRing {
    ring: Arc<Ring>,
    scratch: crate::backend::uring::Scratch,
    /// See [`set_attached_poll_window`].
    poll_window: std::time::Duration,
    /// Last pass that completed or submitted something ([`crate::stats::now`]).
    last_progress: u64,
}

/// Attaches this thread's ring (created now) to the thread's event loop; `None` without
/// io_uring. Every aio request issued on this thread from now on uses it.
pub fn attach() -> Option<AttachedRing> {
    let ring = RING.with(|r| {
        if r.borrow().is_none() && !RING_TRIED.with(|t| t.replace(true)) {
            *r.borrow_mut() = ThreadRing::new(false);
        }
        r.borrow().as_ref().map(|t| t.ring.clone())
    })?;
    ATTACHED.with(|a| a.set(true));
    ring.submit_cap.store(
        crate::backend::uring::default_submit_cap(),
        Ordering::Relaxed,
    );
    Some(AttachedRing {
        ring,
        poll_window: ATTACHED_POLL_WINDOW.with(|w| w.get()),
        last_progress: crate::stats::now(),
        scratch: (
            Vec::with_capacity(ENTRIES as usize),
            Vec::with_capacity(ENTRIES as usize),
        ),
    })
}

impl AttachedRing {
    /// The ring's fd: readable when completions wait.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.ring.raw_fd()
    }
    /// Submits what is queued and completes what has arrived (waking the requests' tasks),
    /// in at most one `io_uring_enter`. Returns how many requests it completed.
    pub fn pass(&mut self) -> usize {
        let (cqes, ready) = &mut self.scratch;
        if self.ring.submit_and_reap() > 0 {
            self.last_progress = crate::stats::now();
        }
        let done = self.ring.drain(cqes, ready).completed;
        if done > 0 {
            self.last_progress = crate::stats::now();
        }
        done
    }
    /// Whether the loop should come back for another [`AttachedRing::pass`] at once instead
    /// of sleeping: requests are in flight and the last completion or submission is less than
    /// the poll window old (see [`set_attached_poll_window`]; never with a zero window), and,
    /// unless the window is [`std::time::Duration::MAX`], the thread's core is not shared
    /// (the run-queue check of [`set_poll_window`]). A `true` counts as a polling pass in
    /// [`poll_stats`], a `false` as a sleep.
    pub fn keep_polling(&mut self) -> bool {
        let poll = !self.poll_window.is_zero()
            && self.ring.pending() > 0
            && since(self.last_progress) < self.poll_window
            && !(self.poll_window != std::time::Duration::MAX && core_contended());
        if poll {
            count(|s| s.poll_passes += 1);
        } else {
            count(|s| s.sleeps += 1);
        }
        poll
    }
    /// `waker` is woken when a request is queued on the ring and no submission is due yet.
    pub fn register_submit(&self, waker: &Waker) {
        self.ring.register_submit(waker);
    }
    /// Once `cap` requests are queued, the request that makes them `cap` submits them at once
    /// instead of waiting for the loop's next pass; 0: every submission waits for a pass.
    /// Starts at [`DEFAULT_SUBMIT_CAP`] (or `BDEV_REACTOR_SUBMIT_CAP` from the environment).
    ///
    /// Why: a burst (an NBD client's whole queue arrives in one read) is started request by
    /// request with parsing in between; with a cap the disk works on the first requests while
    /// the rest are started, instead of idling until the whole burst is queued, and a few
    /// requests per submission still let the block layer merge neighbours. (A
    /// [`block_on`] reactor queues its bursts without work in between, so it keeps one
    /// submission per pass.)
    pub fn set_submit_cap(&self, cap: usize) {
        self.ring.submit_cap.store(cap, Ordering::Relaxed);
    }
}

/// Time since `tick` (a [`crate::stats::now`] reading): the loops read the cheap counter
/// clock on every pass, not `clock_gettime`.
#[inline]
fn since(tick: u64) -> std::time::Duration {
    std::time::Duration::from_nanos(crate::stats::now().saturating_sub(tick))
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
            *r.borrow_mut() = ThreadRing::new(EXCLUSIVE.with(|e| e.get()));
        }
        r.borrow().is_some()
    });
    if !have_ring {
        return futures::executor::block_on(fut);
    }
    let (ring, efd, idle_wait, poll_window, batch) = RING.with(|r| {
        let b = r.borrow();
        let t = b.as_ref().expect("checked above");
        (
            t.ring.clone(),
            t.efd.clone(),
            t.idle_wait,
            t.poll_window,
            t.batch,
        )
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
    // Last pass that completed or submitted a request (the poll window counts from it).
    let mut last_progress = crate::stats::now();
    let gated = poll_window != std::time::Duration::MAX;
    let out = loop {
        if state.woken.swap(false, Ordering::SeqCst) {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                break v;
            }
        }
        // Take what has completed (no syscall: this reads the completion queue).
        if ring.drain(&mut cqes, &mut ready).completed > 0 {
            last_progress = crate::stats::now();
        }
        let woken = state.woken.load(Ordering::SeqCst);
        let polling = !woken
            && !poll_window.is_zero()
            && ring.pending() > 0
            && since(last_progress) < poll_window
            && !(gated && core_contended());
        if woken || polling {
            // More work right away, or (polling) I/O in flight: one io_uring_enter submits
            // what this pass queued and runs the completion work waiting in the kernel,
            // without sleeping; it is skipped when there is neither (the kernel flags waiting
            // completion work), so a polling pass with nothing new costs no syscall.
            if polling {
                count(|s| s.poll_passes += 1);
            }
            if ring.submit_and_reap() > 0 {
                last_progress = crate::stats::now();
            }
            if ring.drain(&mut cqes, &mut ready).completed > 0 {
                last_progress = crate::stats::now();
            }
            continue;
        }
        RING.with(|r| {
            if let Some(t) = r.borrow_mut().as_mut() {
                t.arm();
            }
        });
        state.sleeping.store(true, Ordering::SeqCst);
        if state.woken.load(Ordering::SeqCst) {
            ring.flush();
        } else {
            // Submits what is queued and sleeps until a completion (or a cross-thread wake
            // through the eventfd) in one syscall. Bounded, so a lost wake-up (a race with
            // the backstop) costs a tick, not a hang.
            let inflight = ring.pending();
            count(|s| s.sleeps += 1);
            if batch > 1 && inflight >= 2 * batch {
                // Many requests in flight: sleep until a batch of them completes (bounded,
                // so the last stragglers of a burst wait a little, never long). Each wake-up
                // then resubmits several requests in one plugged submission: one device
                // notification for the batch instead of one per request.
                ring.wait_for(inflight / batch, BATCH_WAIT);
            } else {
                ring.wait_timeout(idle_wait);
            }
            ring.reap_unregistered();
        }
        state.sleeping.store(false, Ordering::SeqCst);
        ring.drain(&mut cqes, &mut ready);
        // A wake-up after a sleep starts a new poll window.
        last_progress = crate::stats::now();
    };
    // Requests of futures dropped inside `fut` may still be in flight: wait for them, so
    // nothing this call queued outlives it (the eventfd read stays armed).
    if DEPTH.with(|d| d.get()) == 1 {
        while ring.pending() > 0 {
            ring.wait_timeout(BACKSTOP_TICK);
            ring.drain(&mut cqes, &mut ready);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// CPU time of the calling thread.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: fills a valid timespec.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(r, 0);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// What one wait on an exclusive reactor cost.
    #[derive(Debug)]
    struct Cost {
        stats: PollStats,
        cpu: Duration,
        wall: Duration,
    }

    /// On a fresh exclusive reactor thread (poll window `window`, `None`: the default), runs
    /// `f` under `block_on` and measures it; `None` without io_uring.
    fn on_reactor<F, Fut>(window: Option<Duration>, f: F) -> Option<Cost>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        std::thread::spawn(move || {
            // The default is what the environment says; the tests want the built-in one.
            set_poll_window(window.unwrap_or(DEFAULT_POLL_WINDOW));
            set_exclusive();
            block_on(async {});
            if !is_single_issuer() {
                return None;
            }
            let (s0, c0, t0) = (poll_stats(), thread_cpu(), Instant::now());
            block_on(f());
            let (s1, c1, wall) = (poll_stats(), thread_cpu(), t0.elapsed());
            Some(Cost {
                stats: PollStats {
                    poll_passes: s1.poll_passes - s0.poll_passes,
                    sleeps: s1.sleeps - s0.sleeps,
                    contended_ticks: s1.contended_ticks - s0.contended_ticks,
                },
                cpu: c1 - c0,
                wall,
            })
        })
        .join()
        .expect("reactor thread")
    }

    /// Counts `test` as skipped (a failure under CI): no io_uring reactor here.
    fn no_ring(test: &str) {
        test_support::skip(
            test,
            "io_uring (with SINGLE_ISSUER for an exclusive reactor) is not available",
        );
    }

    /// One request that stays in flight for `d`.
    async fn slow(d: Duration) {
        let ring = current_ring().expect("inside the reactor");
        assert_eq!(ring.slow_request(d).await, -libc::ETIME);
    }

    const SLOW: Duration = Duration::from_millis(300);

    #[test]
    fn default_reactor_polls_briefly_then_sleeps_while_a_slow_request_is_in_flight() {
        // A thread preempted for longer than the 50 µs window right after its submission
        // (a loaded test machine) does not poll: some of a few tries must.
        let mut polled = Vec::new();
        for _ in 0..5 {
            let Some(c) = on_reactor(None, || slow(SLOW)) else {
                return no_ring(
                    "default_reactor_polls_briefly_then_sleeps_while_a_slow_request_is_in_flight",
                );
            };
            assert!(c.wall >= SLOW, "{c:?}");
            // It slept in the kernel for (almost) all of the wait.
            assert!(c.stats.sleeps >= 1, "never slept: {c:?}");
            assert!(c.cpu < SLOW / 4, "spun while the request was slow: {c:?}");
            if c.stats.poll_passes > 0 {
                return;
            }
            polled.push(c);
        }
        panic!("no polling pass right after the submission: {polled:?}");
    }

    #[test]
    fn reactor_polls_for_its_window_then_sleeps_while_a_slow_request_is_in_flight() {
        let window = Duration::from_millis(20);
        let Some(c) = on_reactor(Some(window), || slow(SLOW)) else {
            return no_ring(
                "reactor_polls_for_its_window_then_sleeps_while_a_slow_request_is_in_flight",
            );
        };
        assert!(c.wall >= SLOW, "{c:?}");
        assert!(c.stats.poll_passes > 0, "no polling pass: {c:?}");
        assert!(c.stats.sleeps >= 1, "never slept: {c:?}");
        assert!(c.cpu < SLOW / 4, "polled past its window: {c:?}");
    }

    #[test]
    fn busy_polling_reactor_polls_for_as_long_as_a_request_is_in_flight() {
        let Some(c) = on_reactor(Some(Duration::MAX), || slow(SLOW)) else {
            return no_ring("busy_polling_reactor_polls_for_as_long_as_a_request_is_in_flight");
        };
        assert!(c.stats.poll_passes > 1000, "{c:?}");
        assert_eq!(c.stats.sleeps, 0, "{c:?}");
    }

    #[test]
    fn zero_window_reactor_sleeps_at_once() {
        let Some(c) = on_reactor(Some(Duration::ZERO), || slow(SLOW)) else {
            return no_ring("zero_window_reactor_sleeps_at_once");
        };
        assert_eq!(c.stats.poll_passes, 0, "{c:?}");
        assert!(c.stats.sleeps >= 1, "{c:?}");
    }

    /// Nothing in flight: whatever the poll window, the reactor sleeps until a cross-thread
    /// wake, and uses (almost) no CPU meanwhile.
    #[test]
    fn idle_reactor_sleeps_whatever_its_poll_window() {
        for window in [None, Some(Duration::MAX)] {
            let Some(c) = on_reactor(window, || async {
                let (tx, rx) = futures::channel::oneshot::channel::<()>();
                std::thread::spawn(move || {
                    std::thread::sleep(SLOW);
                    let _ = tx.send(());
                });
                rx.await.expect("woken");
            }) else {
                return no_ring("idle_reactor_sleeps_whatever_its_poll_window");
            };
            assert!(c.wall >= SLOW, "{window:?}: {c:?}");
            assert_eq!(c.stats.poll_passes, 0, "{window:?}: {c:?}");
            assert!(
                c.cpu < Duration::from_millis(15),
                "{window:?}: idle reactor used CPU: {c:?}"
            );
        }
    }

    /// An attached ring's loop is told to keep polling while a request is in flight and
    /// the poll window since its submission has not passed, then to sleep; with a zero
    /// window (the default), never.
    #[test]
    fn attached_ring_keeps_polling_within_its_window_only() {
        for (window, polls) in [(Duration::from_millis(2), true), (Duration::ZERO, false)] {
            let r = std::thread::spawn(move || {
                set_attached_poll_window(window);
                let mut a = attach()?;
                let ring = a.ring.clone();
                let mut fut = Box::pin(ring.slow_request(SLOW));
                let waker = futures::task::noop_waker();
                let mut cx = Context::from_waker(&waker);
                assert!(fut.as_mut().poll(&mut cx).is_pending());
                let (s0, t0) = (poll_stats(), Instant::now());
                loop {
                    a.pass();
                    if !a.keep_polling() {
                        break;
                    }
                }
                let (s1, stopped) = (poll_stats(), t0.elapsed());
                assert!(a.ring.pending() > 0, "the request is still in flight");
                Some((s1.poll_passes - s0.poll_passes, stopped))
            })
            .join()
            .expect("attached thread");
            let Some((passes, stopped)) = r else {
                return no_ring("attached_ring_keeps_polling_within_its_window_only");
            };
            assert_eq!(passes > 0, polls, "{window:?}: {passes} passes");
            assert!(stopped < SLOW / 2, "{window:?}: polled for {stopped:?}");
        }
    }

    /// An attached ring submits a burst itself once `cap` requests are queued, without its
    /// loop's pass; with no cap they wait for the pass.
    #[test]
    fn attached_ring_submits_a_burst_at_its_cap() {
        // (cap, requests started) -> queued and not yet handed to the kernel.
        for (cap, started, queued) in [(2, 2, 0), (3, 2, 2), (0, 2, 2), (DEFAULT_SUBMIT_CAP, 8, 0)]
        {
            let r = std::thread::spawn(move || {
                let mut a = attach()?;
                a.set_submit_cap(cap);
                let ring = a.ring.clone();
                let waker = futures::task::noop_waker();
                let mut cx = Context::from_waker(&waker);
                let mut futs: Vec<_> = (0..started)
                    .map(|_| Box::pin(ring.slow_request(Duration::from_millis(5))))
                    .collect();
                for f in futs.iter_mut() {
                    assert!(f.as_mut().poll(&mut cx).is_pending());
                }
                let left = ring.queued();
                // The loop's pass submits the rest; every request then completes.
                let deadline = Instant::now() + Duration::from_secs(5);
                while ring.pending() > 0 {
                    assert!(Instant::now() < deadline, "requests never completed");
                    a.pass();
                    std::thread::sleep(Duration::from_millis(1));
                }
                for f in futs.iter_mut() {
                    assert_eq!(f.as_mut().poll(&mut cx), Poll::Ready(-libc::ETIME));
                }
                Some(left)
            })
            .join()
            .expect("attached thread");
            let Some(left) = r else {
                return no_ring("attached_ring_submits_a_burst_at_its_cap");
            };
            assert_eq!(left, queued, "cap {cap}, {started} started");
        }
    }

    /// Pins the calling thread to `cpu`.
    fn pin(cpu: usize) {
        // SAFETY: a zeroed cpu_set_t is a valid (empty) set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` comes from sched_getcpu, below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: the pointer and size describe `set`.
        let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
        assert_eq!(r, 0, "sched_setaffinity");
    }

    /// A finite poll window on a core another thread keeps busy: the reactor notices the
    /// run-queue wait and sleeps instead of polling for the whole wait.
    #[test]
    fn polling_reactor_sleeps_on_a_shared_core() {
        // SAFETY: sched_getcpu takes no arguments.
        let cpu = unsafe { libc::sched_getcpu() }.max(0) as usize;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let hog = std::thread::spawn(move || {
            pin(cpu);
            while !s2.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        let c = on_reactor(Some(Duration::from_secs(10)), move || async move {
            pin(cpu);
            slow(SLOW).await
        });
        stop.store(true, Ordering::Relaxed);
        hog.join().unwrap();
        let Some(c) = c else {
            return no_ring("polling_reactor_sleeps_on_a_shared_core");
        };
        assert!(c.stats.contended_ticks > 0, "{c:?}");
        assert!(c.stats.sleeps >= 1, "{c:?}");
        // Polling all along would take about half the core for the whole wait.
        assert!(c.cpu < SLOW / 6, "kept polling on a shared core: {c:?}");
    }
}
