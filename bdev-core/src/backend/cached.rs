//! A RAM device behind a volatile write cache, for crash tests (module `"cached"`).
//!
//! A [`CachedBdev`] serves reads from what was written (like malloc) but keeps, through
//! [`crashsim::CacheDisk`], what a power cut would leave: writes completed since the last
//! completed flush may be lost in any subset, and a multi-block write may tear at block
//! (io-unit) granularity. Unmap and write_zeroes go through the cache too (an unmap zeroes its
//! range, so [`BlockDevice::unmap_zeroes`] is true, and an unflushed unmap may be lost like
//! any write).
//!
//! Every write, unmap, write_zeroes and flush is also appended to a log, from a starting point
//! set by [`CachedBdev::mark`] (creation by default). [`CachedBdev::crash_image`] gives the
//! image a power cut would leave now, [`CachedBdev::crash_image_at`] the image a cut after the
//! first `n` logged events would have left, and [`CachedBdev::for_each_cut`] walks every cut
//! point of the log in one replay (a crash sweep). [`CachedBdev::resize`] grows or shrinks the
//! device (logged too), for tests of a store that grows onto its device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
/// The crash model's types, re-exported so that tests need no dependency of their own.
pub use crashsim::{CacheDisk, CrashPlan};
use iobuf::IoBuf;
use uuid::Uuid;

use crate::{BdevError, BlockDevice, Result};

/// One logged device event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheEvent {
    /// A completed write (write, unmap or write_zeroes) of `data` at byte `offset`.
    Write {
        /// Byte offset.
        offset: usize,
        /// The bytes written (zeroes for unmap / write_zeroes).
        data: Vec<u8>,
    },
    /// A completed flush.
    Flush,
    /// The device grew or shrank to `len` bytes (new bytes are durable zeroes).
    Resize {
        /// New size in bytes.
        len: usize,
    },
}

struct State {
    /// The device now.
    disk: CacheDisk,
    /// The device at the mark: replaying `log` over it gives `disk`.
    at_mark: CacheDisk,
    log: Vec<CacheEvent>,
    writes: u64,
    flushes: u64,
}

/// A RAM device with a write-back cache crash model. Product name `"Cached RAM disk"`.
pub struct CachedBdev {
    name: String,
    uuid: Uuid,
    block_len: u32,
    num_blocks: AtomicU64,
    state: Mutex<State>,
    /// Every write is durable at once (no volatile cache): a control for crash tests.
    write_through: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for CachedBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::device::debug_device(f, "CachedBdev", self)
    }
}

/// Largest device this test backend accepts (it keeps two full images in RAM).
const MAX_BYTES: u64 = 1 << 30;

impl CachedBdev {
    /// A zeroed device of `num_blocks` blocks of `block_len` bytes (a multiple of 512, at most
    /// 1 GiB in all: EINVAL otherwise). A `None` uuid gets a random one.
    pub fn create(
        name: &str,
        num_blocks: u64,
        block_len: u32,
        uuid: Option<Uuid>,
    ) -> Result<Arc<Self>> {
        let bytes = Self::check(name, num_blocks, block_len)?;
        Ok(Self::build(name, vec![0; bytes], block_len, uuid))
    }

    /// A device whose durable content is `image` (a crash image being opened again). The
    /// length must be a non-zero multiple of `block_len` (EINVAL).
    pub fn from_image(
        name: &str,
        image: Vec<u8>,
        block_len: u32,
        uuid: Option<Uuid>,
    ) -> Result<Arc<Self>> {
        if block_len == 0 || !(image.len() as u64).is_multiple_of(u64::from(block_len)) {
            return Err(BdevError::InvalidArgument(format!(
                "image of {} bytes is not a whole number of {block_len}-byte blocks",
                image.len()
            )));
        }
        Self::check(name, image.len() as u64 / u64::from(block_len), block_len)?;
        Ok(Self::build(name, image, block_len, uuid))
    }

    fn check(name: &str, num_blocks: u64, block_len: u32) -> Result<usize> {
        super::malloc::check_name_and_block_len(name, block_len)?;
        match num_blocks.checked_mul(u64::from(block_len)) {
            Some(b) if b > 0 && b <= MAX_BYTES => Ok(b as usize),
            _ => Err(BdevError::InvalidArgument(format!(
                "{num_blocks} blocks of {block_len} bytes: need 1 byte to 1 GiB"
            ))),
        }
    }

    fn build(name: &str, image: Vec<u8>, block_len: u32, uuid: Option<Uuid>) -> Arc<Self> {
        let num_blocks = image.len() as u64 / u64::from(block_len);
        let disk = CacheDisk::new(image, block_len as usize);
        Arc::new(CachedBdev {
            name: name.to_string(),
            uuid: uuid.unwrap_or_else(Uuid::new_v4),
            block_len,
            num_blocks: AtomicU64::new(num_blocks),
            write_through: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(State {
                at_mark: disk.clone(),
                disk,
                log: Vec::new(),
                writes: 0,
                flushes: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record_write(&self, offset: usize, data: &[u8]) {
        let mut st = self.lock();
        st.disk.write(offset, data);
        st.log.push(CacheEvent::Write {
            offset,
            data: data.to_vec(),
        });
        st.writes += 1;
        if self.write_through.load(Ordering::Acquire) {
            st.disk.flush();
            st.log.push(CacheEvent::Flush);
        }
    }

    /// Makes every later write durable as it completes (logged as the write and a flush),
    /// as on a device without a volatile cache; `has_volatile_cache` then says false. A
    /// control for crash tests: what fails on the write-back device but passes here is a
    /// missing flush.
    pub fn set_write_through(&self, on: bool) {
        self.write_through.store(on, Ordering::Release);
    }

    fn byte_range(&self, offset_blocks: u64, num_blocks: u64) -> (usize, usize) {
        let bl = u64::from(self.block_len);
        ((offset_blocks * bl) as usize, (num_blocks * bl) as usize)
    }

    /// Grows or shrinks the device to `num_blocks` (at most 1 GiB in all: EINVAL); the caller
    /// then calls `Registry::notify_resize`. New blocks read zeroes and are durable.
    pub fn resize(&self, num_blocks: u64) -> Result<()> {
        let len = Self::check(&self.name, num_blocks, self.block_len)?;
        let mut st = self.lock();
        st.disk.resize(len);
        st.log.push(CacheEvent::Resize { len });
        self.num_blocks.store(num_blocks, Ordering::Release);
        Ok(())
    }

    /// Starts a new log: the device as it is now becomes cut point 0.
    pub fn mark(&self) {
        let mut st = self.lock();
        st.at_mark = st.disk.clone();
        st.log.clear();
    }

    /// Events logged since the mark (writes, unmaps, write_zeroes and flushes).
    pub fn events(&self) -> usize {
        self.lock().log.len()
    }

    /// The events logged since the mark.
    pub fn log(&self) -> Vec<CacheEvent> {
        self.lock().log.clone()
    }

    /// Writes (including unmaps and write_zeroes) completed since creation.
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Flushes completed since creation.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    /// Writes completed since the last flush (what a crash may lose).
    pub fn unflushed_writes(&self) -> usize {
        self.lock().disk.pending_writes()
    }

    /// What a reader sees now.
    pub fn visible(&self) -> Vec<u8> {
        self.lock().disk.visible().to_vec()
    }

    /// The image a power cut now would leave under `plan`.
    pub fn crash_image(&self, plan: CrashPlan) -> Vec<u8> {
        self.lock().disk.crash_image(plan)
    }

    /// The image a power cut right after the first `cut` logged events would have left under
    /// `plan` (`cut` is clamped to [`CachedBdev::events`]).
    pub fn crash_image_at(&self, cut: usize, plan: CrashPlan) -> Vec<u8> {
        let (mut disk, log) = {
            let st = self.lock();
            let n = cut.min(st.log.len());
            (st.at_mark.clone(), st.log[..n].to_vec())
        };
        for e in &log {
            apply(&mut disk, e);
        }
        disk.crash_image(plan)
    }

    /// Calls `f(cut, state)` for every cut point `0..=events()` with the device state a power
    /// cut there would start from (take images with [`CacheDisk::crash_image`]). One replay
    /// of the log serves every cut. `f` may stop the walk early by returning `false`.
    pub fn for_each_cut(&self, mut f: impl FnMut(usize, &CacheDisk) -> bool) {
        let (mut disk, log) = {
            let st = self.lock();
            (st.at_mark.clone(), st.log.clone())
        };
        if !f(0, &disk) {
            return;
        }
        for (i, e) in log.iter().enumerate() {
            apply(&mut disk, e);
            if !f(i + 1, &disk) {
                return;
            }
        }
    }
}

fn apply(disk: &mut CacheDisk, e: &CacheEvent) {
    match e {
        CacheEvent::Write { offset, data } => disk.write(*offset, data),
        CacheEvent::Flush => disk.flush(),
        CacheEvent::Resize { len } => disk.resize(*len),
    }
}

#[async_trait]
impl BlockDevice for CachedBdev {
    crate::device_facts!(product: "Cached RAM disk", module: "cached", every_block_op);
    async fn read(&self, offset_blocks: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let (off, _) = self.byte_range(offset_blocks, 0);
        let len = buf.len();
        buf.copy_from_slice(&self.lock().disk.visible()[off..off + len]);
        Ok(buf)
    }
    async fn write(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        let (off, _) = self.byte_range(offset_blocks, 0);
        self.record_write(off, &buf);
        Ok(buf)
    }
    async fn writev(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        // One request: it is cached (and may tear) as one write.
        let (off, _) = self.byte_range(offset_blocks, 0);
        let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        self.record_write(off, &all);
        Ok(bufs)
    }
    async fn flush(&self) -> Result<()> {
        let mut st = self.lock();
        st.disk.flush();
        st.log.push(CacheEvent::Flush);
        st.flushes += 1;
        Ok(())
    }
    fn has_volatile_cache(&self) -> bool {
        !self.write_through.load(Ordering::Acquire)
    }
    fn unmap_zeroes(&self) -> bool {
        true
    }
    async fn unmap(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
        let (off, len) = self.byte_range(offset_blocks, num_blocks);
        self.record_write(off, &vec![0; len]);
        Ok(())
    }
    async fn write_zeroes(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
        let (off, len) = self.byte_range(offset_blocks, num_blocks);
        self.record_write(off, &vec![0; len]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    fn buf(byte: u8, blocks: usize) -> IoBuf {
        IoBuf::from_slice(&vec![byte; blocks * 512], 1)
    }

    #[test]
    fn flushed_writes_survive_and_unflushed_ones_may_not() {
        let d = CachedBdev::create("c", 8, 512, None).unwrap();
        block_on(d.write(0, buf(1, 1))).unwrap();
        block_on(d.flush()).unwrap();
        block_on(d.write(1, buf(2, 1))).unwrap();
        block_on(d.unmap(0, 1)).unwrap();
        assert_eq!(d.writes(), 3);
        assert_eq!(d.flushes(), 1);
        assert_eq!(d.unflushed_writes(), 2);
        // Reads see everything completed.
        let r = block_on(d.read(0, IoBuf::new(1024, 1))).unwrap();
        assert!(r[..512].iter().all(|&b| b == 0) && r[512..].iter().all(|&b| b == 2));
        let lose = d.crash_image(CrashPlan::LoseAll);
        assert!(lose[..512].iter().all(|&b| b == 1), "flushed write lost");
        assert!(
            lose[512..1024].iter().all(|&b| b == 0),
            "unflushed write kept"
        );
        let keep = d.crash_image(CrashPlan::KeepAll);
        assert!(keep[..512].iter().all(|&b| b == 0) && keep[512..1024].iter().all(|&b| b == 2));
    }

    #[test]
    fn cut_points_replay_the_log() {
        let d = CachedBdev::create("c", 8, 512, None).unwrap();
        block_on(d.write(0, buf(9, 1))).unwrap();
        d.mark();
        block_on(d.write(1, buf(1, 1))).unwrap();
        block_on(d.flush()).unwrap();
        block_on(d.write_zeroes(0, 1)).unwrap();
        assert_eq!(d.events(), 3);
        assert_eq!(d.log()[1], CacheEvent::Flush);
        // Cut 0: only what was there at the mark, and the pre-mark write is unflushed.
        let img = d.crash_image_at(0, CrashPlan::KeepAll);
        assert_eq!((img[0], img[512]), (9, 0));
        assert_eq!(d.crash_image_at(0, CrashPlan::LoseAll)[0], 0);
        // Cut 2 (after the flush): both writes are durable.
        let img = d.crash_image_at(2, CrashPlan::LoseAll);
        assert_eq!((img[0], img[512]), (9, 1));
        let mut seen = Vec::new();
        d.for_each_cut(|cut, disk| {
            let img = disk.crash_image(CrashPlan::KeepAll);
            seen.push((cut, img[0], img[512]));
            true
        });
        assert_eq!(seen, [(0, 9, 0), (1, 9, 1), (2, 9, 1), (3, 0, 1)]);
    }

    #[test]
    fn random_crashes_tear_a_multi_block_write_at_block_granularity() {
        let d = CachedBdev::create("c", 8, 512, None).unwrap();
        block_on(d.write(0, buf(5, 8))).unwrap();
        let mut torn = false;
        for seed in 0..32 {
            let img = d.crash_image(CrashPlan::Random(seed));
            let kept = img.chunks(512).filter(|b| b[0] == 5).count();
            for b in img.chunks(512) {
                assert!(b.iter().all(|&x| x == b[0]), "torn inside a block");
            }
            torn |= kept > 0 && kept < 8;
        }
        assert!(torn);
    }

    #[test]
    fn write_through_makes_every_write_durable() {
        let d = CachedBdev::create("c", 8, 512, None).unwrap();
        assert!(d.has_volatile_cache());
        d.set_write_through(true);
        assert!(!d.has_volatile_cache());
        block_on(d.write(0, buf(4, 2))).unwrap();
        assert_eq!(d.unflushed_writes(), 0);
        assert_eq!(&d.crash_image(CrashPlan::LoseAll)[..1024], &[4; 1024][..]);
        assert_eq!(d.events(), 2, "the write and its flush");
    }

    #[test]
    fn bad_sizes_are_einval_and_images_reopen() {
        assert!(CachedBdev::create("c", 0, 512, None).is_err());
        assert!(CachedBdev::create("c", 8, 500, None).is_err());
        assert!(CachedBdev::create("c", u64::MAX, 4096, None).is_err());
        assert!(CachedBdev::from_image("c", vec![0; 700], 512, None).is_err());
        let d = CachedBdev::from_image("c", vec![3; 1024], 512, None).unwrap();
        assert_eq!(d.num_blocks(), 2);
        assert_eq!(d.crash_image(CrashPlan::LoseAll), vec![3; 1024]);
    }
}
