//! Guards so that no test can hang: run a closure or a future under a deadline, poll for a
//! condition.

use std::future::Future;

use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Runs `f` on its own thread and fails the test if it does not finish within `secs`; a
/// panic inside `f` is re-raised as is.
pub fn with_timeout<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    within(secs, "test", f)
}

/// [`with_timeout`] naming what it waits for (`what`) in the failure message.
pub fn within<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        // The closure panicked before sending: re-raise its panic.
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("sender dropped without a value"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: hang: not done after {secs} s")
        }
    }
}

/// Polls `cond` every 5 ms until it holds; fails the test after `secs`.
pub fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `f` to completion on this thread (so it may borrow locals), failing the test if it
/// takes longer than `secs`.
pub fn block_within<F: Future>(secs: u64, f: F) -> F::Output {
    futures::executor::block_on(async {
        let f = std::pin::pin!(f);
        let t = futures_timer::Delay::new(Duration::from_secs(secs));
        match futures::future::select(f, t).await {
            futures::future::Either::Left((v, _)) => v,
            futures::future::Either::Right(_) => panic!("timed out after {secs} s"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_comes_back_and_a_panic_is_raised_again() {
        assert_eq!(with_timeout(5, || 7), 7);
        let p = std::panic::catch_unwind(|| within(5, "x", || panic!("inner boom")));
        let msg = p.unwrap_err();
        assert_eq!(msg.downcast_ref::<&str>(), Some(&"inner boom"));
    }

    #[test]
    fn block_within_returns_the_output_and_fails_a_future_that_never_ends() {
        let local = 5;
        assert_eq!(block_within(5, async { local + 1 }), 6);
        let p = std::panic::catch_unwind(|| block_within(1, futures::future::pending::<()>()));
        let msg = p.unwrap_err();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert!(msg.contains("timed out after 1 s"), "{msg}");
    }

    #[test]
    fn a_hang_fails_with_what_it_waited_for() {
        let p = std::panic::catch_unwind(|| {
            within(1, "the slow part", || {
                std::thread::sleep(Duration::from_secs(3))
            })
        });
        let msg = p.unwrap_err();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert!(
            msg.contains("the slow part") && msg.contains("1 s"),
            "{msg}"
        );
    }
}
