//! bdev-core: the block-device layer every other crate stands on.
//!
//! Owns the [`BlockDevice`] trait (what a device is and the async I/O it serves), the
//! [`Registry`] (devices by name, alias and UUID, with uniqueness enforced), [`Descriptor`]s
//! (read-only or read-write opens, claims, remove and resize events, bounds checks and
//! in-flight tracking), examine hooks, and the backends: `malloc`, `aio` (io_uring with a
//! thread-pool fallback) and the error-injection bdev.
//!
//! It knows nothing about blobstores, lvols or RPC sockets: modules above it implement
//! [`BlockDevice`] for their own devices and describe themselves with JSON values.
//!
//! # I/O model
//!
//! Every I/O call takes an owned [`IoBuf`] and hands it back on completion, so io_uring can
//! own the memory while the kernel uses it. The library is runtime-agnostic: any executor can
//! drive the futures. [`reactor::block_on`] is the fast path for a thread dedicated to I/O
//! (SPDK's reactor): aio requests issued under it are submitted and reaped by that thread
//! itself, with no hop through a completion thread. The data path ([`Descriptor::read_io`],
//! [`BlockDevice::read_io`] and the write forms) returns [`IoFuture`]s, which keep each
//! layer's future inline instead of boxing it: no allocation per request in steady state. Elsewhere, each aio bdev's ring has a
//! completion thread; the thread-pool engine runs blocking `pread`/`pwrite` on a small pool.
//!
//! # Events and removal
//!
//! [`Registry::unregister`] sends [`BdevEvent::Remove`] to every open descriptor and waits
//! (asynchronously) until all of them are closed; meanwhile I/O through them still works.
//! Then it calls [`BlockDevice::destruct`]. [`Registry::notify_resize`] sends
//! [`BdevEvent::Resize`].
//!
//! # Testing
//!
//! The `test-util` feature exposes the `conformance` module: device checks that any
//! backend (including ones in other crates) can run.

pub mod backend;
pub mod config;
#[cfg(feature = "test-util")]
pub mod conformance;
mod desc_slot;
mod device;
mod error;
pub mod iofuture;
pub mod reactor;
mod registry;
pub mod rpc;
pub mod stats;

pub use backend::copy::CopySource;
pub use desc_slot::{DescGuard, DescSlot};
pub use device::{BdevEvent, BlockDevice, ClaimType, IoType};
pub use error::{BdevError, Result};
pub use iobuf::IoBuf;
pub use iofuture::{IoFuture, Recovered};
pub use registry::{Descriptor, ExamineHook, Registry};
