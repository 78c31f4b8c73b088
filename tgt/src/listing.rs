//! Listings at scale: `bdev_get_bdevs` (and, through the lvol module, `bdev_lvol_get_lvols`)
//! written as JSON text straight into the response, with no `Value` tree, no per-entry
//! registry lookup and no copy of a device's names.
//!
//! The RPC server asks [`raw_response`] first for a single request of one of
//! [`RAW_METHODS`]; a module that does not write the method itself (`None`) leaves it to the
//! ordinary `Value` path. The text is byte for byte what the `Value` path gives (tests).

use std::io::Write;
use std::sync::Arc;

use bdev_core::{BlockDevice, ClaimType, IoType, Registry};
use serde_json::Value;

use crate::bdev_rpc::SPDK_IO_TYPES;
use crate::target::Target;

/// Methods that may be answered as raw JSON text.
pub const RAW_METHODS: [&str; 2] = ["bdev_get_bdevs", "bdev_lvol_get_lvols"];

/// Writes `s` as a JSON string.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    if serde_json::to_writer(&mut *out, s).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

fn write_num(out: &mut Vec<u8>, n: u64) {
    let _ = write!(out, "{n}");
}

/// bdev-core's type for each of [`SPDK_IO_TYPES`] (`None`: no such type here, always
/// false), looked up once instead of by name for every key of every bdev.
fn io_types() -> &'static [Option<IoType>; SPDK_IO_TYPES.len()] {
    static MAP: std::sync::OnceLock<[Option<IoType>; SPDK_IO_TYPES.len()]> =
        std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        SPDK_IO_TYPES.map(|key| IoType::ALL.into_iter().find(|t| t.spdk_name() == key))
    })
}

/// Writes a UUID's text as a JSON string (it needs no escaping).
fn write_uuid_str(out: &mut Vec<u8>, uuid: &str) {
    out.push(b'"');
    out.extend_from_slice(uuid.as_bytes());
    out.push(b'"');
}

/// One `bdev_get_bdevs` element: the same keys, order and values as
/// [`crate::bdev_rpc::bdev_info`].
pub fn write_bdev_info(
    out: &mut Vec<u8>,
    dev: &dyn BlockDevice,
    aliases: &[String],
    claim: Option<ClaimType>,
) {
    write_bdev_head(out, dev, aliases, claim);
    dev.write_driver_specific(out);
    out.push(b'}');
}

/// [`write_bdev_info`] up to and including `"driver_specific":`.
fn write_bdev_head(
    out: &mut Vec<u8>,
    dev: &dyn BlockDevice,
    aliases: &[String],
    claim: Option<ClaimType>,
) {
    let mut ubuf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let uuid = dev.uuid().hyphenated().encode_lower(&mut ubuf);
    out.extend_from_slice(b"{\"name\":");
    write_str(out, dev.name());
    out.extend_from_slice(b",\"aliases\":[");
    let mut first = true;
    if uuid != dev.name() && !aliases.iter().any(|a| a == uuid) {
        write_uuid_str(out, uuid);
        first = false;
    }
    for a in aliases {
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(out, a);
    }
    out.extend_from_slice(b"],\"product_name\":");
    write_str(out, dev.product_name());
    out.extend_from_slice(b",\"block_size\":");
    write_num(out, u64::from(dev.block_len()));
    out.extend_from_slice(b",\"num_blocks\":");
    write_num(out, dev.num_blocks());
    out.extend_from_slice(
        b",\"preferred_write_alignment\":0,\"preferred_write_granularity\":0,\
\"optimal_write_size\":0,\"preferred_unmap_alignment\":0,\"preferred_unmap_granularity\":0,\
\"uuid\":",
    );
    write_uuid_str(out, uuid);
    out.extend_from_slice(
        b",\"assigned_rate_limits\":{\"rw_ios_per_sec\":0,\"rw_mbytes_per_sec\":0,\
\"r_mbytes_per_sec\":0,\"w_mbytes_per_sec\":0},\"claimed\":",
    );
    out.extend_from_slice(if claim.is_some() { b"true" } else { b"false" });
    if let Some(c) = claim {
        out.extend_from_slice(b",\"claim_type\":");
        write_str(out, c.spdk_name());
    }
    out.extend_from_slice(b",\"zoned\":false,\"supported_io_types\":{");
    for (i, (key, ty)) in SPDK_IO_TYPES.iter().zip(io_types()).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        let on = ty.is_some_and(|t| dev.io_type_supported(t));
        out.extend_from_slice(if on { b"true" } else { b"false" });
    }
    out.extend_from_slice(b"},\"driver_specific\":");
}

/// Every registered bdev as the `bdev_get_bdevs` array. The registry's lock is held only
/// while the registry's own facts are copied out (plain bytes and a reference count per
/// device); the devices' `driver_specific` are written after it is released.
pub fn write_bdevs(registry: &Registry, out: &mut Vec<u8>) {
    let mut heads: Vec<u8> = Vec::new();
    let mut ends: Vec<(Arc<dyn BlockDevice>, usize)> = Vec::new();
    registry.for_each_listed(|dev, aliases, claim| {
        write_bdev_head(&mut heads, dev.as_ref(), aliases, claim);
        ends.push((dev.clone(), heads.len()));
    });
    out.reserve(heads.len() + ends.len() * 256);
    out.push(b'[');
    let mut from = 0;
    for (i, (dev, end)) in ends.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&heads[from..*end]);
        dev.write_driver_specific(out);
        out.push(b'}');
        from = *end;
    }
    out.push(b']');
}

/// The response bytes (newline included) of `v` when it is a single request of one of
/// [`RAW_METHODS`] that a module writes as text; `None` sends it the `Value` way.
pub fn raw_response(target: &Arc<Target>, v: &Value) -> Option<Vec<u8>> {
    let method = v.get("method")?.as_str()?;
    if !RAW_METHODS.contains(&method) {
        return None;
    }
    let req = crate::jsonrpc::parse_request(v.clone()).ok()?;
    let id = req.id?;
    // The result is written after the response's head in the same buffer (modules only
    // append), so megabytes of listing are not copied once more.
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    serde_json::to_writer(&mut out, &id).ok()?;
    out.extend_from_slice(b",\"result\":");
    let r = target.call_raw(&req.method, &req.params, &mut out)?;
    Some(match r {
        Ok(()) => {
            out.extend_from_slice(b"}\n");
            out
        }
        Err(e) => crate::jsonrpc::encode(&crate::jsonrpc::response_err(id, &e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdev_core::backend::malloc::MallocBdev;
    use bdev_core::backend::null::NullBdev;

    /// The text is byte for byte what serializing the `Value` path's array gives.
    #[test]
    fn raw_listing_equals_the_value_path() {
        futures::executor::block_on(async {
            let r = Registry::new();
            r.register(MallocBdev::create("M0", 8, 512, None).unwrap())
                .await
                .unwrap();
            r.register(MallocBdev::create("we\"ird\\name", 8, 4096, None).unwrap())
                .await
                .unwrap();
            r.register(NullBdev::create("N0", 16, 512, None).unwrap())
                .await
                .unwrap();
            r.add_alias("M0", "alias/one").unwrap();
            r.add_alias("M0", "two").unwrap();
            let d = r.open("M0", true).unwrap();
            d.claim(ClaimType::ExclusiveWrite).unwrap();
            let mut raw = Vec::new();
            write_bdevs(&r, &mut raw);
            let want: Vec<Value> = r
                .list()
                .iter()
                .map(|dev| {
                    crate::bdev_rpc::bdev_info(
                        dev.as_ref(),
                        &r.aliases(dev.name()),
                        r.claim_of(dev.name()),
                    )
                })
                .collect();
            assert_eq!(want.len(), 3);
            assert_eq!(
                String::from_utf8(raw).unwrap(),
                serde_json::to_string(&Value::Array(want)).unwrap()
            );
            let mut empty = Vec::new();
            write_bdevs(&Registry::new(), &mut empty);
            assert_eq!(empty, b"[]");
        });
    }
}
