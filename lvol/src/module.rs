//! [`LvolModule`]: the lvol bdev module of one [`Registry`]. It owns every loaded store, finds
//! stores on new bdevs (tasting), registers one bdev per lvol, follows hot-removal of store
//! bases and of external snapshots, and runs every store and lvol operation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bdev_core::{BdevEvent, BlockDevice, ClaimType, ExamineHook, Registry};
use blobstore::{Blob, BlobId, BlobOpts, Blobstore, BsOpts, ClearMethod, Parent};
use futures::channel::{mpsc::UnboundedReceiver, oneshot};
use futures::StreamExt;
use uuid::Uuid;

use crate::bs_dev::BdevBsDev;
use crate::esnap::{esnap_id_for, EsnapCtx, EsnapRetry, Factory};
use crate::lvol::{Lvol, LvolBdev};
use crate::store::{
    LvolMaps, LvolStore, DEFAULT_CLUSTER_SIZE, DEFAULT_MD_PAGES_RATIO, LVS_BSTYPE, NAME_MAX,
};
use crate::{LvolError, Result};

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

/// State of a shallow copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShallowCopyState {
    /// Running.
    InProgress,
    /// Done.
    Complete,
    /// Failed; the errno is in [`ShallowCopyStatus::error`].
    Error,
}

impl ShallowCopyState {
    /// SPDK's text.
    pub fn as_str(self) -> &'static str {
        match self {
            ShallowCopyState::InProgress => "in progress",
            ShallowCopyState::Complete => "complete",
            ShallowCopyState::Error => "error",
        }
    }
}

/// Progress of a shallow copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShallowCopyStatus {
    /// Clusters copied so far.
    pub copied_clusters: u64,
    /// Clusters to copy (the source's allocated clusters).
    pub total_clusters: u64,
    /// State.
    pub state: ShallowCopyState,
    /// errno of a failed copy.
    pub error: Option<i32>,
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

struct Hook(Weak<Inner>);

#[async_trait]
impl ExamineHook for Hook {
    async fn examine(&self, registry: &Registry, name: &str) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        let Some(dev) = registry.get(name) else {
            return;
        };
        let m = LvolModule(inner);
        m.heal_all().await;
        // lvol bdevs may be external snapshots of other stores (healed above), but stores
        // nested on lvols are not looked for.
        if dev.module_name() == "lvol" {
            return;
        }
        match m.load_lvstore(name).await {
            Ok(s) => tracing::info!(target: "lvol", "lvol store {} found on {name}", s.name()),
            Err(e) => tracing::debug!(target: "lvol", "no lvol store on {name}: {e}"),
        }
    }
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
        registry.add_examine_hook(Arc::new(Hook(Arc::downgrade(&inner))));
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

    // ----- stores ----------------------------------------------------------------------

    fn reserve_store_name(&self, name: &str) -> Result<StoreNameGuard<'_>> {
        check_name(name)?;
        let mut maps = lock(&self.0.stores);
        if maps.by_name.contains_key(name) || maps.pending.contains(name) {
            return Err(LvolError::AlreadyExists(format!("lvol store {name}")));
        }
        maps.pending.insert(name.to_string());
        Ok(StoreNameGuard {
            m: &self.0,
            name: name.to_string(),
        })
    }

    /// Creates a store on a bdev (SPDK `bdev_lvol_create_lvstore`).
    pub async fn create_lvstore(&self, bdev_name: &str, opts: LvsOpts) -> Result<Arc<LvolStore>> {
        let guard = self.reserve_store_name(&opts.name)?;
        let mut desc = self.0.registry.open(bdev_name, true)?;
        let dev = desc.device().clone();
        let bl = dev.block_len();
        if opts.cluster_size < bl || opts.cluster_size.checked_rem(bl) != Some(0) {
            return Err(LvolError::InvalidArgument(format!(
                "cluster size {} is not a multiple of the block size {bl}",
                opts.cluster_size
            )));
        }
        if opts.md_page_size != 0 && opts.md_page_size != 4096 {
            return Err(LvolError::InvalidArgument(format!(
                "md page size {} is not supported",
                opts.md_page_size
            )));
        }
        desc.claim(ClaimType::ReadManyWriteOne)?;
        let events = desc.take_events();
        let base = Arc::new(BdevBsDev::new(desc));
        let esnap = EsnapCtx::new(self.0.registry.clone());
        let total_clusters = dev.num_blocks() * u64::from(bl) / u64::from(opts.cluster_size);
        let md_pages = u64::from(opts.md_pages_ratio) * total_clusters / 100;
        let bs_opts = BsOpts {
            cluster_size: opts.cluster_size,
            num_md_pages: Some(md_pages.min(u64::from(u32::MAX)) as u32),
            bstype: LVS_BSTYPE,
            clear_method: match opts.clear_method {
                LvsClearMethod::Unmap => ClearMethod::Unmap,
                LvsClearMethod::WriteZeroes => ClearMethod::WriteZeroes,
                LvsClearMethod::None => ClearMethod::None,
            },
            force_recover: false,
            esnap_factory: Some(Arc::new(Factory(esnap.clone()))),
        };
        let bs = match Blobstore::init(base.clone(), bs_opts).await {
            Ok(bs) => bs,
            Err(e) => {
                base.close();
                return Err(e.into());
            }
        };
        esnap.io_unit.store(bs.io_unit_size(), Ordering::Relaxed);
        let uuid = Uuid::new_v4();
        let super_opts = BlobOpts {
            // SPDK's order on the super blob: uuid, then name.
            xattrs: vec![
                ("uuid".to_string(), uuid_xattr(&uuid)),
                ("name".to_string(), name_xattr(&opts.name)),
            ],
            ..BlobOpts::default()
        };
        let super_id = match async {
            let id = bs.create_blob(super_opts).await?;
            bs.set_super_blob(id).await?;
            Ok::<_, blobstore::BsError>(id)
        }
        .await
        {
            Ok(id) => id,
            Err(e) => {
                let _ = bs.unload().await;
                base.close();
                return Err(e.into());
            }
        };
        let store = Arc::new(LvolStore {
            uuid,
            name: Mutex::new(opts.name.clone()),
            base_name: dev.name().to_string(),
            base,
            bs,
            super_blob: super_id,
            lvols: Mutex::new(LvolMaps::default()),
            esnap,
            stop_listener: Mutex::new(None),
            seq: next_seq(),
        });
        self.finish_store(&store, events);
        drop(guard);
        tracing::info!(target: "lvol", "lvol store {} created on {bdev_name}", opts.name);
        Ok(store)
    }

    /// Publishes a store and starts following its base's events.
    fn finish_store(&self, store: &Arc<LvolStore>, events: Option<UnboundedReceiver<BdevEvent>>) {
        if let Ok(mut w) = store.esnap.store.lock() {
            *w = Arc::downgrade(store);
        }
        {
            let mut maps = lock(&self.0.stores);
            maps.by_name.insert(store.name(), store.clone());
            maps.by_uuid.insert(store.uuid, store.clone());
        }
        if let Some(events) = events {
            let (tx, rx) = oneshot::channel::<()>();
            *lock(&store.stop_listener) = Some(tx);
            let weak_m = Arc::downgrade(&self.0);
            let weak_s = Arc::downgrade(store);
            self.0.registry.spawn(Box::pin(async move {
                let mut events = events;
                let mut rx = rx;
                loop {
                    let ev = futures::select! {
                        ev = events.next() => ev,
                        _ = &mut rx => None,
                    };
                    match ev {
                        Some(BdevEvent::Remove) => {
                            if let (Some(m), Some(s)) = (weak_m.upgrade(), weak_s.upgrade()) {
                                tracing::info!(target: "lvol", "base of lvol store {} removed", s.name());
                                if let Err(e) = LvolModule(m).close_store(&s, false, true).await {
                                    tracing::warn!(target: "lvol", "unloading {}: {e}", s.name());
                                }
                            }
                            break;
                        }
                        Some(BdevEvent::Resize { .. }) => continue,
                        None => break,
                    }
                }
            }));
        }
    }

    /// Loads the store on a bdev, registers its lvol bdevs (what tasting does).
    pub async fn load_lvstore(&self, bdev_name: &str) -> Result<Arc<LvolStore>> {
        let mut desc = self.0.registry.open(bdev_name, true)?;
        // Claim before reading anything: if someone else writes the bdev, leave it alone (a
        // failed load after a successful blobstore load unloads, which writes).
        desc.claim(ClaimType::ReadManyWriteOne)?;
        let dev = desc.device().clone();
        let events = desc.take_events();
        let base = Arc::new(BdevBsDev::new(desc));
        let esnap = EsnapCtx::new(self.0.registry.clone());
        let bs_opts = BsOpts {
            bstype: LVS_BSTYPE,
            esnap_factory: Some(Arc::new(Factory(esnap.clone()))),
            ..BsOpts::default()
        };
        let bs = match Blobstore::load(base.clone(), bs_opts).await {
            Ok(bs) => bs,
            Err(e) => {
                base.close();
                return Err(e.into());
            }
        };
        esnap.io_unit.store(bs.io_unit_size(), Ordering::Relaxed);
        let mut opened: Vec<Blob> = Vec::new();
        let res = self
            .load_inner(&bs, &base, dev.as_ref(), &esnap, &mut opened)
            .await;
        match res {
            Ok((store, guard)) => {
                // The store's name is published by finish_store before the guard goes.
                self.finish_store(&store, events);
                drop(guard);
                store.refresh_esnap_holders();
                for l in store.lvols_by_blob_id() {
                    if let Err(e) = self.register_bdev(&store, &l).await {
                        tracing::warn!(target: "lvol", "registering lvol {}: {e}", l.name());
                    }
                }
                Ok(store)
            }
            Err(e) => {
                for b in opened.into_iter().rev() {
                    let _ = b.close().await;
                }
                esnap.close_all();
                let _ = bs.unload().await;
                base.close();
                Err(e)
            }
        }
    }

    async fn load_inner(
        &self,
        bs: &Blobstore,
        base: &Arc<BdevBsDev>,
        dev: &dyn BlockDevice,
        esnap: &Arc<EsnapCtx>,
        opened: &mut Vec<Blob>,
    ) -> Result<(Arc<LvolStore>, StoreNameGuard<'_>)> {
        let super_id = bs
            .super_blob()
            .ok_or_else(|| LvolError::NoDevice("lvol store has no super blob".into()))?;
        // An I/O error reading the super blob is reported as such (EIO); only a super blob
        // that is not there (or not readable as a blob) means "no lvol store here".
        let sb = bs.open_blob(super_id).await.map_err(|e| match e.errno() {
            libc::EIO => LvolError::from(e),
            _ => LvolError::NoDevice(format!("super blob: {e}")),
        })?;
        let uuid_v = sb.get_xattr("uuid");
        let name_v = sb.get_xattr("name");
        let _ = sb.close().await;
        let uuid = uuid_v
            .ok()
            .and_then(|v| crate::esnap::parse_esnap_id(&v))
            .ok_or_else(|| LvolError::InvalidArgument("bad lvol store uuid".into()))?;
        let name = name_v
            .ok()
            .and_then(|v| name_from_xattr(&v))
            .ok_or_else(|| LvolError::InvalidArgument("bad lvol store name".into()))?;
        let guard = self.reserve_store_name(&name)?;
        if self.lvstore_by_uuid(&uuid).is_some() {
            return Err(LvolError::AlreadyExists(format!("lvol store {uuid}")));
        }
        let store = Arc::new(LvolStore {
            uuid,
            name: Mutex::new(name),
            base_name: dev.name().to_string(),
            base: base.clone(),
            bs: bs.clone(),
            super_blob: super_id,
            lvols: Mutex::new(LvolMaps::default()),
            esnap: esnap.clone(),
            stop_listener: Mutex::new(None),
            seq: next_seq(),
        });
        if let Ok(mut w) = esnap.store.lock() {
            *w = Arc::downgrade(&store);
        }
        let mut pending = Vec::new();
        for id in bs.blob_ids() {
            if id == super_id {
                continue;
            }
            let blob = bs.open_blob(id).await?;
            if blob.get_xattr(PENDING_DELETE_XATTR).is_ok() {
                blob.close().await?;
                pending.push(id);
                continue;
            }
            opened.push(blob.clone());
            let lname = blob
                .get_xattr("name")
                .ok()
                .and_then(|v| name_from_xattr(&v))
                .ok_or_else(|| LvolError::InvalidArgument(format!("blob {id:#x} has no name")))?;
            let luuid = blob
                .get_xattr("uuid")
                .ok()
                .and_then(|v| crate::esnap::parse_esnap_id(&v));
            let (luuid, unique_id) = match luuid {
                Some(u) => (u, u.hyphenated().to_string()),
                None => (Uuid::nil(), format!("{}_{}", uuid.hyphenated(), id)),
            };
            let lvol = Arc::new(Lvol {
                store: Arc::downgrade(&store),
                blob,
                blob_id: id,
                uuid: luuid,
                unique_id,
                name: Mutex::new(lname.clone()),
                registered: Default::default(),
                seq: next_seq(),
                io_units: Default::default(),
            });
            lvol.refresh_size();
            let mut maps = store.maps();
            if maps.by_name.contains_key(&lname) {
                return Err(LvolError::AlreadyExists(format!("lvol {lname}")));
            }
            maps.by_name.insert(lname, lvol.clone());
            maps.by_blob.insert(id, lvol);
        }
        // Finish the creates and deletes that did not complete. A failure leaves the blob
        // marked (and unlisted) for the next load.
        for id in pending {
            match bs.delete_blob(id).await {
                Ok(()) => tracing::info!(target: "lvol", "deleted uncommitted blob {id:#x}"),
                Err(e) => {
                    tracing::warn!(target: "lvol", "deleting uncommitted blob {id:#x}: {e}")
                }
            }
        }
        Ok((store, guard))
    }

    /// Registers the bdev of an lvol (name = unique id, alias `lvs/lvol`).
    async fn register_bdev(&self, store: &Arc<LvolStore>, lvol: &Arc<Lvol>) -> Result<()> {
        {
            let mut lvols = lock(&self.0.lvols);
            if lvols.contains_key(&lvol.unique_id) {
                return Err(LvolError::AlreadyExists(format!("lvol {}", lvol.unique_id)));
            }
            lvols.insert(lvol.unique_id.clone(), lvol.clone());
        }
        let bdev = Arc::new(LvolBdev::new(lvol.clone(), store, self.0.retry.clone()));
        if let Err(e) = self.0.registry.register(bdev).await {
            lock(&self.0.lvols).remove(&lvol.unique_id);
            return Err(e.into());
        }
        if let Err(e) = self.0.registry.add_alias(&lvol.unique_id, &lvol.alias()) {
            let _ = self.0.registry.unregister(&lvol.unique_id).await;
            lock(&self.0.lvols).remove(&lvol.unique_id);
            return Err(e.into());
        }
        lvol.registered.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn unregister_bdev(&self, lvol: &Arc<Lvol>) {
        if lvol.registered.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.0.registry.unregister(&lvol.unique_id).await {
                tracing::warn!(target: "lvol", "unregistering {}: {e}", lvol.unique_id);
            }
        }
        let mut lvols = lock(&self.0.lvols);
        if lvols
            .get(&lvol.unique_id)
            .is_some_and(|l| Arc::ptr_eq(l, lvol))
        {
            lvols.remove(&lvol.unique_id);
        }
    }

    /// Unregisters the lvol bdevs, closes the blobs and unloads (or destroys) the store.
    async fn close_store(
        &self,
        store: &Arc<LvolStore>,
        destroy: bool,
        removed: bool,
    ) -> Result<()> {
        {
            let mut maps = lock(&self.0.stores);
            let name = store.name();
            if maps
                .by_name
                .get(&name)
                .is_some_and(|s| Arc::ptr_eq(s, store))
            {
                maps.by_name.remove(&name);
            }
            maps.by_uuid.remove(&store.uuid);
        }
        if !removed {
            if let Some(tx) = lock(&store.stop_listener).take() {
                let _ = tx.send(());
            }
        }
        let lvols = store.lvols_by_blob_id();
        for l in lvols.iter().rev() {
            self.unregister_bdev(l).await;
        }
        for l in lvols.iter().rev() {
            if let Err(e) = l.blob.clone().close().await {
                tracing::warn!(target: "lvol", "closing lvol {}: {e}", l.name());
            }
        }
        let orphans = {
            let mut maps = store.maps();
            maps.by_name.clear();
            maps.by_blob.clear();
            std::mem::take(&mut maps.orphans)
        };
        for b in orphans {
            if let Err(e) = b.close().await {
                tracing::warn!(target: "lvol", "closing an uncommitted blob: {e}");
            }
        }
        store.esnap.close_all();
        let res = if destroy {
            store.bs.destroy().await
        } else {
            store.bs.unload().await
        };
        store.base.close();
        res.map_err(Into::into)
    }

    /// Unregisters the store's lvol bdevs and unloads it cleanly; the base bdev is released.
    /// Re-adding (or re-examining) the base brings it back.
    pub async fn unload_lvstore(&self, store: &Arc<LvolStore>) -> Result<()> {
        self.close_store(store, false, false).await
    }

    /// Destroys a store: its lvol bdevs go away and the super block is erased.
    pub async fn destroy_lvstore(&self, store: &Arc<LvolStore>) -> Result<()> {
        self.close_store(store, true, false).await
    }

    /// Renames a store; the aliases of its lvol bdevs follow.
    pub async fn rename_lvstore(&self, store: &Arc<LvolStore>, new_name: &str) -> Result<()> {
        let old = store.name();
        if old == new_name {
            return Ok(());
        }
        let guard = self.reserve_store_name(new_name)?;
        let sb = store.bs.open_blob(store.super_blob).await?;
        let res = async {
            sb.set_xattr("name", &name_xattr(new_name))?;
            sb.sync_md().await
        }
        .await;
        let _ = sb.close().await;
        res?;
        let lvols = store.lvols();
        let old_aliases: Vec<String> = lvols.iter().map(|l| l.alias()).collect();
        if let Ok(mut n) = store.name.lock() {
            *n = new_name.to_string();
        }
        {
            let mut maps = lock(&self.0.stores);
            maps.by_name.remove(&old);
            maps.by_name.insert(new_name.to_string(), store.clone());
        }
        drop(guard);
        for (l, old_alias) in lvols.iter().zip(old_aliases) {
            if l.is_registered() {
                let _ = self.0.registry.remove_alias(&l.unique_id, &old_alias);
                if let Err(e) = self.0.registry.add_alias(&l.unique_id, &l.alias()) {
                    tracing::warn!(target: "lvol", "alias {}: {e}", l.alias());
                }
            }
        }
        Ok(())
    }

    /// Grows the store onto its base's current size.
    pub async fn grow_lvstore(&self, store: &Arc<LvolStore>) -> Result<()> {
        store.bs.grow().await.map_err(Into::into)
    }

    // ----- lvols -----------------------------------------------------------------------

    async fn attach(
        &self,
        store: &Arc<LvolStore>,
        id: BlobId,
        uuid: Uuid,
        name: &str,
    ) -> Result<Arc<Lvol>> {
        let blob = store.bs.open_blob(id).await?;
        self.publish(store, blob, id, uuid, name).await
    }

    /// Lists an lvol on an open blob and registers its bdev; on failure the blob is closed.
    async fn publish(
        &self,
        store: &Arc<LvolStore>,
        blob: Blob,
        id: BlobId,
        uuid: Uuid,
        name: &str,
    ) -> Result<Arc<Lvol>> {
        let lvol = Arc::new(Lvol {
            store: Arc::downgrade(store),
            blob,
            blob_id: id,
            uuid,
            unique_id: uuid.hyphenated().to_string(),
            name: Mutex::new(name.to_string()),
            registered: Default::default(),
            seq: next_seq(),
            io_units: Default::default(),
        });
        lvol.refresh_size();
        {
            let mut maps = store.maps();
            maps.by_name.insert(name.to_string(), lvol.clone());
            maps.by_blob.insert(id, lvol.clone());
        }
        store.refresh_esnap_holders();
        if let Err(e) = self.register_bdev(store, &lvol).await {
            {
                let mut maps = store.maps();
                maps.by_name.remove(name);
                maps.by_blob.remove(&id);
            }
            let _ = lvol.blob.clone().close().await;
            return Err(e);
        }
        Ok(lvol)
    }

    fn new_lvol_xattrs(name: &str, uuid: &Uuid) -> Vec<(String, Vec<u8>)> {
        vec![
            ("name".to_string(), name_xattr_padded(name)),
            ("uuid".to_string(), uuid_xattr(uuid)),
        ]
    }

    /// The xattrs of a blob made by a create: those of an lvol plus the pending-delete mark
    /// that [`commit_new`](Self::commit_new) removes.
    fn uncommitted_lvol_xattrs(name: &str, uuid: &Uuid) -> Vec<(String, Vec<u8>)> {
        let mut v = Self::new_lvol_xattrs(name, uuid);
        v.push((PENDING_DELETE_XATTR.to_string(), vec![1]));
        v
    }

    /// Turns a blob just created with [`uncommitted_lvol_xattrs`](Self::uncommitted_lvol_xattrs)
    /// into a listed lvol with a registered bdev, then commits it by removing the mark.
    ///
    /// On any failure the create is rolled back: the lvol is unlisted, its bdev unregistered
    /// and the blob deleted. If the device fails the rollback too (a read error at the open
    /// fails the delete as well), the blob stays on disk with its mark and is not listed: the
    /// create is reported failed, and the next load deletes the blob, so what the process
    /// shows and what a reload finds agree.
    async fn commit_new(
        &self,
        store: &Arc<LvolStore>,
        id: BlobId,
        uuid: Uuid,
        name: &str,
    ) -> Result<Arc<Lvol>> {
        let blob = match store.bs.open_blob(id).await {
            Ok(b) => b,
            Err(e) => {
                self.discard_uncommitted(store, None, id).await;
                return Err(e.into());
            }
        };
        let lvol = match self.publish(store, blob.clone(), id, uuid, name).await {
            Ok(l) => l,
            Err(e) => {
                // publish closed the blob.
                self.discard_uncommitted(store, None, id).await;
                return Err(e);
            }
        };
        let res = async {
            lvol.blob.remove_xattr(PENDING_DELETE_XATTR)?;
            lvol.blob.sync_md().await
        }
        .await;
        if let Err(e) = res {
            let _ = lvol.blob.set_xattr(PENDING_DELETE_XATTR, &[1]);
            self.unregister_bdev(&lvol).await;
            {
                let mut maps = store.maps();
                maps.by_name.remove(name);
                maps.by_blob.remove(&id);
            }
            self.discard_uncommitted(store, Some(lvol.blob.clone()), id)
                .await;
            store.refresh_esnap_holders();
            return Err(e.into());
        }
        Ok(lvol)
    }

    /// Closes (if `blob` is given) and deletes a marked blob that is not listed. A blob that
    /// cannot be closed is kept as an orphan until the store closes; one that cannot be
    /// deleted stays marked on disk for the next load.
    async fn discard_uncommitted(&self, store: &Arc<LvolStore>, blob: Option<Blob>, id: BlobId) {
        if let Some(b) = blob {
            if let Err(e) = b.clone().close().await {
                tracing::warn!(target: "lvol", "closing uncommitted blob {id:#x}: {e}");
                store.maps().orphans.push(b);
                return;
            }
        }
        if let Err(e) = store.bs.delete_blob(id).await {
            tracing::warn!(
                target: "lvol",
                "deleting uncommitted blob {id:#x}: {e}; the next load deletes it"
            );
        }
    }

    /// Creates an lvol of `size_bytes` (rounded up to whole clusters), thick or thin.
    pub async fn create_lvol(
        &self,
        store: &Arc<LvolStore>,
        name: &str,
        size_bytes: u64,
        thin: bool,
        clear_method: ClearMethod,
    ) -> Result<Arc<Lvol>> {
        let _guard = reserve_lvol_name(store, name)?;
        let uuid = Uuid::new_v4();
        let opts = BlobOpts {
            num_clusters: div_ceil(size_bytes, u64::from(store.cluster_size())),
            thin,
            clear_method,
            xattrs: Self::uncommitted_lvol_xattrs(name, &uuid),
            ..BlobOpts::default()
        };
        let id = store.bs.create_blob(opts).await?;
        self.commit_new(store, id, uuid, name).await
    }

    /// Snapshots an lvol; the lvol becomes a clone of the new snapshot.
    pub async fn create_snapshot(&self, lvol: &Arc<Lvol>, name: &str) -> Result<Arc<Lvol>> {
        let store = lvol
            .store()
            .ok_or_else(|| LvolError::NoDevice("lvol store".into()))?;
        let _guard = reserve_lvol_name(&store, name)?;
        if lvol.is_read_only() {
            return Err(LvolError::InvalidArgument(
                "cannot snapshot a read-only lvol".into(),
            ));
        }
        let uuid = Uuid::new_v4();
        let id = store
            .bs
            .create_snapshot(lvol.blob_id, Self::new_lvol_xattrs(name, &uuid))
            .await?;
        let snap = self.attach(&store, id, uuid, name).await?;
        store.refresh_esnap_holders();
        Ok(snap)
    }

    /// Clones a read-only lvol (a snapshot).
    pub async fn create_clone(&self, snap: &Arc<Lvol>, name: &str) -> Result<Arc<Lvol>> {
        let store = snap
            .store()
            .ok_or_else(|| LvolError::NoDevice("lvol store".into()))?;
        let _guard = reserve_lvol_name(&store, name)?;
        if !snap.is_read_only() {
            return Err(LvolError::InvalidArgument(
                "clone source is not read-only".into(),
            ));
        }
        let uuid = Uuid::new_v4();
        let id = store
            .bs
            .create_clone(snap.blob_id, Self::uncommitted_lvol_xattrs(name, &uuid))
            .await?;
        self.commit_new(&store, id, uuid, name).await
    }

    /// Creates an esnap clone of any bdev (by name, alias or UUID): a thin lvol of the bdev's
    /// size whose unallocated clusters read from it.
    pub async fn create_esnap_clone(
        &self,
        bdev: &str,
        store: &Arc<LvolStore>,
        name: &str,
    ) -> Result<Arc<Lvol>> {
        let desc = self.0.registry.open(bdev, false)?;
        let dev = desc.device().clone();
        drop(desc);
        let _guard = reserve_lvol_name(store, name)?;
        check_base_block(store, dev.as_ref())?;
        let size = dev.num_blocks() * u64::from(dev.block_len());
        let cs = u64::from(store.cluster_size());
        if size.checked_rem(cs) != Some(0) {
            return Err(LvolError::InvalidArgument(format!(
                "bdev size {size} is not a multiple of the cluster size {cs}"
            )));
        }
        let uuid = Uuid::new_v4();
        let opts = BlobOpts {
            num_clusters: size / cs,
            thin: true,
            xattrs: Self::uncommitted_lvol_xattrs(name, &uuid),
            esnap_id: Some(esnap_id_for(&dev.uuid())),
            ..BlobOpts::default()
        };
        let id = store.bs.create_blob(opts).await?;
        let res = self.commit_new(store, id, uuid, name).await;
        store.refresh_esnap_holders();
        res
    }

    /// Renames an lvol; its bdev alias follows. Renaming to the same name succeeds.
    pub async fn rename_lvol(&self, lvol: &Arc<Lvol>, new_name: &str) -> Result<()> {
        let old = lvol.name();
        if old == new_name {
            return Ok(());
        }
        let store = lvol
            .store()
            .ok_or_else(|| LvolError::NoDevice("lvol store".into()))?;
        let _guard = reserve_lvol_name(&store, new_name)?;
        let old_alias = lvol.alias();
        let new_alias = format!("{}/{}", store.name(), new_name);
        if lvol.is_registered() {
            self.0.registry.add_alias(&lvol.unique_id, &new_alias)?;
        }
        let res = async {
            lvol.blob.set_xattr("name", &name_xattr(new_name))?;
            lvol.blob.sync_md().await
        }
        .await;
        if let Err(e) = res {
            if lvol.is_registered() {
                let _ = self.0.registry.remove_alias(&lvol.unique_id, &new_alias);
            }
            let _ = lvol.blob.set_xattr("name", &name_xattr(&old));
            return Err(e.into());
        }
        if lvol.is_registered() {
            let _ = self.0.registry.remove_alias(&lvol.unique_id, &old_alias);
        }
        if let Ok(mut n) = lvol.name.lock() {
            *n = new_name.to_string();
        }
        let mut maps = store.maps();
        maps.by_name.remove(&old);
        maps.by_name.insert(new_name.to_string(), lvol.clone());
        Ok(())
    }

    /// Resizes an lvol to `size_bytes` rounded up to whole clusters.
    pub async fn resize_lvol(&self, lvol: &Arc<Lvol>, size_bytes: u64) -> Result<()> {
        let store = lvol
            .store()
            .ok_or_else(|| LvolError::NoDevice("lvol store".into()))?;
        if lvol.is_read_only() {
            return Err(LvolError::NotPermitted("lvol is read-only".into()));
        }
        let n = div_ceil(size_bytes, u64::from(store.cluster_size()));
        let res = async {
            lvol.blob.resize(n).await?;
            lvol.blob.sync_md().await
        }
        .await;
        lvol.refresh_size();
        res?;
        if lvol.is_registered() {
            self.0.registry.notify_resize(&lvol.unique_id);
        }
        Ok(())
    }

    /// Makes an lvol read-only.
    pub async fn set_read_only(&self, lvol: &Arc<Lvol>) -> Result<()> {
        lvol.blob.set_read_only()?;
        lvol.blob.sync_md().await?;
        Ok(())
    }

    /// Allocates every cluster of an lvol and cuts it from its parent.
    pub async fn inflate_lvol(&self, lvol: &Arc<Lvol>) -> Result<()> {
        let store = lvol
            .store()
            .ok_or_else(|| LvolError::NoDevice("lvol store".into()))?;
        let res = store.bs.inflate_blob(lvol.blob_id).await;
        store.refresh_esnap_holders();
        res.map_err(Into::into)
    }

    /// Copies the parent's clusters into an lvol and re-points it to the grandparent.
    pub async fn decouple_parent(&self, lvol: &Arc<Lvol>) -> Result<()> {
        let store = lvol
            .store()
            .ok_or_else(|| LvolError::NoDevice("lvol store".into()))?;
        if matches!(lvol.blob.parent(), Parent::None | Parent::Zeroes) {
            return Err(LvolError::InvalidArgument("lvol has no parent".into()));
        }
        let res = store.bs.decouple_parent(lvol.blob_id).await;
        store.refresh_esnap_holders();
        res.map_err(Into::into)
    }

    /// Re-parents a thin lvol onto a snapshot of the same store.
    pub async fn set_parent(&self, lvol: &Arc<Lvol>, snap: &Arc<Lvol>) -> Result<()> {
        let store = lvol
            .store()
            .ok_or_else(|| LvolError::NoDevice("lvol store".into()))?;
        let same = snap.store().is_some_and(|s| Arc::ptr_eq(&s, &store));
        if !same {
            return Err(LvolError::InvalidArgument(
                "parent is in another lvol store".into(),
            ));
        }
        let res = store.bs.set_parent(lvol.blob_id, snap.blob_id).await;
        store.refresh_esnap_holders();
        res.map_err(Into::into)
    }

    /// Makes a thin lvol an esnap clone of a bdev (by name or UUID).
    pub async fn set_parent_bdev(&self, lvol: &Arc<Lvol>, bdev: &str) -> Result<()> {
        let store = lvol
            .store()
            .ok_or_else(|| LvolError::NoDevice("lvol store".into()))?;
        let dev = self
            .0
            .registry
            .get(bdev)
            .ok_or_else(|| LvolError::NoDevice(bdev.to_string()))?;
        if dev.uuid() == lvol.uuid {
            return Err(LvolError::InvalidArgument("bdev is the lvol itself".into()));
        }
        check_base_block(&store, dev.as_ref())?;
        let size = dev.num_blocks() * u64::from(dev.block_len());
        if size.checked_rem(u64::from(store.cluster_size())) != Some(0) {
            return Err(LvolError::InvalidArgument(
                "bdev size is not a multiple of the cluster size".into(),
            ));
        }
        if !lvol.is_thin() {
            return Err(LvolError::InvalidArgument("lvol is not thin".into()));
        }
        let id = esnap_id_for(&dev.uuid());
        if lvol.blob.parent() == Parent::External(id.clone()) {
            return Err(LvolError::AlreadyExists("external parent".into()));
        }
        let esdev = store
            .esnap
            .get_or_open(&id)
            .map_err(|e| LvolError::NoDevice(format!("{bdev}: {e}")))?;
        let res = store.bs.set_external_parent(lvol.blob_id, esdev, &id).await;
        store.refresh_esnap_holders();
        res.map_err(Into::into)
    }

    /// Deletes an lvol. A snapshot with two or more clones is refused with EPERM.
    pub async fn delete_lvol(&self, lvol: &Arc<Lvol>) -> Result<()> {
        let store = lvol
            .store()
            .ok_or_else(|| LvolError::NoDevice("lvol store".into()))?;
        if store.bs.clones_of(lvol.blob_id).len() > 1 {
            return Err(LvolError::NotPermitted(
                "snapshot has more than one clone".into(),
            ));
        }
        let name = lvol.name();
        // Write the pending-delete mark first (snapshots have read-only metadata and go
        // without): once it is on disk, a delete that fails below after the blob was closed
        // and could not be re-opened is finished by the next load instead of leaving an lvol
        // that the process no longer lists.
        let marked = lvol.blob.set_xattr(PENDING_DELETE_XATTR, &[1]).is_ok();
        if marked {
            if let Err(e) = lvol.blob.sync_md().await {
                // Nothing changed on disk: the lvol stays as it was.
                let _ = lvol.blob.remove_xattr(PENDING_DELETE_XATTR);
                return Err(e.into());
            }
        }
        self.unregister_bdev(lvol).await;
        {
            let mut maps = store.maps();
            maps.by_name.remove(&name);
            maps.by_blob.remove(&lvol.blob_id);
        }
        if let Err(e) = lvol.blob.clone().close().await {
            tracing::warn!(target: "lvol", "closing {name}: {e}");
        }
        match store.bs.delete_blob(lvol.blob_id).await {
            Ok(()) => {
                store.refresh_esnap_holders();
                Ok(())
            }
            Err(e) => {
                self.restore_after_failed_delete(&store, lvol, &name, marked)
                    .await;
                store.refresh_esnap_holders();
                Err(e.into())
            }
        }
    }

    /// Brings an lvol whose delete failed back as it was (listed, bdev registered, mark
    /// removed). When the device does not allow that, the lvol stays unlisted and marked on
    /// disk, and the next load finishes the delete.
    async fn restore_after_failed_delete(
        &self,
        store: &Arc<LvolStore>,
        lvol: &Arc<Lvol>,
        name: &str,
        marked: bool,
    ) {
        let id = lvol.blob_id;
        let blob = match store.bs.open_blob(id).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(
                    target: "lvol",
                    "re-opening {name} after a failed delete: {e}; the next load deletes it"
                );
                return;
            }
        };
        if marked {
            let res = async {
                blob.remove_xattr(PENDING_DELETE_XATTR)?;
                blob.sync_md().await
            }
            .await;
            if let Err(e) = res {
                tracing::warn!(
                    target: "lvol",
                    "unmarking {name} after a failed delete: {e}; the next load deletes it"
                );
                let _ = blob.set_xattr(PENDING_DELETE_XATTR, &[1]);
                self.discard_uncommitted(store, Some(blob), id).await;
                return;
            }
        }
        if let Err(e) = self.publish(store, blob, id, lvol.uuid, name).await {
            tracing::warn!(target: "lvol", "re-listing {name} after a failed delete: {e}");
        }
    }

    // ----- esnap healing ---------------------------------------------------------------

    /// Heals every degraded esnap holder whose base bdev is registered now. Called by the
    /// examine hook on every new bdev; returns the number of lvols healed.
    pub async fn heal_all(&self) -> usize {
        let mut healed = 0;
        for store in self.lvstores() {
            let ids: Vec<Vec<u8>> = store
                .esnap
                .map
                .lock()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            for id in ids {
                let Some(u) = crate::esnap::parse_esnap_id(&id) else {
                    continue;
                };
                if self.0.registry.get_by_uuid(&u).is_none() && store.esnap.is_missing(&id) {
                    continue;
                }
                healed += store.esnap.heal(&id).await;
            }
        }
        healed
    }

    // ----- shallow copy ----------------------------------------------------------------

    /// Starts copying the allocated clusters of a read-only lvol onto a bdev; returns the
    /// operation id (from 1).
    pub fn start_shallow_copy(&self, lvol: &Arc<Lvol>, dst_bdev: &str) -> Result<u32> {
        let store = lvol
            .store()
            .ok_or_else(|| LvolError::NoDevice("lvol store".into()))?;
        let desc = self.0.registry.open(dst_bdev, true)?;
        desc.claim(ClaimType::ReadManyWriteOne)?;
        let dst = Arc::new(BdevBsDev::new(desc));
        let op = self.0.next_op.fetch_add(1, Ordering::SeqCst);
        let total = lvol.num_allocated_clusters();
        lock(&self.0.shallow).insert(
            op,
            ShallowCopyStatus {
                copied_clusters: 0,
                total_clusters: total,
                state: ShallowCopyState::InProgress,
                error: None,
            },
        );
        let inner = Arc::downgrade(&self.0);
        let lvol = lvol.clone();
        self.0.registry.spawn(Box::pin(async move {
            let progress_inner = inner.clone();
            let progress = move |n: u64| {
                if let Some(m) = progress_inner.upgrade() {
                    if let Some(s) = lock(&m.shallow).get_mut(&op) {
                        s.copied_clusters = n;
                    }
                }
            };
            let res = if !lvol.is_read_only() {
                Err(libc::EPERM)
            } else {
                store
                    .bs
                    .shallow_copy(lvol.blob_id, dst.clone(), &progress)
                    .await
                    .map_err(|e| e.errno())
            };
            dst.close();
            if let Some(m) = inner.upgrade() {
                if let Some(s) = lock(&m.shallow).get_mut(&op) {
                    match res {
                        Ok(n) => {
                            s.copied_clusters = n;
                            s.state = ShallowCopyState::Complete;
                        }
                        Err(errno) => {
                            s.state = ShallowCopyState::Error;
                            s.error = Some(errno);
                        }
                    }
                }
            }
        }));
        Ok(op)
    }

    /// Status of a shallow copy; a finished (complete or failed) entry is forgotten once
    /// reported. `None` for an unknown id.
    pub fn check_shallow_copy(&self, op: u32) -> Option<ShallowCopyStatus> {
        let mut map = lock(&self.0.shallow);
        let s = map.get(&op)?.clone();
        if s.state != ShallowCopyState::InProgress {
            map.remove(&op);
        }
        Some(s)
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
