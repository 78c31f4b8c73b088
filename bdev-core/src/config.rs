//! Replay of an SPDK JSON config file (what `spdk-rpc save_config` writes) without a
//! socket: each entry is a method call dispatched to the modules' [`RpcModule`] handlers, so
//! `tgt --json` and `blobcli -j` create the same devices with the same checks and errors
//! (SPDK `lib/init/json_config.c`).
//!
//! [`replay`] runs over any [`ConfigTarget`]: `tgt`'s target (which has SPDK's STARTUP and
//! RUNTIME states) or an [`RpcTable`] of modules (no states, as in `blobcli`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;

use crate::rpc::{decode, RpcError, RpcModule, INVALID_PARAMS, METHOD_NOT_FOUND};
use crate::Registry;

/// A config file error.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON or not shaped like a saved config.
    #[error("invalid config: {0}")]
    Invalid(String),
    /// A method failed (replay stops at the first failure, as SPDK's default).
    #[error("{method} failed: {message} ({code})")]
    Method {
        /// Method.
        method: String,
        /// Error code.
        code: i32,
        /// Error message.
        message: String,
    },
}

/// Flattens a saved config into `(method, params)` entries in file order (batches, i.e.
/// nested arrays, are expanded in place). Subsystems not in `known` (a config saved by SPDK
/// has `accel`, `iobuf`, `sock`, ...) are skipped with a warning, as SPDK skips subsystems
/// that are not linked in.
pub fn entries(doc: &Value, known: &[&str]) -> Result<Vec<(String, Option<Value>)>, ConfigError> {
    let mut out = Vec::new();
    let Some(subs) = doc.get("subsystems") else {
        tracing::warn!("config has no \"subsystems\" key");
        return Ok(out);
    };
    let subs = subs
        .as_array()
        .ok_or_else(|| ConfigError::Invalid("\"subsystems\" is not an array".into()))?;
    fn push(e: &Value, out: &mut Vec<(String, Option<Value>)>) -> Result<(), ConfigError> {
        match e {
            Value::Array(items) => {
                for i in items {
                    push(i, out)?;
                }
                Ok(())
            }
            Value::Object(o) => {
                let method = o
                    .get("method")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ConfigError::Invalid("config entry without method".into()))?;
                out.push((method.to_string(), o.get("params").cloned()));
                Ok(())
            }
            _ => Err(ConfigError::Invalid("config entry is not an object".into())),
        }
    }
    for s in subs {
        if let Some(name) = s.get("subsystem").and_then(Value::as_str) {
            if !known.contains(&name) {
                if s.get("config")
                    .and_then(Value::as_array)
                    .is_some_and(|c| !c.is_empty())
                {
                    tracing::warn!("config: subsystem {name} is not part of this program; skipped");
                }
                continue;
            }
        }
        match s.get("config") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for e in items {
                    push(e, &mut out)?;
                }
            }
            Some(_) => return Err(ConfigError::Invalid("\"config\" is not an array".into())),
        }
    }
    Ok(out)
}

/// What a config replays into: something that answers method calls.
#[async_trait]
pub trait ConfigTarget: Send + Sync {
    /// Whether `method` exists.
    fn has_method(&self, method: &str) -> bool;
    /// Whether the target is in SPDK's STARTUP state (before `framework_start_init`); the
    /// default is a target without states.
    fn in_startup(&self) -> bool {
        false
    }
    /// Whether `method` may run in the STARTUP state.
    fn allowed_in_startup(&self, _method: &str) -> bool {
        false
    }
    /// Leaves the STARTUP state.
    fn start(&self) {}
    /// Runs one method.
    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError>;
}

/// Replays `(method, params)` entries: when the target is in its STARTUP state, pass 1 runs
/// the methods allowed there, then the target is started; pass 2 runs the rest in file
/// order. Every method must exist before anything runs. The first failure stops the replay,
/// unless `ignore_errors` (then failures are logged and skipped).
pub async fn replay_entries(
    target: &dyn ConfigTarget,
    list: &[(String, Option<Value>)],
    ignore_errors: bool,
) -> Result<(), ConfigError> {
    for (method, _) in list {
        if !target.has_method(method) {
            return Err(ConfigError::Method {
                method: method.clone(),
                code: METHOD_NOT_FOUND,
                message: "Method not found".into(),
            });
        }
    }
    let mut done = vec![false; list.len()];
    if target.in_startup() {
        for (i, (method, params)) in list.iter().enumerate() {
            if target.allowed_in_startup(method) {
                run(target, method, params.clone(), ignore_errors).await?;
                done[i] = true;
            }
        }
        target.start();
    }
    for (i, (method, params)) in list.iter().enumerate() {
        if !done[i] {
            run(target, method, params.clone(), ignore_errors).await?;
        }
    }
    Ok(())
}

/// Replays a parsed config document (see [`entries`] and [`replay_entries`]).
pub async fn replay(
    target: &dyn ConfigTarget,
    doc: &Value,
    known_subsystems: &[&str],
    ignore_errors: bool,
) -> Result<(), ConfigError> {
    let list = entries(doc, known_subsystems)?;
    replay_entries(target, &list, ignore_errors).await
}

/// Reads and parses a config file.
pub fn read_file(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|e| ConfigError::Invalid(e.to_string()))
}

async fn run(
    target: &dyn ConfigTarget,
    method: &str,
    params: Option<Value>,
    ignore_errors: bool,
) -> Result<(), ConfigError> {
    tracing::info!("config: {method}");
    match target.call(method, params).await {
        Ok(_) => Ok(()),
        Err(e) if ignore_errors => {
            tracing::warn!(
                "config: {method} failed: {} ({}); going on",
                e.message,
                e.code
            );
            Ok(())
        }
        Err(e) => Err(ConfigError::Method {
            method: method.to_string(),
            code: e.code,
            message: e.message,
        }),
    }
}

/// A socket-free dispatch table over modules: method name to the module that serves it.
pub struct RpcTable {
    modules: Vec<Arc<dyn RpcModule>>,
    table: HashMap<&'static str, usize>,
}

impl RpcTable {
    /// The table of `modules`; a method served by two modules goes to the first.
    pub fn new(modules: Vec<Arc<dyn RpcModule>>) -> Self {
        let mut table = HashMap::new();
        for (i, m) in modules.iter().enumerate() {
            for name in m.methods() {
                table.entry(name).or_insert(i);
            }
        }
        RpcTable { modules, table }
    }

    /// The method names, in module order.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<(&'static str, usize)> = self.table.iter().map(|(k, i)| (*k, *i)).collect();
        v.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0)));
        v.into_iter().map(|(k, _)| k).collect()
    }

    /// The module serving `method`.
    pub fn module(&self, method: &str) -> Option<&Arc<dyn RpcModule>> {
        self.table.get(method).map(|&i| &self.modules[i])
    }
}

#[async_trait]
impl ConfigTarget for RpcTable {
    fn has_method(&self, method: &str) -> bool {
        self.table.contains_key(method)
    }

    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let m = self.module(method).ok_or_else(RpcError::method_not_found)?;
        // SPDK's handlers decode params with spdk_json_decode_object: an array never fits.
        if matches!(params, Some(Value::Array(_))) {
            return Err(RpcError::decode_failed());
        }
        m.call(method, params).await
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SetOptions {
    bdev_io_pool_size: Option<u32>,
    bdev_io_cache_size: Option<u32>,
    bdev_auto_examine: Option<bool>,
    iobuf_small_cache_size: Option<u32>,
    iobuf_large_cache_size: Option<u32>,
}

/// The registry-level methods every saved `bdev` config holds around its devices:
/// `bdev_set_options` (checked, then ignored: we have no bdev_io pools) and
/// `bdev_wait_for_examine`.
pub struct BdevLayerRpc {
    registry: Registry,
}

impl BdevLayerRpc {
    /// A module over `registry`.
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(BdevLayerRpc { registry })
    }
}

#[async_trait]
impl RpcModule for BdevLayerRpc {
    fn methods(&self) -> Vec<&'static str> {
        vec!["bdev_set_options", "bdev_wait_for_examine"]
    }

    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        match method {
            "bdev_set_options" => {
                let _: SetOptions = decode(params)?;
                Ok(Value::Bool(true))
            }
            "bdev_wait_for_examine" => {
                match &params {
                    None => {}
                    Some(Value::Object(o)) if o.is_empty() => {}
                    Some(_) => {
                        return Err(RpcError::new(
                            INVALID_PARAMS,
                            "bdev_wait_for_examine requires no parameters",
                        ))
                    }
                }
                self.registry.wait_for_examine().await;
                Ok(Value::Bool(true))
            }
            _ => Err(RpcError::method_not_found()),
        }
    }
}

/// The modules of bdev-core itself: the bdev-layer methods and the malloc, aio, error and
/// null backends'.
pub fn core_modules(registry: &Registry) -> Vec<Arc<dyn RpcModule>> {
    use crate::backend::{aio_rpc, error_rpc, malloc_rpc, null_rpc};
    vec![
        BdevLayerRpc::new(registry.clone()),
        malloc_rpc::MallocRpc::new(registry.clone()),
        aio_rpc::AioRpc::new(registry.clone()),
        error_rpc::ErrorRpc::new(registry.clone()),
        null_rpc::NullRpc::new(registry.clone()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entries_flatten_batches_in_file_order() {
        let doc = json!({"subsystems": [
            {"subsystem": "bdev", "config": [
                {"method": "bdev_set_options", "params": {}},
                [{"method": "bdev_malloc_create", "params": {"name": "a"}},
                 {"method": "bdev_malloc_create", "params": {"name": "b"}}],
                {"method": "bdev_wait_for_examine"}
            ]},
            {"subsystem": "nbd", "config": null},
            {"subsystem": "iobuf", "config": [{"method": "iobuf_set_options", "params": {}}]},
            {"subsystem": "nbd", "config": [{"method": "nbd_server_start", "params": {"listen": "unix:/x"}}]}
        ]});
        let e = entries(&doc, &["bdev", "nbd"]).unwrap();
        let names: Vec<&str> = e.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(
            names,
            [
                "bdev_set_options",
                "bdev_malloc_create",
                "bdev_malloc_create",
                "bdev_wait_for_examine",
                "nbd_server_start"
            ]
        );
        assert_eq!(e[2].1, Some(json!({"name": "b"})));
        assert_eq!(e[3].1, None);
        // Without the nbd subsystem its entries are skipped.
        assert_eq!(entries(&doc, &["bdev"]).unwrap().len(), 4);
    }

    #[test]
    fn entries_reject_bad_shapes() {
        assert!(entries(&json!({"subsystems": 3}), &[]).is_err());
        assert!(entries(&json!({"subsystems": [{"config": [{"params": {}}]}]}), &[]).is_err());
        assert!(entries(&json!({"subsystems": [{"config": [7]}]}), &[]).is_err());
        assert!(entries(&json!({}), &[]).unwrap().is_empty());
    }

    #[test]
    fn replay_creates_devices_and_stops_at_the_first_failure() {
        futures::executor::block_on(async {
            let r = Registry::new();
            let t = RpcTable::new(core_modules(&r));
            let doc = json!({"subsystems": [{"subsystem": "bdev", "config": [
                {"method": "bdev_set_options", "params": {"bdev_io_pool_size": 65535}},
                {"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 8, "block_size": 512}},
                {"method": "bdev_null_create", "params": {"name": "N0", "num_blocks": 8, "block_size": 4096}},
                {"method": "bdev_wait_for_examine"}
            ]}]});
            replay(&t, &doc, &["bdev"], false).await.unwrap();
            assert_eq!(r.get("M0").unwrap().num_blocks(), 8);
            assert_eq!(r.get("N0").unwrap().block_len(), 4096);

            let bad = json!({"subsystems": [{"subsystem": "bdev", "config": [
                {"method": "bdev_malloc_create", "params": {"name": "M1", "num_blocks": 8, "block_size": 512}},
                {"method": "bdev_malloc_create", "params": {"name": "M2", "num_blocks": 8, "block_size": 100}},
                {"method": "bdev_malloc_create", "params": {"name": "M3", "num_blocks": 8, "block_size": 512}}
            ]}]});
            let e = replay(&t, &bad, &["bdev"], false).await.unwrap_err();
            assert!(
                matches!(&e, ConfigError::Method { method, code: -22, .. } if method == "bdev_malloc_create"),
                "{e}"
            );
            assert!(r.get("M1").is_some() && r.get("M2").is_none() && r.get("M3").is_none());
            // With ignore_errors the failing entry is skipped and the rest runs.
            let bad2 = json!({"subsystems": [{"subsystem": "bdev", "config": [
                {"method": "bdev_malloc_create", "params": {"name": "M4", "num_blocks": 8, "block_size": 100}},
                {"method": "bdev_malloc_create", "params": {"name": "M5", "num_blocks": 8, "block_size": 512}}
            ]}]});
            replay(&t, &bad2, &["bdev"], true).await.unwrap();
            assert!(r.get("M4").is_none() && r.get("M5").is_some());
            // An unknown method fails before anything runs.
            let unknown = json!({"subsystems": [{"subsystem": "bdev", "config": [
                {"method": "bdev_malloc_create", "params": {"name": "M6", "num_blocks": 8, "block_size": 512}},
                {"method": "bdev_nvme_attach_controller", "params": {}}
            ]}]});
            let e = replay(&t, &unknown, &["bdev"], false).await.unwrap_err();
            assert!(e.to_string().contains("bdev_nvme_attach_controller"), "{e}");
            assert!(r.get("M6").is_none());
        });
    }
}
