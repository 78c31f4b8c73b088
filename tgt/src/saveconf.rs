//! The `bdev` subsystem's `framework_get_config` answer in SPDK's shape: `with_batches`
//! honoured, histogram settings saved.
//!
//! SPDK's malloc and null modules write their bdevs as one batch each (an array of
//! create calls, `spdk_json_write_batch_begin`) from their module-level `config_json`, before
//! any per-bdev entry; `with_batches: false` (the default of `spdk-rpc save_config`)
//! flattens the arrays in place. Both modules always write their batch, so an empty module
//! gives an empty array with batches and nothing flattened. The malloc and null entries are
//! therefore put right after `bdev_set_options` (and the entries kept outside the registry),
//! which is also a safe place to create them: nothing stands under them.
//!
//! `bdev_enable_histogram` entries (SPDK writes one per bdev whose histogram is on) go after
//! the last `bdev_wait_for_examine`, so that the histograms of lvol bdevs, which come back by
//! tasting, find their bdev at replay (SPDK writes them in bdev order, where a lvol does not
//! exist yet at load).

use serde_json::{json, Map, Value};

use bdev_core::stats::DEFAULT_GRANULARITY;
use bdev_core::Registry;

/// SPDK's default bounds of `bdev_enable_histogram` (written only when they differ).
const DEFAULT_MIN_NSEC: u64 = 1000;
const DEFAULT_MAX_NSEC: u64 = 120_000_000_000;

const BATCHED: [&str; 2] = ["bdev_malloc_create", "bdev_null_create"];

fn method(e: &Value) -> &str {
    e.get("method").and_then(Value::as_str).unwrap_or("")
}

/// Reshapes the flat `entries` (from [`crate::config::bdev_config`]) as SPDK writes them.
pub fn bdev(registry: &Registry, entries: Vec<Value>, with_batches: bool) -> Vec<Value> {
    let mut batches: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    let mut rest = Vec::with_capacity(entries.len());
    let mut head = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        if let Some(k) = BATCHED.iter().position(|m| *m == method(&e)) {
            batches[k].push(e);
        } else if i == 0 && method(&e) == "bdev_set_options" {
            head.push(e);
        } else {
            rest.push(e);
        }
    }
    // Module-level batches first, as SPDK's module configs come before per-bdev entries.
    let mut out = head;
    for b in batches {
        if with_batches {
            out.push(Value::Array(b));
        } else {
            out.extend(b);
        }
    }
    // Removing the batched entries may leave two waits in a row, or a wait with nothing
    // registered before it; keep one.
    for e in rest {
        let wait = method(&e) == "bdev_wait_for_examine";
        if wait
            && out
                .last()
                .is_some_and(|l| method(l) == "bdev_wait_for_examine")
        {
            continue;
        }
        out.push(e);
    }
    for (dev, stats) in registry.list_with_stats() {
        let Some(cfg) = stats.histogram_config() else {
            continue;
        };
        let mut p = Map::new();
        p.insert("name".into(), json!(dev.name()));
        p.insert("enable".into(), json!(true));
        if let Some(k) = cfg.io_kind {
            p.insert("opc".into(), json!(k.spdk_name()));
        }
        if cfg.granularity != DEFAULT_GRANULARITY {
            p.insert("granularity".into(), json!(cfg.granularity));
        }
        if cfg.min_nsec != DEFAULT_MIN_NSEC {
            p.insert("min_nsec".into(), json!(cfg.min_nsec));
        }
        if cfg.max_nsec != DEFAULT_MAX_NSEC {
            p.insert("max_nsec".into(), json!(cfg.max_nsec));
        }
        out.push(json!({"method": "bdev_enable_histogram", "params": Value::Object(p)}));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, n: &str) -> Value {
        json!({"method": name, "params": {"name": n}})
    }

    #[test]
    fn malloc_and_null_become_batches_and_waits_do_not_repeat() {
        let wait = json!({"method": "bdev_wait_for_examine"});
        let flat = vec![
            json!({"method": "bdev_set_options", "params": {}}),
            m("bdev_nbd_client_create", "C1"),
            m("bdev_aio_create", "A0"),
            wait.clone(),
            m("bdev_malloc_create", "M0"),
            wait.clone(),
            m("bdev_null_create", "N0"),
            m("bdev_ro_create", "R0"),
            wait.clone(),
        ];
        let r = Registry::new();
        let b = bdev(&r, flat.clone(), true);
        assert_eq!(
            b,
            vec![
                flat[0].clone(),
                json!([m("bdev_malloc_create", "M0")]),
                json!([m("bdev_null_create", "N0")]),
                flat[1].clone(),
                flat[2].clone(),
                wait.clone(),
                m("bdev_ro_create", "R0"),
                wait.clone(),
            ]
        );
        let f = bdev(&r, flat, false);
        assert_eq!(f.len(), 8);
        assert_eq!(f[1], m("bdev_malloc_create", "M0"));
        assert!(f.iter().all(|e| !e.is_array()));
        // No malloc or null bdev: empty batches with batches, nothing flattened.
        let only = vec![json!({"method": "bdev_set_options"}), wait.clone()];
        assert_eq!(bdev(&r, only.clone(), true).len(), 4);
        assert_eq!(bdev(&r, only, false).len(), 2);
    }
}
