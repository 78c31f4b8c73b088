//! The malloc backend's JSON-RPC methods: `bdev_malloc_create`, `bdev_malloc_delete`.

use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::Value;

use super::malloc::MallocBdev;
use crate::rpc::{decode, delete_of_module, errno_err, parse_uuid, NameOnly, RpcError};
use crate::Registry;

/// The smallest and largest malloc block size (a power of two in between).
pub const MALLOC_BLOCK_SIZES: std::ops::RangeInclusive<u32> = 512..=65536;

/// `bdev_malloc_create` as the client sends it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct MallocCreate {
    name: Option<String>,
    block_size: u32,
    num_blocks: u64,
    uuid: Option<String>,
    #[serde(default)]
    optimal_io_boundary: u32,
    #[serde(default)]
    md_size: u32,
    #[serde(default)]
    md_interleave: bool,
    #[serde(default)]
    dif_type: i32,
    #[serde(default)]
    dif_is_head_of_md: bool,
    #[serde(default)]
    physical_block_size: u32,
    #[serde(default)]
    dif_pi_format: u32,
    #[serde(default)]
    numa_id: Option<i32>,
}

fn invalid(msg: String) -> RpcError {
    RpcError::new(-libc::EINVAL, format!("Invalid argument: {msg}"))
}

/// The malloc RPC module. Keeps the `Malloc<N>` counter for unnamed creates.
pub struct MallocRpc {
    registry: Registry,
    counter: Mutex<u64>,
}

impl MallocRpc {
    /// A module over `registry`.
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(MallocRpc {
            registry,
            counter: Mutex::new(0),
        })
    }

    fn next_name(&self) -> String {
        let mut n = self.counter.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let name = format!("Malloc{}", *n);
            *n += 1;
            if self.registry.get(&name).is_none() {
                return name;
            }
        }
    }

    async fn create(&self, p: MallocCreate) -> Result<Value, RpcError> {
        let uuid = parse_uuid(&p.uuid)?;
        if !MALLOC_BLOCK_SIZES.contains(&p.block_size) || !p.block_size.is_power_of_two() {
            // SPDK only asks for a multiple of 512; a huge block would make every small
            // write a read-modify-write of that much memory.
            return Err(invalid(format!(
                "block_size {} is not a power of two from {} to {}",
                p.block_size,
                MALLOC_BLOCK_SIZES.start(),
                MALLOC_BLOCK_SIZES.end()
            )));
        }
        if p.num_blocks == 0 {
            return Err(invalid("num_blocks must not be 0".into()));
        }
        if p.physical_block_size & 511 != 0 {
            return Err(invalid(format!(
                "physical_block_size {} is not a multiple of 512",
                p.physical_block_size
            )));
        }
        if p.md_size != 0 || p.dif_type != 0 {
            // Separate metadata and DIF are not implemented by our malloc backend.
            return Err(RpcError::from_errno(libc::EOPNOTSUPP));
        }
        let name = match p.name {
            Some(n) if !n.is_empty() => n,
            _ => self.next_name(),
        };
        let dev = MallocBdev::create(&name, p.num_blocks, p.block_size, uuid)
            .map_err(|e| errno_err(&e))?;
        self.registry
            .register(dev)
            .await
            .map_err(|e| errno_err(&e))?;
        Ok(Value::String(name))
    }

    async fn delete(&self, p: NameOnly) -> Result<Value, RpcError> {
        delete_of_module(&self.registry, &p.name, "malloc").await
    }
}

crate::rpc_module! {
    MallocRpc, |&self, params| {
        "bdev_malloc_create" => self.create(decode(params)?).await,
        "bdev_malloc_delete" => self.delete(decode(params)?).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::RpcModule;
    use serde_json::json;

    #[test]
    fn params_as_the_client_sends_them() {
        let p: MallocCreate = decode(Some(json!({"block_size": 512, "dif_is_head_of_md": false,
            "md_interleave": false, "name": "M0", "num_blocks": 65536})))
        .unwrap();
        assert_eq!((p.block_size, p.num_blocks), (512, 65536));
        assert!(decode::<MallocCreate>(Some(json!({"block_size": 512}))).is_err());
    }

    #[test]
    fn create_delete_and_bad_sizes() {
        futures::executor::block_on(async {
            let r = Registry::new();
            let m = MallocRpc::new(r.clone());
            let name = m
                .call(
                    "bdev_malloc_create",
                    Some(json!({"block_size": 4096, "num_blocks": 16})),
                )
                .await
                .unwrap();
            assert_eq!(name, json!("Malloc0"));
            assert_eq!(r.get("Malloc0").unwrap().block_len(), 4096);
            let e = m
                .call(
                    "bdev_malloc_create",
                    Some(json!({"name": "x", "block_size": 1000, "num_blocks": 16})),
                )
                .await
                .unwrap_err();
            assert_eq!(e.code, -libc::EINVAL);
            assert!(e.message.contains("block_size 1000"), "{e}");
            assert!(r.get("x").is_none());
            let ok = m
                .call("bdev_malloc_delete", Some(json!({"name": "Malloc0"})))
                .await
                .unwrap();
            assert_eq!(ok, json!(true));
            assert!(r.get("Malloc0").is_none());
            let e = m
                .call("bdev_malloc_delete", Some(json!({"name": "Malloc0"})))
                .await
                .unwrap_err();
            assert_eq!(e.code, -libc::ENODEV);
        });
    }
}
