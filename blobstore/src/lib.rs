//! blobstore: SPDK's blobstore, on-disk format version 3, read and written byte-compatibly.
//!
//! Owns the on-disk format (super block, masks, metadata pages and descriptors), store
//! operations (init, load with recovery, unload, grow, destroy, super blob), blob operations
//! (create, open, I/O with thin allocation and copy-on-write, resize, xattrs, sync), and the
//! relations between blobs (snapshots, clones, external snapshots, inflate, decouple,
//! set_parent, shallow copy).
//!
//! It depends only on its own narrow device trait, [`BsDev`]; it never sees the bdev
//! registry. External snapshots are opaque ids turned into devices by an
//! [`EsnapDevFactory`] the caller supplies.
//!
//! It does not know about bdevs, lvols, RPC or reactors: it runs on any executor and
//! only needs a [`BsDev`].
//!
//! ```text
//!   Blobstore ──► StoreInner (store.rs): geometry, super block state, md_lock (serialises
//!                 metadata commits), and its parts, each with its own lock and file:
//!                   alloc.rs   Allocator: masks, claims, stale clusters, scrubbing
//!                   graph.rs   Graph: open blobs, snapshot→clones, clone→parent, busy marks
//!                   commit.rs  Committer: deferred commit of allocations; FlushGroup
//!                   load.rs    init, load and recovery, unload (fills the parts above)
//!   Blob ───────► BlobInner (blob.rs): metadata (flags, xattrs, cluster map, extent pages),
//!                 freeze (I/O takes it shared; snapshot/resize/set_parent/merge exclusive),
//!                 per-cluster allocation locks,
//!                 back device: none | zeroes | parent BlobInner | esnap BsDev
//!   on disk ────► layout.rs (the structures as stored, re-exported by `inspect`),
//!                 format.rs (their encoding), md.rs (a blob's md chain)
//! ```
//!
//! Locks are always taken in this order: a blob's freeze, a cluster's allocation lock, the
//! store's md_lock (held by metadata operations and by the commit of deferred allocations,
//! never by the data I/O of an allocation), then short std mutexes (a blob's state, the
//! allocator, the graph) that are never held across an await. A read or write of an
//! allocated cluster takes only the freeze (shared) and one std mutex.
//!
//! Crash safety follows SPDK's write order, with barriers: new extent and continuation pages
//! (and the data of new clusters) are written to fresh places and flushed, then the root page
//! is written (the commit point) and flushed, and only then are old pages zeroed and clusters
//! released; on devices whose io unit is smaller than an md page, pages rewritten in place
//! get a durable shadow copy first ("Metadata ordering" in `docs/architecture.md`). Deleting zeroes the root first. Multi-blob
//! operations leave `SNAPTMP` / `SNAPRM` markers that load turns into the before or after
//! state; unlike SPDK, that fix-up frees only what no surviving blob references. Beyond
//! SPDK: a newly allocated cluster of a thin blob is always written whole (parent data or
//! zeroes), so freed data never shows through; looping or over-deep chains and oversized
//! maps on disk are refused instead of crashing.

mod alloc;
mod barrier;
mod blob;
mod bufpool;
mod check;
mod commit;
mod dev;
mod error;
mod format;
mod freeze;
mod graph;
pub mod inspect;
mod layout;
mod live;
mod load;
mod md;
mod ops;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use blob::{Direct, DirectTarget};
pub use commit::PENDING_LIMIT;
pub use dev::{BsDev, CopySrc, MissingDev, ZeroesDev};
pub use error::{BsError, Result};
pub use iobuf::IoBuf;

use std::sync::Arc;

use async_trait::async_trait;

/// A blob id: `(1 << 32) | md_page_index`.
pub type BlobId = u64;

/// `SPDK_BLOBID_INVALID`.
pub const BLOBID_INVALID: BlobId = u64::MAX;

/// Clear method of a blob (md_ro_flags bits 0-1) or of a store at init.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClearMethod {
    /// 0: default (behaves like unmap).
    #[default]
    Default,
    /// 1: leave data in place.
    None,
    /// 2: unmap.
    Unmap,
    /// 3: write zeroes.
    WriteZeroes,
}

/// Options for [`Blobstore::init`] and [`Blobstore::load`].
#[derive(Clone, Default)]
pub struct BsOpts {
    /// Cluster size in bytes (init only; 0 = SPDK's default 1 MiB).
    pub cluster_size: u32,
    /// Number of md pages (init only; `None` = one per cluster).
    pub num_md_pages: Option<u32>,
    /// Blobstore type (16 bytes, NUL padded). All zero matches any store at load.
    pub bstype: [u8; 16],
    /// How init clears the data region.
    pub clear_method: ClearMethod,
    /// Load: run recovery even if the store is clean (blobcli `-R`).
    pub force_recover: bool,
    /// Turns esnap ids into devices when esnap clones are opened. Without it, opening an
    /// esnap clone fails with ENOTSUP.
    pub esnap_factory: Option<Arc<dyn EsnapDevFactory>>,
}

/// Options for [`Blobstore::create_blob`].
#[derive(Clone, Debug)]
pub struct BlobOpts {
    /// Size in clusters.
    pub num_clusters: u64,
    /// Thin provisioned.
    pub thin: bool,
    /// Clear method stored in md_ro_flags.
    pub clear_method: ClearMethod,
    /// Extent table (default true) or RLE.
    pub use_extent_table: bool,
    /// Public xattrs (name, value), in order.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Internal xattrs (name, value), in order.
    pub internal_xattrs: Vec<(String, Vec<u8>)>,
    /// External snapshot id: makes an esnap clone.
    pub esnap_id: Option<Vec<u8>>,
}

impl Default for BlobOpts {
    fn default() -> Self {
        BlobOpts {
            num_clusters: 0,
            thin: false,
            clear_method: ClearMethod::Default,
            use_extent_table: true,
            xattrs: Vec::new(),
            internal_xattrs: Vec::new(),
            esnap_id: None,
        }
    }
}

/// Where a blob's unallocated clusters read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parent {
    /// Thick blob: nothing.
    None,
    /// Thin blob without parent: zeroes.
    Zeroes,
    /// Clone of a snapshot blob.
    Snapshot(BlobId),
    /// Esnap clone: the `EXTSNAP` id bytes.
    External(Vec<u8>),
}

/// Turns an esnap id into a read-only back device (SPDK `esnap_bs_dev_create`).
#[async_trait]
pub trait EsnapDevFactory: Send + Sync + 'static {
    /// Called on every fresh open of an esnap clone. `Ok(None)` means "no device now" (the blob
    /// opens without a back device and reads of unallocated clusters fail with EIO).
    async fn create(&self, blob_id: BlobId, esnap_id: &[u8]) -> Result<Option<Arc<dyn BsDev>>>;
}

/// A loaded blobstore. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct Blobstore {
    inner: Arc<store::StoreInner>,
}

/// An open blob. Cheap to clone; every clone is the same open (one `open_ref`).
#[derive(Clone)]
pub struct Blob {
    inner: Arc<blob::BlobInner>,
}

impl Blobstore {
    /// Initialises a new store on `dev` (SPDK `spdk_bs_init`).
    pub async fn init(dev: Arc<dyn BsDev>, opts: BsOpts) -> Result<Blobstore> {
        Ok(Blobstore {
            inner: load::init(dev, &opts).await?,
        })
    }
    /// Loads a store; a dirty store (or `force_recover`) is recovered by scanning md pages.
    /// A failed load never writes to the device.
    pub async fn load(dev: Arc<dyn BsDev>, opts: BsOpts) -> Result<Blobstore> {
        Ok(Blobstore {
            inner: load::load(dev, &opts).await?,
        })
    }
    /// Writes the masks and marks the store clean. EBUSY if any blob is open.
    pub async fn unload(&self) -> Result<()> {
        self.inner.unload().await
    }
    /// Zeroes the super block (SPDK `spdk_bs_destroy`). EBUSY if any blob is open.
    pub async fn destroy(&self) -> Result<()> {
        let _g = self.inner.md_lock.lock().await;
        {
            let open = self.inner.graph.lock().open.len();
            if open != 0 {
                return Err(BsError::Busy(format!("{open} blob(s) still open")));
            }
        }
        self.inner
            .dev
            .write_zeroes(0, 4096 / u64::from(self.inner.geo.io_unit))
            .await?;
        self.inner.barrier(barrier::Barrier::Super).await?;
        self.inner.state().unloaded = true;
        Ok(())
    }
    /// Grows the store to the device's current size.
    pub async fn grow(&self) -> Result<()> {
        self.inner.grow().await
    }
    /// The device under the store.
    pub fn device(&self) -> Arc<dyn BsDev> {
        self.inner.dev.clone()
    }
    /// The super blob, if set.
    pub fn super_blob(&self) -> Option<BlobId> {
        let id = self.inner.state().super_blob;
        (id != BLOBID_INVALID).then_some(id)
    }
    /// Sets the super blob.
    pub async fn set_super_blob(&self, id: BlobId) -> Result<()> {
        self.inner.check_live()?;
        let _g = self.inner.md_lock.lock().await;
        self.inner.update_super(|s| s.super_blob = id).await?;
        self.inner.barrier(barrier::Barrier::Super).await?;
        self.inner.state().super_blob = id;
        Ok(())
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u32 {
        self.inner.geo.cluster_size
    }
    /// io_unit size in bytes (the device block size).
    pub fn io_unit_size(&self) -> u32 {
        self.inner.geo.io_unit
    }
    /// md page size in bytes (4096).
    pub fn md_page_size(&self) -> u32 {
        4096
    }
    /// Total clusters (including metadata clusters).
    pub fn total_clusters(&self) -> u64 {
        self.inner.alloc.lock().total_clusters
    }
    /// Clusters available for data (`total_data_clusters` of `bdev_lvol_get_lvstores`).
    pub fn total_data_clusters(&self) -> u64 {
        self.inner.alloc.lock().total_clusters - self.inner.geo.md_clusters
    }
    /// Free clusters.
    pub fn free_clusters(&self) -> u64 {
        self.inner.free_clusters()
    }
    /// `spdk_bs_get_max_growable_size` in bytes.
    pub fn max_growable_size(&self) -> u64 {
        self.inner.max_growable_size()
    }
    /// The store's bstype.
    pub fn bstype(&self) -> [u8; 16] {
        self.inner.state().sbi.bstype
    }
    /// md region start (pages).
    pub fn md_start(&self) -> u32 {
        self.inner.geo.md_start
    }
    /// md region length (pages).
    pub fn md_len(&self) -> u32 {
        self.inner.geo.md_len
    }
    /// Ids of every blob, in increasing order (iteration).
    pub fn blob_ids(&self) -> Vec<BlobId> {
        self.inner
            .alloc
            .lock()
            .used_blobids
            .iter_ones()
            .map(|p| (1u64 << 32) | p)
            .collect()
    }
    /// Creates a blob and returns its id (the blob is not left open).
    pub async fn create_blob(&self, opts: BlobOpts) -> Result<BlobId> {
        self.inner.create_blob(&opts).await
    }
    /// Opens a blob (an already open blob returns the same open, `open_ref + 1`).
    pub async fn open_blob(&self, id: BlobId) -> Result<Blob> {
        self.inner.check_live()?;
        let inner = self.inner.open_internal(id).await?;
        Ok(Blob { inner })
    }
    /// Deletes a blob (merging a snapshot into its single clone).
    pub async fn delete_blob(&self, id: BlobId) -> Result<()> {
        self.inner.delete_blob(id).await
    }
    /// Snapshots a blob; returns the snapshot id.
    pub async fn create_snapshot(
        &self,
        id: BlobId,
        xattrs: Vec<(String, Vec<u8>)>,
    ) -> Result<BlobId> {
        self.inner.create_snapshot(id, xattrs).await
    }
    /// Clones a read-only blob; returns the clone id.
    pub async fn create_clone(
        &self,
        snapshot: BlobId,
        xattrs: Vec<(String, Vec<u8>)>,
    ) -> Result<BlobId> {
        self.inner.create_clone(snapshot, xattrs).await
    }
    /// Allocates every cluster and cuts the parent link (thick result).
    pub async fn inflate_blob(&self, id: BlobId) -> Result<()> {
        self.inner.inflate(id, true).await
    }
    /// Copies the clusters of the immediate parent and re-points to the grandparent.
    pub async fn decouple_parent(&self, id: BlobId) -> Result<()> {
        self.inner.inflate(id, false).await
    }
    /// Re-parents a thin blob onto a snapshot (no data copied).
    pub async fn set_parent(&self, id: BlobId, snapshot: BlobId) -> Result<()> {
        self.inner.set_parent(id, snapshot).await
    }
    /// Makes a thin blob an esnap clone of `dev`, identified by `esnap_id`.
    pub async fn set_external_parent(
        &self,
        id: BlobId,
        dev: Arc<dyn BsDev>,
        esnap_id: &[u8],
    ) -> Result<()> {
        self.inner.set_external_parent(id, dev, esnap_id).await
    }
    /// Copies the clusters allocated in a read-only blob to the same offsets of `dst`;
    /// `progress(copied)` is called after each cluster. Returns the number copied.
    pub async fn shallow_copy(
        &self,
        id: BlobId,
        dst: Arc<dyn BsDev>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64> {
        self.inner.shallow_copy(id, dst, progress).await
    }
    /// Number of blobs open right now (including snapshots held open by their clones).
    pub fn open_blobs_count(&self) -> usize {
        self.inner.graph.lock().open.len()
    }
    /// Ids of the clones of a snapshot.
    pub fn clones_of(&self, id: BlobId) -> Vec<BlobId> {
        self.inner.clones_of(id)
    }
}

impl Blob {
    /// Blob id.
    pub fn id(&self) -> BlobId {
        self.inner.id
    }
    /// Size in clusters.
    pub fn num_clusters(&self) -> u64 {
        self.inner.lock().md.clusters.len() as u64
    }
    /// Size in io_units.
    pub fn num_io_units(&self) -> u64 {
        self.inner.num_io_units()
    }
    /// Allocated clusters owned by this blob.
    pub fn num_allocated_clusters(&self) -> u64 {
        self.inner.lock().md.allocated()
    }
    /// Thin provisioned.
    pub fn is_thin(&self) -> bool {
        self.inner.lock().md.thin()
    }
    /// Read-only: data or metadata (SPDK `spdk_blob_is_read_only`).
    pub fn is_read_only(&self) -> bool {
        // The lock-free mirror (`live.rs`): a bdev's write check asks this per request.
        self.inner.live_flags() & (crate::live::DATA_RO | crate::live::MD_RO) != 0
    }
    /// Has (or had, since load) clones: SPDK `spdk_blob_is_snapshot`, which is true while the
    /// blob is in the store's snapshot list.
    pub fn is_snapshot(&self) -> bool {
        self.inner
            .bs
            .graph
            .lock()
            .clones
            .contains_key(&self.inner.id)
    }
    /// Is a clone of a snapshot blob.
    pub fn is_clone(&self) -> bool {
        matches!(self.inner.parent(), Parent::Snapshot(_))
    }
    /// Is an esnap clone.
    pub fn is_esnap_clone(&self) -> bool {
        self.inner.lock().md.esnap()
    }
    /// True if the blob or anything in its back-device chain is degraded.
    pub fn is_degraded(&self) -> bool {
        self.inner.is_degraded()
    }
    /// The parent.
    pub fn parent(&self) -> Parent {
        self.inner.parent()
    }
    /// The stored clear method.
    pub fn clear_method(&self) -> ClearMethod {
        self.inner.lock().md.clear_method()
    }
    /// Whether cluster `idx` is allocated in this blob.
    pub fn is_cluster_allocated(&self, idx: u64) -> bool {
        self.inner.cluster_at_pub(idx as usize) != 0
    }
    /// First io_unit at or after `offset` that lies in an allocated cluster, or `None`
    /// (SPDK `spdk_blob_get_next_allocated_io_unit`, for seek_data).
    pub fn next_allocated_io_unit(&self, offset: u64) -> Option<u64> {
        self.inner.next_io_unit(offset, true)
    }
    /// First io_unit at or after `offset` that lies in an unallocated cluster, or `None`
    /// (SPDK `spdk_blob_get_next_unallocated_io_unit`, for seek_hole).
    pub fn next_unallocated_io_unit(&self, offset: u64) -> Option<u64> {
        self.inner.next_io_unit(offset, false)
    }
    /// Reads `buf.len()` bytes at io_unit `offset`.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.inner.read(offset, buf).await
    }
    /// The steady-state fast path of a request of `bytes` bytes at io_unit `offset`, for a
    /// caller that issues it on the device itself: `Some` when the request lies in one
    /// cluster of the open blob and reads or writes that cluster where it is (a write: an
    /// allocated cluster of a writable blob; a read: an allocated cluster, or an unallocated
    /// one that reads zeroes or straight from a healthy external snapshot), and the blob is
    /// not frozen. The caller keeps the returned [`Direct`] until the device request has
    /// completed, which holds off any operation that moves the blob's clusters. `None`: the
    /// request takes [`Blob::read`] / [`Blob::write`] (first writes, copy-on-write,
    /// unaligned or multi-cluster requests, a frozen blob, a degraded back device).
    pub fn direct(&self, offset: u64, bytes: usize, write: bool) -> Option<Direct<'_>> {
        self.inner.direct(offset, bytes, write)
    }
    /// Whether the lock-free mirror that [`Blob::direct`] reads (cluster map, flags, back
    /// device) says exactly what the blob's state says (tests).
    #[cfg(feature = "testing")]
    pub fn live_map_matches(&self) -> bool {
        self.inner.live_map_matches()
    }
    /// Writes `buf` at io_unit `offset` (allocating and copying clusters of thin blobs).
    /// A first write to a cluster returns once the cluster's data is written and the
    /// in-memory map names it; the map change is committed at the next [`Blob::flush`] (or
    /// metadata operation of the blob, its last close, or a later first write that finds
    /// [`PENDING_LIMIT`] uncommitted allocations in the store). A power cut before that
    /// loses the write: the blob then reads what it read before it.
    pub async fn write(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.inner.write(offset, buf).await
    }
    /// Vectored read.
    pub async fn readv(&self, offset: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let align = bufs.first().map(|b| b.align()).unwrap_or(1);
        let big = self.inner.read(offset, IoBuf::new(total, align)).await?;
        let mut out = bufs;
        let mut o = 0;
        for b in out.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&big[o..o + n]);
            o += n;
        }
        Ok(out)
    }
    /// Vectored write.
    pub async fn writev(&self, offset: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let align = bufs.first().map(|b| b.align()).unwrap_or(1);
        let mut big = IoBuf::new(total, align);
        let mut o = 0;
        for b in &bufs {
            big[o..o + b.len()].copy_from_slice(b);
            o += b.len();
        }
        self.inner.write(offset, big).await?;
        Ok(bufs)
    }
    /// Writes zeroes over `len` io_units.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.write_zeroes(offset, len).await
    }
    /// Unmaps `len` io_units (releases whole clusters of parentless thin blobs).
    pub async fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.unmap(offset, len).await
    }
    /// Makes every write of this blob acknowledged before the call durable, with the
    /// metadata it depends on: the store's deferred allocations are committed (their extent
    /// pages or root pages written behind a flush that made their clusters' data durable
    /// first), then a device flush. An error (a failed commit or flush) leaves the
    /// allocations pending in memory; the next flush retries them.
    pub async fn flush(&self) -> Result<()> {
        self.inner.bs.flush_blob().await
    }
    /// Resizes (in clusters); the new size is durable when this returns.
    pub async fn resize(&self, num_clusters: u64) -> Result<()> {
        self.inner.bs.resize(&self.inner, num_clusters).await
    }
    /// Marks read-only; takes effect at the next sync.
    pub fn set_read_only(&self) -> Result<()> {
        let mut s = self.inner.lock();
        s.md.data_ro |= format::DATA_RO_READ_ONLY;
        s.touch();
        Ok(())
    }
    /// Persists dirty metadata and the blob's deferred allocations.
    pub async fn sync_md(&self) -> Result<()> {
        if self.inner.lock().md_ro {
            return Ok(());
        }
        let _g = self.inner.bs.md_lock.lock().await;
        if self.inner.lock().dirty {
            // Covers the blob's deferred allocations too.
            self.inner.persist_locked().await?;
        } else {
            self.inner.bs.commit_blob_locked(&self.inner).await?;
        }
        Ok(())
    }
    /// Sets a public xattr (persisted at sync).
    pub fn set_xattr(&self, name: &str, value: &[u8]) -> Result<()> {
        if name.is_empty() {
            return Err(error::einval("empty xattr name"));
        }
        md::check_xattr_size(name, value)?;
        let mut s = self.inner.lock();
        if s.md_ro {
            return Err(error::eperm(format!(
                "blob {:#x} metadata is read-only",
                self.inner.id
            )));
        }
        md::set_in(&mut s.md.xattrs, name, value);
        s.touch();
        Ok(())
    }
    /// Gets a public xattr (ENOENT if missing).
    pub fn get_xattr(&self, name: &str) -> Result<Vec<u8>> {
        self.inner
            .lock()
            .md
            .xattrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| error::enoent(format!("xattr {name:?} not found")))
    }
    /// Removes a public xattr.
    pub fn remove_xattr(&self, name: &str) -> Result<()> {
        let mut s = self.inner.lock();
        if s.md_ro {
            return Err(error::eperm(format!(
                "blob {:#x} metadata is read-only",
                self.inner.id
            )));
        }
        let n = s.md.xattrs.len();
        s.md.xattrs.retain(|(k, _)| k != name);
        if n == s.md.xattrs.len() {
            return Err(error::enoent(format!("xattr {name:?} not found")));
        }
        s.touch();
        Ok(())
    }
    /// Public xattr names, in order.
    pub fn xattr_names(&self) -> Vec<String> {
        self.inner
            .lock()
            .md
            .xattrs
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }
    /// Internal xattr (`SNAP`, `EXTSNAP`, ...) for inspection tools.
    pub fn get_internal_xattr(&self, name: &str) -> Result<Vec<u8>> {
        self.inner
            .lock()
            .md
            .get_internal(name)
            .map(|v| v.to_vec())
            .ok_or_else(|| error::enoent(format!("internal xattr {name:?} not found")))
    }
    /// Sets an internal xattr (invisible to the public getters; persisted at sync). The
    /// blobstore's own names (`SNAP`, `SNAPTMP`, `SNAPRM`, `EXTSNAP`) are refused (EINVAL).
    pub fn set_internal_xattr(&self, name: &str, value: &[u8]) -> Result<()> {
        if name.is_empty() || ["SNAP", "SNAPTMP", "SNAPRM", "EXTSNAP"].contains(&name) {
            return Err(error::einval(format!(
                "internal xattr name {name:?} is reserved"
            )));
        }
        md::check_xattr_size(name, value)?;
        let mut s = self.inner.lock();
        if s.md_ro {
            return Err(error::eperm(format!(
                "blob {:#x} metadata is read-only",
                self.inner.id
            )));
        }
        s.md.set_internal(name, value);
        s.touch();
        Ok(())
    }
    /// Removes an internal xattr set with [`Blob::set_internal_xattr`] (ENOENT if missing).
    pub fn remove_internal_xattr(&self, name: &str) -> Result<()> {
        if ["SNAP", "SNAPTMP", "SNAPRM", "EXTSNAP"].contains(&name) {
            return Err(error::einval(format!(
                "internal xattr name {name:?} is reserved"
            )));
        }
        let mut s = self.inner.lock();
        if s.md_ro {
            return Err(error::eperm(format!(
                "blob {:#x} metadata is read-only",
                self.inner.id
            )));
        }
        if !s.md.remove_internal(name) {
            return Err(error::enoent(format!("internal xattr {name:?} not found")));
        }
        s.touch();
        Ok(())
    }
    /// The `EXTSNAP` id (EINVAL if not an esnap clone).
    pub fn esnap_id(&self) -> Result<Vec<u8>> {
        let s = self.inner.lock();
        if !s.md.esnap() {
            return Err(error::einval(format!(
                "blob {:#x} is not an esnap clone",
                self.inner.id
            )));
        }
        s.md.get_internal(format::XATTR_EXTSNAP)
            .map(|v| v.to_vec())
            .ok_or_else(|| error::einval("esnap clone without EXTSNAP"))
    }
    /// Swaps the external-snapshot back device (heal or degrade); I/O is frozen meanwhile.
    pub async fn set_esnap_dev(&self, dev: Option<Arc<dyn BsDev>>) -> Result<()> {
        self.inner.set_esnap_dev(dev).await
    }
    /// Closes this open (persists dirty metadata first).
    pub async fn close(self) -> Result<()> {
        let bs = self.inner.bs.clone();
        bs.close_internal(self.inner).await
    }
}
