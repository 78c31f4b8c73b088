//! File or block-device bdev (SPDK `bdev_aio`), io_uring with a thread-pool fallback.
//!
//! An [`AioBdev`] serves a regular file or a block device. Two engines, both always compiled:
//!
//! * **io_uring** (the default when the kernel allows it, probed at runtime). One ring per
//!   bdev with the file registered. A submitter pushes its SQE under a short mutex, which also
//!   guards a slab of pending requests keyed by the SQE's `user_data`, then calls
//!   `io_uring_enter` to submit. A dedicated completion thread waits in `io_uring_enter`
//!   (`GETEVENTS`), drains the completion queue and completes each request over a `oneshot`.
//!   The slab entry owns the I/O buffer until its CQE arrives, so a dropped future never frees
//!   memory the kernel is still using. Short transfers are continued, and a read past the end
//!   of a shrunken file reads zeroes.
//! * **thread pool**: blocking `pread`/`pwrite` on a small shared pool of threads that reply
//!   over a `oneshot` (used when io_uring is unavailable, or on request).
//!
//! Flush (`fdatasync`) and `fallocate` always run on the thread pool. With `fallocate`
//! enabled, unmap punches a hole (`PUNCH_HOLE | KEEP_SIZE`) and write_zeroes uses
//! `ZERO_RANGE` (falling back to writing zeroes where the file system lacks it); without it,
//! unmap and write_zeroes are unsupported, as in SPDK ([`crate::Descriptor::write_zeroes`]
//! emulates the latter with writes).
//!
//! With `O_DIRECT`, buffers must be 4096-byte aligned ([`BlockDevice::buf_align`] says so).
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use async_trait::async_trait;
use futures::channel::oneshot;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use iobuf::IoBuf;
use slab::Slab;
use uuid::Uuid;

use crate::{BdevError, BlockDevice, IoType, Result};

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

/// Options of an aio bdev (the `bdev_aio_create` parameters plus ours).
#[derive(Clone, Debug, Default)]
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
    /// Open with O_DIRECT.
    pub direct: bool,
    /// Engine choice.
    pub engine: AioEngine,
}

/// Alignment of buffers (and of the file offsets) with O_DIRECT.
const DIRECT_ALIGN: usize = 4096;
/// Submission queue size of each ring.
const RING_ENTRIES: u32 = 256;
/// `user_data` of the NOP that tells the completion thread to stop.
const EXIT_KEY: u64 = u64::MAX;
/// Largest iovec count of one vectored request.
const MAX_IOVS: usize = 1024;
/// Threads of the blocking pool.
const POOL_THREADS: usize = 4;

// ioctl numbers from <linux/fs.h>.
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn os_err(errno: i32) -> BdevError {
    BdevError::Io(io::Error::from_raw_os_error(errno))
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

/// What a pending request keeps alive until its completion arrives.
enum Hold {
    Buf(IoBuf),
    /// The iovecs are only read by the kernel.
    Bufs(Vec<IoBuf>, #[allow(dead_code)] IoVecs),
}

/// An iovec array pointing into the buffers held next to it.
struct IoVecs(#[allow(dead_code)] Box<[libc::iovec]>);

// SAFETY: the iovecs only point into `IoBuf`s owned by the same `Hold`, which moves with them;
// nothing dereferences them except the kernel while the request is in flight.
unsafe impl Send for IoVecs {}

struct Pending {
    hold: Hold,
    tx: oneshot::Sender<(i32, Hold)>,
}

struct UringState {
    pending: Slab<Pending>,
}

struct UringShared {
    ring: IoUring,
    state: Mutex<UringState>,
    /// A submitter has promised to submit what is queued (see `submit`).
    flush_armed: AtomicBool,
    /// Batch submissions (off with `BDEV_URING_NOBATCH`, for comparisons).
    batch: bool,
    fixed: bool,
    fd: i32,
}

impl UringShared {
    /// Queues one SQE (with `user_data` set) and submits it; the caller holds `st`.
    fn push_locked(&self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the submission queue is only ever accessed under the `state` mutex,
            // which the caller holds, and `sqe` points at memory owned by the pending slab.
            let pushed = unsafe { self.ring.submission_shared().push(sqe).is_ok() };
            if pushed {
                return Ok(());
            }
            // Queue full: hand what is queued to the kernel and retry.
            match self.ring.submitter().submit() {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
                    ) =>
                {
                    std::thread::yield_now()
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues a request. The first submitter of an executor pass yields once so that the
    /// other tasks woken in the same pass queue theirs, then submits them all with one
    /// `io_uring_enter` (fio submits in batches too). The completion thread's own
    /// `io_uring_enter` also submits anything queued, as a backstop.
    async fn submit(
        &self,
        sqe: squeue::Entry,
        hold: Hold,
    ) -> Result<oneshot::Receiver<(i32, Hold)>> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = lock(&self.state);
            let key = st.pending.insert(Pending { hold, tx });
            let sqe = sqe.user_data(key as u64);
            if let Err(e) = self.push_locked(&sqe) {
                st.pending.remove(key);
                return Err(BdevError::Io(e));
            }
        }
        if self.batch {
            if !self.flush_armed.swap(true, Ordering::SeqCst) {
                let _flush = FlushOnDrop(self);
                YieldOnce(false).await;
            }
        } else {
            self.flush();
        }
        Ok(rx)
    }

    /// Submits every queued SQE.
    fn flush(&self) {
        // Entries that cannot be submitted now stay queued; the completion thread submits
        // them on its next io_uring_enter.
        if let Err(e) = self.ring.submitter().submit() {
            tracing::trace!(target: "uring", "submit deferred: {e}");
        }
    }

    fn target_read(&self, ptr: *mut u8, len: u32, off: u64) -> squeue::Entry {
        if self.fixed {
            opcode::Read::new(types::Fixed(0), ptr, len)
                .offset(off)
                .build()
        } else {
            opcode::Read::new(types::Fd(self.fd), ptr, len)
                .offset(off)
                .build()
        }
    }

    fn target_write(&self, ptr: *const u8, len: u32, off: u64) -> squeue::Entry {
        if self.fixed {
            opcode::Write::new(types::Fixed(0), ptr, len)
                .offset(off)
                .build()
        } else {
            opcode::Write::new(types::Fd(self.fd), ptr, len)
                .offset(off)
                .build()
        }
    }

    fn target_readv(&self, iov: *const libc::iovec, n: u32, off: u64) -> squeue::Entry {
        if self.fixed {
            opcode::Readv::new(types::Fixed(0), iov, n)
                .offset(off)
                .build()
        } else {
            opcode::Readv::new(types::Fd(self.fd), iov, n)
                .offset(off)
                .build()
        }
    }

    fn target_writev(&self, iov: *const libc::iovec, n: u32, off: u64) -> squeue::Entry {
        if self.fixed {
            opcode::Writev::new(types::Fixed(0), iov, n)
                .offset(off)
                .build()
        } else {
            opcode::Writev::new(types::Fd(self.fd), iov, n)
                .offset(off)
                .build()
        }
    }
}

/// Disarms the batch flag and submits, also when the submitting future is dropped mid-yield.
struct FlushOnDrop<'a>(&'a UringShared);

impl Drop for FlushOnDrop<'_> {
    fn drop(&mut self) {
        // The swap (not a plain store) synchronises with every submitter that saw the flag
        // set, so their queued entries are visible to the submit below.
        self.0.flush_armed.swap(false, Ordering::SeqCst);
        self.0.flush();
    }
}

/// Returns `Pending` once (waking itself), then `Ready`.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// The completion thread: waits for CQEs and completes the pending requests.
fn reap(shared: Arc<UringShared>) {
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(RING_ENTRIES as usize * 2);
    let mut ready: Vec<(Pending, i32)> = Vec::with_capacity(RING_ENTRIES as usize * 2);
    let mut exiting = false;
    loop {
        if let Err(e) = shared.ring.submitter().submit_and_wait(1) {
            if !matches!(
                e.raw_os_error(),
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
            ) {
                tracing::error!(target: "uring", "io_uring_enter failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        // SAFETY: only this thread touches the completion queue.
        unsafe {
            for cqe in shared.ring.completion_shared() {
                cqes.push((cqe.user_data(), cqe.result()));
            }
        }
        let empty = {
            let mut st = lock(&shared.state);
            for (ud, res) in cqes.drain(..) {
                if ud == EXIT_KEY {
                    exiting = true;
                } else if let Some(p) = st.pending.try_remove(ud as usize) {
                    ready.push((p, res));
                }
            }
            st.pending.is_empty()
        };
        for (p, res) in ready.drain(..) {
            // The receiver may be gone (future dropped); the buffer is freed here, after the
            // kernel is done with it.
            let _ = p.tx.send((res, p.hold));
        }
        if exiting && empty {
            return;
        }
    }
}

struct UringEngine {
    shared: Arc<UringShared>,
    thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    fn new(file: &File) -> io::Result<Self> {
        // COOP_TASKRUN: completions are not forced onto a submitter that is busy in user
        // space with an interrupt; it runs them at its next syscall (kernel >= 5.19).
        let ring = match std::env::var("BDEV_URING_PLAIN").is_ok() {
            false => IoUring::builder()
                .setup_coop_taskrun()
                .build(RING_ENTRIES)
                .or_else(|_| IoUring::new(RING_ENTRIES))?,
            true => IoUring::new(RING_ENTRIES)?,
        };
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in [
            opcode::Nop::CODE,
            opcode::Read::CODE,
            opcode::Write::CODE,
            opcode::Readv::CODE,
            opcode::Writev::CODE,
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
            }
        }
        let fd = file.as_raw_fd();
        let fixed = ring.submitter().register_files(&[fd]).is_ok();
        let shared = Arc::new(UringShared {
            ring,
            state: Mutex::new(UringState {
                pending: Slab::with_capacity(RING_ENTRIES as usize),
            }),
            fixed,
            fd,
            flush_armed: AtomicBool::new(false),
            batch: std::env::var_os("BDEV_URING_NOBATCH").is_none(),
        });
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bdev-uring".into())
            .spawn(move || reap(s2))?;
        Ok(UringEngine {
            shared,
            thread: Some(thread),
        })
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        let nop = opcode::Nop::new().build().user_data(EXIT_KEY);
        let pushed = {
            let _st = lock(&self.shared.state);
            self.shared.push_locked(&nop)
        };
        if pushed.is_ok() {
            let _ = self.shared.ring.submitter().submit();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        // If the NOP could not be queued the thread is left running (it owns the ring and
        // any buffers still in flight), which is safer than freeing memory under the kernel.
    }
}

enum Engine {
    Uring(UringEngine),
    Pool,
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
    direct: bool,
    num_blocks: AtomicU64,
    file: Arc<File>,
    engine: Engine,
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
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::Read::CODE)
            && probe.is_supported(opcode::Write::CODE)
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
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(&opts.filename)?;
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
        let engine = match opts.engine {
            AioEngine::ThreadPool => Engine::Pool,
            AioEngine::Uring => Engine::Uring(UringEngine::new(&file)?),
            AioEngine::Auto => match UringEngine::new(&file) {
                Ok(u) => Engine::Uring(u),
                Err(e) => {
                    tracing::info!(target: "bdev", "io_uring unavailable ({e}), using the thread pool");
                    Engine::Pool
                }
            },
        };
        tracing::debug!(target: "bdev", name = %opts.name, block_len, num_blocks, "aio bdev created");
        Ok(Arc::new(AioBdev {
            name: opts.name,
            filename: opts.filename,
            uuid: opts.uuid.unwrap_or_else(Uuid::new_v4),
            block_len,
            block_size_override: opts.block_len.is_some(),
            readonly: opts.readonly,
            fallocate: opts.fallocate,
            nowait: opts.nowait,
            direct: opts.direct,
            num_blocks: AtomicU64::new(num_blocks),
            file: Arc::new(file),
            engine,
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

    /// io_uring read or write of `buf[done..]` at `off + done`, continuing short transfers.
    async fn uring_rw(
        &self,
        u: &UringShared,
        write: bool,
        off: u64,
        mut buf: IoBuf,
        mut done: usize,
    ) -> Result<IoBuf> {
        let len = buf.len();
        while done < len {
            let n = (len - done).min(1 << 30) as u32;
            let at = off + done as u64;
            // SAFETY: `done < len`, so the pointer stays inside the buffer's allocation.
            let ptr = unsafe { buf.as_mut_ptr().add(done) };
            let sqe = if write {
                u.target_write(ptr, n, at)
            } else {
                u.target_read(ptr, n, at)
            };
            let rx = u.submit(sqe, Hold::Buf(buf)).await?;
            let (res, hold) = rx.await.map_err(|_| os_err(libc::EIO))?;
            buf = match hold {
                Hold::Buf(b) => b,
                _ => return Err(os_err(libc::EIO)),
            };
            if res < 0 {
                if -res == libc::EINTR || -res == libc::EAGAIN {
                    continue;
                }
                return Err(os_err(-res));
            }
            if res == 0 {
                if write {
                    return Err(os_err(libc::EIO));
                }
                buf[done..].fill(0);
                return Ok(buf);
            }
            done += res as usize;
        }
        Ok(buf)
    }

    async fn uring_rwv(
        &self,
        u: &UringShared,
        write: bool,
        off: u64,
        mut bufs: Vec<IoBuf>,
    ) -> Result<Vec<IoBuf>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let iov: Box<[libc::iovec]> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let (ptr, n) = (iov.as_ptr(), iov.len() as u32);
        let sqe = if write {
            u.target_writev(ptr, n, off)
        } else {
            u.target_readv(ptr, n, off)
        };
        let rx = u.submit(sqe, Hold::Bufs(bufs, IoVecs(iov))).await?;
        let (res, hold) = rx.await.map_err(|_| os_err(libc::EIO))?;
        bufs = match hold {
            Hold::Bufs(b, _) => b,
            _ => return Err(os_err(libc::EIO)),
        };
        if res < 0 && -res != libc::EINTR && -res != libc::EAGAIN {
            return Err(os_err(-res));
        }
        let mut done = res.max(0) as usize;
        if done >= total {
            return Ok(bufs);
        }
        // Short transfer: finish buffer by buffer.
        let mut out = Vec::with_capacity(bufs.len());
        let mut pos = off;
        for b in bufs {
            let l = b.len();
            let skip = done.min(l);
            done -= skip;
            out.push(if skip < l {
                self.uring_rw(u, write, pos, b, skip).await?
            } else {
                b
            });
            pos += l as u64;
        }
        Ok(out)
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
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "AIO disk"
    }
    fn module_name(&self) -> &str {
        "aio"
    }
    fn uuid(&self) -> Uuid {
        self.uuid
    }
    fn block_len(&self) -> u32 {
        self.block_len
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }
    fn buf_align(&self) -> usize {
        if self.direct {
            DIRECT_ALIGN
        } else {
            1
        }
    }
    fn io_type_supported(&self, io_type: IoType) -> bool {
        match io_type {
            IoType::Read | IoType::Write | IoType::Flush | IoType::Reset => true,
            IoType::Unmap | IoType::WriteZeroes => self.fallocate,
            IoType::SeekHole | IoType::SeekData => false,
        }
    }
    async fn read(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        let off = self.byte_off(offset_blocks)?;
        match &self.engine {
            Engine::Uring(u) => self.uring_rw(&u.shared, false, off, buf, 0).await,
            Engine::Pool => self.pool_read(off, buf).await,
        }
    }
    async fn write(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        let off = self.byte_off(offset_blocks)?;
        match &self.engine {
            Engine::Uring(u) => self.uring_rw(&u.shared, true, off, buf, 0).await,
            Engine::Pool => self.pool_write(off, buf).await,
        }
    }
    async fn readv(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        let off = self.byte_off(offset_blocks)?;
        match &self.engine {
            Engine::Uring(u) if bufs.len() <= MAX_IOVS => {
                self.uring_rwv(&u.shared, false, off, bufs).await
            }
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
        match &self.engine {
            Engine::Uring(u) if bufs.len() <= MAX_IOVS => {
                self.uring_rwv(&u.shared, true, off, bufs).await
            }
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
        let file = self.file.clone();
        run_blocking(move || file.sync_data())
            .await?
            .map_err(BdevError::Io)
    }
    async fn unmap(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
        if !self.fallocate {
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
        if !self.fallocate {
            return Err(BdevError::NotSupported(IoType::WriteZeroes));
        }
        let off = self.byte_off(offset_blocks)?;
        let len = self.byte_off(num_blocks)?;
        let file = self.file.clone();
        run_blocking(move || {
            let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
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
    fn driver_specific(&self) -> serde_json::Value {
        serde_json::json!({
            "aio": {
                "filename": self.filename.to_string_lossy(),
                "block_size_override": self.block_size_override,
                "readonly": self.readonly,
                "fallocate": self.fallocate,
                "nowait": self.nowait,
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
        Some(serde_json::json!({"method": "bdev_aio_create", "params": params}))
    }
}
