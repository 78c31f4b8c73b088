//! bdev-nbd: a block device served by a remote NBD server.
//!
//! Owns [`NbdClientBdev`] (a [`bdev_core::BlockDevice`] whose blocks live on an NBD server:
//! qemu-nbd, nbdkit, or our own `tgt` export), the client side of the NBD protocol
//! (fixed-newstyle handshake with `NBD_OPT_GO`, simple replies, many requests in flight per
//! connection, several connections when the server allows `NBD_FLAG_CAN_MULTI_CONN`), the
//! loss-and-return behaviour (bounded reconnects, then hot-removal from the registry, then
//! re-registration under the same UUID when the server is back), the module's table of
//! clients ([`NbdClients`]) and its JSON-RPC methods ([`NbdRpc`]: `bdev_nbd_client_create`,
//! `bdev_nbd_client_delete`, `bdev_nbd_client_get`). `docs/remote-bases.md` is the user's
//! guide.
//!
//! It does not know about blobstores or lvols: an esnap clone over an NBD base reacts to the
//! hot-removal and the re-registration like over any other base bdev. It does not serve NBD
//! (that is `tgt`'s export) and does not own the JSON-RPC socket.
//!
//! Threads, not an async runtime: each client has a supervisor thread, and each connection
//! a reader and a writer thread; I/O futures wait on `oneshot`s and never block. Registry
//! calls run on the registry's executor (`Registry::spawn`). Like every Rust binary, the
//! process must ignore SIGPIPE (the Rust runtime does so by default), since a write to a
//! socket the server closed raises it.

mod addr;
mod bdev;
mod client;
mod conn;
mod error;
mod handshake;
mod rpc;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bdev_core::Registry;
use uuid::Uuid;

pub use addr::Address;
pub use bdev::{NbdClientBdev, MODULE_NAME, PRODUCT_NAME};
pub use error::{NbdError, Result};
pub use rpc::NbdRpc;

use client::{Client, Config};

/// Default number of reconnect attempts before the bdev is hot-removed.
pub const DEFAULT_RECONNECT_ATTEMPTS: u32 = 5;
/// Default delay between reconnect attempts, in milliseconds.
pub const DEFAULT_RECONNECT_DELAY_MS: u64 = 1000;
/// Default time a request may stay unanswered before its connection is declared dead.
pub const DEFAULT_IO_TIMEOUT_MS: u64 = 30_000;
/// Most connections one client opens to one export.
pub const MAX_CONNECTIONS: u32 = 16;

/// What `bdev_nbd_client_create` takes: its params decode into this, the ones left out
/// taking the defaults of [`NbdClientOpts::new`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdClientOpts {
    /// Name of the bdev.
    pub name: String,
    /// `unix:PATH` or `HOST:PORT`.
    pub address: String,
    /// Export name (`""` is the server's default export).
    pub export: String,
    /// UUID of the bdev; random when `None`. Give the same UUID every time the bdev is
    /// re-created (save_config does), or esnap clones will not find their base.
    #[serde(default)]
    pub uuid: Option<Uuid>,
    /// Refuse writes even when the server allows them.
    #[serde(default)]
    pub read_only: bool,
    /// Reconnect attempts after a loss before the bdev is hot-removed (0: at once).
    #[serde(default = "default_reconnect_attempts")]
    pub reconnect_attempts: u32,
    /// Delay between reconnect attempts (and between background attempts afterwards).
    #[serde(default = "default_reconnect_delay_ms")]
    pub reconnect_delay_ms: u64,
    /// Longest time a request may wait for its reply before the connection is dropped and
    /// re-established (also bounds connect and handshake).
    #[serde(default = "default_io_timeout_ms")]
    pub io_timeout_ms: u64,
    /// Connections to open when the server allows several (`NBD_FLAG_CAN_MULTI_CONN`).
    #[serde(default = "one_connection")]
    pub num_connections: u32,
    /// When the first connection fails, succeed anyway and keep trying every
    /// `reconnect_delay_ms`; the bdev is registered when the server answers. The saved config
    /// sets it, so that a restart never fails because a golden server is away.
    #[serde(default)]
    pub background_connect: bool,
}

fn default_reconnect_attempts() -> u32 {
    DEFAULT_RECONNECT_ATTEMPTS
}

fn default_reconnect_delay_ms() -> u64 {
    DEFAULT_RECONNECT_DELAY_MS
}

fn default_io_timeout_ms() -> u64 {
    DEFAULT_IO_TIMEOUT_MS
}

fn one_connection() -> u32 {
    1
}

impl NbdClientOpts {
    /// Options with the defaults for everything but name, address and export.
    pub fn new(name: &str, address: &str, export: &str) -> Self {
        NbdClientOpts {
            name: name.to_string(),
            address: address.to_string(),
            export: export.to_string(),
            uuid: None,
            read_only: false,
            reconnect_attempts: DEFAULT_RECONNECT_ATTEMPTS,
            reconnect_delay_ms: DEFAULT_RECONNECT_DELAY_MS,
            io_timeout_ms: DEFAULT_IO_TIMEOUT_MS,
            num_connections: 1,
            background_connect: false,
        }
    }

    fn config(&self) -> Result<Config> {
        if self.name.is_empty() || self.name.contains('\0') {
            return Err(NbdError::InvalidArgument("bad bdev name".into()));
        }
        if self.io_timeout_ms == 0 {
            return Err(NbdError::InvalidArgument(
                "io_timeout_ms must be positive".into(),
            ));
        }
        if self.num_connections == 0 || self.num_connections > MAX_CONNECTIONS {
            return Err(NbdError::InvalidArgument(format!(
                "num_connections must be 1 to {MAX_CONNECTIONS}"
            )));
        }
        Ok(Config {
            name: self.name.clone(),
            uuid: self.uuid.unwrap_or_else(Uuid::new_v4),
            address: Address::parse(&self.address)?,
            export: self.export.clone(),
            read_only: self.read_only,
            reconnect_attempts: self.reconnect_attempts,
            reconnect_delay: Duration::from_millis(self.reconnect_delay_ms),
            io_timeout: Duration::from_millis(self.io_timeout_ms),
            num_connections: self.num_connections,
            background_connect: self.background_connect,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The module's table of NBD clients over one registry. A client stays in the table while
/// its bdev is hot-removed (its server is away), so it can still be deleted, and its name
/// and UUID stay taken.
pub struct NbdClients {
    registry: Registry,
    clients: Mutex<BTreeMap<String, Arc<Client>>>,
}

impl NbdClients {
    /// An empty table serving `registry`.
    pub fn new(registry: Registry) -> Self {
        NbdClients {
            registry,
            clients: Mutex::new(BTreeMap::new()),
        }
    }

    /// The registry the bdevs go into.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Connects to the server and registers the bdev. Fails with EEXIST when the name or
    /// UUID is taken, EINVAL for bad options, and the connect or handshake errno
    /// (ECONNREFUSED, ENOENT for an unknown export or a missing socket, ...) otherwise; with
    /// `background_connect` a failed connection is not an error (the bdev comes later).
    pub async fn create(&self, opts: NbdClientOpts) -> Result<Arc<NbdClientBdev>> {
        let cfg = opts.config()?;
        let name = cfg.name.clone();
        {
            let mut t = lock(&self.clients);
            t.retain(|_, c| !c.is_stopped());
            if t.contains_key(&name) || t.values().any(|c| c.cfg.uuid == cfg.uuid) {
                return Err(NbdError::Exists(name));
            }
        }
        if self.registry.get(&name).is_some() || self.registry.get_by_uuid(&cfg.uuid).is_some() {
            return Err(NbdError::Exists(name));
        }
        let client = Client::start(cfg, self.registry.clone()).await?;
        let raced = {
            let mut t = lock(&self.clients);
            let raced = t.contains_key(&name);
            if !raced {
                t.insert(name.clone(), client.clone());
            }
            raced
        };
        if raced {
            client.delete().await;
            return Err(NbdError::Exists(name));
        }
        let dev = Arc::new(NbdClientBdev::from_client(client.clone()));
        // Without a connection yet (`background_connect`), the bdev is registered when the
        // server answers: its size is not known before.
        let connected = client.is_connected();
        if connected {
            if let Err(e) = self.registry.register(dev.clone()).await {
                lock(&self.clients).remove(&name);
                client.delete().await;
                return Err(e.into());
            }
        }
        client.start_registration_task(connected);
        tracing::info!(target: "bdev_nbd", name = %name, address = %dev.address(),
            export = %dev.export(), "created");
        Ok(dev)
    }

    /// Unregisters the bdev (if registered; this waits for its descriptors to close),
    /// closes the connections and forgets the client. ENODEV for an unknown name.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let client = lock(&self.clients)
            .remove(name)
            .ok_or_else(|| NbdError::NotFound(name.to_string()))?;
        client.delete().await;
        tracing::info!(target: "bdev_nbd", name = %name, "deleted");
        Ok(())
    }

    /// A handle on a client's bdev, registered or not (hot-removed while its server is away).
    pub fn get(&self, name: &str) -> Option<NbdClientBdev> {
        lock(&self.clients)
            .get(name)
            .filter(|c| !c.is_stopped())
            .map(|c| NbdClientBdev::from_client(c.clone()))
    }

    /// The `bdev_nbd_client_get` entries: every client, or the one named (ENODEV if none).
    /// Unlike `bdev_get_bdevs`, this lists clients whose bdev is hot-removed too.
    pub fn info(&self, name: Option<&str>) -> Result<Vec<serde_json::Value>> {
        let t = lock(&self.clients);
        let pick: Vec<&Arc<Client>> = match name {
            Some(n) => vec![t
                .get(n)
                .filter(|c| !c.is_stopped())
                .ok_or_else(|| NbdError::NotFound(n.to_string()))?],
            None => t.values().filter(|c| !c.is_stopped()).collect(),
        };
        Ok(pick
            .into_iter()
            .map(|c| {
                serde_json::json!({
                    "name": c.cfg.name,
                    "uuid": c.cfg.uuid.hyphenated().to_string(),
                    "address": c.cfg.address.to_string(),
                    "export": c.cfg.export,
                    "read_only": c.read_only(),
                    "state": c.state_name(),
                    "registered": c.is_registered(),
                    "connections": c.connections(),
                    "block_size": c.block_len(),
                    "num_blocks": c.num_blocks(),
                })
            })
            .collect())
    }

    /// `bdev_nbd_client_create` entries for the clients whose bdev is **not** in the registry
    /// right now (hot-removed while the server is away, or not connected yet). A config
    /// writer that walks the registry misses those; it should append these, or a restart
    /// would forget the client and leave its esnap clones degraded.
    pub fn unregistered_config(&self) -> Vec<serde_json::Value> {
        lock(&self.clients)
            .values()
            .filter(|c| !c.is_stopped() && !c.is_registered())
            .filter_map(|c| {
                bdev_core::BlockDevice::write_config(&NbdClientBdev::from_client(c.clone()))
            })
            .collect()
    }

    /// Names of the clients, sorted.
    pub fn names(&self) -> Vec<String> {
        lock(&self.clients)
            .iter()
            .filter(|(_, c)| !c.is_stopped())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Deletes every client (at shutdown).
    pub async fn delete_all(&self) {
        let all: Vec<Arc<Client>> = std::mem::take(&mut *lock(&self.clients))
            .into_values()
            .collect();
        for c in all {
            c.delete().await;
        }
    }
}

impl NbdClientBdev {
    /// Whether this handle's client was deleted.
    pub fn is_deleted(&self) -> bool {
        self.client().is_stopped()
    }
}
