//! [`LvolStore`]: a blobstore of type `LVOLSTORE` on a bdev, with its super blob naming it and
//! the lvols it holds, looked up by name and blob id in ordered maps.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};

use blobstore::{Blob, BlobId, Blobstore, Parent};
use futures::channel::oneshot;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::bs_dev::BdevBsDev;
use crate::esnap::{EsnapCtx, EsnapHolder};
use crate::lvol::Lvol;

/// The bstype of lvol stores.
pub const LVS_BSTYPE: [u8; 16] = *b"LVOLSTORE\0\0\0\0\0\0\0";
/// Longest lvs or lvol name, in bytes (SPDK `SPDK_LVS_NAME_MAX` / `SPDK_LVOL_NAME_MAX` - 1).
pub const NAME_MAX: usize = 63;
/// Default cluster size of a new store.
pub const DEFAULT_CLUSTER_SIZE: u32 = 4 << 20;
/// Default md pages per cluster ratio (percent).
pub const DEFAULT_MD_PAGES_RATIO: u32 = 100;

#[derive(Default)]
pub(crate) struct LvolMaps {
    pub(crate) by_name: BTreeMap<String, Arc<Lvol>>,
    pub(crate) by_blob: BTreeMap<BlobId, Arc<Lvol>>,
    /// Names reserved by creates in flight.
    pub(crate) pending: BTreeSet<String>,
    /// Open blobs of failed creates or deletes that could not be closed (their metadata
    /// write failed); they carry the pending-delete mark in memory and on disk, are closed
    /// when the store closes, and the next load deletes them.
    pub(crate) orphans: Vec<Blob>,
}

/// A loaded lvol store.
pub struct LvolStore {
    pub(crate) uuid: Uuid,
    pub(crate) name: Mutex<String>,
    pub(crate) base_name: String,
    pub(crate) base: Arc<BdevBsDev>,
    pub(crate) bs: Blobstore,
    pub(crate) super_blob: BlobId,
    pub(crate) lvols: Mutex<LvolMaps>,
    pub(crate) esnap: Arc<EsnapCtx>,
    pub(crate) stop_listener: Mutex<Option<oneshot::Sender<()>>>,
    pub(crate) seq: u64,
}

impl std::fmt::Debug for LvolStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LvolStore")
            .field("name", &self.name())
            .field("uuid", &self.uuid)
            .field("base", &self.base_name)
            .finish()
    }
}

impl LvolStore {
    pub(crate) fn maps(&self) -> std::sync::MutexGuard<'_, LvolMaps> {
        self.lvols.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Store UUID.
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }
    /// Store name.
    pub fn name(&self) -> String {
        self.name.lock().map(|n| n.clone()).unwrap_or_default()
    }
    /// Name of the base bdev.
    pub fn base_bdev_name(&self) -> String {
        self.base_name.clone()
    }
    /// The blobstore.
    pub fn blobstore(&self) -> &Blobstore {
        &self.bs
    }
    /// The super blob id.
    pub fn super_blob_id(&self) -> BlobId {
        self.super_blob
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u32 {
        self.bs.cluster_size()
    }
    /// Block size of the lvol bdevs (the blobstore io unit).
    pub fn block_size(&self) -> u32 {
        self.bs.io_unit_size()
    }
    pub(crate) fn base_buf_align(&self) -> usize {
        self.base.bdev().buf_align()
    }
    /// Clusters for data.
    pub fn total_data_clusters(&self) -> u64 {
        self.bs.total_data_clusters()
    }
    /// Free clusters.
    pub fn free_clusters(&self) -> u64 {
        self.bs.free_clusters()
    }
    /// Every lvol, in name order.
    pub fn lvols(&self) -> Vec<Arc<Lvol>> {
        self.maps().by_name.values().cloned().collect()
    }
    /// Every lvol, in creation (or load) order, as SPDK lists them.
    pub fn lvols_in_order(&self) -> Vec<Arc<Lvol>> {
        let mut v: Vec<_> = self.maps().by_blob.values().cloned().collect();
        v.sort_by_key(|l| l.seq);
        v
    }
    /// Every lvol, in blob id order.
    pub fn lvols_by_blob_id(&self) -> Vec<Arc<Lvol>> {
        self.maps().by_blob.values().cloned().collect()
    }
    /// An lvol by its name (exact match).
    pub fn lvol_by_name(&self, name: &str) -> Option<Arc<Lvol>> {
        self.maps().by_name.get(name).cloned()
    }
    /// An lvol by blob id.
    pub fn lvol_by_blob(&self, id: BlobId) -> Option<Arc<Lvol>> {
        self.maps().by_blob.get(&id).cloned()
    }
    /// Esnap ids whose base bdev is missing.
    pub fn missing_esnaps(&self) -> Vec<Vec<u8>> {
        self.esnap.missing_ids()
    }

    /// The `bdev_lvol_get_lvstores` entry.
    pub fn info_json(&self) -> Value {
        json!({
            "uuid": self.uuid.hyphenated().to_string(),
            "name": self.name(),
            "base_bdev": self.base_name,
            "total_data_clusters": self.total_data_clusters(),
            "free_clusters": self.free_clusters(),
            "block_size": self.block_size(),
            "cluster_size": self.cluster_size(),
            "max_growable_size": self.bs.max_growable_size(),
        })
    }

    /// Stops following the base bdev's events (an unload or destroy the store asked for;
    /// after a hot-remove the listener has ended by itself).
    pub(crate) fn stop_listening(&self) {
        let tx = self
            .stop_listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
    }

    /// Closes every blob (lvols first, newest blob id first, then the blobs of failed
    /// creates and deletes), the external snapshot bases, then unloads the blobstore cleanly
    /// or, with `destroy`, erases its super block; the base is released either way. The lvol
    /// bdevs must be unregistered before.
    pub(crate) async fn close(&self, destroy: bool) -> crate::Result<()> {
        for l in self.lvols_by_blob_id().iter().rev() {
            if let Err(e) = l.blob.clone().close().await {
                tracing::warn!(target: "lvol", "closing lvol {}: {e}", l.name());
            }
        }
        let orphans = {
            let mut maps = self.maps();
            maps.by_name.clear();
            maps.by_blob.clear();
            std::mem::take(&mut maps.orphans)
        };
        for b in orphans {
            if let Err(e) = b.close().await {
                tracing::warn!(target: "lvol", "closing an uncommitted blob: {e}");
            }
        }
        self.esnap.close_all();
        let res = if destroy {
            self.bs.destroy().await
        } else {
            self.bs.unload().await
        };
        self.base.close();
        res.map_err(Into::into)
    }

    /// Writes a new name (`name_xattr`, the super blob's `name` xattr as SPDK stores it) and
    /// takes it in memory once durable.
    pub(crate) async fn rename(&self, new_name: &str, name_xattr: &[u8]) -> crate::Result<()> {
        let sb = self.bs.open_blob(self.super_blob).await?;
        let res = async {
            sb.set_xattr("name", name_xattr)?;
            sb.sync_md().await
        }
        .await;
        let _ = sb.close().await;
        res?;
        if let Ok(mut n) = self.name.lock() {
            *n = new_name.to_string();
        }
        Ok(())
    }

    /// Grows the store onto its base's current size.
    pub(crate) async fn grow(&self) -> crate::Result<()> {
        self.bs.grow().await.map_err(Into::into)
    }

    /// Re-computes which blobs hold which external snapshot (after any relation change).
    pub(crate) fn refresh_esnap_holders(&self) {
        let mut holders: BTreeMap<Vec<u8>, BTreeMap<BlobId, Weak<dyn EsnapHolder>>> =
            BTreeMap::new();
        for l in self.lvols_by_blob_id() {
            if let Parent::External(id) = l.blob().parent() {
                let weak: Weak<dyn EsnapHolder> = Arc::downgrade(&l) as Weak<dyn EsnapHolder>;
                holders.entry(id).or_default().insert(l.blob_id(), weak);
            }
        }
        self.esnap.refresh_holders(holders);
    }
}

/// An lvol holds its external snapshot through its blob.
impl EsnapHolder for Lvol {
    fn holder_blob(&self) -> &Blob {
        self.blob()
    }
    fn holder_name(&self) -> String {
        self.name()
    }
}
