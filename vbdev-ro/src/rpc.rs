//! The JSON-RPC methods of the module: `bdev_ro_create` and `bdev_ro_delete`.

use bdev_core::rpc::{decode, NameOnly, RpcError};
use bdev_core::Registry;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::{create, delete, RoOpts};

/// `bdev_ro_create` and `bdev_ro_delete` over a registry.
pub struct RoRpc {
    registry: Registry,
}

impl RoRpc {
    /// The module's methods, serving `registry`.
    pub fn new(registry: Registry) -> Self {
        RoRpc { registry }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    base_bdev_name: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    uuid: Option<Uuid>,
}

impl RoRpc {
    async fn create(&self, p: CreateParams) -> Result<Value, RpcError> {
        let opts = RoOpts {
            base_bdev_name: p.base_bdev_name,
            name: p.name,
            uuid: p.uuid,
        };
        let ro = create(&self.registry, opts)
            .await
            .map_err(|e| RpcError::from_errno(e.errno()))?;
        Ok(Value::String(
            bdev_core::BlockDevice::name(&*ro).to_string(),
        ))
    }

    async fn delete(&self, p: NameOnly) -> Result<Value, RpcError> {
        delete(&self.registry, &p.name)
            .await
            .map_err(|e| RpcError::from_errno(e.errno()))?;
        Ok(Value::Bool(true))
    }
}

bdev_core::rpc_module! {
    RoRpc, |&self, params| {
        "bdev_ro_create" => self.create(decode(params)?).await,
        "bdev_ro_delete" => self.delete(decode(params)?).await,
    }
}
