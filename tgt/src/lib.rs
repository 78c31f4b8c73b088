//! tgt: the RPC target. It owns the JSON-RPC server (SPDK's framing and error conventions,
//! driven unchanged by SPDK's `spdk-rpc` client), the method table and the framework
//! methods, config dump and replay, `bdev_get_bdevs`, and a userspace NBD server.
//!
//! It does not own any device logic: module crates (bdev-core and its backends, lvol,
//! vbdev-ro, bdev-nbd) implement `RpcModule` and `ExamineHook`, and [`modules`] wires them
//! in. No crate below this one knows about sockets.
//!
//! Public: what the binary, the tests and the fuzz drivers use ([`target::Target`],
//! [`modules::wiring`], [`server`], [`config`] replay, [`jsonrpc`] framing, [`log`],
//! [`limits`], [`nbd::server`]). The rest is internal.

mod bdev_rpc;
pub mod config;
mod framework;
pub mod iostat;
pub mod jsonrpc;
pub mod limits;
pub mod listing;
pub mod log;
pub mod metrics;
pub mod modules;
pub mod nbd;
pub mod persist;
pub mod reactor_stats;
pub mod saveconf;
pub mod server;
mod sockpath;
pub mod target;
