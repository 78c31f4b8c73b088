//! The NBD JSON-RPC methods: ours (`nbd_server_start`, `nbd_server_stop`, `nbd_export_add`,
//! `nbd_export_remove`, `nbd_get_exports`) and SPDK's kernel-NBD methods mapped onto the
//! userspace exports (`nbd_start_disk`, `nbd_stop_disk`, `nbd_get_disks`): the "device" is
//! the export's URL (`nbd+unix:///NAME?socket=PATH` or `nbd://HOST:PORT/NAME`); a kernel
//! device path is refused with `-95`, since we serve userspace NBD only.

use std::sync::Arc;

use async_trait::async_trait;
use bdev_core::rpc::{decode, RpcError, RpcModule};
use serde::Deserialize;
use serde_json::{json, Value};

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartDisk {
    bdev_name: String,
    nbd_device: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StopDisk {
    nbd_device: Option<String>,
}

/// The URL prefix and suffix around an export name for a listener address.
fn url_parts(listen: &str) -> (String, String) {
    match listen.strip_prefix("unix:") {
        Some(path) => ("nbd+unix:///".into(), format!("?socket={path}")),
        None => (format!("nbd://{listen}/"), String::new()),
    }
}

/// The URL of export `name` on the server listening on `listen`.
pub fn export_url(listen: &str, name: &str) -> String {
    let (pre, suf) = url_parts(listen);
    format!("{pre}{name}{suf}")
}

fn kernel_device_refused(dev: &str) -> RpcError {
    RpcError::new(
        -libc::EOPNOTSUPP,
        format!(
            "Operation not supported: {dev} is a kernel NBD device; this target serves userspace NBD only (omit nbd_device, or give an export URL such as nbd+unix:///NAME?socket=PATH)"
        ),
    )
}

/// The methods of [`NbdRpc`].
const METHODS: [&str; 8] = [
    "nbd_server_start",
    "nbd_server_stop",
    "nbd_export_add",
    "nbd_export_remove",
    "nbd_get_exports",
    "nbd_start_disk",
    "nbd_stop_disk",
    "nbd_get_disks",
];

/// The export name in `url` if it is a URL of the server listening on `listen`.
fn name_in_url<'a>(listen: &str, url: &'a str) -> Option<&'a str> {
    let (pre, suf) = url_parts(listen);
    url.strip_prefix(pre.as_str())
        .and_then(|r| r.strip_suffix(suf.as_str()))
        .filter(|n| !n.is_empty())
}

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
        METHODS.to_vec()
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
            "nbd_start_disk" => self.start_disk(decode(params)?),
            "nbd_stop_disk" => {
                let p: StopDisk = decode(params)?;
                let Some(dev) = p.nbd_device else {
                    return Err(RpcError::new(-libc::ENODEV, "invalid nbd device"));
                };
                let name = self.export_of_url(&dev)?;
                self.server.remove_export(&name)?;
                Ok(Value::Bool(true))
            }
            "nbd_get_disks" => {
                let p: StopDisk = decode(params)?;
                let listen = self.server.listen_address();
                let disks: Vec<Value> = match &listen {
                    None => Vec::new(),
                    Some(l) => self
                        .server
                        .export_names()
                        .into_iter()
                        .map(|(name, bdev)| json!({"nbd_device": export_url(l, &name), "bdev_name": bdev}))
                        .collect(),
                };
                match p.nbd_device {
                    None => Ok(Value::Array(disks)),
                    Some(dev) => {
                        let one: Vec<Value> = disks
                            .into_iter()
                            .filter(|d| d["nbd_device"] == dev)
                            .collect();
                        if one.is_empty() {
                            return Err(RpcError::from_errno(libc::ENODEV));
                        }
                        Ok(Value::Array(one))
                    }
                }
            }
            _ => Err(RpcError::method_not_found()),
        }
    }
}

impl NbdRpc {
    fn listen(&self) -> Result<String, RpcError> {
        self.server.listen_address().ok_or_else(|| {
            RpcError::new(
                -libc::ENODEV,
                "nbd device not found: no NBD server is listening (call nbd_server_start first)",
            )
        })
    }

    /// The export named by `url` (one of ours); a kernel device path is `-95`.
    fn export_of_url(&self, url: &str) -> Result<String, RpcError> {
        if url.starts_with('/') {
            return Err(kernel_device_refused(url));
        }
        let listen = self.listen()?;
        let name = name_in_url(&listen, url)
            .ok_or_else(|| RpcError::new(-libc::ENODEV, format!("illegal nbd device {url}")))?;
        if !self.server.export_names().iter().any(|(n, _)| n == name) {
            return Err(RpcError::from_errno(libc::ENODEV));
        }
        Ok(name.to_string())
    }

    /// `nbd_start_disk`: a writable export named after the bdev, or after the export name in
    /// the URL given as `nbd_device`; answers the export's URL.
    fn start_disk(&self, p: StartDisk) -> Result<Value, RpcError> {
        let listen = self.listen()?;
        let name = match &p.nbd_device {
            None => p.bdev_name.clone(),
            Some(dev) if dev.starts_with('/') => return Err(kernel_device_refused(dev)),
            Some(dev) => name_in_url(&listen, dev)
                .ok_or_else(|| {
                    RpcError::new(
                        -libc::ENODEV,
                        format!(
                            "illegal nbd device {dev}: not a URL of this target's NBD server ({})",
                            export_url(&listen, "NAME")
                        ),
                    )
                })?
                .to_string(),
        };
        let name = self
            .server
            .add_export(&p.bdev_name, Some(&name), true)
            .map_err(|e| {
                if e.code == -libc::EEXIST {
                    RpcError::from_errno(libc::EBUSY)
                } else {
                    e
                }
            })?;
        Ok(Value::String(export_url(&listen, &name)))
    }
}
