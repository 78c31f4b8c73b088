//! File or block-device bdev (SPDK `bdev_aio`), io_uring with a thread-pool fallback.
//!
//! An [`AioBdev`] serves a regular file or a block device. Two engines, both always compiled:
//!
//! * **io_uring** (the default when the kernel allows it, probed at runtime). One ring per
//!   bdev with the file registered, shared by all threads: submitters push SQEs under a short
//!   mutex that also guards a slab of pending requests keyed by `user_data`, and a completion
//!   thread waits for CQEs and completes each request (details in the private `uring`
//!   module). On a thread running [`crate::reactor::block_on`] (or whose event loop serves
//!   the thread's ring, [`crate::reactor::attach`]), requests go to that thread's own ring
//!   instead, with the file registered there on first use, and the reactor submits and
//!   reaps them inline. Either
//!   way the slab entry owns the I/O buffer until its CQE arrives, so a dropped future never
//!   frees memory the kernel is still using. Short transfers are continued, and a read past
//!   the end of a shrunken file reads zeroes.
//! * **thread pool**: blocking `pread`/`pwrite` on a small shared pool of threads that reply
//!   over a `oneshot` (used when io_uring is unavailable, or on request).
//!
//! A write to a file opened through the page cache (`direct_io: false`, or the fallback
//! below) issued on a reactor thread with the ring engine is a plain `pwrite` there, as
//! SPDK's libaio `io_submit` does it for such a file on an SPDK thread: it copies into the
//! page cache and returns. Through the ring, a file system without asynchronous buffered
//! writes (ext4) hands every such write to an io_uring worker thread, a wake-up and two
//! context switches per write, which measured 1.5-2.5x slower (`bench --target aio:FILE
//! --engine uring --rw randwrite`, page cache, on ext4). Like SPDK's, such a write can block
//! its reactor while the kernel throttles dirty pages. Other threads (an async runtime's
//! workers, which must not block) keep the ring for these writes too, and reads stay on the
//! ring everywhere (a page-cache read completes inline there, a miss asynchronously).
//!
//! Flush is `fdatasync`: `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC` on the ring, a plain
//! `fdatasync` on the thread-pool engine. `fallocate` always runs on the thread pool.
//!
//! Unmap and write_zeroes: on a writable regular file, creation probes whether the file system
//! punches holes (a `PUNCH_HOLE | KEEP_SIZE` past the end of the file, which changes nothing).
//! Where it does, unmap punches a hole and write_zeroes uses `ZERO_RANGE` (else a punch), both
//! are supported whatever the `fallocate` option says, and [`BlockDevice::unmap_zeroes`] is
//! true: a punched hole reads back zeroes. Otherwise they are supported only with the
//! `fallocate` option, as in SPDK (falling back to written zeroes where the file system lacks
//! the mode; [`crate::Descriptor::write_zeroes`] emulates write_zeroes without it), and
//! `unmap_zeroes` is false (block devices included: discard does not promise zeroes).
//!
//! Exclusive open: the file is locked with an open-file-description lock (`F_OFD_SETLK`,
//! a write lock, or a read lock for a read-only bdev) for the bdev's lifetime, and one process
//! never opens the same file (device and inode) twice unless both opens are read-only. A
//! second open fails with EBUSY naming the holder: the other bdev in this process, or "another
//! process". So a store can be loaded by one target at a time.
//!
//! O_DIRECT by default, as SPDK's aio bdev: the file is opened with `O_DIRECT` unless the
//! options ask for the page cache (`bdev_aio_create`'s `"direct_io": false`, our extension:
//! SPDK's RPC has no such parameter and its client never sends it; `write_config` writes it
//! only when it is false). Where the file system refuses `O_DIRECT` (open fails with
//! EINVAL), or reports (`statx` `STATX_DIOALIGN`) a direct-I/O offset unit larger than the
//! block size, the bdev falls back to buffered I/O with an info log line, and
//! `driver_specific.aio.direct_io` (ours; SPDK has no buffered mode) says which mode is in
//! use. With `O_DIRECT`, the kernel takes only 4096-byte aligned buffers (or the file
//! system's larger memory alignment): [`BlockDevice::buf_align`] says so, consumers allocate
//! with it, and a request with any other buffer goes through an aligned bounce buffer.
//! The block size is the given one, or the logical block size of a block device
//! (`BLKSSZGET`), or 512 for a regular file.
//!
//! Product name `"AIO disk"`, module `"aio"`; `driver_specific` and `write_config` follow
//! SPDK's `bdev_aio` (`{"aio": {...}}` and `bdev_aio_create`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use futures::channel::oneshot;
use io_uring::IoUring;
use iobuf::IoBuf;

use super::uring::{FileRef, FixedFiles, Ring, UringEngine, MAX_IOVS};
use uuid::Uuid;

use crate::{BdevError, BlockDevice, IoFuture, IoType, Result};

/// Which engine serves the I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AioEngine {
    /// io_uring when the kernel allows it, else the thread pool.
    #[default]
    Auto,
    /// io_uring only (error if unavailable).
    Uring,
    /// Blocking pread/pwrite on a small thread pool.
    ThreadPool,
}

/// Options of an aio bdev (the `bdev_aio_create` parameters plus ours). The default opens
/// the file with O_DIRECT, as SPDK's aio bdev does.
#[derive(Clone, Debug)]
pub struct AioOpts {
    /// Bdev name.
    pub name: String,
    /// File or block device path.
    pub filename: PathBuf,
    /// Block size; `None` = auto-detect (logical block size of a block device, 512 for a file).
    pub block_len: Option<u32>,
    /// Open read-only.
    pub readonly: bool,
    /// Use fallocate for unmap and write_zeroes.
    pub fallocate: bool,
    /// RWF_NOWAIT (accepted, recorded in the config).
    pub nowait: bool,
    /// Fixed UUID (else random).
    pub uuid: Option<Uuid>,
    /// Open with O_DIRECT (the default). Where the file system refuses O_DIRECT, or needs
    /// a larger direct-I/O alignment than the block size, the file is opened buffered
    /// instead, with a log line; [`AioBdev::is_direct`] and `driver_specific` say which.
    /// `false` asks for the page cache.
    pub direct: bool,
    /// Engine choice.
    pub engine: AioEngine,
}

impl Default for AioOpts {
    fn default() -> Self {
        AioOpts {
            name: String::new(),
            filename: PathBuf::new(),
            block_len: None,
            readonly: false,
            fallocate: false,
            nowait: false,
            uuid: None,
            direct: true,
            engine: AioEngine::Auto,
        }
    }
}

/// Alignment of buffers (and of the file offsets) with O_DIRECT.
const DIRECT_ALIGN: usize = 4096;
/// Submission queue size of each ring.
const RING_ENTRIES: u32 = 256;
/// Threads of the blocking pool.
const POOL_THREADS: usize = 4;

// ioctl numbers from <linux/fs.h>.
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn os_err(errno: i32) -> BdevError {
    BdevError::Io(io::Error::from_raw_os_error(errno))
}

/// Who holds a file in this process: the first bdev's name, whether it writes, and how many
/// (read-only) bdevs share it.
struct Holder {
    name: String,
    write: bool,
    count: usize,
}

type OpenFiles = std::sync::Mutex<std::collections::HashMap<(u64, u64), Holder>>;

/// Files open by aio bdevs of this process, by (device, inode).
fn open_files() -> &'static OpenFiles {
    static OPEN: OnceLock<OpenFiles> = OnceLock::new();
    OPEN.get_or_init(Default::default)
}

/// An exclusive (or, read-only, shared) hold on a file: an OFD lock plus the in-process
/// table entry. Released on drop.
struct FileLock {
    key: (u64, u64),
    file: Arc<File>,
}

impl FileLock {
    fn take(name: &str, path: &std::path::Path, file: &Arc<File>, write: bool) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let md = file.metadata()?;
        let key = (md.dev(), md.ino());
        {
            let mut open = open_files().lock().unwrap_or_else(|e| e.into_inner());
            if let Some(h) = open.get(&key) {
                if write || h.write {
                    return Err(BdevError::Busy(format!(
                        "{name} (its file {} is already open as aio bdev {})",
                        path.display(),
                        h.name
                    )));
                }
            }
            ofd_lock_patiently(file, write).map_err(|e| {
                if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
                    BdevError::Busy(format!(
                        "{name} (its file {} is locked by another process)",
                        path.display()
                    ))
                } else {
                    BdevError::Io(e)
                }
            })?;
            // Several read-only holders share the entry; the first one names it.
            open.entry(key)
                .or_insert_with(|| Holder {
                    name: name.to_string(),
                    write,
                    count: 0,
                })
                .count += 1;
        }
        Ok(FileLock {
            key,
            file: file.clone(),
        })
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let mut open = open_files().lock().unwrap_or_else(|e| e.into_inner());
        // Other read-only holders keep their own OFD read locks; the entry goes with the last.
        if let Some(h) = open.get_mut(&self.key) {
            h.count -= 1;
            if h.count == 0 {
                open.remove(&self.key);
            }
        }
        let _ = ofd_unlock(&self.file);
    }
}

fn ofd_lock_op(file: &File, typ: libc::c_short) -> io::Result<()> {
    // SAFETY: an all-zero flock is a valid value; the fields we need are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // the whole file
                  // SAFETY: F_OFD_SETLK reads the flock through the pointer, which is valid for the call.
    let r = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_OFD_SETLK,
            &fl as *const libc::flock,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes the OFD lock: a write lock for a writable bdev, a read lock for a read-only one.
fn ofd_lock(file: &File, write: bool) -> io::Result<()> {
    let typ = if write { libc::F_WRLCK } else { libc::F_RDLCK };
    ofd_lock_op(file, typ as libc::c_short)
}

/// [`ofd_lock`], retried for up to about 1.3 s while another holder has the lock: a process
/// that just exited may still pin the file for a moment (its io_uring is torn down
/// asynchronously by the kernel, and the ring holds the file open until then).
fn ofd_lock_patiently(file: &File, write: bool) -> io::Result<()> {
    let mut wait = std::time::Duration::from_millis(10);
    for _ in 0..7 {
        match ofd_lock(file, write) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                std::thread::sleep(wait);
                wait *= 2;
            }
            other => return other,
        }
    }
    ofd_lock(file, write)
}

fn ofd_unlock(file: &File) -> io::Result<()> {
    ofd_lock_op(file, libc::F_UNLCK as libc::c_short)
}

/// Whether the file system punches holes in this (writable, regular) file: a punch past its
/// end, which changes neither its bytes nor its size.
fn probe_punch(file: &File, size: u64, block_len: u32) -> bool {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    fallocate(file, mode, size, u64::from(block_len)).is_ok()
}

/// The shared blocking pool used by the thread-pool engine, flush and fallocate.
fn blocking_pool() -> Option<&'static futures::executor::ThreadPool> {
    static POOL: OnceLock<Option<futures::executor::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        futures::executor::ThreadPool::builder()
            .pool_size(POOL_THREADS)
            .name_prefix("bdev-aio-")
            .create()
            .map_err(|e| tracing::error!(target: "bdev", "cannot start aio pool: {e}"))
            .ok()
    })
    .as_ref()
}

/// Runs a blocking closure on the pool and awaits its result.
async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let (tx, rx) = oneshot::channel();
    let job = async move {
        let _ = tx.send(f());
    };
    match blocking_pool() {
        Some(p) => p.spawn_ok(job),
        None => {
            std::thread::spawn(move || futures::executor::block_on(job));
        }
    }
    rx.await.map_err(|_| os_err(libc::EIO))
}

fn pread_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                // Past the end of a file that shrank: reads as zeroes.
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate only reads its integer arguments; the fd is open for the call.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes zeroes with plain writes (aligned for O_DIRECT).
fn write_zeroes_slow(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let chunk = (1u64 << 20).min(len) as usize;
    let zero = IoBuf::new(chunk, DIRECT_ALIGN);
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk as u64) as usize;
        file.write_all_at(&zero[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// The file's direct-I/O alignment (memory, file offset) from `statx(STATX_DIOALIGN)`,
/// where the kernel and the file system report it.
fn dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: an all-zero statx is a valid value for the kernel to fill.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is an empty C string and AT_EMPTY_PATH makes statx use the fd; `st`
    // is valid for writes for the call.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if r != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 || st.stx_dio_offset_align == 0 {
        return None;
    }
    Some((st.stx_dio_mem_align, st.stx_dio_offset_align))
}

/// Size in bytes and logical block size (for block devices) of an open file.
fn probe_size(file: &File) -> io::Result<(u64, Option<u32>)> {
    let md = file.metadata()?;
    if md.file_type().is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ssz: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which is valid.
        let r = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                BLKSSZGET as _,
                &mut ssz as *mut libc::c_int,
            )
        };
        let lbs = if r == 0 && ssz > 0 {
            Some(ssz as u32)
        } else {
            None
        };
        Ok((size, lbs))
    } else {
        Ok((md.len(), None))
    }
}

enum Engine {
    Uring(UringEngine),
    Pool,
}

impl Engine {
    /// The ring serving a request from this thread: the reactor's when one runs here (the
    /// file registered with it on first use), else the bdev's own ring; with the file
    /// reference valid on that ring.
    fn ring(&self, file: &Arc<File>, fixed: &FixedFiles) -> Option<(Arc<Ring>, FileRef)> {
        match self {
            Engine::Uring(u) => Some(match crate::reactor::current_ring() {
                Some(r) => {
                    let f = fixed.file_ref(&r, file);
                    (r, f)
                }
                None => (u.ring.clone(), u.file.clone()),
            }),
            Engine::Pool => None,
        }
    }
}

/// A bdev over a file or block device. Product name `"AIO disk"`.
pub struct AioBdev {
    name: String,
    filename: PathBuf,
    uuid: Uuid,
    block_len: u32,
    block_size_override: bool,
    readonly: bool,
    fallocate: bool,
    nowait: bool,
    /// The file is open with O_DIRECT.
    direct: bool,
    /// The options asked for the page cache (`direct_io: false`): kept for `write_config`.
    buffered_requested: bool,
    /// Buffer alignment under O_DIRECT.
    mem_align: usize,
    num_blocks: AtomicU64,
    file: Arc<File>,
    engine: Engine,
    /// The file's registrations with reactor rings.
    fixed: FixedFiles,
    /// The file system punches holes in the file (a regular, writable file).
    punch: bool,
    /// `ZERO_RANGE` has not been refused yet.
    zero_range: std::sync::atomic::AtomicBool,
    /// The exclusive hold on the file, released by `destruct` (or on drop).
    lock: std::sync::Mutex<Option<FileLock>>,
}

impl std::fmt::Debug for AioBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AioBdev")
            .field("name", &self.name)
            .field("filename", &self.filename)
            .field("engine", &self.engine())
            .finish()
    }
}

/// Whether io_uring can be used on this machine (a ring can be set up and the basic opcodes
/// are supported).
pub fn uring_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let Ok(ring) = IoUring::new(4) else {
            return false;
        };
        super::uring::probe(&ring).is_ok()
    })
}

impl AioBdev {
    /// Opens the file and creates (does not register) the bdev.
    pub fn create(opts: AioOpts) -> Result<Arc<Self>> {
        if opts.name.is_empty() {
            return Err(BdevError::InvalidArgument("empty bdev name".into()));
        }
        if let Some(bl) = opts.block_len {
            if bl < 512 || !bl.is_multiple_of(512) {
                return Err(BdevError::InvalidArgument(format!(
                    "block size {bl} is not a multiple of 512"
                )));
            }
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.readonly);
        let mut direct = opts.direct;
        let file = if direct {
            let mut od = oo.clone();
            od.custom_flags(libc::O_DIRECT);
            match od.open(&opts.filename) {
                Ok(f) => f,
                // EINVAL is how open(2) says the file system does not do O_DIRECT.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(target: "bdev", name = %opts.name,
                        "{}: the file system refuses O_DIRECT; using buffered I/O",
                        opts.filename.display());
                    direct = false;
                    oo.open(&opts.filename)?
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            oo.open(&opts.filename)?
        };
        let mut file = Arc::new(file);
        let lock = FileLock::take(&opts.name, &opts.filename, &file, !opts.readonly)?;
        let (size, lbs) = probe_size(&file)?;
        let block_len = match (opts.block_len, lbs) {
            (Some(bl), Some(dev)) if bl < dev => {
                return Err(BdevError::InvalidArgument(format!(
                    "block size {bl} is smaller than the device's logical block size {dev}"
                )))
            }
            (Some(bl), _) => bl,
            (None, Some(dev)) => dev,
            (None, None) => 512,
        };
        let num_blocks = size / block_len as u64;
        if num_blocks == 0 {
            return Err(BdevError::InvalidArgument(format!(
                "{} is smaller than one block",
                opts.filename.display()
            )));
        }
        let mut mem_align = DIRECT_ALIGN;
        if direct {
            // A block smaller than the file system's direct-I/O unit would fail every
            // unaligned request: serve such a file through the page cache instead.
            let (mem, off) = dio_align(&file).unwrap_or((0, 0));
            if off > block_len {
                tracing::info!(target: "bdev", name = %opts.name,
                    "{}: direct I/O needs {off}-byte units, the block size is {block_len}; \
                     using buffered I/O", opts.filename.display());
                direct = false;
                file = Arc::new(oo.open(&opts.filename)?);
            } else {
                mem_align = mem_align.max(mem as usize);
            }
        }
        if direct {
            tracing::debug!(target: "bdev", name = %opts.name, "O_DIRECT");
        }
        let engine = match opts.engine {
            AioEngine::ThreadPool => Engine::Pool,
            AioEngine::Uring => Engine::Uring(UringEngine::new(&file, RING_ENTRIES)?),
            AioEngine::Auto => match UringEngine::new(&file, RING_ENTRIES) {
                Ok(u) => Engine::Uring(u),
                Err(e) => {
                    tracing::info!(target: "bdev", "io_uring unavailable ({e}), using the thread pool");
                    Engine::Pool
                }
            },
        };
        let regular = file.metadata()?.file_type().is_file();
        let punch = regular && !opts.readonly && probe_punch(&file, size, block_len);
        tracing::debug!(target: "bdev", name = %opts.name, block_len, num_blocks, punch, "aio bdev created");
        Ok(Arc::new(AioBdev {
            name: opts.name,
            filename: opts.filename,
            uuid: opts.uuid.unwrap_or_else(Uuid::new_v4),
            block_len,
            block_size_override: opts.block_len.is_some(),
            readonly: opts.readonly,
            fallocate: opts.fallocate,
            nowait: opts.nowait,
            direct,
            buffered_requested: !opts.direct,
            mem_align,
            num_blocks: AtomicU64::new(num_blocks),
            file,
            engine,
            fixed: FixedFiles::new(),
            punch,
            zero_range: std::sync::atomic::AtomicBool::new(true),
            lock: std::sync::Mutex::new(Some(lock)),
        }))
    }

    /// The engine actually in use.
    pub fn engine(&self) -> AioEngine {
        match self.engine {
            Engine::Uring(_) => AioEngine::Uring,
            Engine::Pool => AioEngine::ThreadPool,
        }
    }

    /// Whether the file was opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Re-reads the file size (SPDK `bdev_aio_rescan`); returns the new size in blocks.
    /// The caller then calls `Registry::notify_resize`.
    pub fn rescan(&self) -> Result<u64> {
        let (size, _) = probe_size(&self.file)?;
        let n = size / self.block_len as u64;
        self.num_blocks.store(n, Ordering::Release);
        Ok(n)
    }

    fn byte_off(&self, offset_blocks: u64) -> Result<u64> {
        offset_blocks
            .checked_mul(self.block_len as u64)
            .ok_or_else(|| BdevError::InvalidArgument("offset overflows".into()))
    }

    /// One read or write of a whole buffer (bounced when O_DIRECT cannot take it).
    async fn request(&self, write: bool, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        let off = self.byte_off(offset_blocks)?;
        if self.misaligned(&buf) {
            return Box::pin(self.bounce(write, off, buf)).await;
        }
        self.rw(write, off, buf).await
    }

    /// Whether `buf` cannot go to the kernel as is: under O_DIRECT its start must be aligned.
    fn misaligned(&self, buf: &IoBuf) -> bool {
        self.direct && !(buf.as_ptr() as usize).is_multiple_of(self.mem_align)
    }

    /// Whether a write goes to the page cache on this thread (see the module docs).
    fn writes_inline(&self) -> bool {
        !self.direct && matches!(self.engine, Engine::Uring(_)) && crate::reactor::on_reactor()
    }

    /// One read or write on the engine in use (`buf` suitable for the file's mode).
    async fn rw(&self, write: bool, off: u64, buf: IoBuf) -> Result<IoBuf> {
        if write && self.writes_inline() {
            return self.write_inline(off, [buf]).map(|[b]| b);
        }
        match (self.engine.ring(&self.file, &self.fixed), write) {
            (Some((r, f)), _) => r.rw(&f, write, off, buf, 0).await,
            (None, false) => self.pool_read(off, buf).await,
            (None, true) => self.pool_write(off, buf).await,
        }
    }

    /// A request whose buffer O_DIRECT cannot take, through an aligned bounce buffer (the
    /// caller ignored `buf_align`; correct, not fast).
    async fn bounce(&self, write: bool, off: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let b = if write {
            IoBuf::from_slice(&buf, self.mem_align)
        } else {
            IoBuf::new(buf.len(), self.mem_align)
        };
        let b = self.rw(write, off, b).await?;
        if !write {
            buf.copy_from_slice(&b);
        }
        Ok(buf)
    }

    /// [`AioBdev::bounce`] for vectored requests: one contiguous aligned buffer.
    async fn bounce_v(&self, write: bool, off: u64, mut bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut b = IoBuf::new(total, self.mem_align);
        if write {
            let mut at = 0;
            for x in &bufs {
                b[at..at + x.len()].copy_from_slice(x);
                at += x.len();
            }
        }
        let b = self.rw(write, off, b).await?;
        if !write {
            let mut at = 0;
            for x in bufs.iter_mut() {
                let n = x.len();
                x.copy_from_slice(&b[at..at + n]);
                at += n;
            }
        }
        Ok(bufs)
    }

    /// A page-cache write on the calling reactor (see the module docs): `bufs` one after
    /// the other from byte `off`, returned when all are in the page cache.
    fn write_inline<B: AsRef<[IoBuf]>>(&self, off: u64, bufs: B) -> Result<B> {
        let mut pos = off;
        for b in bufs.as_ref() {
            self.file.write_all_at(b, pos).map_err(BdevError::Io)?;
            pos += b.len() as u64;
        }
        Ok(bufs)
    }

    async fn pool_read(&self, off: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let file = self.file.clone();
        run_blocking(move || pread_full(&file, &mut buf, off).map(|_| buf))
            .await?
            .map_err(BdevError::Io)
    }

    async fn pool_write(&self, off: u64, buf: IoBuf) -> Result<IoBuf> {
        let file = self.file.clone();
        run_blocking(move || file.write_all_at(&buf, off).map(|_| buf))
            .await?
            .map_err(BdevError::Io)
    }
}

#[async_trait]
impl BlockDevice for AioBdev {
    crate::device_facts!(product: "AIO disk", module: "aio");
    fn buf_align(&self) -> usize {
        if self.direct {
            self.mem_align
        } else {
            1
        }
    }
    fn io_type_supported(&self, io_type: IoType) -> bool {
        match io_type {
            IoType::Read | IoType::Write | IoType::Flush | IoType::Reset => true,
            IoType::Unmap | IoType::WriteZeroes => !self.readonly && (self.fallocate || self.punch),
            IoType::SeekHole | IoType::SeekData => false,
        }
    }
    async fn read(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        self.request(false, offset_blocks, buf).await
    }
    async fn write(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        self.request(true, offset_blocks, buf).await
    }
    fn read_io(&self, offset_blocks: u64, buf: IoBuf) -> IoFuture<'_, Result<IoBuf>> {
        IoFuture::new(self.request(false, offset_blocks, buf))
    }
    fn write_io(&self, offset_blocks: u64, buf: IoBuf) -> IoFuture<'_, Result<IoBuf>> {
        IoFuture::new(self.request(true, offset_blocks, buf))
    }
    async fn readv(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        let off = self.byte_off(offset_blocks)?;
        if bufs.iter().any(|b| self.misaligned(b)) {
            return self.bounce_v(false, off, bufs).await;
        }
        match self.engine.ring(&self.file, &self.fixed) {
            Some((r, f)) if bufs.len() <= MAX_IOVS => r.rwv(&f, false, off, bufs).await,
            _ => {
                let file = self.file.clone();
                run_blocking(move || {
                    let mut pos = off;
                    let mut bufs = bufs;
                    for b in bufs.iter_mut() {
                        pread_full(&file, b, pos)?;
                        pos += b.len() as u64;
                    }
                    Ok(bufs)
                })
                .await?
                .map_err(BdevError::Io)
            }
        }
    }
    async fn writev(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        let off = self.byte_off(offset_blocks)?;
        if bufs.iter().any(|b| self.misaligned(b)) {
            return self.bounce_v(true, off, bufs).await;
        }
        if self.writes_inline() {
            return self.write_inline(off, bufs);
        }
        match self.engine.ring(&self.file, &self.fixed) {
            Some((r, f)) if bufs.len() <= MAX_IOVS => r.rwv(&f, true, off, bufs).await,
            _ => {
                let file = self.file.clone();
                run_blocking(move || {
                    let mut pos = off;
                    for b in bufs.iter() {
                        file.write_all_at(b, pos)?;
                        pos += b.len() as u64;
                    }
                    Ok(bufs)
                })
                .await?
                .map_err(BdevError::Io)
            }
        }
    }
    async fn flush(&self) -> Result<()> {
        if let Some((r, f)) = self.engine.ring(&self.file, &self.fixed) {
            return r.fdatasync(&f).await;
        }
        let file = self.file.clone();
        run_blocking(move || file.sync_data())
            .await?
            .map_err(BdevError::Io)
    }
    fn unmap_zeroes(&self) -> bool {
        // A hole punched in a regular file reads back zeroes.
        self.punch
    }
    async fn unmap(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
        if !self.io_type_supported(IoType::Unmap) {
            return Err(BdevError::NotSupported(IoType::Unmap));
        }
        let off = self.byte_off(offset_blocks)?;
        let len = self.byte_off(num_blocks)?;
        let file = self.file.clone();
        run_blocking(move || {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            match fallocate(&file, mode, off, len) {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    write_zeroes_slow(&file, off, len)
                }
                r => r,
            }
        })
        .await?
        .map_err(BdevError::Io)
    }
    async fn write_zeroes(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
        if !self.io_type_supported(IoType::WriteZeroes) {
            return Err(BdevError::NotSupported(IoType::WriteZeroes));
        }
        let off = self.byte_off(offset_blocks)?;
        let len = self.byte_off(num_blocks)?;
        let file = self.file.clone();
        let try_zero_range = self.zero_range.load(Ordering::Relaxed);
        let punch = self.punch;
        let zero_range_ok = run_blocking(move || {
            let unsupported = |e: &io::Error| e.raw_os_error() == Some(libc::EOPNOTSUPP);
            if try_zero_range {
                let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
                match fallocate(&file, mode, off, len) {
                    Err(e) if unsupported(&e) => {}
                    r => return r.map(|_| true),
                }
            }
            if punch {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                match fallocate(&file, mode, off, len) {
                    Err(e) if unsupported(&e) => {}
                    r => return r.map(|_| false),
                }
            }
            write_zeroes_slow(&file, off, len).map(|_| false)
        })
        .await?
        .map_err(BdevError::Io)?;
        if try_zero_range && !zero_range_ok {
            // The file system refused ZERO_RANGE: do not ask again.
            self.zero_range.store(false, Ordering::Relaxed);
        }
        Ok(())
    }
    fn copy_source(&self) -> Option<super::copy::CopySource> {
        Some(super::copy::CopySource::new(
            self.file.clone(),
            self.block_len,
        ))
    }
    fn can_copy_from(&self, src: &super::copy::CopySource) -> bool {
        !self.readonly && super::copy::can_copy(&self.file, src)
    }
    async fn copy_from(
        &self,
        src: &super::copy::CopySource,
        src_off: u64,
        off: u64,
        n: u64,
    ) -> Result<()> {
        let (dst_off, len) = (self.byte_off(off)?, self.byte_off(n)?);
        if self.readonly {
            return Err(os_err(libc::EPERM));
        }
        super::copy::copy_into(&self.file, self.direct, src, src_off, dst_off, len).await
    }
    async fn destruct(&self) {
        // Unregistered and closed: the file may be opened again.
        self.lock.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
    fn driver_specific(&self) -> serde_json::Value {
        serde_json::json!({
            "aio": {
                "filename": self.filename.to_string_lossy(),
                "block_size_override": self.block_size_override,
                "readonly": self.readonly,
                "fallocate": self.fallocate,
                "nowait": self.nowait,
                // Ours: whether the file is open with O_DIRECT (SPDK's always is).
                "direct_io": self.direct,
            }
        })
    }
    fn write_config(&self) -> Option<serde_json::Value> {
        let mut params = serde_json::Map::new();
        params.insert("name".into(), self.name.clone().into());
        if self.block_size_override {
            params.insert("block_size".into(), self.block_len.into());
        }
        params.insert(
            "filename".into(),
            self.filename.to_string_lossy().into_owned().into(),
        );
        params.insert("readonly".into(), self.readonly.into());
        params.insert("fallocate".into(), self.fallocate.into());
        params.insert("uuid".into(), self.uuid.hyphenated().to_string().into());
        params.insert("nowait".into(), self.nowait.into());
        // Ours, only when asked for (SPDK's `bdev_aio_create` would refuse the key): a config
        // of an O_DIRECT bdev stays loadable by SPDK.
        if self.buffered_requested {
            params.insert("direct_io".into(), false.into());
        }
        Some(serde_json::json!({"method": "bdev_aio_create", "params": params}))
    }
}
