//! Memory budgets and timeouts that keep hostile or stuck clients from pinning the target's
//! memory (see `docs/reliability.md`, "Limits").
//!
//! A [`MemBudget`] is a byte counter with a ceiling. The NBD server charges every request
//! payload and read reply to a per-connection budget and to the server-wide one until the
//! reply was written to the socket; the RPC server charges the part of each connection's
//! receive buffer above a small free allowance to its server-wide budget. A connection that
//! cannot get budget stops reading (back-pressure); one that makes no progress for the stall
//! timeout is dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::sync::Notify;

const MIB: usize = 1 << 20;

/// Bytes one NBD connection may hold in request payloads and unsent read replies.
pub const NBD_CONN_MEM: usize = 128 * MIB;
/// Bytes all NBD connections together may hold (payloads, replies, receive and send buffers).
pub const NBD_TOTAL_MEM: usize = 512 * MIB;
/// Bytes all RPC connections together may hold in partial requests beyond
/// [`RPC_CONN_FREE`] each.
pub const RPC_TOTAL_MEM: usize = 128 * MIB;
/// Receive-buffer bytes an RPC connection holds without charge (small requests never wait).
pub const RPC_CONN_FREE: usize = 64 * 1024;
/// How long a client may leave the target stuck on it: an NBD client that reads none of its
/// replies (or sends none of a payload it announced), an RPC client whose partial request
/// waits for budget. It is then disconnected.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The limits a server runs with (defaults: the constants above; `tgt` options override them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// [`NBD_CONN_MEM`].
    pub nbd_conn_mem: usize,
    /// [`NBD_TOTAL_MEM`].
    pub nbd_total_mem: usize,
    /// [`RPC_TOTAL_MEM`].
    pub rpc_total_mem: usize,
    /// [`STALL_TIMEOUT`].
    pub stall_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            nbd_conn_mem: NBD_CONN_MEM,
            nbd_total_mem: NBD_TOTAL_MEM,
            rpc_total_mem: RPC_TOTAL_MEM,
            stall_timeout: STALL_TIMEOUT,
        }
    }
}

/// A byte budget shared by several holders. Taking waits (cancel-safely) until enough was
/// given back.
#[derive(Debug)]
pub struct MemBudget {
    limit: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
    freed: Notify,
}

impl MemBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(MemBudget {
            limit,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            freed: Notify::new(),
        })
    }

    /// The ceiling.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    /// The most bytes ever held at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Takes `n` bytes if they fit.
    pub fn try_take(&self, n: usize) -> bool {
        let mut cur = self.used.load(Ordering::SeqCst);
        loop {
            let Some(next) = cur.checked_add(n).filter(|&x| x <= self.limit) else {
                return false;
            };
            match self
                .used
                .compare_exchange(cur, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::SeqCst);
                    return true;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Waits until `n` bytes fit, then takes them. Dropping the future takes nothing. `n`
    /// over the limit never fits: callers bound their requests first.
    pub async fn take(&self, n: usize) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.try_take(n) {
                return;
            }
            freed.await;
        }
    }

    /// Gives `n` bytes back.
    pub fn give(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.used.fetch_sub(n, Ordering::SeqCst);
        self.freed.notify_waiters();
    }
}

/// Bytes taken from a budget, given back on drop.
#[derive(Debug)]
pub struct Held {
    budget: Arc<MemBudget>,
    n: usize,
}

impl Held {
    /// Waits for and takes `n` bytes of `budget`.
    pub async fn take(budget: &Arc<MemBudget>, n: usize) -> Held {
        budget.take(n).await;
        Held {
            budget: budget.clone(),
            n,
        }
    }

    /// Takes `n` bytes if they fit now.
    pub fn try_take(budget: &Arc<MemBudget>, n: usize) -> Option<Held> {
        budget.try_take(n).then(|| Held {
            budget: budget.clone(),
            n,
        })
    }

    /// An empty charge on `budget` (grown with [`Held::grow`]).
    pub fn none(budget: &Arc<MemBudget>) -> Held {
        Held {
            budget: budget.clone(),
            n: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.n
    }

    /// Takes `extra` more bytes, waiting for them.
    pub async fn grow(&mut self, extra: usize) {
        self.budget.take(extra).await;
        self.n += extra;
    }

    /// Gives back what is held above `keep`.
    pub fn shrink_to(&mut self, keep: usize) {
        if self.n > keep {
            self.budget.give(self.n - keep);
            self.n = keep;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give(self.n);
    }
}

/// A writer that fails with `TimedOut` when the peer accepts no byte for `timeout` while
/// the writer has something to send: a client that never reads its replies is dropped
/// instead of holding their buffers forever. Any progress restarts the clock.
pub struct StallGuard<W> {
    inner: W,
    timeout: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<W> StallGuard<W> {
    /// Wraps `inner`.
    pub fn new(inner: W, timeout: Duration) -> Self {
        StallGuard {
            inner,
            timeout,
            deadline: None,
        }
    }

    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.deadline = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let d = self
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match d.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client read nothing for the stall timeout",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for StallGuard<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn budget_waits_and_gives_back() {
        let b = MemBudget::new(100);
        let a = Held::try_take(&b, 60).unwrap();
        assert!(Held::try_take(&b, 50).is_none());
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { Held::take(&b2, 50).await.bytes() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(a);
        assert_eq!(waiter.await.unwrap(), 50);
        assert_eq!(b.used(), 0);
        assert_eq!(b.peak(), 60);
        // A cancelled wait takes nothing.
        let _full = Held::try_take(&b, 100).unwrap();
        let t = tokio::time::timeout(Duration::from_millis(20), b.take(1)).await;
        assert!(t.is_err());
        assert_eq!(b.used(), 100);
    }

    #[tokio::test]
    async fn a_peer_that_reads_nothing_times_out() {
        let (a, _b) = tokio::io::duplex(1024);
        let mut w = StallGuard::new(a, Duration::from_millis(100));
        let t0 = std::time::Instant::now();
        let e = w.write_all(&[0u8; 8192]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t0.elapsed() >= Duration::from_millis(100));
    }
}
