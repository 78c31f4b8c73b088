//! The JSON-RPC methods of the module: `bdev_nbd_client_create`, `bdev_nbd_client_delete` and
//! `bdev_nbd_client_get`.

use std::sync::Arc;

use bdev_core::rpc::{decode, NameOnly, RpcError};
use bdev_core::{BlockDevice, Registry};
use serde::Deserialize;
use serde_json::Value;

use crate::{NbdClientOpts, NbdClients, NbdError};

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetParams {
    #[serde(default)]
    name: Option<String>,
}

fn errno_err(e: NbdError) -> RpcError {
    RpcError::from_errno(e.errno())
}

impl NbdRpc {
    async fn create(&self, opts: NbdClientOpts) -> Result<Value, RpcError> {
        let dev = self.clients.create(opts).await.map_err(errno_err)?;
        Ok(Value::String(dev.name().to_string()))
    }

    async fn delete(&self, p: NameOnly) -> Result<Value, RpcError> {
        self.clients.delete(&p.name).await.map_err(errno_err)?;
        Ok(Value::Bool(true))
    }

    fn get(&self, p: GetParams) -> Result<Value, RpcError> {
        let list = self.clients.info(p.name.as_deref()).map_err(errno_err)?;
        Ok(Value::Array(list))
    }
}

bdev_core::rpc_module! {
    NbdRpc, |&self, params| {
        "bdev_nbd_client_create" => self.create(decode(params)?).await,
        "bdev_nbd_client_delete" => self.delete(decode(params)?).await,
        "bdev_nbd_client_get" => self.get(decode(params)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn create_params_left_out_take_the_defaults_of_new() {
        let p = json!({"name": "n0", "address": "unix:/s", "export": ""});
        let opts: NbdClientOpts = decode(Some(p)).unwrap();
        assert_eq!(opts, NbdClientOpts::new("n0", "unix:/s", ""));
        let all = json!({"name": "n0", "address": "unix:/s", "export": "e", "read_only": true,
            "reconnect_attempts": 0, "reconnect_delay_ms": 7, "io_timeout_ms": 9,
            "num_connections": 3, "background_connect": true,
            "uuid": "6f9619ff-8b86-d011-b42d-00c04fc964ff"});
        let opts: NbdClientOpts = decode(Some(all)).unwrap();
        assert!(opts.read_only && opts.background_connect);
        assert_eq!(
            (
                opts.reconnect_attempts,
                opts.reconnect_delay_ms,
                opts.io_timeout_ms
            ),
            (0, 7, 9)
        );
        assert_eq!(opts.num_connections, 3);
        assert_eq!(
            opts.uuid.unwrap().to_string(),
            "6f9619ff-8b86-d011-b42d-00c04fc964ff"
        );
        let unknown = json!({"name": "n0", "address": "unix:/s", "export": "", "bogus": 1});
        assert_eq!(
            decode::<NbdClientOpts>(Some(unknown)).unwrap_err(),
            RpcError::decode_failed()
        );
        let missing = json!({"name": "n0", "address": "unix:/s"});
        assert!(decode::<NbdClientOpts>(Some(missing)).is_err());
    }
}
