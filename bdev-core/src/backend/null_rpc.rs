//! The null backend's JSON-RPC methods: `bdev_null_create`, `bdev_null_delete`,
//! `bdev_null_resize`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::null::NullBdev;
use super::RpcDevs;
use crate::rpc::{decode, errno_err, parse_uuid, RpcError};
use crate::{BlockDevice, Registry};

/// `bdev_null_create` as the current client sends it (it leaves out what was not given).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullCreate {
    name: String,
    num_blocks: u64,
    block_size: u32,
    uuid: Option<String>,
    #[serde(default)]
    physical_block_size: u32,
    #[serde(default)]
    md_size: u32,
    #[serde(default)]
    dif_type: i32,
    #[serde(default)]
    dif_is_head_of_md: bool,
    #[serde(default)]
    dif_pi_format: u32,
    #[serde(default)]
    preferred_write_alignment: u32,
    #[serde(default)]
    preferred_write_granularity: u32,
    #[serde(default)]
    optimal_write_size: u32,
    #[serde(default)]
    preferred_unmap_alignment: u32,
    #[serde(default)]
    preferred_unmap_granularity: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullResize {
    name: String,
    /// MiB.
    new_size: u64,
}

/// The null RPC module. Keeps the null bdevs for `bdev_null_resize` (weak: the registry
/// owns them).
pub struct NullRpc(RpcDevs<NullBdev>);

impl NullRpc {
    /// A module over `registry`.
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(NullRpc(RpcDevs::new(registry)))
    }

    async fn create(&self, p: NullCreate) -> Result<Value, RpcError> {
        let uuid = parse_uuid(&p.uuid)?;
        if p.physical_block_size & 511 != 0 {
            return Err(RpcError::from_errno(libc::EINVAL));
        }
        if p.md_size != 0 || p.dif_type != 0 || p.dif_is_head_of_md || p.dif_pi_format != 0 {
            return Err(RpcError::new(
                -libc::EOPNOTSUPP,
                "Operation not supported: separate metadata and DIF are not implemented",
            ));
        }
        if p.preferred_write_alignment != 0
            || p.preferred_write_granularity != 0
            || p.optimal_write_size != 0
            || p.preferred_unmap_alignment != 0
            || p.preferred_unmap_granularity != 0
        {
            return Err(RpcError::new(
                -libc::EOPNOTSUPP,
                "Operation not supported: write and unmap alignment hints are not implemented",
            ));
        }
        if self.0.registry.get(&p.name).is_some() {
            return Err(RpcError::from_errno(libc::EEXIST));
        }
        let dev = NullBdev::create(&p.name, p.num_blocks, p.block_size, uuid)
            .map_err(|e| errno_err(&e))?;
        self.0.register(dev).await?;
        Ok(Value::String(p.name))
    }

    /// `bdev_null_resize`: the new size is in MiB; shrinking is `-22` as in SPDK.
    fn resize(&self, p: NullResize) -> Result<Value, RpcError> {
        let null = self
            .0
            .find(&p.name)?
            .ok_or_else(|| RpcError::from_errno(libc::EINVAL))?;
        let bytes = p
            .new_size
            .checked_mul(1 << 20)
            .ok_or_else(|| RpcError::from_errno(libc::EINVAL))?;
        null.resize(bytes / null.block_len() as u64)
            .map_err(|e| errno_err(&e))?;
        self.0.registry.notify_resize(null.name());
        Ok(Value::Bool(true))
    }
}

crate::rpc_module! {
    NullRpc, |&self, params| {
        "bdev_null_create" => self.create(decode(params)?).await,
        "bdev_null_delete" => self.0.delete(params, "null").await,
        "bdev_null_resize" => self.resize(decode(params)?),
    }
}
