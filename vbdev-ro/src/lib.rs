//! vbdev-ro: a read-only virtual bdev over any bdev.
//!
//! Owns [`RoBdev`] (a [`bdev_core::BlockDevice`] that forwards reads to a base bdev and
//! refuses every write-class I/O type with ENOTSUP), its life cycle ([`create`], [`delete`],
//! surprise removal and resize of the base) and its JSON-RPC methods ([`RoRpc`]:
//! `bdev_ro_create`, `bdev_ro_delete`). It does not know about blobstores, lvols or sockets.
//!
//! Life cycle:
//! - [`create`] opens the base read-only and claims it `read_many_write_none`: other read-only
//!   bdevs and esnap clones may share the base, nobody may open it for writing (EPERM) until
//!   the last such claim is gone. The read-only bdev claims itself the same way, so a write
//!   open of it fails with EPERM too.
//! - Surprise removal of the base: a listener task (run with [`bdev_core::Registry::spawn`])
//!   sees the base's `Remove` event, unregisters the read-only bdev (its openers get `Remove`
//!   and the registry waits until they closed), then drops the base descriptor so that the
//!   base's own removal completes. Reads in flight complete; later ones fail with EIO.
//! - Resize of the base: the read-only bdev takes the new size and sends `Resize` to its
//!   openers.

mod bdev;
mod error;
mod rpc;

pub use bdev::{create, delete, RoBdev, RoOpts, MODULE_NAME, PRODUCT_NAME};
pub use error::{Result, RoError};
pub use rpc::RoRpc;
