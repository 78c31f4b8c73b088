//! bench: a bdevperf-like workload generator over bdev-core devices.
//!
//! Owns the workload description ([`Workload`]: pattern, block size, queue depth, duration or
//! count), the offset generators (uniform random, and qemu-img bench's strided sequential
//! pattern) and the driver ([`run`]) that keeps `qd` requests in flight through one
//! [`Descriptor`] on the calling thread. The `bench` binary wraps it for `cargo xtask bench`,
//! which compares the figures with peers (fio, qemu-img bench). It does not know about peers
//! or JSON result files.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bdev_core::{BdevError, Descriptor, IoBuf};
use futures::task::AtomicWaker;

/// The I/O pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Sequential reads, advancing by `step` bytes (qemu-img bench's pattern).
    Read,
    /// Sequential writes, advancing by `step` bytes.
    Write,
    /// Uniform random reads over the device.
    RandRead,
    /// Uniform random writes over the device.
    RandWrite,
    /// Uniform random, `read_pct` percent reads and the rest writes.
    RandRw,
}

impl Pattern {
    /// Parses fio's names (`read`, `write`, `randread`, `randwrite`, `randrw`).
    pub fn parse(s: &str) -> Option<Pattern> {
        Some(match s {
            "read" => Pattern::Read,
            "write" => Pattern::Write,
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "randrw" | "mixed" => Pattern::RandRw,
            _ => return None,
        })
    }

    /// fio's name for the pattern.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::RandRw => "randrw",
        }
    }

    /// Whether the pattern writes at all (the descriptor must then be writable).
    pub fn writes(self) -> bool {
        !matches!(self, Pattern::Read | Pattern::RandRead)
    }
}

/// One benchmark run.
#[derive(Clone, Debug)]
pub struct Workload {
    /// The pattern.
    pub pattern: Pattern,
    /// Bytes per request (a multiple of the device block length).
    pub bs: u64,
    /// Requests kept in flight.
    pub qd: usize,
    /// Stop submitting after this long.
    pub duration: Option<Duration>,
    /// Stop submitting after this many requests.
    pub count: Option<u64>,
    /// Sequential patterns: bytes between the starts of consecutive requests (default `bs`).
    pub step: Option<u64>,
    /// First offset of the sequential patterns, in bytes.
    pub offset: u64,
    /// `RandRw`: percentage of reads.
    pub read_pct: u32,
    /// Seed of the random offsets.
    pub seed: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            pattern: Pattern::RandRead,
            bs: 4096,
            qd: 32,
            duration: Some(Duration::from_secs(10)),
            count: None,
            step: None,
            offset: 0,
            read_pct: 50,
            seed: 0x5eed_cafe_f00d_d00d,
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
    /// Failed requests.
    pub errors: u64,
    /// The first error, as text.
    pub first_error: Option<String>,
    /// Wall time from the first submission to the last completion.
    pub elapsed: Duration,
}

impl Stats {
    /// Completed requests per second.
    pub fn iops(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            (self.reads + self.writes) as f64 / s
        } else {
            0.0
        }
    }
}

/// xorshift64*: fast, good enough to spread offsets, and reproducible from a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (0 is replaced by a fixed non-zero value).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A value in `0..n` (`n` > 0), without modulo bias worth caring about for n < 2^40.
    pub fn below(&mut self, n: u64) -> u64 {
        (((self.next_u64() >> 11) as u128 * n as u128) >> 53) as u64
    }
}

/// Produces the byte offset and direction of each request.
#[derive(Clone, Debug)]
pub struct OffsetGen {
    pattern: Pattern,
    bs: u64,
    size: u64,
    step: u64,
    next: u64,
    read_pct: u32,
    rng: Rng,
}

impl OffsetGen {
    /// A generator for a device of `size` bytes.
    pub fn new(w: &Workload, size: u64) -> OffsetGen {
        OffsetGen {
            pattern: w.pattern,
            bs: w.bs,
            size,
            step: w.step.unwrap_or(w.bs),
            next: w.offset,
            read_pct: w.read_pct.min(100),
            rng: Rng::new(w.seed),
        }
    }

    /// The next request: (byte offset, is_write).
    pub fn next_io(&mut self) -> (u64, bool) {
        match self.pattern {
            Pattern::Read | Pattern::Write => {
                // qemu-img bench: the offset advances by the step and wraps modulo
                // (size - buffer size), so a request never crosses the end.
                let off = self.next;
                self.next = if self.size <= self.bs {
                    0
                } else {
                    (self.next + self.step) % (self.size - self.bs)
                };
                (off, self.pattern == Pattern::Write)
            }
            Pattern::RandRead | Pattern::RandWrite | Pattern::RandRw => {
                let units = (self.size / self.bs).max(1);
                let off = self.rng.below(units) * self.bs;
                let write = match self.pattern {
                    Pattern::RandWrite => true,
                    Pattern::RandRw => self.rng.below(100) >= self.read_pct as u64,
                    _ => false,
                };
                (off, write)
            }
        }
    }
}

/// Checks a workload against a device; returns a message when it cannot run.
pub fn validate(w: &Workload, block_len: u64, size: u64) -> Result<(), String> {
    if w.bs == 0 || !w.bs.is_multiple_of(block_len) {
        return Err(format!(
            "block size {} is not a multiple of the device block length {block_len}",
            w.bs
        ));
    }
    if w.bs > size {
        return Err(format!(
            "block size {} exceeds the device ({size} bytes)",
            w.bs
        ));
    }
    if let Some(step) = w.step {
        if !step.is_multiple_of(block_len) {
            return Err(format!("step {step} is not a multiple of {block_len}"));
        }
    }
    if !w.offset.is_multiple_of(block_len) || w.offset >= size {
        return Err(format!("bad start offset {}", w.offset));
    }
    if w.qd == 0 {
        return Err("queue depth must be at least 1".into());
    }
    if w.duration.is_none() && w.count.is_none() {
        return Err("a duration or a count is needed".into());
    }
    Ok(())
}

async fn one_io(
    desc: &Descriptor,
    offset_blocks: u64,
    write: bool,
    buf: IoBuf,
) -> (bool, Result<IoBuf, BdevError>) {
    let r = if write {
        desc.write_io(offset_blocks, buf).await
    } else {
        desc.read_io(offset_blocks, buf).await
    };
    (write, r)
}

/// Runs the workload through `desc`, keeping `qd` requests in flight on the calling task, and
/// returns what was measured. Failed requests are counted, not retried. Run it under
/// `bdev_core::reactor::block_on` for aio devices (the `bench` binary does).
pub async fn run(desc: &Descriptor, w: &Workload) -> Result<Stats, String> {
    let dev = desc.device().clone();
    let block_len = dev.block_len() as u64;
    let size = dev.num_blocks() * block_len;
    if w.pattern.writes() && !desc.is_writable() {
        return Err("a write pattern needs a writable descriptor".into());
    }
    drive(
        w,
        block_len,
        size,
        dev.buf_align().max(1),
        |off, write, buf| async move {
            let (write, r) = one_io(desc, off, write, buf).await;
            (write, r.map_err(|e| e.to_string()))
        },
    )
    .await
}

/// Runs the workload on an open blob (offsets in io units), as [`run`] does on a descriptor.
pub async fn run_blob(blob: &blobstore::Blob, io_unit: u64, w: &Workload) -> Result<Stats, String> {
    let size = blob.num_io_units() * io_unit;
    drive(w, io_unit, size, 4096, |off, write, buf| async move {
        let r = if write {
            blob.write(off, buf).await
        } else {
            blob.read(off, buf).await
        };
        (write, r.map_err(|e| e.to_string()))
    })
    .await
}

/// Readiness of the driver's request slots.
struct SlotState {
    ready: Box<[AtomicBool]>,
    task: AtomicWaker,
}

/// The waker of one slot: marks it ready and wakes the driver's task.
struct SlotWake {
    idx: usize,
    st: Arc<SlotState>,
}

impl Wake for SlotWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.st.ready[self.idx].store(true, Ordering::Release);
        self.st.task.wake();
    }
}

/// The queue-depth loop shared by [`run`] and [`run_blob`]: `io(offset in blocks, write,
/// buffer)` performs one request.
///
/// `qd` slots, each holding one request's future in place (allocated once, reused: a new
/// request's future is written over the finished one's) and a waker of its own, so that a
/// completion polls only its slot and the steady state allocates nothing; the counting
/// allocator of the `bench` binary sees the data path alone.
async fn drive<'a, F, Fut>(
    w: &Workload,
    block_len: u64,
    size: u64,
    align: usize,
    io: F,
) -> Result<Stats, String>
where
    F: Fn(u64, bool, IoBuf) -> Fut + 'a,
    Fut: std::future::Future<Output = (bool, Result<IoBuf, String>)> + 'a,
{
    validate(w, block_len, size)?;
    let new_buf = || {
        let mut b = IoBuf::new(w.bs as usize, align);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i % 251) as u8 ^ 0xa5;
        }
        b
    };
    let mut gen = OffsetGen::new(w, size);
    let mut stats = Stats::default();
    let mut submitted = 0u64;
    let start = Instant::now();
    // The deadline is checked per request: on the counter clock of the I/O statistics, not
    // `clock_gettime` (whose cost would count against the device under test).
    let deadline = w
        .duration
        .map(|d| bdev_core::stats::now().saturating_add(d.as_nanos() as u64));
    let more = |submitted: u64| {
        w.count.is_none_or(|c| submitted < c)
            && deadline.is_none_or(|d| bdev_core::stats::now() < d)
    };
    let st = Arc::new(SlotState {
        ready: (0..w.qd).map(|_| AtomicBool::new(false)).collect(),
        task: AtomicWaker::new(),
    });
    let wakers: Vec<Waker> = (0..w.qd)
        .map(|idx| {
            Waker::from(Arc::new(SlotWake {
                idx,
                st: st.clone(),
            }))
        })
        .collect();
    let mut slots: Vec<Pin<Box<Option<Fut>>>> = (0..w.qd).map(|_| Box::pin(None)).collect();
    let mut active = 0usize;
    for (i, slot) in slots.iter_mut().enumerate() {
        if !more(submitted) {
            break;
        }
        let (off, write) = gen.next_io();
        slot.as_mut()
            .set(Some(io(off / block_len, write, new_buf())));
        st.ready[i].store(true, Ordering::Release);
        submitted += 1;
        active += 1;
    }
    futures::future::poll_fn(|cx| {
        st.task.register(cx.waker());
        loop {
            let mut progressed = false;
            for (i, slot) in slots.iter_mut().enumerate() {
                if !st.ready[i].swap(false, Ordering::AcqRel) {
                    continue;
                }
                let Some(fut) = slot.as_mut().as_pin_mut() else {
                    continue;
                };
                let mut scx = Context::from_waker(&wakers[i]);
                let Poll::Ready((write, r)) = fut.poll(&mut scx) else {
                    continue;
                };
                progressed = true;
                let buf = match r {
                    Ok(buf) => {
                        if write {
                            stats.writes += 1;
                        } else {
                            stats.reads += 1;
                        }
                        buf
                    }
                    Err(e) => {
                        stats.errors += 1;
                        stats.first_error.get_or_insert(e);
                        new_buf()
                    }
                };
                if more(submitted) {
                    let (off, write) = gen.next_io();
                    // Written over the finished future, in place.
                    slot.as_mut().set(Some(io(off / block_len, write, buf)));
                    st.ready[i].store(true, Ordering::Release);
                    submitted += 1;
                } else {
                    slot.as_mut().set(None);
                    active -= 1;
                }
            }
            if active == 0 {
                return Poll::Ready(());
            }
            if !progressed && !st.ready.iter().any(|r| r.load(Ordering::Acquire)) {
                return Poll::Pending;
            }
        }
    })
    .await;
    stats.elapsed = start.elapsed();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_offsets_follow_qemu_img_bench() {
        let w = Workload {
            pattern: Pattern::Read,
            bs: 4096,
            step: Some(65536),
            ..Default::default()
        };
        let size = 1 << 20;
        let mut g = OffsetGen::new(&w, size);
        let offs: Vec<u64> = (0..18).map(|_| g.next_io().0).collect();
        // 16 steps of 64 KiB fill 1 MiB; the 17th wraps modulo (1 MiB - 4 KiB).
        assert_eq!(offs[..3], [0, 65536, 131072]);
        assert_eq!(offs[15], 15 * 65536);
        assert_eq!(offs[16], (16 * 65536) % (size - 4096));
        assert_eq!(offs[16], 4096);
        assert!(offs.iter().all(|o| o % 4096 == 0 && o + 4096 <= size));
    }

    #[test]
    fn random_offsets_cover_the_device_and_stay_aligned() {
        let w = Workload {
            pattern: Pattern::RandRead,
            bs: 4096,
            ..Default::default()
        };
        let size = 64 * 4096;
        let mut g = OffsetGen::new(&w, size);
        let mut seen = [false; 64];
        for _ in 0..10_000 {
            let (o, write) = g.next_io();
            assert!(!write);
            assert_eq!(o % 4096, 0);
            assert!(o + 4096 <= size);
            seen[(o / 4096) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s), "every block is hit");
    }

    #[test]
    fn mixed_pattern_honours_the_read_percentage() {
        let w = Workload {
            pattern: Pattern::RandRw,
            read_pct: 70,
            ..Default::default()
        };
        let mut g = OffsetGen::new(&w, 1 << 30);
        let writes = (0..100_000).filter(|_| g.next_io().1).count();
        assert!((28_000..32_000).contains(&writes), "{writes}");
    }

    #[test]
    fn validate_rejects_bad_workloads() {
        let ok = Workload::default();
        assert!(validate(&ok, 512, 1 << 30).is_ok());
        let bad_bs = Workload {
            bs: 1000,
            ..Default::default()
        };
        assert!(validate(&bad_bs, 512, 1 << 30).is_err());
        let no_stop = Workload {
            duration: None,
            ..Default::default()
        };
        assert!(validate(&no_stop, 512, 1 << 30).is_err());
        let qd0 = Workload {
            qd: 0,
            ..Default::default()
        };
        assert!(validate(&qd0, 512, 1 << 30).is_err());
        assert!(validate(&ok, 512, 2048).is_err());
    }

    #[test]
    fn pattern_names_round_trip() {
        for p in [
            Pattern::Read,
            Pattern::Write,
            Pattern::RandRead,
            Pattern::RandWrite,
            Pattern::RandRw,
        ] {
            assert_eq!(Pattern::parse(p.name()), Some(p));
        }
        assert_eq!(Pattern::parse("mixed"), Some(Pattern::RandRw));
        assert_eq!(Pattern::parse("nope"), None);
    }
}
