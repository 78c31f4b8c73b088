//! [`IoFuture`]: the future of one I/O request, type-erased without a heap allocation.
//!
//! `#[async_trait]` methods box their future, one allocation per call and per layer. The
//! data-path methods of [`crate::BlockDevice`] (`read_io`, `write_io`) return an `IoFuture`
//! instead: a request that completed at once (malloc, null) carries its result, a small
//! future sits in a small inline area, and any other (an io_uring request's, a stacked
//! device's that nests the `IoFuture` of the layer below) goes to a block of a per-thread
//! pool of [`POOL_BLOCK`]-byte blocks (SPDK's per-thread `bdev_io` cache), with a pair of
//! function pointers to poll and drop it. Blocks are allocated once and recycled, so steady
//! state allocates nothing whatever the depth of the stack. Only a future larger than a block
//! is boxed; [`IoFuture::allocates`] tells which.
//!
//! The inline area is small on purpose: an `IoFuture` is returned by value through every
//! layer and moved into its caller's future, and with 512 inline bytes those moves cost more
//! than taking and giving back a pooled block (`bench`, 4 KiB random QD32 over a 64 MiB
//! malloc bdev, medians of 4 alternating rounds of 3 s: reads 1,035k against 988k IOPS,
//! writes 946k against 881k).

use std::future::Future;
use std::marker::{PhantomData, PhantomPinned};
use std::mem::{align_of, size_of, MaybeUninit};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;

use crate::stats::{IoKind, IoStats};

/// Bytes of inline storage of an [`IoFuture`] (see the module documentation).
pub const INLINE_BYTES: usize = 64;
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

/// Descriptors that record one request in place (`add_layer`); a request crossing more is
/// wrapped in a pooled block.
const LAYERS: usize = 2;
/// Guards kept in place until a request ends ([`IoFuture::keep`]); more are wrapped.
const HOLDS: usize = 2;
/// Words of one guard kept in place.
const HOLD_WORDS: usize = 2;

/// The future of one I/O request (see the module documentation). `Send`; pinned before its
/// first poll like any future.
///
/// A stacked device may return the request future of the device below as its own, with
/// the guards it must keep until the request ends ([`IoFuture::keep`]) and the mapping of
/// its result ([`IoFuture::map_with`]); each descriptor the request crosses adds a layer
/// of accounting. None of these nests a future, and the clock is read twice per request
/// however many descriptors count it.
pub struct IoFuture<'a, T> {
    kind: Kind<'a, T>,
    /// Descriptors recording the request, innermost first.
    layers: [Option<Layer<'a>>; LAYERS],
    /// Tick at which the innermost layer started timing the request ([`UNSET`] before).
    start: u64,
    /// Tick at which the request was seen complete, once a layer recorded it ([`UNSET`]
    /// before). Plain ticks with a sentinel: every byte of an `IoFuture` is copied each time
    /// a layer returns it.
    end: u64,
    /// Whether a result counts as a success (set with the first layer).
    ok: Option<fn(&T) -> bool>,
    /// Applied to the result before the layers see it.
    post: Option<fn(T) -> T>,
    /// Guards dropped once the request's future and its layers are done.
    holds: [Option<Hold<'a>>; HOLDS],
    /// Sees the result first and may replace the request ([`IoFuture::recover_with`]).
    recover: Option<Recover<'a, T>>,
    _pin: PhantomPinned,
}

/// Words of context a [`Recover`] keeps in place.
const RECOVER_WORDS: usize = 3;

/// What a recovery decides: the result to complete with, or the request to wait for
/// instead.
pub type Recovered<'a, T> = Result<T, IoFuture<'a, T>>;

/// A recovery (`IoFuture::recover_with`): its context, type-erased, and the function that
/// takes it with the result.
struct Recover<'a, T> {
    ctx: [MaybeUninit<usize>; RECOVER_WORDS],
    /// Calls `f` with the context read back as its own type; a request to wait for instead
    /// comes back as the future to poll ([`IoFuture::into_kind`]).
    call: RecoverCall<'a, T>,
    /// The caller's `fn(C, T) -> Recovered<T>`, erased.
    f: *const (),
    /// Layers and guards that were there when it was set: the failed request's own.
    layers: u8,
    holds: u8,
}

/// [`call_recover`] instantiated for a recovery's context type.
type RecoverCall<'a, T> =
    unsafe fn(&[MaybeUninit<usize>; RECOVER_WORDS], *const (), T) -> Result<T, Kind<'a, T>>;

/// Calls the `fn(C, T)` erased in `f` with the `C` stored in `ctx`.
///
/// # Safety
/// `ctx` holds a `C` and `f` is a `fn(C, T) -> Recovered<'a, T>`, as `recover_with` wrote them.
unsafe fn call_recover<'a, C: Copy, T: Send + 'a>(
    ctx: &[MaybeUninit<usize>; RECOVER_WORDS],
    f: *const (),
    v: T,
) -> Result<T, Kind<'a, T>> {
    // SAFETY: as the caller guarantees; `C: Copy`, so reading it leaves nothing to drop.
    let out = unsafe {
        let c = std::ptr::read(ctx.as_ptr() as *const C);
        let f: fn(C, T) -> Recovered<'a, T> = std::mem::transmute(f);
        f(c, v)
    };
    out.map_err(IoFuture::into_kind)
}

/// A tick not taken yet (`IoFuture::start`, `IoFuture::end`).
const UNSET: u64 = u64::MAX;

/// One descriptor's accounting of a request: its statistics, and the kind and size of the
/// request packed in one word (two words in all: the `IoFuture` is copied by value).
struct Layer<'a> {
    stats: &'a IoStats,
    /// `bytes << 8 | kind`.
    packed: u64,
}

impl<'a> Layer<'a> {
    fn new(stats: &'a IoStats, kind: IoKind, bytes: u64) -> Self {
        // A request's size fits 56 bits (a descriptor checks it against the device size,
        // itself a block count times a 32-bit block length).
        Layer {
            stats,
            packed: (bytes.min(u64::MAX >> 8) << 8) | kind as u64,
        }
    }
    fn kind(&self) -> IoKind {
        IoKind::ALL[(self.packed & 0xff) as usize]
    }
    fn bytes(&self) -> u64 {
        self.packed >> 8
    }
}

/// A type-erased guard of at most [`HOLD_WORDS`] words, dropped in place.
struct Hold<'a> {
    data: [MaybeUninit<usize>; HOLD_WORDS],
    drop: unsafe fn(*mut u8),
    _life: PhantomData<&'a ()>,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        // SAFETY: `data` holds the guard written by `IoFuture::keep`, dropped only here.
        unsafe { (self.drop)(self.data.as_mut_ptr().cast()) }
    }
}

/// A request future and a guard that could not be kept in place: the future is dropped
/// first (fields drop in declaration order), then the guard.
struct Held<F, H> {
    fut: F,
    _hold: H,
}

impl<F: Future, H> Future for Held<F, H> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `fut` is structurally pinned: it is never moved out of the pinned `Held`.
        unsafe { self.map_unchecked_mut(|h| &mut h.fut) }.poll(cx)
    }
}

// SAFETY: every constructor takes a `Send` future (or value); the raw storage only ever holds
// such a future, and a hold only ever a `Send` guard ([`IoFuture::keep`] requires it), so
// moving the `IoFuture` to another thread moves `Send` values.
unsafe impl<T: Send> Send for IoFuture<'_, T> {}

impl<'a, T> IoFuture<'a, T> {
    /// An `IoFuture` of `kind` with nothing attached.
    fn of(kind: Kind<'a, T>) -> Self {
        IoFuture {
            kind,
            layers: [const { None }; LAYERS],
            start: UNSET,
            end: UNSET,
            ok: None,
            post: None,
            holds: [const { None }; HOLDS],
            recover: None,
            _pin: PhantomPinned,
        }
    }

    /// Stores `fut` inline if it fits, else in a pooled block (or a box if it is larger).
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
            return Self::of(Kind::Pooled(Pooled {
                block,
                poll: poll_fn::<F>,
                drop: drop_fn::<F>,
                _life: PhantomData,
            }));
        }
        let mut data = Storage([MaybeUninit::uninit(); INLINE_BYTES]);
        // SAFETY: the storage is large and aligned enough for `F` (checked above); it is
        // written once here and read only through `poll_fn::<F>` / `drop_fn::<F>`.
        unsafe { std::ptr::write(data.0.as_mut_ptr() as *mut F, fut) };
        Self::of(Kind::Inline(Inline {
            data,
            poll: poll_fn::<F>,
            drop: drop_fn::<F>,
            live: true,
            _life: PhantomData,
        }))
    }

    /// An already boxed future (what an `#[async_trait]` method returns).
    pub fn boxed(fut: BoxFuture<'a, T>) -> Self {
        Self::of(Kind::Boxed(fut))
    }

    /// A request that is already complete.
    pub fn ready(v: T) -> Self {
        Self::of(Kind::Ready(Some(v)))
    }

    /// Whether the request's future is on the heap in a block of its own (a future larger
    /// than a pool block, or an `#[async_trait]` method's).
    pub fn allocates(&self) -> bool {
        matches!(self.kind, Kind::Boxed(_))
    }

    /// Whether the request's future sits in a pooled block (a future too large to keep
    /// inline, such as one that nests another request's).
    pub fn is_pooled(&self) -> bool {
        matches!(self.kind, Kind::Pooled(_))
    }

    /// Whether the request already completed (its result waits to be taken).
    fn is_done(&self) -> bool {
        matches!(self.kind, Kind::Ready(Some(_)))
    }

    /// Keeps `guard` until the request ends (dropped after the request's future and after
    /// the descriptors recorded it), or drops it now if the request is already complete. A
    /// guard of up to two words is kept in place; a larger one, or one too many, nests the
    /// request in a pooled block.
    pub fn keep<H: Send + 'a>(&mut self, guard: H)
    where
        T: Send + 'a,
    {
        if self.is_done() {
            return;
        }
        let fits = size_of::<H>() <= size_of::<[usize; HOLD_WORDS]>()
            && align_of::<H>() <= align_of::<usize>();
        match self.holds.iter_mut().find(|h| h.is_none()) {
            Some(slot) if fits => {
                let mut data = [MaybeUninit::<usize>::uninit(); HOLD_WORDS];
                // SAFETY: `data` is large and aligned enough for `H` (checked above); it is
                // dropped once, through `drop_fn::<H>`, by the `Hold`.
                unsafe { std::ptr::write(data.as_mut_ptr() as *mut H, guard) };
                *slot = Some(Hold {
                    data,
                    drop: drop_fn::<H>,
                    _life: PhantomData,
                });
            }
            _ => {
                let fut = self.take();
                *self = IoFuture::new(Held { fut, _hold: guard });
            }
        }
    }

    /// Applies `f` to the request's result when it completes (before the descriptors'
    /// statistics see it), or now if it already did.
    pub fn map_with(&mut self, f: fn(T) -> T)
    where
        T: Send + 'a,
    {
        if let Kind::Ready(v @ Some(_)) = &mut self.kind {
            *v = v.take().map(f);
        } else if self.post.is_none() && self.recover.is_none() {
            // (With a recovery set, a later mapping must see its result: nested below.)
            self.post = Some(f);
        } else {
            let fut = self.take();
            *self = IoFuture::new(async move { f(fut.await) });
        }
    }

    /// Hands the request's result to `f` with `ctx` when it completes (after
    /// [`IoFuture::map_with`]): `f` returns the result to complete with, or a request to
    /// wait for instead (a retry). In the second case the failed request is ended first, as
    /// if it had completed: the layers and guards attached so far (its own) record its
    /// result and are dropped, so the new request runs without them; the layers and guards
    /// attached later (the callers') stay, and time the request from its first start. A
    /// request already complete is handed over now. `ctx` is kept in place (at most three
    /// words); one recovery per request.
    pub fn recover_with<C>(&mut self, ctx: C, f: fn(C, T) -> Recovered<'a, T>)
    where
        C: Copy + Send + 'a,
        T: Send + 'a,
    {
        const { assert!(size_of::<C>() <= size_of::<[usize; RECOVER_WORDS]>()) };
        const { assert!(align_of::<C>() <= align_of::<usize>()) };
        assert!(self.recover.is_none(), "one recovery per request");
        if let Kind::Ready(slot @ Some(_)) = &mut self.kind {
            // Taken and put back in place: replacing the whole `Kind` would drop it.
            let v = slot.take().expect("checked above");
            match f(ctx, v) {
                Ok(v) => *slot = Some(v),
                Err(next) => {
                    // Its layers were recorded at once (it was complete); the new request
                    // is timed again from now.
                    self.holds = [const { None }; HOLDS];
                    self.end = UNSET;
                    if self.start != UNSET {
                        self.start = crate::stats::now();
                    }
                    self.kind = next.into_kind();
                }
            }
            return;
        }
        let mut data = [MaybeUninit::<usize>::uninit(); RECOVER_WORDS];
        // SAFETY: `data` is large and aligned enough for `C` (checked above); `C: Copy`.
        unsafe { std::ptr::write(data.as_mut_ptr() as *mut C, ctx) };
        self.recover = Some(Recover {
            ctx: data,
            call: call_recover::<C, T>,
            f: f as *const (),
            // Slots fill from the first: the count is the first empty one.
            layers: self.layers.iter().take_while(|l| l.is_some()).count() as u8,
            holds: self.holds.iter().take_while(|h| h.is_some()).count() as u8,
        });
    }

    /// The future to poll for this request in another's place: its own when nothing is
    /// attached to it, else the request nested whole.
    fn into_kind(mut self) -> Kind<'a, T>
    where
        T: Send + 'a,
    {
        let plain = self.layers[0].is_none()
            && self.holds.iter().all(|h| h.is_none())
            && self.post.is_none()
            && self.recover.is_none();
        let mut nested;
        let from = if plain {
            &mut self
        } else {
            nested = IoFuture::new(self);
            &mut nested
        };
        // What is left has nothing attached, so dropping it does nothing.
        std::mem::replace(&mut from.kind, Kind::Ready(None))
    }

    /// Ends the failed request in favour of `next` (see [`IoFuture::recover_with`]): records
    /// and drops the layers and guards the recovery found, keeps the later ones.
    fn switch(&mut self, failed_ok: Option<bool>, next: Kind<'a, T>, layers: u8, holds: u8) {
        self.kind = Kind::Ready(None);
        let (layers, holds) = (usize::from(layers), usize::from(holds));
        if layers > 0 {
            let end = crate::stats::now();
            let ticks = if self.start == UNSET {
                0
            } else {
                end.saturating_sub(self.start)
            };
            for l in self.layers[..layers].iter_mut() {
                if let (Some(l), Some(ok)) = (l.take(), failed_ok) {
                    l.stats.record_ticks(l.kind(), l.bytes(), ticks, ok);
                }
            }
            self.layers.rotate_left(layers);
        }
        for h in self.holds[..holds].iter_mut() {
            *h = None;
        }
        self.holds.rotate_left(holds);
        self.kind = next;
    }

    /// Moves the request out, leaving an empty one (never polled) in its place. Sound
    /// because `&mut self` of an `IoFuture` means it was not pinned yet.
    fn take(&mut self) -> Self {
        std::mem::replace(self, Self::of(Kind::Ready(None)))
    }

    /// Ends the request: its future first (it may still use the device), then the layers
    /// (recording `out` in their statistics when the request completed), then the guards.
    #[inline]
    fn finish(&mut self, out: Option<&T>) {
        // (Already empty once completed: then there is nothing to drop, and no call.)
        if !matches!(self.kind, Kind::Ready(None)) {
            self.kind = Kind::Ready(None);
        }
        if self.layers[0].is_none() {
            if self.holds[0].is_some() {
                self.holds = [const { None }; HOLDS];
            }
            return;
        }
        let end = match (out, self.end) {
            (Some(_), UNSET) => crate::stats::now(),
            (_, end) => end,
        };
        let ticks = if end == UNSET || self.start == UNSET {
            0
        } else {
            end.saturating_sub(self.start)
        };
        for l in self.layers.iter_mut() {
            let Some(l) = l.take() else { break };
            if let (Some(v), Some(ok)) = (out, self.ok) {
                l.stats.record_ticks(l.kind(), l.bytes(), ticks, ok(v));
            }
        }
        self.holds = [const { None }; HOLDS];
    }
}

impl<'a, X: Send + 'a> IoFuture<'a, crate::Result<X>> {
    /// Records the request in `stats` (kind, bytes, latency, success) when it completes; a
    /// request dropped before completion is not recorded. The latency runs from the
    /// innermost layer's start; a request already complete is recorded at once.
    pub(crate) fn add_layer(&mut self, stats: &'a IoStats, kind: IoKind, bytes: u64) {
        if self.start == UNSET {
            self.start = crate::stats::now();
        }
        let start = self.start;
        self.ok = Some(|r| r.is_ok());
        if let Kind::Ready(Some(v)) = &self.kind {
            if self.end == UNSET {
                self.end = crate::stats::now();
            }
            let end = self.end;
            stats.record_ticks(kind, bytes, end.saturating_sub(start), v.is_ok());
            return;
        }
        let layer = Layer::new(stats, kind, bytes);
        match self.layers.iter_mut().find(|l| l.is_none()) {
            Some(slot) => *slot = Some(layer),
            None => {
                let inner = self.take();
                *self = IoFuture::new(inner);
                self.start = start;
                self.ok = Some(|r| r.is_ok());
                self.layers[0] = Some(layer);
            }
        }
    }
}

impl<T> Drop for IoFuture<'_, T> {
    fn drop(&mut self) {
        // The request's own future first (it may still hold the device), then the guards.
        self.finish(None);
    }
}

impl<T> Future for IoFuture<'_, T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // SAFETY: nothing is moved out of the pinned value: the inline future is polled in
        // place, the box and the ready value are not structurally pinned.
        let this = unsafe { self.get_unchecked_mut() };
        loop {
            let out = this.poll_kind(cx);
            match out {
                Poll::Ready(mut v) => {
                    if let Some(f) = this.post.take() {
                        v = f(v);
                    }
                    if let Some(r) = this.recover.take() {
                        let ok = this.ok.map(|ok| ok(&v));
                        // SAFETY: `call` and `f` were written together by `recover_with`.
                        match unsafe { (r.call)(&r.ctx, r.f, v) } {
                            Ok(w) => v = w,
                            Err(next) => {
                                this.switch(ok, next, r.layers, r.holds);
                                continue;
                            }
                        }
                    }
                    this.finish(Some(&v));
                    return Poll::Ready(v);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<T> IoFuture<'_, T> {
    /// Polls the request's own future.
    #[inline(always)]
    fn poll_kind(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        match &mut self.kind {
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
        }
    }
}

#[cfg(test)]
// A recovery's `Err` is a whole request, by design.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

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

    type Log = Arc<Mutex<Vec<&'static str>>>;

    /// A guard (one word) that logs its drop.
    struct Logged(Box<(&'static str, Log)>);
    impl Drop for Logged {
        fn drop(&mut self) {
            self.0 .1.lock().unwrap().push(self.0 .0);
        }
    }
    fn logged(name: &'static str, log: &Log) -> Logged {
        Logged(Box::new((name, log.clone())))
    }

    /// A request that completes on its second poll with `r`, logging its own drop.
    fn pending_once(r: crate::Result<u32>, log: &Log) -> IoFuture<'static, crate::Result<u32>> {
        let me = logged("future", log);
        IoFuture::new(async move {
            let _me = me;
            let mut first = true;
            futures::future::poll_fn(|cx| {
                if std::mem::take(&mut first) {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            r
        })
    }

    fn eio() -> crate::BdevError {
        crate::BdevError::Io(std::io::Error::from_raw_os_error(libc::EIO))
    }

    #[test]
    fn dropping_unfinished_drops_the_future_then_the_guards_and_records_nothing() {
        let log = Log::default();
        let (s1, s2) = (IoStats::new(), IoStats::new());
        let mut f = pending_once(Ok(1), &log);
        f.add_layer(&s1, IoKind::Read, 512);
        f.keep(logged("guard", &log));
        f.add_layer(&s2, IoKind::Read, 512);
        let mut f = Box::pin(f);
        assert!(futures::FutureExt::now_or_never(&mut f).is_none());
        drop(f);
        assert_eq!(*log.lock().unwrap(), ["future", "guard"]);
        assert_eq!(
            (s1.get().read.ops, s2.get().read.ops, s1.get().failed),
            (0, 0, 0)
        );
    }

    #[test]
    fn completion_maps_the_result_records_every_layer_once_and_drops_the_guard_last() {
        for (result, ok) in [(Ok(7), true), (Err(eio()), false)] {
            let log = Log::default();
            let (s1, s2) = (IoStats::new(), IoStats::new());
            let mut f = pending_once(result, &log);
            f.add_layer(&s1, IoKind::Write, 4096);
            f.keep(logged("guard", &log));
            f.map_with(|r| r.map(|v| v * 10));
            f.add_layer(&s2, IoKind::Write, 4096);
            assert!(!f.is_pooled(), "two layers and a guard stay in place");
            let out = futures::executor::block_on(f);
            assert_eq!(out.as_ref().ok(), ok.then_some(&70));
            assert_eq!(*log.lock().unwrap(), ["future", "guard"]);
            let (a, b) = (s1.get(), s2.get());
            if ok {
                assert_eq!((a.write.ops, a.write.bytes, b.write.ops), (1, 4096, 1));
                assert_eq!(a.write.latency_ticks, b.write.latency_ticks, "one clock");
            } else {
                assert_eq!((a.failed, b.failed, a.write.ops), (1, 1, 0));
            }
        }
    }

    #[test]
    fn a_complete_request_is_recorded_and_released_at_once() {
        let log = Log::default();
        let s = IoStats::new();
        let mut f = IoFuture::ready(Ok::<u32, crate::BdevError>(3));
        f.add_layer(&s, IoKind::Read, 512);
        assert_eq!(s.get().read.ops, 1);
        f.keep(logged("guard", &log));
        assert_eq!(*log.lock().unwrap(), ["guard"], "nothing left to guard");
        f.map_with(|r| r.map(|v| v + 1));
        assert_eq!(futures::executor::block_on(f).unwrap(), 4);
        assert_eq!(s.get().read.ops, 1, "recorded once");
    }

    #[test]
    fn one_layer_or_guard_too_many_nests_the_request_and_still_counts() {
        let log = Log::default();
        let ss = [IoStats::new(), IoStats::new(), IoStats::new()];
        let mut f = pending_once(Ok(1), &log);
        for s in &ss {
            f.add_layer(s, IoKind::Read, 512);
        }
        assert!(f.is_pooled(), "a third layer nests");
        f.keep(logged("g1", &log));
        f.keep(logged("g2", &log));
        f.keep((logged("big", &log), [0u64; 4]));
        f.map_with(|r| r.map(|v| v + 1));
        f.map_with(|r| r.map(|v| v * 2));
        assert_eq!(futures::executor::block_on(f).unwrap(), 4);
        let l = log.lock().unwrap().clone();
        assert_eq!(l[0], "future");
        assert_eq!(l.len(), 4, "{l:?}");
        assert!(l.iter().position(|&x| x == "big") > l.iter().position(|&x| x == "g2"));
        for s in &ss {
            assert_eq!(s.get().read.ops, 1);
        }
    }

    /// The recovery the tests set: a failure becomes `next` (logged), a success passes.
    fn retry_into<'a>(
        log: &'static Log,
        r: crate::Result<u32>,
    ) -> Recovered<'a, crate::Result<u32>> {
        match r {
            Ok(v) => Ok(Ok(v + 100)),
            Err(_) => {
                log.lock().unwrap().push("retry built");
                Err(IoFuture::new(async move {
                    log.lock().unwrap().push("retry ran");
                    Ok(9)
                }))
            }
        }
    }

    #[test]
    fn a_recovery_ends_the_failed_request_and_keeps_the_callers_layers_and_guards() {
        static LOG: std::sync::LazyLock<Log> = std::sync::LazyLock::new(Log::default);
        for fail in [true, false] {
            LOG.lock().unwrap().clear();
            let log: &Log = &LOG;
            let (inner, outer) = (IoStats::new(), IoStats::new());
            let mut f = pending_once(if fail { Err(eio()) } else { Ok(1) }, log);
            f.add_layer(&inner, IoKind::Read, 512);
            f.keep(logged("inner guard", log));
            f.recover_with(&*LOG, |l, r| {
                let out = retry_into(l, r);
                l.lock().unwrap().push("recovered");
                out
            });
            f.add_layer(&outer, IoKind::Read, 512);
            f.keep(logged("outer guard", log));
            assert!(!f.is_pooled());
            let out = futures::executor::block_on(f).unwrap();
            let (i, o) = (inner.get(), outer.get());
            assert_eq!(
                (o.read.ops, o.failed),
                (1, 0),
                "the caller sees one success"
            );
            if fail {
                assert_eq!(out, 9);
                assert_eq!((i.read.ops, i.failed), (0, 1), "the failed request counted");
                // The failed request's future (done with its result) and guard went before
                // the retry ran; the caller's guard last.
                assert_eq!(
                    *LOG.lock().unwrap(),
                    [
                        "future",
                        "retry built",
                        "recovered",
                        "inner guard",
                        "retry ran",
                        "outer guard"
                    ]
                );
            } else {
                assert_eq!(out, 101);
                assert_eq!((i.read.ops, i.failed), (1, 0));
                assert_eq!(
                    *LOG.lock().unwrap(),
                    ["future", "recovered", "inner guard", "outer guard"]
                );
            }
        }
    }

    #[test]
    fn a_recovery_of_a_complete_request_runs_at_once_and_later_mappings_see_its_result() {
        static LOG: std::sync::LazyLock<Log> = std::sync::LazyLock::new(Log::default);
        let (s, outer) = (IoStats::new(), IoStats::new());
        let mut f = IoFuture::ready(Err::<u32, _>(eio()));
        f.add_layer(&s, IoKind::Read, 512);
        f.recover_with(&*LOG, retry_into);
        assert_eq!(*LOG.lock().unwrap(), ["retry built"]);
        assert_eq!(s.get().failed, 1);
        f.add_layer(&outer, IoKind::Read, 512);
        f.map_with(|r| r.map(|v| v * 2));
        assert_eq!(futures::executor::block_on(f).unwrap(), 18);
        assert_eq!((outer.get().read.ops, s.get().read.ops), (1, 0));

        // A pending request: the mapping set after the recovery sees the recovered value.
        let log = Log::default();
        let mut f = pending_once(Ok(1), &log);
        f.recover_with(&*LOG, retry_into);
        f.map_with(|r| r.map(|v| v * 2));
        assert_eq!(futures::executor::block_on(f).unwrap(), 202);
    }

    /// The retry request of [`a_retry_with_its_own_layer_and_guard_is_nested_whole`]: a
    /// request of another descriptor (its own layer and guard), completing with `ok`.
    static RETRY: std::sync::LazyLock<(IoStats, Log)> =
        std::sync::LazyLock::new(|| (IoStats::new(), Log::default()));

    fn retry_with_layer(ok: bool, r: crate::Result<u32>) -> Recovered<'static, crate::Result<u32>> {
        match r {
            Ok(v) => Ok(Ok(v)),
            Err(_) => {
                let (stats, log) = &*RETRY;
                let mut next = pending_once(if ok { Ok(9) } else { Err(eio()) }, log);
                next.add_layer(stats, IoKind::Read, 4096);
                next.keep(logged("retry guard", log));
                Err(next)
            }
        }
    }

    #[test]
    fn a_retry_with_its_own_layer_and_guard_is_nested_whole() {
        for retry_ok in [true, false] {
            let (retry_stats, log) = &*RETRY;
            retry_stats.reset(crate::stats::ResetMode::All);
            log.lock().unwrap().clear();
            let (inner, outer) = (IoStats::new(), IoStats::new());
            let mut f = pending_once(Err(eio()), log);
            f.add_layer(&inner, IoKind::Read, 4096);
            f.keep(logged("inner guard", log));
            f.recover_with(retry_ok, retry_with_layer);
            f.add_layer(&outer, IoKind::Read, 4096);
            f.keep(logged("outer guard", log));
            let out = futures::executor::block_on(f);
            assert_eq!(out.is_ok(), retry_ok);
            let (i, r, o) = (inner.get(), retry_stats.get(), outer.get());
            assert_eq!((i.read.ops, i.failed), (0, 1), "the failed request");
            let once = if retry_ok { (1, 0) } else { (0, 1) };
            assert_eq!((r.read.ops, r.failed), once, "the retry's own descriptor");
            assert_eq!(
                (o.read.ops, o.failed),
                once,
                "the caller: the final result, once"
            );
            // The first request's future and guard end before the retry runs; the retry's
            // own guard when it ends; the caller's last.
            assert_eq!(
                *log.lock().unwrap(),
                [
                    "future",
                    "inner guard",
                    "future",
                    "retry guard",
                    "outer guard"
                ]
            );
        }
    }

    #[test]
    fn an_io_future_stays_within_eight_avx_vectors() {
        // Each layer returns the request by value: up to 256 bytes, glibc's memcpy copies it
        // without a loop (measured: 29 instructions a copy, 64 at 288 bytes).
        assert!(size_of::<IoFuture<crate::Result<crate::IoBuf>>>() <= 256);
        let s = IoStats::new();
        let l = Layer::new(&s, IoKind::WriteZeroes, 1 << 40);
        assert_eq!((l.kind(), l.bytes()), (IoKind::WriteZeroes, 1 << 40));
    }
}
