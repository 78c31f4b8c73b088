//! The lvol view of a blobstore: the store's name and UUID (super blob xattrs `name` and
//! `uuid`), and per blob the lvol name, UUID, size, provisioning, allocated clusters, parent
//! snapshot and external snapshot (with whether that base is among the configured bdevs).

use bdev_core::Registry;
use blobstore::{Blob, BlobId, Blobstore, Parent};
use serde_json::{json, Value};

use crate::bsdev::esnap_id_text;

/// One lvol (any blob other than the super blob).
#[derive(Clone, Debug)]
pub struct LvolInfo {
    /// `name` xattr (NUL padding removed).
    pub name: Option<String>,
    /// `uuid` xattr.
    pub uuid: Option<String>,
    /// Blob id.
    pub blob_id: BlobId,
    /// Size in clusters.
    pub num_clusters: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Thin provisioned.
    pub thin: bool,
    /// Read-only (snapshots).
    pub read_only: bool,
    /// Has clones.
    pub is_snapshot: bool,
    /// Clone of a snapshot blob.
    pub is_clone: bool,
    /// Esnap clone.
    pub is_esnap_clone: bool,
    /// Clusters owned.
    pub allocated_clusters: u64,
    /// Parent snapshot blob.
    pub parent: Option<BlobId>,
    /// Parent snapshot name, filled in after all blobs were seen.
    pub parent_name: Option<String>,
    /// External snapshot id text.
    pub esnap_id: Option<String>,
    /// Whether the external snapshot is among the bdevs.
    pub esnap_present: Option<bool>,
    /// Degraded (missing base somewhere in the chain).
    pub degraded: bool,
}

/// The store and its lvols.
#[derive(Clone, Debug)]
pub struct LvsInfo {
    /// Store name (`None`: not an lvol store).
    pub name: Option<String>,
    /// Store UUID.
    pub uuid: Option<String>,
    /// Super blob.
    pub super_blob: Option<BlobId>,
    /// Cluster size.
    pub cluster_size: u64,
    /// Free clusters.
    pub free_clusters: u64,
    /// Data clusters.
    pub total_data_clusters: u64,
    /// The lvols, by blob id.
    pub lvols: Vec<LvolInfo>,
    /// Blobs that could not be opened, with the negative errno.
    pub errors: Vec<(BlobId, i32)>,
}

/// An xattr value as text, cut at the first NUL.
pub fn xattr_string(v: &[u8]) -> String {
    esnap_id_text(v)
}

fn get_text(b: &Blob, name: &str) -> Option<String> {
    b.get_xattr(name).ok().map(|v| xattr_string(&v))
}

/// Whether the store is an lvol store (bstype `LVOLSTORE`, as SPDK's lvol layer requires).
pub fn is_lvstore(bs: &Blobstore) -> bool {
    let t = bs.bstype();
    let end = t.iter().position(|&c| c == 0).unwrap_or(16);
    &t[..end] == b"LVOLSTORE"
}

/// Reads the lvol view of `bs`. Blobs are opened and closed again.
pub async fn gather(bs: &Blobstore, registry: &Registry) -> LvsInfo {
    let super_blob = bs.super_blob();
    let cluster_size = bs.cluster_size() as u64;
    let mut info = LvsInfo {
        name: None,
        uuid: None,
        super_blob,
        cluster_size,
        free_clusters: bs.free_clusters(),
        total_data_clusters: bs.total_data_clusters(),
        lvols: Vec::new(),
        errors: Vec::new(),
    };
    if let Some(sid) = super_blob {
        match bs.open_blob(sid).await {
            Ok(b) => {
                info.name = get_text(&b, "name");
                info.uuid = get_text(&b, "uuid");
                let _ = b.close().await;
            }
            Err(e) => info.errors.push((sid, -e.errno())),
        }
    }
    for id in bs.blob_ids() {
        if Some(id) == super_blob {
            continue;
        }
        let b = match bs.open_blob(id).await {
            Ok(b) => b,
            Err(e) => {
                info.errors.push((id, -e.errno()));
                continue;
            }
        };
        let (parent, esnap_id) = match b.parent() {
            Parent::Snapshot(p) => (Some(p), None),
            Parent::External(v) => (None, Some(esnap_id_text(&v))),
            Parent::None | Parent::Zeroes => (None, None),
        };
        let esnap_present = esnap_id.as_ref().map(|e| registry.get(e).is_some());
        let n = b.num_clusters();
        info.lvols.push(LvolInfo {
            name: get_text(&b, "name"),
            uuid: get_text(&b, "uuid"),
            blob_id: id,
            num_clusters: n,
            size_bytes: n * cluster_size,
            thin: b.is_thin(),
            read_only: b.is_read_only(),
            is_snapshot: b.is_snapshot() || !bs.clones_of(id).is_empty(),
            is_clone: b.is_clone(),
            is_esnap_clone: b.is_esnap_clone(),
            allocated_clusters: b.num_allocated_clusters(),
            parent,
            parent_name: None,
            esnap_id,
            esnap_present,
            degraded: b.is_degraded(),
        });
        let _ = b.close().await;
    }
    let names: Vec<(BlobId, Option<String>)> = info
        .lvols
        .iter()
        .map(|l| (l.blob_id, l.name.clone()))
        .collect();
    for l in &mut info.lvols {
        if let Some(p) = l.parent {
            l.parent_name = names
                .iter()
                .find(|(id, _)| *id == p)
                .and_then(|(_, n)| n.clone());
        }
    }
    info
}

/// Finds the blob of an alias `lvs/lvol`.
pub fn resolve_alias(info: &LvsInfo, alias: &str) -> Option<BlobId> {
    let (lvs, lvol) = alias.split_once('/')?;
    if info.name.as_deref() != Some(lvs) {
        return None;
    }
    info.lvols
        .iter()
        .find(|l| l.name.as_deref() == Some(lvol))
        .map(|l| l.blob_id)
}

fn dash(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("-")
}

/// Text listing: a store line, then one line per lvol.
pub fn format_text(info: &LvsInfo) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Lvol store: {} uuid {} cluster_size {} free_clusters {} total_data_clusters {}\n",
        dash(&info.name),
        dash(&info.uuid),
        info.cluster_size,
        info.free_clusters,
        info.total_data_clusters
    ));
    let lvs = info.name.clone().unwrap_or_else(|| "-".into());
    for l in &info.lvols {
        let parent = match (&l.parent_name, l.parent) {
            (Some(n), _) => n.clone(),
            (None, Some(p)) => format!("0x{p:x}"),
            (None, None) => "-".into(),
        };
        let esnap = match (&l.esnap_id, l.esnap_present) {
            (Some(e), Some(true)) => format!("{e} (present)"),
            (Some(e), _) => format!("{e} (missing)"),
            (None, _) => "-".into(),
        };
        s.push_str(&format!(
            "{}/{} uuid {} blob_id 0x{:x} size {} {} allocated_clusters {} snapshot {} parent {} esnap {}{}\n",
            lvs,
            dash(&l.name),
            dash(&l.uuid),
            l.blob_id,
            l.size_bytes,
            if l.thin { "thin" } else { "thick" },
            l.allocated_clusters,
            if l.is_snapshot || l.read_only { "yes" } else { "no" },
            parent,
            esnap,
            if l.degraded { " degraded" } else { "" },
        ));
    }
    for (id, rc) in &info.errors {
        s.push_str(&format!("blob 0x{id:x}: cannot open (err {rc})\n"));
    }
    s
}

/// JSON listing, with the field names of `bdev_lvol_get_lvols` where they exist.
pub fn format_json(info: &LvsInfo) -> Value {
    let lvs = info.name.clone().unwrap_or_default();
    json!({
        "lvstore": {
            "name": info.name,
            "uuid": info.uuid,
            "super_blob_id": info.super_blob.map(|b| format!("0x{b:x}")),
            "cluster_size": info.cluster_size,
            "free_clusters": info.free_clusters,
            "total_data_clusters": info.total_data_clusters,
        },
        "lvols": info.lvols.iter().map(|l| json!({
            "name": l.name,
            "alias": l.name.as_ref().map(|n| format!("{lvs}/{n}")),
            "uuid": l.uuid,
            "blob_id": format!("0x{:x}", l.blob_id),
            "size_bytes": l.size_bytes,
            "num_clusters": l.num_clusters,
            "thin": l.thin,
            "read_only": l.read_only,
            "is_snapshot": l.is_snapshot,
            "is_clone": l.is_clone,
            "is_esnap_clone": l.is_esnap_clone,
            "is_degraded": l.degraded,
            "num_allocated_clusters": l.allocated_clusters,
            "base_snapshot": l.parent_name,
            "base_snapshot_blob_id": l.parent.map(|p| format!("0x{p:x}")),
            "external_snapshot_name": l.esnap_id,
            "external_snapshot_present": l.esnap_present,
        })).collect::<Vec<_>>(),
        "unreadable_blobs": info.errors.iter().map(|(id, rc)| json!({
            "blob_id": format!("0x{id:x}"), "errno": rc
        })).collect::<Vec<_>>(),
    })
}
