//! [`DescSlot`]: an open [`Descriptor`] that can be closed while requests use it, read on the
//! I/O path without a lock or a reference count.
//!
//! Stacked devices (an lvol store's base, an esnap clone's external snapshot, the read-only
//! bdev's base) hold the descriptor of the device below them and must be able to let go of it
//! on hot-remove while requests are in flight: those finish, later ones fail. An
//! `RwLock<Option<Arc<Descriptor>>>` does that at the cost of a lock and two atomic reference
//! count updates per request; a `DescSlot` counts the requests in flight in a
//! [`HoldCount`] (crate `thread-slot`), whose gate is the closed flag: a request's use is a
//! plain load and store in its thread's slot, no locked instruction, no lock. The close (rare)
//! pays a process-wide barrier instead.

use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use thread_slot::{Hold, HoldCount};

use crate::{Descriptor, IoBuf, IoFuture, Result};

/// A descriptor shared by the requests in flight on it, closable at any time: closing it
/// makes later [`DescSlot::get`] calls return `None`, and the descriptor itself is dropped
/// (closing it in the registry, which releases a claim and lets an unregister complete) when
/// the last [`DescGuard`] taken before the close goes away.
pub struct DescSlot {
    desc: NonNull<Descriptor>,
    /// The uses (guards alive, and `get`s backing off for an instant); closed with the slot.
    uses: HoldCount,
    /// The descriptor of the closed slot was dropped.
    freed: AtomicBool,
}

// SAFETY: the slot owns a boxed `Descriptor` (which is Send + Sync) and only hands out shared
// references to it; its freeing happens once, through `freed` (see `try_free`).
unsafe impl Send for DescSlot {}
// SAFETY: as above.
unsafe impl Sync for DescSlot {}

impl DescSlot {
    /// Holds `desc` until [`DescSlot::close`] (and its last guard), or until the slot is
    /// dropped.
    pub fn new(desc: Descriptor) -> Self {
        DescSlot {
            desc: NonNull::from(Box::leak(Box::new(desc))),
            uses: HoldCount::new(),
            freed: AtomicBool::new(false),
        }
    }

    /// The descriptor for one request, unless the slot was closed.
    #[inline]
    pub fn get(&self) -> Option<DescGuard<'_>> {
        match self.uses.enter() {
            Some(h) => Some(DescGuard {
                slot: self,
                hold: ManuallyDrop::new(h),
            }),
            None => {
                // The refusal counted for an instant: the last use may have seen it.
                self.try_free();
                None
            }
        }
    }

    /// Whether [`DescSlot::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.uses.is_closed()
    }

    /// Closes the slot. `before` runs once, on the first close, with the descriptor still
    /// open (e.g. to release its claim at once); the descriptor is dropped when the last
    /// request using it completes, which may be right here. Returns whether this call closed
    /// the slot.
    pub fn close_with(&self, before: impl FnOnce(&Descriptor)) -> bool {
        // Hold a use of our own, so the descriptor stays alive until `before` has run.
        let Some(g) = self.get() else {
            return false;
        };
        if !self.uses.close() {
            return false;
        }
        before(&g);
        drop(g);
        true
    }

    /// [`DescSlot::close_with`] with nothing to run first.
    pub fn close(&self) -> bool {
        self.close_with(|_| {})
    }

    /// Frees the descriptor of a closed slot once no use is left. Called by every use that
    /// ends (or backs off) after the close: the count is read after a process-wide barrier,
    /// so the last of them sees it empty, and `freed` lets exactly one free.
    #[cold]
    fn try_free(&self) {
        if self.freed.load(Ordering::Acquire) || !self.uses.is_empty() {
            return;
        }
        if !self.freed.swap(true, Ordering::AcqRel) {
            // SAFETY: the slot is closed (no new use starts: `get` backs off), no use is
            // left, and `freed` was set by this thread alone, so nothing references the
            // descriptor and nobody frees it again.
            unsafe { drop(Box::from_raw(self.desc.as_ptr())) };
        }
    }
}

impl Drop for DescSlot {
    fn drop(&mut self) {
        // No guard outlives the slot (they borrow it): a closed slot has freed its
        // descriptor already (its last use did), an open one frees it now.
        if !*self.freed.get_mut() {
            // SAFETY: not freed; `&mut self` means no use is in progress.
            unsafe { drop(Box::from_raw(self.desc.as_ptr())) };
        }
    }
}

impl std::fmt::Debug for DescSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DescSlot")
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// One use of a [`DescSlot`]'s descriptor (see [`DescSlot::get`]): two words, so an I/O
/// future keeps it inline.
pub struct DescGuard<'a> {
    slot: &'a DescSlot,
    hold: ManuallyDrop<Hold>,
}

impl Deref for DescGuard<'_> {
    type Target = Descriptor;
    #[inline]
    fn deref(&self) -> &Descriptor {
        // SAFETY: a guard counts as a use, and the descriptor is freed only when no use of a
        // closed slot is left (or with the slot, which the guard borrows).
        unsafe { self.slot.desc.as_ref() }
    }
}

impl<'a> DescGuard<'a> {
    /// [`Descriptor::read_io`] through this use of the slot, which the request keeps until
    /// it ends: a stacked device returns it as its own request's future.
    pub fn into_read_io(self, offset_blocks: u64, buf: IoBuf) -> IoFuture<'a, Result<IoBuf>> {
        let mut fut = self.descriptor().read_io(offset_blocks, buf);
        fut.keep(self);
        fut
    }

    /// [`Descriptor::write_io`] through this use of the slot (see
    /// [`DescGuard::into_read_io`]).
    pub fn into_write_io(self, offset_blocks: u64, buf: IoBuf) -> IoFuture<'a, Result<IoBuf>> {
        let mut fut = self.descriptor().write_io(offset_blocks, buf);
        fut.keep(self);
        fut
    }

    /// The descriptor, borrowed for as long as the slot is: only for a request that keeps
    /// this guard ([`IoFuture::keep`]), which drops it after the request's future and its
    /// accounting, the only users of the borrow.
    fn descriptor(&self) -> &'a Descriptor {
        // SAFETY: the descriptor lives while a use of the slot does (see `Deref`); the
        // callers hand the guard to the request that borrows the descriptor, and the request
        // drops the guard last.
        unsafe { &*self.slot.desc.as_ptr() }
    }
}

impl Drop for DescGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: taken once, here; the field is not used again.
        let hold = unsafe { ManuallyDrop::take(&mut self.hold) };
        if self.slot.uses.leave(hold) {
            // Closed: this may have been the last use.
            self.slot.try_free();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::malloc::MallocBdev;
    use crate::{IoBuf, Registry};

    /// A registry with the malloc bdev "m" (64 blocks of 512 bytes) and a slot holding a
    /// writable descriptor of it.
    async fn malloc_slot() -> (Registry, DescSlot) {
        let reg = Registry::new();
        reg.register(MallocBdev::create("m", 64, 512, None).unwrap())
            .await
            .unwrap();
        let slot = DescSlot::new(reg.open("m", true).unwrap());
        (reg, slot)
    }

    /// A guard taken before the close keeps the descriptor open (its read succeeds and the
    /// bdev's unregister waits); later gets fail; the last guard's drop closes it, after
    /// which the unregister completes.
    #[test]
    fn close_waits_for_the_guards_taken_before_it() {
        futures::executor::block_on(async {
            let (reg, slot) = malloc_slot().await;
            let g = slot.get().expect("open");
            let mut claimed = false;
            assert!(slot.close_with(|d| claimed = d.is_writable()));
            assert!(claimed, "`before` ran with the open descriptor");
            assert!(!slot.close(), "second close is a no-op");
            assert!(slot.is_closed());
            assert!(slot.get().is_none());
            // Still usable through the guard taken before the close.
            let mut b = IoBuf::new(512, 512);
            b.fill(7);
            g.write(3, b).await.unwrap();
            let r = g.read(3, IoBuf::new(512, 512)).await.unwrap();
            assert!(r.iter().all(|&x| x == 7));
            // The descriptor is still open: the unregister cannot finish yet.
            let mut unreg = Box::pin(reg.unregister("m"));
            assert!(futures::poll!(unreg.as_mut()).is_pending());
            drop(g);
            unreg.await.unwrap();
            // Gets after the descriptor was dropped back off without touching it.
            for _ in 0..3 {
                assert!(slot.get().is_none());
                assert!(!slot.close());
            }
        });
    }

    /// Threads (more than there are owned counting slots) take guards and read through
    /// them, some guards ending on another thread, while the slot is closed: every guard
    /// taken reads the bdev's bytes, no get succeeds after the close is seen, and the
    /// descriptor is dropped exactly once, after the last guard (the unregister, which
    /// waits for it, completes).
    #[test]
    fn guards_of_many_threads_keep_the_descriptor_until_the_last_one() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        futures::executor::block_on(async {
            let (reg, slot) = malloc_slot().await;
            {
                let g = slot.get().unwrap();
                let mut b = IoBuf::new(512, 512);
                b.fill(9);
                g.write(0, b).await.unwrap();
            }
            // Leaked so the threads can borrow it (its descriptor is freed by the close).
            let slot: &'static DescSlot = Box::leak(Box::new(slot));
            let reads = Arc::new(AtomicUsize::new(0));
            let threads = thread_slot::slot_count() * 2 + 1;
            let (tx, rx) = std::sync::mpsc::channel::<(usize, DescGuard<'static>)>();
            let rx = Arc::new(std::sync::Mutex::new(rx));
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let (reads, tx, rx) = (reads.clone(), tx.clone(), rx.clone());
                    std::thread::spawn(move || {
                        while let Some(g) = slot.get() {
                            let r = futures::executor::block_on(g.read(0, IoBuf::new(512, 512)))
                                .expect("a guard taken before the close reads");
                            assert!(r.iter().all(|&x| x == 9));
                            reads.fetch_add(1, Ordering::SeqCst);
                            if t % 3 == 0 {
                                tx.send((t, g)).unwrap();
                            }
                            // Guards sent by others end on this thread.
                            while let Ok((_, g)) = rx.lock().unwrap().try_recv() {
                                drop(g);
                            }
                        }
                    })
                })
                .collect();
            while reads.load(Ordering::SeqCst) < 2_000 {
                std::thread::yield_now();
            }
            assert!(slot.close());
            let mut unreg = Box::pin(reg.unregister("m"));
            for w in workers {
                w.join().unwrap();
            }
            drop(tx);
            let left: Vec<_> = rx.lock().unwrap().try_iter().collect();
            if !left.is_empty() {
                // Guards remain: the descriptor is still open.
                assert!(futures::poll!(unreg.as_mut()).is_pending());
            }
            drop(left);
            unreg.await.unwrap();
            assert!(slot.get().is_none());
            assert!(
                slot.freed.load(Ordering::SeqCst),
                "freed once, by the last use"
            );
        });
    }

    /// Dropping an open slot closes its descriptor.
    #[test]
    fn dropping_an_open_slot_closes_the_descriptor() {
        futures::executor::block_on(async {
            let (reg, slot) = malloc_slot().await;
            assert!(slot.get().is_some_and(|d| d.is_writable()));
            drop(slot);
            reg.unregister("m").await.unwrap();
        });
    }
}
