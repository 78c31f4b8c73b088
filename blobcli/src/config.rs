//! SPDK JSON config files (`-j`): the `bdev` subsystem's `bdev_malloc_create`,
//! `bdev_aio_create` and our `bdev_ro_create` entries become bdevs in a [`Registry`].
//! Option setters (`*_set_options`) and `bdev_wait_for_examine` are accepted and ignored;
//! other subsystems are skipped; any other bdev method is an error.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use bdev_core::backend::aio::{AioBdev, AioOpts};
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{BlockDevice, Registry};
use serde_json::Value;
use uuid::Uuid;

/// One bdev the config asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BdevSpec {
    /// `bdev_malloc_create`.
    Malloc {
        /// Name.
        name: String,
        /// Number of blocks.
        num_blocks: u64,
        /// Block size.
        block_size: u32,
        /// Fixed UUID.
        uuid: Option<Uuid>,
    },
    /// `bdev_aio_create`.
    Aio {
        /// Name.
        name: String,
        /// File.
        filename: PathBuf,
        /// Block size (`None`: auto).
        block_size: Option<u32>,
        /// Read-only.
        readonly: bool,
        /// Fixed UUID.
        uuid: Option<Uuid>,
    },
    /// `bdev_ro_create`.
    Ro {
        /// Name (`None`: `<base>_ro`).
        name: Option<String>,
        /// Base bdev.
        base_bdev_name: String,
        /// Fixed UUID.
        uuid: Option<Uuid>,
    },
}

fn str_param(p: &Value, key: &str, method: &str) -> anyhow::Result<String> {
    p.get(key)
        .and_then(Value::as_str)
        .map(String::from)
        .ok_or_else(|| anyhow!("{method}: missing string parameter {key}"))
}

fn uuid_param(p: &Value, method: &str) -> anyhow::Result<Option<Uuid>> {
    match p.get("uuid") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Uuid::parse_str(s)
            .map(Some)
            .map_err(|e| anyhow!("{method}: bad uuid {s}: {e}")),
        Some(v) => bail!("{method}: bad uuid {v}"),
    }
}

fn u64_param(p: &Value, key: &str) -> Option<u64> {
    p.get(key).and_then(Value::as_u64)
}

/// Parses the text of a config file into bdev specs, in order.
pub fn parse_config(text: &str) -> anyhow::Result<Vec<BdevSpec>> {
    let v: Value = serde_json::from_str(text).context("invalid JSON in config file")?;
    let mut entries: Vec<&Value> = Vec::new();
    if let Some(subs) = v.get("subsystems").and_then(Value::as_array) {
        for s in subs {
            if s.get("subsystem").and_then(Value::as_str) != Some("bdev") {
                continue;
            }
            if let Some(cfg) = s.get("config").and_then(Value::as_array) {
                entries.extend(cfg.iter());
            }
        }
    } else if let Some(cfg) = v.get("config").and_then(Value::as_array) {
        entries.extend(cfg.iter());
    } else if let Some(list) = v.as_array() {
        entries.extend(list.iter());
    } else {
        bail!("config has no \"subsystems\" array");
    }
    let mut out = Vec::new();
    for e in entries {
        let method = e
            .get("method")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("config entry without a method"))?;
        let empty = Value::Object(Default::default());
        let p = e.get("params").unwrap_or(&empty);
        match method {
            "bdev_malloc_create" => {
                let name = str_param(p, "name", method)?;
                let block_size = u64_param(p, "block_size").unwrap_or(512);
                let num_blocks = match u64_param(p, "num_blocks") {
                    Some(n) => n,
                    None => {
                        let mb = u64_param(p, "total_size")
                            .ok_or_else(|| anyhow!("{method}: missing num_blocks"))?;
                        mb * 1024 * 1024 / block_size.max(1)
                    }
                };
                out.push(BdevSpec::Malloc {
                    name,
                    num_blocks,
                    block_size: u32::try_from(block_size)
                        .map_err(|_| anyhow!("{method}: bad block_size"))?,
                    uuid: uuid_param(p, method)?,
                });
            }
            "bdev_aio_create" => {
                let bs = u64_param(p, "block_size").filter(|b| *b != 0);
                out.push(BdevSpec::Aio {
                    name: str_param(p, "name", method)?,
                    filename: PathBuf::from(str_param(p, "filename", method)?),
                    block_size: match bs {
                        Some(b) => Some(
                            u32::try_from(b).map_err(|_| anyhow!("{method}: bad block_size"))?,
                        ),
                        None => None,
                    },
                    readonly: p.get("readonly").and_then(Value::as_bool).unwrap_or(false),
                    uuid: uuid_param(p, method)?,
                });
            }
            "bdev_ro_create" => out.push(BdevSpec::Ro {
                name: p.get("name").and_then(Value::as_str).map(String::from),
                base_bdev_name: str_param(p, "base_bdev_name", method)?,
                uuid: uuid_param(p, method)?,
            }),
            m if m.ends_with("_set_options") || m == "bdev_wait_for_examine" => {}
            m => bail!("unsupported method {m} in config"),
        }
    }
    Ok(out)
}

/// Creates and registers the bdevs of `specs`.
pub async fn create_bdevs(registry: &Registry, specs: &[BdevSpec]) -> anyhow::Result<()> {
    for s in specs {
        let dev: Arc<dyn BlockDevice> = match s {
            BdevSpec::Malloc {
                name,
                num_blocks,
                block_size,
                uuid,
            } => MallocBdev::create(name, *num_blocks, *block_size, *uuid)
                .with_context(|| format!("bdev_malloc_create {name}"))?,
            BdevSpec::Aio {
                name,
                filename,
                block_size,
                readonly,
                uuid,
            } => AioBdev::create(AioOpts {
                name: name.clone(),
                filename: filename.clone(),
                block_len: *block_size,
                readonly: *readonly,
                uuid: *uuid,
                ..Default::default()
            })
            .with_context(|| format!("bdev_aio_create {name} ({})", filename.display()))?,
            BdevSpec::Ro {
                name,
                base_bdev_name,
                uuid,
            } => {
                // vbdev-ro registers the bdev itself.
                vbdev_ro::create(
                    registry,
                    vbdev_ro::RoOpts {
                        base_bdev_name: base_bdev_name.clone(),
                        name: name.clone(),
                        uuid: *uuid,
                    },
                )
                .await
                .with_context(|| format!("bdev_ro_create over {base_bdev_name}"))?;
                continue;
            }
        };
        let name = dev.name().to_string();
        registry
            .register(dev)
            .await
            .with_context(|| format!("registering bdev {name}"))?;
    }
    Ok(())
}

/// Reads and applies a config file.
pub async fn load_config_file(registry: &Registry, path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let specs = parse_config(&text)?;
    create_bdevs(registry, &specs).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spdk_subsystems_config() {
        let text = r#"{"subsystems":[
            {"subsystem":"accel","config":[]},
            {"subsystem":"bdev","config":[
              {"method":"bdev_set_options","params":{"bdev_io_pool_size":65535}},
              {"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":262144,"block_size":512}},
              {"method":"bdev_aio_create","params":{"name":"esnap","filename":"esnap.img","block_size":4096,"readonly":true,"uuid":"7e5a0000-e5a0-4e5a-8e5a-000000000001"}},
              {"method":"bdev_ro_create","params":{"name":"ro0","base_bdev_name":"esnap"}},
              {"method":"bdev_wait_for_examine"}
            ]}]}"#;
        let specs = parse_config(text).unwrap();
        assert_eq!(specs.len(), 3);
        assert_eq!(
            specs[0],
            BdevSpec::Malloc {
                name: "Malloc0".into(),
                num_blocks: 262144,
                block_size: 512,
                uuid: None
            }
        );
        match &specs[1] {
            BdevSpec::Aio {
                readonly,
                uuid,
                block_size,
                ..
            } => {
                assert!(*readonly);
                assert_eq!(*block_size, Some(4096));
                assert_eq!(
                    uuid.unwrap().to_string(),
                    "7e5a0000-e5a0-4e5a-8e5a-000000000001"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            matches!(&specs[2], BdevSpec::Ro { base_bdev_name, .. } if base_bdev_name == "esnap")
        );
    }

    #[test]
    fn rejects_unknown_methods_and_bad_json() {
        assert!(parse_config("{").is_err());
        let e = parse_config(
            r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_nvme_attach_controller","params":{}}]}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("bdev_nvme_attach_controller"));
    }
}
