//! Test devices: [`MemBsDev`], an in-memory [`BsDev`] with power-loss and failure
//! injection (SPDK `bs_dev_common.c` thresholds). Enabled by the `testing` feature.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use iobuf::IoBuf;

use crate::BsDev;

/// What happens to writes after the threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// No fault.
    None,
    /// Writes after the k-th are silently dropped (power loss).
    DropAfter(u64),
    /// Writes after the k-th fail with EIO.
    FailAfter(u64),
}

/// An in-memory device. Writes, write_zeroes and unmaps count as writes.
pub struct MemBsDev {
    block_len: u32,
    blocks: AtomicU64,
    data: Mutex<Vec<u8>>,
    writes: AtomicU64,
    fault: Mutex<Fault>,
    degraded: AtomicBool,
    read_only: bool,
    yield_io: AtomicBool,
}

impl MemBsDev {
    /// A zeroed device of `blocks` blocks of `block_len` bytes.
    pub fn new(block_len: u32, blocks: u64) -> Arc<MemBsDev> {
        Self::from_bytes(block_len, vec![0; (block_len as u64 * blocks) as usize])
    }
    /// A device over `bytes` (length rounded down to whole blocks).
    pub fn from_bytes(block_len: u32, bytes: Vec<u8>) -> Arc<MemBsDev> {
        let blocks = bytes.len() as u64 / u64::from(block_len);
        Arc::new(MemBsDev {
            block_len,
            blocks: AtomicU64::new(blocks),
            data: Mutex::new(bytes),
            writes: AtomicU64::new(0),
            fault: Mutex::new(Fault::None),
            degraded: AtomicBool::new(false),
            read_only: false,
            yield_io: AtomicBool::new(false),
        })
    }
    /// A read-only device over `bytes` (an esnap base).
    pub fn read_only(block_len: u32, bytes: Vec<u8>) -> Arc<MemBsDev> {
        let blocks = bytes.len() as u64 / u64::from(block_len);
        Arc::new(MemBsDev {
            block_len,
            blocks: AtomicU64::new(blocks),
            data: Mutex::new(bytes),
            writes: AtomicU64::new(0),
            fault: Mutex::new(Fault::None),
            degraded: AtomicBool::new(false),
            read_only: true,
            yield_io: AtomicBool::new(false),
        })
    }
    /// A copy of the bytes as they are now.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Sets the fault mode and resets the write counter.
    pub fn set_fault(&self, f: Fault) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = f;
        self.writes.store(0, Ordering::SeqCst);
    }
    /// Writes counted since the last `set_fault`.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
    /// Marks the device degraded (reads fail with EIO).
    pub fn set_degraded(&self, d: bool) {
        self.degraded.store(d, Ordering::SeqCst);
    }
    /// Makes every I/O yield once to the executor before completing.
    pub fn set_yield(&self, y: bool) {
        self.yield_io.store(y, Ordering::SeqCst);
    }
    /// Changes the reported size (grow / shrink tests); the bytes are extended with zeroes.
    pub fn resize(&self, blocks: u64) {
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        d.resize((blocks * u64::from(self.block_len)) as usize, 0);
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
        match *self.fault.lock().unwrap_or_else(|e| e.into_inner()) {
            Fault::None => Ok(true),
            Fault::DropAfter(t) => Ok(k <= t),
            Fault::FailAfter(t) if k > t => Err(std::io::Error::from_raw_os_error(libc::EIO)),
            Fault::FailAfter(_) => Ok(true),
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
        buf.copy_from_slice(&self.data.lock().unwrap_or_else(|e| e.into_inner())[s..e]);
        Ok(buf)
    }
    async fn write(&self, lba: u64, buf: IoBuf) -> std::io::Result<IoBuf> {
        self.maybe_yield().await;
        let (s, e) = self.range(lba, buf.len() as u64 / u64::from(self.block_len))?;
        if self.admit_write()? {
            self.data.lock().unwrap_or_else(|e| e.into_inner())[s..e].copy_from_slice(&buf);
        }
        Ok(buf)
    }
    async fn write_zeroes(&self, lba: u64, lba_count: u64) -> std::io::Result<()> {
        self.maybe_yield().await;
        let (s, e) = self.range(lba, lba_count)?;
        if self.admit_write()? {
            self.data.lock().unwrap_or_else(|e| e.into_inner())[s..e].fill(0);
        }
        Ok(())
    }
    async fn unmap(&self, lba: u64, lba_count: u64) -> std::io::Result<()> {
        self.write_zeroes(lba, lba_count).await
    }
    fn unmap_zeroes(&self) -> bool {
        true
    }
    async fn flush(&self) -> std::io::Result<()> {
        // Writes land in `data` at once: no volatile cache.
        Ok(())
    }
    fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::SeqCst)
    }
}
