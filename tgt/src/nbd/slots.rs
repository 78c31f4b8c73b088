//! The in-flight requests of one NBD connection: a set of futures polled by the session's
//! task, like `FuturesUnordered`, but each future lives in a slot that is allocated once and
//! reused, so a request costs no allocation in steady state (`FuturesUnordered` allocates a
//! task node per future).
//!
//! Every slot has its own waker, which marks the slot ready and wakes the session's task;
//! [`Slots::poll_next`] polls only the slots marked ready.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use futures::Stream;

/// The waker of one slot: marks it ready, then wakes the task polling the set.
struct SlotWake {
    ready: AtomicBool,
    task: Arc<AtomicWaker>,
}

impl Wake for SlotWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.store(true, Ordering::Release);
        self.task.wake();
    }
}

struct Slot<F> {
    /// The slot's future; `None` while the slot is free. Boxed once, so it never moves.
    fut: Pin<Box<Option<F>>>,
    flag: Arc<SlotWake>,
    waker: Waker,
}

/// A set of futures of one type, each in a reusable slot (see the module docs).
pub(super) struct Slots<F> {
    slots: Vec<Slot<F>>,
    /// Indices of the free slots.
    free: Vec<usize>,
    task: Arc<AtomicWaker>,
    len: usize,
    /// Where the next scan for ready slots starts, so that no slot waits behind the others.
    cursor: usize,
}

impl<F: Future> Slots<F> {
    /// An empty set; `cap` slots are reserved (more are added as needed).
    pub(super) fn with_capacity(cap: usize) -> Self {
        Slots {
            slots: Vec::with_capacity(cap),
            free: Vec::with_capacity(cap),
            task: Arc::new(AtomicWaker::new()),
            len: 0,
            cursor: 0,
        }
    }

    /// Futures in the set.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether the set holds no future.
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `fut`, in a free slot if there is one. As with `FuturesUnordered::push`, nothing
    /// is woken: the caller polls the set ([`Slots::poll_next`]) to run it.
    pub(super) fn push(&mut self, fut: F) {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                let flag = Arc::new(SlotWake {
                    ready: AtomicBool::new(false),
                    task: self.task.clone(),
                });
                self.slots.push(Slot {
                    fut: Box::pin(None),
                    waker: Waker::from(flag.clone()),
                    flag,
                });
                self.slots.len() - 1
            }
        };
        let slot = &mut self.slots[idx];
        slot.fut.set(Some(fut));
        slot.flag.ready.store(true, Ordering::Release);
        self.len += 1;
    }
}

impl<F: Future> Stream for Slots<F> {
    type Item = F::Output;

    /// The output of one future that completed (its slot freed), `Pending` if none did
    /// (the task is woken when one is woken), `None` when the set is empty.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        let this = self.get_mut();
        if this.len == 0 {
            return Poll::Ready(None);
        }
        // Registered before the flags are read, so a wake after the scan is not lost.
        this.task.register(cx.waker());
        let n = this.slots.len();
        for k in 0..n {
            let idx = (this.cursor + k) % n;
            let slot = &mut this.slots[idx];
            if !slot.flag.ready.load(Ordering::Acquire) {
                continue;
            }
            slot.flag.ready.store(false, Ordering::Release);
            let Some(fut) = slot.fut.as_mut().as_pin_mut() else {
                continue;
            };
            let mut scx = Context::from_waker(&slot.waker);
            if let Poll::Ready(out) = fut.poll(&mut scx) {
                slot.fut.set(None);
                this.free.push(idx);
                this.len -= 1;
                this.cursor = (idx + 1) % n;
                return Poll::Ready(Some(out));
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{FutureExt, StreamExt};

    /// Completes with `v` on its `polls`-th poll, waking itself before each `Pending`.
    async fn after(polls: u32, v: u32) -> u32 {
        let mut left = polls;
        futures::future::poll_fn(|cx| {
            left -= 1;
            if left == 0 {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
        .await;
        v
    }

    #[test]
    fn every_future_completes_once_and_slots_are_reused() {
        futures::executor::block_on(async {
            let mut s = Slots::with_capacity(4);
            assert!(s.is_empty());
            assert_eq!(s.next().await, None);
            for round in 0..3u32 {
                for i in 0..4 {
                    s.push(after(1 + i % 3, round * 10 + i).boxed());
                }
                assert_eq!(s.len(), 4);
                let mut got = Vec::new();
                while let Some(v) = s.next().await {
                    got.push(v);
                }
                got.sort_unstable();
                assert_eq!(got, (0..4).map(|i| round * 10 + i).collect::<Vec<_>>());
                assert!(s.is_empty());
            }
            assert_eq!(s.slots.len(), 4, "four slots, reused every round");
        });
    }

    #[test]
    fn a_future_woken_from_another_thread_is_polled_again() {
        let (tx, rx) = futures::channel::oneshot::channel::<u32>();
        let mut s = Slots::with_capacity(2);
        s.push(async move { rx.await.unwrap() + 1 }.boxed());
        assert!(
            s.next().now_or_never().is_none(),
            "pending until the value is sent"
        );
        let t = std::thread::spawn(move || tx.send(41).unwrap());
        let v = futures::executor::block_on(s.next());
        t.join().unwrap();
        assert_eq!(v, Some(42));
        assert!(s.is_empty());
    }

    #[test]
    fn a_pending_slot_does_not_hide_a_ready_one() {
        let mut s = Slots::with_capacity(2);
        s.push(futures::future::pending::<u32>().boxed());
        s.push(async { 7 }.boxed());
        assert_eq!(s.next().now_or_never(), Some(Some(7)));
        assert_eq!(s.len(), 1);
        assert!(s.next().now_or_never().is_none());
    }
}
