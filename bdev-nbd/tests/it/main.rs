//! bdev-nbd integration tests, one binary; each module is one behaviour. The shared harness is
//! `test_support`; `common` holds the qemu-nbd servers and the pattern files of these tests.

mod common;
mod esnap_remote_base;
mod network_partition;
mod qemu_nbd;
mod server_misbehaviour;
mod tgt_export;
