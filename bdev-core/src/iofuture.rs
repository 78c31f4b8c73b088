//! [`IoFuture`]: the future of one I/O request, type-erased without a heap allocation.
//!
//! `#[async_trait]` methods box their future, one allocation per call and per layer. The
//! data-path methods of [`crate::BlockDevice`] (`read_io`, `write_io`) return an `IoFuture`
//! instead: the device's future is stored inline in a fixed-size, aligned area inside the
//! `IoFuture` itself (which the caller's future embeds, or keeps pinned), with a pair of
//! function pointers to poll and drop it.
//!
//! A future too large for the inline area (a stacked device's, which embeds the `IoFuture`
//! of the layer below) goes to a block of a per-thread pool of [`POOL_BLOCK`]-byte blocks
//! (SPDK's per-thread `bdev_io` cache): blocks are allocated once and recycled, so steady
//! state allocates nothing whatever the depth of the stack. Only a future larger than a block
//! is boxed; [`IoFuture::allocates`] tells which.

use std::future::Future;
use std::marker::{PhantomData, PhantomPinned};
use std::mem::{align_of, size_of, MaybeUninit};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::future::BoxFuture;

use crate::stats::{IoKind, IoStats};

/// Bytes of inline storage of an [`IoFuture`].
pub const INLINE_BYTES: usize = 512;
/// Size of a pooled block (a future larger than [`INLINE_BYTES`]).
pub const POOL_BLOCK: usize = 4096;
/// Blocks a thread keeps for reuse (more are freed).
const POOL_KEEP: usize = 1024;

fn block_layout() -> std::alloc::Layout {
    std::alloc::Layout::from_size_align(POOL_BLOCK, 64).expect("valid layout")
}

/// This thread's free blocks.
struct Pool(Vec<std::ptr::NonNull<u8>>);

impl Drop for Pool {
    fn drop(&mut self) {
        for p in self.0.drain(..) {
            // SAFETY: every block in the pool was allocated with `block_layout`.
            unsafe { std::alloc::dealloc(p.as_ptr(), block_layout()) }
        }
    }
}

thread_local! {
    static POOL: std::cell::RefCell<Pool> = const { std::cell::RefCell::new(Pool(Vec::new())) };
}

fn take_block() -> std::ptr::NonNull<u8> {
    let reused = POOL
        .try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.0.pop()))
        .ok()
        .flatten();
    reused.unwrap_or_else(|| {
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(block_layout()) };
        std::ptr::NonNull::new(raw)
            .unwrap_or_else(|| std::alloc::handle_alloc_error(block_layout()))
    })
}

fn give_block(b: std::ptr::NonNull<u8>) {
    let kept = POOL
        .try_with(|p| match p.try_borrow_mut() {
            Ok(mut p) if p.0.len() < POOL_KEEP => {
                if p.0.capacity() == 0 {
                    p.0.reserve_exact(POOL_KEEP);
                }
                p.0.push(b);
                true
            }
            _ => false,
        })
        .unwrap_or(false);
    if !kept {
        // SAFETY: `b` was allocated with `block_layout` and is not used any more.
        unsafe { std::alloc::dealloc(b.as_ptr(), block_layout()) }
    }
}

/// A future in a pooled block.
struct Pooled<'a, T> {
    block: std::ptr::NonNull<u8>,
    poll: unsafe fn(*mut u8, &mut Context<'_>) -> Poll<T>,
    drop: unsafe fn(*mut u8),
    _life: PhantomData<&'a ()>,
}

impl<T> Drop for Pooled<'_, T> {
    fn drop(&mut self) {
        // SAFETY: the block holds the live future written by `IoFuture::new`.
        unsafe { (self.drop)(self.block.as_ptr()) };
        give_block(self.block);
    }
}

#[repr(C, align(16))]
struct Storage([MaybeUninit<u8>; INLINE_BYTES]);

/// Polls the future of type `F` stored at `p`.
///
/// # Safety
/// `p` holds a live, pinned `F`.
unsafe fn poll_fn<F: Future>(p: *mut u8, cx: &mut Context<'_>) -> Poll<F::Output> {
    // SAFETY: the caller guarantees `p` points at a live `F` that never moves again.
    unsafe { Pin::new_unchecked(&mut *(p as *mut F)).poll(cx) }
}

/// Drops the future of type `F` stored at `p`.
///
/// # Safety
/// `p` holds a live `F`, not used again.
unsafe fn drop_fn<F>(p: *mut u8) {
    // SAFETY: the caller guarantees `p` points at a live `F` dropped exactly once.
    unsafe { std::ptr::drop_in_place(p as *mut F) }
}

struct Inline<'a, T> {
    data: Storage,
    poll: unsafe fn(*mut u8, &mut Context<'_>) -> Poll<T>,
    drop: unsafe fn(*mut u8),
    live: bool,
    _life: PhantomData<&'a ()>,
}

impl<T> Drop for Inline<'_, T> {
    fn drop(&mut self) {
        if self.live {
            self.live = false;
            // SAFETY: `data` holds the future written by `IoFuture::new` (still live).
            unsafe { (self.drop)(self.data.0.as_mut_ptr().cast()) }
        }
    }
}

// The inline variant is large on purpose: it is the point of the type.
#[allow(clippy::large_enum_variant)]
enum Kind<'a, T> {
    Ready(Option<T>),
    Inline(Inline<'a, T>),
    Pooled(Pooled<'a, T>),
    Boxed(BoxFuture<'a, T>),
}

/// The future of one I/O request (see the module documentation). `Send`; pinned before its
/// first poll like any future.
pub struct IoFuture<'a, T> {
    kind: Kind<'a, T>,
    /// Counter decremented when the request ends (the descriptor's in-flight count).
    inflight: Option<&'a AtomicU64>,
    /// Statistics recorded when the request completes (`bdev_get_iostat`).
    recorder: Option<Recorder<'a, T>>,
    _pin: PhantomPinned,
}

/// What [`IoFuture::recorded`] records at completion.
struct Recorder<'a, T> {
    stats: &'a IoStats,
    kind: IoKind,
    bytes: u64,
    start: u64,
    ok: fn(&T) -> bool,
}

// SAFETY: every constructor takes a `Send` future (or value); the raw storage only ever holds
// such a future, so moving the `IoFuture` to another thread moves a `Send` value.
unsafe impl<T: Send> Send for IoFuture<'_, T> {}

impl<'a, T> IoFuture<'a, T> {
    /// Stores `fut` inline if it fits, else boxes it.
    pub fn new<F>(fut: F) -> Self
    where
        F: Future<Output = T> + Send + 'a,
    {
        if size_of::<F>() > INLINE_BYTES || align_of::<F>() > align_of::<Storage>() {
            if size_of::<F>() > POOL_BLOCK || align_of::<F>() > 64 {
                return Self::boxed(Box::pin(fut));
            }
            let block = take_block();
            // SAFETY: the block is `POOL_BLOCK` bytes aligned to 64, enough for `F` (checked
            // above), and owned by the `Pooled` from here on.
            unsafe { std::ptr::write(block.as_ptr() as *mut F, fut) };
            return IoFuture {
                kind: Kind::Pooled(Pooled {
                    block,
                    poll: poll_fn::<F>,
                    drop: drop_fn::<F>,
                    _life: PhantomData,
                }),
                inflight: None,
                recorder: None,
                _pin: PhantomPinned,
            };
        }
        let mut data = Storage([MaybeUninit::uninit(); INLINE_BYTES]);
        // SAFETY: the storage is large and aligned enough for `F` (checked above); it is
        // written once here and read only through `poll_fn::<F>` / `drop_fn::<F>`.
        unsafe { std::ptr::write(data.0.as_mut_ptr() as *mut F, fut) };
        IoFuture {
            kind: Kind::Inline(Inline {
                data,
                poll: poll_fn::<F>,
                drop: drop_fn::<F>,
                live: true,
                _life: PhantomData,
            }),
            inflight: None,
            recorder: None,
            _pin: PhantomPinned,
        }
    }

    /// An already boxed future (what an `#[async_trait]` method returns).
    pub fn boxed(fut: BoxFuture<'a, T>) -> Self {
        IoFuture {
            kind: Kind::Boxed(fut),
            inflight: None,
            recorder: None,
            _pin: PhantomPinned,
        }
    }

    /// A request that is already complete.
    pub fn ready(v: T) -> Self {
        IoFuture {
            kind: Kind::Ready(Some(v)),
            inflight: None,
            recorder: None,
            _pin: PhantomPinned,
        }
    }

    /// Whether the request's future is on the heap in a block of its own (a future larger
    /// than a pool block, or an `#[async_trait]` method's).
    pub fn allocates(&self) -> bool {
        matches!(self.kind, Kind::Boxed(_))
    }

    /// Counts the request in `c` (already incremented by the caller) until it ends.
    pub(crate) fn counted(mut self, c: &'a AtomicU64) -> Self {
        if let Some(old) = self.inflight.replace(c) {
            old.fetch_sub(1, Ordering::AcqRel);
        }
        self
    }
}

impl<'a, X> IoFuture<'a, crate::Result<X>> {
    /// Records the request in `stats` (kind, bytes, latency from now, success) when it
    /// completes. A request dropped before completion is not counted.
    pub(crate) fn recorded(mut self, stats: &'a IoStats, kind: IoKind, bytes: u64) -> Self {
        self.recorder = Some(Recorder {
            stats,
            kind,
            bytes,
            start: crate::stats::now(),
            ok: |r| r.is_ok(),
        });
        self
    }
}

impl<T> Drop for IoFuture<'_, T> {
    fn drop(&mut self) {
        // The request's own future first (it may still hold the device), then the count.
        self.kind = Kind::Ready(None);
        if let Some(c) = self.inflight.take() {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<T> Future for IoFuture<'_, T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // SAFETY: nothing is moved out of the pinned value: the inline future is polled in
        // place, the box and the ready value are not structurally pinned.
        let this = unsafe { self.get_unchecked_mut() };
        let out = match &mut this.kind {
            Kind::Ready(v) => Poll::Ready(v.take().expect("IoFuture polled after completion")),
            Kind::Boxed(b) => b.as_mut().poll(cx),
            Kind::Inline(i) => {
                // SAFETY: `live` guarantees the stored future exists; it is pinned because
                // `self` is.
                unsafe { (i.poll)(i.data.0.as_mut_ptr().cast(), cx) }
            }
            Kind::Pooled(p) => {
                // SAFETY: the block holds the live future, which never moves (the block is
                // ours until the `Pooled` drops).
                unsafe { (p.poll)(p.block.as_ptr(), cx) }
            }
        };
        if let Poll::Ready(v) = &out {
            if let Some(c) = this.inflight.take() {
                c.fetch_sub(1, Ordering::AcqRel);
            }
            if let Some(r) = this.recorder.take() {
                r.stats.record(r.kind, r.bytes, r.start, (r.ok)(v));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn futures_of_every_size_complete_and_only_huge_ones_allocate() {
        let x = 7u64;
        let f = IoFuture::new(async move { x + 1 });
        assert!(!f.allocates());
        assert_eq!(futures::executor::block_on(f), 8);
        let mid = [3u8; INLINE_BYTES * 2];
        let f = IoFuture::new(async move { mid.iter().map(|&b| b as u64).sum::<u64>() });
        assert!(!f.allocates(), "pooled");
        assert_eq!(futures::executor::block_on(f), 6 * INLINE_BYTES as u64);
        let huge = [1u8; POOL_BLOCK * 2];
        let f = IoFuture::new(async move { huge.iter().map(|&b| b as u64).sum::<u64>() });
        assert!(f.allocates());
        assert_eq!(futures::executor::block_on(f), 2 * POOL_BLOCK as u64);
        assert_eq!(futures::executor::block_on(IoFuture::ready(5)), 5);
        // A nested request (an IoFuture inside a pooled one) completes too.
        let inner = IoFuture::new(async move { x * 2 });
        let outer = IoFuture::new(async move { inner.await + 1 });
        assert_eq!(futures::executor::block_on(outer), 15);
    }

    #[test]
    fn dropping_unfinished_runs_destructors_and_releases_the_count() {
        use std::sync::Arc;
        let c = AtomicU64::new(1);
        let token = Arc::new(());
        let t2 = token.clone();
        let f = IoFuture::new(async move {
            let _t = t2;
            futures::future::pending::<()>().await
        })
        .counted(&c);
        let mut f = Box::pin(f);
        assert!(futures::FutureExt::now_or_never(&mut f).is_none());
        assert_eq!(Arc::strong_count(&token), 2);
        drop(f);
        assert_eq!(
            Arc::strong_count(&token),
            1,
            "the inline future was dropped"
        );
        assert_eq!(c.load(Ordering::SeqCst), 0, "the count was released");
    }
}
