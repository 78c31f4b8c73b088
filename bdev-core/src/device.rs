//! The [`BlockDevice`] trait and the small types around it.

use async_trait::async_trait;
use iobuf::IoBuf;
use uuid::Uuid;

use crate::{IoFuture, Result};

/// I/O types, named as in SPDK's `supported_io_types` (the RPC layer prints them in this order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IoType {
    /// Read.
    Read,
    /// Write.
    Write,
    /// Unmap (trim).
    Unmap,
    /// Flush.
    Flush,
    /// Reset.
    Reset,
    /// Write zeroes.
    WriteZeroes,
    /// Seek to the next hole.
    SeekHole,
    /// Seek to the next data.
    SeekData,
}

impl IoType {
    /// Whether a device that serves every block operation (a RAM disk) supports the type:
    /// all but the seeks.
    pub fn is_block_op(self) -> bool {
        !matches!(self, IoType::SeekHole | IoType::SeekData)
    }

    /// Every I/O type, in SPDK's order.
    pub const ALL: [IoType; 8] = [
        IoType::Read,
        IoType::Write,
        IoType::Unmap,
        IoType::Flush,
        IoType::Reset,
        IoType::WriteZeroes,
        IoType::SeekHole,
        IoType::SeekData,
    ];

    /// SPDK's name for the type (`"write_zeroes"`, ...).
    pub fn spdk_name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Unmap => "unmap",
            IoType::Flush => "flush",
            IoType::Reset => "reset",
            IoType::WriteZeroes => "write_zeroes",
            IoType::SeekHole => "seek_hole",
            IoType::SeekData => "seek_data",
        }
    }
}

/// Claim types, as SPDK's bdev claims v2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimType {
    /// One writer, nobody else may write or claim (SPDK `exclusive_write`).
    ExclusiveWrite,
    /// Many readers, one writer: what an lvol store takes on its base (`read_many_write_one`).
    ReadManyWriteOne,
    /// Many readers, no writer: what esnap clones and read-only bdevs take (`read_many_write_none`).
    ReadManyWriteNone,
}

impl ClaimType {
    /// SPDK's name for the claim type, as `bdev_get_bdevs` prints it.
    pub fn spdk_name(self) -> &'static str {
        match self {
            ClaimType::ExclusiveWrite => "exclusive_write",
            ClaimType::ReadManyWriteOne => "read_many_write_one",
            ClaimType::ReadManyWriteNone => "read_many_write_none",
        }
    }
}

/// Events delivered to every open descriptor of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BdevEvent {
    /// The device is being unregistered (hot-remove); close the descriptor.
    Remove,
    /// The device changed size; the new size in blocks.
    Resize {
        /// New size in blocks.
        num_blocks: u64,
    },
}

/// Writes the identity methods of [`BlockDevice`] (`name`, `product_name`, `module_name`,
/// `uuid`, `block_len`, `num_blocks`) inside an `impl BlockDevice` block, so that the devices
/// that keep these facts in the usual fields say them one way.
///
/// - `device_facts!(product: "Malloc disk", module: "malloc")`: from the fields
///   `name: String`, `uuid: Uuid`, `block_len: u32` and `num_blocks: AtomicU64` (read with
///   `Acquire`: a resize stores it with `Release`).
/// - `device_facts!(product: "Null disk", module: "null", every_block_op)`: the same, and
///   `io_type_supported` answers [`IoType::is_block_op`] (a RAM disk).
/// - `device_facts!(product: "Error disk", module: "error", base: base)`: `name` and `uuid`
///   from the fields, the geometry from the field `base` (anything with `block_len()` and
///   `num_blocks()`, e.g. a [`crate::Descriptor`]), so that a base's resize shows at once.
#[macro_export]
macro_rules! device_facts {
    (product: $product:expr, module: $module:expr) => {
        $crate::device_facts!(@identity $product, $module);
        fn block_len(&self) -> u32 {
            self.block_len
        }
        fn num_blocks(&self) -> u64 {
            self.num_blocks.load(::std::sync::atomic::Ordering::Acquire)
        }
    };
    (product: $product:expr, module: $module:expr, every_block_op) => {
        $crate::device_facts!(product: $product, module: $module);
        fn io_type_supported(&self, io_type: $crate::IoType) -> bool {
            io_type.is_block_op()
        }
    };
    (product: $product:expr, module: $module:expr, base: $base:tt) => {
        $crate::device_facts!(@identity $product, $module);
        fn block_len(&self) -> u32 {
            self.$base.block_len()
        }
        fn num_blocks(&self) -> u64 {
            self.$base.num_blocks()
        }
    };
    (@identity $product:expr, $module:expr) => {
        fn name(&self) -> &str {
            &self.name
        }
        fn product_name(&self) -> &str {
            $product
        }
        fn module_name(&self) -> &str {
            $module
        }
        fn uuid(&self) -> ::uuid::Uuid {
            self.uuid
        }
    };
}

/// A block device. Implementations must be cheap to share (`Arc<dyn BlockDevice>`) and safe to
/// call from any thread. Offsets and lengths are in blocks of [`BlockDevice::block_len`] bytes;
/// a buffer's length must be a multiple of the block length.
///
/// Bounds, alignment, read-only and removal checks are done by [`crate::Descriptor`] before the
/// call reaches the device, so implementations may assume valid arguments.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Unique name.
    fn name(&self) -> &str;
    /// Product name as SPDK prints it (`"Malloc disk"`, `"AIO disk"`, `"Logical Volume"`).
    fn product_name(&self) -> &str;
    /// The module that owns the device (`"malloc"`, `"aio"`, `"lvol"`, `"ro"`, `"error"`).
    fn module_name(&self) -> &str;
    /// UUID of the device.
    fn uuid(&self) -> Uuid;
    /// Block size in bytes.
    fn block_len(&self) -> u32;
    /// Current size in blocks (may change on resize).
    fn num_blocks(&self) -> u64;
    /// Buffer alignment in bytes the device serves without a copy (1 = any): consumers
    /// allocate their buffers with it. A device that needs aligned memory (O_DIRECT) copies
    /// a request with another buffer through an aligned bounce buffer; it never fails it.
    fn buf_align(&self) -> usize {
        1
    }
    /// Optimal I/O boundary in blocks (0 = none).
    fn optimal_io_boundary(&self) -> u32 {
        0
    }
    /// Whether an I/O type is supported.
    fn io_type_supported(&self, io_type: IoType) -> bool;
    /// Reads `buf.len()` bytes at `offset_blocks` into `buf`, and returns the buffer.
    async fn read(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf>;
    /// Writes `buf` at `offset_blocks`, and returns the buffer.
    async fn write(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf>;
    /// [`BlockDevice::read`] without a heap allocation: the data path
    /// ([`crate::Descriptor::read_io`]) calls this. The default boxes `read`'s future;
    /// devices on the fast path return their future inline ([`IoFuture::new`]).
    fn read_io(&self, offset_blocks: u64, buf: IoBuf) -> IoFuture<'_, Result<IoBuf>> {
        IoFuture::boxed(self.read(offset_blocks, buf))
    }
    /// [`BlockDevice::write`] without a heap allocation (see [`BlockDevice::read_io`]).
    fn write_io(&self, offset_blocks: u64, buf: IoBuf) -> IoFuture<'_, Result<IoBuf>> {
        IoFuture::boxed(self.write(offset_blocks, buf))
    }
    /// Vectored read: the buffers are filled one after the other from `offset_blocks`.
    async fn readv(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        one_by_one(self.block_len(), offset_blocks, bufs, |off, b| {
            self.read(off, b)
        })
        .await
    }
    /// Vectored write.
    async fn writev(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        one_by_one(self.block_len(), offset_blocks, bufs, |off, b| {
            self.write(off, b)
        })
        .await
    }
    /// Flushes volatile caches: every write completed before the call is durable when it
    /// returns.
    async fn flush(&self) -> Result<()>;
    /// True when completed writes may sit in a volatile cache until a flush (a file in the
    /// page cache, a disk with a write-back cache, a remote disk). A device that answers
    /// `false` keeps nothing volatile, so its consumers may skip flushes that buy nothing.
    fn has_volatile_cache(&self) -> bool {
        true
    }
    /// Unmaps (trims) a range. Unless [`BlockDevice::unmap_zeroes`] says so, the range may
    /// read back its old bytes afterwards.
    async fn unmap(&self, offset_blocks: u64, num_blocks: u64) -> Result<()>;
    /// True when a completed unmap guarantees that the range reads back as zeroes.
    fn unmap_zeroes(&self) -> bool {
        false
    }
    /// Writes zeroes over a range.
    async fn write_zeroes(&self, offset_blocks: u64, num_blocks: u64) -> Result<()>;
    /// The file behind this device when another device can copy from it inside the kernel
    /// ([`BlockDevice::copy_from`]); `None` (the default) when there is none (RAM, remote).
    fn copy_source(&self) -> Option<crate::backend::copy::CopySource> {
        None
    }
    /// Whether [`BlockDevice::copy_from`] can copy from `src` (default: no).
    fn can_copy_from(&self, _src: &crate::backend::copy::CopySource) -> bool {
        false
    }
    /// Copies `num_blocks` blocks (of this device) starting at byte `src_offset` of `src`
    /// to `offset_blocks`, inside the kernel, without passing through user memory
    /// (`copy_file_range`, or a reflink). The default answers `ENOTSUP`: the caller then
    /// copies through memory.
    async fn copy_from(
        &self,
        _src: &crate::backend::copy::CopySource,
        _src_offset: u64,
        _offset_blocks: u64,
        _num_blocks: u64,
    ) -> Result<()> {
        Err(crate::BdevError::Io(std::io::Error::from_raw_os_error(
            libc::ENOTSUP,
        )))
    }
    /// Resets the device.
    async fn reset(&self) -> Result<()> {
        Ok(())
    }
    /// The `driver_specific` object of `bdev_get_bdevs` (e.g. `{"aio": {...}}`); `{}` by default.
    fn driver_specific(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    /// Writes [`BlockDevice::driver_specific`] as JSON text into `out` (listings write it
    /// straight into the response). A device may write it without building a `Value`.
    fn write_driver_specific(&self, out: &mut Vec<u8>) {
        if serde_json::to_writer(&mut *out, &self.driver_specific()).is_err() {
            out.extend_from_slice(b"{}");
        }
    }
    /// The `save_config` entry that re-creates this device (`{"method": ..., "params": ...}`),
    /// or `None` when the device comes back by itself (lvol bdevs).
    fn write_config(&self) -> Option<serde_json::Value> {
        None
    }
    /// Called once after the device was unregistered and its last descriptor closed.
    async fn destruct(&self) {}
}

/// The default vectored I/O: `op` on each buffer in turn, each at the block after the
/// previous one's end.
async fn one_by_one<F, Fut>(
    block_len: u32,
    offset_blocks: u64,
    bufs: Vec<IoBuf>,
    mut op: F,
) -> Result<Vec<IoBuf>>
where
    F: FnMut(u64, IoBuf) -> Fut,
    Fut: std::future::Future<Output = Result<IoBuf>>,
{
    let mut out = Vec::with_capacity(bufs.len());
    let mut off = offset_blocks;
    for b in bufs {
        let blocks = (b.len() / block_len as usize) as u64;
        out.push(op(off, b).await?);
        off += blocks;
    }
    Ok(out)
}

/// `Debug` of a device by its facts: type, name and geometry (what a log line needs).
pub(crate) fn debug_device(
    f: &mut std::fmt::Formatter<'_>,
    type_name: &str,
    dev: &dyn BlockDevice,
) -> std::fmt::Result {
    f.debug_struct(type_name)
        .field("name", &dev.name())
        .field("block_len", &dev.block_len())
        .field("num_blocks", &dev.num_blocks())
        .finish()
}
