//! The narrow device trait the blobstore runs on (SPDK `struct spdk_bs_dev`).

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use iobuf::IoBuf;

/// An opaque handle a device hands out so that another device can copy from it inside the
/// kernel ([`BsDev::copy_source`], [`BsDev::copy_from`]); only the two device
/// implementations know what it holds (for `lvol`, the bdev's file).
pub type CopySrc = Arc<dyn Any + Send + Sync>;

/// A device under (or behind) a blobstore. Offsets and lengths are in blocks of `block_len`.
/// Errors are `std::io::Error` carrying an errno (`raw_os_error`).
#[async_trait]
pub trait BsDev: Send + Sync + 'static {
    /// Block size in bytes.
    fn block_len(&self) -> u32;
    /// Size in blocks.
    fn block_count(&self) -> u64;
    /// Required buffer alignment in bytes.
    fn buf_align(&self) -> usize {
        1
    }
    /// Reads `buf.len()` bytes at `lba`.
    async fn read(&self, lba: u64, buf: IoBuf) -> std::io::Result<IoBuf>;
    /// Writes `buf` at `lba`.
    async fn write(&self, lba: u64, buf: IoBuf) -> std::io::Result<IoBuf>;
    /// Writes zeroes over `lba_count` blocks.
    async fn write_zeroes(&self, lba: u64, lba_count: u64) -> std::io::Result<()>;
    /// Unmaps `lba_count` blocks. Unless [`BsDev::unmap_zeroes`] says so, the range may keep
    /// its old bytes afterwards: the blobstore must not count it as cleared.
    async fn unmap(&self, lba: u64, lba_count: u64) -> std::io::Result<()>;
    /// True when a completed [`BsDev::unmap`] guarantees that the range reads back as zeroes.
    fn unmap_zeroes(&self) -> bool {
        false
    }
    /// Makes every write completed before the call durable (a device with a volatile write
    /// cache writes it back). Required: a device with nothing to write back says so by
    /// returning `Ok(())`, so that no implementation forgets flushes by inheriting a default.
    async fn flush(&self) -> std::io::Result<()>;
    /// What another device needs to copy from this one without user memory, or `None` (the
    /// default: copy-on-write then reads through memory).
    fn copy_source(&self) -> Option<CopySrc> {
        None
    }
    /// Whether [`BsDev::copy_from`] can copy from `src` (default: no).
    fn can_copy_from(&self, _src: &CopySrc) -> bool {
        false
    }
    /// Copies `lba_count` blocks (of this device) from byte `src_offset` of `src` to `lba`
    /// without passing through user memory (`copy_file_range`, a reflink). The default
    /// answers `ENOTSUP`; on any error the blobstore copies through memory instead.
    async fn copy_from(
        &self,
        _src: &CopySrc,
        _src_offset: u64,
        _lba: u64,
        _lba_count: u64,
    ) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::ENOTSUP))
    }
    /// True if the range is known to read as zeroes (lets copy-on-write skip the copy).
    fn is_zeroes(&self, _lba: u64, _lba_count: u64) -> bool {
        false
    }
    /// True if the device cannot serve reads (a missing external snapshot).
    fn is_degraded(&self) -> bool {
        false
    }
    /// The device as `Any`, for a user that knows the implementation and has a faster way
    /// to reach it than this trait (the lvol layer issues steady-state requests on its own
    /// adapter's descriptor); `None` (the default) keeps it opaque.
    fn as_any(&self) -> Option<&dyn Any> {
        None
    }
}

/// The [`BsDev`] impl of a device without data of its own: it refuses writes with EPERM and
/// has nothing to flush; `$read` is what a read of `$buf` returns, `$zeroes` whether it
/// reads as zeroes, `$degraded` whether it stands for something missing.
macro_rules! no_data_dev {
    ($ty:ty, blocks: $blocks:expr, zeroes: $zeroes:expr, degraded: $degraded:expr,
     read($buf:ident) $read:block) => {
        #[async_trait]
        impl BsDev for $ty {
            fn block_len(&self) -> u32 {
                512
            }
            fn block_count(&self) -> u64 {
                $blocks
            }
            #[allow(unused_mut)]
            async fn read(&self, _lba: u64, mut $buf: IoBuf) -> std::io::Result<IoBuf> {
                $read
            }
            async fn write(&self, _lba: u64, _buf: IoBuf) -> std::io::Result<IoBuf> {
                Err(std::io::Error::from_raw_os_error(libc::EPERM))
            }
            async fn write_zeroes(&self, _lba: u64, _lba_count: u64) -> std::io::Result<()> {
                Err(std::io::Error::from_raw_os_error(libc::EPERM))
            }
            async fn unmap(&self, _lba: u64, _lba_count: u64) -> std::io::Result<()> {
                Err(std::io::Error::from_raw_os_error(libc::EPERM))
            }
            async fn flush(&self) -> std::io::Result<()> {
                // Never written: nothing to make durable.
                Ok(())
            }
            fn is_zeroes(&self, _lba: u64, _lba_count: u64) -> bool {
                $zeroes
            }
            fn is_degraded(&self) -> bool {
                $degraded
            }
        }
    };
}

/// The zeroes device (SPDK `zeroes.c`): reads zeroes, refuses writes with EPERM.
pub struct ZeroesDev;

no_data_dev!(ZeroesDev, blocks: u64::MAX, zeroes: true, degraded: false, read(buf) {
    buf.fill(0);
    Ok(buf)
});

/// The device that stands in for a missing external snapshot: every read fails with EIO,
/// it is never zeroes and it reports itself degraded; writes fail with EPERM.
pub struct MissingDev;

// Large, so that nothing is ever "past the end" (which would read as zeroes).
no_data_dev!(MissingDev, blocks: 1 << 50, zeroes: false, degraded: true, read(_buf) {
    Err(std::io::Error::from_raw_os_error(libc::EIO))
});
