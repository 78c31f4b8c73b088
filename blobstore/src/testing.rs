//! Test devices and switches, enabled by the `testing` feature.
//!
//! [`MemBsDev`] is an in-memory [`BsDev`] with failure injection (SPDK `bs_dev_common.c`
//! thresholds) and an optional write-back cache ([`crashsim::CacheDisk`]): in write-back
//! mode the writes completed since the last flush may be lost in any subset, and torn at
//! io-unit (block) granularity, when a crash is simulated with [`MemBsDev::crash`] or
//! [`MemBsDev::crash_image`].
//!
//! [`skip_barrier`] makes the blobstore leave out one kind of flush on the calling thread, so
//! that a test can prove its crash sweep notices a missing barrier.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use crashsim::CacheDisk;
pub use crashsim::CrashPlan;
use iobuf::IoBuf;

use crate::BsDev;

/// What happens to writes after the threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// No fault.
    None,
    /// Writes after the k-th are silently dropped (power loss); so are the flushes after
    /// the first dropped write (the power is off).
    DropAfter(u64),
    /// Writes after the k-th fail with EIO.
    FailAfter(u64),
    /// Power cut after the k-th event, where writes and flushes both count as events
    /// ([`MemBsDev::events`]): every later write and flush is silently dropped. Unlike
    /// `DropAfter`, this places a cut between a write and the flush that follows it.
    CutAfter(u64),
}

pub use crate::barrier::Barrier;
/// Yields once to the executor (what the store does after marking an operation busy), so a
/// test can interleave its own steps with the store's.
pub use crate::ops::yield_now;

thread_local! {
    static SKIPPED: Cell<Option<Barrier>> = const { Cell::new(None) };
}

/// Makes the blobstore skip every barrier of kind `b` issued on this thread (`None` turns
/// the switch off). For tests that prove a crash sweep catches a missing barrier: the
/// tests of one binary run on their own threads, so the switch does not leak into others.
pub fn skip_barrier(b: Option<Barrier>) {
    SKIPPED.with(|s| s.set(b));
}

/// Whether barriers of kind `b` are skipped on this thread.
pub(crate) fn barrier_skipped(b: Barrier) -> bool {
    SKIPPED.with(|s| s.get()) == Some(b)
}

/// An in-memory device. Writes, write_zeroes and unmaps count as writes.
pub struct MemBsDev {
    block_len: u32,
    blocks: AtomicU64,
    disk: Mutex<CacheDisk>,
    writes: AtomicU64,
    events: AtomicU64,
    flushes: AtomicU64,
    fault: Mutex<Fault>,
    /// A `DropAfter` / `CutAfter` cut happened: nothing reaches the device any more.
    powered_off: AtomicBool,
    write_back: AtomicBool,
    unmap_zeroes: AtomicBool,
    degraded: AtomicBool,
    read_only: bool,
    yield_io: AtomicBool,
    /// In-kernel copies between MemBsDevs (off by default), and how many were made.
    copy: AtomicBool,
    copies: AtomicU64,
    me: std::sync::Weak<MemBsDev>,
}

/// The copy source a [`MemBsDev`] hands out.
struct MemCopySrc(Arc<MemBsDev>);

impl MemBsDev {
    /// A zeroed device of `blocks` blocks of `block_len` bytes (write-through).
    pub fn new(block_len: u32, blocks: u64) -> Arc<MemBsDev> {
        Self::from_bytes(block_len, vec![0; (block_len as u64 * blocks) as usize])
    }
    /// A device over `bytes` (length rounded down to whole blocks), write-through.
    pub fn from_bytes(block_len: u32, bytes: Vec<u8>) -> Arc<MemBsDev> {
        Self::build(block_len, bytes, false)
    }
    /// A read-only device over `bytes` (an esnap base).
    pub fn read_only(block_len: u32, bytes: Vec<u8>) -> Arc<MemBsDev> {
        Self::build(block_len, bytes, true)
    }
    /// A zeroed device with a volatile write cache (write-back mode).
    pub fn write_back(block_len: u32, blocks: u64) -> Arc<MemBsDev> {
        let d = Self::new(block_len, blocks);
        d.set_write_back(true);
        d
    }
    fn build(block_len: u32, mut bytes: Vec<u8>, read_only: bool) -> Arc<MemBsDev> {
        let blocks = bytes.len() as u64 / u64::from(block_len);
        bytes.truncate((blocks * u64::from(block_len)) as usize);
        Arc::new_cyclic(|me| MemBsDev {
            me: me.clone(),
            copy: AtomicBool::new(false),
            copies: AtomicU64::new(0),
            block_len,
            blocks: AtomicU64::new(blocks),
            disk: Mutex::new(CacheDisk::new(bytes, block_len as usize)),
            writes: AtomicU64::new(0),
            events: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            fault: Mutex::new(Fault::None),
            powered_off: AtomicBool::new(false),
            write_back: AtomicBool::new(false),
            unmap_zeroes: AtomicBool::new(true),
            degraded: AtomicBool::new(false),
            read_only,
            yield_io: AtomicBool::new(false),
        })
    }
    fn disk(&self) -> MutexGuard<'_, CacheDisk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// A copy of the bytes a reader sees now.
    pub fn snapshot(&self) -> Vec<u8> {
        self.disk().visible().to_vec()
    }
    /// Write-back mode on or off. In write-back mode a write is durable only after a later
    /// flush completed; switching it off makes everything written so far durable.
    pub fn set_write_back(&self, on: bool) {
        if !on {
            self.disk().flush();
        }
        self.write_back.store(on, Ordering::SeqCst);
    }
    /// The image a power cut would leave now under `plan` (the device is not changed).
    pub fn crash_image(&self, plan: CrashPlan) -> Vec<u8> {
        self.disk().crash_image(plan)
    }
    /// Simulates a power cut under `plan`: the device keeps only what survives it and
    /// powers up again (faults cleared, every byte durable).
    pub fn crash(&self, plan: CrashPlan) {
        self.disk().crash(plan);
        self.set_fault(Fault::None);
    }
    /// Writes completed since the last flush.
    pub fn pending_writes(&self) -> usize {
        self.disk().pending_writes()
    }
    /// Sets the fault mode, resets the write and event counters and powers the device on.
    pub fn set_fault(&self, f: Fault) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = f;
        self.writes.store(0, Ordering::SeqCst);
        self.events.store(0, Ordering::SeqCst);
        self.powered_off.store(false, Ordering::SeqCst);
    }
    /// Writes counted since the last `set_fault`.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
    /// Writes and flushes counted since the last `set_fault` (the cut points of
    /// [`Fault::CutAfter`]).
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }
    /// Flushes completed since the device was made (not counting dropped ones).
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }
    /// Whether a completed unmap reads back as zeroes (default true). When false, an unmap
    /// succeeds and leaves the old bytes in place, as an unmap a device treats as a hint.
    pub fn set_unmap_zeroes(&self, z: bool) {
        self.unmap_zeroes.store(z, Ordering::SeqCst);
    }
    /// Marks the device degraded (reads fail with EIO).
    pub fn set_degraded(&self, d: bool) {
        self.degraded.store(d, Ordering::SeqCst);
    }
    /// Whether this device offers the copy capability ([`BsDev::copy_source`] and
    /// [`BsDev::copy_from`] between MemBsDevs), as an aio file does; off by default.
    pub fn set_copy(&self, on: bool) {
        self.copy.store(on, Ordering::SeqCst);
    }
    /// Copies made with [`BsDev::copy_from`] into this device.
    pub fn copies(&self) -> u64 {
        self.copies.load(Ordering::SeqCst)
    }
    /// Makes every I/O yield once to the executor before completing.
    pub fn set_yield(&self, y: bool) {
        self.yield_io.store(y, Ordering::SeqCst);
    }
    /// Changes the reported size (grow / shrink tests); the bytes are extended with zeroes.
    pub fn resize(&self, blocks: u64) {
        self.disk()
            .resize((blocks * u64::from(self.block_len)) as usize);
        self.blocks.store(blocks, Ordering::SeqCst);
    }

    fn range(&self, lba: u64, n: u64) -> std::io::Result<(usize, usize)> {
        let bl = u64::from(self.block_len);
        if lba
            .checked_add(n)
            .is_none_or(|e| e > self.blocks.load(Ordering::SeqCst))
        {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(((lba * bl) as usize, ((lba + n) * bl) as usize))
    }

    /// Returns true when the write should be applied, an error when it must fail.
    fn admit_write(&self) -> std::io::Result<bool> {
        if self.read_only {
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
        let k = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        let e = self.events.fetch_add(1, Ordering::SeqCst) + 1;
        let ok = match *self.fault.lock().unwrap_or_else(|e| e.into_inner()) {
            Fault::None => true,
            Fault::DropAfter(t) => k <= t,
            Fault::CutAfter(t) => e <= t,
            Fault::FailAfter(t) if k > t => {
                return Err(std::io::Error::from_raw_os_error(libc::EIO))
            }
            Fault::FailAfter(_) => true,
        };
        if !ok {
            self.powered_off.store(true, Ordering::SeqCst);
        }
        Ok(ok && !self.powered_off.load(Ordering::SeqCst))
    }

    /// Returns true when the flush should take effect.
    fn admit_flush(&self) -> bool {
        let e = self.events.fetch_add(1, Ordering::SeqCst) + 1;
        if let Fault::CutAfter(t) = *self.fault.lock().unwrap_or_else(|e| e.into_inner()) {
            if e > t {
                self.powered_off.store(true, Ordering::SeqCst);
            }
        }
        !self.powered_off.load(Ordering::SeqCst)
    }

    fn apply(&self, s: usize, data: Option<&[u8]>, len: usize) {
        let mut d = self.disk();
        match data {
            Some(b) => d.write(s, b),
            None => d.write_zeroes(s, len),
        }
        if !self.write_back.load(Ordering::Relaxed) {
            d.flush();
        }
    }

    async fn maybe_yield(&self) {
        if self.yield_io.load(Ordering::Relaxed) {
            crate::ops::yield_now().await;
        }
    }
}

#[async_trait]
impl BsDev for MemBsDev {
    fn block_len(&self) -> u32 {
        self.block_len
    }
    fn block_count(&self) -> u64 {
        self.blocks.load(Ordering::SeqCst)
    }
    async fn read(&self, lba: u64, mut buf: IoBuf) -> std::io::Result<IoBuf> {
        self.maybe_yield().await;
        if self.degraded.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        let (s, e) = self.range(lba, buf.len() as u64 / u64::from(self.block_len))?;
        buf.copy_from_slice(&self.disk().visible()[s..e]);
        Ok(buf)
    }
    async fn write(&self, lba: u64, buf: IoBuf) -> std::io::Result<IoBuf> {
        self.maybe_yield().await;
        let (s, e) = self.range(lba, buf.len() as u64 / u64::from(self.block_len))?;
        if self.admit_write()? {
            self.apply(s, Some(&buf), e - s);
        }
        Ok(buf)
    }
    async fn write_zeroes(&self, lba: u64, lba_count: u64) -> std::io::Result<()> {
        self.maybe_yield().await;
        let (s, e) = self.range(lba, lba_count)?;
        if self.admit_write()? {
            self.apply(s, None, e - s);
        }
        Ok(())
    }
    async fn unmap(&self, lba: u64, lba_count: u64) -> std::io::Result<()> {
        if self.unmap_zeroes.load(Ordering::SeqCst) {
            return self.write_zeroes(lba, lba_count).await;
        }
        self.maybe_yield().await;
        self.range(lba, lba_count)?;
        // A hint: counted, but the bytes stay.
        self.admit_write()?;
        Ok(())
    }
    fn unmap_zeroes(&self) -> bool {
        self.unmap_zeroes.load(Ordering::SeqCst)
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.maybe_yield().await;
        if self.read_only {
            return Ok(());
        }
        if self.admit_flush() {
            self.disk().flush();
            self.flushes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
    fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::SeqCst)
    }
    fn copy_source(&self) -> Option<crate::CopySrc> {
        if !self.copy.load(Ordering::SeqCst) {
            return None;
        }
        Some(Arc::new(MemCopySrc(self.me.upgrade()?)))
    }
    fn can_copy_from(&self, src: &crate::CopySrc) -> bool {
        self.copy.load(Ordering::SeqCst)
            && !self.read_only
            && src.downcast_ref::<MemCopySrc>().is_some()
    }
    async fn copy_from(
        &self,
        src: &crate::CopySrc,
        src_offset: u64,
        lba: u64,
        lba_count: u64,
    ) -> std::io::Result<()> {
        let err = std::io::Error::from_raw_os_error;
        let Some(MemCopySrc(from)) = src.downcast_ref::<MemCopySrc>() else {
            return Err(err(libc::ENOTSUP));
        };
        if !self.can_copy_from(src) {
            return Err(err(libc::ENOTSUP));
        }
        self.maybe_yield().await;
        let (s, e) = self.range(lba, lba_count)?;
        let so = src_offset as usize;
        // Read the source first: it may be this very device (locked once at a time).
        let bytes = from
            .disk()
            .visible()
            .get(so..so + (e - s))
            .ok_or_else(|| err(libc::EINVAL))?
            .to_vec();
        if self.admit_write()? {
            self.apply(s, Some(&bytes), e - s);
        }
        self.copies.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
