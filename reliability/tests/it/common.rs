//! What the reliability tests add to the shared harness (`test_support`, re-exported here):
//! faster degraded-read retries and 64 KiB clusters, and an errno check for racing calls.

use std::time::Duration;

use bdev_core::Registry;
use lvol::LvolModule;
pub use test_support::prelude::*;

/// The cluster size of every lvol store these tests make.
pub const CLUSTER: u32 = 64 * 1024;

/// The harness's registry and lvol module, with degraded esnap reads retried once after 2 ms
/// (the fault and concurrency tests make many reads of a missing base).
pub fn setup() -> (Registry, LvolModule) {
    setup_with_esnap_retry(1, Duration::from_millis(2))
}

/// Runs `test` on the registry and lvol module of [`setup`], under a 60 s timeout.
pub fn lvol_test<F, Fut>(test: F)
where
    F: FnOnce(Registry, LvolModule) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    with_timeout(60, || {
        let (reg, m) = setup();
        futures::executor::block_on(test(reg, m));
    });
}

/// Fails the test unless `errno` (of error `e`) is one of `ok`.
pub fn errno_in(e: &impl std::fmt::Display, errno: i32, ok: &[i32]) {
    assert!(ok.contains(&errno), "unexpected error {e} (errno {errno})");
}
