//! Backends: `malloc`, `aio` (io_uring or thread pool) and the error-injection bdev.
//! (Contract only; implemented in the bdev-core issue.)

pub mod aio;
pub mod error;
pub mod malloc;
