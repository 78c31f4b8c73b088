//! In-memory bdev (SPDK `bdev_malloc`).
//!
//! The memory is split into 2 MiB chunks (huge-page aligned) allocated on first write, so a large malloc bdev
//! commits RAM only where it was written; an unwritten chunk reads as zeroes. Each chunk has
//! its own `RwLock`, so I/O from many threads to different chunks never contends, and reads
//! of one chunk share it. Unmap and write_zeroes free whole chunks and zero partial ones.
//!
//! Product name `"Malloc disk"`, module `"malloc"`, `driver_specific` `{}`, and
//! `write_config` gives SPDK's `bdev_malloc_create` entry.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use iobuf::IoBuf;
use uuid::Uuid;

use crate::{BdevError, BlockDevice, IoFuture, Result};

/// Size of one lazily allocated chunk: one transparent huge page.
const CHUNK: u64 = 2 << 20;

/// A chunk's memory: an anonymous mapping aligned to [`CHUNK`] and advised for transparent
/// huge pages (`MADV_HUGEPAGE`), as SPDK's malloc bdev sits in hugepage memory. Random 4 KiB
/// requests over a large bdev then cost one TLB entry per 2 MiB instead of one per page,
/// for every layer's copy alike. Zero-filled by the kernel, backed on first touch.
struct Mem {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: `Mem` owns its mapping exclusively, like a `Box<[u8]>`.
unsafe impl Send for Mem {}
// SAFETY: shared access only reads (`Deref`); writes need `&mut`.
unsafe impl Sync for Mem {}

impl Mem {
    /// `len` zero bytes (aborts like `Vec` when the memory cannot be mapped).
    fn zeroed(len: usize) -> Mem {
        let align = CHUNK as usize;
        let page = 4096usize;
        let span = len.div_ceil(page) * page;
        let map_len = span + align;
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(len.max(1), align).expect("valid layout"),
            );
        }
        let base = p as usize;
        let start = base.next_multiple_of(align);
        let (head, tail) = (start - base, map_len - (start - base) - span);
        // SAFETY: both ranges lie in the mapping made above, page-aligned, and are not used.
        unsafe {
            if head > 0 {
                libc::munmap(p, head);
            }
            if tail > 0 {
                libc::munmap((start + span) as *mut libc::c_void, tail);
            }
            // Advice only: without THP the chunk is plain pages.
            libc::madvise(start as *mut libc::c_void, span, libc::MADV_HUGEPAGE);
        }
        Mem {
            ptr: std::ptr::NonNull::new(start as *mut u8).expect("mmap returned a non-null range"),
            len,
        }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: the range mapped by `zeroed` (its length rounded up to pages by the kernel).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl std::ops::Deref for Mem {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` mapped bytes, initialised (zero) by the kernel, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Mem {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

type Chunk = RwLock<Option<Mem>>;

fn read_lock(c: &Chunk) -> RwLockReadGuard<'_, Option<Mem>> {
    c.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock(c: &Chunk) -> RwLockWriteGuard<'_, Option<Mem>> {
    c.write().unwrap_or_else(|e| e.into_inner())
}

/// The I/O methods of a device whose every operation completes at once in memory, with no
/// volatile cache in front of it, and whose unmap zeroes: the type's `copy_out(offset, buf)`,
/// `copy_in(offset, data)` and `zero(offset, blocks)` do the work (malloc, null). The braces
/// hold the rest of the `BlockDevice` impl.
macro_rules! instant_io {
    ($ty:ty { $($rest:tt)* }) => {
        #[async_trait::async_trait]
        impl $crate::BlockDevice for $ty {
        $($rest)*
        async fn read(&self, offset_blocks: u64, mut buf: IoBuf) -> Result<IoBuf> {
            self.copy_out(offset_blocks, &mut buf);
            Ok(buf)
        }
        async fn write(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
            self.copy_in(offset_blocks, &buf);
            Ok(buf)
        }
        fn read_io(&self, offset_blocks: u64, mut buf: IoBuf) -> IoFuture<'_, Result<IoBuf>> {
            // A memory copy completes at once: no future to keep.
            self.copy_out(offset_blocks, &mut buf);
            IoFuture::ready(Ok(buf))
        }
        fn write_io(&self, offset_blocks: u64, buf: IoBuf) -> IoFuture<'_, Result<IoBuf>> {
            self.copy_in(offset_blocks, &buf);
            IoFuture::ready(Ok(buf))
        }
        async fn flush(&self) -> Result<()> {
            // No cache in front of the memory: a completed write is as durable as it gets.
            Ok(())
        }
        fn has_volatile_cache(&self) -> bool {
            false
        }
        fn unmap_zeroes(&self) -> bool {
            // `zero` frees or zeroes the range before the unmap completes.
            true
        }
        async fn unmap(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
            self.zero(offset_blocks, num_blocks);
            Ok(())
        }
        async fn write_zeroes(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
            self.zero(offset_blocks, num_blocks);
            Ok(())
        }
        }
    };
}
pub(crate) use instant_io;

/// The first checks of a RAM-backed device (malloc, cached): a non-empty name and a block
/// length that is a non-zero multiple of 512 (EINVAL otherwise).
pub(super) fn check_name_and_block_len(name: &str, block_len: u32) -> Result<()> {
    if name.is_empty() {
        return Err(BdevError::InvalidArgument("empty bdev name".into()));
    }
    if block_len == 0 || !block_len.is_multiple_of(512) {
        return Err(BdevError::InvalidArgument(format!(
            "block size {block_len} is not a multiple of 512"
        )));
    }
    Ok(())
}

/// A RAM-backed device. Product name `"Malloc disk"`.
pub struct MallocBdev {
    name: String,
    uuid: Uuid,
    block_len: u32,
    num_blocks: AtomicU64,
    chunks: Box<[Chunk]>,
}

impl std::fmt::Debug for MallocBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::device::debug_device(f, "MallocBdev", self)
    }
}

impl MallocBdev {
    /// Creates (does not register) a malloc bdev. `block_len` must be a multiple of 512 (EINVAL),
    /// `num_blocks` > 0. A `None` uuid gets a random one.
    pub fn create(
        name: &str,
        num_blocks: u64,
        block_len: u32,
        uuid: Option<Uuid>,
    ) -> Result<Arc<Self>> {
        check_name_and_block_len(name, block_len)?;
        if num_blocks == 0 {
            return Err(BdevError::InvalidArgument("num_blocks must be > 0".into()));
        }
        let bytes = num_blocks.checked_mul(block_len as u64).ok_or_else(|| {
            BdevError::InvalidArgument(format!("{num_blocks} blocks overflow the size"))
        })?;
        let nchunks = usize::try_from(bytes.div_ceil(CHUNK))
            .map_err(|_| BdevError::InvalidArgument("malloc bdev too large".into()))?;
        let mut chunks = Vec::new();
        chunks
            .try_reserve_exact(nchunks)
            .map_err(|_| BdevError::Io(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
        chunks.extend((0..nchunks).map(|_| RwLock::new(None)));
        Ok(Arc::new(MallocBdev {
            name: name.to_string(),
            uuid: uuid.unwrap_or_else(Uuid::new_v4),
            block_len,
            num_blocks: AtomicU64::new(num_blocks),
            chunks: chunks.into_boxed_slice(),
        }))
    }

    /// Bytes of RAM currently allocated for data (whole chunks).
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks
            .iter()
            .filter(|c| read_lock(c).is_some())
            .count() as u64
            * CHUNK
    }

    fn chunk_len(&self, idx: usize) -> usize {
        let total = self.num_blocks() * self.block_len as u64;
        (total - idx as u64 * CHUNK).min(CHUNK) as usize
    }

    /// Splits the byte range `[start, start + len)` into (chunk index, offset in chunk,
    /// length, offset in the caller's range) pieces.
    fn pieces(&self, start: u64, len: u64) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        let end = start + len;
        let mut pos = start;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let idx = (pos / CHUNK) as usize;
            let off = (pos % CHUNK) as usize;
            let n = ((CHUNK - off as u64).min(end - pos)) as usize;
            let item = (idx, off, n, (pos - start) as usize);
            pos += n as u64;
            Some(item)
        })
    }

    fn copy_out(&self, offset_blocks: u64, out: &mut [u8]) {
        let start = offset_blocks * self.block_len as u64;
        for (idx, off, n, at) in self.pieces(start, out.len() as u64) {
            let dst = &mut out[at..at + n];
            match &*read_lock(&self.chunks[idx]) {
                Some(data) => dst.copy_from_slice(&data[off..off + n]),
                None => dst.fill(0),
            }
        }
    }

    fn copy_in(&self, offset_blocks: u64, data: &[u8]) {
        let start = offset_blocks * self.block_len as u64;
        for (idx, off, n, at) in self.pieces(start, data.len() as u64) {
            let mut chunk = write_lock(&self.chunks[idx]);
            let mem = chunk.get_or_insert_with(|| Mem::zeroed(self.chunk_len(idx)));
            mem[off..off + n].copy_from_slice(&data[at..at + n]);
        }
    }

    fn zero(&self, offset_blocks: u64, num_blocks: u64) {
        let bl = self.block_len as u64;
        for (idx, off, n, _) in self.pieces(offset_blocks * bl, num_blocks * bl) {
            let mut chunk = write_lock(&self.chunks[idx]);
            if off == 0 && n == self.chunk_len(idx) {
                *chunk = None;
            } else if let Some(mem) = chunk.as_mut() {
                mem[off..off + n].fill(0);
            }
        }
    }
}

instant_io!(MallocBdev {
    crate::device_facts!(product: "Malloc disk", module: "malloc", every_block_op);
    fn write_config(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "method": "bdev_malloc_create",
            "params": {
                "name": self.name,
                "num_blocks": self.num_blocks,
                "block_size": self.block_len,
                "physical_block_size": self.block_len,
                "uuid": self.uuid.hyphenated().to_string(),
                "optimal_io_boundary": 0,
                "md_size": 0,
                "dif_type": 0,
                "dif_is_head_of_md": false,
                "dif_pi_format": 0,
            }
        }))
    }
    async fn destruct(&self) {
        for c in self.chunks.iter() {
            *write_lock(c) = None;
        }
    }
});

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    #[test]
    fn sparse_until_written_and_unmap_frees() {
        let m = MallocBdev::create("m", 8 << 21, 4096, None).unwrap(); // 64 GiB
        assert_eq!(m.allocated_bytes(), 0);
        let last = CHUNK / 4096 - 1; // the last block of chunk 0
        let buf = IoBuf::from_slice(&[7u8; 8192], 1);
        block_on(m.write(last, buf)).unwrap(); // straddles chunk 0 and 1
        assert_eq!(m.allocated_bytes(), 2 * CHUNK);
        let out = block_on(m.read(last, IoBuf::new(8192, 1))).unwrap();
        assert!(out.iter().all(|&b| b == 7));
        block_on(m.unmap(0, last + 1)).unwrap();
        assert_eq!(m.allocated_bytes(), CHUNK);
        let out = block_on(m.read(last, IoBuf::new(8192, 1))).unwrap();
        assert!(out[..4096].iter().all(|&b| b == 0));
        assert!(out[4096..].iter().all(|&b| b == 7));
    }

    /// A bdev whose last chunk is short (not even a whole page): every block keeps what was
    /// written, the last one too, and a chunk freed and written again reads zeroes around
    /// the new data.
    #[test]
    fn a_short_last_chunk_and_a_reused_chunk_read_back() {
        let blocks = 2 * (CHUNK / 512) + 3; // two whole chunks and 1.5 KiB
        let m = MallocBdev::create("m", blocks, 512, None).unwrap();
        let pattern = |i: u64| IoBuf::from_slice(&[(i % 251) as u8 + 1; 512], 1);
        for i in [0, CHUNK / 512 - 1, CHUNK / 512, blocks - 2, blocks - 1] {
            block_on(m.write(i, pattern(i))).unwrap();
        }
        for i in [0, CHUNK / 512 - 1, CHUNK / 512, blocks - 2, blocks - 1] {
            let out = block_on(m.read(i, IoBuf::new(512, 1))).unwrap();
            assert_eq!(&out[..], &pattern(i)[..], "block {i}");
        }
        block_on(m.unmap(0, CHUNK / 512)).unwrap();
        block_on(m.write(7, pattern(7))).unwrap();
        let out = block_on(m.read(6, IoBuf::new(3 * 512, 1))).unwrap();
        assert!(out[..512].iter().all(|&b| b == 0));
        assert_eq!(&out[512..1024], &pattern(7)[..]);
        assert!(out[1024..].iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_block_size_and_size_are_einval() {
        for (n, bl) in [(0u64, 512u32), (8, 500), (8, 0), (u64::MAX, 4096)] {
            let e = MallocBdev::create("m", n, bl, None).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{n} {bl}");
        }
    }

    #[test]
    fn write_config_has_spdk_fields() {
        let u = Uuid::parse_str("7e5a0000-e5a0-4e5a-8e5a-000000000001").unwrap();
        let m = MallocBdev::create("M1", 65536, 512, Some(u)).unwrap();
        let c = m.write_config().unwrap();
        assert_eq!(c["method"], "bdev_malloc_create");
        let keys: Vec<&str> = c["params"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "name",
                "num_blocks",
                "block_size",
                "physical_block_size",
                "uuid",
                "optimal_io_boundary",
                "md_size",
                "dif_type",
                "dif_is_head_of_md",
                "dif_pi_format"
            ]
        );
        assert_eq!(c["params"]["uuid"], "7e5a0000-e5a0-4e5a-8e5a-000000000001");
        assert_eq!(c["params"]["num_blocks"], 65536);
        assert_eq!(m.driver_specific(), serde_json::json!({}));
        assert_eq!(m.product_name(), "Malloc disk");
    }
}
