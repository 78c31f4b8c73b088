//! Block-range locking for the byte-range I/O of one export.
//!
//! A read-modify-write of a partial block must not interleave with another write to that
//! block (whichever wrote last would put back stale bytes of the other), while writes to
//! other blocks, and whole-block writes to the same blocks as each other, may run together.
//! So writes take their block range shared, read-modify-writes take theirs exclusive, and
//! requests of disjoint ranges never wait for each other (one export-wide lock would make
//! every whole-block write wait behind any unaligned one).
//!
//! Grants are first come, first served among conflicting requests: a request waits until no
//! earlier request whose range it conflicts with is still registered, so a stream of shared
//! writers cannot starve a read-modify-write.

use std::sync::Mutex;

use tokio::sync::Notify;

/// One registered request: its block range `[first, end)`, whether it is exclusive, and its
/// arrival number.
#[derive(Clone, Copy)]
struct Entry {
    first: u64,
    end: u64,
    exclusive: bool,
    id: u64,
}

impl Entry {
    fn conflicts(&self, o: &Entry) -> bool {
        self.first < o.end && o.first < self.end && (self.exclusive || o.exclusive)
    }
}

#[derive(Default)]
struct Table {
    /// Registered requests in arrival order (granted or waiting).
    entries: Vec<Entry>,
    next_id: u64,
    /// Requests waiting for a grant.
    waiting: usize,
}

impl Table {
    /// Whether the entry `id` conflicts with none registered before it.
    fn granted(&self, id: u64) -> bool {
        let Some(i) = self.entries.iter().position(|e| e.id == id) else {
            return false;
        };
        let me = self.entries[i];
        !self.entries[..i].iter().any(|e| e.conflicts(&me))
    }
}

/// The range lock of one export (see the module documentation).
#[derive(Default)]
pub(super) struct RangeLock {
    table: Mutex<Table>,
    released: Notify,
}

/// A granted range; dropping it releases the range.
pub(super) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks blocks `[first, first + count)`, exclusive or shared.
    pub(super) async fn lock(&self, first: u64, count: u64, exclusive: bool) -> RangeGuard<'_> {
        let id = {
            let mut t = self.table();
            let id = t.next_id;
            t.next_id += 1;
            let e = Entry {
                first,
                end: first.saturating_add(count),
                exclusive,
                id,
            };
            let free = !t.entries.iter().any(|o| o.conflicts(&e));
            t.entries.push(e);
            if free {
                return RangeGuard { lock: self, id };
            }
            t.waiting += 1;
            id
        };
        // Registered: from here the guard releases the entry even if this future is dropped.
        let guard = RangeGuard { lock: self, id };
        let _waiting = Waiting(self);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.table().granted(id) {
                return guard;
            }
            released.await;
        }
    }
}

/// Counts one waiter while it waits.
struct Waiting<'a>(&'a RangeLock);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.table().waiting -= 1;
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let wake = {
            let mut t = self.lock.table();
            if let Some(i) = t.entries.iter().position(|e| e.id == self.id) {
                t.entries.remove(i);
            }
            t.waiting > 0
        };
        if wake {
            self.lock.released.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn disjoint_and_shared_ranges_do_not_wait() {
        let l = RangeLock::default();
        let a = l.lock(0, 4, true).now_or_never().expect("free");
        let b = l.lock(4, 4, true).now_or_never().expect("disjoint");
        let c = l.lock(8, 4, false).now_or_never().expect("free");
        let d = l
            .lock(8, 4, false)
            .now_or_never()
            .expect("shared with shared");
        drop((a, b, c, d));
        assert!(l.table().entries.is_empty());
    }

    #[tokio::test]
    async fn an_exclusive_range_waits_for_overlaps_in_arrival_order() {
        let l = RangeLock::default();
        let shared = l.lock(0, 2, false).await;
        let mut excl = Box::pin(l.lock(1, 1, true));
        assert!(
            (&mut excl).now_or_never().is_none(),
            "overlaps a shared holder"
        );
        // A later shared request overlapping the waiting exclusive one queues behind it.
        let mut late = Box::pin(l.lock(1, 1, false));
        assert!(
            (&mut late).now_or_never().is_none(),
            "behind the waiting exclusive"
        );
        drop(shared);
        let g = excl.await;
        assert!(
            (&mut late).now_or_never().is_none(),
            "the exclusive holds it"
        );
        drop(g);
        let g2 = late.await;
        drop(g2);
        let t = l.table();
        assert!(t.entries.is_empty());
        assert_eq!(t.waiting, 0);
    }

    #[tokio::test]
    async fn a_dropped_waiter_releases_its_place() {
        let l = RangeLock::default();
        let held = l.lock(0, 1, true).await;
        let mut w = Box::pin(l.lock(0, 1, true));
        assert!((&mut w).now_or_never().is_none());
        drop(w);
        drop(held);
        assert!(l.lock(0, 1, true).now_or_never().is_some());
    }
}
