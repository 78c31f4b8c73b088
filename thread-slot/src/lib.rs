//! Per-thread slots: what lets a data path count without a locked instruction.
//!
//! A thread leases a slot index the first time it asks ([`current`]) and gives it back when
//! it exits, so at any moment each of the first [`slot_count`]` - 1` indices has at most one
//! live holder. A structure with one counter per index can then let that holder update its
//! own counter with a plain load and store, as SPDK's per-channel counters are updated from
//! their channel's thread only. Threads beyond the leased indices share the last one, which
//! they update with atomic read-modify-writes. `bdev-core`'s I/O statistics stripe their
//! sums this way.
//!
//! [`HoldCount`] is such a structure: the count of the holds a gate has let through, closed
//! by a rare operation that must wait until none is left (the blobstore's freeze of a blob:
//! every request holds it shared while it runs). Entering and leaving cost a plain load and
//! store and a load of the gate's flag, no fence; the closer pays instead, with a
//! process-wide barrier (`membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`) between closing the
//! gate and reading the counts: the asymmetric form of the Dekker handshake that RCU and
//! Folly's `asymmetricHeavyBarrier` use. Where the kernel lacks that command, both sides use
//! a full fence instead. (The `membarrier` crate does the same but does not link on Linux
//! with current toolchains: it links `windows-sys` unconditionally.)
//!
//! This crate knows nothing about devices, blobs or I/O.

use std::cell::Cell;
use std::sync::atomic::{compiler_fence, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// The number of slot indices: twice the CPUs the process may run on, as a power of two
/// between 4 and 64. The last index is the shared one.
pub fn slot_count() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
        (cpus * 2).next_power_of_two().clamp(4, 64)
    })
}

/// `SLOT` before the thread's first request.
const UNASSIGNED: usize = usize::MAX;
/// `SLOT` of a thread without a lease of its own: it uses the shared last index.
const SHARED: usize = usize::MAX - 1;

/// The leasable indices: those given back by exited threads, and the next never leased.
struct Pool(Mutex<(Vec<usize>, usize)>);

impl Pool {
    const fn new() -> Self {
        Pool(Mutex::new((Vec::new(), 0)))
    }

    /// An index below `count - 1` that no live lease holds, if any is left.
    fn lease(&self, count: usize) -> Option<usize> {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match p.0.pop() {
            Some(i) => Some(i),
            None if p.1 + 1 < count => {
                p.1 += 1;
                Some(p.1 - 1)
            }
            None => None,
        }
    }

    /// Gives `i` back; its holder uses it no more.
    fn release(&self, i: usize) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).0.push(i);
    }
}

static POOL: Pool = Pool::new();

/// A thread's lease of an index, given back when the thread exits.
struct Lease(Cell<usize>);

impl Drop for Lease {
    fn drop(&mut self) {
        let i = self.0.replace(UNASSIGNED);
        if i == UNASSIGNED {
            return;
        }
        // Anything this thread still does (from a later destructor) uses the shared index;
        // the pool's mutex orders its last plain writes before the next holder's.
        let _ = SLOT.try_with(|s| s.set(SHARED));
        POOL.release(i);
    }
}

// Two thread-locals: `SLOT` (no destructor) is what the data path reads, with no
// registration check; `LEASE` only exists for its destructor, which gives the index back.
thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(UNASSIGNED) };
    static LEASE: Lease = const { Lease(Cell::new(UNASSIGNED)) };
}

/// The calling thread's slot index and whether the thread owns it (is its only user until
/// it exits); a thread that owns none gets the shared index, `slot_count() - 1`.
#[inline]
pub fn current() -> (usize, bool) {
    match SLOT.try_with(Cell::get).unwrap_or(SHARED) {
        UNASSIGNED => lease(),
        SHARED => (slot_count() - 1, false),
        i => (i, true),
    }
}

/// Leases the calling thread an index of its own if one is free (else: the shared one).
#[cold]
fn lease() -> (usize, bool) {
    let shared = || {
        let _ = SLOT.try_with(|s| s.set(SHARED));
        (slot_count() - 1, false)
    };
    let Some(i) = POOL.lease(slot_count()) else {
        return shared();
    };
    // A thread that is exiting (its lease already gone) cannot hold one: give it back.
    if LEASE.try_with(|l| l.0.set(i)).is_err() {
        POOL.release(i);
        return shared();
    }
    let _ = SLOT.try_with(|s| s.set(i));
    (i, true)
}

/// One slot of a [`HoldCount`]: the holds its owner entered less those it left (wrapping),
/// and the holds entered here but left on another thread.
#[derive(Default)]
struct Slot {
    own: AtomicUsize,
    moved: AtomicUsize,
}

/// The set flag of a [`HoldCount`]'s gate.
const CLOSED: usize = 1;

/// A count of holds behind a gate (see the crate's docs): [`HoldCount::enter`] and
/// [`HoldCount::leave`] on the data path, [`HoldCount::close`], [`HoldCount::is_empty`] and
/// [`HoldCount::open`] for the rare closer, which waits (by its own means) until no hold is
/// left.
pub struct HoldCount {
    flag: AtomicUsize,
    slots: Box<[Slot]>,
}

impl Default for HoldCount {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for HoldCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoldCount")
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// A hold let through by [`HoldCount::enter`]: the slot it was counted in. Give it back with
/// [`HoldCount::leave`], on any thread.
#[derive(Debug)]
#[must_use = "a hold that is never left keeps the gate's closer waiting"]
pub struct Hold(usize);

impl HoldCount {
    /// An open gate with no hold.
    pub fn new() -> Self {
        HoldCount {
            flag: AtomicUsize::new(0),
            slots: (0..slot_count()).map(|_| Slot::default()).collect(),
        }
    }

    /// Counts a hold if the gate is open; `None` (and nothing counted) if it is closed. A
    /// refusal was counted for an instant: the caller must wake a closer that may be waiting
    /// for the count to drain, as after a [`HoldCount::leave`] that returned true.
    #[inline]
    pub fn enter(&self) -> Option<Hold> {
        let (i, owned) = current();
        let s = &self.slots[i].own;
        if owned {
            s.store(s.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
            // The closer's heavy barrier orders this store before the flag load below, or
            // the flag store before it (see `is_empty`).
            light();
        } else {
            s.fetch_add(1, Ordering::SeqCst);
        }
        // Acquire: what the closer wrote before it opened the gate again is seen.
        if self.flag.load(Ordering::Acquire) & CLOSED != 0 {
            // Not let through: uncount it (the caller wakes the closer).
            self.leave(Hold(i));
            return None;
        }
        Some(Hold(i))
    }

    /// Uncounts `hold`. Returns whether the gate is closed: the closer may be waiting for
    /// the count to reach zero, and the caller must wake it.
    #[inline]
    pub fn leave(&self, hold: Hold) -> bool {
        let i = hold.0;
        let (me, owned) = current();
        if owned && me == i {
            let s = &self.slots[i].own;
            // Release: the holder's accesses come before the closer sees the count drop.
            s.store(s.load(Ordering::Relaxed).wrapping_sub(1), Ordering::Release);
            light();
        } else if i == self.slots.len() - 1 {
            self.slots[i].own.fetch_sub(1, Ordering::SeqCst);
        } else {
            // Entered on a thread that owned slot `i`: its owner writes `own` without a
            // locked instruction, so this thread counts the leave apart.
            self.slots[i].moved.fetch_add(1, Ordering::SeqCst);
        }
        self.flag.load(Ordering::Relaxed) & CLOSED != 0
    }

    /// Closes the gate: every later [`HoldCount::enter`] fails until [`HoldCount::open`].
    /// Returns false if it was closed already. The holds let through before are still
    /// counted: wait with [`HoldCount::is_empty`].
    pub fn close(&self) -> bool {
        self.flag.fetch_or(CLOSED, Ordering::SeqCst) & CLOSED == 0
    }

    /// Opens the gate. Release: what the closer wrote is seen by the holds let in after.
    pub fn open(&self) {
        self.flag.fetch_and(!CLOSED, Ordering::Release);
    }

    /// Whether the gate is closed.
    pub fn is_closed(&self) -> bool {
        self.flag.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Whether no hold is counted, as seen after a process-wide barrier: with the gate
    /// closed, true means every hold let through has left (and what the holders did is
    /// seen). A closer that saw false and waits must register its wake-up before calling
    /// this again: a hold that leaves after the barrier sees the gate closed and reports it
    /// (see [`HoldCount::leave`]).
    pub fn is_empty(&self) -> bool {
        heavy();
        self.count() == 0
    }

    /// The holds counted now (no barrier).
    fn count(&self) -> usize {
        self.slots.iter().fold(0usize, |n, s| {
            let moved = s.moved.load(Ordering::Acquire);
            n.wrapping_add(s.own.load(Ordering::Acquire).wrapping_sub(moved))
        })
    }
}

/// Whether `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` is available: 0 not asked yet,
/// 1 yes (registered), 2 no.
static EXPEDITED: AtomicUsize = AtomicUsize::new(0);

#[inline]
fn expedited() -> bool {
    match EXPEDITED.load(Ordering::Acquire) {
        1 => true,
        2 => false,
        _ => ask_expedited(),
    }
}

#[cold]
#[inline(never)]
fn ask_expedited() -> bool {
    let ok = register_expedited();
    EXPEDITED.store(if ok { 1 } else { 2 }, Ordering::Release);
    ok
}

const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

fn membarrier(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_int) }
}

/// Queries and registers the expedited private barrier (idempotent).
#[cold]
fn register_expedited() -> bool {
    let cmds = membarrier(MEMBARRIER_CMD_QUERY);
    let need = libc::c_long::from(
        MEMBARRIER_CMD_PRIVATE_EXPEDITED | MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
    );
    cmds >= 0 && cmds & need == need && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0
}

/// The fast side's barrier: a compiler fence where the heavy side interrupts every thread,
/// else a full fence.
#[inline]
fn light() {
    if expedited() {
        compiler_fence(Ordering::SeqCst);
    } else {
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

/// The slow side's barrier: every running thread of the process executes a full memory
/// barrier (else a full fence here, the fast side fencing too).
fn heavy() {
    std::sync::atomic::fence(Ordering::SeqCst);
    // A registered command fails only on a kernel bug: fencing both sides stays correct
    // only if `light` fences too, so a failure here is fatal.
    if expedited() && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0 {
        std::process::abort();
    }
    std::sync::atomic::fence(Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// The pool hands out each owned index to one holder at a time, none past `count - 2`
    /// (the last is the shared one), and reuses what holders give back.
    #[test]
    fn owned_indices_are_leased_once_and_reused() {
        let pool = Pool::new();
        let mut got: Vec<usize> = (0..3).filter_map(|_| pool.lease(4)).collect();
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2]);
        assert_eq!(
            pool.lease(4),
            None,
            "the last index is shared, never leased"
        );
        pool.release(1);
        assert_eq!(pool.lease(4), Some(1));
        assert_eq!(pool.lease(4), None);
    }

    /// A thread keeps its index; an exited thread's index goes to a later thread.
    #[test]
    fn a_thread_keeps_its_index_and_gives_it_back_on_exit() {
        let (i, owned) = current();
        assert_eq!(current(), (i, owned), "stable within a thread");
        let first = std::thread::spawn(current).join().unwrap();
        assert!(first.0 < slot_count());
        let t = std::thread::spawn(current).join().unwrap();
        if first.1 {
            // Other tests' threads may lease in between: the index is one of the owned ones.
            assert!(t.1 && t.0 < slot_count() - 1, "{t:?}");
        }
    }

    /// A closed gate lets nothing through and counts nothing for the refusal; holds entered
    /// before stay counted until they leave, on their thread or another.
    #[test]
    fn close_refuses_new_holds_and_counts_the_old_ones() {
        let c = Arc::new(HoldCount::new());
        let a = c.enter().expect("open");
        let b = c.enter().expect("open");
        assert!(!c.is_empty());
        assert!(c.close());
        assert!(!c.close(), "already closed");
        assert!(c.enter().is_none());
        assert!(!c.is_empty(), "two holds left");
        assert!(c.leave(a), "a leave while closed reports it");
        let c2 = c.clone();
        assert!(std::thread::spawn(move || c2.leave(b)).join().unwrap());
        assert!(c.is_empty(), "the hold left on another thread is uncounted");
        c.open();
        let h = c.enter().expect("open again");
        assert!(!c.leave(h));
        assert!(c.is_empty());
    }

    /// Many threads (more than there are owned slots: some share the last one) enter and
    /// leave, some holds leaving on another thread, while a closer repeatedly closes, waits
    /// for the count to drain and checks that no hold is inside, then opens: no hold is ever
    /// inside a closed gate, and at the end the count is zero.
    #[test]
    fn no_hold_is_inside_while_closed_and_the_count_drains() {
        const ROUNDS: usize = 2_000;
        let threads = slot_count() * 2 + 1;
        let c = Arc::new(HoldCount::new());
        let inside = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<Hold>();
        let rx = Arc::new(Mutex::new(rx));
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (c, inside, stop, tx, rx) = (
                    c.clone(),
                    inside.clone(),
                    stop.clone(),
                    tx.clone(),
                    rx.clone(),
                );
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(h) = c.enter() {
                            inside.fetch_add(1, Ordering::SeqCst);
                            inside.fetch_sub(1, Ordering::SeqCst);
                            if t % 3 == 0 {
                                // Leaves on whichever thread takes it from the channel.
                                tx.send(h).unwrap();
                            } else {
                                c.leave(h);
                            }
                            n += 1;
                        }
                        if let Ok(h) = rx.lock().unwrap().try_recv() {
                            c.leave(h);
                        }
                    }
                    n
                })
            })
            .collect();
        for _ in 0..ROUNDS {
            assert!(c.close());
            loop {
                if c.is_empty() {
                    break;
                }
                if let Ok(h) = rx.lock().unwrap().try_recv() {
                    c.leave(h);
                }
                std::thread::yield_now();
            }
            assert_eq!(
                inside.load(Ordering::SeqCst),
                0,
                "a hold inside a closed gate"
            );
            c.open();
        }
        stop.store(true, Ordering::Relaxed);
        let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        drop(tx);
        while let Ok(h) = rx.lock().unwrap().try_recv() {
            c.leave(h);
        }
        assert!(total > 0);
        assert!(c.is_empty(), "every hold left");
    }
}
