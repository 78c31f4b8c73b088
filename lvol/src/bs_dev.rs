//! [`BdevBsDev`]: a bdev-core [`Descriptor`] seen as a blobstore [`BsDev`] (SPDK
//! `module/blob/bdev/blob_bdev.c`). Used for an lvol store's base device (read-write) and for
//! the external snapshots of esnap clones (read-only).

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bdev_core::{BlockDevice, Descriptor};
use blobstore::BsDev;
use iobuf::IoBuf;

/// A blobstore device over an open bdev descriptor. The descriptor can be closed early with
/// [`BdevBsDev::close`] (hot-remove): in-flight requests keep their own reference and finish,
/// later requests fail with ENODEV.
pub struct BdevBsDev {
    desc: RwLock<Option<Arc<Descriptor>>>,
    dev: Arc<dyn BlockDevice>,
    block_len: u32,
}

fn enodev() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::ENODEV)
}

impl BdevBsDev {
    /// Wraps an open descriptor.
    pub fn new(desc: Descriptor) -> Self {
        let dev = desc.device().clone();
        let block_len = dev.block_len();
        BdevBsDev {
            desc: RwLock::new(Some(Arc::new(desc))),
            dev,
            block_len,
        }
    }

    /// The bdev under the device.
    pub fn bdev(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// The descriptor, unless closed.
    pub fn descriptor(&self) -> Option<Arc<Descriptor>> {
        self.desc.read().ok().and_then(|d| d.clone())
    }

    /// Closes the descriptor (releasing its claim once in-flight requests are done).
    pub fn close(&self) {
        let taken = match self.desc.write() {
            Ok(mut d) => d.take(),
            Err(_) => None,
        };
        if let Some(d) = taken {
            d.release_claim();
        }
    }

    /// Whether [`BdevBsDev::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.descriptor().is_none()
    }

    fn desc_or_enodev(&self) -> std::io::Result<Arc<Descriptor>> {
        self.descriptor().ok_or_else(enodev)
    }
}

#[async_trait]
impl BsDev for BdevBsDev {
    fn block_len(&self) -> u32 {
        self.block_len
    }
    fn block_count(&self) -> u64 {
        self.dev.num_blocks()
    }
    fn buf_align(&self) -> usize {
        self.dev.buf_align()
    }
    async fn read(&self, lba: u64, buf: IoBuf) -> std::io::Result<IoBuf> {
        let d = self.desc_or_enodev()?;
        Ok(d.read(lba, buf).await?)
    }
    async fn write(&self, lba: u64, buf: IoBuf) -> std::io::Result<IoBuf> {
        let d = self.desc_or_enodev()?;
        Ok(d.write(lba, buf).await?)
    }
    async fn write_zeroes(&self, lba: u64, lba_count: u64) -> std::io::Result<()> {
        let d = self.desc_or_enodev()?;
        if d.device().io_type_supported(bdev_core::IoType::WriteZeroes) {
            return Ok(d.write_zeroes(lba, lba_count).await?);
        }
        // Fall back to writing zero buffers, one MiB at a time.
        let bl = u64::from(self.block_len);
        let chunk = ((1u64 << 20) / bl).max(1);
        let mut off = lba;
        let end = lba + lba_count;
        while off < end {
            let n = chunk.min(end - off);
            let buf = IoBuf::new((n * bl) as usize, self.dev.buf_align().max(1));
            d.write(off, buf).await?;
            off += n;
        }
        Ok(())
    }
    async fn unmap(&self, lba: u64, lba_count: u64) -> std::io::Result<()> {
        let d = self.desc_or_enodev()?;
        if d.device().io_type_supported(bdev_core::IoType::Unmap) {
            return Ok(d.unmap(lba, lba_count).await?);
        }
        // Unmap is advisory: a device without it keeps its data (and `unmap_zeroes` says
        // false, so the blobstore does not count the range as cleared).
        Ok(())
    }
    fn unmap_zeroes(&self) -> bool {
        self.dev.io_type_supported(bdev_core::IoType::Unmap) && self.dev.unmap_zeroes()
    }
    async fn flush(&self) -> std::io::Result<()> {
        let d = self.desc_or_enodev()?;
        // A device that keeps nothing volatile (RAM), or that has no flush at all, has
        // nothing to write back.
        if !self.dev.has_volatile_cache() || !self.dev.io_type_supported(bdev_core::IoType::Flush) {
            return Ok(());
        }
        Ok(d.flush().await?)
    }
}
