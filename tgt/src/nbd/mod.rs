//! The NBD export: a userspace NBD server so that qemu-img, qemu-io or any NBD client can
//! read and write bdevs.
//!
//! [`proto`] is the wire protocol as pure functions, [`server`] the tokio server (listeners,
//! exports, connections), [`rpc`] the `nbd_*` JSON-RPC methods.

pub mod proto;
pub mod rpc;
pub mod server;
