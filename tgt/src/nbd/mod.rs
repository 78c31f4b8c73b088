//! The NBD export: a userspace NBD server so that qemu-img, qemu-io or any NBD client can
//! read and write bdevs.
//!
//! The wire protocol is the `nbd_proto` crate (shared with the client bdev and the fuzz
//! drivers). [`server`] is the tokio server (listeners, reactors, shutdown); `exports` the
//! export table; `session` one connection (handshake, then the transmission loop); `rmw` the
//! byte-range I/O under it (partial blocks, buffer pool); `rpc` the `nbd_*` JSON-RPC methods.

mod exports;
mod range_lock;
mod rmw;
pub(crate) mod rpc;
pub mod server;
mod session;
mod slots;
#[cfg(test)]
mod tests;
