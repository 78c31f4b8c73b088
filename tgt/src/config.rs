//! Config dump (`framework_get_config`, the server half of `spdk-rpc save_config`) as a pure
//! function of the devices, and replay of a saved file at start (`tgt --json FILE`, SPDK
//! `lib/init/json_config.c`) into anything that answers method calls ([`ConfigTarget`]).

use std::sync::Arc;

use bdev_core::config::ConfigTarget;
use bdev_core::BlockDevice;
use serde_json::{json, Value};

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
pub fn bdev_config(devices: &[Arc<dyn BlockDevice>], extra: Vec<Value>) -> Vec<Value> {
    let mut out = vec![bdev_set_options_entry()];
    out.extend(extra);
    let mut after_examined = false;
    for dev in devices {
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

/// Replays a saved config into `target` (`bdev_core::config::replay`): for a target in the
/// STARTUP state, pass 1 runs the methods allowed there, then the framework is initialised,
/// then pass 2 runs the rest in file order. The first failure stops the replay, unless
/// `ignore_errors`. Subsystems this target does not have are skipped.
pub async fn replay(
    target: &dyn ConfigTarget,
    doc: &Value,
    ignore_errors: bool,
) -> Result<(), ConfigError> {
    let known: Vec<&str> = crate::framework::SUBSYSTEMS.iter().map(|s| s.0).collect();
    bdev_core::config::replay(target, doc, &known, ignore_errors).await
}

/// Reads and replays a config file.
pub async fn replay_file(
    target: &dyn ConfigTarget,
    path: &std::path::Path,
    ignore_errors: bool,
) -> Result<(), ConfigError> {
    let doc = bdev_core::config::read_file(path)?;
    replay(target, &doc, ignore_errors).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev_rpc::tests::FakeDev;
    use bdev_core::backend::malloc::MallocBdev;

    #[test]
    fn bdev_config_is_a_function_of_the_devices() {
        let m0: Arc<dyn BlockDevice> = MallocBdev::create("M0", 8, 512, None).unwrap();
        // A device that writes no config entry (as an lvol bdev: examine brings it back).
        let ex: Arc<dyn BlockDevice> = Arc::new(FakeDev::new("examined", uuid::Uuid::nil(), true));
        let m1: Arc<dyn BlockDevice> = MallocBdev::create("M1", 8, 512, None).unwrap();
        let extra = vec![json!({"method": "extra"})];
        let cfg = bdev_config(&[m0.clone(), ex.clone(), m1.clone()], extra.clone());
        let methods: Vec<&str> = cfg.iter().map(|e| e["method"].as_str().unwrap()).collect();
        // A device after one that examine brings back waits for the tasting.
        assert_eq!(
            methods,
            [
                "bdev_set_options",
                "extra",
                "bdev_malloc_create",
                "bdev_wait_for_examine",
                "bdev_malloc_create",
                "bdev_wait_for_examine"
            ]
        );
        assert_eq!(cfg[2]["params"]["name"], json!("M0"));
        assert_eq!(cfg[4]["params"]["name"], json!("M1"));
        // The same devices give the same config.
        assert_eq!(bdev_config(&[m0, ex, m1], extra), cfg);
        let empty = bdev_config(&[], Vec::new());
        assert_eq!(empty.len(), 2);
    }
}
