//! A small in-memory test device with an optional per-read delay (so reads really are in
//! flight) and a resize knob. It needs only the `BlockDevice` trait.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bdev_core::{BlockDevice, IoBuf, IoType, Result};
use uuid::Uuid;

/// An in-memory device.
pub struct MemDev {
    name: String,
    uuid: Uuid,
    block_len: u32,
    num_blocks: AtomicU64,
    data: Mutex<Vec<u8>>,
    delay: Option<Duration>,
}

impl MemDev {
    /// A zeroed device of `num_blocks` blocks.
    pub fn new(name: &str, num_blocks: u64, block_len: u32, delay: Option<Duration>) -> Arc<Self> {
        Arc::new(MemDev {
            name: name.to_string(),
            uuid: Uuid::new_v4(),
            block_len,
            num_blocks: AtomicU64::new(num_blocks),
            data: Mutex::new(vec![0; (num_blocks * block_len as u64) as usize]),
            delay,
        })
    }

    /// Changes the size (zero-filling growth); the caller then notifies the registry.
    pub fn resize(&self, num_blocks: u64) {
        let mut d = self.data.lock().unwrap();
        d.resize((num_blocks * self.block_len as u64) as usize, 0);
        self.num_blocks.store(num_blocks, Ordering::Release);
    }

    fn range(&self, offset_blocks: u64, len: usize) -> std::ops::Range<usize> {
        let start = (offset_blocks * self.block_len as u64) as usize;
        start..start + len
    }
}

#[async_trait]
impl BlockDevice for MemDev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "Test memory disk"
    }
    fn module_name(&self) -> &str {
        "test_mem"
    }
    fn uuid(&self) -> Uuid {
        self.uuid
    }
    fn block_len(&self) -> u32 {
        self.block_len
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }
    fn io_type_supported(&self, io_type: IoType) -> bool {
        matches!(io_type, IoType::Read | IoType::Write | IoType::WriteZeroes)
    }
    async fn read(&self, offset_blocks: u64, mut buf: IoBuf) -> Result<IoBuf> {
        if let Some(d) = self.delay {
            futures_timer::Delay::new(d).await;
        }
        let r = self.range(offset_blocks, buf.len());
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(buf)
    }
    async fn write(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        let r = self.range(offset_blocks, buf.len());
        self.data.lock().unwrap()[r].copy_from_slice(&buf);
        Ok(buf)
    }
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    async fn unmap(&self, _offset_blocks: u64, _num_blocks: u64) -> Result<()> {
        Ok(())
    }
    async fn write_zeroes(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
        let r = self.range(offset_blocks, (num_blocks * self.block_len as u64) as usize);
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
}
