//! The per-blob I/O freeze (SPDK "freeze I/O"): I/O holds it shared, operations that change
//! where a blob's data lives (snapshot, resize, set_parent, merge, esnap swap) hold it
//! exclusively. The shared side is a [`HoldCount`] (crate `thread-slot`): a request's hold is
//! a plain load and store in its thread's slot and a load of the gate's flag, no locked
//! instruction; the exclusive side, rare, closes the gate and pays a process-wide barrier
//! before it reads the counts. The wake-up machinery is touched only while someone is frozen
//! or freezing.
//!
//! The freeze is also the grace period of the blob's lock-free mirror (`live.rs`): what the
//! mirror unlinks is [retired](Freeze::retire) here and dropped only once no shared hold can
//! still see it — at the end of an exclusive hold that waited for every shared one, or with
//! the freeze. A reader of the mirror holds the freeze shared for as long as it uses what it
//! read.

use std::mem::ManuallyDrop;
use std::sync::Mutex;

use event_listener::Event;
use thread_slot::{Hold, HoldCount};

/// A reader/writer gate; writers (rare) also exclude each other.
pub(crate) struct Freeze {
    /// The shared holds (active I/O), behind a gate closed while a writer holds or waits.
    holds: HoldCount,
    /// Wakes readers on unfreeze.
    ev: Event,
    /// Wakes the writer waiting for readers to leave (kept apart: a refused reader wakes it,
    /// and must not wake itself).
    drain: Event,
    writers: async_lock::Mutex<()>,
    /// Memory unlinked from the mirror, dropped once no shared hold can still see it.
    retired: Mutex<Vec<Box<dyn Send>>>,
}

/// Shared hold (one I/O): two words, so an I/O future keeps it inline.
pub(crate) struct ReadGuard<'a> {
    f: &'a Freeze,
    hold: ManuallyDrop<Hold>,
}

/// Exclusive hold (I/O is frozen).
pub(crate) struct WriteGuard<'a> {
    f: &'a Freeze,
    _w: async_lock::MutexGuard<'a, ()>,
    /// Every shared hold let in before the gate closed has left (false while waiting).
    drained: bool,
}

impl Freeze {
    pub(crate) fn new() -> Freeze {
        Freeze {
            holds: HoldCount::new(),
            ev: Event::new(),
            drain: Event::new(),
            writers: async_lock::Mutex::new(()),
            retired: Mutex::new(Vec::new()),
        }
    }

    /// Keeps `x` (unlinked from what shared holders read) until no shared hold taken before
    /// this call can remain: the end of the next exclusive hold, or the freeze's drop.
    pub(crate) fn retire(&self, x: Box<dyn Send>) {
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(x);
    }

    /// Items retired and not yet dropped (tests).
    #[cfg(test)]
    pub(crate) fn retired_len(&self) -> usize {
        self.retired.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The shared hold at once, or `None` while frozen (or a writer waits).
    #[inline]
    pub(crate) fn try_hold(&self) -> Option<ReadGuard<'_>> {
        match self.holds.enter() {
            Some(h) => Some(ReadGuard {
                f: self,
                hold: ManuallyDrop::new(h),
            }),
            None => {
                // The refusal counted for an instant: the writer may have seen it.
                self.drain.notify(usize::MAX);
                None
            }
        }
    }

    pub(crate) async fn read(&self) -> ReadGuard<'_> {
        loop {
            if let Some(g) = self.try_hold() {
                return g;
            }
            let l = self.ev.listen();
            if let Some(g) = self.try_hold() {
                return g;
            }
            l.await;
        }
    }

    pub(crate) async fn write(&self) -> WriteGuard<'_> {
        let w = self.writers.lock().await;
        self.holds.close();
        // Built before waiting so that a cancelled wait still unfreezes (in its drop).
        let mut g = WriteGuard {
            f: self,
            _w: w,
            drained: false,
        };
        // (A refused `try_hold` counts for an instant too: it only makes this look again.)
        loop {
            if self.holds.is_empty() {
                break;
            }
            // Listening before looking again: a hold that leaves after that look wakes us.
            let l = self.drain.listen();
            if self.holds.is_empty() {
                break;
            }
            l.await;
        }
        g.drained = true;
        g
    }

    /// Whether no shared hold is counted (tests).
    #[cfg(test)]
    fn no_holds(&self) -> bool {
        self.holds.is_empty()
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; the field is not used again.
        let hold = unsafe { ManuallyDrop::take(&mut self.hold) };
        if self.f.holds.leave(hold) {
            // Frozen or freezing: the writer may wait for this one.
            self.f.drain.notify(usize::MAX);
        }
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        // No shared hold left (unless the wait was cancelled), and none can start while the
        // gate stays closed: whatever was retired is unreachable by any reader. (The count
        // was read after a barrier that orders the readers' last reads before it.)
        if self.drained {
            let gone =
                std::mem::take(&mut *self.f.retired.lock().unwrap_or_else(|e| e.into_inner()));
            drop(gone);
        }
        self.f.holds.open();
        self.f.ev.notify(usize::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use futures::FutureExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn writer_waits_for_readers_and_blocks_new_ones() {
        let f = Freeze::new();
        let r1 = block_on(f.read());
        let mut w = Box::pin(f.write());
        assert!((&mut w).now_or_never().is_none(), "writer must wait for r1");
        // New readers wait while a writer is pending.
        assert!(Box::pin(f.read()).now_or_never().is_none());
        drop(r1);
        let g = block_on(w);
        assert!(Box::pin(f.read()).now_or_never().is_none());
        drop(g);
        assert!(Box::pin(f.read()).now_or_never().is_some());
    }

    #[test]
    fn try_hold_fails_while_frozen_and_takes_nothing() {
        let f = Freeze::new();
        let r = f.try_hold().expect("not frozen");
        let mut w = Box::pin(f.write());
        assert!((&mut w).now_or_never().is_none(), "writer waits for r");
        // Refused while a writer waits, and the refusal leaves the count alone: the writer
        // still waits for r, and gets the gate once r is gone.
        for _ in 0..3 {
            assert!(f.try_hold().is_none());
        }
        assert!(
            (&mut w).now_or_never().is_none(),
            "writer still waits for r"
        );
        drop(r);
        let g = block_on(w);
        assert!(f.try_hold().is_none(), "frozen");
        drop(g);
        assert!(f.try_hold().is_some());
        assert!(f.no_holds(), "every hold released");
    }

    #[test]
    fn retired_items_outlive_every_shared_hold() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let f = Freeze::new();
        let gone = Arc::new(AtomicBool::new(false));
        let r = f.try_hold().unwrap();
        f.retire(Box::new(Flag(gone.clone())));
        {
            // A writer that gives up while `r` is held ends no grace period.
            let mut w = Box::pin(f.write());
            assert!((&mut w).now_or_never().is_none());
        }
        assert!(!gone.load(Ordering::SeqCst), "dropped under a shared hold");
        drop(r);
        assert!(
            !gone.load(Ordering::SeqCst),
            "dropped before an exclusive hold"
        );
        drop(block_on(f.write()));
        assert!(gone.load(Ordering::SeqCst), "kept after an exclusive hold");
        assert_eq!(f.retired_len(), 0);
        let gone = Arc::new(AtomicBool::new(false));
        f.retire(Box::new(Flag(gone.clone())));
        drop(f);
        assert!(gone.load(Ordering::SeqCst), "kept past the freeze");
    }

    #[test]
    fn cancelled_writer_unfreezes() {
        let f = Freeze::new();
        let r = block_on(f.read());
        {
            let mut w = Box::pin(f.write());
            assert!((&mut w).now_or_never().is_none());
        }
        assert!(Box::pin(f.read()).now_or_never().is_some());
        drop(r);
        assert!(Box::pin(f.write()).now_or_never().is_some());
    }

    #[test]
    fn threads() {
        let f = std::sync::Arc::new(Freeze::new());
        let n = std::sync::Arc::new(AtomicUsize::new(0));
        let inside = std::sync::Arc::new(AtomicUsize::new(0));
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let f = f.clone();
                let n = n.clone();
                let inside = inside.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        if i == 0 {
                            let _g = block_on(f.write());
                            assert_eq!(inside.load(Ordering::SeqCst), 0, "a reader inside");
                        } else {
                            let _g = block_on(f.read());
                            inside.fetch_add(1, Ordering::SeqCst);
                            n.fetch_add(1, Ordering::Relaxed);
                            inside.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(n.load(Ordering::Relaxed), 6000);
        assert!(f.no_holds());
    }
}
