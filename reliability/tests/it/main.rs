//! Reliability evidence, one test binary; each module is one behaviour: model-based blobstore
//! sequences with power cuts, concurrency, fault injection, out of space, no data crossing
//! between volumes, power loss through the target, fuzz corpus replay, RPC robustness.

mod common;

mod blob_concurrency;
mod blob_isolation;
mod blob_model;
mod config_replay;
mod fault_injection;
mod fuzz_replay;
mod lvol_concurrency;
mod lvol_isolation;
mod out_of_space;
mod rpc_robustness;
mod tgt_power_loss;
