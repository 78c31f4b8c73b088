//! The error-injection backend's JSON-RPC methods: `bdev_error_create`, `bdev_error_delete`,
//! `bdev_error_inject_error`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::error::{ErrorBdev, ErrorKind, Injection};
use super::RpcDevs;
use crate::rpc::{decode, errno_err, parse_uuid, RpcError};
use crate::{IoType, Registry};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorCreate {
    base_name: String,
    uuid: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct InjectError {
    name: String,
    io_type: String,
    error_type: String,
    #[serde(default = "one")]
    num: u64,
    queue_depth: Option<u64>,
    corrupt_offset: Option<u64>,
    corrupt_value: Option<u32>,
    nvme_sct: Option<u32>,
    nvme_sc: Option<u32>,
    /// Ours: let this many matching I/Os through before the rule starts.
    #[serde(default)]
    after: u64,
    /// Ours: the rule never runs out (overrides `num`).
    #[serde(default)]
    forever: bool,
    /// Ours: only I/O touching blocks `[offset_blocks, offset_blocks + num_blocks)`.
    offset_blocks: Option<u64>,
    /// Ours: see `offset_blocks`.
    num_blocks: Option<u64>,
}

fn one() -> u64 {
    1
}

/// Parses `bdev_error_inject_error` params into an injection (`None` = clear every rule).
/// Pure, so it is unit-tested without devices.
fn injection_from(p: &InjectError) -> Result<Option<Injection>, RpcError> {
    let io_type = match p.io_type.as_str() {
        "clear" => return Ok(None),
        "all" => None,
        "read" => Some(IoType::Read),
        "write" => Some(IoType::Write),
        "unmap" => Some(IoType::Unmap),
        "flush" => Some(IoType::Flush),
        "write_zeroes" => Some(IoType::WriteZeroes),
        "reset" => Some(IoType::Reset),
        _ => return Err(RpcError::from_errno(libc::EINVAL)),
    };
    let kind = match p.error_type.as_str() {
        "failure" => ErrorKind::Failure,
        "drop_writes" => ErrorKind::DropWrites,
        _ => return Err(RpcError::from_errno(libc::EINVAL)),
    };
    let range = match (p.offset_blocks, p.num_blocks) {
        (None, None) => None,
        (Some(o), Some(n)) => Some((o, n)),
        _ => return Err(RpcError::from_errno(libc::EINVAL)),
    };
    let count = if p.forever { u64::MAX } else { p.num };
    if count == 0 {
        return Err(RpcError::from_errno(libc::EINVAL));
    }
    Ok(Some(Injection {
        io_type,
        kind,
        range,
        after: p.after,
        count,
    }))
}

/// The error-bdev RPC module. Keeps the error bdevs' injection handles.
pub struct ErrorRpc(RpcDevs<ErrorBdev>);

impl ErrorRpc {
    /// A module over `registry`.
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(ErrorRpc(RpcDevs::new(registry)))
    }

    async fn create(&self, p: ErrorCreate) -> Result<Value, RpcError> {
        if p.uuid.is_some() {
            // Our error bdev derives nothing from a given UUID; accept only a valid one.
            parse_uuid(&p.uuid)?;
        }
        let name = format!("EE_{}", p.base_name);
        if self.0.registry.get(&name).is_some() {
            return Err(RpcError::from_errno(libc::EEXIST));
        }
        let base = self
            .0
            .registry
            .open(&p.base_name, true)
            .map_err(|e| errno_err(&e))?;
        let dev = ErrorBdev::create(&name, base).map_err(|e| errno_err(&e))?;
        self.0.register(dev).await?;
        Ok(Value::String(name))
    }

    fn bdev(&self, name: &str) -> Result<Arc<ErrorBdev>, RpcError> {
        // Error bdevs that went away with their base are forgotten.
        self.0
            .find(name)?
            .ok_or_else(|| RpcError::from_errno(libc::ENODEV))
    }

    fn inject(&self, p: InjectError) -> Result<Value, RpcError> {
        let dev = self.bdev(&p.name)?;
        let ours = p.error_type == "drop_writes"
            || p.after != 0
            || p.forever
            || p.offset_blocks.is_some()
            || p.num_blocks.is_some();
        if !ours && p.io_type != "clear" && p.error_type != "failure" {
            // SPDK's other error types, mapped by the error bdev itself (nomem fails with
            // ENOMEM, pending and corrupt_data with EIO).
            dev.inject_spdk(&p.io_type, &p.error_type, p.num)
                .map_err(|e| errno_err(&e))?;
            return Ok(Value::Bool(true));
        }
        match injection_from(&p)? {
            None => dev.clear(),
            Some(inj) => dev.inject(inj),
        }
        Ok(Value::Bool(true))
    }
}

crate::rpc_module! {
    ErrorRpc, |&self, params| {
        "bdev_error_create" => self.create(decode(params)?).await,
        "bdev_error_delete" => self.0.delete(params, "error").await,
        "bdev_error_inject_error" => self.inject(decode(params)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn inject(v: Value) -> Result<Option<Injection>, RpcError> {
        let p: InjectError = decode(Some(v))?;
        injection_from(&p)
    }

    #[test]
    fn inject_error_params() {
        let i =
            inject(json!({"name": "EE_M0", "io_type": "write", "error_type": "failure", "num": 5}))
                .unwrap()
                .unwrap();
        assert_eq!(i.io_type, Some(IoType::Write));
        assert_eq!((i.kind, i.count, i.after), (ErrorKind::Failure, 5, 0));
        let i = inject(
            json!({"name": "E", "io_type": "all", "error_type": "drop_writes",
            "after": 10, "forever": true}),
        )
        .unwrap()
        .unwrap();
        assert_eq!((i.io_type, i.kind), (None, ErrorKind::DropWrites));
        assert_eq!((i.after, i.count), (10, u64::MAX));
        assert!(
            inject(json!({"name": "E", "io_type": "clear", "error_type": "failure"}))
                .unwrap()
                .is_none()
        );
        assert_eq!(
            inject(json!({"name": "E", "io_type": "bogus", "error_type": "failure"}))
                .unwrap_err()
                .code,
            -22
        );
        assert_eq!(
            inject(json!({"name": "E", "io_type": "read", "error_type": "nomem"}))
                .unwrap_err()
                .code,
            -22
        );
        assert_eq!(
            inject(json!({"name": "E", "io_type": "read"})).unwrap_err(),
            RpcError::decode_failed()
        );
    }
}
