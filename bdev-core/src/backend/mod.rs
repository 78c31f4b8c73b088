//! Backends: `malloc` (RAM), `aio` (file or block device; io_uring or a thread pool), the
//! error-injection bdev, and `cached` (RAM behind a volatile write cache, for crash tests). Each implements [`crate::BlockDevice`] and describes itself for
//! `bdev_get_bdevs` (`driver_specific`) and `save_config` (`write_config`).

pub mod aio;
pub mod cached;
pub mod copy;
pub mod error;
pub mod malloc;
pub mod null;
pub(crate) mod uring;
