//! io_uring machinery shared by the aio bdev and the reactor.
//!
//! A [`Ring`] is an io_uring plus a slab of pending requests keyed by the SQE's `user_data`.
//! Submitters push SQEs under a short mutex (which also guards the slab). The slab entry owns
//! the request's buffers until its CQE arrives; the drain stores the result in the entry and
//! wakes the request's future, which takes the buffers back out of the slab (no channel, no
//! allocation per request in steady state). A future dropped before its completion marks its
//! entry abandoned, and the drain frees the buffers once the kernel is done with them.
//!
//! Who calls `io_uring_enter` depends on the ring's [`SubmitMode`]:
//! * a per-bdev ring ([`UringEngine`]) is shared by every thread and works under any
//!   executor. A completion thread waits for CQEs and completes the requests. The first
//!   submitter of an executor pass yields once so that the other tasks woken in the same pass
//!   queue theirs, then submits them all with one `io_uring_enter` (fio submits in batches
//!   too). The completion thread's bounded wait also submits anything queued, so a request is
//!   never stranded if the future that owed the submit is not polled again. A waiting
//!   future, and a submitter right after its syscall, also try to reap (without blocking):
//!   completions of a thread's requests are posted when that thread enters the kernel, so it
//!   can often take them itself instead of waiting for the completion thread to wake it;
//! * a reactor ring ([`crate::reactor`]) is driven by the reactor thread itself: one
//!   `io_uring_enter` per poll pass submits everything the pass queued and runs the pending
//!   completion work, and when its tasks are idle one `io_uring_enter` submits and sleeps
//!   until a completion, so a completion wakes exactly the thread that waits for it. An
//!   exclusive reactor's ring is set up `SINGLE_ISSUER | DEFER_TASKRUN` where the kernel has
//!   them (completion work runs only when the reactor asks for it, never as an interrupt),
//!   and files are registered with it on first use (`IOSQE_FIXED_FILE`: no file lookup and
//!   no reference count per request). With [`SqPoll`] a reactor ring is set up
//!   `IORING_SETUP_SQPOLL` (see `Ring::owned`): a kernel thread takes the SQEs off the
//!   queue, so a pass submits without a syscall while that thread is awake.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::thread::JoinHandle;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use iobuf::IoBuf;
use slab::Slab;

use crate::{BdevError, Result};

/// `user_data` of the NOP that tells a completion thread to stop.
pub(crate) const EXIT_KEY: u64 = u64::MAX;
/// `user_data` of the reactor's eventfd read.
pub(crate) const EVENTFD_KEY: u64 = u64::MAX - 1;
/// Largest iovec count of one vectored request.
pub(crate) const MAX_IOVS: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn os_err(errno: i32) -> BdevError {
    BdevError::Io(io::Error::from_raw_os_error(errno))
}

/// How a request names its file.
#[derive(Clone, Debug)]
pub(crate) enum FileRef {
    /// Index in the ring's registered files (the ring keeps the file open).
    Fixed(u32),
    /// A plain descriptor. Each pending request keeps the file open until its completion,
    /// because a queued SQE names the descriptor by number until it is submitted.
    Fd(Arc<std::fs::File>),
}

impl FileRef {
    fn keep(&self) -> Option<Arc<std::fs::File>> {
        match self {
            FileRef::Fixed(_) => None,
            FileRef::Fd(f) => Some(f.clone()),
        }
    }
}

/// Builds opcode `$op` on a [`FileRef`] (registered index or plain descriptor).
macro_rules! on_file {
    ($op:ident, $file:expr, $($arg:expr),*) => {
        match $file {
            FileRef::Fixed(i) => opcode::$op::new(types::Fixed(*i), $($arg),*),
            FileRef::Fd(f) => opcode::$op::new(types::Fd(f.as_raw_fd()), $($arg),*),
        }
    };
}

/// What a pending request keeps alive until its completion arrives.
pub(crate) enum Hold {
    /// A request without memory (fsync).
    Nothing,
    Buf(IoBuf),
    /// The iovecs are only read by the kernel.
    Bufs(Vec<IoBuf>, #[allow(dead_code)] IoVecs),
}

/// An iovec array pointing into the buffers held next to it.
pub(crate) struct IoVecs(#[allow(dead_code)] Box<[libc::iovec]>);

// SAFETY: the iovecs only point into `IoBuf`s owned by the same `Hold`, which moves with them;
// nothing dereferences them except the kernel while the request is in flight.
unsafe impl Send for IoVecs {}

/// A request between its submission and the moment its future takes the result.
pub(crate) struct Pending {
    hold: Hold,
    _file: Option<Arc<std::fs::File>>,
    /// The CQE's result, once it arrived.
    result: Option<i32>,
    /// The future waiting for it.
    waker: Option<Waker>,
    /// The future is gone: the drain frees the entry.
    abandoned: bool,
}

/// Who submits queued SQEs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SubmitMode {
    /// The first submitter of an executor pass yields once, then submits for everybody
    /// queued meanwhile (per-bdev rings; `BDEV_URING_NOBATCH` turns it off).
    Batch,
    /// Every submitter submits at once.
    Immediate,
    /// The ring's owner (the reactor loop) submits.
    Owner,
}

/// `IORING_SETUP_SQPOLL` settings of a reactor ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SqPoll {
    /// CPU the kernel's SQ thread is bound to (`sq_thread_cpu`); `None`: not bound.
    pub cpu: Option<u32>,
    /// How long the SQ thread polls an empty queue before it sleeps (`sq_thread_idle`,
    /// in whole milliseconds, at least 1).
    pub idle: std::time::Duration,
}

impl Default for SqPoll {
    /// Unbound, sleeping after 2 ms without submissions.
    fn default() -> Self {
        SqPoll {
            cpu: None,
            idle: std::time::Duration::from_millis(2),
        }
    }
}

/// Reusable buffers of a drain: raw CQEs, then the wakers of the requests they complete.
pub(crate) type Scratch = (Vec<(u64, i32)>, Vec<Waker>);

/// Files registered with a ring (sparse table), and registrations to drop.
struct FileTable {
    /// Free indexes of the sparse table.
    free: Vec<u32>,
    /// Indexes whose file is gone; the owner clears them (see `Ring::reap_unregistered`).
    dropped: Vec<u32>,
}

/// Size of a reactor ring's sparse file table.
const FIXED_FILES: u32 = 256;

/// Source of ring generations (never reused, so a stale registration is never mistaken).
static RING_GEN: AtomicU32 = AtomicU32::new(1);

/// Number of owner-driven rings that can hold registered files at once (the `slot` of a
/// reactor ring; a file keeps one registration per slot, see [`FixedFiles`]).
pub(crate) const RING_SLOTS: usize = 64;

/// Free reactor-ring slots.
fn ring_slots() -> &'static Mutex<Vec<u32>> {
    static FREE: std::sync::OnceLock<Mutex<Vec<u32>>> = std::sync::OnceLock::new();
    FREE.get_or_init(|| Mutex::new((0..RING_SLOTS as u32).rev().collect()))
}

/// A file's registrations with reactor rings: for each ring slot, the ring's generation
/// and the index of the file in that ring's table. Looked up without a lock on every
/// request from a reactor.
pub(crate) struct FixedFiles {
    slots: Box<[AtomicU64]>,
    /// Rings the file is registered with (to clear the registrations when it goes away).
    regs: Mutex<Vec<(std::sync::Weak<Ring>, u32)>>,
}

impl FixedFiles {
    pub(crate) fn new() -> Self {
        FixedFiles {
            slots: (0..RING_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            regs: Mutex::new(Vec::new()),
        }
    }

    /// How a request on `ring` (the calling thread's reactor ring) names `file`:
    /// registered on first use, by descriptor when the ring cannot register it.
    pub(crate) fn file_ref(&self, ring: &Arc<Ring>, file: &Arc<std::fs::File>) -> FileRef {
        let Some(slot) = ring.slot else {
            return FileRef::Fd(file.clone());
        };
        let cell = &self.slots[slot as usize];
        let v = cell.load(Ordering::Acquire);
        if (v >> 32) as u32 == ring.gen {
            return FileRef::Fixed(v as u32);
        }
        match ring.register_sparse(file) {
            Some(idx) => {
                lock(&self.regs).push((Arc::downgrade(ring), idx));
                cell.store(
                    (u64::from(ring.gen) << 32) | u64::from(idx),
                    Ordering::Release,
                );
                FileRef::Fixed(idx)
            }
            None => FileRef::Fd(file.clone()),
        }
    }
}

impl Drop for FixedFiles {
    fn drop(&mut self) {
        for (ring, idx) in lock(&self.regs).drain(..) {
            if let Some(r) = ring.upgrade() {
                r.unregister_later(idx);
            }
        }
    }
}

/// What one drain of the completion queue saw besides requests.
#[derive(Default, Debug)]
pub(crate) struct Drained {
    pub exit: bool,
    pub eventfd: bool,
    pub completed: usize,
}

/// An io_uring with its pending requests.
pub(crate) struct Ring {
    ring: IoUring,
    /// A submitter has promised to submit what is queued (see `submit`).
    flush_armed: AtomicBool,
    pending: Mutex<Slab<Pending>>,
    /// Serialises consumers of the completion queue (a reactor and its backstop).
    cq_lock: Mutex<()>,
    /// Number of drains so far (the reactor's backstop watches it).
    drains: std::sync::atomic::AtomicU64,
    /// The reactor's eventfd read is in flight.
    pub(crate) efd_armed: AtomicBool,
    /// The completion thread's exit NOP has completed (whoever reaped it).
    exit_seen: AtomicBool,
    mode: SubmitMode,
    /// Requests handed to the ring whose CQE has not been reaped.
    inflight: AtomicUsize,
    /// Generation of this ring (unique in the process).
    pub(crate) gen: u32,
    /// Reactor-ring slot (owner-driven rings with a file table), see [`FixedFiles`].
    pub(crate) slot: Option<u32>,
    /// The sparse file table of an owner-driven ring (`None`: files are named by fd).
    files: Option<Mutex<FileTable>>,
    /// Some registration waits in `files.dropped`.
    files_dropped: AtomicBool,
    /// Set up with `SINGLE_ISSUER` (with `DEFER_TASKRUN` unless [`Ring::sqpoll`]): only the
    /// owner thread may enter.
    pub(crate) single_issuer: bool,
    /// Set up with `IORING_SETUP_SQPOLL`: a kernel thread submits the queued SQEs; entering
    /// the kernel is needed only to wake it (`IORING_SQ_NEED_WAKEUP`) or to wait.
    pub(crate) sqpoll: bool,
    /// Set up with `IORING_SETUP_TASKRUN_FLAG`: the kernel raises `IORING_SQ_TASKRUN` when
    /// completion work waits for an `io_uring_enter`, so a polling owner enters only then.
    taskrun_flag: bool,
    /// An owner-driven ring served by a foreign event loop: its task, woken when a request
    /// is queued (`submit_due` false -> true).
    submit_task: futures::task::AtomicWaker,
    submit_due: AtomicBool,
    /// Queued requests at which an owner ring submits at once, without waiting for its
    /// loop's pass; 0: never (see [`crate::reactor::AttachedRing::set_submit_cap`]).
    pub(crate) submit_cap: std::sync::atomic::AtomicUsize,
}

/// How many requests a reactor ring served by a foreign event loop keeps queued at most
/// before it submits them itself (see [`crate::reactor::AttachedRing::set_submit_cap`]);
/// `BDEV_REACTOR_SUBMIT_CAP` in the environment overrides it (0: no cap).
pub const DEFAULT_SUBMIT_CAP: usize = 8;

/// The cap a new attached ring starts with: the environment's, else the default.
pub(crate) fn default_submit_cap() -> usize {
    std::env::var("BDEV_REACTOR_SUBMIT_CAP")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_SUBMIT_CAP)
}

/// Whether the kernel supports what the rings need.
pub(crate) fn probe(ring: &IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for code in [
        opcode::Nop::CODE,
        opcode::Read::CODE,
        opcode::Write::CODE,
        opcode::Readv::CODE,
        opcode::Writev::CODE,
        opcode::Fsync::CODE,
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
    }
    Ok(())
}

impl Ring {
    /// Sets up a ring with `entries` SQEs. COOP_TASKRUN (kernel >= 5.19) lets a busy
    /// submitter run completion work at its next syscall instead of being interrupted.
    pub(crate) fn new(entries: u32, mode: SubmitMode) -> io::Result<Ring> {
        Self::with_flags(entries, mode, false)
    }

    /// A reactor's ring: [`SubmitMode::Owner`], a sparse file table, and with `exclusive`
    /// `SINGLE_ISSUER | DEFER_TASKRUN` (kernel >= 6.1; older kernels get COOP_TASKRUN), so
    /// only the creating thread may submit or reap.
    ///
    /// With `sqpoll` the ring is first tried with `IORING_SETUP_SQPOLL` (plus
    /// `SINGLE_ISSUER` when exclusive). The kernel refuses SQPOLL together with
    /// `DEFER_TASKRUN`, `COOP_TASKRUN` or `TASKRUN_FLAG` (completion work runs in the SQ
    /// thread, not in the submitter), so an SQPOLL ring has none of them. If the kernel
    /// refuses SQPOLL (old kernel, EPERM, a CPU it will not bind to), the normal ring is
    /// set up instead and a line is logged.
    pub(crate) fn owned(entries: u32, exclusive: bool, sqpoll: Option<SqPoll>) -> io::Result<Ring> {
        if let Some(sq) = sqpoll {
            match Self::sqpoll_ring(entries, exclusive, sq) {
                Ok(r) => return Ok(r),
                Err(e) => tracing::info!(
                    target: "uring",
                    "SQPOLL ring refused ({e}); using a ring without SQPOLL"
                ),
            }
        }
        Self::with_flags(entries, SubmitMode::Owner, exclusive)
    }

    /// An owner-driven `IORING_SETUP_SQPOLL` ring (see [`Ring::owned`]).
    fn sqpoll_ring(entries: u32, exclusive: bool, sq: SqPoll) -> io::Result<Ring> {
        let idle = u32::try_from(sq.idle.as_millis())
            .unwrap_or(u32::MAX)
            .max(1);
        let build = |single: bool| {
            let mut b = IoUring::builder();
            b.setup_sqpoll(idle);
            if let Some(cpu) = sq.cpu {
                b.setup_sqpoll_cpu(cpu);
            }
            if single {
                b.setup_single_issuer();
            }
            b.build(entries)
        };
        let (ring, single_issuer) = match exclusive.then(|| build(true)) {
            Some(Ok(r)) => (r, true),
            Some(Err(e)) => {
                tracing::debug!(target: "uring", "no SQPOLL|SINGLE_ISSUER ({e})");
                (build(false)?, false)
            }
            None => (build(false)?, false),
        };
        Self::finish(ring, entries, SubmitMode::Owner, single_issuer, false, true)
    }

    fn with_flags(entries: u32, mode: SubmitMode, exclusive: bool) -> io::Result<Ring> {
        let mut single_issuer = false;
        let ring = if exclusive {
            match IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .build(entries)
            {
                Ok(r) => {
                    single_issuer = true;
                    Ok(r)
                }
                Err(e) => {
                    tracing::debug!(target: "uring", "no SINGLE_ISSUER|DEFER_TASKRUN ({e})");
                    Err(e)
                }
            }
        } else {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        };
        let mut taskrun_flag = single_issuer;
        let ring = ring
            .or_else(|_| {
                let r = IoUring::builder()
                    .setup_coop_taskrun()
                    .setup_taskrun_flag()
                    .build(entries);
                taskrun_flag = r.is_ok();
                r
            })
            .or_else(|_| IoUring::builder().setup_coop_taskrun().build(entries))
            .or_else(|_| IoUring::new(entries))?;
        Self::finish(ring, entries, mode, single_issuer, taskrun_flag, false)
    }

    /// Probes the kernel and sets up the file table around a fresh `ring`.
    fn finish(
        ring: IoUring,
        entries: u32,
        mode: SubmitMode,
        single_issuer: bool,
        taskrun_flag: bool,
        sqpoll: bool,
    ) -> io::Result<Ring> {
        probe(&ring)?;
        let files = (mode == SubmitMode::Owner
            && ring.submitter().register_files_sparse(FIXED_FILES).is_ok())
        .then(|| {
            Mutex::new(FileTable {
                free: (0..FIXED_FILES).rev().collect(),
                dropped: Vec::new(),
            })
        });
        let slot = files.as_ref().and_then(|_| lock(ring_slots()).pop());
        Ok(Ring {
            ring,
            flush_armed: AtomicBool::new(false),
            pending: Mutex::new(Slab::with_capacity(entries as usize)),
            cq_lock: Mutex::new(()),
            drains: std::sync::atomic::AtomicU64::new(0),
            efd_armed: AtomicBool::new(false),
            exit_seen: AtomicBool::new(false),
            mode,
            inflight: AtomicUsize::new(0),
            gen: RING_GEN.fetch_add(1, Ordering::Relaxed),
            slot,
            files,
            files_dropped: AtomicBool::new(false),
            single_issuer,
            sqpoll,
            taskrun_flag,
            submit_task: futures::task::AtomicWaker::new(),
            submit_due: AtomicBool::new(false),
            submit_cap: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Registers one file in slot 0 of a per-bdev ring; returns how requests should name it.
    pub(crate) fn register_file(&self, file: &Arc<std::fs::File>) -> FileRef {
        use std::os::fd::AsRawFd;
        match self.ring.submitter().register_files(&[file.as_raw_fd()]) {
            Ok(()) => FileRef::Fixed(0),
            Err(_) => FileRef::Fd(file.clone()),
        }
    }

    /// Registers `file` in a free slot of an owner-driven ring's sparse table (called on the
    /// owner thread). `None` when the table is full or the kernel refuses.
    pub(crate) fn register_sparse(&self, file: &std::fs::File) -> Option<u32> {
        let table = self.files.as_ref()?;
        let idx = lock(table).free.pop()?;
        match self
            .ring
            .submitter()
            .register_files_update(idx, &[file.as_raw_fd()])
        {
            Ok(_) => Some(idx),
            Err(e) => {
                tracing::debug!(target: "uring", "file registration refused: {e}");
                lock(table).free.push(idx);
                None
            }
        }
    }

    /// Asks the owner to clear slot `idx` (its file is going away). Requests already queued
    /// with it are submitted first, and the kernel keeps the file for those in flight.
    pub(crate) fn unregister_later(&self, idx: u32) {
        if let Some(table) = &self.files {
            lock(table).dropped.push(idx);
            self.files_dropped.store(true, Ordering::Release);
            // An event loop serving the ring clears it on its next pass.
            self.submit_task.wake();
        }
    }

    /// On the owner thread, after a submit: clears the slots of files that went away.
    pub(crate) fn reap_unregistered(&self) {
        if !self.files_dropped.load(Ordering::Acquire) {
            return;
        }
        let Some(table) = &self.files else {
            return;
        };
        self.files_dropped.store(false, Ordering::Release);
        let dropped = std::mem::take(&mut lock(table).dropped);
        for idx in dropped {
            match self.ring.submitter().register_files_update(idx, &[-1]) {
                Ok(_) => lock(table).free.push(idx),
                Err(e) => tracing::debug!(target: "uring", "file slot {idx} kept: {e}"),
            }
        }
    }

    /// On an SQPOLL ring, whether its kernel thread has gone to sleep after its idle time
    /// (`IORING_SQ_NEED_WAKEUP`: the next submission enters the kernel to wake it); `None`
    /// on other rings.
    pub(crate) fn sq_thread_sleeping(&self) -> Option<bool> {
        if !self.sqpoll {
            return None;
        }
        let _g = lock(&self.pending);
        // SAFETY: the submission queue is only accessed under the pending mutex (held); this
        // only reads its flags.
        Some(unsafe { self.ring.submission_shared().need_wakeup() })
    }

    /// Number of drains so far.
    pub(crate) fn drain_count(&self) -> u64 {
        self.drains.load(Ordering::Relaxed)
    }

    /// Whether completions are waiting in the completion queue.
    pub(crate) fn has_completions(&self) -> bool {
        let _cq = lock(&self.cq_lock);
        // SAFETY: every consumer of the completion queue holds `cq_lock`; this only reads
        // its head and tail.
        unsafe { !self.ring.completion_shared().is_empty() }
    }

    /// Number of requests whose completion has not been reaped.
    pub(crate) fn pending(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Requests queued and not yet handed to the kernel (tests).
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        let _g = lock(&self.pending);
        // SAFETY: the submission queue is read under the pending mutex.
        unsafe { self.ring.submission_shared().len() }
    }

    /// Queues one SQE; the caller holds the pending lock.
    fn push_locked(&self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the submission queue is only ever accessed under the pending mutex,
            // which the caller holds, and the memory the SQE points at is owned by the slab
            // (or, for the reactor's eventfd read, by the reactor) until the CQE arrives.
            let pushed = unsafe { self.ring.submission_shared().push(sqe).is_ok() };
            if pushed {
                return Ok(());
            }
            // Queue full: hand what is queued to the kernel and retry (an SQPOLL ring: wake
            // its thread if it sleeps, then wait until it has made room).
            let r = self.ring.submitter().submit().and_then(|n| {
                if self.sqpoll {
                    self.ring.submitter().squeue_wait()
                } else {
                    Ok(n)
                }
            });
            match r {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
                    ) =>
                {
                    std::thread::yield_now()
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues an SQE whose `user_data` is already set and whose memory the caller keeps
    /// alive (exit NOP, eventfd read).
    pub(crate) fn push_raw(&self, sqe: &squeue::Entry) -> io::Result<()> {
        let _g = lock(&self.pending);
        self.push_locked(sqe)
    }

    /// Queues a request and arranges for its submission (see [`SubmitMode`]); the ticket
    /// is its completion.
    async fn submit(&self, sqe: squeue::Entry, hold: Hold, file: &FileRef) -> Result<Ticket<'_>> {
        let (key, burst) = {
            let mut st = lock(&self.pending);
            let key = st.insert(Pending {
                hold,
                _file: file.keep(),
                result: None,
                waker: None,
                abandoned: false,
            });
            let sqe = sqe.user_data(key as u64);
            if let Err(e) = self.push_locked(&sqe) {
                st.remove(key);
                return Err(BdevError::Io(e));
            }
            self.inflight.fetch_add(1, Ordering::AcqRel);
            let cap = match self.mode {
                SubmitMode::Owner => self.submit_cap.load(Ordering::Relaxed),
                _ => 0,
            };
            // SAFETY: the submission queue is read under the pending mutex, held here.
            let burst = cap != 0 && unsafe { self.ring.submission_shared().len() } >= cap;
            (key, burst)
        };
        let ticket = Ticket {
            ring: self,
            key,
            done: false,
            reap: self.mode != SubmitMode::Owner,
        };
        match self.mode {
            SubmitMode::Owner => {
                if burst {
                    // A burst (an NBD client's whole queue in one read): hand the device
                    // what is queued now, so it works while the rest is still parsed.
                    self.flush();
                } else if !self.submit_due.swap(true, Ordering::AcqRel) {
                    // A foreign event loop serving the ring submits on its next pass.
                    self.submit_task.wake();
                }
            }
            SubmitMode::Immediate => {
                self.flush();
                self.try_drain();
            }
            SubmitMode::Batch => {
                if !self.flush_armed.swap(true, Ordering::SeqCst) {
                    let _flush = FlushOnDrop(self);
                    YieldOnce(false).await;
                }
            }
        }
        Ok(ticket)
    }

    /// The ring's fd.
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }

    /// The task of a foreign event loop serving this ring (see `submit`).
    pub(crate) fn register_submit(&self, waker: &Waker) {
        self.submit_task.register(waker);
    }

    /// One pass of an owner: submits what is queued and runs the completion work the kernel
    /// has for this thread (`GETEVENTS`, without waiting), in one `io_uring_enter`; skipped
    /// when there is nothing to submit and nothing in flight, and (with
    /// `IORING_SETUP_TASKRUN_FLAG`) when the kernel flags no completion work either, so a
    /// polling owner costs no syscall per pass. Returns how many SQEs were queued (handed to
    /// the kernel, or to the SQ thread).
    pub(crate) fn submit_and_reap(&self) -> usize {
        self.submit_due.store(false, Ordering::Release);
        // SAFETY: only the ring's owner calls this, and the submission queue's tail is read
        // under the pending mutex like every other access to it.
        let (queued, taskrun) = unsafe {
            let _g = lock(&self.pending);
            let sq = self.ring.submission_shared();
            (sq.len(), sq.taskrun())
        };
        if self.sqpoll {
            // The SQ thread submits and runs the completion work; completions appear in the
            // completion queue without a syscall. Enter only to wake a sleeping SQ thread
            // (or flush an overflowed completion queue): `submit` checks the sq flags.
            if queued > 0 {
                if let Err(e) = self.ring.submitter().submit() {
                    tracing::trace!(target: "uring", "submit deferred: {e}");
                }
            }
            self.reap_unregistered();
            return queued;
        }
        if queued == 0 && (self.pending() == 0 || (self.taskrun_flag && !taskrun)) {
            // Nothing to submit, and (where the kernel tells us, IORING_SQ_TASKRUN) no
            // completion work waiting: no syscall. Completions already posted are read from
            // the completion queue in user space by the drain.
            return 0;
        }
        // SAFETY: plain io_uring_enter with no argument pointer.
        let r = unsafe {
            self.ring.submitter().enter::<libc::sigset_t>(
                queued as u32,
                0,
                io_uring::EnterFlags::GETEVENTS.bits(),
                None,
            )
        };
        if let Err(e) = r {
            tracing::trace!(target: "uring", "submit deferred: {e}");
        }
        self.reap_unregistered();
        queued
    }

    /// Submits every queued SQE without waiting.
    pub(crate) fn flush(&self) {
        // Entries that cannot be submitted now stay queued; the next io_uring_enter (of the
        // completion thread or the reactor) submits them.
        if let Err(e) = self.ring.submitter().submit() {
            tracing::trace!(target: "uring", "submit deferred: {e}");
        }
    }

    /// Submits what is queued and waits for at least `want` completions.
    pub(crate) fn submit_and_wait(&self, want: usize) {
        if let Err(e) = self.ring.submitter().submit_and_wait(want) {
            if !matches!(
                e.raw_os_error(),
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME)
            ) {
                tracing::error!(target: "uring", "io_uring_enter failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// Submits what is queued and waits for a completion, at most `timeout` (a plain wait
    /// on kernels without timed waits).
    pub(crate) fn wait_timeout(&self, timeout: std::time::Duration) {
        self.wait_for(1, timeout)
    }

    /// Submits what is queued and waits for `want` completions, at most `timeout`.
    pub(crate) fn wait_for(&self, want: usize, timeout: std::time::Duration) {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.submit_and_wait(1),
            Err(e) => {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME)
                ) {
                    tracing::error!(target: "uring", "io_uring_enter failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    /// Reaps every available CQE and completes its request.
    pub(crate) fn drain(&self, cqes: &mut Vec<(u64, i32)>, ready: &mut Vec<Waker>) -> Drained {
        let cq = lock(&self.cq_lock);
        self.drain_locked(cq, cqes, ready)
    }

    /// Like [`Ring::drain`], but gives up at once if another thread is draining; returns
    /// how many requests it completed. Used by waiting futures to take completions their
    /// own thread's syscalls just posted, without a hop through the completion thread.
    fn try_drain(&self) -> usize {
        let Ok(cq) = self.cq_lock.try_lock() else {
            return 0;
        };
        thread_local! {
            static SCRATCH: std::cell::RefCell<Scratch> =
                const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
        }
        SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut s) => {
                let (cqes, ready) = &mut *s;
                self.drain_locked(cq, cqes, ready).completed
            }
            Err(_) => 0,
        })
    }

    fn drain_locked(
        &self,
        cq: MutexGuard<'_, ()>,
        cqes: &mut Vec<(u64, i32)>,
        ready: &mut Vec<Waker>,
    ) -> Drained {
        self.drains.fetch_add(1, Ordering::Relaxed);
        // SAFETY: every consumer of the completion queue holds `cq_lock` (`cq` here).
        unsafe {
            for cqe in self.ring.completion_shared() {
                cqes.push((cqe.user_data(), cqe.result()));
            }
        }
        drop(cq);
        let mut d = Drained::default();
        if cqes.is_empty() {
            return d;
        }
        {
            let mut st = lock(&self.pending);
            for (ud, res) in cqes.drain(..) {
                match ud {
                    EXIT_KEY => {
                        self.exit_seen.store(true, Ordering::SeqCst);
                        d.exit = true
                    }
                    EVENTFD_KEY => {
                        self.efd_armed.store(false, Ordering::SeqCst);
                        d.eventfd = true
                    }
                    _ => {
                        let key = ud as usize;
                        let Some(p) = st.get_mut(key) else { continue };
                        if p.result.is_some() {
                            continue;
                        }
                        self.inflight.fetch_sub(1, Ordering::AcqRel);
                        d.completed += 1;
                        if p.abandoned {
                            // The future is gone; the kernel is done with the buffers now.
                            st.remove(key);
                            continue;
                        }
                        p.result = Some(res);
                        if let Some(w) = p.waker.take() {
                            ready.push(w);
                        }
                    }
                }
            }
        }
        for w in ready.drain(..) {
            w.wake();
        }
        d
    }

    /// Read or write of `buf[done..]` at byte offset `off + done`, continuing short
    /// transfers; a read that hits the end of the file fills the rest with zeroes.
    pub(crate) async fn rw(
        &self,
        file: &FileRef,
        write: bool,
        off: u64,
        mut buf: IoBuf,
        mut done: usize,
    ) -> Result<IoBuf> {
        let len = buf.len();
        while done < len {
            let n = (len - done).min(1 << 30) as u32;
            let at = off + done as u64;
            // SAFETY: `done < len`, so the pointer stays inside the buffer's allocation.
            let ptr = unsafe { buf.as_mut_ptr().add(done) };
            let sqe = if write {
                on_file!(Write, file, ptr, n).offset(at).build()
            } else {
                on_file!(Read, file, ptr, n).offset(at).build()
            };
            let (res, hold) = self.submit(sqe, Hold::Buf(buf), file).await?.await;
            buf = match hold {
                Hold::Buf(b) => b,
                _ => return Err(os_err(libc::EIO)),
            };
            if res < 0 {
                if -res == libc::EINTR || -res == libc::EAGAIN {
                    continue;
                }
                return Err(os_err(-res));
            }
            if res == 0 {
                if write {
                    return Err(os_err(libc::EIO));
                }
                buf[done..].fill(0);
                return Ok(buf);
            }
            done += res as usize;
        }
        Ok(buf)
    }

    /// `fdatasync` of the file (`IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`): every write
    /// completed before the call is durable when it returns.
    pub(crate) async fn fdatasync(&self, file: &FileRef) -> Result<()> {
        loop {
            let sqe = on_file!(Fsync, file,)
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            let (res, _) = self.submit(sqe, Hold::Nothing, file).await?.await;
            if res == -libc::EINTR || res == -libc::EAGAIN {
                continue;
            }
            if res < 0 {
                return Err(os_err(-res));
            }
            return Ok(());
        }
    }

    /// Vectored read or write (at most [`MAX_IOVS`] buffers).
    pub(crate) async fn rwv(
        &self,
        file: &FileRef,
        write: bool,
        off: u64,
        mut bufs: Vec<IoBuf>,
    ) -> Result<Vec<IoBuf>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let iov: Box<[libc::iovec]> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let (p, n) = (iov.as_ptr(), iov.len() as u32);
        let sqe = if write {
            on_file!(Writev, file, p, n).offset(off).build()
        } else {
            on_file!(Readv, file, p, n).offset(off).build()
        };
        let (res, hold) = self
            .submit(sqe, Hold::Bufs(bufs, IoVecs(iov)), file)
            .await?
            .await;
        bufs = match hold {
            Hold::Bufs(b, _) => b,
            _ => return Err(os_err(libc::EIO)),
        };
        if res < 0 && -res != libc::EINTR && -res != libc::EAGAIN {
            return Err(os_err(-res));
        }
        let mut done = res.max(0) as usize;
        if done >= total {
            return Ok(bufs);
        }
        // Short transfer: finish buffer by buffer.
        let mut out = Vec::with_capacity(bufs.len());
        let mut pos = off;
        for b in bufs {
            let l = b.len();
            let skip = done.min(l);
            done -= skip;
            out.push(if skip < l {
                Box::pin(self.rw(file, write, pos, b, skip)).await?
            } else {
                b
            });
            pos += l as u64;
        }
        Ok(out)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            lock(ring_slots()).push(s);
        }
    }
}

/// Disarms the batch flag and submits, also when the submitting future is dropped mid-yield.
struct FlushOnDrop<'a>(&'a Ring);

impl Drop for FlushOnDrop<'_> {
    fn drop(&mut self) {
        // The swap (not a plain store) synchronises with every submitter that saw the flag
        // set, so their queued entries are visible to the submit below.
        self.0.flush_armed.swap(false, Ordering::SeqCst);
        self.0.flush();
        // The syscall ran this thread's pending completion work: take what it posted.
        self.0.try_drain();
    }
}

/// Returns `Pending` once (waking itself), then `Ready`.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// A request's completion: ready once the drain stored its CQE's result; on per-bdev rings
/// polling it also tries to reap (see `try_drain`). Dropped early, it leaves the buffers to
/// the drain.
struct Ticket<'a> {
    ring: &'a Ring,
    key: usize,
    done: bool,
    reap: bool,
}

impl Ticket<'_> {
    fn take(&mut self, cx: &std::task::Context<'_>) -> Option<(i32, Hold)> {
        let mut st = lock(&self.ring.pending);
        let p = st.get_mut(self.key)?;
        if p.result.is_none() {
            if !p.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                p.waker = Some(cx.waker().clone());
            }
            return None;
        }
        let p = st.remove(self.key);
        self.done = true;
        Some((p.result.unwrap_or(-libc::EIO), p.hold))
    }
}

impl std::future::Future for Ticket<'_> {
    type Output = (i32, Hold);
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready((-libc::EIO, Hold::Nothing));
        }
        if let Some(r) = self.take(cx) {
            return Poll::Ready(r);
        }
        if self.reap && self.ring.try_drain() > 0 {
            if let Some(r) = self.take(cx) {
                return Poll::Ready(r);
            }
        }
        Poll::Pending
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = lock(&self.ring.pending);
        if let Some(p) = st.get_mut(self.key) {
            if p.result.is_some() {
                // Completed but never taken: the kernel is done, free it now.
                st.remove(self.key);
            } else {
                p.abandoned = true;
                p.waker = None;
            }
        }
    }
}

/// The completion thread of a per-bdev ring.
fn reap(ring: Arc<Ring>) {
    let mut cqes = Vec::with_capacity(512);
    let mut ready = Vec::with_capacity(512);
    loop {
        // Bounded, and it submits whatever is queued: a request whose submit failed
        // transiently, or whose batch flusher was never polled again, goes out here soon even
        // if nothing else completes. Clearing the flag then un-sticks a leaked flusher.
        ring.wait_timeout(std::time::Duration::from_millis(100));
        ring.flush_armed.store(false, Ordering::SeqCst);
        ring.drain(&mut cqes, &mut ready);
        if ring.exit_seen.load(Ordering::SeqCst) && ring.pending() == 0 {
            return;
        }
    }
}

/// A per-bdev ring with its completion thread (used from any executor).
pub(crate) struct UringEngine {
    pub(crate) ring: Arc<Ring>,
    pub(crate) file: FileRef,
    thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    pub(crate) fn new(file: &Arc<std::fs::File>, entries: u32) -> io::Result<Self> {
        let mode = if std::env::var_os("BDEV_URING_NOBATCH").is_some() {
            SubmitMode::Immediate
        } else {
            SubmitMode::Batch
        };
        let ring = Arc::new(Ring::new(entries, mode)?);
        let file = ring.register_file(file);
        let r2 = ring.clone();
        let thread = std::thread::Builder::new()
            .name("bdev-uring".into())
            .spawn(move || reap(r2))?;
        Ok(UringEngine {
            ring,
            file,
            thread: Some(thread),
        })
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        let nop = opcode::Nop::new().build().user_data(EXIT_KEY);
        if self.ring.push_raw(&nop).is_ok() {
            self.ring.flush();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        // If the NOP could not be queued the thread is left running (it owns the ring and
        // any buffers still in flight), which is safer than freeing memory under the kernel.
    }
}

#[cfg(test)]
impl Ring {
    /// A request that stays in flight for `d` (`IORING_OP_TIMEOUT`, completing with
    /// `-ETIME`): a slow device for the reactor's polling tests.
    pub(crate) async fn slow_request(&self, d: std::time::Duration) -> i32 {
        // The kernel reads the timespec while the request is in flight; a test leaks it.
        let ts: &'static types::Timespec = Box::leak(Box::new(types::Timespec::from(d)));
        let file = FileRef::Fd(Arc::new(
            std::fs::File::open("/dev/null").expect("open /dev/null"),
        ));
        let sqe = opcode::Timeout::new(ts).build();
        let ticket = self.submit(sqe, Hold::Nothing, &file).await.expect("queue");
        ticket.await.0
    }
}
