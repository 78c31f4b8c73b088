//! Config dump (`framework_get_config`, the server half of `spdk-rpc save_config`) and
//! replay of a saved file at start (`tgt --json FILE`, SPDK `lib/init/json_config.c`).

use std::sync::Arc;

use bdev_core::Registry;
use serde_json::{json, Value};

use crate::target::Target;

/// The `bdev_set_options` entry (SPDK's defaults; we accept and keep none of them).
pub fn bdev_set_options_entry() -> Value {
    json!({
        "method": "bdev_set_options",
        "params": {
            "bdev_io_pool_size": 65535,
            "bdev_io_cache_size": 256,
            "bdev_auto_examine": true,
            "iobuf_small_cache_size": 128,
            "iobuf_large_cache_size": 16
        }
    })
}

/// The bdev subsystem's config array: `bdev_set_options`, then `extra` (entries of devices
/// a module keeps outside the registry), then every device's `write_config()` entry in
/// registration order (a base is registered before the devices stacked on it), then
/// `bdev_wait_for_examine`.
///
/// Devices that write nothing (lvol bdevs) come back by examine when their base is
/// re-created. A device with an entry that was registered after such a device may stand on
/// it, so a `bdev_wait_for_examine` goes before it to make the replay wait for the tasting.
pub fn bdev_config(registry: &Registry, extra: Vec<Value>) -> Vec<Value> {
    let mut out = vec![bdev_set_options_entry()];
    out.extend(extra);
    let mut after_examined = false;
    for dev in registry.list() {
        match dev.write_config() {
            Some(entry) => {
                if after_examined {
                    out.push(json!({"method": "bdev_wait_for_examine"}));
                    after_examined = false;
                }
                out.push(entry);
            }
            None => after_examined = true,
        }
    }
    out.push(json!({"method": "bdev_wait_for_examine"}));
    out
}

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
/// nested arrays, are expanded in place). Subsystems we do not have (a config saved by SPDK
/// has `accel`, `iobuf`, `sock`, ...) are skipped with a notice, as SPDK skips subsystems
/// that are not linked in.
pub fn entries(doc: &Value) -> Result<Vec<(String, Option<Value>)>, ConfigError> {
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
    let known = crate::framework::subsystems();
    let known: Vec<&str> = known
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["subsystem"].as_str()).collect())
        .unwrap_or_default();
    for s in subs {
        if let Some(name) = s.get("subsystem").and_then(Value::as_str) {
            if !known.contains(&name) {
                if s.get("config")
                    .and_then(Value::as_array)
                    .is_some_and(|c| !c.is_empty())
                {
                    eprintln!("tgt: config: subsystem {name} is not part of this target; skipped");
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

/// Replays a saved config: pass 1 runs the methods allowed in the STARTUP state, then the
/// framework is initialised, then pass 2 runs the rest in file order. The first failure
/// stops the replay, unless `ignore_errors` (then failures are reported and skipped).
pub async fn replay(
    target: &Arc<Target>,
    doc: &Value,
    ignore_errors: bool,
) -> Result<(), ConfigError> {
    let list = entries(doc)?;
    for (method, _) in &list {
        if !target.has_method(method) {
            return Err(ConfigError::Method {
                method: method.clone(),
                code: bdev_core::rpc::METHOD_NOT_FOUND,
                message: "Method not found".into(),
            });
        }
    }
    let mut done = vec![false; list.len()];
    if !target.is_initialized() {
        for (i, (method, params)) in list.iter().enumerate() {
            if target.allowed_now(method) {
                run(target, method, params.clone(), ignore_errors).await?;
                done[i] = true;
            }
        }
        target.mark_initialized();
    }
    for (i, (method, params)) in list.iter().enumerate() {
        if !done[i] {
            run(target, method, params.clone(), ignore_errors).await?;
        }
    }
    Ok(())
}

async fn run(
    target: &Arc<Target>,
    method: &str,
    params: Option<Value>,
    ignore_errors: bool,
) -> Result<(), ConfigError> {
    tracing::info!("config: {method}");
    match target.call(method, params).await {
        Ok(_) => Ok(()),
        Err(e) if ignore_errors => {
            eprintln!(
                "tgt: config: {method} failed: {} ({}); going on",
                e.message, e.code
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

/// Reads and replays a config file.
pub async fn replay_file(
    target: &Arc<Target>,
    path: &std::path::Path,
    ignore_errors: bool,
) -> Result<(), ConfigError> {
    let text = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let doc: Value =
        serde_json::from_slice(&text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    replay(target, &doc, ignore_errors).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let e = entries(&doc).unwrap();
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
    }

    #[test]
    fn entries_reject_bad_shapes() {
        assert!(entries(&json!({"subsystems": 3})).is_err());
        assert!(entries(&json!({"subsystems": [{"config": [{"params": {}}]}]})).is_err());
        assert!(entries(&json!({"subsystems": [{"config": [7]}]})).is_err());
        assert!(entries(&json!({})).unwrap().is_empty());
    }
}
