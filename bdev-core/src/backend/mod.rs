//! Backends: `malloc` (RAM), `aio` (file or block device; io_uring or a thread pool), the
//! error-injection bdev, and `cached` (RAM behind a volatile write cache, for crash tests). Each implements [`crate::BlockDevice`] and describes itself for
//! `bdev_get_bdevs` (`driver_specific`) and `save_config` (`write_config`).
//! Each backend's JSON-RPC methods sit next to it (`*_rpc.rs`, one [`crate::rpc::RpcModule`]
//! each), so a config replay without a socket (`crate::config`) and the target serve the same
//! handlers.

pub mod aio;
pub mod aio_rpc;
pub mod cached;
pub mod copy;
pub mod error;
pub mod error_rpc;
pub mod malloc;
pub mod malloc_rpc;
pub mod null;
pub mod null_rpc;
pub(crate) mod uring;
