//! The JSON-RPC methods of the module: `bdev_ro_create` and `bdev_ro_delete`.

use async_trait::async_trait;
use bdev_core::rpc::{decode, NameOnly, RpcError, RpcModule};
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

#[async_trait]
impl RpcModule for RoRpc {
    fn methods(&self) -> Vec<&'static str> {
        vec!["bdev_ro_create", "bdev_ro_delete"]
    }

    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        match method {
            "bdev_ro_create" => {
                let p: CreateParams = decode(params)?;
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
            "bdev_ro_delete" => {
                let p: NameOnly = decode(params)?;
                delete(&self.registry, &p.name)
                    .await
                    .map_err(|e| RpcError::from_errno(e.errno()))?;
                Ok(Value::Bool(true))
            }
            _ => Err(RpcError::method_not_found()),
        }
    }
}
