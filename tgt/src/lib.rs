//! tgt: the RPC target. It owns the JSON-RPC server (SPDK's framing and error conventions,
//! driven unchanged by SPDK's `spdk-rpc` client), the framework methods, config dump and
//! replay, the bdev-level methods over bdev-core's backends, and a userspace NBD server.
//!
//! It does not own any device logic: module crates (bdev-core, lvol, vbdev-ro) implement
//! `RpcModule` and `ExamineHook`, and [`modules`] wires them in. No crate below this one knows
//! about sockets.

pub mod bdev_rpc;
pub mod config;
pub mod framework;
pub mod iostat;
pub mod jsonrpc;
pub mod limits;
pub mod listing;
pub mod log;
pub mod metrics;
pub mod modules;
pub mod nbd;
pub mod persist;
pub mod saveconf;
pub mod server;
pub mod sockpath;
pub mod target;
