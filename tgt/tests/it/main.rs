//! tgt integration tests, one binary; each module is one behaviour. Every test starts its
//! own `tgt` process and drives it with SPDK's own `spdk-rpc`, qemu-io / qemu-img over NBD,
//! or raw sockets; `common` holds the process, the tools and the raw clients.

mod common;
mod config_persistence;
mod hostile_clients;
mod io_statistics;
mod lvol_stores;
mod operator_methods;
mod prometheus_metrics;
mod reactor_statistics;
mod save_config_roundtrip;
mod spdk_rpc_client;
