//! File or block-device bdev (SPDK `bdev_aio`), io_uring with a thread-pool fallback.
//! (Contract only.)

use std::path::PathBuf;
use std::sync::Arc;

use uuid::Uuid;

use crate::Result;

/// Which engine serves the I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AioEngine {
    /// io_uring when the kernel allows it, else the thread pool.
    #[default]
    Auto,
    /// io_uring only (error if unavailable).
    Uring,
    /// Blocking pread/pwrite on a small thread pool.
    ThreadPool,
}

/// Options of an aio bdev (the `bdev_aio_create` parameters plus ours).
#[derive(Clone, Debug, Default)]
pub struct AioOpts {
    /// Bdev name.
    pub name: String,
    /// File or block device path.
    pub filename: PathBuf,
    /// Block size; `None` = auto-detect (logical block size of a block device, 512 for a file).
    pub block_len: Option<u32>,
    /// Open read-only.
    pub readonly: bool,
    /// Use fallocate for unmap and write_zeroes.
    pub fallocate: bool,
    /// RWF_NOWAIT (accepted, recorded in the config).
    pub nowait: bool,
    /// Fixed UUID (else random).
    pub uuid: Option<Uuid>,
    /// Open with O_DIRECT.
    pub direct: bool,
    /// Engine choice.
    pub engine: AioEngine,
}

/// A bdev over a file or block device. Product name `"AIO disk"`.
pub struct AioBdev {
    _private: (),
}

impl AioBdev {
    /// Opens the file and creates (does not register) the bdev.
    pub fn create(opts: AioOpts) -> Result<Arc<Self>> {
        let _ = opts;
        todo!()
    }
    /// The engine actually in use.
    pub fn engine(&self) -> AioEngine {
        todo!()
    }
    /// Re-reads the file size (SPDK `bdev_aio_rescan`); returns the new size in blocks.
    /// The caller then calls `Registry::notify_resize`.
    pub fn rescan(&self) -> Result<u64> {
        todo!()
    }
}
