//! reliability: tests-only crate holding the reliability evidence of issue 9.
//!
//! The library part owns the fuzz drivers shared by the cargo-fuzz targets in `fuzz/` and by
//! the replay tests of this crate (so CI on stable replays every corpus and regression file
//! through exactly the code the fuzzer runs). The tests in `tests/` hold the model-based
//! proptest, the concurrency, fault-injection, out-of-space, isolation and RPC robustness
//! tests. It owns no production code: bugs found here are fixed in the crate that owns them.

pub mod fuzz;
