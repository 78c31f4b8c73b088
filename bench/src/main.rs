//! `bench`: runs one workload against one bdev-core device and prints the result as one JSON
//! object on stdout. `cargo xtask bench` drives it; it can be run by hand too:
//!
//! ```text
//! bench --target aio:/path/file --engine uring --direct --rw randread --bs 4096 --qd 32 --time 10
//! bench --target malloc:1024 --rw randwrite --bs 4096 --qd 32 --count 100000
//! bench --target lvol:/path/file --engine uring --direct --rw randread --bs 4096 --qd 32
//! ```
//!
//! `lvol:PATH` is a thick lvol filling an lvol store on an aio bdev over PATH (store
//! `bench_lvs`, lvol `vol`, 4 MiB clusters unless `--cluster-size` says otherwise). The store
//! is created afresh on every run (the old super block is wiped first), so a run never depends
//! on what an earlier run or a raw peer left in the file. With `--prefill` the whole lvol is
//! written once (untimed) before the workload.
//!
//! `thinlvol:PATH` is a thin lvol (no base) over the whole capacity of a fresh lvol store on
//! PATH (1 MiB clusters unless `--cluster-size` says otherwise), so each first write to a
//! cluster allocates it; with `--prefill` every cluster is first written in full (untimed)
//! and the workload then runs on allocated, written clusters only.
//!
//! `esnap:PATH` is a fresh esnap clone (no cluster allocated) of a read-only aio bdev over
//! PATH (block length `--block-len`, default 512); its lvol store lives on a new sparse file
//! `PATH.esnap-lvs` (4 KiB blocks, recreated on every run, 4 MiB clusters unless
//! `--cluster-size` says otherwise), so reads of unwritten clusters go to the base and each
//! first write to a cluster copies it.
//!
//! `--sqpoll` sets the reactor's ring up `IORING_SETUP_SQPOLL` (a kernel thread submits;
//! `--sqpoll-cpu N` binds it to CPU N and implies `--sqpoll`); `BDEV_REACTOR_SQPOLL=1` and
//! `BDEV_REACTOR_SQPOLL_CPU=N` in the environment do the same. The JSON's `sqpoll` says
//! whether the ring really was SQPOLL (the kernel may refuse). The SQ thread's CPU time is
//! not counted in this process's user and system time.
//!
//! The reactor polls adaptively by default (see `bdev_core::reactor::set_poll_window`):
//! while requests are in flight it polls the completion queue for up to 50 µs after the last
//! completion, on a core it does not share, then sleeps. `BDEV_REACTOR_POLL=0` makes it
//! sleep at once, `BDEV_REACTOR_POLL=N` sets an N µs window, `BDEV_REACTOR_POLL=1` busy
//! polls. The JSON's `poll` counts the reactor's polling passes, sleeping waits and the
//! 10 ms checks that found its core shared.
//!
//! Every malloc bdev is written once in full before the run (untimed), so runs measure mapped
//! memory holding data rather than first-touch page faults.
//!
//! `mlvol:MIB` is a thick lvol filling a fresh store on a malloc bdev of MIB MiB (4 KiB
//! blocks unless `--block-len` says otherwise); `mesnap:MIB` a fresh esnap clone of a malloc
//! base of MIB MiB (`--block-len`, default 4096) with its store on a second malloc bdev. Both
//! use 4 MiB clusters unless `--cluster-size` says otherwise.
//!
//! `blob:PATH` is a thick blob filling a blobstore (1 MiB clusters) initialised on an aio bdev
//! over PATH at every run; the workload goes straight to the blob (after writing all of it
//! once with `--prefill`).
//!
//! `bsload:PATH --blobs N [--recover]` times the load of a blobstore holding N blobs on the
//! sparse file `PATH.bsN` (created on first use); `--recover` loads it the way a dirty store
//! is loaded (full recovery from the md pages). It prints `ms` instead of `iops`.
//!
//! `snapclone:PATH --lvols N --count M` creates an lvol store (1 MiB clusters) on a new sparse
//! file `PATH.snapclone`, fills it with N thin lvols, then times M snapshot + clone pairs of
//! them; `iops` is creations (a snapshot or a clone) per second.
//!
//! `nbdesnap:SOCKET` is a fresh esnap clone (1 MiB clusters, store in memory) whose base is
//! our NBD client bdev connected to the export `--export NAME` (default `base`) on a Unix
//! socket; reads of the clone go to the NBD server.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev_core::backend::aio::{AioBdev, AioEngine, AioOpts};
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{BlockDevice, IoBuf, Registry};
use bdev_nbd::{NbdClientOpts, NbdClients};
use bench::{Pattern, Workload};
use blobstore::{BlobOpts, Blobstore, BsDev, BsOpts, ClearMethod};
use lvol::{BdevBsDev, LvolModule, LvsClearMethod, LvsOpts};
use serde_json::json;

/// Counts every allocation of the process (all threads), so a run can report allocations per
/// I/O (issue 15: the steady-state data path should allocate nothing).
struct CountingAlloc;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call forwards to the system allocator with the caller's arguments unchanged;
// the counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above; `ptr` came from this allocator, which is the system's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Allocations so far (all threads).
fn allocs() -> u64 {
    ALLOCS.load(Ordering::Relaxed)
}

const USAGE: &str =
    "usage: bench --target aio:PATH|lvol:PATH|thinlvol:PATH|mlvol:MIB|mesnap:MIB|esnap:PATH|blob:PATH|bsload:PATH|snapclone:PATH|nbdesnap:SOCKET|malloc:MIB \
[--blobs N] [--recover] [--lvols N] [--export NAME] [--cluster-size BYTES] [--prefill] [--engine auto|uring|threadpool] \
[--direct] [--block-len 512|4096] --rw read|write|randread|randwrite|randrw [--rwmix-read PCT] \
[--bs BYTES] [--qd N] [--time SECS] [--count N] [--step BYTES] [--offset BYTES] [--seed N] \
[--sqpoll] [--sqpoll-cpu N]";

/// The device a run goes against.
enum Target {
    Aio(PathBuf),
    Lvol(PathBuf),
    ThinLvol(PathBuf),
    Esnap(PathBuf),
    Blob(PathBuf),
    BsLoad(PathBuf),
    SnapClone(PathBuf),
    NbdEsnap(PathBuf),
    Malloc { mib: u64 },
    MallocLvol { mib: u64 },
    MallocEsnap { mib: u64 },
}

struct Args {
    target: Target,
    engine: AioEngine,
    direct: bool,
    block_len: Option<u32>,
    cluster_size: Option<u32>,
    blobs: u64,
    lvols: u64,
    export: String,
    recover: bool,
    prefill: bool,
    /// `--sqpoll` / `--sqpoll-cpu`: the reactor's ring with SQPOLL (`None`: as the
    /// environment says).
    sqpoll: Option<bdev_core::reactor::SqPoll>,
    workload: Workload,
}

/// `--target KIND:PATH` or `KIND:MIB`.
fn parse_target(v: &str) -> Result<Target, String> {
    let unknown = || format!("unknown target {v:?}");
    let (kind, rest) = v.split_once(':').ok_or_else(unknown)?;
    let file = || PathBuf::from(rest);
    let mib = || parse_num(&format!("--target {kind}:"), Some(rest.to_string()));
    Ok(match kind {
        "aio" => Target::Aio(file()),
        "lvol" => Target::Lvol(file()),
        "thinlvol" => Target::ThinLvol(file()),
        "blob" => Target::Blob(file()),
        "nbdesnap" => Target::NbdEsnap(file()),
        "snapclone" => Target::SnapClone(file()),
        "bsload" => Target::BsLoad(file()),
        "esnap" => Target::Esnap(file()),
        "mlvol" => Target::MallocLvol { mib: mib()? },
        "mesnap" => Target::MallocEsnap { mib: mib()? },
        "malloc" => Target::Malloc { mib: mib()? },
        _ => return Err(unknown()),
    })
}

fn parse_num(flag: &str, v: Option<String>) -> Result<u64, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    let (digits, mult) = match v.as_bytes().last() {
        Some(b'k' | b'K') => (&v[..v.len() - 1], 1u64 << 10),
        Some(b'm' | b'M') => (&v[..v.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&v[..v.len() - 1], 1 << 30),
        _ => (&v[..], 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{flag}: bad number {v:?}"))
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut target = None;
    let mut engine = AioEngine::Auto;
    let mut direct = false;
    let mut block_len = None;
    let mut cluster_size = None;
    let mut blobs = 10_000;
    let mut recover = false;
    let mut prefill = false;
    let mut lvols = 1000;
    let mut export = "base".to_string();
    let mut sqpoll: Option<bdev_core::reactor::SqPoll> = None;
    let mut w = Workload {
        duration: None,
        ..Default::default()
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--target" => {
                let v = it.next().ok_or("--target needs a value")?;
                target = Some(parse_target(&v)?);
            }
            "--engine" => {
                engine = match it.next().as_deref() {
                    Some("auto") => AioEngine::Auto,
                    Some("uring" | "io_uring") => AioEngine::Uring,
                    Some("threadpool" | "thread-pool") => AioEngine::ThreadPool,
                    other => return Err(format!("bad --engine {other:?}")),
                }
            }
            "--direct" => direct = true,
            "--cluster-size" => {
                cluster_size = Some(
                    u32::try_from(parse_num("--cluster-size", it.next())?)
                        .map_err(|_| "--cluster-size too large")?,
                )
            }
            "--blobs" => blobs = parse_num("--blobs", it.next())?,
            "--recover" => recover = true,
            "--prefill" => prefill = true,
            "--export" => export = it.next().ok_or("--export needs a value")?,
            "--lvols" => lvols = parse_num("--lvols", it.next())?,
            "--block-len" => block_len = Some(parse_num("--block-len", it.next())? as u32),
            "--rw" => {
                let v = it.next().ok_or("--rw needs a value")?;
                w.pattern = Pattern::parse(&v).ok_or_else(|| format!("bad --rw {v:?}"))?;
            }
            "--rwmix-read" => w.read_pct = parse_num("--rwmix-read", it.next())? as u32,
            "--bs" => w.bs = parse_num("--bs", it.next())?,
            "--qd" => w.qd = parse_num("--qd", it.next())? as usize,
            "--time" => {
                w.duration = Some(Duration::from_secs_f64(
                    it.next()
                        .and_then(|s| s.parse::<f64>().ok())
                        .filter(|s| *s > 0.0)
                        .ok_or("--time needs a positive number of seconds")?,
                ))
            }
            "--count" => w.count = Some(parse_num("--count", it.next())?),
            "--step" => w.step = Some(parse_num("--step", it.next())?),
            "--offset" => w.offset = parse_num("--offset", it.next())?,
            "--seed" => w.seed = parse_num("--seed", it.next())?,
            "--sqpoll" => {
                sqpoll.get_or_insert_with(Default::default);
            }
            "--sqpoll-cpu" => {
                let cpu = u32::try_from(parse_num("--sqpoll-cpu", it.next())?)
                    .map_err(|_| "--sqpoll-cpu too large")?;
                sqpoll.get_or_insert_with(Default::default).cpu = Some(cpu);
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let target = target.ok_or_else(|| format!("--target is required\n{USAGE}"))?;
    if w.duration.is_none() && w.count.is_none() {
        w.duration = Some(Duration::from_secs(10));
    }
    Ok(Args {
        target,
        engine,
        direct,
        block_len,
        cluster_size,
        blobs,
        lvols,
        export,
        recover,
        prefill,
        sqpoll,
        workload: w,
    })
}

fn engine_name(e: AioEngine) -> &'static str {
    match e {
        AioEngine::Auto => "auto",
        AioEngine::Uring => "io_uring",
        AioEngine::ThreadPool => "thread_pool",
    }
}

fn aio_bdev(args: &Args, name: &str, path: &Path) -> Result<Arc<AioBdev>, String> {
    aio_bdev_with(args, name, path, args.block_len, false)
}

fn aio_bdev_with(
    args: &Args,
    name: &str,
    path: &Path,
    block_len: Option<u32>,
    readonly: bool,
) -> Result<Arc<AioBdev>, String> {
    AioBdev::create(AioOpts {
        name: name.into(),
        filename: path.to_path_buf(),
        block_len,
        readonly,
        direct: args.direct,
        engine: args.engine,
        ..Default::default()
    })
    .map_err(|e| format!("aio bdev on {}: {e}", path.display()))
}

/// Zeroes the first MiB of `path` (where a blobstore keeps its super block) so that examine
/// finds no store and the next one is created from scratch.
fn wipe_super_block(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let len = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len()
        .min(1 << 20);
    f.write_all_at(&vec![0u8; len as usize], 0)
        .and_then(|()| f.sync_data())
        .map_err(|e| format!("wipe {}: {e}", path.display()))
}

/// A fresh lvol store `bench_lvs` on an aio bdev over `path` (any old store there is
/// forgotten first).
async fn fresh_lvstore(
    reg: &Registry,
    m: &LvolModule,
    args: &Args,
    path: &Path,
    cluster_size: Option<u32>,
) -> Result<(Arc<lvol::LvolStore>, AioEngine), String> {
    wipe_super_block(path)?;
    let a = aio_bdev(args, "bench_base", path)?;
    let engine = a.engine();
    register(reg, a).await?;
    reg.wait_for_examine().await;
    let store = new_lvstore(m, "bench_base", "bench_lvs", cluster_size).await?;
    Ok((store, engine))
}

/// A new lvol store `name` on `bdev` that clears nothing, with `cluster_size` or the default.
async fn new_lvstore(
    m: &LvolModule,
    bdev: &str,
    name: &str,
    cluster_size: Option<u32>,
) -> Result<Arc<lvol::LvolStore>, String> {
    let mut o = LvsOpts::new(name);
    o.clear_method = LvsClearMethod::None;
    if let Some(cs) = cluster_size {
        o.cluster_size = cs;
    }
    m.create_lvstore(bdev, o)
        .await
        .map_err(|e| format!("create lvol store: {e}"))
}

/// Registers a device of the run.
async fn register(reg: &Registry, dev: Arc<dyn BlockDevice>) -> Result<(), String> {
    reg.register(dev)
        .await
        .map_err(|e| format!("register: {e}"))
}

/// A thick (or with `thin`, thin) lvol over the whole capacity of a fresh store on `path`;
/// returns its bdev name and the aio engine under it.
async fn lvol_target(
    reg: &Registry,
    m: &LvolModule,
    args: &Args,
    path: &Path,
    thin: bool,
) -> Result<(String, AioEngine), String> {
    let default_cluster = if thin { Some(1 << 20) } else { None };
    let (store, engine) =
        fresh_lvstore(reg, m, args, path, args.cluster_size.or(default_cluster)).await?;
    let size = store.free_clusters() * u64::from(store.cluster_size());
    let lvol = m
        .create_lvol(&store, "vol", size, thin, ClearMethod::None)
        .await
        .map_err(|e| format!("create lvol: {e}"))?;
    if args.prefill {
        // Every block written before the timed workload: a thin lvol then has every cluster
        // allocated, and neither kind reads or writes blocks the file system holds as holes
        // or unwritten extents (the store zeroes new clusters, with ZERO_RANGE where the
        // file system has it).
        fill_bdev(reg, lvol.unique_id()).await?;
    }
    Ok((lvol.unique_id().to_string(), engine))
}

/// A fresh esnap clone of an aio bdev over `path`, its store on a new sparse file next to
/// it; returns the clone's bdev name and the aio engine.
async fn esnap_target(
    reg: &Registry,
    m: &LvolModule,
    args: &Args,
    path: &Path,
) -> Result<(String, AioEngine), String> {
    // The base is read-only: nothing this run does can change the data file.
    let base = aio_bdev_with(args, "bench_esnap_base", path, args.block_len, true)?;
    let engine = base.engine();
    let base_size = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    register(reg, base).await?;
    let mut store_path = path.as_os_str().to_owned();
    store_path.push(".esnap-lvs");
    let store_path = PathBuf::from(store_path);
    // A new file every run: the clone starts with every cluster unallocated.
    let _ = std::fs::remove_file(&store_path);
    std::fs::File::create(&store_path)
        .and_then(|f| f.set_len(base_size + (256 << 20)))
        .map_err(|e| format!("{}: {e}", store_path.display()))?;
    let sa = aio_bdev_with(args, "bench_esnap_store", &store_path, Some(4096), false)?;
    register(reg, sa).await?;
    reg.wait_for_examine().await;
    let store = new_lvstore(m, "bench_esnap_store", "bench_esnap_lvs", args.cluster_size).await?;
    let clone = m
        .create_esnap_clone("bench_esnap_base", &store, "clone")
        .await
        .map_err(|e| format!("create esnap clone: {e}"))?;
    Ok((clone.unique_id().to_string(), engine))
}

/// Over malloc bdevs of `mib` MiB: a thick lvol filling a fresh store (4 KiB blocks, or
/// `--block-len`), or with `esnap` a fresh esnap clone of a malloc base (`--block-len`
/// blocks, default 4096) whose store is a second malloc bdev (4 KiB blocks). 4 MiB clusters
/// unless `--cluster-size` says otherwise. Returns the lvol's bdev name.
async fn malloc_lvol_target(
    reg: &Registry,
    m: &LvolModule,
    args: &Args,
    mib: u64,
    esnap: bool,
) -> Result<String, String> {
    let malloc = |name: &str, mib: u64, bl: u32| {
        MallocBdev::create(name, (mib << 20) / u64::from(bl), bl, None)
            .map_err(|e| format!("malloc bdev {name}: {e}"))
    };
    let bl = args.block_len.unwrap_or(4096);
    let (store_bdev, store_mib, store_bl) = if esnap {
        ("bench_mstore", mib + 256, 4096)
    } else {
        ("bench_mbase", mib, bl)
    };
    register(reg, malloc("bench_mbase", mib, bl)?).await?;
    if esnap {
        // The clone reads the base; the store below only takes metadata. (A thick lvol is
        // written in full after creation instead.)
        fill_bdev(reg, "bench_mbase").await?;
        register(reg, malloc(store_bdev, store_mib, store_bl)?).await?;
    }
    reg.wait_for_examine().await;
    let store = new_lvstore(m, store_bdev, "bench_mlvs", args.cluster_size).await?;
    let lvol = if esnap {
        m.create_esnap_clone("bench_mbase", &store, "clone")
            .await
            .map_err(|e| format!("create esnap clone: {e}"))?
    } else {
        let size = store.free_clusters() * u64::from(store.cluster_size());
        let l = m
            .create_lvol(&store, "vol", size, false, ClearMethod::None)
            .await
            .map_err(|e| format!("create lvol: {e}"))?;
        // The store scrubs (write_zeroes) the thick lvol's clusters, which a malloc bdev
        // turns into unbacked chunks read as zeroes without a copy: write the lvol once so
        // its reads copy memory as the raw malloc peer's do.
        fill_bdev(reg, l.unique_id()).await?;
        l
    };
    Ok(lvol.unique_id().to_string())
}

/// A 1 MiB buffer of non-zero bytes.
fn fill_buf(align: usize) -> IoBuf {
    let mut b = IoBuf::new(1 << 20, align.max(4096));
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i % 251) as u8 | 1;
    }
    b
}

/// Writes a whole bdev once, in order, 1 MiB at a time (untimed): a malloc bdev then holds
/// mapped memory with data (no first-touch page faults, no unbacked zero chunks), a lvol has
/// every cluster allocated and written.
async fn fill_bdev(reg: &Registry, name: &str) -> Result<(), String> {
    let desc = reg
        .open(name, true)
        .map_err(|e| format!("open {name}: {e}"))?;
    let dev = desc.device().clone();
    let bl = u64::from(dev.block_len());
    let size = dev.num_blocks() * bl;
    let mut buf = fill_buf(dev.buf_align());
    let mut off = 0;
    while off < size {
        if size - off < buf.len() as u64 {
            buf = IoBuf::new((size - off) as usize, dev.buf_align().max(4096));
            buf.iter_mut().for_each(|x| *x = 0x5a);
        }
        let n = buf.len() as u64;
        buf = desc
            .write(off / bl, buf)
            .await
            .map_err(|e| format!("filling {name} at {off}: {e}"))?;
        off += n;
    }
    Ok(())
}

/// A blobstore device over an aio bdev on `path`.
async fn bs_dev(
    reg: &Registry,
    args: &Args,
    name: &str,
    path: &Path,
) -> Result<(Arc<dyn BsDev>, AioEngine), String> {
    let a = aio_bdev(args, name, path)?;
    let engine = a.engine();
    register(reg, a).await?;
    let desc = reg.open(name, true).map_err(|e| format!("open: {e}"))?;
    Ok((Arc::new(BdevBsDev::new(desc)), engine))
}

/// A thick blob over a freshly initialised blobstore on `path`.
async fn blob_run(reg: &Registry, args: &Args, path: &Path) -> Result<serde_json::Value, String> {
    let (dev, engine) = bs_dev(reg, args, "bench_bs", path).await?;
    let bs = Blobstore::init(
        dev,
        BsOpts {
            cluster_size: 1 << 20,
            clear_method: ClearMethod::None,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| format!("init blobstore: {e}"))?;
    let id = bs
        .create_blob(BlobOpts {
            num_clusters: bs.free_clusters(),
            clear_method: ClearMethod::None,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("create blob: {e}"))?;
    let blob = bs
        .open_blob(id)
        .await
        .map_err(|e| format!("open blob: {e}"))?;
    let io_unit = u64::from(bs.io_unit_size());
    if args.prefill {
        // Every block written (untimed): the store zeroed the new clusters, with ZERO_RANGE
        // where the file system has it, and the workload must not hit unwritten extents.
        let size = blob.num_io_units() * io_unit;
        let mut buf = fill_buf(4096);
        let mut off = 0;
        while off + (1 << 20) <= size {
            buf = blob
                .write(off / io_unit, buf)
                .await
                .map_err(|e| format!("filling the blob at {off}: {e}"))?;
            off += 1 << 20;
        }
    }
    let a0 = allocs();
    let stats = bench::run_blob(&blob, io_unit, &args.workload).await?;
    let run_allocs = allocs() - a0;
    let size = blob.num_io_units() * io_unit;
    let _ = blob.close().await;
    let _ = bs.unload().await;
    Ok(io_json(
        args,
        format!("blob:{}", path.display()),
        Some(engine),
        io_unit as u32,
        size,
        &stats,
        run_allocs,
    ))
}

/// Times the load of a store with `args.blobs` blobs (built on first use) on `PATH.bsN`.
async fn bsload_run(reg: &Registry, args: &Args, path: &Path) -> Result<serde_json::Value, String> {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".bs{}", args.blobs));
    let store_path = PathBuf::from(p);
    let (dev, engine) = if store_path.exists() {
        bs_dev(reg, args, "bench_bsload", &store_path).await?
    } else {
        let size = (args.blobs + 256) << 20;
        std::fs::File::create(&store_path)
            .and_then(|f| f.set_len(size))
            .map_err(|e| format!("{}: {e}", store_path.display()))?;
        let (dev, _) = bs_dev(reg, args, "bench_bsbuild", &store_path).await?;
        let built = async {
            let bs = Blobstore::init(
                dev,
                BsOpts {
                    cluster_size: 1 << 20,
                    num_md_pages: Some((args.blobs * 3 + 1024) as u32),
                    clear_method: ClearMethod::None,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("init blobstore: {e}"))?;
            for _ in 0..args.blobs {
                bs.create_blob(BlobOpts {
                    num_clusters: 1,
                    clear_method: ClearMethod::None,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("create blob: {e}"))?;
            }
            bs.unload().await.map_err(|e| format!("unload: {e}"))
        }
        .await;
        if let Err(e) = built {
            let _ = std::fs::remove_file(&store_path);
            return Err(e);
        }
        // The aio bdev holds the file exclusively: let go of it before opening it again.
        reg.unregister("bench_bsbuild")
            .await
            .map_err(|e| format!("unregister: {e}"))?;
        bs_dev(reg, args, "bench_bsload", &store_path).await?
    };
    let t0 = Instant::now();
    let bs = Blobstore::load(
        dev,
        BsOpts {
            force_recover: args.recover,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| format!("load blobstore: {e}"))?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let n = bs.blob_ids().len() as u64;
    // Unloading writes the store clean again for the next run.
    bs.unload().await.map_err(|e| format!("unload: {e}"))?;
    if n != args.blobs {
        return Err(format!("loaded {n} blobs, expected {}", args.blobs));
    }
    Ok(json!({
        "target": format!("bsload:{}", store_path.display()),
        "engine": engine_name(engine),
        "direct": args.direct,
        "blobs": n,
        "recover": args.recover,
        "ms": ms,
        "iops": ms,
        "ios": 1,
        "errors": 0,
    }))
}

/// Snapshot + clone creation rate on a store holding `args.lvols` thin lvols.
async fn snapclone_run(
    reg: &Registry,
    args: &Args,
    path: &Path,
) -> Result<serde_json::Value, String> {
    let mut p = path.as_os_str().to_owned();
    p.push(".snapclone");
    let store_path = PathBuf::from(p);
    let _ = std::fs::remove_file(&store_path);
    std::fs::File::create(&store_path)
        .and_then(|f| f.set_len((args.lvols * 3 + 512) << 20))
        .map_err(|e| format!("{}: {e}", store_path.display()))?;
    let a = aio_bdev(args, "bench_sc", &store_path)?;
    let engine = a.engine();
    register(reg, a).await?;
    let m = LvolModule::new(reg.clone());
    let store = new_lvstore(&m, "bench_sc", "bench_sc_lvs", Some(1 << 20)).await?;
    let mut vols = Vec::new();
    for i in 0..args.lvols {
        vols.push(
            m.create_lvol(&store, &format!("v{i}"), 1 << 20, true, ClearMethod::None)
                .await
                .map_err(|e| format!("create lvol {i}: {e}"))?,
        );
    }
    let pairs = args.workload.count.unwrap_or(100).min(args.lvols);
    let t0 = Instant::now();
    for (i, l) in vols.iter().take(pairs as usize).enumerate() {
        let snap = m
            .create_snapshot(l, &format!("s{i}"))
            .await
            .map_err(|e| format!("snapshot {i}: {e}"))?;
        m.create_clone(&snap, &format!("c{i}"))
            .await
            .map_err(|e| format!("clone {i}: {e}"))?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let _ = m.destroy_lvstore(&store).await;
    drop(vols);
    let _ = std::fs::remove_file(&store_path);
    let ops = pairs * 2;
    Ok(json!({
        "target": format!("snapclone:{}", store_path.display()),
        "engine": engine_name(engine),
        "direct": args.direct,
        "lvols": args.lvols,
        "pairs": pairs,
        "seconds": secs,
        "iops": ops as f64 / secs,
        "ios": ops,
        "errors": 0,
    }))
}

/// A fresh esnap clone (store in memory) of an NBD client bdev on the Unix socket `sock`.
async fn nbd_esnap_target(
    reg: &Registry,
    clients: &NbdClients,
    m: &LvolModule,
    args: &Args,
    sock: &Path,
) -> Result<String, String> {
    let dev = clients
        .create(NbdClientOpts::new(
            "bench_nbd_base",
            &format!("unix:{}", sock.display()),
            &args.export,
        ))
        .await
        .map_err(|e| format!("nbd client: {e}"))?;
    let store = MallocBdev::create("bench_nbd_store", (256 << 20) / 4096, 4096, None)
        .map_err(|e| format!("malloc bdev: {e}"))?;
    register(reg, store).await?;
    let s = new_lvstore(
        m,
        "bench_nbd_store",
        "bench_nbd_lvs",
        Some(args.cluster_size.unwrap_or(1 << 20)),
    )
    .await?;
    let clone = m
        .create_esnap_clone(&dev.uuid().to_string(), &s, "clone")
        .await
        .map_err(|e| format!("create esnap clone: {e}"))?;
    Ok(clone.unique_id().to_string())
}

fn io_json(
    args: &Args,
    target_desc: String,
    engine: Option<AioEngine>,
    block_len: u32,
    size: u64,
    stats: &bench::Stats,
    run_allocs: u64,
) -> serde_json::Value {
    let w = &args.workload;
    let ios = stats.reads + stats.writes;
    let poll = bdev_core::reactor::poll_stats();
    json!({
        // Every allocation in the process (all threads) from the first submission to the
        // last completion, including the run's own setup (one buffer per queue slot).
        "allocs": run_allocs,
        "allocs_per_io": if ios > 0 { run_allocs as f64 / ios as f64 } else { 0.0 },
        "target": target_desc,
        "engine": engine.map(engine_name),
        "direct": args.direct,
        // Whether the reactor's ring really was SQPOLL (the kernel may refuse it).
        "sqpoll": bdev_core::reactor::is_sqpoll(),
        "poll": {
            "passes": poll.poll_passes,
            "sleeps": poll.sleeps,
            "contended_ticks": poll.contended_ticks,
        },
        "block_len": block_len,
        "size_bytes": size,
        "rw": w.pattern.name(),
        "bs": w.bs,
        "qd": w.qd,
        "step": w.step,
        "reads": stats.reads,
        "writes": stats.writes,
        "ios": stats.reads + stats.writes,
        "errors": stats.errors,
        "first_error": stats.first_error,
        "seconds": stats.elapsed.as_secs_f64(),
        "iops": stats.iops(),
        "mib_per_s": stats.iops() * w.bs as f64 / (1 << 20) as f64,
    })
}

fn run(args: Args) -> Result<serde_json::Value, String> {
    let reg = Registry::new();
    let mut _lvol_module = None;
    let mut _nbd_clients = None;
    let (name, target_desc, engine) = match &args.target {
        Target::Aio(path) => {
            let a = aio_bdev(&args, "bench0", path)?;
            let eng = a.engine();
            futures::executor::block_on(reg.register(a)).map_err(|e| format!("register: {e}"))?;
            (
                "bench0".to_string(),
                format!("aio:{}", path.display()),
                Some(eng),
            )
        }
        Target::Lvol(path) | Target::ThinLvol(path) => {
            let thin = matches!(args.target, Target::ThinLvol(_));
            let m = LvolModule::new(reg.clone());
            let (name, eng) =
                bdev_core::reactor::block_on(lvol_target(&reg, &m, &args, path, thin))?;
            _lvol_module = Some(m);
            let kind = if thin { "thinlvol" } else { "lvol" };
            (name, format!("{kind}:{}", path.display()), Some(eng))
        }
        Target::Blob(path) => {
            return bdev_core::reactor::block_on(blob_run(&reg, &args, path));
        }
        Target::NbdEsnap(sock) => {
            let m = LvolModule::new(reg.clone());
            let clients = NbdClients::new(reg.clone());
            let name =
                futures::executor::block_on(nbd_esnap_target(&reg, &clients, &m, &args, sock))?;
            _lvol_module = Some(m);
            _nbd_clients = Some(clients);
            (name, format!("nbdesnap:{}", sock.display()), None)
        }
        Target::SnapClone(path) => {
            return bdev_core::reactor::block_on(snapclone_run(&reg, &args, path));
        }
        Target::BsLoad(path) => {
            return bdev_core::reactor::block_on(bsload_run(&reg, &args, path));
        }
        Target::Esnap(path) => {
            let m = LvolModule::new(reg.clone());
            let (name, eng) = futures::executor::block_on(esnap_target(&reg, &m, &args, path))?;
            _lvol_module = Some(m);
            (name, format!("esnap:{}", path.display()), Some(eng))
        }
        Target::MallocLvol { mib } | Target::MallocEsnap { mib } => {
            let esnap = matches!(args.target, Target::MallocEsnap { .. });
            let m = LvolModule::new(reg.clone());
            let name =
                futures::executor::block_on(malloc_lvol_target(&reg, &m, &args, *mib, esnap))?;
            _lvol_module = Some(m);
            let kind = if esnap { "mesnap" } else { "mlvol" };
            (name, format!("{kind}:{mib}"), None)
        }
        Target::Malloc { mib } => {
            let bl = args.block_len.unwrap_or(512);
            let m = MallocBdev::create("bench0", (mib << 20) / bl as u64, bl, None)
                .map_err(|e| format!("malloc bdev: {e}"))?;
            futures::executor::block_on(reg.register(m)).map_err(|e| format!("register: {e}"))?;
            futures::executor::block_on(fill_bdev(&reg, "bench0"))?;
            ("bench0".to_string(), format!("malloc:{mib}"), None)
        }
    };
    let w = &args.workload;
    let desc = reg
        .open(&name, w.pattern.writes())
        .map_err(|e| format!("open: {e}"))?;
    let dev = desc.device().clone();
    // The reactor submits and reaps this thread's aio requests inline (SPDK's reactor with
    // its io_uring poller), as fio does; other devices run as under any executor.
    let a0 = allocs();
    let stats = bdev_core::reactor::block_on(bench::run(&desc, w))?;
    let run_allocs = allocs() - a0;
    Ok(io_json(
        &args,
        target_desc,
        engine,
        dev.block_len(),
        dev.num_blocks() * dev.block_len() as u64,
        &stats,
        run_allocs,
    ))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    // This thread is the benchmark's reactor and never blocks on aio I/O inside it:
    // single-issuer ring, deferred task running, files registered.
    bdev_core::reactor::set_exclusive();
    if let Some(sq) = args.sqpoll {
        bdev_core::reactor::set_sqpoll(Some(sq));
    }
    match run(args) {
        Ok(v) => {
            println!("{v}");
            if v["errors"].as_u64().unwrap_or(0) > 0 {
                eprintln!(
                    "bench: {} requests failed: {}",
                    v["errors"], v["first_error"]
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Args, String> {
        parse_args(s.split_whitespace().map(str::to_string))
    }

    #[test]
    fn parses_a_full_command_line() {
        let a =
            args("--target aio:/x --engine uring --direct --rw randwrite --bs 4k --qd 32 --time 2")
                .unwrap();
        assert!(matches!(a.target, Target::Aio(ref p) if p == &PathBuf::from("/x")));
        assert_eq!(a.engine, AioEngine::Uring);
        assert!(a.direct);
        assert_eq!(a.workload.pattern, Pattern::RandWrite);
        assert_eq!(a.workload.bs, 4096);
        assert_eq!(a.workload.qd, 32);
        assert_eq!(a.workload.duration, Some(Duration::from_secs(2)));
    }

    #[test]
    fn defaults_and_errors() {
        let a = args("--target malloc:64 --rw read --step 64k --count 1000").unwrap();
        assert!(matches!(a.target, Target::Malloc { mib: 64 }));
        assert_eq!(a.workload.step, Some(65536));
        assert_eq!(a.workload.count, Some(1000));
        assert_eq!(a.workload.duration, None);
        let l = args("--target lvol:/f --rw randread").unwrap();
        assert!(matches!(l.target, Target::Lvol(ref p) if p == &PathBuf::from("/f")));
        let t = args("--target thinlvol:/f --prefill --rw randwrite").unwrap();
        assert!(matches!(t.target, Target::ThinLvol(ref p) if p == &PathBuf::from("/f")));
        assert!(t.prefill);
        assert!(!l.prefill);
        let d = args("--target malloc:64 --rw read").unwrap();
        assert_eq!(d.workload.duration, Some(Duration::from_secs(10)));
        let e =
            args("--target esnap:/b --cluster-size 1M --rw write --step 1M --count 1024").unwrap();
        assert!(matches!(e.target, Target::Esnap(ref p) if p == &PathBuf::from("/b")));
        assert_eq!(e.cluster_size, Some(1 << 20));
        let l = args("--target bsload:/b --blobs 10000 --recover --rw read").unwrap();
        assert!(matches!(l.target, Target::BsLoad(_)));
        assert_eq!((l.blobs, l.recover), (10_000, true));
        let n = args("--target nbdesnap:/s --export x --rw read").unwrap();
        assert!(matches!(n.target, Target::NbdEsnap(_)));
        assert_eq!(n.export, "x");
        let ml = args("--target mlvol:256 --rw randread").unwrap();
        assert!(matches!(ml.target, Target::MallocLvol { mib: 256 }));
        let me = args("--target mesnap:64 --block-len 512 --rw randread").unwrap();
        assert!(matches!(me.target, Target::MallocEsnap { mib: 64 }));
        let s = args("--target snapclone:/b --lvols 10 --rw read").unwrap();
        assert!(matches!(s.target, Target::SnapClone(_)));
        assert_eq!(s.lvols, 10);
        assert!(args("--target blob:/b --rw read").is_ok());
        assert!(args("--target malloc:64 --cluster-size 8G --rw read").is_err());
        assert!(args("--rw read").is_err());
        let q = args("--target aio:/x --rw read --sqpoll").unwrap();
        assert_eq!(q.sqpoll, Some(bdev_core::reactor::SqPoll::default()));
        let q = args("--target aio:/x --rw read --sqpoll-cpu 3").unwrap();
        assert_eq!(q.sqpoll.and_then(|s| s.cpu), Some(3));
        assert!(args("--target aio:/x --rw read").unwrap().sqpoll.is_none());
        assert!(args("--target aio:/x --rw read --sqpoll-cpu").is_err());
        assert!(args("--target aio:/x --rw read --sqpoll-cpu x").is_err());
        assert!(args("--target nvme:0 --rw read").is_err());
        assert!(args("--target malloc:64 --rw sideways").is_err());
        assert!(args("--target malloc:64 --bs 4x").is_err());
        assert!(args("--target malloc:64 --time -1").is_err());
    }
}
