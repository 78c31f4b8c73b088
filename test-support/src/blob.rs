//! Blobstore helpers (feature `blob`): blob options built in one line, a blob made, written
//! or read back in one line, a store reloaded or checked in one line.

use std::sync::Arc;

use blobstore::{BlobId, BlobOpts, Blobstore, BsDev, BsOpts, ClearMethod, IoBuf};

/// Asserts that every `(key, value)` of `got` equals `want[key]`, an entry of a fixture
/// manifest (a blob or an lvol, named `what` in the message).
pub fn assert_manifest(what: &str, want: &serde_json::Value, got: &[(&str, serde_json::Value)]) {
    for (key, value) in got {
        assert_eq!(&want[*key], value, "{what}: {key}");
    }
}

/// Every clear method, for tests that sweep them.
pub const CLEAR_METHODS: [ClearMethod; 4] = [
    ClearMethod::Default,
    ClearMethod::None,
    ClearMethod::Unmap,
    ClearMethod::WriteZeroes,
];

/// Options of a thick blob of `n` clusters, everything else default; refine them with the
/// [`BlobOptsExt`] methods: `clusters(4).thin().xattr("name", b"t\0")`.
pub fn clusters(n: u64) -> BlobOpts {
    BlobOpts {
        num_clusters: n,
        ..Default::default()
    }
}

/// One-line refinements of [`BlobOpts`].
pub trait BlobOptsExt {
    /// Thin provisioned.
    fn thin(self) -> Self;
    /// Run-length extents instead of the extent table.
    fn rle(self) -> Self;
    /// Clear method `m`.
    fn clear(self, m: ClearMethod) -> Self;
    /// An esnap clone of external snapshot `id`.
    fn esnap(self, id: &[u8]) -> Self;
    /// One more public xattr.
    fn xattr(self, name: &str, value: &[u8]) -> Self;
}

impl BlobOptsExt for BlobOpts {
    fn thin(self) -> Self {
        BlobOpts { thin: true, ..self }
    }
    fn rle(self) -> Self {
        BlobOpts {
            use_extent_table: false,
            ..self
        }
    }
    fn clear(self, m: ClearMethod) -> Self {
        BlobOpts {
            clear_method: m,
            ..self
        }
    }
    fn esnap(self, id: &[u8]) -> Self {
        BlobOpts {
            esnap_id: Some(id.to_vec()),
            ..self
        }
    }
    fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        self.xattrs.push((name.to_string(), value.to_vec()));
        self
    }
}

/// Creates a blob with `opts`; panics (naming the options) when that fails.
pub async fn create(bs: &Blobstore, opts: BlobOpts) -> BlobId {
    let what = format!("{opts:?}");
    bs.create_blob(opts)
        .await
        .unwrap_or_else(|e| panic!("create blob {what}: {e}"))
}

/// `len` bytes of `byte` in a buffer aligned for any io unit up to 4 KiB.
pub fn filled(len: usize, byte: u8) -> IoBuf {
    let mut b = IoBuf::new(len, 4096);
    b.fill(byte);
    b
}

/// Opens blob `id`, writes `units` io units of `byte` at io unit `off`, closes it; panics
/// when any step fails.
pub async fn write_units(bs: &Blobstore, id: BlobId, off: u64, units: u64, byte: u8) {
    let len = units as usize * bs.io_unit_size() as usize;
    write_blob(bs, id, off, &filled(len, byte))
        .await
        .unwrap_or_else(|e| panic!("write blob {id:#x} at {off}: {e}"));
}

/// Opens blob `id`, reads `units` io units at io unit `off`, closes it.
pub async fn read_units(bs: &Blobstore, id: BlobId, off: u64, units: u64) -> Vec<u8> {
    let b = bs.open_blob(id).await.expect("open blob");
    let unit = bs.io_unit_size() as usize;
    let d = b
        .read(off, IoBuf::new(units as usize * unit, 4096))
        .await
        .unwrap_or_else(|e| panic!("read blob {id:#x} at {off}: {e}"))
        .to_vec();
    b.close().await.expect("close blob");
    d
}

/// A new store with `opts` on a zeroed in-memory device of `blocks` blocks of `bl` bytes;
/// the device too, to reload or inspect the store (feature `mem`).
#[cfg(feature = "mem")]
pub async fn mem_store(
    bl: u32,
    blocks: u64,
    opts: BsOpts,
) -> (Arc<blobstore::testing::MemBsDev>, Blobstore) {
    let dev = blobstore::testing::MemBsDev::new(bl, blocks);
    let bs = init_store(&dev, opts).await;
    (dev, bs)
}

/// A new store on `dev` with `opts`; panics when init fails.
pub async fn init_store<D: BsDev + 'static>(dev: &Arc<D>, opts: BsOpts) -> Blobstore {
    Blobstore::init(dev.clone(), opts)
        .await
        .expect("init store")
}

/// Unloads `bs` clean and loads the store on `dev` again with `opts`.
pub async fn reload<D: BsDev + 'static>(dev: &Arc<D>, bs: Blobstore, opts: BsOpts) -> Blobstore {
    bs.unload().await.expect("unload");
    Blobstore::load(dev.clone(), opts).await.expect("load")
}

/// Drops `bs` without unloading (a dirty shutdown) and loads the store on `dev` again.
pub async fn dirty_reload<D: BsDev + 'static>(
    dev: &Arc<D>,
    bs: Blobstore,
    opts: BsOpts,
) -> Blobstore {
    drop(bs);
    Blobstore::load(dev.clone(), opts)
        .await
        .expect("dirty load")
}

/// Fails the test when `inspect::check` of the store on `dev` finds a problem (a cluster
/// owned twice, a broken chain, a leak); the store must be unloaded.
pub async fn assert_store_consistent<D: BsDev + 'static>(dev: &Arc<D>) {
    let rep = blobstore::inspect::check(dev.clone())
        .await
        .expect("blobstore check runs");
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

/// Unloads `bs` clean, then [`assert_store_consistent`].
pub async fn unload_and_check<D: BsDev + 'static>(dev: &Arc<D>, bs: Blobstore) {
    unload_and_check_for(dev, bs, "store").await;
}

/// [`unload_and_check`] whose failure message starts with `what` (the case being checked).
pub async fn unload_and_check_for<D: BsDev + 'static>(dev: &Arc<D>, bs: Blobstore, what: &str) {
    bs.unload()
        .await
        .unwrap_or_else(|e| panic!("{what}: unload: {e}"));
    let rep = blobstore::inspect::check(dev.clone())
        .await
        .unwrap_or_else(|e| panic!("{what}: check: {e}"));
    assert!(rep.problems.is_empty(), "{what}: {:?}", rep.problems);
}

/// Creates a blob of `clusters` clusters (thin or thick, other options default).
pub async fn new_blob(bs: &Blobstore, clusters: u64, thin: bool) -> BlobId {
    let opts = BlobOpts {
        num_clusters: clusters,
        thin,
        ..Default::default()
    };
    bs.create_blob(opts).await.expect("create blob")
}

/// Opens blob `id`, writes `data` at io unit `off`, closes it; the write's result.
pub async fn write_blob(
    bs: &Blobstore,
    id: BlobId,
    off: u64,
    data: &[u8],
) -> blobstore::Result<()> {
    let b = bs.open_blob(id).await?;
    let align = bs.io_unit_size() as usize;
    let r = b
        .write(off, IoBuf::from_slice(data, align))
        .await
        .map(|_| ());
    b.close().await?;
    r
}

/// Every byte of blob `id` (opened and closed again).
pub async fn read_blob(bs: &Blobstore, id: BlobId) -> Vec<u8> {
    let b = bs.open_blob(id).await.expect("open blob");
    let unit = bs.io_unit_size() as usize;
    let n = b.num_io_units() as usize * unit;
    let d = b
        .read(0, IoBuf::new(n, unit))
        .await
        .expect("read blob")
        .to_vec();
    b.close().await.expect("close blob");
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use blobstore::testing::MemBsDev;
    use blobstore::BsOpts;

    #[test]
    fn a_blob_written_reads_back_and_the_rest_is_zeroes() {
        futures::executor::block_on(async {
            let dev = MemBsDev::new(4096, 256);
            let o = BsOpts {
                cluster_size: 16384,
                ..Default::default()
            };
            let bs = Blobstore::init(dev, o).await.unwrap();
            let id = new_blob(&bs, 2, true).await;
            write_blob(&bs, id, 5, &[7; 4096]).await.unwrap();
            let d = read_blob(&bs, id).await;
            assert_eq!(d.len(), 2 * 16384);
            assert!(d[5 * 4096..6 * 4096].iter().all(|&x| x == 7));
            assert!(d[..5 * 4096].iter().chain(&d[6 * 4096..]).all(|&x| x == 0));
            assert!(write_blob(&bs, id, 8, &[1; 4096]).await.is_err());
        });
    }
}
