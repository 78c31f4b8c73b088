//! The JSON-RPC methods of the module: `bdev_nbd_client_create`, `bdev_nbd_client_delete` and
//! `bdev_nbd_client_get`.

use std::sync::Arc;

use async_trait::async_trait;
use bdev_core::rpc::{decode, NameOnly, RpcError, RpcModule};
use bdev_core::{BlockDevice, Registry};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::{
    NbdClientOpts, NbdClients, DEFAULT_IO_TIMEOUT_MS, DEFAULT_RECONNECT_ATTEMPTS,
    DEFAULT_RECONNECT_DELAY_MS,
};

/// `bdev_nbd_client_create`, `bdev_nbd_client_delete` and `bdev_nbd_client_get` over a
/// table of clients.
pub struct NbdRpc {
    clients: Arc<NbdClients>,
}

impl NbdRpc {
    /// The module's methods, with a new table of clients serving `registry`.
    pub fn new(registry: Registry) -> Self {
        NbdRpc {
            clients: Arc::new(NbdClients::new(registry)),
        }
    }

    /// The module's methods over an existing table.
    pub fn with_clients(clients: Arc<NbdClients>) -> Self {
        NbdRpc { clients }
    }

    /// The table of clients.
    pub fn clients(&self) -> &Arc<NbdClients> {
        &self.clients
    }
}

fn default_attempts() -> u32 {
    DEFAULT_RECONNECT_ATTEMPTS
}

fn default_delay() -> u64 {
    DEFAULT_RECONNECT_DELAY_MS
}

fn default_timeout() -> u64 {
    DEFAULT_IO_TIMEOUT_MS
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    name: String,
    address: String,
    export: String,
    #[serde(default)]
    uuid: Option<Uuid>,
    #[serde(default)]
    read_only: bool,
    #[serde(default = "default_attempts")]
    reconnect_attempts: u32,
    #[serde(default = "default_delay")]
    reconnect_delay_ms: u64,
    #[serde(default = "default_timeout")]
    io_timeout_ms: u64,
    #[serde(default = "one")]
    num_connections: u32,
    #[serde(default)]
    background_connect: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetParams {
    #[serde(default)]
    name: Option<String>,
}

#[async_trait]
impl RpcModule for NbdRpc {
    fn methods(&self) -> Vec<&'static str> {
        vec![
            "bdev_nbd_client_create",
            "bdev_nbd_client_delete",
            "bdev_nbd_client_get",
        ]
    }

    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        match method {
            "bdev_nbd_client_create" => {
                let p: CreateParams = decode(params)?;
                let opts = NbdClientOpts {
                    name: p.name,
                    address: p.address,
                    export: p.export,
                    uuid: p.uuid,
                    read_only: p.read_only,
                    reconnect_attempts: p.reconnect_attempts,
                    reconnect_delay_ms: p.reconnect_delay_ms,
                    io_timeout_ms: p.io_timeout_ms,
                    num_connections: p.num_connections,
                    background_connect: p.background_connect,
                };
                let dev = self
                    .clients
                    .create(opts)
                    .await
                    .map_err(|e| RpcError::from_errno(e.errno()))?;
                Ok(Value::String(dev.name().to_string()))
            }
            "bdev_nbd_client_delete" => {
                let p: NameOnly = decode(params)?;
                self.clients
                    .delete(&p.name)
                    .await
                    .map_err(|e| RpcError::from_errno(e.errno()))?;
                Ok(Value::Bool(true))
            }
            "bdev_nbd_client_get" => {
                let p: GetParams = decode(params)?;
                let list = self
                    .clients
                    .info(p.name.as_deref())
                    .map_err(|e| RpcError::from_errno(e.errno()))?;
                Ok(Value::Array(list))
            }
            _ => Err(RpcError::method_not_found()),
        }
    }
}
