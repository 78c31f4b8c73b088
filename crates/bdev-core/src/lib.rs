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

pub mod backend;
#[cfg(feature = "test-util")]
pub mod conformance;
mod device;
mod error;
pub mod reactor;
mod registry;
pub mod rpc;

pub use device::{BdevEvent, BlockDevice, ClaimType, IoType};
pub use error::{BdevError, Result};
pub use iobuf::IoBuf;
pub use registry::{Descriptor, ExamineHook, Registry};
