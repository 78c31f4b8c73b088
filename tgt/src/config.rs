//! Config dump (`framework_get_config`, the server half of `spdk-rpc save_config`) and
//! replay of a saved file at start (`tgt --json FILE`, SPDK `lib/init/json_config.c`).

use std::sync::Arc;

use async_trait::async_trait;
use bdev_core::config::ConfigTarget;
use bdev_core::rpc::RpcError;
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

pub use bdev_core::config::ConfigError;

/// The target as a replay sees it: SPDK's STARTUP state and its methods.
struct Replay<'a>(&'a Arc<Target>);

#[async_trait]
impl ConfigTarget for Replay<'_> {
    fn has_method(&self, method: &str) -> bool {
        self.0.has_method(method)
    }
    fn in_startup(&self) -> bool {
        !self.0.is_initialized()
    }
    fn allowed_in_startup(&self, method: &str) -> bool {
        self.0.allowed_now(method)
    }
    fn start(&self) {
        self.0.mark_initialized();
    }
    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        self.0.call(method, params).await
    }
}

/// Replays a saved config (`bdev_core::config::replay`): pass 1 runs the methods allowed in
/// the STARTUP state, then the framework is initialised, then pass 2 runs the rest in file
/// order. The first failure stops the replay, unless `ignore_errors`.
pub async fn replay(
    target: &Arc<Target>,
    doc: &Value,
    ignore_errors: bool,
) -> Result<(), ConfigError> {
    let known: Vec<&str> = crate::framework::SUBSYSTEMS.iter().map(|s| s.0).collect();
    bdev_core::config::replay(&Replay(target), doc, &known, ignore_errors).await
}

/// Reads and replays a config file.
pub async fn replay_file(
    target: &Arc<Target>,
    path: &std::path::Path,
    ignore_errors: bool,
) -> Result<(), ConfigError> {
    let doc = bdev_core::config::read_file(path)?;
    replay(target, &doc, ignore_errors).await
}
