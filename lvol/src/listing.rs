//! Listings written as JSON text straight into an RPC response: the `driver_specific` of an
//! lvol bdev (`bdev_get_bdevs`) and `bdev_lvol_get_lvols`, byte for byte what
//! [`Lvol::driver_specific`] and [`Lvol::info_json`] serialize to, without building a
//! `Value` per entry or copying names.

use std::io::Write;
use std::sync::Arc;

use blobstore::Parent;

use crate::esnap::esnap_id_name;
use crate::lvol::Lvol;
use crate::store::LvolStore;

fn write_str(out: &mut Vec<u8>, s: &str) {
    if serde_json::to_writer(&mut *out, s).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

fn write_bool(out: &mut Vec<u8>, key: &[u8], v: bool) {
    out.extend_from_slice(key);
    out.extend_from_slice(if v { b"true" } else { b"false" });
}

fn write_uuid(out: &mut Vec<u8>, u: &uuid::Uuid) {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    write_str(out, u.hyphenated().encode_lower(&mut buf));
}

fn locked_name(m: &std::sync::Mutex<String>, out: &mut Vec<u8>) {
    match m.lock() {
        Ok(n) => write_str(out, &n),
        Err(_) => write_str(out, ""),
    }
}

/// `{"lvol": {...}}` of `bdev_get_bdevs` for `lvol`.
pub(crate) fn write_driver_specific(lvol: &Lvol, out: &mut Vec<u8>) {
    let store = lvol.store();
    out.extend_from_slice(b"{\"lvol\":{\"lvol_store_uuid\":");
    match &store {
        Some(s) => write_uuid(out, &s.uuid),
        None => write_str(out, ""),
    }
    out.extend_from_slice(b",\"base_bdev\":");
    write_str(out, store.as_ref().map_or("", |s| s.base_name.as_str()));
    write_bool(out, b",\"thin_provision\":", lvol.is_thin());
    out.extend_from_slice(b",\"num_allocated_clusters\":");
    let _ = write!(out, "{}", lvol.num_allocated_clusters());
    let snapshot = lvol.is_snapshot();
    write_bool(out, b",\"snapshot\":", snapshot);
    let clone = lvol.is_clone();
    write_bool(out, b",\"clone\":", clone);
    if clone {
        if let Some(p) = lvol.parent_lvol() {
            out.extend_from_slice(b",\"base_snapshot\":");
            locked_name(&p.name, out);
        }
    }
    // Only a snapshot has clones (as SPDK asks only snapshots): no lookup for the others.
    if let Some(s) = store.as_ref().filter(|_| snapshot) {
        let ids = s.bs.clones_of(lvol.blob_id);
        let mut first = true;
        for id in ids {
            if let Some(c) = s.lvol_by_blob(id) {
                out.extend_from_slice(if first { b",\"clones\":[" } else { b"," });
                first = false;
                locked_name(&c.name, out);
            }
        }
        if !first {
            out.push(b']');
        }
    }
    write_bool(out, b",\"esnap_clone\":", lvol.is_esnap_clone());
    if let Parent::External(id) = lvol.blob.parent() {
        if let Some(n) = esnap_id_name(&id) {
            out.extend_from_slice(b",\"external_snapshot_name\":");
            write_str(out, &n);
        }
    }
    if lvol.is_degraded() {
        out.extend_from_slice(b",\"degraded\":true");
    }
    out.extend_from_slice(b"}}");
}

/// The `bdev_lvol_get_lvols` array over `stores`, each store's lvols in creation order.
pub fn write_lvols(stores: &[Arc<LvolStore>], out: &mut Vec<u8>) {
    out.push(b'[');
    let mut first = true;
    for s in stores {
        // The store's name and UUID once per store.
        let mut lvs_name = Vec::new();
        locked_name(&s.name, &mut lvs_name);
        let mut lvs = Vec::with_capacity(96);
        lvs.extend_from_slice(b",\"lvs\":{\"name\":");
        lvs.extend_from_slice(&lvs_name);
        lvs.extend_from_slice(b",\"uuid\":");
        write_uuid(&mut lvs, &s.uuid);
        lvs.extend_from_slice(b"}}");
        // The alias is "lvs/lvol": the store name's JSON text without its closing quote.
        let alias_head = &lvs_name[..lvs_name.len() - 1];
        let mut name = Vec::with_capacity(64);
        for l in s.lvols_in_order() {
            if !first {
                out.push(b',');
            }
            first = false;
            name.clear();
            locked_name(&l.name, &mut name);
            out.extend_from_slice(b"{\"alias\":");
            out.extend_from_slice(alias_head);
            out.push(b'/');
            // The lvol name's JSON text without its opening quote.
            out.extend_from_slice(&name[1..]);
            out.extend_from_slice(b",\"uuid\":");
            write_uuid(out, &l.uuid);
            out.extend_from_slice(b",\"name\":");
            out.extend_from_slice(&name);
            write_bool(out, b",\"is_thin_provisioned\":", l.is_thin());
            write_bool(out, b",\"is_snapshot\":", l.is_snapshot());
            write_bool(out, b",\"is_clone\":", l.is_clone());
            write_bool(out, b",\"is_esnap_clone\":", l.is_esnap_clone());
            write_bool(out, b",\"is_degraded\":", l.is_degraded());
            out.extend_from_slice(b",\"num_allocated_clusters\":");
            let _ = write!(out, "{}", l.num_allocated_clusters());
            out.extend_from_slice(&lvs);
        }
    }
    out.push(b']');
}
