//! The bdev-level RPC methods: `bdev_get_bdevs`, `bdev_wait_for_examine`, `bdev_set_options`
//! and the create/delete methods of the backends bdev-core ships (malloc, aio, error, null).
//!
//! They live in `tgt` rather than in bdev-core because they are glue over bdev-core's public
//! API (the registry plus the backends' constructors) and keep per-process state bdev-core
//! has no place for (the `Malloc<N>` counter, the error bdevs' injection handles); see
//! `docs/rpc.md`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bdev_core::backend::aio::{AioBdev, AioOpts};
use bdev_core::backend::error::{ErrorBdev, ErrorKind, Injection};
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::backend::null::NullBdev;
use bdev_core::rpc::{decode, RpcError, RpcModule};
use bdev_core::{BdevError, BlockDevice, ClaimType, IoType, Registry};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

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

/// The smallest and largest malloc block size (a power of two in between).
pub const MALLOC_BLOCK_SIZES: std::ops::RangeInclusive<u32> = 512..=65536;

fn errno_err(e: &BdevError) -> RpcError {
    RpcError::from_errno(e.errno())
}

fn enodev() -> RpcError {
    RpcError::from_errno(libc::ENODEV)
}

/// Parses a UUID parameter; a malformed one is a decode failure, as SPDK's `decode_uuid`.
fn parse_uuid(s: &Option<String>) -> Result<Option<Uuid>, RpcError> {
    match s {
        None => Ok(None),
        Some(s) => Uuid::parse_str(s)
            .map(Some)
            .map_err(|_| RpcError::decode_failed()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBdevs {
    name: Option<String>,
    #[serde(default)]
    timeout: u64,
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

/// `bdev_null_create` as the current client sends it (it leaves out what was not given).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullCreate {
    name: String,
    num_blocks: u64,
    block_size: u32,
    uuid: Option<String>,
    #[serde(default)]
    physical_block_size: u32,
    #[serde(default)]
    md_size: u32,
    #[serde(default)]
    dif_type: i32,
    #[serde(default)]
    dif_is_head_of_md: bool,
    #[serde(default)]
    dif_pi_format: u32,
    #[serde(default)]
    preferred_write_alignment: u32,
    #[serde(default)]
    preferred_write_granularity: u32,
    #[serde(default)]
    optimal_write_size: u32,
    #[serde(default)]
    preferred_unmap_alignment: u32,
    #[serde(default)]
    preferred_unmap_granularity: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullResize {
    name: String,
    /// MiB.
    new_size: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameOnly {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AioCreate {
    name: String,
    filename: String,
    #[serde(default)]
    block_size: u32,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    fallocate: bool,
    uuid: Option<String>,
    #[serde(default)]
    nowait: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorCreate {
    base_name: String,
    uuid: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct InjectError {
    name: String,
    io_type: String,
    error_type: String,
    #[serde(default = "one")]
    num: u64,
    queue_depth: Option<u64>,
    corrupt_offset: Option<u64>,
    corrupt_value: Option<u32>,
    nvme_sct: Option<u32>,
    nvme_sc: Option<u32>,
    /// Ours: let this many matching I/Os through before the rule starts.
    #[serde(default)]
    after: u64,
    /// Ours: the rule never runs out (overrides `num`).
    #[serde(default)]
    forever: bool,
    /// Ours: only I/O touching blocks `[offset_blocks, offset_blocks + num_blocks)`.
    offset_blocks: Option<u64>,
    /// Ours: see `offset_blocks`.
    num_blocks: Option<u64>,
}

fn one() -> u64 {
    1
}

/// Parses `bdev_error_inject_error` params into an injection (`None` = clear every rule).
/// Pure, so it is unit-tested without devices.
fn injection_from(p: &InjectError) -> Result<Option<Injection>, RpcError> {
    let io_type = match p.io_type.as_str() {
        "clear" => return Ok(None),
        "all" => None,
        "read" => Some(IoType::Read),
        "write" => Some(IoType::Write),
        "unmap" => Some(IoType::Unmap),
        "flush" => Some(IoType::Flush),
        "write_zeroes" => Some(IoType::WriteZeroes),
        "reset" => Some(IoType::Reset),
        _ => return Err(RpcError::from_errno(libc::EINVAL)),
    };
    let kind = match p.error_type.as_str() {
        "failure" => ErrorKind::Failure,
        "drop_writes" => ErrorKind::DropWrites,
        _ => return Err(RpcError::from_errno(libc::EINVAL)),
    };
    let range = match (p.offset_blocks, p.num_blocks) {
        (None, None) => None,
        (Some(o), Some(n)) => Some((o, n)),
        _ => return Err(RpcError::from_errno(libc::EINVAL)),
    };
    let count = if p.forever { u64::MAX } else { p.num };
    if count == 0 {
        return Err(RpcError::from_errno(libc::EINVAL));
    }
    Ok(Some(Injection {
        io_type,
        kind,
        range,
        after: p.after,
        count,
    }))
}

/// The bdev-level RPC module.
pub struct BdevRpc {
    registry: Registry,
    malloc_counter: Mutex<u64>,
    /// Weak: a strong reference would keep the base descriptor open after the error bdev
    /// was unregistered, and the base could then never be removed.
    error_bdevs: Mutex<HashMap<String, Weak<ErrorBdev>>>,
    /// The null bdevs, for `bdev_null_resize` (weak: the registry owns them).
    null_bdevs: Mutex<HashMap<String, Weak<NullBdev>>>,
    /// The aio bdevs, for `bdev_aio_rescan`.
    aio_bdevs: Mutex<HashMap<String, Weak<AioBdev>>>,
}

fn lock_map<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BdevRpc {
    /// A module over `registry`.
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(BdevRpc {
            registry,
            malloc_counter: Mutex::new(0),
            error_bdevs: Mutex::new(HashMap::new()),
            null_bdevs: Mutex::new(HashMap::new()),
            aio_bdevs: Mutex::new(HashMap::new()),
        })
    }

    fn next_malloc_name(&self) -> String {
        let mut n = self
            .malloc_counter
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        loop {
            let name = format!("Malloc{}", *n);
            *n += 1;
            if self.registry.get(&name).is_none() {
                return name;
            }
        }
    }

    /// Unregisters `name` if it is a device of `module`; `-19` otherwise.
    async fn delete_of_module(&self, name: &str, module: &str) -> Result<Value, RpcError> {
        match self.registry.get(name) {
            Some(d) if d.module_name() == module => {}
            _ => return Err(enodev()),
        }
        self.registry
            .unregister(name)
            .await
            .map_err(|e| errno_err(&e))?;
        Ok(Value::Bool(true))
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

    async fn malloc_create(&self, p: MallocCreate) -> Result<Value, RpcError> {
        let uuid = parse_uuid(&p.uuid)?;
        if !MALLOC_BLOCK_SIZES.contains(&p.block_size)
            || !p.block_size.is_power_of_two()
            || p.num_blocks == 0
        {
            // SPDK only asks for a multiple of 512; a huge block would make every small
            // write a read-modify-write of that much memory.
            return Err(RpcError::from_errno(libc::EINVAL));
        }
        if p.physical_block_size % 512 != 0 {
            return Err(RpcError::from_errno(libc::EINVAL));
        }
        if p.md_size != 0 || p.dif_type != 0 {
            // Separate metadata and DIF are not implemented by our malloc backend.
            return Err(RpcError::from_errno(libc::EOPNOTSUPP));
        }
        let name = match p.name {
            Some(n) if !n.is_empty() => n,
            _ => self.next_malloc_name(),
        };
        let dev = MallocBdev::create(&name, p.num_blocks, p.block_size, uuid)
            .map_err(|e| errno_err(&e))?;
        self.registry
            .register(dev)
            .await
            .map_err(|e| errno_err(&e))?;
        Ok(Value::String(name))
    }

    async fn aio_create(&self, p: AioCreate) -> Result<Value, RpcError> {
        let uuid = parse_uuid(&p.uuid)?;
        if p.block_size != 0 && (p.block_size % 512 != 0 || !p.block_size.is_power_of_two()) {
            return Err(RpcError::from_errno(libc::EINVAL));
        }
        if self.registry.get(&p.name).is_some() {
            return Err(RpcError::from_errno(libc::EEXIST));
        }
        let opts = AioOpts {
            name: p.name.clone(),
            filename: PathBuf::from(&p.filename),
            block_len: (p.block_size != 0).then_some(p.block_size),
            readonly: p.readonly,
            fallocate: p.fallocate,
            nowait: p.nowait,
            uuid,
            ..Default::default()
        };
        let dev = AioBdev::create(opts).map_err(|e| match &e {
            // The file is held (by another bdev or process): say by whom, after SPDK's text.
            BdevError::Busy(who) => RpcError::new(
                -libc::EBUSY,
                format!("{}: {who}", bdev_core::rpc::strerror(libc::EBUSY)),
            ),
            e => errno_err(e),
        })?;
        self.registry
            .register(dev.clone())
            .await
            .map_err(|e| errno_err(&e))?;
        lock_map(&self.aio_bdevs).insert(p.name.clone(), Arc::downgrade(&dev));
        self.registry.wait_for_examine().await;
        Ok(Value::String(p.name))
    }

    async fn null_create(&self, p: NullCreate) -> Result<Value, RpcError> {
        let uuid = parse_uuid(&p.uuid)?;
        if p.physical_block_size % 512 != 0 {
            return Err(RpcError::from_errno(libc::EINVAL));
        }
        if p.md_size != 0 || p.dif_type != 0 || p.dif_is_head_of_md || p.dif_pi_format != 0 {
            return Err(RpcError::new(
                -libc::EOPNOTSUPP,
                "Operation not supported: separate metadata and DIF are not implemented",
            ));
        }
        if p.preferred_write_alignment != 0
            || p.preferred_write_granularity != 0
            || p.optimal_write_size != 0
            || p.preferred_unmap_alignment != 0
            || p.preferred_unmap_granularity != 0
        {
            return Err(RpcError::new(
                -libc::EOPNOTSUPP,
                "Operation not supported: write and unmap alignment hints are not implemented",
            ));
        }
        if self.registry.get(&p.name).is_some() {
            return Err(RpcError::from_errno(libc::EEXIST));
        }
        let dev = NullBdev::create(&p.name, p.num_blocks, p.block_size, uuid)
            .map_err(|e| errno_err(&e))?;
        self.registry
            .register(dev.clone())
            .await
            .map_err(|e| errno_err(&e))?;
        self.lock_nulls()
            .insert(p.name.clone(), Arc::downgrade(&dev));
        Ok(Value::String(p.name))
    }

    fn lock_nulls(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<NullBdev>>> {
        self.null_bdevs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `bdev_null_resize`: the new size is in MiB; shrinking is `-22` as in SPDK.
    fn null_resize(&self, p: NullResize) -> Result<Value, RpcError> {
        let dev = self.registry.get(&p.name).ok_or_else(enodev)?;
        let null = {
            let mut map = self.lock_nulls();
            map.retain(|n, _| self.registry.get(n).is_some());
            map.get(dev.name()).and_then(Weak::upgrade)
        };
        let Some(null) = null else {
            return Err(RpcError::from_errno(libc::EINVAL));
        };
        let bytes = p
            .new_size
            .checked_mul(1 << 20)
            .ok_or_else(|| RpcError::from_errno(libc::EINVAL))?;
        null.resize(bytes / null.block_len() as u64)
            .map_err(|e| errno_err(&e))?;
        self.registry.notify_resize(null.name());
        Ok(Value::Bool(true))
    }

    /// `bdev_aio_rescan`: re-reads the file size; a change goes to every opener as a resize
    /// event. A smaller file is `-16`, as SPDK (which refuses to shrink an open bdev, and its
    /// rescan holds one descriptor itself).
    fn aio_rescan(&self, name: &str) -> Result<Value, RpcError> {
        let dev = self.registry.get(name).ok_or_else(enodev)?;
        let aio = {
            let mut map = lock_map(&self.aio_bdevs);
            map.retain(|n, _| self.registry.get(n).is_some());
            map.get(dev.name()).and_then(Weak::upgrade)
        };
        let Some(aio) = aio else {
            return Err(enodev());
        };
        let path = aio.driver_specific()["aio"]["filename"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(enodev)?;
        let size = std::fs::File::open(&path)
            .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
            .map_err(|e| RpcError::from_errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
        let old = aio.num_blocks();
        if size / u64::from(aio.block_len()) < old {
            return Err(RpcError::from_errno(libc::EBUSY));
        }
        let new = aio.rescan().map_err(|e| errno_err(&e))?;
        if new != old {
            tracing::info!(target: "bdev", "aio bdev {name} resized: {old} -> {new} blocks");
            self.registry.notify_resize(aio.name());
        }
        Ok(Value::Bool(true))
    }

    async fn error_create(&self, p: ErrorCreate) -> Result<Value, RpcError> {
        if p.uuid.is_some() {
            // Our error bdev derives nothing from a given UUID; accept only a valid one.
            parse_uuid(&p.uuid)?;
        }
        let name = format!("EE_{}", p.base_name);
        if self.registry.get(&name).is_some() {
            return Err(RpcError::from_errno(libc::EEXIST));
        }
        let base = self
            .registry
            .open(&p.base_name, true)
            .map_err(|e| errno_err(&e))?;
        let dev = ErrorBdev::create(&name, base).map_err(|e| errno_err(&e))?;
        self.registry
            .register(dev.clone())
            .await
            .map_err(|e| errno_err(&e))?;
        self.lock_errors()
            .insert(name.clone(), Arc::downgrade(&dev));
        Ok(Value::String(name))
    }

    fn lock_errors(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<ErrorBdev>>> {
        self.error_bdevs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error_bdev(&self, name: &str) -> Result<Arc<ErrorBdev>, RpcError> {
        let mut map = self.lock_errors();
        // Forget error bdevs that went away with their base.
        map.retain(|n, _| self.registry.get(n).is_some());
        let dev = self.registry.get(name).ok_or_else(enodev)?;
        map.get(dev.name())
            .and_then(Weak::upgrade)
            .ok_or_else(enodev)
    }
}

#[async_trait]
impl RpcModule for BdevRpc {
    fn methods(&self) -> Vec<&'static str> {
        vec![
            "bdev_set_options",
            "bdev_get_bdevs",
            "bdev_wait_for_examine",
            "bdev_malloc_create",
            "bdev_malloc_delete",
            "bdev_aio_create",
            "bdev_aio_delete",
            "bdev_aio_rescan",
            "bdev_error_create",
            "bdev_error_delete",
            "bdev_null_create",
            "bdev_null_delete",
            "bdev_null_resize",
            "bdev_error_inject_error",
        ]
    }

    async fn call_raw(
        &self,
        method: &str,
        params: &Option<Value>,
        out: &mut Vec<u8>,
    ) -> Option<Result<(), RpcError>> {
        // The whole list only; a name (with its wait) goes the Value way.
        let whole = match params {
            None | Some(Value::Null) => true,
            Some(Value::Object(o)) => o.is_empty(),
            _ => false,
        };
        if method != "bdev_get_bdevs" || !whole {
            return None;
        }
        crate::listing::write_bdevs(&self.registry, out);
        Some(Ok(()))
    }

    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        match method {
            "bdev_set_options" => {
                let _: SetOptions = decode(params)?;
                Ok(Value::Bool(true))
            }
            "bdev_get_bdevs" => self.get_bdevs(decode(params)?).await,
            "bdev_wait_for_examine" => {
                match &params {
                    None => {}
                    Some(Value::Object(o)) if o.is_empty() => {}
                    Some(_) => {
                        return Err(RpcError::new(
                            bdev_core::rpc::INVALID_PARAMS,
                            "bdev_wait_for_examine requires no parameters",
                        ))
                    }
                }
                self.registry.wait_for_examine().await;
                Ok(Value::Bool(true))
            }
            "bdev_malloc_create" => self.malloc_create(decode(params)?).await,
            "bdev_malloc_delete" => {
                let p: NameOnly = decode(params)?;
                self.delete_of_module(&p.name, "malloc").await
            }
            "bdev_aio_create" => self.aio_create(decode(params)?).await,
            "bdev_aio_delete" => {
                let p: NameOnly = decode(params)?;
                self.delete_of_module(&p.name, "aio").await
            }
            "bdev_aio_rescan" => {
                let p: NameOnly = decode(params)?;
                self.aio_rescan(&p.name)
            }
            "bdev_error_create" => self.error_create(decode(params)?).await,
            "bdev_null_create" => self.null_create(decode(params)?).await,
            "bdev_null_delete" => {
                let p: NameOnly = decode(params)?;
                let r = self.delete_of_module(&p.name, "null").await;
                self.lock_nulls().remove(&p.name);
                r
            }
            "bdev_null_resize" => self.null_resize(decode(params)?),
            "bdev_error_delete" => {
                let p: NameOnly = decode(params)?;
                let r = self.delete_of_module(&p.name, "error").await;
                self.lock_errors().remove(&p.name);
                r
            }
            "bdev_error_inject_error" => {
                let p: InjectError = decode(params)?;
                let dev = self.error_bdev(&p.name)?;
                let ours = p.error_type == "drop_writes"
                    || p.after != 0
                    || p.forever
                    || p.offset_blocks.is_some()
                    || p.num_blocks.is_some();
                if !ours && p.io_type != "clear" && p.error_type != "failure" {
                    // SPDK's other error types, mapped by the error bdev itself (nomem fails
                    // with ENOMEM, pending and corrupt_data with EIO).
                    dev.inject_spdk(&p.io_type, &p.error_type, p.num)
                        .map_err(|e| errno_err(&e))?;
                    return Ok(Value::Bool(true));
                }
                match injection_from(&p)? {
                    None => dev.clear(),
                    Some(inj) => dev.inject(inj),
                }
                Ok(Value::Bool(true))
            }
            _ => Err(RpcError::method_not_found()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use iobuf::IoBuf;

    /// A device with fixed properties for output-shape tests.
    pub(crate) struct FakeDev {
        pub name: String,
        pub uuid: Uuid,
        pub writable: bool,
    }

    #[async_trait]
    impl BlockDevice for FakeDev {
        fn name(&self) -> &str {
            &self.name
        }
        fn product_name(&self) -> &str {
            "Fake disk"
        }
        fn module_name(&self) -> &str {
            "fake"
        }
        fn uuid(&self) -> Uuid {
            self.uuid
        }
        fn block_len(&self) -> u32 {
            512
        }
        fn num_blocks(&self) -> u64 {
            16
        }
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
        let d = FakeDev {
            name: "F0".into(),
            uuid: u,
            writable: false,
        };
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
        let d = FakeDev {
            name: u.to_string(),
            uuid: u,
            writable: true,
        };
        let v = bdev_info(&d, &["lvs/v".to_string()], None);
        assert_eq!(v["aliases"], json!(["lvs/v"]));
        assert!(v.get("claim_type").is_none());
        assert_eq!(v["claimed"], json!(false));
    }

    fn inject(v: Value) -> Result<Option<Injection>, RpcError> {
        let p: InjectError = decode(Some(v))?;
        injection_from(&p)
    }

    #[test]
    fn inject_error_params() {
        let i =
            inject(json!({"name": "EE_M0", "io_type": "write", "error_type": "failure", "num": 5}))
                .unwrap()
                .unwrap();
        assert_eq!(i.io_type, Some(IoType::Write));
        assert_eq!((i.kind, i.count, i.after), (ErrorKind::Failure, 5, 0));
        let i = inject(
            json!({"name": "E", "io_type": "all", "error_type": "drop_writes",
            "after": 10, "forever": true}),
        )
        .unwrap()
        .unwrap();
        assert_eq!((i.io_type, i.kind), (None, ErrorKind::DropWrites));
        assert_eq!((i.after, i.count), (10, u64::MAX));
        assert!(
            inject(json!({"name": "E", "io_type": "clear", "error_type": "failure"}))
                .unwrap()
                .is_none()
        );
        assert_eq!(
            inject(json!({"name": "E", "io_type": "bogus", "error_type": "failure"}))
                .unwrap_err()
                .code,
            -22
        );
        assert_eq!(
            inject(json!({"name": "E", "io_type": "read", "error_type": "nomem"}))
                .unwrap_err()
                .code,
            -22
        );
        assert_eq!(
            inject(json!({"name": "E", "io_type": "read"})).unwrap_err(),
            RpcError::decode_failed()
        );
    }

    #[test]
    fn malloc_params_as_the_client_sends_them() {
        let p: MallocCreate = decode(Some(json!({"block_size": 512, "dif_is_head_of_md": false,
            "md_interleave": false, "name": "M0", "num_blocks": 65536})))
        .unwrap();
        assert_eq!((p.block_size, p.num_blocks), (512, 65536));
        let p: AioCreate = decode(Some(json!({"block_size": 4096, "fallocate": false,
            "filename": "/path/f", "name": "aio0", "nowait": false, "readonly": false,
            "uuid": "7e5a0000-e5a0-4e5a-8e5a-000000000001"})))
        .unwrap();
        assert_eq!(
            parse_uuid(&p.uuid).unwrap().unwrap().to_string(),
            "7e5a0000-e5a0-4e5a-8e5a-000000000001"
        );
        assert!(decode::<MallocCreate>(Some(json!({"block_size": 512}))).is_err());
        assert!(parse_uuid(&Some("nope".into())).is_err());
    }
}
