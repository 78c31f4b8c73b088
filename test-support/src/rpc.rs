//! JSON-RPC calls into an in-process [`RpcModule`] in one line (feature `bdev`):
//! `rpc!(m, "method", {json})` returns the result and fails the test on an error;
//! `rpc_err!(m, "method", {json})` returns the error and fails the test on a success.
//! The parameters are written as `serde_json::json!` takes them; without them the call
//! carries no `params` member.

use bdev_core::rpc::{RpcError, RpcModule};
use serde_json::Value;

#[doc(hidden)]
pub use serde_json::json as __json;

/// An RPC error as a test compares it: `assert_eq!(rpc_err!(..), (-17, "File exists"))`
/// checks code and message, `assert_eq!(rpc_err!(..).code, -22)` the code alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The JSON-RPC error code.
    pub code: i32,
    /// The error message.
    pub message: String,
}

impl PartialEq<(i32, &str)> for Failure {
    fn eq(&self, other: &(i32, &str)) -> bool {
        self.code == other.0 && self.message == other.1
    }
}

impl From<RpcError> for Failure {
    fn from(e: RpcError) -> Self {
        Failure {
            code: e.code,
            message: e.message,
        }
    }
}

/// Calls `method`; panics (naming the method and the error) when it fails.
pub async fn call_ok(m: &dyn RpcModule, method: &str, params: Option<Value>) -> Value {
    match m.call(method, params.clone()).await {
        Ok(v) => v,
        Err(e) => panic!("{method} {params:?} failed: {} ({})", e.message, e.code),
    }
}

/// Calls `method`; panics (naming the method and the result) when it succeeds.
pub async fn call_err(m: &dyn RpcModule, method: &str, params: Option<Value>) -> Failure {
    match m.call(method, params.clone()).await {
        Ok(v) => panic!("{method} {params:?} succeeded with {v} where an error was expected"),
        Err(e) => e.into(),
    }
}

/// `rpc!(module, "method")` / `rpc!(module, "method", {json})`: the result of a call that
/// must succeed (awaited, so inside an async block). `module` is a value implementing
/// `bdev_core::rpc::RpcModule`.
#[macro_export]
macro_rules! rpc {
    ($($call:tt)+) => {
        $crate::__rpc_call!(call_ok, $($call)+)
    };
}

/// `rpc_err!(module, "method")` / `rpc_err!(module, "method", {json})`: the
/// [`Failure`](crate::rpc::Failure) of a call that must fail.
#[macro_export]
macro_rules! rpc_err {
    ($($call:tt)+) => {
        $crate::__rpc_call!(call_err, $($call)+)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __rpc_call {
    ($f:ident, $m:expr, $method:expr) => {
        $crate::rpc::$f(&$m, $method, None).await
    };
    ($f:ident, $m:expr, $method:expr, $($params:tt)+) => {
        $crate::rpc::$f(&$m, $method, Some($crate::rpc::__json!($($params)+))).await
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    #[async_trait::async_trait]
    impl RpcModule for Echo {
        fn methods(&self) -> Vec<&'static str> {
            vec!["echo"]
        }
        async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
            match (method, params) {
                ("echo", Some(p)) => Ok(p),
                ("echo", None) => Err(RpcError::from_errno(22)),
                _ => Err(RpcError::new(-32601, "Method not found")),
            }
        }
    }

    #[test]
    fn rpc_returns_the_result_and_rpc_err_the_failure() {
        futures::executor::block_on(async {
            let m = Echo;
            let name = "x";
            assert_eq!(
                crate::rpc!(m, "echo", {"name": name, "n": 2}),
                __json!({"name": "x", "n": 2})
            );
            assert_eq!(crate::rpc_err!(m, "echo"), (-22, "Invalid argument"));
            assert_eq!(crate::rpc_err!(m, "nope", {}).code, -32601);
        });
    }

    #[test]
    fn a_failing_rpc_names_the_method() {
        let p = std::panic::catch_unwind(|| {
            futures::executor::block_on(async { crate::rpc!(Echo, "nope", {"a": 1}) })
        });
        let msg = p.unwrap_err();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert!(msg.contains("nope") && msg.contains("-32601"), "{msg}");
    }
}
