//! The per-blob I/O freeze (SPDK "freeze I/O"): I/O holds it shared, operations that change
//! where a blob's data lives (snapshot, resize, set_parent, merge, esnap swap) hold it
//! exclusively. Built on one atomic word so the shared side costs two atomic operations
//! and never touches the wake-up machinery unless someone is frozen or freezing.
//!
//! The freeze is also the grace period of the blob's lock-free mirror (`live.rs`): what the
//! mirror unlinks is [retired](Freeze::retire) here and dropped only once no shared hold can
//! still see it — at the end of an exclusive hold that waited for every shared one, or with
//! the freeze. A reader of the mirror holds the freeze shared for as long as it uses what it
//! read.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use event_listener::Event;

const FROZEN: usize = 1 << (usize::BITS - 1);

/// A reader/writer gate; writers (rare) also exclude each other.
pub(crate) struct Freeze {
    /// Active I/O count, plus `FROZEN` while a writer holds or waits for the gate.
    state: AtomicUsize,
    /// Wakes readers on unfreeze and writers when the last reader leaves.
    ev: Event,
    writers: async_lock::Mutex<()>,
    /// Memory unlinked from the mirror, dropped once no shared hold can still see it.
    retired: Mutex<Vec<Box<dyn Send>>>,
}

/// Shared hold (one I/O).
pub(crate) struct ReadGuard<'a>(&'a Freeze);

/// Exclusive hold (I/O is frozen).
pub(crate) struct WriteGuard<'a> {
    f: &'a Freeze,
    _w: async_lock::MutexGuard<'a, ()>,
}

impl Freeze {
    pub(crate) fn new() -> Freeze {
        Freeze {
            state: AtomicUsize::new(0),
            ev: Event::new(),
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

    fn try_read(&self) -> bool {
        let mut s = self.state.load(Ordering::Acquire);
        while s & FROZEN == 0 {
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
        false
    }

    /// The shared hold at once, or `None` while frozen (or a writer waits).
    #[inline]
    pub(crate) fn try_hold(&self) -> Option<ReadGuard<'_>> {
        // `then`, not `then_some`: a guard built and dropped on failure would release a hold
        // that was never taken.
        self.try_read().then(|| ReadGuard(self))
    }

    pub(crate) async fn read(&self) -> ReadGuard<'_> {
        loop {
            if self.try_read() {
                return ReadGuard(self);
            }
            let l = self.ev.listen();
            if self.try_read() {
                return ReadGuard(self);
            }
            l.await;
        }
    }

    pub(crate) async fn write(&self) -> WriteGuard<'_> {
        let w = self.writers.lock().await;
        self.state.fetch_or(FROZEN, Ordering::AcqRel);
        // Built before waiting so that a cancelled wait still unfreezes (in its drop).
        let g = WriteGuard { f: self, _w: w };
        loop {
            if self.state.load(Ordering::Acquire) & !FROZEN == 0 {
                break;
            }
            let l = self.ev.listen();
            if self.state.load(Ordering::Acquire) & !FROZEN == 0 {
                break;
            }
            l.await;
        }
        g
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        let prev = self.0.state.fetch_sub(1, Ordering::AcqRel);
        if prev & FROZEN != 0 && prev & !FROZEN == 1 {
            self.0.ev.notify(usize::MAX);
        }
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        // No shared hold left (a cancelled wait may leave some), and none can start while
        // `FROZEN` stays set: whatever was retired is unreachable by any reader. The
        // `Acquire` pairs with the readers' releasing decrements, so their reads are done.
        if self.f.state.load(Ordering::Acquire) == FROZEN {
            let gone =
                std::mem::take(&mut *self.f.retired.lock().unwrap_or_else(|e| e.into_inner()));
            drop(gone);
        }
        self.f.state.fetch_and(!FROZEN, Ordering::AcqRel);
        self.f.ev.notify(usize::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use futures::FutureExt;

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
        assert_eq!(f.state.load(Ordering::SeqCst), 0, "every hold released");
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
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let f = f.clone();
                let n = n.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        if i == 0 {
                            let _g = block_on(f.write());
                            assert_eq!(f.state.load(Ordering::SeqCst) & !FROZEN, 0);
                        } else {
                            let _g = block_on(f.read());
                            n.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(n.load(Ordering::Relaxed), 6000);
    }
}
