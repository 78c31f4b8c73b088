//! Shared test helpers: a registry with the lvol module, malloc and file-backed bdevs, and
//! byte-level I/O through descriptors.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bdev_core::backend::aio::{AioBdev, AioOpts};
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{Descriptor, IoBuf, Registry};
use lvol::{LvolModule, LvsOpts};
use uuid::Uuid;

pub const MIB: u64 = 1 << 20;

pub fn setup() -> (Registry, LvolModule) {
    let reg = Registry::new();
    let m = LvolModule::new(reg.clone());
    // Keep degraded retries short in tests.
    m.set_esnap_retry(2, Duration::from_millis(5));
    (reg, m)
}

pub async fn malloc(reg: &Registry, name: &str, size: u64, bl: u32) {
    let dev = MallocBdev::create(name, size / u64::from(bl), bl, None).expect("malloc create");
    reg.register(dev).await.expect("register malloc");
}

pub async fn malloc_uuid(reg: &Registry, name: &str, size: u64, bl: u32, uuid: Uuid) {
    let dev = MallocBdev::create(name, size / u64::from(bl), bl, Some(uuid)).expect("malloc");
    reg.register(dev).await.expect("register malloc");
}

pub async fn aio(reg: &Registry, name: &str, path: &Path, bl: u32, uuid: Option<Uuid>, ro: bool) {
    let dev = AioBdev::create(AioOpts {
        name: name.to_string(),
        filename: path.to_path_buf(),
        block_len: Some(bl),
        readonly: ro,
        uuid,
        ..AioOpts::default()
    })
    .expect("aio create");
    reg.register(dev).await.expect("register aio");
    reg.wait_for_examine().await;
}

pub fn sparse_file(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create file");
    f.set_len(size).expect("set_len");
    p
}

pub async fn lvs(m: &LvolModule, bdev: &str, name: &str, cluster: u32) -> Arc<lvol::LvolStore> {
    let mut o = LvsOpts::new(name);
    o.cluster_size = cluster;
    m.create_lvstore(bdev, o).await.expect("create lvstore")
}

pub fn open(reg: &Registry, name: &str, write: bool) -> Descriptor {
    reg.open(name, write).expect("open bdev")
}

/// Writes `data` at byte offset `off`.
pub async fn write_at(d: &Descriptor, off: u64, data: &[u8]) -> bdev_core::Result<()> {
    let bl = u64::from(d.device().block_len());
    assert_eq!(off % bl, 0);
    let buf = IoBuf::from_slice(data, d.device().buf_align().max(1));
    d.write(off / bl, buf).await.map(|_| ())
}

/// Reads `len` bytes at byte offset `off`.
pub async fn read_at(d: &Descriptor, off: u64, len: usize) -> bdev_core::Result<Vec<u8>> {
    let bl = u64::from(d.device().block_len());
    assert_eq!(off % bl, 0);
    let buf = IoBuf::new(len, d.device().buf_align().max(1));
    d.read(off / bl, buf).await.map(|b| b.to_vec())
}

/// Reads the whole device in 1 MiB pieces.
pub async fn read_all(d: &Descriptor) -> Vec<u8> {
    let total = d.device().num_blocks() * u64::from(d.device().block_len());
    let mut out = Vec::with_capacity(total as usize);
    let mut off = 0;
    while off < total {
        let n = (total - off).min(MIB) as usize;
        out.extend(read_at(d, off, n).await.expect("read"));
        off += n as u64;
    }
    out
}

pub fn fill(byte: u8, len: usize) -> Vec<u8> {
    vec![byte; len]
}

/// A pattern unique per offset (so misplaced blocks are caught).
pub fn pattern(tag: u8, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((off + i) % 251) as u8 ^ tag)
        .collect()
}

pub fn errno(e: &bdev_core::BdevError) -> i32 {
    e.errno()
}

pub fn super_clean_flag(path: &Path) -> u32 {
    let bytes = std::fs::read(path).expect("read image");
    blobstore::inspect::parse_super(&bytes[..4096])
        .expect("parse super")
        .clean
}
