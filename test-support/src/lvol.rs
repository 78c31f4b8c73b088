//! The lvol module for tests (feature `lvol`): a registry with the module, stores and lvols
//! in one line, and the checks a reload is judged by.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bdev_core::{Descriptor, Registry};
use blobstore::ClearMethod;
use lvol::{Lvol, LvolModule, LvolStore, LvsOpts};

use crate::bdev::{aio, fill, malloc, open, sparse_file, write_at};

/// A registry with the lvol module. Degraded esnap reads retry twice, 5 ms apart (short, so
/// tests of degraded mode stay fast, but long enough to measure that they waited).
pub fn setup() -> (Registry, LvolModule) {
    setup_with_esnap_retry(2, Duration::from_millis(5))
}

/// [`setup`] with another esnap retry policy.
pub fn setup_with_esnap_retry(retries: u32, delay: Duration) -> (Registry, LvolModule) {
    let reg = Registry::new();
    let m = LvolModule::new(reg.clone());
    m.set_esnap_retry(retries, delay);
    (reg, m)
}

/// Creates lvol store `name` on bdev `bdev` with clusters of `cluster` bytes.
pub async fn lvs(m: &LvolModule, bdev: &str, name: &str, cluster: u32) -> Arc<LvolStore> {
    let mut o = LvsOpts::new(name);
    o.cluster_size = cluster;
    m.create_lvstore(bdev, o).await.expect("create lvstore")
}

/// A registry with the lvol module ([`setup`]) and store `name` (clusters of `cluster` bytes)
/// on malloc bdev `M` of `size` bytes in 512-byte blocks.
pub async fn malloc_store(
    size: u64,
    name: &str,
    cluster: u32,
) -> (Registry, LvolModule, Arc<LvolStore>) {
    let (reg, m) = setup();
    malloc(&reg, "M", size, 512).await;
    let s = lvs(&m, "M", name, cluster).await;
    (reg, m, s)
}

/// A registry with the lvol module ([`setup`]) and store `name` (clusters of `cluster` bytes)
/// on aio bdev `aio0` (512-byte blocks) over a new sparse file `dir/store.img` of `size`
/// bytes; returns the file too, to reload or inspect the store.
pub async fn aio_store(
    dir: &Path,
    size: u64,
    name: &str,
    cluster: u32,
) -> (Registry, LvolModule, Arc<LvolStore>, PathBuf) {
    let (reg, m) = setup();
    let f = sparse_file(dir, "store.img", size);
    aio(&reg, "aio0", &f, 512, None, false).await;
    let s = lvs(&m, "aio0", name, cluster).await;
    (reg, m, s, f)
}

/// A registry with the lvol module and one store per `(store name, bytes, cluster bytes)`,
/// on malloc bdevs `M`, `M2`, `M3`, ... (512-byte blocks), in that order.
pub async fn malloc_stores<const N: usize>(
    specs: [(&str, u64, u32); N],
) -> (Registry, LvolModule, [Arc<LvolStore>; N]) {
    let (reg, m) = setup();
    let mut stores = Vec::with_capacity(N);
    for (i, (name, size, cluster)) in specs.into_iter().enumerate() {
        let bdev = if i == 0 {
            "M".to_string()
        } else {
            format!("M{}", i + 1)
        };
        malloc(&reg, &bdev, size, 512).await;
        stores.push(lvs(&m, &bdev, name, cluster).await);
    }
    let Ok(stores) = stores.try_into() else {
        unreachable!("one store per spec")
    };
    (reg, m, stores)
}

/// [`aio_store`] over a file in a new temp dir, returned first (keep it alive).
pub async fn aio_store_tmp(
    size: u64,
    name: &str,
    cluster: u32,
) -> (
    tempfile::TempDir,
    Registry,
    LvolModule,
    Arc<LvolStore>,
    PathBuf,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (reg, m, s, f) = aio_store(dir.path(), size, name, cluster).await;
    (dir, reg, m, s, f)
}

/// Opens bdev `name` for writing and writes `len` bytes of `byte` at byte offset `off`;
/// returns the descriptor.
pub async fn open_fill(reg: &Registry, name: &str, off: u64, len: u64, byte: u8) -> Descriptor {
    let d = open(reg, name, true);
    write_at(&d, off, &fill(byte, len as usize))
        .await
        .unwrap_or_else(|e| panic!("write {len} bytes at {off} of {name}: {e}"));
    d
}

/// Creates thin lvol `name` of `size` bytes (default clear method).
pub async fn thin_lvol(m: &LvolModule, s: &Arc<LvolStore>, name: &str, size: u64) -> Arc<Lvol> {
    new_lvol(m, s, name, size, true).await
}

/// Creates thick lvol `name` of `size` bytes (default clear method).
pub async fn thick_lvol(m: &LvolModule, s: &Arc<LvolStore>, name: &str, size: u64) -> Arc<Lvol> {
    new_lvol(m, s, name, size, false).await
}

async fn new_lvol(
    m: &LvolModule,
    s: &Arc<LvolStore>,
    name: &str,
    size: u64,
    thin: bool,
) -> Arc<Lvol> {
    m.create_lvol(s, name, size, thin, ClearMethod::Default)
        .await
        .unwrap_or_else(|e| panic!("create lvol {name} (thin {thin}, {size} bytes): {e}"))
}

/// The names of the store's lvols, sorted.
pub fn lvol_names(s: &LvolStore) -> Vec<String> {
    let mut v: Vec<String> = s.lvols().iter().map(|l| l.name()).collect();
    v.sort();
    v
}

/// Fails the test when the blobstore check of the store's device finds a problem (a cluster
/// owned twice, a broken chain, a leak).
pub async fn assert_consistent(s: &LvolStore) {
    let rep = blobstore::inspect::check(s.blobstore().device())
        .await
        .expect("blobstore check runs");
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

/// The super block's clean flag in the store image at `path`.
pub fn super_clean_flag(path: &Path) -> u32 {
    let bytes = std::fs::read(path).expect("read image");
    blobstore::inspect::parse_super(&bytes[..4096])
        .expect("parse super")
        .clean
}
