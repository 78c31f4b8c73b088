//! lvol integration tests, one binary; each module is one behaviour. The shared harness is
//! `test_support` (features `bdev`, `lvol`). `crash_lvol.rs` (the power-loss sweep) stays a
//! binary of its own.

mod bs_dev;
mod direct_io;
mod esnap;
mod esnap_block_sizes;
mod failing_device;
mod lvol_ops;
mod rpc;
mod spdk_fixtures;
mod store_lifecycle;
mod zero_allocation_io;
