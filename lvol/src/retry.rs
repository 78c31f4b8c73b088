//! The degraded-esnap retry: how I/O that fails for want of a missing external snapshot is
//! retried before it fails with EIO ([`EsnapRetry`], set by `bdev_lvol_set_esnap_retry`), and
//! the one loop that applies it ([`retry`]) to every lvol request (read, write, unmap,
//! write_zeroes).

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use blobstore::BsError;

/// Default number of retries of an I/O that needs a missing external snapshot.
pub const DEFAULT_ESNAP_RETRIES: u32 = 3;
/// Default delay between two such retries, in milliseconds.
pub const DEFAULT_ESNAP_RETRY_DELAY_MS: u64 = 100;

/// How I/O that needs a missing external snapshot is retried before it fails with EIO.
#[derive(Debug)]
pub struct EsnapRetry {
    retries: AtomicU32,
    delay_ms: AtomicU64,
    /// Retries done so far (metrics).
    retried: AtomicU64,
    /// Requests that failed with EIO after their retries (metrics).
    gave_up: AtomicU64,
}

impl Default for EsnapRetry {
    fn default() -> Self {
        EsnapRetry {
            retries: AtomicU32::new(DEFAULT_ESNAP_RETRIES),
            delay_ms: AtomicU64::new(DEFAULT_ESNAP_RETRY_DELAY_MS),
            retried: AtomicU64::new(0),
            gave_up: AtomicU64::new(0),
        }
    }
}

impl EsnapRetry {
    /// Number of retries after the first failure.
    pub fn retries(&self) -> u32 {
        self.retries.load(Ordering::Relaxed)
    }
    /// Delay between retries.
    pub fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::Relaxed))
    }
    /// Counts one retry.
    pub fn note_retry(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }
    /// Counts one request failed with EIO after its retries.
    pub fn note_eio(&self) {
        self.gave_up.fetch_add(1, Ordering::Relaxed);
    }
    /// (retries done, requests failed with EIO) since start.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.retried.load(Ordering::Relaxed),
            self.gave_up.load(Ordering::Relaxed),
        )
    }
    /// Sets both values.
    pub fn set(&self, retries: u32, delay: Duration) {
        self.retries.store(retries, Ordering::Relaxed);
        self.delay_ms.store(
            delay.as_millis().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }
}

/// Whether an error is what a missing base gives (the degraded device's EIO, or ENODEV).
pub(crate) fn is_missing_base(e: &BsError) -> bool {
    matches!(e.errno(), libc::EIO | libc::ENODEV)
}

/// Why [`retry`] gave up.
#[derive(Debug)]
pub(crate) enum GaveUp {
    /// A failure the policy does not retry: reported as it is.
    Failed(BsError),
    /// Every retry failed for want of the base: reported as EIO.
    Exhausted,
}

/// Runs `op` under `policy`: while it fails with an error `retryable` accepts, it is run
/// again after the policy's delay, at most `policy.retries()` more times. `first` is the
/// failure of a try the caller already made (the read fast path), if any.
pub(crate) async fn retry<T, F, Fut>(
    policy: &EsnapRetry,
    retryable: impl Fn(&BsError) -> bool,
    first: Option<BsError>,
    mut op: F,
) -> Result<T, GaveUp>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = blobstore::Result<T>>,
{
    let mut err = match first {
        Some(e) => e,
        None => match op().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        },
    };
    let mut attempt = 0;
    loop {
        if !retryable(&err) {
            return Err(GaveUp::Failed(err));
        }
        if attempt >= policy.retries() {
            policy.note_eio();
            return Err(GaveUp::Exhausted);
        }
        attempt += 1;
        policy.note_retry();
        futures_timer::Delay::new(policy.delay()).await;
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => err = e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn eio() -> BsError {
        BsError::Io(std::io::Error::from_raw_os_error(libc::EIO))
    }

    fn fast() -> EsnapRetry {
        let p = EsnapRetry::default();
        p.set(2, Duration::from_millis(1));
        p
    }

    #[test]
    fn settings() {
        let r = EsnapRetry::default();
        assert_eq!(r.retries(), 3);
        assert_eq!(r.delay(), Duration::from_millis(100));
        r.set(5, Duration::from_millis(7));
        assert_eq!((r.retries(), r.delay()), (5, Duration::from_millis(7)));
    }

    #[test]
    fn succeeds_once_the_base_is_back() {
        let calls = Cell::new(0);
        let r = futures::executor::block_on(retry(&fast(), is_missing_base, None, || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n < 3 {
                    Err(eio())
                } else {
                    Ok(n)
                }
            }
        }));
        assert_eq!(r.unwrap(), 3);
        assert_eq!(calls.get(), 3);
    }

    /// Runs `retry` (fast policy, missing-base predicate) over an op that always fails with
    /// `errno`: the outcome and how many times the op ran.
    fn always_failing(errno: i32) -> (Result<(), GaveUp>, u32) {
        let calls = Cell::new(0);
        let r = futures::executor::block_on(retry(&fast(), is_missing_base, None, || {
            calls.set(calls.get() + 1);
            async move { Err(BsError::Io(std::io::Error::from_raw_os_error(errno))) }
        }));
        (r, calls.get())
    }

    #[test]
    fn gives_up_after_the_retries_with_exhausted() {
        let (r, calls) = always_failing(libc::EIO);
        assert!(matches!(r, Err(GaveUp::Exhausted)));
        // The first try and two retries.
        assert_eq!(calls, 3);
    }

    #[test]
    fn other_errors_and_refused_errors_are_not_retried() {
        let (r, calls) = always_failing(libc::ENOSPC);
        assert!(matches!(r, Err(GaveUp::Failed(e)) if e.errno() == libc::ENOSPC));
        assert_eq!(calls, 1);
        let calls = Cell::new(0);
        // A caller's own first failure counts as the first try; a refusing predicate
        // (the lvol does not depend on an external snapshot) reports it as it is.
        let r: Result<(), _> = futures::executor::block_on(retry(
            &fast(),
            |_| false,
            Some(eio()),
            || {
                calls.set(calls.get() + 1);
                async { Ok(()) }
            },
        ));
        assert!(matches!(r, Err(GaveUp::Failed(e)) if e.errno() == libc::EIO));
        assert_eq!(calls.get(), 0);
        let r = futures::executor::block_on(retry(&fast(), is_missing_base, Some(eio()), || {
            calls.set(calls.get() + 1);
            async { Ok(7) }
        }));
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls.get(), 1);
    }
}
