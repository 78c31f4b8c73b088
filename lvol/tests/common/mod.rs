//! Helpers of `crash_lvol.rs`, a test binary of its own: the shared harness.
#![allow(unused_imports)]

pub use test_support::prelude::*;
