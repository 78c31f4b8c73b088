//! The `bdev_lvol_*` JSON-RPC methods, with SPDK's parameter names, result shapes and error
//! conventions (see `spec/lvol-and-rpc.md` §2 and §4), plus two methods of our own for
//! degraded mode (an esnap clone whose base bdev is missing):
//!
//! * `bdev_lvol_set_esnap_retry {"retries": N, "delay_ms": M}` (both optional, u32 / u64):
//!   how many times I/O that needs a missing external snapshot is retried, and how long to
//!   wait between tries, before it fails with EIO. Defaults: 3 retries, 100 ms. Bounds:
//!   [`MAX_ESNAP_RETRIES`], [`MAX_ESNAP_RETRY_DELAY_MS`]; beyond them `-22`. Result `true`.
//!   Unknown or mistyped params: `-32603 "spdk_json_decode_object failed"`.
//!
//! Sizes (`bdev_lvol_create`, `bdev_lvol_resize`): `size_in_mib` (or `size` in bytes) must
//! fit in a u64 in bytes after rounding up to the store's cluster size, else `-22`
//! "Invalid argument" before anything is allocated (SPDK's C arithmetic would wrap); a create
//! of size 0 is `-22` too. What the store cannot hold is the blobstore's answer (`-32602`
//! "No space left on device").
//! * `bdev_lvol_get_esnap_retry {}`: `{"retries": N, "delay_ms": M}`.
//!
//! * `bdev_lvol_get_fragmap {"name", "offset"?, "size"?}` (Longhorn's engine's method):
//!   `{cluster_size, num_clusters, num_allocated_clusters, fragmap}`, the fragmap a base64
//!   bitmap with one bit per cluster of the range (set: allocated in this lvol), LSB first.
//!   `offset`/`size` in bytes, multiples of the cluster size, else `-22`; size 0 = to the end.
//!
//! `bdev_lvol_get_lvols` entries carry `is_degraded` and `num_allocated_clusters`;
//! `bdev_lvol_get_lvstores` entries carry `max_growable_size` (SPDK HEAD keys).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bdev_core::rpc::{decode, strerror, RpcError, RpcModule, INTERNAL_ERROR, INVALID_PARAMS};
use blobstore::ClearMethod;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{Lvol, LvolError, LvolModule, LvolStore, LvsClearMethod, LvsOpts, ShallowCopyState};

const MIB: u64 = 1 << 20;

/// The most retries `bdev_lvol_set_esnap_retry` accepts.
pub const MAX_ESNAP_RETRIES: u32 = 1000;
/// The longest delay between retries `bdev_lvol_set_esnap_retry` accepts (60 s).
pub const MAX_ESNAP_RETRY_DELAY_MS: u64 = 60_000;

/// The size in bytes of a create or resize request: `size_in_mib` first, else `size`.
/// `-22` when it overflows a u64, or does once rounded up to `cluster_size`.
fn request_size(
    size_in_mib: Option<u64>,
    size: Option<u64>,
    cluster_size: u32,
) -> Result<u64, RpcError> {
    let too_big = || {
        RpcError::new(
            -libc::EINVAL,
            "Invalid argument: size does not fit in 64 bits once rounded to the cluster size",
        )
    };
    let bytes = match (size_in_mib, size) {
        (Some(mib), _) => mib.checked_mul(MIB).ok_or_else(too_big)?,
        (None, Some(b)) => b,
        (None, None) => return Err(RpcError::decode_failed()),
    };
    let c = u64::from(cluster_size.max(1));
    bytes.checked_next_multiple_of(c).ok_or_else(too_big)?;
    Ok(bytes)
}
/// The lvol module's RPC methods.
pub struct LvolRpc {
    module: LvolModule,
}

impl LvolRpc {
    /// Serves the methods of `module`.
    pub fn new(module: LvolModule) -> Self {
        LvolRpc { module }
    }
}

/// Every method name served.
pub const METHODS: &[&str] = &[
    "bdev_lvol_create_lvstore",
    "bdev_lvol_delete_lvstore",
    "bdev_lvol_rename_lvstore",
    "bdev_lvol_get_lvstores",
    "bdev_lvol_grow_lvstore",
    "bdev_lvol_create",
    "bdev_lvol_snapshot",
    "bdev_lvol_clone",
    "bdev_lvol_clone_bdev",
    "bdev_lvol_rename",
    "bdev_lvol_resize",
    "bdev_lvol_set_read_only",
    "bdev_lvol_delete",
    "bdev_lvol_inflate",
    "bdev_lvol_decouple_parent",
    "bdev_lvol_get_lvols",
    "bdev_lvol_set_parent",
    "bdev_lvol_set_parent_bdev",
    "bdev_lvol_start_shallow_copy",
    "bdev_lvol_check_shallow_copy",
    "bdev_lvol_set_esnap_retry",
    "bdev_lvol_get_esnap_retry",
    "bdev_lvol_get_fragmap",
];

/// `bdev_lvol_get_fragmap` (Longhorn's engine; not in upstream SPDK): `offset` and `size` in
/// bytes, both multiples of the cluster size; `size` 0 or absent means "to the end".
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetFragmap {
    name: String,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    size: u64,
}

/// Standard base64 (RFC 4648, with padding), as Longhorn's engine encodes the fragmap.
fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The fragmap of clusters `first..first + count` of `lvol`: one bit per cluster, set when the
/// lvol itself owns it, least significant bit first in each byte; and the count of set bits.
fn fragmap(lvol: &Lvol, first: u64, count: u64) -> (Vec<u8>, u64) {
    let mut map = vec![0u8; count.div_ceil(8) as usize];
    let mut allocated = 0;
    for i in 0..count {
        if lvol.blob().is_cluster_allocated(first + i) {
            map[(i / 8) as usize] |= 1 << (i % 8);
            allocated += 1;
        }
    }
    (map, allocated)
}

fn enodev() -> RpcError {
    RpcError::from_errno(libc::ENODEV)
}

/// Whether an operation failed because its lvol or store went away under it (deleted or
/// unloaded by a concurrent request): ENODEV, a blob or store handle closed meanwhile, or a
/// blob deleted meanwhile.
fn is_gone(e: &LvolError) -> bool {
    e.errno() == libc::ENODEV
        || matches!(
            e,
            LvolError::Blobstore(
                blobstore::BsError::BadHandle(_) | blobstore::BsError::NotFound(_)
            )
        )
}

/// A failure reported by an async completion: `-32602` + strerror. An lvol or store that
/// went away meanwhile is `-19` "No such device", the answer a request sent a moment later
/// gets from the lookup, so that one situation has one code however the race falls.
fn async_err(e: LvolError) -> RpcError {
    if is_gone(&e) {
        return enodev();
    }
    RpcError::invalid_params_errno(e.errno())
}

/// [`async_err`] for methods where ENODEV names another bdev (SPDK: `-32602`).
fn async_err_raw(e: LvolError) -> RpcError {
    RpcError::invalid_params_errno(e.errno())
}

/// A synchronous failure: `-errno` + strerror.
fn sync_err(e: LvolError) -> RpcError {
    RpcError::from_errno(e.errno())
}

/// Errors raised before the blobstore was involved are synchronous in SPDK; blobstore failures
/// come back through the completion callback. A store that went away is `-19`.
fn create_err(e: LvolError) -> RpcError {
    if is_gone(&e) {
        return enodev();
    }
    match e {
        LvolError::Blobstore(_) => async_err(e),
        other => sync_err(other),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateLvstore {
    bdev_name: String,
    lvs_name: String,
    cluster_sz: Option<u32>,
    clear_method: Option<String>,
    num_md_pages_per_cluster_ratio: Option<u32>,
    md_page_size: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LvsSel {
    uuid: Option<String>,
    lvs_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenameLvstore {
    old_name: String,
    new_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateLvol {
    lvol_name: String,
    size_in_mib: Option<u64>,
    /// Older clients send the size in bytes.
    size: Option<u64>,
    thin_provision: Option<bool>,
    uuid: Option<String>,
    lvs_name: Option<String>,
    clear_method: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Snapshot {
    lvol_name: String,
    snapshot_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Clone {
    snapshot_name: String,
    clone_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloneBdev {
    bdev: String,
    lvs_name: String,
    clone_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rename {
    old_name: String,
    new_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    name: String,
    size_in_mib: Option<u64>,
    size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Name {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GetLvols {
    lvs_uuid: Option<String>,
    lvs_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetParent {
    lvol_name: String,
    parent_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartShallowCopy {
    src_lvol_name: String,
    dst_bdev_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckShallowCopy {
    operation_id: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EsnapRetryParams {
    retries: Option<u32>,
    delay_ms: Option<u64>,
}

fn lvs_clear_method(s: Option<&str>) -> Result<LvsClearMethod, RpcError> {
    match s.map(str::to_ascii_lowercase).as_deref() {
        None | Some("unmap") => Ok(LvsClearMethod::Unmap),
        Some("write_zeroes") => Ok(LvsClearMethod::WriteZeroes),
        Some("none") => Ok(LvsClearMethod::None),
        Some(_) => Err(RpcError::new(
            -libc::EINVAL,
            "Invalid clear_method parameter",
        )),
    }
}

fn lvol_clear_method(s: Option<&str>) -> Result<ClearMethod, RpcError> {
    match s.map(str::to_ascii_lowercase).as_deref() {
        None | Some("default") => Ok(ClearMethod::Default),
        Some("none") => Ok(ClearMethod::None),
        Some("unmap") => Ok(ClearMethod::Unmap),
        Some("write_zeroes") => Ok(ClearMethod::WriteZeroes),
        Some(_) => Err(RpcError::new(
            -libc::EINVAL,
            "Invalid clear_method parameter",
        )),
    }
}

impl LvolRpc {
    /// "lvs lookup": exactly one of uuid / name (else -22), not found -19.
    fn lvs_xor(&self, uuid: Option<&str>, name: Option<&str>) -> Result<Arc<LvolStore>, RpcError> {
        match (uuid, name) {
            (Some(u), None) => Uuid::parse_str(u)
                .ok()
                .and_then(|u| self.module.lvstore_by_uuid(&u))
                .ok_or_else(enodev),
            (None, Some(n)) => self.module.lvstore_by_name(n).ok_or_else(enodev),
            _ => Err(RpcError::from_errno(libc::EINVAL)),
        }
    }

    /// Every store when neither a UUID nor a name is given, else the one [`Self::lvs_xor`]
    /// selects.
    fn lvs_or_all(
        &self,
        uuid: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<Arc<LvolStore>>, RpcError> {
        if uuid.is_none() && name.is_none() {
            return Ok(self.module.lvstores());
        }
        Ok(vec![self.lvs_xor(uuid, name)?])
    }

    fn lvol(&self, name: &str) -> Result<Arc<Lvol>, RpcError> {
        self.module
            .find_lvol(name)
            .filter(|l| l.is_registered())
            .ok_or_else(enodev)
    }

    async fn dispatch(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let m = &self.module;
        match method {
            "bdev_lvol_create_lvstore" => {
                let p: CreateLvstore = decode(params)?;
                let mut opts = LvsOpts::new(&p.lvs_name);
                // 0 means "default", as in SPDK's vbdev_lvs_create.
                if let Some(c) = p.cluster_sz.filter(|&c| c != 0) {
                    opts.cluster_size = c;
                }
                opts.clear_method = lvs_clear_method(p.clear_method.as_deref())?;
                if let Some(r) = p.num_md_pages_per_cluster_ratio.filter(|&r| r != 0) {
                    opts.md_pages_ratio = r;
                }
                if let Some(s) = p.md_page_size {
                    opts.md_page_size = s;
                }
                let s = m
                    .create_lvstore(&p.bdev_name, opts)
                    .await
                    .map_err(create_err)?;
                Ok(json!(s.uuid().hyphenated().to_string()))
            }
            // The operations on one store, by UUID or name, that answer `true`.
            "bdev_lvol_delete_lvstore" | "bdev_lvol_grow_lvstore" => {
                let p: LvsSel = decode(params)?;
                let s = self.lvs_xor(p.uuid.as_deref(), p.lvs_name.as_deref())?;
                if method == "bdev_lvol_grow_lvstore" {
                    m.grow_lvstore(&s).await
                } else {
                    m.destroy_lvstore(&s).await
                }
                .map_err(async_err)?;
                Ok(json!(true))
            }
            "bdev_lvol_rename_lvstore" => {
                let p: RenameLvstore = decode(params)?;
                let s = m.lvstore_by_name(&p.old_name).ok_or_else(|| {
                    RpcError::new(
                        -libc::ENOENT,
                        format!("Lvol store {} not found", p.old_name),
                    )
                })?;
                m.rename_lvstore(&s, &p.new_name).await.map_err(async_err)?;
                Ok(json!(true))
            }
            "bdev_lvol_get_lvstores" => {
                let p: LvsSel = decode(params)?;
                let stores = self.lvs_or_all(p.uuid.as_deref(), p.lvs_name.as_deref())?;
                Ok(Value::Array(stores.iter().map(|s| s.info_json()).collect()))
            }
            "bdev_lvol_create" => {
                let p: CreateLvol = decode(params)?;
                if p.size_in_mib.is_none() && p.size.is_none() {
                    return Err(RpcError::decode_failed());
                }
                let clear = lvol_clear_method(p.clear_method.as_deref())?;
                let s = self.lvs_xor(p.uuid.as_deref(), p.lvs_name.as_deref())?;
                let size = request_size(p.size_in_mib, p.size, s.cluster_size())?;
                if size == 0 {
                    return Err(RpcError::new(
                        -libc::EINVAL,
                        "Invalid argument: size must be greater than 0",
                    ));
                }
                let l = m
                    .create_lvol(
                        &s,
                        &p.lvol_name,
                        size,
                        p.thin_provision.unwrap_or(false),
                        clear,
                    )
                    .await
                    .map_err(create_err)?;
                Ok(json!(l.unique_id()))
            }
            "bdev_lvol_snapshot" => {
                let p: Snapshot = decode(params)?;
                let l = self.lvol(&p.lvol_name)?;
                let s = m
                    .create_snapshot(&l, &p.snapshot_name)
                    .await
                    .map_err(async_err)?;
                Ok(json!(s.unique_id()))
            }
            "bdev_lvol_clone" => {
                let p: Clone = decode(params)?;
                let l = self.lvol(&p.snapshot_name)?;
                let c = m.create_clone(&l, &p.clone_name).await.map_err(async_err)?;
                Ok(json!(c.unique_id()))
            }
            "bdev_lvol_clone_bdev" => {
                let p: CloneBdev = decode(params)?;
                let s = m
                    .lvstore_by_name(&p.lvs_name)
                    .ok_or_else(|| RpcError::new(INVALID_PARAMS, "lvs does not exist"))?;
                let dev = m
                    .registry()
                    .get(&p.bdev)
                    .ok_or_else(|| RpcError::new(INVALID_PARAMS, "bdev does not exist"))?;
                if dev.module_name() == "lvol" {
                    if let Some(l) = m.find_lvol(dev.name()) {
                        if l.store().is_some_and(|ls| Arc::ptr_eq(&ls, &s)) {
                            return Err(RpcError::new(
                                INVALID_PARAMS,
                                "bdev is an lvol in same lvs as clone; use bdev_lvol_clone instead",
                            ));
                        }
                    }
                }
                let c = m
                    .create_esnap_clone(&p.bdev, &s, &p.clone_name)
                    .await
                    .map_err(async_err_raw)?;
                Ok(json!(c.unique_id()))
            }
            "bdev_lvol_rename" => {
                let p: Rename = decode(params)?;
                let l = self.lvol(&p.old_name)?;
                m.rename_lvol(&l, &p.new_name).await.map_err(async_err)?;
                Ok(json!(true))
            }
            "bdev_lvol_resize" => {
                let p: Resize = decode(params)?;
                if p.size_in_mib.is_none() && p.size.is_none() {
                    return Err(RpcError::decode_failed());
                }
                let l = self.lvol(&p.name)?;
                let cluster = l.store().map(|s| s.cluster_size()).unwrap_or(1);
                let size = request_size(p.size_in_mib, p.size, cluster)?;
                m.resize_lvol(&l, size).await.map_err(async_err)?;
                Ok(json!(true))
            }
            // The operations on one lvol, by name, that answer `true`.
            "bdev_lvol_set_read_only" | "bdev_lvol_inflate" | "bdev_lvol_decouple_parent" => {
                let p: Name = decode(params)?;
                let l = self.lvol(&p.name)?;
                match method {
                    "bdev_lvol_set_read_only" => m.set_read_only(&l).await,
                    "bdev_lvol_inflate" => m.inflate_lvol(&l).await,
                    _ => m.decouple_parent(&l).await,
                }
                .map_err(async_err)?;
                Ok(json!(true))
            }
            "bdev_lvol_delete" => {
                let p: Name = decode(params)?;
                // Also finds lvols without a bdev, by UUID or lvs/lvol.
                let l = m.find_lvol(&p.name).ok_or_else(enodev)?;
                m.delete_lvol(&l).await.map_err(|e| {
                    if is_gone(&e) {
                        enodev()
                    } else {
                        RpcError::new(INTERNAL_ERROR, strerror(e.errno()))
                    }
                })?;
                Ok(json!(true))
            }
            "bdev_lvol_get_lvols" => {
                let p: GetLvols = decode(params)?;
                let stores = self.lvs_or_all(p.lvs_uuid.as_deref(), p.lvs_name.as_deref())?;
                let mut out = Vec::new();
                for s in stores {
                    out.extend(s.lvols_in_order().iter().map(|l| l.info_json()));
                }
                Ok(Value::Array(out))
            }
            "bdev_lvol_set_parent" => {
                let p: SetParent = decode(params)?;
                let l = self.lvol(&p.lvol_name)?;
                let parent = self.lvol(&p.parent_name)?;
                m.set_parent(&l, &parent).await.map_err(async_err)?;
                Ok(json!(true))
            }
            "bdev_lvol_set_parent_bdev" => {
                let p: SetParent = decode(params)?;
                let l = self.lvol(&p.lvol_name)?;
                if m.registry().get(&p.parent_name).is_none() {
                    // SPDK looks the parent up in the async part: -32602 "No such device".
                    return Err(RpcError::invalid_params_errno(libc::ENODEV));
                }
                m.set_parent_bdev(&l, &p.parent_name)
                    .await
                    .map_err(async_err_raw)?;
                Ok(json!(true))
            }
            "bdev_lvol_start_shallow_copy" => {
                let p: StartShallowCopy = decode(params)?;
                let l = self.lvol(&p.src_lvol_name)?;
                let op = m
                    .start_shallow_copy(&l, &p.dst_bdev_name)
                    .map_err(async_err_raw)?;
                Ok(json!({ "operation_id": op }))
            }
            "bdev_lvol_check_shallow_copy" => {
                let p: CheckShallowCopy = decode(params)?;
                let s = m.check_shallow_copy(p.operation_id).ok_or_else(enodev)?;
                let mut v = json!({
                    "copied_clusters": s.copied_clusters,
                    "total_clusters": s.total_clusters,
                    "state": s.state.as_str(),
                });
                if s.state == ShallowCopyState::Error {
                    if let (Some(errno), Some(obj)) = (s.error, v.as_object_mut()) {
                        obj.insert("error".into(), json!(strerror(errno)));
                    }
                }
                Ok(v)
            }
            "bdev_lvol_set_esnap_retry" => {
                let p: EsnapRetryParams = decode(params)?;
                if p.retries.is_some_and(|r| r > MAX_ESNAP_RETRIES)
                    || p.delay_ms.is_some_and(|d| d > MAX_ESNAP_RETRY_DELAY_MS)
                {
                    return Err(RpcError::new(
                        -libc::EINVAL,
                        format!(
                            "Invalid argument: retries must be at most {MAX_ESNAP_RETRIES}, delay_ms at most {MAX_ESNAP_RETRY_DELAY_MS}"
                        ),
                    ));
                }
                let (r, d) = m.esnap_retry();
                let retries = p.retries.unwrap_or(r);
                let delay = p.delay_ms.map(Duration::from_millis).unwrap_or(d);
                m.set_esnap_retry(retries, delay);
                Ok(json!(true))
            }
            "bdev_lvol_get_fragmap" => {
                let p: GetFragmap = decode(params)?;
                let l = self.lvol(&p.name)?;
                let cluster = u64::from(l.store().ok_or_else(enodev)?.cluster_size());
                let total = l.blob().num_clusters();
                let inval =
                    |msg: &str| RpcError::new(-libc::EINVAL, format!("Invalid argument: {msg}"));
                if !p.offset.is_multiple_of(cluster) || !p.size.is_multiple_of(cluster) {
                    return Err(inval(
                        "offset and size must be multiples of the cluster size",
                    ));
                }
                let first = p.offset / cluster;
                if first > total {
                    return Err(inval("offset is beyond the end of the lvol"));
                }
                let count = if p.size == 0 {
                    total - first
                } else {
                    p.size / cluster
                };
                if count > total - first {
                    return Err(inval("offset + size is beyond the end of the lvol"));
                }
                let (map, allocated) = fragmap(&l, first, count);
                Ok(json!({
                    "cluster_size": cluster,
                    "num_clusters": count,
                    "num_allocated_clusters": allocated,
                    "fragmap": base64(&map),
                }))
            }
            "bdev_lvol_get_esnap_retry" => {
                let _: NoParams = decode(params)?;
                let (r, d) = m.esnap_retry();
                Ok(json!({ "retries": r, "delay_ms": d.as_millis() as u64 }))
            }
            _ => Err(RpcError::method_not_found()),
        }
    }
}

#[async_trait]
impl RpcModule for LvolRpc {
    fn methods(&self) -> Vec<&'static str> {
        METHODS.to_vec()
    }
    fn write_listing(&self, method: &str, out: &mut Vec<u8>) -> bool {
        if method != "bdev_lvol_get_lvols" {
            return false;
        }
        crate::listing::write_lvols(&self.module.lvstores(), out);
        true
    }

    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        self.dispatch(method, params).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
        assert_eq!(base64(&[0xff, 0x01]), "/wE=");
    }

    #[test]
    fn sizes_that_overflow_are_refused() {
        let c = 4 << 20;
        assert_eq!(request_size(Some(4), None, c).unwrap(), 4 * MIB);
        assert_eq!(request_size(None, Some(5), c).unwrap(), 5);
        // 2^44 MiB is 2^64 bytes; 2^64 - 1 MiB overflows too.
        assert_eq!(request_size(Some(1 << 44), None, c).unwrap_err().code, -22);
        assert_eq!(request_size(Some(u64::MAX), None, c).unwrap_err().code, -22);
        // Fits in bytes but not once rounded up to a cluster.
        assert_eq!(
            request_size(None, Some(u64::MAX - 5), c).unwrap_err().code,
            -22
        );
        assert_eq!(
            request_size(None, None, c).unwrap_err().code,
            INTERNAL_ERROR
        );
    }
}
