//! [`LvolModule`]: the lvol bdev module of one [`Registry`]. It owns every loaded store, finds
//! stores on new bdevs (tasting), registers one bdev per lvol, follows hot-removal of store
//! bases and of external snapshots, and runs every store and lvol operation.
//!
//! This file is the wiring (the module's state, lookups, name rules); the work lives in its
//! children: `examine` (tasting, loading a store, healing degraded esnap clones), `lvstore`
//! (store lifecycle and bdev registration), `ops` (every lvol operation and the create
//! commit protocol), `shallow_copy`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bdev_core::{BdevEvent, BlockDevice, ClaimType, ExamineHook, Registry};
use blobstore::{Blob, BlobId, BlobOpts, Blobstore, BsOpts, ClearMethod, Parent};
use futures::channel::{mpsc::UnboundedReceiver, oneshot};
use uuid::Uuid;

use crate::bs_dev::BdevBsDev;
use crate::esnap::{esnap_id_for, EsnapCtx, Factory};
use crate::lvol::{Lvol, LvolBdev};
use crate::retry::EsnapRetry;
use crate::store::{
    LvolMaps, LvolStore, DEFAULT_CLUSTER_SIZE, DEFAULT_MD_PAGES_RATIO, LVS_BSTYPE, NAME_MAX,
};
use crate::{LvolError, Result};

mod examine;
mod lvstore;
mod ops;
mod shallow_copy;

pub use shallow_copy::{ShallowCopyState, ShallowCopyStatus};

/// User xattr marking a blob that is not (or no longer) a committed lvol. A create writes
/// it with the new blob and removes it once the lvol is open and its bdev registered (the
/// commit point); a delete writes it before the blob is deleted. A load deletes every blob
/// carrying it, so an interrupted or failed create never turns into an lvol after a reload,
/// and a delete that failed half-way (the device went bad between the mark and the delete)
/// is finished. SPDK ignores unknown user xattrs, so stores stay readable by SPDK.
pub(crate) const PENDING_DELETE_XATTR: &str = "pending_delete";

/// How a new store clears its data region (`clear_method` of `bdev_lvol_create_lvstore`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LvsClearMethod {
    /// Unmap (default).
    #[default]
    Unmap,
    /// Write zeroes.
    WriteZeroes,
    /// Leave data in place.
    None,
}

/// Options of a new lvol store.
#[derive(Clone, Debug)]
pub struct LvsOpts {
    /// Store name, 1..63 bytes, unique in the process.
    pub name: String,
    /// Cluster size in bytes (default 4 MiB); a multiple of the bdev block size.
    pub cluster_size: u32,
    /// How the data region is cleared.
    pub clear_method: LvsClearMethod,
    /// md pages per cluster, in percent (default 100).
    pub md_pages_ratio: u32,
    /// md page size: 0 (automatic) or 4096; other powers of two are refused.
    pub md_page_size: u32,
}

impl LvsOpts {
    /// Default options with a name.
    pub fn new(name: &str) -> Self {
        LvsOpts {
            name: name.to_string(),
            cluster_size: DEFAULT_CLUSTER_SIZE,
            clear_method: LvsClearMethod::Unmap,
            md_pages_ratio: DEFAULT_MD_PAGES_RATIO,
            md_page_size: 0,
        }
    }
}

#[derive(Default)]
struct StoreMaps {
    by_name: BTreeMap<String, Arc<LvolStore>>,
    by_uuid: BTreeMap<Uuid, Arc<LvolStore>>,
    pending: BTreeSet<String>,
}

struct Inner {
    registry: Registry,
    stores: Mutex<StoreMaps>,
    /// Every lvol of every store, by bdev name (unique id).
    lvols: Mutex<BTreeMap<String, Arc<Lvol>>>,
    retry: Arc<EsnapRetry>,
    next_op: AtomicU32,
    shallow: Mutex<BTreeMap<u32, ShallowCopyStatus>>,
}

/// The lvol module of one registry. Cheap to clone.
#[derive(Clone)]
pub struct LvolModule(Arc<Inner>);

/// Creation order of stores and lvols (SPDK lists them in that order).
fn next_seq() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// An lvol on an open blob of `store`, with its size read from the blob.
fn new_lvol(
    store: &Arc<LvolStore>,
    blob: Blob,
    blob_id: BlobId,
    uuid: Uuid,
    unique_id: String,
    name: String,
) -> Arc<Lvol> {
    let lvol = Arc::new(Lvol {
        store: Arc::downgrade(store),
        blob,
        blob_id,
        uuid,
        unique_id,
        name: Mutex::new(name),
        registered: Default::default(),
        seq: next_seq(),
        io_units: Default::default(),
    });
    lvol.refresh_size();
    lvol
}

/// The blobstore a store opened (init or load) on `base`, its io unit told to the esnap
/// context; on failure `base` is closed (nothing else holds it yet) and the error returned.
fn opened_on(
    base: &BdevBsDev,
    esnap: &EsnapCtx,
    res: std::result::Result<Blobstore, blobstore::BsError>,
) -> Result<Blobstore> {
    match res {
        Ok(bs) => {
            esnap.io_unit.store(bs.io_unit_size(), Ordering::Relaxed);
            Ok(bs)
        }
        Err(e) => {
            base.close();
            Err(e.into())
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(LvolError::InvalidArgument(format!(
            "name must be 1..{NAME_MAX} bytes"
        )));
    }
    if name.contains('\0') {
        return Err(LvolError::InvalidArgument("name contains NUL".into()));
    }
    Ok(())
}

/// The `name` xattr value written at create: the name in a 64-byte NUL-padded buffer.
fn name_xattr_padded(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.resize(NAME_MAX + 1, 0);
    v
}

/// The `name` xattr after a rename: strlen + 1.
fn name_xattr(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

fn uuid_xattr(u: &Uuid) -> Vec<u8> {
    esnap_id_for(u)
}

fn name_from_xattr(v: &[u8]) -> Option<String> {
    if v.len() > NAME_MAX + 1 {
        return None;
    }
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8(v[..end].to_vec()).ok()
}

/// An external snapshot's block size must divide the store's io unit.
fn check_base_block(store: &LvolStore, dev: &dyn BlockDevice) -> Result<()> {
    if store.block_size().checked_rem(dev.block_len()) != Some(0) {
        return Err(LvolError::InvalidArgument(format!(
            "base block size {} does not divide the store's io unit {}",
            dev.block_len(),
            store.block_size()
        )));
    }
    Ok(())
}

fn div_ceil(a: u64, b: u64) -> u64 {
    if b == 0 {
        0
    } else {
        a.div_ceil(b)
    }
}

/// Releases a reserved store name on drop.
struct StoreNameGuard<'a> {
    m: &'a Inner,
    name: String,
}

impl Drop for StoreNameGuard<'_> {
    fn drop(&mut self) {
        lock(&self.m.stores).pending.remove(&self.name);
    }
}

/// Releases a reserved lvol name on drop.
struct LvolNameGuard {
    store: Arc<LvolStore>,
    name: String,
}

impl Drop for LvolNameGuard {
    fn drop(&mut self) {
        self.store.maps().pending.remove(&self.name);
    }
}

/// What a new child blob of `parent` (its snapshot, or a clone of it) named `name` needs
/// first: the store, the name reserved, and `parent` read-only exactly when `read_only`
/// (else `InvalidArgument(why)`).
fn child_of(
    parent: &Lvol,
    name: &str,
    read_only: bool,
    why: &str,
) -> Result<(Arc<LvolStore>, LvolNameGuard)> {
    let store = parent.require_store()?;
    let guard = reserve_lvol_name(&store, name)?;
    if parent.is_read_only() != read_only {
        return Err(LvolError::InvalidArgument(why.into()));
    }
    Ok((store, guard))
}

fn reserve_lvol_name(store: &Arc<LvolStore>, name: &str) -> Result<LvolNameGuard> {
    check_name(name)?;
    let mut maps = store.maps();
    if maps.by_name.contains_key(name) || maps.pending.contains(name) {
        return Err(LvolError::AlreadyExists(format!("lvol {name}")));
    }
    maps.pending.insert(name.to_string());
    Ok(LvolNameGuard {
        store: store.clone(),
        name: name.to_string(),
    })
}

impl LvolModule {
    /// Creates the module on a registry and installs its examine hook (tasting and healing).
    pub fn new(registry: Registry) -> Self {
        let inner = Arc::new(Inner {
            registry: registry.clone(),
            stores: Mutex::new(StoreMaps::default()),
            lvols: Mutex::new(BTreeMap::new()),
            retry: Arc::new(EsnapRetry::default()),
            next_op: AtomicU32::new(1),
            shallow: Mutex::new(BTreeMap::new()),
        });
        registry.add_examine_hook(Arc::new(examine::Hook(Arc::downgrade(&inner))));
        LvolModule(inner)
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.0.registry
    }

    /// The retry policy for I/O needing a missing external snapshot.
    pub fn esnap_retry(&self) -> (u32, Duration) {
        (self.0.retry.retries(), self.0.retry.delay())
    }

    /// (retries done, requests failed with EIO) of I/O needing a missing external snapshot.
    pub fn esnap_counts(&self) -> (u64, u64) {
        self.0.retry.counts()
    }

    /// Sets the retry policy (`bdev_lvol_set_esnap_retry`).
    pub fn set_esnap_retry(&self, retries: u32, delay: Duration) {
        self.0.retry.set(retries, delay);
    }

    // ----- lookups ---------------------------------------------------------------------

    /// Every loaded store, in creation (or load) order.
    pub fn lvstores(&self) -> Vec<Arc<LvolStore>> {
        let mut v: Vec<_> = lock(&self.0.stores).by_name.values().cloned().collect();
        v.sort_by_key(|s| s.seq);
        v
    }
    /// A store by name.
    pub fn lvstore_by_name(&self, name: &str) -> Option<Arc<LvolStore>> {
        lock(&self.0.stores).by_name.get(name).cloned()
    }
    /// A store by UUID.
    pub fn lvstore_by_uuid(&self, uuid: &Uuid) -> Option<Arc<LvolStore>> {
        lock(&self.0.stores).by_uuid.get(uuid).cloned()
    }
    /// Every lvol of every store, by bdev name.
    pub fn lvols(&self) -> Vec<Arc<Lvol>> {
        lock(&self.0.lvols).values().cloned().collect()
    }
    /// Finds an lvol by bdev name (its UUID), by `lvs/lvol` alias, or by any other name or
    /// alias of its bdev. Exact matches only.
    pub fn find_lvol(&self, name: &str) -> Option<Arc<Lvol>> {
        if let Some(l) = lock(&self.0.lvols).get(name).cloned() {
            return Some(l);
        }
        if let Ok(u) = Uuid::parse_str(name) {
            if let Some(l) = lock(&self.0.lvols)
                .get(&u.hyphenated().to_string())
                .cloned()
            {
                return Some(l);
            }
        }
        if let Some((lvs, lvol)) = name.split_once('/') {
            if let Some(l) = self.lvstore_by_name(lvs).and_then(|s| s.lvol_by_name(lvol)) {
                return Some(l);
            }
        }
        let dev = self.0.registry.get(name)?;
        if dev.module_name() != "lvol" {
            return None;
        }
        lock(&self.0.lvols).get(dev.name()).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_xattrs_are_spdk_shaped() {
        let padded = name_xattr_padded("lvol");
        assert_eq!(padded.len(), 64);
        assert_eq!(&padded[..5], b"lvol\0");
        assert!(padded[5..].iter().all(|&b| b == 0));
        assert_eq!(name_xattr("lvs"), b"lvs\0".to_vec());
        assert_eq!(name_from_xattr(&padded).as_deref(), Some("lvol"));
        assert_eq!(name_from_xattr(b"abc").as_deref(), Some("abc"));
        assert_eq!(name_from_xattr(&[b'a'; 65]), None);
    }

    #[test]
    fn name_rules() {
        assert!(check_name("").is_err());
        assert!(check_name(&"a".repeat(63)).is_ok());
        assert_eq!(
            check_name(&"a".repeat(64)).unwrap_err().errno(),
            libc::EINVAL
        );
        assert!(check_name("a\0b").is_err());
        assert_eq!(div_ceil(5, 4), 2);
        assert_eq!(div_ceil(8, 4), 2);
        assert_eq!(div_ceil(0, 4), 0);
    }
}
