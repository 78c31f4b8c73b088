//! `bdev_get_bdevs` and its output shape (`bdev_info`). The backends' create/delete methods
//! and `bdev_set_options` / `bdev_wait_for_examine` are bdev-core's own modules
//! (`bdev_core::backend::*_rpc`, `bdev_core::config::BdevLayerRpc`); this one stays in `tgt`
//! because its `timeout` wait needs the target's timer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bdev_core::rpc::{decode, RpcError, RpcModule};
use bdev_core::{BlockDevice, ClaimType, IoType, Registry};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// SPDK's full `supported_io_types` key list (HEAD), in its order.
pub const SPDK_IO_TYPES: [&str; 22] = [
    "read",
    "write",
    "unmap",
    "flush",
    "reset",
    "nvme_admin",
    "nvme_io",
    "nvme_io_md",
    "write_zeroes",
    "zcopy",
    "get_zone_info",
    "zone_management",
    "zone_append",
    "compare",
    "compare_and_write",
    "abort",
    "seek_hole",
    "seek_data",
    "copy",
    "nvme_iov_md",
    "nvme_nssr",
    "write_uncorrectable",
];

fn io_type_by_name(name: &str) -> Option<IoType> {
    IoType::ALL.into_iter().find(|t| t.spdk_name() == name)
}

/// One element of `bdev_get_bdevs`, keys in SPDK's order (`rpc_dump_bdev_info`).
pub fn bdev_info(dev: &dyn BlockDevice, aliases: &[String], claim: Option<ClaimType>) -> Value {
    let uuid = dev.uuid().to_string();
    let mut all_aliases: Vec<Value> = Vec::new();
    if uuid != dev.name() && !aliases.contains(&uuid) {
        all_aliases.push(Value::String(uuid.clone()));
    }
    all_aliases.extend(aliases.iter().cloned().map(Value::String));
    let mut io = Map::new();
    for key in SPDK_IO_TYPES {
        let on = io_type_by_name(key).is_some_and(|t| dev.io_type_supported(t));
        io.insert(key.to_string(), Value::Bool(on));
    }
    let mut m = Map::new();
    m.insert("name".into(), json!(dev.name()));
    m.insert("aliases".into(), Value::Array(all_aliases));
    m.insert("product_name".into(), json!(dev.product_name()));
    m.insert("block_size".into(), json!(dev.block_len()));
    m.insert("num_blocks".into(), json!(dev.num_blocks()));
    for k in [
        "preferred_write_alignment",
        "preferred_write_granularity",
        "optimal_write_size",
        "preferred_unmap_alignment",
        "preferred_unmap_granularity",
    ] {
        m.insert(k.into(), json!(0));
    }
    m.insert("uuid".into(), json!(uuid));
    m.insert(
        "assigned_rate_limits".into(),
        json!({"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0}),
    );
    m.insert("claimed".into(), json!(claim.is_some()));
    if let Some(c) = claim {
        m.insert("claim_type".into(), json!(c.spdk_name()));
    }
    m.insert("zoned".into(), json!(false));
    m.insert("supported_io_types".into(), Value::Object(io));
    m.insert("driver_specific".into(), dev.driver_specific());
    Value::Object(m)
}

/// The longest `bdev_get_bdevs` wait (`timeout`, ms) accepted: one hour. A client that
/// hangs up stops its wait at once anyway.
pub const MAX_GET_BDEVS_TIMEOUT_MS: u64 = 3_600_000;

fn enodev() -> RpcError {
    RpcError::from_errno(libc::ENODEV)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBdevs {
    name: Option<String>,
    #[serde(default)]
    timeout: u64,
}

/// The `bdev_get_bdevs` module (its wait uses the target's timer, so it lives here).
pub struct BdevRpc {
    registry: Registry,
}

impl BdevRpc {
    /// A module over `registry`.
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(BdevRpc { registry })
    }

    async fn get_bdevs(&self, p: GetBdevs) -> Result<Value, RpcError> {
        let info = |d: &Arc<dyn BlockDevice>| {
            bdev_info(
                d.as_ref(),
                &self.registry.aliases(d.name()),
                self.registry.claim_of(d.name()),
            )
        };
        match p.name {
            None => Ok(Value::Array(
                self.registry.list().iter().map(info).collect(),
            )),
            Some(name) => {
                if p.timeout > MAX_GET_BDEVS_TIMEOUT_MS {
                    return Err(RpcError::new(
                        -libc::EINVAL,
                        format!("Invalid argument: timeout must be at most {MAX_GET_BDEVS_TIMEOUT_MS} ms"),
                    ));
                }
                let deadline = Instant::now() + Duration::from_millis(p.timeout);
                loop {
                    if let Some(d) = self.registry.get(&name) {
                        return Ok(Value::Array(vec![info(&d)]));
                    }
                    if Instant::now() >= deadline {
                        return Err(enodev());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

#[async_trait]
impl RpcModule for BdevRpc {
    fn methods(&self) -> Vec<&'static str> {
        vec!["bdev_get_bdevs"]
    }

    fn write_listing(&self, method: &str, out: &mut Vec<u8>) -> bool {
        if method != "bdev_get_bdevs" {
            return false;
        }
        crate::listing::write_bdevs(&self.registry, out);
        true
    }

    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        match method {
            "bdev_get_bdevs" => self.get_bdevs(decode(params)?).await,
            _ => Err(RpcError::method_not_found()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use iobuf::IoBuf;
    use std::sync::atomic::AtomicU64;
    use uuid::Uuid;

    /// A device with fixed properties (512-byte blocks, 16 of them) for output-shape tests.
    /// It writes no config entry, as an lvol bdev (examine brings it back).
    pub(crate) struct FakeDev {
        name: String,
        uuid: Uuid,
        block_len: u32,
        num_blocks: AtomicU64,
        writable: bool,
    }

    impl FakeDev {
        pub(crate) fn new(name: &str, uuid: Uuid, writable: bool) -> Self {
            Self {
                name: name.to_string(),
                uuid,
                block_len: 512,
                num_blocks: AtomicU64::new(16),
                writable,
            }
        }
    }

    #[async_trait]
    impl BlockDevice for FakeDev {
        bdev_core::device_facts!(product: "Fake disk", module: "fake");
        fn io_type_supported(&self, t: IoType) -> bool {
            match t {
                IoType::Read | IoType::Flush | IoType::Reset => true,
                IoType::Write | IoType::WriteZeroes => self.writable,
                _ => false,
            }
        }
        async fn read(&self, _o: u64, buf: IoBuf) -> bdev_core::Result<IoBuf> {
            Ok(buf)
        }
        async fn write(&self, _o: u64, buf: IoBuf) -> bdev_core::Result<IoBuf> {
            Ok(buf)
        }
        async fn flush(&self) -> bdev_core::Result<()> {
            Ok(())
        }
        async fn unmap(&self, _o: u64, _n: u64) -> bdev_core::Result<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _o: u64, _n: u64) -> bdev_core::Result<()> {
            Ok(())
        }
        fn driver_specific(&self) -> Value {
            json!({"fake": {"x": 1}})
        }
    }

    #[test]
    fn bdev_info_has_spdk_keys_in_order() {
        let u = Uuid::parse_str("7e5a0000-e5a0-4e5a-8e5a-000000000001").unwrap();
        let d = FakeDev::new("F0", u, false);
        let v = bdev_info(
            &d,
            &["other".to_string()],
            Some(ClaimType::ReadManyWriteNone),
        );
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "name",
                "aliases",
                "product_name",
                "block_size",
                "num_blocks",
                "preferred_write_alignment",
                "preferred_write_granularity",
                "optimal_write_size",
                "preferred_unmap_alignment",
                "preferred_unmap_granularity",
                "uuid",
                "assigned_rate_limits",
                "claimed",
                "claim_type",
                "zoned",
                "supported_io_types",
                "driver_specific"
            ]
        );
        assert_eq!(v["aliases"], json!([u.to_string(), "other"]));
        assert_eq!(v["claim_type"], json!("read_many_write_none"));
        let io = v["supported_io_types"].as_object().unwrap();
        assert_eq!(io.len(), 22);
        assert_eq!(io["read"], json!(true));
        assert_eq!(io["write"], json!(false));
        assert_eq!(io["nvme_admin"], json!(false));
        assert_eq!(v["driver_specific"], json!({"fake": {"x": 1}}));

        // An lvol-like device whose name is its UUID gets no UUID alias and no claim_type.
        let d = FakeDev::new(&u.to_string(), u, true);
        let v = bdev_info(&d, &["lvs/v".to_string()], None);
        assert_eq!(v["aliases"], json!(["lvs/v"]));
        assert!(v.get("claim_type").is_none());
        assert_eq!(v["claimed"], json!(false));
    }
}
