//! The NBD JSON-RPC methods (ours; SPDK's kernel-NBD methods `nbd_start_disk` etc. are not
//! served): `nbd_server_start`, `nbd_server_stop`, `nbd_export_add`, `nbd_export_remove`,
//! `nbd_get_exports`.

use std::sync::Arc;

use async_trait::async_trait;
use bdev_core::rpc::{decode, RpcError, RpcModule};
use serde::Deserialize;
use serde_json::Value;

use super::server::NbdServer;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Start {
    listen: String,
    #[serde(default)]
    allow_remote: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Add {
    bdev_name: String,
    name: Option<String>,
    #[serde(default = "yes")]
    writable: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Remove {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// The NBD RPC module.
pub struct NbdRpc {
    server: Arc<NbdServer>,
}

impl NbdRpc {
    /// A module driving `server`.
    pub fn new(server: Arc<NbdServer>) -> Arc<Self> {
        Arc::new(NbdRpc { server })
    }
}

#[async_trait]
impl RpcModule for NbdRpc {
    fn methods(&self) -> Vec<&'static str> {
        vec![
            "nbd_server_start",
            "nbd_server_stop",
            "nbd_export_add",
            "nbd_export_remove",
            "nbd_get_exports",
        ]
    }

    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        match method {
            "nbd_server_start" => {
                let p: Start = decode(params)?;
                self.server.start(&p.listen, p.allow_remote).await?;
                Ok(Value::Bool(true))
            }
            "nbd_server_stop" => {
                let _: Empty = decode(params)?;
                self.server.stop().await?;
                Ok(Value::Bool(true))
            }
            "nbd_export_add" => {
                let p: Add = decode(params)?;
                let name = self
                    .server
                    .add_export(&p.bdev_name, p.name.as_deref(), p.writable)?;
                Ok(Value::String(name))
            }
            "nbd_export_remove" => {
                let p: Remove = decode(params)?;
                self.server.remove_export(&p.name)?;
                Ok(Value::Bool(true))
            }
            "nbd_get_exports" => {
                let _: Empty = decode(params)?;
                Ok(self.server.list())
            }
            _ => Err(RpcError::method_not_found()),
        }
    }
}
