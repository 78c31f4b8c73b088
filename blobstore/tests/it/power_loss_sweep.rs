//! Crash sweep over every metadata operation on a device with a volatile write cache.
//!
//! For each operation: a store is set up and unloaded clean (so the dirty mark is part of
//! every sweep), then the operation runs on a write-back [`MemBsDev`] once to record its
//! checkpoints (the device event count and the store's state each time a step returned
//! durable: a metadata operation, or a client flush after data writes). Then, for every cut
//! point `k` (after each write and each flush of the operation), the operation runs again
//! with the power cut after event `k`, and several crash images are built from what the
//! cache held (`LoseAll`, `KeepAll`, four fixed `Random` seeds: lost writes in any subset,
//! torn at the 4 KiB io unit; and every in-order prefix of the cached writes). Each image must load (dirty recovery), pass `inspect::check`
//! after a clean unload, and show exactly the state of the last checkpoint before the cut or
//! of the next one (blob set, size, thin / read-only flags, clear method, parent, esnap id,
//! xattrs, super blob, store size), with every block of every blob equal to that block in
//! one of the two (a data write still in flight may tear; nothing else is allowed).
//!
//! `a_missing_barrier_fails_the_sweep` turns off one kind of flush through the blobstore's
//! test switch and asserts that the sweep then fails.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use blobstore::testing::{skip_barrier, Barrier, CrashPlan, Fault, MemBsDev};
use blobstore::{
    inspect, Blob, BlobId, BlobOpts, Blobstore, BsDev, BsOpts, ClearMethod, IoBuf, Parent,
};
use futures::executor::block_on;
use test_support::prelude::*;

const CLUSTER: u32 = 16384;
/// 1 MiB: 64 clusters of 16 KiB.
const DEV_BYTES: u64 = 1 << 20;

thread_local! {
    /// The io unit of the stores swept on this thread: 4096, or 512 to tear md pages.
    static IO_UNIT: std::cell::Cell<u32> = const { std::cell::Cell::new(4096) };
}

/// Block (io unit) size in bytes.
fn blk() -> u32 {
    IO_UNIT.with(|c| c.get())
}
/// io units per cluster.
fn lpc() -> u64 {
    u64::from(CLUSTER / blk())
}
/// Device size in blocks.
fn dev_blocks() -> u64 {
    DEV_BYTES / u64::from(blk())
}
/// Crash states explored at every cut point, besides every in-order prefix of the
/// writes the cache holds ([`plans`]).
const PLANS: [CrashPlan; 6] = [
    CrashPlan::LoseAll,
    CrashPlan::KeepAll,
    CrashPlan::Random(0x5eed_0001),
    CrashPlan::Random(0x5eed_0002),
    CrashPlan::Random(0x5eed_0003),
    CrashPlan::Random(0x5eed_0004),
];

/// The crash states of a cut whose cache holds `pending` writes: [`PLANS`] and every
/// strict prefix `Prefix(1..pending)` (a cache written back in order, cut in the middle).
fn plans(pending: usize) -> Vec<CrashPlan> {
    // Every seed at every io unit: a random plan tears only half the writes it keeps or
    // loses, and with fewer seeds a sweep at 512 bytes without shadows still passed.
    let mut v = PLANS.to_vec();
    v.extend((1..pending).map(CrashPlan::Prefix));
    v
}

fn base_dev() -> Arc<MemBsDev> {
    static DEV: OnceLock<Arc<MemBsDev>> = OnceLock::new();
    DEV.get_or_init(|| {
        let v: Vec<u8> = (0..8 * CLUSTER as usize)
            .map(|i| (i / 4096 + 0x80) as u8)
            .collect();
        MemBsDev::read_only(512, v)
    })
    .clone()
}

struct Base;

#[async_trait::async_trait]
impl blobstore::EsnapDevFactory for Base {
    async fn create(&self, _b: BlobId, _id: &[u8]) -> blobstore::Result<Option<Arc<dyn BsDev>>> {
        Ok(Some(base_dev() as Arc<dyn BsDev>))
    }
}

fn opts() -> BsOpts {
    BsOpts {
        cluster_size: CLUSTER,
        esnap_factory: Some(Arc::new(Base)),
        ..Default::default()
    }
}

/// What a client can see of one blob, besides its bytes.
#[derive(Clone, Debug, PartialEq)]
struct Meta {
    clusters: u64,
    thin: bool,
    read_only: bool,
    clear: ClearMethod,
    parent: Parent,
    esnap_id: Option<Vec<u8>>,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// What a client can see of the store.
#[derive(Clone, Debug, PartialEq)]
struct Snap {
    super_blob: Option<BlobId>,
    total_clusters: u64,
    /// Free clusters: compared only by the sweeps of first writes without a flush
    /// ([`STRICT_FREE`]), where no state in between may hold a cluster no map names.
    free_clusters: u64,
    blobs: BTreeMap<BlobId, (Meta, Vec<u8>)>,
}

async fn state(bs: &Blobstore) -> Snap {
    let mut blobs = BTreeMap::new();
    for id in bs.blob_ids() {
        let b = bs
            .open_blob(id)
            .await
            .unwrap_or_else(|e| panic!("blob {id:#x} listed but does not open: {e}"));
        let n = b.num_io_units() as usize * blk() as usize;
        let data = b.read(0, IoBuf::new(n, 4096)).await.unwrap().to_vec();
        let xattrs = b
            .xattr_names()
            .into_iter()
            .map(|n| {
                let v = b.get_xattr(&n).unwrap();
                (n, v)
            })
            .collect();
        let meta = Meta {
            clusters: b.num_clusters(),
            thin: b.is_thin(),
            read_only: b.is_read_only(),
            clear: b.clear_method(),
            parent: b.parent(),
            esnap_id: b.esnap_id().ok(),
            xattrs,
        };
        b.close().await.unwrap();
        blobs.insert(id, (meta, data));
    }
    Snap {
        super_blob: bs.super_blob(),
        total_clusters: bs.total_clusters(),
        free_clusters: bs.free_clusters(),
        blobs,
    }
}

/// The context an operation runs in.
struct Ctx {
    bs: Mutex<Option<Blobstore>>,
    dev: Arc<MemBsDev>,
    ids: Vec<BlobId>,
    /// Reference run: record checkpoints and insist that every step succeeds.
    record: bool,
    /// (event count, state, durable): a durable checkpoint is a state the store must not go
    /// back before; a non-durable one (`ck_soft`) is a state a cut may or may not keep.
    checkpoints: Mutex<Vec<(u64, Snap, bool)>>,
    /// Blob ids made by the operation, for its later steps.
    made: Mutex<Vec<BlobId>>,
}

impl Ctx {
    fn bs(&self) -> Blobstore {
        self.bs.lock().unwrap().clone().expect("store unloaded")
    }
    /// A step's result: must be Ok in the reference run; after a power cut anything goes.
    fn ok<T>(&self, what: &str, r: blobstore::Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) if self.record => panic!("reference run: {what} failed: {e}"),
            Err(_) => None,
        }
    }
    /// The step before returned durable: record the store's state and the cut point.
    async fn ck(&self) {
        self.checkpoint(true).await
    }
    /// The steps before returned but need not be durable (first writes without a flush): a
    /// cut after them may show the state before them or this one, block by block.
    async fn ck_soft(&self) {
        self.checkpoint(false).await
    }
    async fn checkpoint(&self, durable: bool) {
        if !self.record {
            return;
        }
        let ev = self.dev.events();
        let live = self.bs.lock().unwrap().clone();
        let snap = match live {
            Some(bs) => state(&bs).await,
            None => {
                // After unload: what the disk holds.
                let copy = MemBsDev::from_bytes(blk(), self.dev.snapshot());
                let bs = Blobstore::load(copy, opts()).await.unwrap();
                let s = state(&bs).await;
                bs.unload().await.unwrap();
                s
            }
        };
        assert_eq!(
            ev,
            self.dev.events(),
            "reading the state wrote to the device"
        );
        self.checkpoints.lock().unwrap().push((ev, snap, durable));
    }
    fn made(&self, i: usize) -> Option<BlobId> {
        self.made.lock().unwrap().get(i).copied()
    }
    fn push(&self, id: Option<BlobId>) {
        if let Some(id) = id {
            self.made.lock().unwrap().push(id);
        }
    }
    async fn open(&self, id: BlobId) -> Option<Blob> {
        self.ok("open", self.bs().open_blob(id).await)
    }
    /// Every write's result, then a client flush of `b`: a durable step.
    async fn writes_then_flush(&self, rs: Vec<blobstore::Result<()>>, b: &Blob) {
        for r in rs {
            self.ok("write", r);
        }
        self.ok("flush", b.flush().await);
        self.ck().await;
    }
    /// Writes `n` blocks of `byte` at block `off` of blob `id`, then a client flush.
    async fn write_flush(&self, id: BlobId, off: u64, n: usize, byte: u8) {
        let Some(b) = self.open(id).await else { return };
        let mut buf = IoBuf::new(n * blk() as usize, 4096);
        buf.fill(byte);
        self.ok("write", b.write(off, buf).await);
        self.ok("flush", b.flush().await);
        self.ok("close", b.close().await);
        self.ck().await;
    }
}

/// One durable metadata step of an operation; the `usize` fields index the setup's ids.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Create a blob with these options (its id is remembered).
    Create(fn() -> BlobOpts),
    /// Snapshot, with a `name` xattr when given.
    Snapshot(usize, Option<&'static [u8]>),
    /// Clone of a snapshot, with this `name` xattr.
    Clone(usize, &'static [u8]),
    Delete(usize),
    /// Open, resize to each size in turn (each durable), close.
    Resize(usize, &'static [u64]),
    /// (blob, new parent snapshot).
    SetParent(usize, usize),
    /// The shared read-only base as the blob's external parent.
    SetExternalParent(usize),
    Inflate(usize),
    Decouple(usize),
    SetSuperBlob(usize),
    /// The device grows by a quarter, then the store.
    Grow,
    /// Open, write_zeroes of (offset, io units), client flush (durable), close.
    WriteZeroes(usize, u64, u64),
    /// Open, unmap of the first cluster (durable), close.
    UnmapFirstCluster(usize),
}

/// What an operation does: a list of steps, or code of its own.
#[derive(Clone, Copy)]
enum Plan {
    Steps(&'static [Step]),
    Custom(Op),
}

impl Ctx {
    /// Runs one step, then records the checkpoint it reached.
    async fn apply(&self, step: Step) {
        let bs = self.bs();
        let id = |i: usize| self.ids[i];
        match step {
            Step::Create(o) => {
                let id = self.ok("create", bs.create_blob(o()).await);
                self.push(id);
            }
            Step::Snapshot(i, name) => {
                let x = name.map(|n| vec![("name".into(), n.to_vec())]);
                let r = bs.create_snapshot(id(i), x.unwrap_or_default()).await;
                self.ok("snapshot", r);
            }
            Step::Clone(i, name) => {
                let x = vec![("name".into(), name.to_vec())];
                self.ok("clone", bs.create_clone(id(i), x).await);
            }
            Step::Delete(i) => _ = self.ok("delete", bs.delete_blob(id(i)).await),
            // These record their checkpoints before the close.
            Step::Resize(..) | Step::WriteZeroes(..) | Step::UnmapFirstCluster(..) => {
                let i = match step {
                    Step::Resize(i, _) | Step::WriteZeroes(i, ..) | Step::UnmapFirstCluster(i) => i,
                    _ => unreachable!(),
                };
                let Some(b) = self.open(id(i)).await else {
                    return;
                };
                match step {
                    Step::Resize(_, sizes) => {
                        for &n in sizes {
                            self.ok("resize", b.resize(n).await);
                            self.ck().await;
                        }
                    }
                    Step::WriteZeroes(_, off, n) => {
                        self.ok("write_zeroes", b.write_zeroes(off, n).await);
                        self.ok("flush", b.flush().await);
                        self.ck().await;
                    }
                    _ => {
                        self.ok("unmap", b.unmap(0, lpc()).await);
                        self.ck().await;
                    }
                }
                self.ok("close", b.close().await);
                return;
            }
            Step::SetParent(i, p) => _ = self.ok("set_parent", bs.set_parent(id(i), id(p)).await),
            Step::SetExternalParent(i) => {
                let d = base_dev() as Arc<dyn BsDev>;
                let r = bs.set_external_parent(id(i), d, b"base").await;
                self.ok("set_external_parent", r);
            }
            Step::Inflate(i) => _ = self.ok("inflate", bs.inflate_blob(id(i)).await),
            Step::Decouple(i) => _ = self.ok("decouple", bs.decouple_parent(id(i)).await),
            Step::SetSuperBlob(i) => _ = self.ok("set_super_blob", bs.set_super_blob(id(i)).await),
            Step::Grow => {
                self.dev.resize(dev_blocks() + dev_blocks() / 4);
                self.ok("grow", bs.grow().await);
            }
        }
        self.ck().await;
    }
}

type Setup = for<'a> fn(&'a Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + 'a>>;
type Op = for<'a> fn(&'a Ctx) -> Pin<Box<dyn Future<Output = ()> + 'a>>;

async fn fill(bs: &Blobstore, id: BlobId, cluster: u64, byte: u8) {
    let b = bs.open_blob(id).await.unwrap();
    let mut buf = IoBuf::new(blk() as usize, 4096);
    buf.fill(byte);
    b.write(cluster * lpc() + 1, buf).await.unwrap();
    b.close().await.unwrap();
}

/// A store set up by `setup` and unloaded clean: the image and the ids.
fn prepare(setup: Setup) -> (Vec<u8>, Vec<BlobId>) {
    block_on(async {
        let dev = MemBsDev::new(blk(), dev_blocks());
        let bs = Blobstore::init(dev.clone(), opts()).await.unwrap();
        let ids = setup(&bs).await;
        bs.unload().await.unwrap();
        (dev.snapshot(), ids)
    })
}

/// Runs `op` on a write-back copy of `image`, cut after event `cut` (None: no cut).
async fn run(image: &[u8], ids: &[BlobId], plan: Plan, cut: Option<u64>, record: bool) -> Ctx {
    let dev = MemBsDev::from_bytes(blk(), image.to_vec());
    dev.set_write_back(true);
    let bs = Blobstore::load(dev.clone(), opts()).await.unwrap();
    dev.set_fault(cut.map_or(Fault::None, Fault::CutAfter));
    let ctx = Ctx {
        bs: Mutex::new(Some(bs)),
        dev,
        ids: ids.to_vec(),
        record,
        checkpoints: Mutex::new(Vec::new()),
        made: Mutex::new(Vec::new()),
    };
    ctx.ck().await;
    match plan {
        Plan::Steps(steps) => {
            for &s in steps {
                ctx.apply(s).await;
            }
        }
        Plan::Custom(op) => op(&ctx).await,
    }
    ctx
}

thread_local! {
    /// The sweep compares free cluster counts too (see [`Snap::free_clusters`]).
    static STRICT_FREE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Why `now` is neither candidate, or None if it is one of them.
fn mismatch(now: &Snap, cands: &[&Snap]) -> Option<String> {
    let mut why = Vec::new();
    'cand: for (ci, c) in cands.iter().enumerate() {
        if STRICT_FREE.with(|f| f.get()) && now.free_clusters != c.free_clusters {
            why.push(format!(
                "#{ci}: {} free clusters, expected {}",
                now.free_clusters, c.free_clusters
            ));
            continue;
        }
        if now.super_blob != c.super_blob || now.total_clusters != c.total_clusters {
            why.push(format!(
                "#{ci}: super blob {:?} / {} clusters, expected {:?} / {}",
                now.super_blob, now.total_clusters, c.super_blob, c.total_clusters
            ));
            continue;
        }
        if !now.blobs.keys().eq(c.blobs.keys()) {
            why.push(format!(
                "#{ci}: blobs {:x?}, expected {:x?}",
                now.blobs.keys().collect::<Vec<_>>(),
                c.blobs.keys().collect::<Vec<_>>()
            ));
            continue;
        }
        for (id, (m, data)) in &now.blobs {
            let (cm, cd) = &c.blobs[id];
            if m != cm {
                why.push(format!("#{ci}: blob {id:#x}: {m:?}, expected {cm:?}"));
                continue 'cand;
            }
            if data.len() != cd.len() {
                why.push(format!("#{ci}: blob {id:#x}: {} bytes", data.len()));
                continue 'cand;
            }
            if data == cd {
                continue;
            }
            // Block by block: this candidate's bytes, or the other's (a write in flight).
            let unit = blk() as usize;
            for (i, blk) in data.chunks(unit).enumerate() {
                let r = i * unit..(i + 1) * unit;
                let any = cands.iter().any(|o| {
                    o.blobs
                        .get(id)
                        .and_then(|(_, od)| od.get(r.clone()))
                        .is_some_and(|ob| ob == blk)
                });
                if !any {
                    why.push(format!(
                        "#{ci}: blob {id:#x} block {i} holds bytes it never had ({:02x?}...)",
                        &blk[..8]
                    ));
                    continue 'cand;
                }
            }
        }
        return None;
    }
    Some(why.join("; "))
}

/// What a sweep explored.
#[derive(Default)]
struct Stats {
    /// Crash images loaded and checked.
    images: usize,
    /// Images in which a page torn by the cut (the super block or an md page with a bad
    /// CRC) was whole again after the load.
    restored: usize,
}

/// Pages of `img` (0 = super block, 1 + i = md page i) whose CRC is bad.
fn torn_pages(img: &[u8]) -> Vec<usize> {
    let sb = inspect::parse_super(&img[..4096]).unwrap();
    let mut v = Vec::new();
    if !sb.crc_ok {
        v.push(0);
    }
    for i in 0..sb.md_len as usize {
        let o = (sb.md_start as usize + i) * 4096;
        if let Some(pg) = img.get(o..o + 4096) {
            if !inspect::parse_md_page(pg).unwrap().crc_ok && pg.iter().any(|&b| b != 0) {
                v.push(1 + i);
            }
        }
    }
    v
}

/// Sweeps `op`.
fn sweep(name: &str, setup: Setup, op: Plan) -> Stats {
    let t0 = Instant::now();
    // Without a flush no map change may be written: every state has the free clusters of the
    // one before the writes, or of the one after them (a cluster written but never committed
    // is free after recovery).
    STRICT_FREE.with(|f| f.set(name.ends_with("no flush")));
    let (image, ids) = prepare(setup);
    let reference = block_on(run(&image, &ids, op, None, true));
    let total = reference.dev.events();
    let unloaded = reference.bs.lock().unwrap().is_none();
    let cps = reference.checkpoints.into_inner().unwrap();
    assert!(
        cps.len() >= 2,
        "{name}: the operation recorded no checkpoint"
    );
    assert!(
        cps.windows(2).any(|w| w[0].1 != w[1].1),
        "{name}: the operation changed nothing a client can see"
    );
    let mut images = 0;
    let mut restored = 0;
    for k in 0..=total {
        let ctx = block_on(run(&image, &ids, op, Some(k), false));
        // Checkpoints reached by the cut; the state must be the last durable one of them,
        // a non-durable one after it, or the next durable one.
        let j = cps
            .iter()
            .rposition(|(ev, _, durable)| *durable && *ev <= k)
            .expect("the first checkpoint is durable");
        let next = cps[j + 1..]
            .iter()
            .position(|(_, _, durable)| *durable)
            .map_or(cps.len(), |i| j + 2 + i);
        let cands: Vec<&Snap> = cps[j..next].iter().map(|(_, s, _)| s).collect();
        for plan in plans(ctx.dev.pending_writes()) {
            let img = ctx.dev.crash_image(plan);
            images += 1;
            if unloaded && k == total {
                let sb = inspect::parse_super(&img[..4096]).unwrap();
                assert_eq!(
                    sb.clean, 1,
                    "{name}: k={k} {plan:?}: unload returned, not clean"
                );
            }
            let torn = torn_pages(&img);
            block_on(async {
                let dev = MemBsDev::from_bytes(blk(), img);
                let bs = Blobstore::load(dev.clone(), opts())
                    .await
                    .unwrap_or_else(|e| panic!("{name}: k={k}/{total} {plan:?}: load: {e}"));
                let after = torn_pages(&dev.snapshot());
                if torn.iter().any(|p| !after.contains(p)) {
                    restored += 1;
                }
                let now = state(&bs).await;
                if let Some(why) = mismatch(&now, &cands) {
                    panic!("{name}: k={k}/{total} {plan:?}: neither state: {why}");
                }
                unload_and_check_for(&dev, bs, &format!("{name}: k={k}/{total} {plan:?}")).await;
            });
        }
    }
    eprintln!(
        "{name}: {total} events, {} checkpoints, {images} crash images ({restored} with a torn page restored), {:?}",
        cps.len() - 1,
        t0.elapsed()
    );
    Stats { images, restored }
}

// ------------------------------------------------------------------------- setups

/// Thin blob T (4 clusters, 0 and 2 written, xattr), thick blob K (2 clusters, 1 written),
/// and every free cluster still holding a deleted blob's bytes (clear method None), so that
/// a lost write of a new cluster shows.
fn setup_thin(bs: &Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + '_>> {
    Box::pin(async move {
        let all = bs.free_clusters();
        let junk = create(bs, clusters(all).clear(ClearMethod::None)).await;
        let b = bs.open_blob(junk).await.unwrap();
        let mut buf = IoBuf::new(all as usize * CLUSTER as usize, 4096);
        buf.fill(0xee);
        b.write(0, buf).await.unwrap();
        b.close().await.unwrap();
        bs.delete_blob(junk).await.unwrap();
        let id = create(bs, clusters(4).thin().xattr("name", b"t\0")).await;
        fill(bs, id, 0, 0x11).await;
        fill(bs, id, 2, 0x22).await;
        let thick = create(bs, clusters(2)).await;
        fill(bs, thick, 1, 0x33).await;
        vec![id, thick]
    })
}

/// setup_thin, then snapshot S of T (T is S's only clone); T overwrote clusters 2 and 3.
/// ids: [T, S, K].
fn setup_chain(bs: &Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + '_>> {
    Box::pin(async move {
        let ids = setup_thin(bs).await;
        let s = bs.create_snapshot(ids[0], vec![]).await.unwrap();
        fill(bs, ids[0], 2, 0x44).await;
        fill(bs, ids[0], 3, 0x55).await;
        vec![ids[0], s, ids[1]]
    })
}

/// S0 <- S1 <- T. ids: [T, S0, S1].
fn setup_chain2(bs: &Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + '_>> {
    Box::pin(async move {
        let ids = setup_chain(bs).await;
        let s1 = bs.create_snapshot(ids[0], vec![]).await.unwrap();
        fill(bs, ids[0], 1, 0x66).await;
        vec![ids[0], ids[1], s1]
    })
}

/// An esnap clone E with one copied cluster. ids: [E].
fn setup_esnap(bs: &Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + '_>> {
    Box::pin(async move {
        let e = create(bs, clusters(4).esnap(b"base")).await;
        fill(bs, e, 1, 0x31).await;
        vec![e]
    })
}

/// setup_esnap, a snapshot of E (which takes the esnap link) and one more write.
/// ids: [E, S].
fn setup_esnap_snap(bs: &Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + '_>> {
    Box::pin(async move {
        let mut ids = setup_esnap(bs).await;
        let s = bs.create_snapshot(ids[0], vec![]).await.unwrap();
        fill(bs, ids[0], 2, 0x32).await;
        ids.push(s);
        ids
    })
}

/// setup_chain plus a parentless thin blob U of the same size and a thin blob V that never
/// allocated. ids: [T, S, K, U, V].
fn setup_reparent(bs: &Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + '_>> {
    Box::pin(async move {
        let mut ids = setup_chain(bs).await;
        let u = create(bs, clusters(4).thin()).await;
        fill(bs, u, 3, 0x77).await;
        let v = create(bs, clusters(4).thin()).await;
        ids.push(u);
        ids.push(v);
        ids
    })
}

/// setup_reparent plus an esnap clone E with one copied cluster (1). ids: [T, S, K, U, V, E].
fn setup_mixed(bs: &Blobstore) -> Pin<Box<dyn Future<Output = Vec<BlobId>> + '_>> {
    Box::pin(async move {
        let mut ids = setup_reparent(bs).await;
        let e = create(bs, clusters(4).esnap(b"base")).await;
        fill(bs, e, 1, 0x31).await;
        ids.push(e);
        ids
    })
}

// ------------------------------------------------------------------------- operations

/// Writes `n` blocks of `byte` at block `off` of `b`: the write's result.
async fn write_blocks(b: &Blob, off: u64, n: usize, byte: u8) -> blobstore::Result<()> {
    let mut buf = IoBuf::new(n * blk() as usize, 4096);
    buf.fill(byte);
    b.write(off, buf).await.map(|_| ())
}

/// First writes of every kind on the setup_mixed blobs, no flush: partial and whole-cluster
/// first writes of the parentless thin blobs V (no extent page yet) and U (one extent page),
/// copy-on-write of the clone T and of the esnap clone E, then an overwrite of a cluster
/// allocated just before (the direct path to a cluster whose map change is pending).
async fn first_writes(c: &Ctx, bs: &[Blob]) -> bool {
    let [t, u, v, e] = bs else { return false };
    let l = lpc();
    let l1 = l as usize;
    for (b, off, n, byte) in [
        (v, l + 1, 1, 0xc1),
        (v, 3 * l, l1, 0xc2),
        (u, l + 2, 1, 0xc3),
        (t, l + 3, 2, 0xc4),
        (e, 2 * l + 1, 1, 0xc5),
        (e, 3 * l, l1, 0xc6),
    ] {
        if c.ok("write", write_blocks(b, off, n, byte).await).is_none() {
            return false;
        }
    }
    c.ck_soft().await;
    if c.ok("write", write_blocks(v, l + 2, 1, 0xc7).await)
        .is_none()
    {
        return false;
    }
    c.ck_soft().await;
    true
}

/// Opens T, U, V and E of setup_mixed.
async fn open_mixed(c: &Ctx) -> Option<Vec<Blob>> {
    let mut v = Vec::new();
    for i in [0, 3, 4, 5] {
        v.push(c.open(c.ids[i]).await?);
    }
    Some(v)
}

macro_rules! op {
    (|$c:ident| $body:block) => {{
        fn f<'a>($c: &'a Ctx) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
            Box::pin(async move { $body })
        }
        f as Op
    }};
}

fn thin_opts(n: u64) -> BlobOpts {
    BlobOpts {
        num_clusters: n,
        thin: true,
        xattrs: vec![("name".into(), b"new\0".to_vec())],
        ..Default::default()
    }
}

fn thin3() -> BlobOpts {
    thin_opts(3)
}
fn rle2() -> BlobOpts {
    thin_opts(2).rle()
}
fn thick3_zeroed() -> BlobOpts {
    clusters(3).clear(ClearMethod::WriteZeroes)
}
fn thick10() -> BlobOpts {
    clusters(10)
}
fn esnap4() -> BlobOpts {
    thin_opts(4).esnap(b"base")
}

/// Every operation swept: (name, setup, plan).
fn operations() -> Vec<(&'static str, Setup, Plan)> {
    use Step::*;
    let steps = Plan::Steps;
    vec![
        (
            "create thin, thin with RLE, thick",
            setup_thin,
            steps(&[Create(thin3), Create(rle2), Create(thick3_zeroed)]),
        ),
        ("esnap clone create", setup_thin, steps(&[Create(esnap4)])),
        (
            "snapshot of thin and of thick",
            setup_thin,
            steps(&[Snapshot(0, Some(b"s\0")), Snapshot(1, None)]),
        ),
        (
            "esnap snapshot create",
            setup_esnap,
            steps(&[Snapshot(0, None)]),
        ),
        ("clone", setup_chain, steps(&[Clone(1, b"c\0")])),
        (
            "delete thin and thick",
            setup_thin,
            steps(&[Delete(0), Delete(1)]),
        ),
        ("snapshot delete (merge)", setup_chain, steps(&[Delete(1)])),
        ("middle snapshot delete", setup_chain2, steps(&[Delete(2)])),
        (
            "esnap snapshot delete",
            setup_esnap_snap,
            steps(&[Delete(1)]),
        ),
        (
            "resize thick up and down",
            setup_thin,
            steps(&[Resize(1, &[5, 1])]),
        ),
        (
            "resize thin down and up",
            setup_thin,
            steps(&[Resize(0, &[1, 8])]),
        ),
        (
            "xattr set, remove, read-only, close with dirty md",
            setup_thin,
            Plan::Custom(op!(|c| {
                let Some(b) = c.open(c.ids[0]).await else {
                    return;
                };
                c.ok("set", b.set_xattr("big", &[7u8; 3000]));
                c.ok("set", b.set_xattr("big2", &[8u8; 3000]));
                c.ok("sync", b.sync_md().await);
                c.ck().await;
                c.ok("remove", b.remove_xattr("big"));
                c.ok("remove", b.remove_xattr("name"));
                c.ok("sync", b.sync_md().await);
                c.ck().await;
                c.ok("set", b.set_xattr("name", b"renamed\0"));
                c.ok("close", b.close().await);
                c.ck().await;
                let Some(k) = c.open(c.ids[1]).await else {
                    return;
                };
                c.ok("ro", k.set_read_only());
                c.ok("sync", k.sync_md().await);
                c.ok("close", k.close().await);
                c.ck().await;
            })),
        ),
        ("set_parent", setup_reparent, steps(&[SetParent(3, 1)])),
        (
            "set_external_parent",
            setup_reparent,
            steps(&[SetExternalParent(3)]),
        ),
        ("inflate", setup_chain, steps(&[Inflate(0)])),
        ("decouple", setup_chain2, steps(&[Decouple(0)])),
        ("esnap inflate", setup_esnap, steps(&[Inflate(0)])),
        ("grow", setup_thin, steps(&[Grow])),
        ("set_super_blob", setup_thin, steps(&[SetSuperBlob(1)])),
        (
            "writes that allocate, then flush",
            setup_reparent,
            Plan::Custom(op!(|c| {
                // Partial write of an unallocated cluster of a clone: copy-on-write.
                c.write_flush(c.ids[0], 2, 1, 0x81).await;
                // The first write of a thin blob: a new extent page.
                c.write_flush(c.ids[4], 2 * lpc() + 2, 1, 0x82).await;
                // A whole cluster, no copy.
                c.write_flush(c.ids[3], 0, lpc() as usize, 0x83).await;
                // Overwrite of allocated blocks across a cluster boundary (torn allowed).
                c.write_flush(c.ids[3], lpc() - 1, 2, 0x84).await;
            })),
        ),
        (
            "concurrent first writes to one blob and to two blobs, then flush",
            setup_reparent,
            Plan::Custom(op!(|c| {
                // Every I/O yields once, so the allocations below wait for their commit
                // together and are committed in shared batches (group commit).
                c.dev.set_yield(true);
                let (Some(t), Some(u), Some(v)) = (
                    c.open(c.ids[0]).await,
                    c.open(c.ids[3]).await,
                    c.open(c.ids[4]).await,
                ) else {
                    return;
                };
                let w = |b: &Blob, off: u64, byte: u8| {
                    let b = b.clone();
                    async move {
                        let mut buf = IoBuf::new(blk() as usize, 4096);
                        buf.fill(byte);
                        b.write(off, buf).await.map(|_| ())
                    }
                };
                // Copy-on-write of two clusters of the clone T, three first writes of U
                // (an extent page rewritten in place) and two of V (no extent page yet: a
                // whole-md commit), all at once.
                let rs = futures::future::join_all([
                    Box::pin(w(&t, 1, 0xa1)) as Pin<Box<dyn Future<Output = _>>>,
                    Box::pin(w(&u, 2, 0xa2)),
                    Box::pin(w(&t, 2 * lpc() - 1, 0xa3)),
                    Box::pin(w(&v, 1, 0xa4)),
                    Box::pin(w(&u, lpc(), 0xa5)),
                    Box::pin(w(&v, lpc() + 1, 0xa6)),
                    Box::pin(w(&u, 3 * lpc() - 1, 0xa7)),
                ])
                .await;
                c.writes_then_flush(rs, &t).await;
                // Again, V's remaining clusters with an overwrite of T in between.
                let rs = futures::future::join_all([
                    Box::pin(w(&v, 2 * lpc(), 0xb1)) as Pin<Box<dyn Future<Output = _>>>,
                    Box::pin(w(&t, 2, 0xb2)),
                    Box::pin(w(&v, 4 * lpc() - 1, 0xb3)),
                ])
                .await;
                c.writes_then_flush(rs, &v).await;
                for b in [t, u, v] {
                    c.ok("close", b.close().await);
                }
            })),
        ),
        (
            "first writes to thin blobs, a clone and an esnap clone, no flush",
            setup_mixed,
            Plan::Custom(op!(|c| {
                let Some(bs) = open_mixed(c).await else {
                    return;
                };
                first_writes(c, &bs).await;
            })),
        ),
        (
            "first writes to thin blobs, a clone and an esnap clone, then flush",
            setup_mixed,
            Plan::Custom(op!(|c| {
                let Some(bs) = open_mixed(c).await else {
                    return;
                };
                if !first_writes(c, &bs).await {
                    return;
                }
                c.ok("flush", bs[1].flush().await);
                c.ck().await;
                // Again on a dirty store (no dirty-mark flush before the commit): the
                // `PreCommit` flush alone orders these clusters' data before their maps.
                let [t, u, v, e] = &bs[..] else { return };
                let l = lpc();
                for (b, off, n, byte) in [
                    (v, 1, 1, 0xc8),
                    (e, 2, 1, 0xc9),
                    (u, 0, l as usize, 0xca),
                    (t, 3, 1, 0xcb),
                ] {
                    c.ok("write", write_blocks(b, off, n, byte).await);
                }
                c.ck_soft().await;
                c.ok("flush", v.flush().await);
                c.ck().await;
                for b in bs {
                    c.ok("close", b.close().await);
                }
                c.ck().await;
            })),
        ),
        (
            "first writes pending at a snapshot, an unmap release, a close and a delete",
            setup_mixed,
            Plan::Custom(op!(|c| {
                let l = lpc();
                let Some(v) = c.open(c.ids[4]).await else {
                    return;
                };
                // Snapshot of V with two first writes pending: they move to the snapshot.
                c.ok("write", write_blocks(&v, 2 * l + 1, 1, 0xd1).await);
                c.ok("write", write_blocks(&v, 3 * l, l as usize, 0xd2).await);
                c.ck_soft().await;
                c.ok("snapshot", c.bs().create_snapshot(c.ids[4], vec![]).await);
                c.ck().await;
                // Unmap of U's cluster 1, whose first write is pending, with another pending.
                let Some(u) = c.open(c.ids[3]).await else {
                    return;
                };
                c.ok("write", write_blocks(&u, l, l as usize, 0xd3).await);
                c.ok("write", write_blocks(&u, 2 * l + 3, 1, 0xd4).await);
                c.ck_soft().await;
                c.ok("unmap", u.unmap(l, l).await);
                c.ck().await;
                // Close of E with a first write pending, then its delete.
                let Some(e) = c.open(c.ids[5]).await else {
                    return;
                };
                c.ok("write", write_blocks(&e, 2 * l + 1, 1, 0xd5).await);
                c.ck_soft().await;
                c.ok("close", e.close().await);
                c.ck_soft().await;
                c.ok("delete", c.bs().delete_blob(c.ids[5]).await);
                c.ck().await;
                c.ok("close", v.close().await);
                c.ok("close", u.close().await);
                c.ck().await;
            })),
        ),
        (
            "write_zeroes that allocates, then flush",
            setup_chain,
            steps(&[WriteZeroes(0, 1, 2)]),
        ),
        // The released cluster is claimed again by a thick blob.
        (
            "unmap release",
            setup_thin,
            steps(&[UnmapFirstCluster(0), Create(thick10)]),
        ),
        (
            "create then unload",
            setup_chain,
            Plan::Custom(op!(|c| {
                let id = c.ok("create", c.bs().create_blob(thin_opts(2)).await);
                c.push(id);
                c.ck().await;
                if let Some(id) = c.made(0) {
                    c.write_flush(id, 1, 1, 0x91).await;
                }
                c.ok("delete", c.bs().delete_blob(c.ids[2]).await);
                c.ck().await;
                let bs = c.bs.lock().unwrap().take();
                if let Some(bs) = bs {
                    c.ok("unload", bs.unload().await);
                }
                c.ck().await;
            })),
        ),
    ]
}

fn sweep_all(filter: impl Fn(&str) -> bool) -> Stats {
    let mut t = Stats::default();
    for (n, s, o) in operations().into_iter().filter(|(n, _, _)| filter(n)) {
        let st = sweep(n, s, o);
        t.images += st.images;
        t.restored += st.restored;
    }
    t
}

#[test]
fn crash_sweep_every_metadata_operation() {
    let t0 = Instant::now();
    let st = sweep_all(|_| true);
    eprintln!(
        "crash sweep: {} crash images in {:?}",
        st.images,
        t0.elapsed()
    );
}

/// The same sweep on a device with 512-byte io units: md pages (4 KiB) and the super block
/// tear too, so roots and extent pages rewritten in place must come back from their shadows.
#[test]
fn crash_sweep_every_metadata_operation_512_byte_io_unit() {
    IO_UNIT.with(|c| c.set(512));
    let t0 = Instant::now();
    let st = sweep_all(|_| true);
    eprintln!(
        "crash sweep (512): {} crash images, {} with a torn page restored, in {:?}",
        st.images,
        st.restored,
        t0.elapsed()
    );
    assert!(
        st.restored > 0,
        "no crash image tore a page: the sweep does not test tearing"
    );
}

/// A crash while the store is created: before init returns the device may hold no store
/// (load fails cleanly) or an empty one; after it returns, an empty store loads.
#[test]
fn crash_sweep_init() {
    block_on(async {
        let dev = MemBsDev::write_back(blk(), dev_blocks());
        Blobstore::init(dev.clone(), opts()).await.unwrap();
        let total = dev.events();
        for k in 0..=total {
            let dev = MemBsDev::write_back(blk(), dev_blocks());
            dev.set_fault(Fault::CutAfter(k));
            let _ = Blobstore::init(dev.clone(), opts()).await;
            for plan in PLANS {
                let img = MemBsDev::from_bytes(blk(), dev.crash_image(plan));
                match Blobstore::load(img.clone(), opts()).await {
                    Ok(bs) => {
                        assert!(bs.blob_ids().is_empty(), "k={k} {plan:?}");
                        unload_and_check_for(&img, bs, &format!("k={k} {plan:?}")).await;
                    }
                    Err(e) => assert!(k < total, "k={k} {plan:?}: init returned, load: {e}"),
                }
            }
        }
    });
}

/// The sweep catches a missing barrier: with one kind of flush turned off, some operation
/// fails it.
#[test]
fn a_missing_barrier_fails_the_sweep() {
    // (barrier left out, operation swept, io unit)
    let cases: [(Barrier, &str, u32); 6] = [
        (Barrier::PreCommit, "writes that allocate, then flush", 4096),
        (
            Barrier::PreCommit,
            "first writes to thin blobs, a clone and an esnap clone, then flush",
            4096,
        ),
        (
            Barrier::PostCommit,
            "create thin, thin with RLE, thick",
            4096,
        ),
        (Barrier::UnloadMasks, "create then unload", 4096),
        (Barrier::Super, "set_super_blob", 4096),
        (Barrier::Shadow, "snapshot of thin and of thick", 512),
    ];
    for (barrier, op, unit) in cases {
        IO_UNIT.with(|c| c.set(unit));
        skip_barrier(Some(barrier));
        let r = std::panic::catch_unwind(|| sweep_all(|n| n == op));
        skip_barrier(None);
        assert!(
            r.is_err(),
            "without the {barrier:?} barrier the sweep of {op:?} still passed"
        );
    }
    // With every barrier in place the same sweeps pass: `crash_sweep_every_metadata_*`.
}
