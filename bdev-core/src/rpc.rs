//! What every module's JSON-RPC handlers share: the error shape and SPDK's code conventions.
//!
//! Module crates (bdev-core's backends, lvol, vbdev-ro, ...) implement [`RpcModule`]; the `tgt`
//! binary owns the socket and dispatch and knows nothing of what the methods do.

use async_trait::async_trait;
use serde_json::Value;

/// A JSON-RPC error object (`{"code": .., "message": ..}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcError {
    /// JSON-RPC error code (SPDK uses negative errnos as codes too).
    pub code: i32,
    /// Message.
    pub message: String,
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for RpcError {}

/// `-32700`.
pub const PARSE_ERROR: i32 = -32700;
/// `-32600`.
pub const INVALID_REQUEST: i32 = -32600;
/// `-32601`.
pub const METHOD_NOT_FOUND: i32 = -32601;
/// `-32602`.
pub const INVALID_PARAMS: i32 = -32602;
/// `-32603`.
pub const INTERNAL_ERROR: i32 = -32603;

/// The C library's text for an errno (`strerror`), as SPDK puts it in messages.
pub fn strerror(errno: i32) -> String {
    let msg = std::io::Error::from_raw_os_error(errno).to_string();
    // std appends " (os error N)"; SPDK prints the bare text.
    match msg.rfind(" (os error ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    }
}

impl RpcError {
    /// An error with an explicit code and message.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }
    /// SPDK's answer to a parameter decode failure (missing, wrongly typed or unknown field):
    /// `-32603 "spdk_json_decode_object failed"`.
    pub fn decode_failed() -> Self {
        RpcError::new(INTERNAL_ERROR, "spdk_json_decode_object failed")
    }
    /// A synchronous failure: code `-errno`, message `strerror(errno)`.
    pub fn from_errno(errno: i32) -> Self {
        RpcError::new(-errno, strerror(errno))
    }
    /// A failure reported by an async callback in most lvol RPCs: `-32602` + strerror.
    pub fn invalid_params_errno(errno: i32) -> Self {
        RpcError::new(INVALID_PARAMS, strerror(errno))
    }
    /// `-32601 "Method not found"`.
    pub fn method_not_found() -> Self {
        RpcError::new(METHOD_NOT_FOUND, "Method not found")
    }
}

/// Decodes params into `T` the way SPDK's `spdk_json_decode_object` does: absent params are an
/// empty object, and any mismatch (missing required field, wrong type, unknown field when `T`
/// denies unknown fields) is [`RpcError::decode_failed`].
pub fn decode<T: serde::de::DeserializeOwned>(params: Option<Value>) -> Result<T, RpcError> {
    let v = match params {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(v) => v,
    };
    serde_json::from_value(v).map_err(|_| RpcError::decode_failed())
}

/// Parses an optional UUID parameter; a malformed one is a decode failure, as SPDK's
/// `decode_uuid`.
pub fn parse_uuid(s: &Option<String>) -> Result<Option<uuid::Uuid>, RpcError> {
    match s {
        None => Ok(None),
        Some(s) => uuid::Uuid::parse_str(s)
            .map(Some)
            .map_err(|_| RpcError::decode_failed()),
    }
}

/// `-errno` and `strerror` of a device error.
pub fn errno_err(e: &crate::BdevError) -> RpcError {
    RpcError::from_errno(e.errno())
}

/// The `bdev_*_delete` of a backend: unregisters `name` if it is a device of `module`,
/// `-19` (ENODEV) otherwise.
pub async fn delete_of_module(
    registry: &crate::Registry,
    name: &str,
    module: &str,
) -> Result<Value, RpcError> {
    match registry.get(name) {
        Some(d) if d.module_name() == module => {}
        _ => return Err(RpcError::from_errno(libc::ENODEV)),
    }
    registry.unregister(name).await.map_err(|e| errno_err(&e))?;
    Ok(Value::Bool(true))
}

/// Params of the `bdev_*_delete` methods.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameOnly {
    /// The bdev.
    pub name: String,
}

/// True when a request's `params` ask for nothing in particular (absent, `null` or `{}`):
/// a listing method then writes its whole list as text ([`RpcModule::write_listing`]), while
/// a filter goes the `Value` way.
pub fn no_params(params: &Option<Value>) -> bool {
    match params {
        None | Some(Value::Null) => true,
        Some(Value::Object(o)) => o.is_empty(),
        _ => false,
    }
}

/// Implements [`RpcModule`] for a module whose methods need nothing but a handler each, from
/// one table: every method is named once, for both [`RpcModule::methods`] and the dispatch of
/// [`RpcModule::call`] (an unknown method is `-32601`). In the handlers, `self` is the module
/// and the second name is the request's `params`. Keep each handler a call of a method of the
/// module: rustfmt does not format inside the table.
///
/// ```text
/// bdev_core::rpc_module! {
///     NullRpc, |&self, params| {
///         "bdev_null_create" => self.create(decode(params)?).await,
///         "bdev_null_delete" => self.0.delete(params, "null").await,
///     }
/// }
/// ```
#[macro_export]
macro_rules! rpc_module {
    ($module:ty, |&$this:ident, $params:ident| { $($method:literal => $handler:expr),+ $(,)? }) => {
        #[$crate::rpc::macro_support::async_trait]
        impl $crate::rpc::RpcModule for $module {
            fn methods(&self) -> Vec<&'static str> {
                vec![$($method),+]
            }

            async fn call(
                &$this,
                method: &str,
                $params: Option<$crate::rpc::macro_support::Value>,
            ) -> Result<$crate::rpc::macro_support::Value, $crate::rpc::RpcError> {
                match method {
                    $($method => $handler,)+
                    _ => Err($crate::rpc::RpcError::method_not_found()),
                }
            }
        }
    };
}

/// What [`rpc_module!`] expands to, reached through `$crate` so that its users need not
/// name these crates themselves.
#[doc(hidden)]
pub mod macro_support {
    pub use async_trait::async_trait;
    pub use serde_json::Value;
}

/// A module's set of JSON-RPC methods.
#[async_trait]
pub trait RpcModule: Send + Sync + 'static {
    /// The method names this module serves.
    fn methods(&self) -> Vec<&'static str>;
    /// Those of [`RpcModule::methods`] that may also run before the application is
    /// initialised (SPDK's `SPDK_RPC_STARTUP | SPDK_RPC_RUNTIME`); the others run only after.
    fn startup_methods(&self) -> Vec<&'static str> {
        Vec::new()
    }
    /// Runs one method. `params` is the request's `params` member, if any.
    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError>;
    /// Answers the listing method `method`, asked for its whole list (no params, see
    /// [`no_params`]), by writing the result as JSON text straight into `out`, with no `Value`
    /// tree in between (listings of thousands of entries). On `true`, exactly one JSON value
    /// was appended to `out` (the caller may have put the response's head there first), the
    /// same [`RpcModule::call`] would give. `false` (the default): the module answers `method`
    /// through [`RpcModule::call`] only, and `out` is untouched.
    fn write_listing(&self, _method: &str, _out: &mut Vec<u8>) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_matches_spdk_text() {
        assert_eq!(strerror(libc::ENODEV), "No such device");
        assert_eq!(RpcError::from_errno(libc::EEXIST).code, -17);
        assert_eq!(RpcError::from_errno(libc::EEXIST).message, "File exists");
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct P {
        name: String,
    }

    #[test]
    fn decode_rejects_missing_and_unknown_fields() {
        assert_eq!(decode::<P>(None).unwrap_err(), RpcError::decode_failed());
        let bad = serde_json::json!({"name": "a", "x": 1});
        assert_eq!(decode::<P>(Some(bad)).unwrap_err().code, INTERNAL_ERROR);
        let ok = serde_json::json!({"name": "a"});
        assert_eq!(decode::<P>(Some(ok)).unwrap().name, "a");
    }
}
