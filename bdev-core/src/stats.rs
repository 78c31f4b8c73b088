//! Per-device I/O statistics and latency histograms, as SPDK's `bdev_get_iostat` and
//! `bdev_get_histogram` report them.
//!
//! Every I/O that goes through a [`crate::Descriptor`] is timed and counted here. The counters
//! are striped, each stripe on cache lines of its own. A thread leases a stripe index (its
//! slot of crate `thread-slot`) the first time it records and returns it when it exits, so
//! at any moment each of the first `stripes - 1` stripes (of every device) has at most one
//! writing thread: like SPDK's per-channel counters, its byte, op and latency sums are
//! updated with a plain load and store, no locked instruction. Threads beyond those share
//! the last stripe, which is updated with atomic adds. Min and max use
//! `fetch_min`/`fetch_max` when a new extreme is seen, errors and histogram buckets atomic
//! adds: no lock on the data path. Reading sums the stripes, as SPDK sums its per-channel
//! counters. A reader never writes a sum a single writer owns: a reset of the sums records
//! the values read as the stripe's base, which later reads subtract (the rarer error count
//! and extremes are swapped with zero).
//! Recording allocates nothing.
//!
//! Latencies are in ticks of [`TICK_RATE`] per second: nanoseconds, read from the CPU's
//! invariant time-stamp counter calibrated against the monotonic clock (see [`now`]).

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Ticks per second of [`now`] (`tick_rate` of `bdev_get_iostat`).
pub const TICK_RATE: u64 = 1_000_000_000;

/// SPDK's default histogram granularity (`SPDK_HISTOGRAM_GRANULARITY_DEFAULT`).
pub const DEFAULT_GRANULARITY: u32 = 7;
/// Largest accepted granularity: 2^15 buckets per range keeps a histogram under a few MiB.
pub const MAX_GRANULARITY: u32 = 15;

/// The process's clock and its reading at the first call. The clock reads the CPU's
/// time-stamp counter where it is invariant (one `rdtsc` and a multiply, about a third of
/// the cost of `clock_gettime`, which an I/O through two layers pays four times), calibrated
/// against the monotonic clock at creation; elsewhere `quanta` falls back to the monotonic
/// clock itself.
fn clock() -> &'static (quanta::Clock, u64) {
    static CLOCK: OnceLock<(quanta::Clock, u64)> = OnceLock::new();
    CLOCK.get_or_init(|| {
        let c = quanta::Clock::new();
        let base = c.raw();
        (c, base)
    })
}

/// The current tick (nanoseconds since the first call in this process).
#[inline]
pub fn now() -> u64 {
    let (c, base) = clock();
    // Saturating: a counter read on another core may lag the base by a few ticks.
    c.delta_as_nanos(0, c.raw().saturating_sub(*base))
}

/// What an I/O counts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// Read (counted in bytes, ops and latency).
    Read,
    /// Write.
    Write,
    /// Unmap.
    Unmap,
    /// Flush (histogram only, as SPDK).
    Flush,
    /// Reset (histogram only).
    Reset,
    /// Write zeroes (histogram only).
    WriteZeroes,
}

impl IoKind {
    /// SPDK's I/O type name (the `opc` of `bdev_enable_histogram`).
    pub fn spdk_name(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Unmap => "unmap",
            IoKind::Flush => "flush",
            IoKind::Reset => "reset",
            IoKind::WriteZeroes => "write_zeroes",
        }
    }

    /// Every kind, in declaration order (`kind as usize` indexes it).
    pub(crate) const ALL: [IoKind; 6] = [
        IoKind::Read,
        IoKind::Write,
        IoKind::Unmap,
        IoKind::Flush,
        IoKind::Reset,
        IoKind::WriteZeroes,
    ];

    /// The kind named `name` (SPDK's names).
    pub fn from_spdk_name(name: &str) -> Option<IoKind> {
        Self::ALL.into_iter().find(|k| k.spdk_name() == name)
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }
}

/// Byte, op and latency counters of one I/O type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpCounters {
    /// Bytes moved by successful I/O.
    pub bytes: u64,
    /// Successful I/O count.
    pub ops: u64,
    /// Sum of their latencies in ticks.
    pub latency_ticks: u64,
    /// Largest latency (0 when none).
    pub max_latency_ticks: u64,
    /// Smallest latency (`u64::MAX` when none; reported as 0).
    pub min_latency_ticks: u64,
}

impl Default for OpCounters {
    fn default() -> Self {
        OpCounters {
            bytes: 0,
            ops: 0,
            latency_ticks: 0,
            max_latency_ticks: 0,
            min_latency_ticks: u64::MAX,
        }
    }
}

impl OpCounters {
    fn merge(&mut self, o: &OpCounters) {
        self.bytes = self.bytes.wrapping_add(o.bytes);
        self.ops = self.ops.wrapping_add(o.ops);
        self.latency_ticks = self.latency_ticks.wrapping_add(o.latency_ticks);
        self.max_latency_ticks = self.max_latency_ticks.max(o.max_latency_ticks);
        self.min_latency_ticks = self.min_latency_ticks.min(o.min_latency_ticks);
    }

    /// The smallest latency as SPDK prints it (0 when there was none).
    pub fn min_reported(&self) -> u64 {
        if self.min_latency_ticks == u64::MAX {
            0
        } else {
            self.min_latency_ticks
        }
    }
}

/// A device's counters (SPDK's `struct spdk_bdev_io_stat`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStat {
    /// Reads.
    pub read: OpCounters,
    /// Writes.
    pub write: OpCounters,
    /// Unmaps.
    pub unmap: OpCounters,
    /// Failed I/O of any type (SPDK's `io_error` `"failed"` status).
    pub failed: u64,
}

impl IoStat {
    /// These counters less the byte, op and latency sums of `base` (taken earlier from the
    /// same stripe); the extremes and the error count are this read's.
    fn since(mut self, base: &IoStat) -> IoStat {
        for (c, b) in [
            (&mut self.read, &base.read),
            (&mut self.write, &base.write),
            (&mut self.unmap, &base.unmap),
        ] {
            c.bytes = c.bytes.wrapping_sub(b.bytes);
            c.ops = c.ops.wrapping_sub(b.ops);
            c.latency_ticks = c.latency_ticks.wrapping_sub(b.latency_ticks);
        }
        self
    }

    fn merge(&mut self, o: &IoStat) {
        self.read.merge(&o.read);
        self.write.merge(&o.write);
        self.unmap.merge(&o.unmap);
        self.failed = self.failed.wrapping_add(o.failed);
    }
}

/// What a reset clears (SPDK's `spdk_bdev_reset_stat_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetMode {
    /// Everything.
    All,
    /// Only the max and min latencies.
    MaxMin,
    /// Only the error counts.
    Error,
    /// Nothing.
    None,
}

impl ResetMode {
    /// Parses SPDK's name (`all`, `maxmin`, `error`, `none`).
    pub fn from_spdk_name(s: &str) -> Option<ResetMode> {
        Some(match s {
            "all" => ResetMode::All,
            "maxmin" => ResetMode::MaxMin,
            "error" => ResetMode::Error,
            "none" => ResetMode::None,
            _ => return None,
        })
    }
}

/// A latency histogram in SPDK's layout (`struct spdk_histogram_data`): `2^granularity`
/// buckets for each power-of-two range from `min_range` to `max_range`, counts in ticks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    granularity: u32,
    min_range: u32,
    max_range: u32,
    buckets: Vec<u64>,
    /// Sum of the tallied values (not part of SPDK's encoding; the metrics endpoint's `_sum`).
    sum: u64,
}

/// A histogram setting that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HistogramError {
    /// Granularity above [`MAX_GRANULARITY`].
    #[error("granularity {0} is above {MAX_GRANULARITY}")]
    Granularity(u32),
    /// `min >= max`.
    #[error("min_nsec must be below max_nsec")]
    Range,
}

impl Histogram {
    /// SPDK's `spdk_histogram_data_alloc_sized_ext(granularity, min_val, max_val)`.
    pub fn new(granularity: u32, min_val: u64, max_val: u64) -> Result<Self, HistogramError> {
        if granularity > MAX_GRANULARITY {
            return Err(HistogramError::Granularity(granularity));
        }
        if min_val >= max_val {
            return Err(HistogramError::Range);
        }
        let min_range = range_of(granularity, min_val);
        let max_range = range_of(granularity, max_val - 1);
        let n = ((max_range - min_range + 1) as usize) << granularity;
        Ok(Histogram {
            granularity,
            min_range,
            max_range,
            buckets: vec![0; n],
            sum: 0,
        })
    }

    /// Granularity (log2 of the buckets per range).
    pub fn granularity(&self) -> u32 {
        self.granularity
    }
    /// First range.
    pub fn min_range(&self) -> u32 {
        self.min_range
    }
    /// Last range.
    pub fn max_range(&self) -> u32 {
        self.max_range
    }
    /// The bucket counts, range by range.
    pub fn buckets(&self) -> &[u64] {
        &self.buckets
    }
    /// Sum of the tallied values.
    pub fn sum(&self) -> u64 {
        self.sum
    }
    /// Sum of every bucket.
    pub fn total(&self) -> u64 {
        self.buckets.iter().fold(0u64, |a, &b| a.wrapping_add(b))
    }

    /// SPDK's `spdk_histogram_data_tally`.
    #[inline]
    pub fn tally(&mut self, datapoint: u64) {
        self.sum = self.sum.wrapping_add(datapoint);
        let i = bucket_index(self.granularity, self.min_range, self.max_range, datapoint);
        if let Some(b) = self.buckets.get_mut(i) {
            *b = b.wrapping_add(1);
        }
    }

    /// The buckets as SPDK sends them: the `uint64_t` array's bytes (little-endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buckets.len() * 8);
        for b in &self.buckets {
            out.extend_from_slice(&b.to_le_bytes());
        }
        out
    }

    /// The first value of the bucket after `(range, index)` (SPDK's
    /// `__spdk_histogram_data_get_bucket_start`): the bucket holds values below it.
    pub fn bucket_end(&self, range: u32, index: u32) -> u64 {
        let index = index as u64 + 1;
        if range > 0 {
            (1u64 << (range + self.granularity - 1)).wrapping_add(index << (range - 1))
        } else {
            index
        }
    }

    /// Calls `f(start, end, count)` for every bucket in order (SPDK's
    /// `spdk_histogram_data_iterate`).
    pub fn iterate(&self, mut f: impl FnMut(u64, u64, u64)) {
        let per = 1u32 << self.granularity;
        let mut start = 0;
        for r in self.min_range..=self.max_range {
            for i in 0..per {
                let end = self.bucket_end(r, i);
                let c = self.buckets
                    [(((r - self.min_range) as usize) << self.granularity) + i as usize];
                f(start, end, c);
                start = end;
            }
        }
    }

    /// SPDK's `spdk_histogram_get_borders_count`: for each border (in ticks, ascending), the
    /// number of values in the buckets up to it, plus a last entry with the total.
    pub fn borders_count(&self, borders: &[u64]) -> Vec<u64> {
        let n = borders.len() + 1;
        let mut out = vec![0u64; n];
        let mut idx = 0usize;
        let mut so_far = 0u64;
        self.iterate(|start, _end, count| {
            so_far = so_far.wrapping_add(count);
            while idx < n - 1 && start > borders[idx] {
                let old = out[idx];
                idx += 1;
                out[idx] = old;
            }
            out[idx] = so_far;
        });
        out
    }
}

/// The bucket of `v` (SPDK's `spdk_histogram_data_tally`): values below the first range go
/// to the first bucket, above the last range to the last one.
#[inline]
fn bucket_index(g: u32, min_range: u32, max_range: u32, v: u64) -> usize {
    let mut range = range_of(g, v);
    let index;
    if range < min_range {
        range = min_range;
        index = 0;
    } else if range > max_range {
        range = max_range;
        index = (1u64 << g) - 1;
    } else {
        let shift = range.saturating_sub(1);
        index = (v >> shift) & ((1u64 << g) - 1);
    }
    (((range - min_range) as usize) << g) + index as usize
}

/// SPDK's `__spdk_histogram_data_get_bucket_range`.
#[inline]
fn range_of(granularity: u32, v: u64) -> u32 {
    let clz = v.leading_zeros();
    let lsb = 64 - granularity;
    lsb.saturating_sub(clz)
}

/// The histogram settings of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistogramConfig {
    /// Granularity.
    pub granularity: u32,
    /// Smallest tracked value in ns.
    pub min_nsec: u64,
    /// Largest tracked value in ns.
    pub max_nsec: u64,
    /// Only this I/O type, or every type.
    pub io_kind: Option<IoKind>,
}

impl HistogramConfig {
    fn empty(&self) -> Result<Histogram, HistogramError> {
        // Ticks are nanoseconds, so the bounds need no conversion.
        Histogram::new(self.granularity, self.min_nsec, self.max_nsec)
    }
}

/// One I/O type's counters in a stripe.
struct AtomicOps {
    bytes: AtomicU64,
    ops: AtomicU64,
    latency_ticks: AtomicU64,
    max: AtomicU64,
    min: AtomicU64,
}

impl Default for AtomicOps {
    fn default() -> Self {
        AtomicOps {
            bytes: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            latency_ticks: AtomicU64::new(0),
            max: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
        }
    }
}

impl AtomicOps {
    /// Counts one I/O; `owned`: the calling thread is the stripe's only writer.
    #[inline]
    fn add(&self, bytes: u64, ticks: u64, owned: bool) {
        if owned {
            // Single writer: a plain read and write (no locked instruction); readers only
            // load these sums.
            let bump = |a: &AtomicU64, v: u64| {
                a.store(a.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed)
            };
            bump(&self.bytes, bytes);
            bump(&self.ops, 1);
            bump(&self.latency_ticks, ticks);
        } else {
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
            self.ops.fetch_add(1, Ordering::Relaxed);
            self.latency_ticks.fetch_add(ticks, Ordering::Relaxed);
        }
        // A new extreme is rare: a plain load first spares the read-modify-write.
        if ticks > self.max.load(Ordering::Relaxed) {
            self.max.fetch_max(ticks, Ordering::Relaxed);
        }
        if ticks < self.min.load(Ordering::Relaxed) {
            self.min.fetch_min(ticks, Ordering::Relaxed);
        }
    }

    /// The counters since the stripe was created (the sums are never cleared here: see
    /// [`IoStats::get_and_reset`]); the extremes cleared as `mode` says, each with a swap,
    /// so a latency recorded meanwhile lands in this read or the next.
    fn take(&self, mode: ResetMode) -> OpCounters {
        let maxmin = matches!(mode, ResetMode::All | ResetMode::MaxMin);
        let get = |a: &AtomicU64, clear: bool, to: u64| {
            if clear {
                a.swap(to, Ordering::Relaxed)
            } else {
                a.load(Ordering::Relaxed)
            }
        };
        OpCounters {
            bytes: self.bytes.load(Ordering::Relaxed),
            ops: self.ops.load(Ordering::Relaxed),
            latency_ticks: self.latency_ticks.load(Ordering::Relaxed),
            max_latency_ticks: get(&self.max, maxmin, 0),
            min_latency_ticks: get(&self.min, maxmin, u64::MAX),
        }
    }
}

/// A histogram of atomic buckets (the layout of [`Histogram`]).
struct AtomicHist {
    granularity: u32,
    min_range: u32,
    max_range: u32,
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl AtomicHist {
    fn new(empty: &Histogram) -> Self {
        AtomicHist {
            granularity: empty.granularity,
            min_range: empty.min_range,
            max_range: empty.max_range,
            buckets: (0..empty.buckets.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            sum: AtomicU64::new(0),
        }
    }

    #[inline]
    fn tally(&self, v: u64) {
        self.sum.fetch_add(v, Ordering::Relaxed);
        let i = bucket_index(self.granularity, self.min_range, self.max_range, v);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds the buckets into `out` (same layout).
    fn add_to(&self, out: &mut Histogram) {
        if out.granularity != self.granularity
            || out.min_range != self.min_range
            || out.max_range != self.max_range
        {
            return;
        }
        for (a, b) in out.buckets.iter_mut().zip(self.buckets.iter()) {
            *a = a.wrapping_add(b.load(Ordering::Relaxed));
        }
        out.sum = out.sum.wrapping_add(self.sum.load(Ordering::Relaxed));
    }
}

/// The counters one thread writes: on cache lines of their own, atomics only.
///
/// The histogram is replaced only by [`IoStats::set_histogram`] (rare); a recorder counts
/// itself in `hist_users[epoch]` while it holds the histogram's pointer, and the replacer
/// flips the epoch and waits for the old epoch's users to leave before it frees the old
/// histogram (new recorders count in the new epoch, so the wait ends).
#[repr(align(128))]
struct Stripe {
    read: AtomicOps,
    write: AtomicOps,
    unmap: AtomicOps,
    failed: AtomicU64,
    hist: AtomicPtr<AtomicHist>,
    hist_epoch: AtomicUsize,
    hist_users: [AtomicUsize; 2],
}

impl Default for Stripe {
    fn default() -> Self {
        Stripe {
            read: AtomicOps::default(),
            write: AtomicOps::default(),
            unmap: AtomicOps::default(),
            failed: AtomicU64::new(0),
            hist: AtomicPtr::new(std::ptr::null_mut()),
            hist_epoch: AtomicUsize::new(0),
            hist_users: [AtomicUsize::new(0), AtomicUsize::new(0)],
        }
    }
}

impl Stripe {
    fn take(&self, mode: ResetMode) -> IoStat {
        IoStat {
            read: self.read.take(mode),
            write: self.write.take(mode),
            unmap: self.unmap.take(mode),
            failed: if matches!(mode, ResetMode::All | ResetMode::Error) {
                self.failed.swap(0, Ordering::Relaxed)
            } else {
                self.failed.load(Ordering::Relaxed)
            },
        }
    }

    /// Runs `f` on the histogram, if any, holding it against replacement.
    #[inline]
    fn with_hist(&self, f: impl FnOnce(&AtomicHist)) {
        let e = self.hist_epoch.load(Ordering::SeqCst) & 1;
        self.hist_users[e].fetch_add(1, Ordering::SeqCst);
        let p = self.hist.load(Ordering::SeqCst);
        // SAFETY: a non-null pointer came from Box::into_raw in `replace_hist`, which frees
        // it only after swapping it out and seeing this epoch's users at zero; we are
        // counted in `hist_users[e]` until after the last use.
        if let Some(h) = unsafe { p.as_ref() } {
            f(h);
        }
        self.hist_users[e].fetch_sub(1, Ordering::Release);
    }

    /// Installs `new` (or none) and frees the old histogram once no recorder holds it.
    fn replace_hist(&self, new: Option<AtomicHist>) {
        let new = new.map_or(std::ptr::null_mut(), |h| Box::into_raw(Box::new(h)));
        let old = self.hist.swap(new, Ordering::SeqCst);
        let e = self.hist_epoch.fetch_add(1, Ordering::SeqCst) & 1;
        while self.hist_users[e].load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        if !old.is_null() {
            // SAFETY: `old` came from Box::into_raw and no recorder can reach it any more.
            drop(unsafe { Box::from_raw(old) });
        }
    }
}

impl Drop for Stripe {
    fn drop(&mut self) {
        let p = *self.hist.get_mut();
        if !p.is_null() {
            // SAFETY: owned by the stripe, which nothing else references now.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

/// The statistics of one device.
pub struct IoStats {
    stripes: Box<[Stripe]>,
    /// Per stripe: the byte, op and latency sums at the last reset (see
    /// [`IoStats::get_and_reset`]); held while the stripes are read.
    base: Mutex<Box<[IoStat]>>,
    hist_on: AtomicBool,
    /// 0: every type, else `IoKind::code`.
    hist_kind: AtomicU8,
    hist_cfg: Mutex<Option<HistogramConfig>>,
}

impl Default for IoStats {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for IoStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoStats")
            .field("stat", &self.get())
            .finish()
    }
}

impl IoStats {
    /// Zeroed statistics, histogram off.
    pub fn new() -> Self {
        // One stripe per thread slot: `record_ticks` indexes them with the slot.
        let n = thread_slot::slot_count();
        IoStats {
            stripes: (0..n).map(|_| Stripe::default()).collect(),
            base: Mutex::new(vec![IoStat::default(); n].into_boxed_slice()),
            hist_on: AtomicBool::new(false),
            hist_kind: AtomicU8::new(0),
            hist_cfg: Mutex::new(None),
        }
    }

    /// Records one completed I/O of `bytes` that started at tick `start` (from [`now`]).
    /// Failed I/O counts as an error; only successful reads, writes and unmaps count as ops.
    #[inline]
    pub fn record(&self, kind: IoKind, bytes: u64, start: u64, ok: bool) {
        self.record_ticks(kind, bytes, now().saturating_sub(start), ok);
    }

    /// [`IoStats::record`] of an I/O that took `ticks`.
    #[inline]
    pub fn record_ticks(&self, kind: IoKind, bytes: u64, ticks: u64, ok: bool) {
        let (i, owned) = thread_slot::current();
        let s = &self.stripes[i];
        if ok {
            match kind {
                IoKind::Read => s.read.add(bytes, ticks, owned),
                IoKind::Write => s.write.add(bytes, ticks, owned),
                IoKind::Unmap => s.unmap.add(bytes, ticks, owned),
                IoKind::Flush | IoKind::Reset | IoKind::WriteZeroes => {}
            }
        } else {
            s.failed.fetch_add(1, Ordering::Relaxed);
        }
        if self.hist_on.load(Ordering::Relaxed) {
            let k = self.hist_kind.load(Ordering::Relaxed);
            if k == 0 || k == kind.code() {
                s.with_hist(|h| h.tally(ticks));
            }
        }
    }

    /// The counters summed over every stripe.
    pub fn get(&self) -> IoStat {
        self.get_and_reset(ResetMode::None)
    }

    /// The counters of each stripe (SPDK's per-channel view).
    pub fn per_stripe(&self) -> Vec<IoStat> {
        let base = self.base.lock().unwrap_or_else(|e| e.into_inner());
        self.stripes
            .iter()
            .zip(base.iter())
            .map(|(s, b)| s.take(ResetMode::None).since(b))
            .collect()
    }

    /// Clears counters as `mode` says.
    pub fn reset(&self, mode: ResetMode) {
        self.get_and_reset(mode);
    }

    /// Reads the counters, then clears them as `mode` says, counter by counter: a sum by
    /// taking the value read as its new base, an error count or extreme by a swap with
    /// zero. An I/O recorded meanwhile is counted in this read or the next, never lost or
    /// counted twice.
    pub fn get_and_reset(&self, mode: ResetMode) -> IoStat {
        let mut base = self.base.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = IoStat::default();
        for (s, b) in self.stripes.iter().zip(base.iter_mut()) {
            let cur = s.take(mode);
            out.merge(&cur.since(b));
            if mode == ResetMode::All {
                *b = cur;
            }
        }
        out
    }

    /// Turns the histogram on with `cfg` (new, zeroed buckets unless it was on with the same
    /// settings) or off (`None`, dropping the buckets).
    pub fn set_histogram(&self, cfg: Option<HistogramConfig>) -> Result<(), HistogramError> {
        let mut cur = self.hist_cfg.lock().unwrap_or_else(|e| e.into_inner());
        match cfg {
            None => {
                self.hist_on.store(false, Ordering::Relaxed);
                for s in self.stripes.iter() {
                    s.replace_hist(None);
                }
                *cur = None;
            }
            Some(c) => {
                let empty = c.empty()?;
                let same = cur.is_some_and(|o| {
                    o.granularity == c.granularity
                        && o.min_nsec == c.min_nsec
                        && o.max_nsec == c.max_nsec
                });
                self.hist_kind
                    .store(c.io_kind.map_or(0, IoKind::code), Ordering::Relaxed);
                if !same {
                    for s in self.stripes.iter() {
                        s.replace_hist(Some(AtomicHist::new(&empty)));
                    }
                }
                *cur = Some(c);
                self.hist_on.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The histogram settings, when it is on.
    pub fn histogram_config(&self) -> Option<HistogramConfig> {
        *self.hist_cfg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The histogram merged over every stripe, when it is on.
    pub fn histogram(&self) -> Option<Histogram> {
        // Held so the stripes' histograms are not replaced while they are summed.
        let cfg = self.hist_cfg.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = cfg.as_ref()?.empty().ok()?;
        for s in self.stripes.iter() {
            s.with_hist(|h| h.add_to(&mut out));
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The counter-based clock keeps the monotonic clock's pace (its calibration is right)
    /// and never goes back on one thread.
    #[test]
    fn ticks_are_nanoseconds_of_the_monotonic_clock() {
        // A preemption between two paired reads skews one attempt, never a calibration
        // error's every attempt: the best of three must be within 2 %.
        let errors: Vec<f64> = (0..3)
            .map(|_| {
                let (t0, n0) = (Instant::now(), now());
                let mut last = n0;
                while t0.elapsed() < Duration::from_millis(100) {
                    let n = now();
                    assert!(n >= last, "the clock went back: {n} after {last}");
                    last = n;
                }
                let (ticks, wall) = ((now() - n0) as f64, t0.elapsed().as_nanos() as f64);
                (ticks / wall - 1.0).abs()
            })
            .collect();
        assert!(
            errors.iter().any(|&e| e < 0.02),
            "ticks against the monotonic clock, relative errors {errors:?}"
        );
    }

    /// Sums read and reset while many threads (more than there are stripes, so some share
    /// one and the rest write theirs without locked instructions) record: every I/O is
    /// counted exactly once over all the reads.
    #[test]
    fn resets_during_recording_lose_and_double_count_nothing() {
        const PER_THREAD: u64 = 20_000;
        let threads = thread_slot::slot_count() as u64 * 2 + 1;
        let s = std::sync::Arc::new(IoStats::new());
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let reader = {
            let (s, done) = (s.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut ops, mut bytes, mut reads) = (0u64, 0u64, 0u32);
                while !done.load(Ordering::Acquire) || reads < 2 {
                    let st = s.get_and_reset(ResetMode::All);
                    ops += st.read.ops;
                    bytes += st.read.bytes;
                    reads += 1;
                }
                (ops, bytes)
            })
        };
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..PER_THREAD {
                        s.record_ticks(IoKind::Read, 512, 1, true);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        done.store(true, Ordering::Release);
        let (ops, bytes) = reader.join().unwrap();
        let rest = s.get();
        assert_eq!(ops + rest.read.ops, threads * PER_THREAD);
        assert_eq!(bytes + rest.read.bytes, threads * PER_THREAD * 512);
        assert_eq!(s.get_and_reset(ResetMode::All).read.ops, rest.read.ops);
        assert_eq!(s.get().read.ops, 0);
    }

    #[test]
    fn counts_sum_over_threads_and_reset_modes_clear_what_they_name() {
        let s = std::sync::Arc::new(IoStats::new());
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        s.record(IoKind::Read, 4096, now(), true);
                        s.record(IoKind::Write, 512, now(), true);
                    }
                    s.record(IoKind::Unmap, 1 << 20, now(), true);
                    s.record(IoKind::Read, 4096, now(), false);
                    s.record(IoKind::Flush, 0, now(), true);
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let st = s.get();
        assert_eq!((st.read.ops, st.read.bytes), (800, 800 * 4096));
        assert_eq!((st.write.ops, st.write.bytes), (800, 800 * 512));
        assert_eq!((st.unmap.ops, st.unmap.bytes), (8, 8 << 20));
        assert_eq!(st.failed, 8);
        assert!(st.read.max_latency_ticks >= st.read.min_reported());
        s.reset(ResetMode::Error);
        assert_eq!(s.get().failed, 0);
        assert_eq!(s.get().read.ops, 800);
        s.reset(ResetMode::MaxMin);
        assert_eq!(s.get().read.max_latency_ticks, 0);
        assert_eq!(s.get().read.min_reported(), 0);
        assert_eq!(s.get_and_reset(ResetMode::All).write.ops, 800);
        assert_eq!(s.get(), IoStat::default());
    }

    /// What one I/O pays: two clock reads and a record into the thread's stripe (with the
    /// histogram on, the worst case). The bound only catches a gross regression (a system
    /// call or a contended lock per I/O); the figure is printed (`--nocapture`).
    #[test]
    fn recording_costs_well_under_a_microsecond() {
        let s = IoStats::new();
        s.set_histogram(Some(HistogramConfig {
            granularity: 7,
            min_nsec: 1000,
            max_nsec: 120_000_000_000,
            io_kind: None,
        }))
        .unwrap();
        let n = 200_000u32;
        // Nanoseconds per iteration of `f` in each of 5 rounds of `n` iterations, sorted.
        let rounds = |f: &dyn Fn(u32)| -> Vec<f64> {
            let mut v: Vec<f64> = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    for i in 0..n {
                        f(i);
                    }
                    t.elapsed().as_nanos() as f64 / f64::from(n)
                })
                .collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let fmt = |v: &[f64]| format!("{:.1} ({:.1}-{:.1})", v[2], v[0], v[4]);
        let on = rounds(&|i| s.record(IoKind::Read, u64::from(i & 7) << 12, now(), true));
        // The two clock reads alone, to tell the recording's own share.
        let clock = rounds(&|_| {
            std::hint::black_box(now().wrapping_add(now()));
        });
        // The default: histogram off.
        let off = IoStats::new();
        let off_ns = rounds(&|i| off.record(IoKind::Read, u64::from(i & 7) << 12, now(), true));
        println!(
            "stats, ns per recorded I/O, median (min-max) of 5 rounds: {} with the histogram on, {} with it off (clock reads included; two clock reads alone {})",
            fmt(&on),
            fmt(&off_ns),
            fmt(&clock)
        );
        assert_eq!(s.get().read.ops, 5 * u64::from(n));
        let best = on[0];
        assert!(best < 2000.0, "{best} ns per I/O");
    }

    /// Replacing the histogram while other threads record into it: no recorder touches a
    /// freed histogram (the epoch wait), and the plain counters lose nothing.
    #[test]
    fn histogram_replaced_under_concurrent_recording() {
        let s = std::sync::Arc::new(IoStats::new());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (s, stop) = (s.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        s.record(IoKind::Write, 512, now(), true);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        for g in 0..200u32 {
            let cfg = HistogramConfig {
                granularity: 1 + g % 8,
                min_nsec: 0,
                max_nsec: u64::MAX,
                io_kind: None,
            };
            s.set_histogram(if g % 3 == 2 { None } else { Some(cfg) })
                .unwrap();
        }
        s.set_histogram(Some(HistogramConfig {
            granularity: 7,
            min_nsec: 0,
            max_nsec: u64::MAX,
            io_kind: None,
        }))
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        let total: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
        let st = s.get();
        assert_eq!(st.write.ops, total);
        assert_eq!(st.write.bytes, total * 512);
        let h = s.histogram().unwrap();
        assert!(
            h.total() > 0 && h.total() <= total,
            "{} of {total}",
            h.total()
        );
    }

    #[test]
    fn histogram_matches_spdk_layout() {
        // g = 7, [1000, 120e9) ns: SPDK's default bounds at 1 GHz.
        let mut h = Histogram::new(7, 1000, 120_000_000_000).unwrap();
        assert_eq!(h.min_range(), range_of(7, 1000));
        assert_eq!(h.min_range(), 3); // 1000 has 54 leading zeros: 57 - 54.
        assert_eq!(h.max_range(), 64 - 7 - (119_999_999_999u64).leading_zeros());
        assert_eq!(
            h.buckets().len(),
            ((h.max_range() - h.min_range() + 1) as usize) << 7
        );
        for v in [1u64, 999, 1000, 5000, 1 << 40, u64::MAX] {
            h.tally(v);
        }
        assert_eq!(h.total(), 6);
        assert_eq!(
            h.sum(),
            (1u64 + 999 + 1000 + 5000 + (1 << 40)).wrapping_add(u64::MAX)
        );
        // Below the first range lands in the first bucket (999 is in range 3 like 1000),
        // above the last range in the last bucket.
        assert_eq!(h.buckets()[0], 1);
        assert_eq!(*h.buckets().last().unwrap(), 2);
        // 5000: range 57 - 51 = 6, index (5000 >> 5) & 127 = 28.
        assert_eq!(h.buckets()[((6 - 3) << 7) + 28], 1);
        // Bucket bounds contain their values.
        let mut seen = 0;
        h.iterate(|start, end, c| {
            if c > 0 && start <= 5000 && 5000 < end {
                seen += 1;
            }
        });
        assert_eq!(seen, 1);
        // 1, 999 and 1000 are below 2000; 5000 below 10000; the rest above.
        assert_eq!(h.borders_count(&[2000, 10_000]), vec![3, 4, 6]);
        assert_eq!(h.to_bytes().len(), h.buckets().len() * 8);
        assert!(Histogram::new(16, 0, 10).is_err());
        assert!(Histogram::new(7, 10, 10).is_err());
    }

    #[test]
    fn histogram_filters_by_type_and_merges_stripes() {
        let s = IoStats::new();
        assert!(s.histogram().is_none());
        let cfg = HistogramConfig {
            granularity: 7,
            min_nsec: 0,
            max_nsec: u64::MAX,
            io_kind: Some(IoKind::Write),
        };
        s.set_histogram(Some(cfg)).unwrap();
        s.record(IoKind::Write, 4096, now(), true);
        s.record(IoKind::Read, 4096, now(), true);
        std::thread::scope(|sc| {
            sc.spawn(|| s.record(IoKind::Write, 4096, now(), false));
        });
        assert_eq!(s.histogram().unwrap().total(), 2);
        s.set_histogram(Some(HistogramConfig {
            io_kind: None,
            ..cfg
        }))
        .unwrap();
        s.record(IoKind::Read, 4096, now(), true);
        assert_eq!(
            s.histogram().unwrap().total(),
            3,
            "same bounds keep the counts"
        );
        s.set_histogram(None).unwrap();
        assert!(s.histogram().is_none());
    }
}
