//! SPDK JSON config files (`-j`), replayed with bdev-core's socket-free config replay
//! (`bdev_core::config`): every `bdev` subsystem entry is a method call to the same handlers
//! `tgt --json` runs (the bdev-core backends' modules and vbdev-ro's), so both accept the
//! same files and report the same errors. Other subsystems are skipped.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use bdev_core::config::{self, RpcTable};
use bdev_core::Registry;

/// The subsystems blobcli configures.
const SUBSYSTEMS: &[&str] = &["bdev"];

/// The methods a config may call: bdev-core's (`bdev_set_options`, `bdev_wait_for_examine`,
/// the malloc, aio, error and null backends') and vbdev-ro's.
pub fn methods(registry: &Registry) -> RpcTable {
    let mut modules = config::core_modules(registry);
    modules.push(Arc::new(vbdev_ro::RoRpc::new(registry.clone())));
    RpcTable::new(modules)
}

/// Reads and replays a config file into `registry`; the first failing entry stops it.
pub async fn load_config_file(registry: &Registry, path: &Path) -> anyhow::Result<()> {
    let replay = async {
        let doc = config::read_file(path)?;
        config::replay(&methods(registry), &doc, SUBSYSTEMS, false).await
    };
    replay
        .await
        .with_context(|| format!("config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> (Registry, anyhow::Result<()>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        std::fs::write(&p, text).unwrap();
        let r = Registry::new();
        let res = futures::executor::block_on(load_config_file(&r, &p));
        (r, res)
    }

    #[test]
    fn replays_spdk_subsystems_config() {
        let (r, res) = load(
            r#"{"subsystems":[
            {"subsystem":"accel","config":[{"method":"accel_set_options","params":{}}]},
            {"subsystem":"bdev","config":[
              {"method":"bdev_set_options","params":{"bdev_io_pool_size":65535}},
              {"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":2048,"block_size":512,"uuid":"7e5a0000-e5a0-4e5a-8e5a-000000000001"}},
              {"method":"bdev_ro_create","params":{"name":"ro0","base_bdev_name":"Malloc0"}},
              {"method":"bdev_wait_for_examine"}
            ]}]}"#,
        );
        res.unwrap();
        let m = r.get("Malloc0").unwrap();
        assert_eq!((m.num_blocks(), m.block_len()), (2048, 512));
        assert_eq!(m.uuid().to_string(), "7e5a0000-e5a0-4e5a-8e5a-000000000001");
        assert!(!r
            .get("ro0")
            .unwrap()
            .io_type_supported(bdev_core::IoType::Write));
    }

    #[test]
    fn rejects_unknown_methods_bad_params_and_bad_json() {
        let (_, res) = load("{");
        assert!(res.unwrap_err().to_string().contains("c.json"));
        let (_, res) = load(
            r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_nvme_attach_controller","params":{}}]}]}"#,
        );
        let e = format!("{:#}", res.unwrap_err());
        assert!(
            e.contains("bdev_nvme_attach_controller failed: Method not found"),
            "{e}"
        );
        let (r, res) = load(
            r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_malloc_create","params":{"name":"M","num_blocks":8,"block_size":100}}]}]}"#,
        );
        let e = format!("{:#}", res.unwrap_err());
        assert!(
            e.contains("bdev_malloc_create failed: Invalid argument: block_size 100"),
            "{e}"
        );
        assert!(r.get("M").is_none());
    }
}
