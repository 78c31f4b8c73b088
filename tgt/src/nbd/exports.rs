//! The export table: what each export serves, its lookup during the handshake, and the
//! server's export methods.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bdev_core::rpc::RpcError;
use bdev_core::{BdevEvent, Descriptor, IoType};
use futures::StreamExt;
use nbd_proto::{self as proto, ExportInfo, ExportLookup};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::range_lock::RangeLock;
use super::server::{lock, NbdServer};
/// One export.
pub struct Export {
    pub(super) name: String,
    bdev_name: String,
    pub(super) writable: bool,
    pub(super) desc: Arc<Descriptor>,
    /// Block ranges being written: a read-modify-write of partial blocks takes its range
    /// exclusively, every other write shared, so that concurrent requests touching different
    /// bytes of one block never lose data (see `range_lock`).
    pub(super) rmw: RangeLock,
    generation: u64,
    pub(super) connections: AtomicUsize,
    pub(super) cancel: watch::Sender<bool>,
}

impl Export {
    fn info(&self) -> ExportInfo {
        let dev = self.desc.device();
        let bl = dev.block_len();
        ExportInfo::new(
            dev.num_blocks() * bl as u64,
            proto::transmission_flags(!self.writable, dev.io_type_supported(IoType::Unmap)),
            bl,
        )
    }
}

pub(super) type ExportMap = Arc<Mutex<BTreeMap<String, Arc<Export>>>>;

/// Whether a device refuses writes: it does not support them, or it is an aio bdev opened
/// read-only (SPDK's aio bdev reports write support even then; the writes fail).
fn read_only_device(dev: &dyn bdev_core::BlockDevice) -> bool {
    !dev.io_type_supported(IoType::Write)
        || dev.driver_specific()["aio"]["readonly"] == Value::Bool(true)
}

pub(super) struct Lookup<'a>(pub(super) &'a ExportMap);

impl ExportLookup for Lookup<'_> {
    fn lookup(&self, name: &str) -> Option<(String, ExportInfo)> {
        let map = lock(self.0);
        let e = if name.is_empty() && map.len() == 1 {
            map.values().next()
        } else {
            map.get(name)
        }?;
        Some((e.name.clone(), e.info()))
    }
    fn names(&self) -> Vec<String> {
        lock(self.0).keys().cloned().collect()
    }
}

impl NbdServer {
    /// Adds an export of `bdev_name` under `name` (default: the bdev name). A bdev that does
    /// not support writes is exported read-only.
    pub fn add_export(
        &self,
        bdev_name: &str,
        name: Option<&str>,
        writable: bool,
    ) -> Result<String, RpcError> {
        let name = name.unwrap_or(bdev_name).to_string();
        if name.is_empty() {
            return Err(RpcError::from_errno(libc::EINVAL));
        }
        if lock(&self.exports).contains_key(&name) {
            return Err(RpcError::from_errno(libc::EEXIST));
        }
        let dev = self
            .registry
            .get(bdev_name)
            .ok_or_else(|| RpcError::from_errno(libc::ENODEV))?;
        let writable = writable && !read_only_device(dev.as_ref());
        let mut desc = self
            .registry
            .open(bdev_name, writable)
            .map_err(|e| RpcError::from_errno(e.errno()))?;
        let events = desc.take_events();
        let (cancel, mut cancel_rx) = watch::channel(false);
        let generation = self.generation.fetch_add(1, Ordering::SeqCst);
        let export = Arc::new(Export {
            name: name.clone(),
            bdev_name: bdev_name.to_string(),
            writable,
            desc: Arc::new(desc),
            rmw: RangeLock::default(),
            generation,
            connections: AtomicUsize::new(0),
            cancel,
        });
        {
            let mut map = lock(&self.exports);
            if map.contains_key(&name) {
                return Err(RpcError::from_errno(libc::EEXIST));
            }
            map.insert(name.clone(), export);
        }
        if let Some(mut events) = events {
            let map = self.exports.clone();
            let ename = name.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        ev = events.next() => match ev {
                            Some(BdevEvent::Remove) | None => {
                                let mut m = lock(&map);
                                if m.get(&ename).is_some_and(|e| e.generation == generation) {
                                    if let Some(e) = m.remove(&ename) {
                                        tracing::info!("nbd export {ename}: bdev removed");
                                        let _ = e.cancel.send(true);
                                    }
                                }
                                return;
                            }
                            Some(BdevEvent::Resize { .. }) => {}
                        },
                        _ = cancel_rx.changed() => return,
                    }
                }
            });
        }
        Ok(name)
    }

    /// Removes an export and ends its connections.
    pub fn remove_export(&self, name: &str) -> Result<(), RpcError> {
        let e = lock(&self.exports)
            .remove(name)
            .ok_or_else(|| RpcError::from_errno(libc::ENODEV))?;
        let _ = e.cancel.send(true);
        Ok(())
    }

    /// (export name, bdev name) of every export.
    pub fn export_names(&self) -> Vec<(String, String)> {
        lock(&self.exports)
            .values()
            .map(|e| (e.name.clone(), e.bdev_name.clone()))
            .collect()
    }

    /// `nbd_get_exports`.
    pub fn list(&self) -> Value {
        let map = lock(&self.exports);
        Value::Array(
            map.values()
                .map(|e| {
                    json!({
                        "name": e.name,
                        "bdev_name": e.bdev_name,
                        "writable": e.writable,
                        "connections": e.connections.load(Ordering::SeqCst),
                    })
                })
                .collect(),
        )
    }

    /// The nbd subsystem's config: `nbd_server_start` (if listening), then one
    /// `nbd_export_add` per export.
    pub fn config(&self) -> Vec<Value> {
        let mut out = Vec::new();
        if let Some(l) = lock(&self.listener).as_ref() {
            let mut p = json!({"listen": l.listen});
            if l.allow_remote {
                p["allow_remote"] = json!(true);
            }
            out.push(json!({"method": "nbd_server_start", "params": p}));
        }
        for e in lock(&self.exports).values() {
            out.push(json!({"method": "nbd_export_add", "params": {
                "bdev_name": e.bdev_name, "name": e.name, "writable": e.writable}}));
        }
        out
    }
}
