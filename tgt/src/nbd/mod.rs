//! The NBD export: a userspace NBD server so that qemu-img, qemu-io or any NBD client can
//! read and write bdevs.
//!
//! The wire protocol is the `nbd_proto` crate (shared with the client bdev and the fuzz
//! drivers); [`server`] is the tokio server (listeners, exports, connections), [`rpc`] the
//! `nbd_*` JSON-RPC methods.

pub mod rpc;
pub mod server;
