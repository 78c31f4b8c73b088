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
//! (Contract only; implemented in the blobstore issue.)

mod dev;
mod error;
pub mod inspect;

pub use dev::{BsDev, ZeroesDev};
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
    _private: Arc<()>,
}

/// An open blob. Cheap to clone; every clone is the same open (one `open_ref`).
#[derive(Clone)]
pub struct Blob {
    _private: Arc<()>,
}

impl Blobstore {
    /// Initialises a new store on `dev` (SPDK `spdk_bs_init`).
    pub async fn init(dev: Arc<dyn BsDev>, opts: BsOpts) -> Result<Blobstore> {
        let _ = (dev, opts);
        todo!()
    }
    /// Loads a store; a dirty store (or `force_recover`) is recovered by scanning md pages.
    /// A failed load never writes to the device.
    pub async fn load(dev: Arc<dyn BsDev>, opts: BsOpts) -> Result<Blobstore> {
        let _ = (dev, opts);
        todo!()
    }
    /// Writes the masks and marks the store clean. EBUSY if any blob is open.
    pub async fn unload(&self) -> Result<()> {
        todo!()
    }
    /// Zeroes the super block (SPDK `spdk_bs_destroy`). EBUSY if any blob is open.
    pub async fn destroy(&self) -> Result<()> {
        todo!()
    }
    /// Grows the store to the device's current size.
    pub async fn grow(&self) -> Result<()> {
        todo!()
    }
    /// The device under the store.
    pub fn device(&self) -> Arc<dyn BsDev> {
        todo!()
    }
    /// The super blob, if set.
    pub fn super_blob(&self) -> Option<BlobId> {
        todo!()
    }
    /// Sets the super blob.
    pub async fn set_super_blob(&self, id: BlobId) -> Result<()> {
        let _ = id;
        todo!()
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u32 {
        todo!()
    }
    /// io_unit size in bytes (the device block size).
    pub fn io_unit_size(&self) -> u32 {
        todo!()
    }
    /// md page size in bytes (4096).
    pub fn md_page_size(&self) -> u32 {
        todo!()
    }
    /// Total clusters (including metadata clusters).
    pub fn total_clusters(&self) -> u64 {
        todo!()
    }
    /// Clusters available for data (`total_data_clusters` of `bdev_lvol_get_lvstores`).
    pub fn total_data_clusters(&self) -> u64 {
        todo!()
    }
    /// Free clusters.
    pub fn free_clusters(&self) -> u64 {
        todo!()
    }
    /// `spdk_bs_get_max_growable_size` in bytes.
    pub fn max_growable_size(&self) -> u64 {
        todo!()
    }
    /// The store's bstype.
    pub fn bstype(&self) -> [u8; 16] {
        todo!()
    }
    /// md region start (pages).
    pub fn md_start(&self) -> u32 {
        todo!()
    }
    /// md region length (pages).
    pub fn md_len(&self) -> u32 {
        todo!()
    }
    /// Ids of every blob, in increasing order (iteration).
    pub fn blob_ids(&self) -> Vec<BlobId> {
        todo!()
    }
    /// Creates a blob and returns its id (the blob is not left open).
    pub async fn create_blob(&self, opts: BlobOpts) -> Result<BlobId> {
        let _ = opts;
        todo!()
    }
    /// Opens a blob (an already open blob returns the same open, `open_ref + 1`).
    pub async fn open_blob(&self, id: BlobId) -> Result<Blob> {
        let _ = id;
        todo!()
    }
    /// Deletes a blob (merging a snapshot into its single clone).
    pub async fn delete_blob(&self, id: BlobId) -> Result<()> {
        let _ = id;
        todo!()
    }
    /// Snapshots a blob; returns the snapshot id.
    pub async fn create_snapshot(
        &self,
        id: BlobId,
        xattrs: Vec<(String, Vec<u8>)>,
    ) -> Result<BlobId> {
        let _ = (id, xattrs);
        todo!()
    }
    /// Clones a read-only blob; returns the clone id.
    pub async fn create_clone(
        &self,
        snapshot: BlobId,
        xattrs: Vec<(String, Vec<u8>)>,
    ) -> Result<BlobId> {
        let _ = (snapshot, xattrs);
        todo!()
    }
    /// Allocates every cluster and cuts the parent link (thick result).
    pub async fn inflate_blob(&self, id: BlobId) -> Result<()> {
        let _ = id;
        todo!()
    }
    /// Copies the clusters of the immediate parent and re-points to the grandparent.
    pub async fn decouple_parent(&self, id: BlobId) -> Result<()> {
        let _ = id;
        todo!()
    }
    /// Re-parents a thin blob onto a snapshot (no data copied).
    pub async fn set_parent(&self, id: BlobId, snapshot: BlobId) -> Result<()> {
        let _ = (id, snapshot);
        todo!()
    }
    /// Makes a thin blob an esnap clone of `dev`, identified by `esnap_id`.
    pub async fn set_external_parent(
        &self,
        id: BlobId,
        dev: Arc<dyn BsDev>,
        esnap_id: &[u8],
    ) -> Result<()> {
        let _ = (id, dev, esnap_id);
        todo!()
    }
    /// Copies the clusters allocated in a read-only blob to the same offsets of `dst`;
    /// `progress(copied)` is called after each cluster. Returns the number copied.
    pub async fn shallow_copy(
        &self,
        id: BlobId,
        dst: Arc<dyn BsDev>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64> {
        let _ = (id, dst, progress);
        todo!()
    }
    /// Ids of the clones of a snapshot.
    pub fn clones_of(&self, id: BlobId) -> Vec<BlobId> {
        let _ = id;
        todo!()
    }
}

impl Blob {
    /// Blob id.
    pub fn id(&self) -> BlobId {
        todo!()
    }
    /// Size in clusters.
    pub fn num_clusters(&self) -> u64 {
        todo!()
    }
    /// Size in io_units.
    pub fn num_io_units(&self) -> u64 {
        todo!()
    }
    /// Allocated clusters owned by this blob.
    pub fn num_allocated_clusters(&self) -> u64 {
        todo!()
    }
    /// Thin provisioned.
    pub fn is_thin(&self) -> bool {
        todo!()
    }
    /// Read-only (data_ro).
    pub fn is_read_only(&self) -> bool {
        todo!()
    }
    /// Has clones (SPDK `spdk_blob_is_snapshot`).
    pub fn is_snapshot(&self) -> bool {
        todo!()
    }
    /// Is a clone of a snapshot blob.
    pub fn is_clone(&self) -> bool {
        todo!()
    }
    /// Is an esnap clone.
    pub fn is_esnap_clone(&self) -> bool {
        todo!()
    }
    /// True if the blob or anything in its back-device chain is degraded.
    pub fn is_degraded(&self) -> bool {
        todo!()
    }
    /// The parent.
    pub fn parent(&self) -> Parent {
        todo!()
    }
    /// The stored clear method.
    pub fn clear_method(&self) -> ClearMethod {
        todo!()
    }
    /// Whether cluster `idx` is allocated in this blob.
    pub fn is_cluster_allocated(&self, idx: u64) -> bool {
        let _ = idx;
        todo!()
    }
    /// Reads `buf.len()` bytes at io_unit `offset`.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let _ = (offset, buf);
        todo!()
    }
    /// Writes `buf` at io_unit `offset` (allocating and copying clusters of thin blobs).
    pub async fn write(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let _ = (offset, buf);
        todo!()
    }
    /// Vectored read.
    pub async fn readv(&self, offset: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        let _ = (offset, bufs);
        todo!()
    }
    /// Vectored write.
    pub async fn writev(&self, offset: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        let _ = (offset, bufs);
        todo!()
    }
    /// Writes zeroes over `len` io_units.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        todo!()
    }
    /// Unmaps `len` io_units (releases whole clusters of parentless thin blobs).
    pub async fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        todo!()
    }
    /// Flushes the device.
    pub async fn flush(&self) -> Result<()> {
        todo!()
    }
    /// Resizes (in clusters); persisted at the next sync.
    pub async fn resize(&self, num_clusters: u64) -> Result<()> {
        let _ = num_clusters;
        todo!()
    }
    /// Marks read-only; takes effect at the next sync.
    pub fn set_read_only(&self) -> Result<()> {
        todo!()
    }
    /// Persists dirty metadata.
    pub async fn sync_md(&self) -> Result<()> {
        todo!()
    }
    /// Sets a public xattr (persisted at sync).
    pub fn set_xattr(&self, name: &str, value: &[u8]) -> Result<()> {
        let _ = (name, value);
        todo!()
    }
    /// Gets a public xattr (ENOENT if missing).
    pub fn get_xattr(&self, name: &str) -> Result<Vec<u8>> {
        let _ = name;
        todo!()
    }
    /// Removes a public xattr.
    pub fn remove_xattr(&self, name: &str) -> Result<()> {
        let _ = name;
        todo!()
    }
    /// Public xattr names, in order.
    pub fn xattr_names(&self) -> Vec<String> {
        todo!()
    }
    /// Internal xattr (`SNAP`, `EXTSNAP`, ...) for inspection tools.
    pub fn get_internal_xattr(&self, name: &str) -> Result<Vec<u8>> {
        let _ = name;
        todo!()
    }
    /// The `EXTSNAP` id (EINVAL if not an esnap clone).
    pub fn esnap_id(&self) -> Result<Vec<u8>> {
        todo!()
    }
    /// Swaps the external-snapshot back device (heal or degrade); I/O is frozen meanwhile.
    pub async fn set_esnap_dev(&self, dev: Option<Arc<dyn BsDev>>) -> Result<()> {
        let _ = dev;
        todo!()
    }
    /// Closes this open (persists dirty metadata first).
    pub async fn close(self) -> Result<()> {
        todo!()
    }
}
