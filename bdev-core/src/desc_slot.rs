//! [`DescSlot`]: an open [`Descriptor`] that can be closed while requests use it, read on the
//! I/O path without a lock or a reference count.
//!
//! Stacked devices (an lvol store's base, an esnap clone's external snapshot, the read-only
//! bdev's base) hold the descriptor of the device below them and must be able to let go of it
//! on hot-remove while requests are in flight: those finish, later ones fail. An
//! `RwLock<Option<Arc<Descriptor>>>` does that at the cost of a lock and two atomic reference
//! count updates per request; a `DescSlot` does it with one counter shared by the requests
//! in flight and the closed flag (one atomic add and one subtract per request, no lock).

use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Descriptor, IoBuf, IoFuture, Result};

/// Bit 0 of `users`: the slot was closed.
const CLOSED: usize = 1;
/// Bit 1 of `users`: the descriptor of the closed slot was dropped.
const FREED: usize = 2;
/// One user in `users` (bits 2..).
const ONE: usize = 4;

/// A descriptor shared by the requests in flight on it, closable at any time: closing it
/// makes later [`DescSlot::get`] calls return `None`, and the descriptor itself is dropped
/// (closing it in the registry, which releases a claim and lets an unregister complete) when
/// the last [`DescGuard`] taken before the close goes away.
pub struct DescSlot {
    desc: NonNull<Descriptor>,
    /// `CLOSED` and `FREED` bits, and `ONE` per guard alive (or per `get` backing off).
    users: AtomicUsize,
}

// SAFETY: the slot owns a boxed `Descriptor` (which is Send + Sync) and only hands out shared
// references to it; its freeing is serialised through `users` (exactly one thread sees the
// count reach zero after the close, see `leave`).
unsafe impl Send for DescSlot {}
// SAFETY: as above.
unsafe impl Sync for DescSlot {}

impl DescSlot {
    /// Holds `desc` until [`DescSlot::close`] (and its last guard), or until the slot is
    /// dropped.
    pub fn new(desc: Descriptor) -> Self {
        DescSlot {
            desc: NonNull::from(Box::leak(Box::new(desc))),
            users: AtomicUsize::new(0),
        }
    }

    /// The descriptor for one request, unless the slot was closed.
    #[inline]
    pub fn get(&self) -> Option<DescGuard<'_>> {
        let prev = self.users.fetch_add(ONE, Ordering::Acquire);
        let g = DescGuard { slot: self };
        if prev & CLOSED != 0 {
            // Dropping `g` undoes the add (and frees the descriptor if we held it last).
            drop(g);
            return None;
        }
        Some(g)
    }

    /// Whether [`DescSlot::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.users.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Closes the slot. `before` runs once, on the first close, with the descriptor still
    /// open (e.g. to release its claim at once); the descriptor is dropped when the last
    /// request using it completes, which may be right here. Returns whether this call closed
    /// the slot.
    pub fn close_with(&self, before: impl FnOnce(&Descriptor)) -> bool {
        // Hold a use of our own, so the descriptor stays alive until `before` has run.
        let prev = self.users.fetch_add(ONE, Ordering::Acquire);
        let g = DescGuard { slot: self };
        if prev & CLOSED != 0 {
            drop(g);
            return false;
        }
        let prev = self.users.fetch_or(CLOSED, Ordering::AcqRel);
        if prev & CLOSED != 0 {
            drop(g);
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

    /// Ends one use; frees the descriptor when it was the last use of a closed slot.
    #[inline]
    fn leave(&self) {
        let prev = self.users.fetch_sub(ONE, Ordering::AcqRel);
        // The last use of a closed slot frees the descriptor. A `get` that backs off adds and
        // removes a use too: whoever brings the count to zero while the slot is closed and
        // not yet freed tries, and exactly one of them moves CLOSED to CLOSED | FREED.
        if prev == ONE | CLOSED
            && self
                .users
                .compare_exchange(CLOSED, CLOSED | FREED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // SAFETY: the slot is closed (no new use starts: `get` backs off on CLOSED), no
            // use is left, and FREED is set by this thread alone, so nothing references the
            // descriptor and nobody frees it again.
            unsafe { drop(Box::from_raw(self.desc.as_ptr())) };
        }
    }
}

impl Drop for DescSlot {
    fn drop(&mut self) {
        // No guard outlives the slot (they borrow it): a closed slot has freed its
        // descriptor already, an open one frees it now.
        if *self.users.get_mut() & CLOSED == 0 {
            // SAFETY: not closed, so not freed; `&mut self` means no use is in progress.
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

/// One use of a [`DescSlot`]'s descriptor (see [`DescSlot::get`]).
pub struct DescGuard<'a> {
    slot: &'a DescSlot,
}

impl Deref for DescGuard<'_> {
    type Target = Descriptor;
    #[inline]
    fn deref(&self) -> &Descriptor {
        // SAFETY: a guard counts as a use, and the descriptor is freed only when the count of
        // uses of a closed slot reaches zero (or with the slot, which the guard borrows).
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
        self.slot.leave();
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
