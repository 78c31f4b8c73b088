//! blobcli integration tests, one binary; each module is one behaviour. The shared harness is
//! `test_support`; `common` holds SPDK's `test/app/match` rules and the blobcli runner.

mod commands;
mod common;
mod spdk_fixtures;
mod spdk_script;
