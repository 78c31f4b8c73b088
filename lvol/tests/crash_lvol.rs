//! Power-loss sweep of the lvol layer on a device with a volatile write cache.
//!
//! An lvol store lives on bdev-core's `cached` device (RAM behind `crashsim`'s write-back
//! cache: writes since the last completed flush are lost in any subset and torn at block
//! granularity on a crash). Every lvol-level metadata operation runs in turn; for each one the
//! device's log of writes and flushes is replayed and crash images are taken at every cut
//! point (a fixed-seed sample when an operation writes a lot) under `LoseAll`, `KeepAll` and a
//! few `Random` seeds. Each image is opened again in a fresh registry (tasting) and checked:
//!
//! * the store loads (once its create returned);
//! * every lvol is as it was before the operation or as it is after it (name, UUID, size,
//!   thin, read-only, parent), and lvols the operation did not touch are exactly as before;
//! * a cut after the operation returned shows the result of the operation (it is durable);
//! * every byte of every lvol is what the client wrote and flushed (or inherited from its
//!   parent, or zeroes): nothing lost, nothing it never had.
//!
//! Client data is written through the lvol bdevs and flushed with the bdevs' flush between
//! operations, so it is all acknowledged by a completed flush.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use bdev_core::backend::cached::{CachedBdev, CrashPlan};
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{BlockDevice, IoBuf, Registry};
use blobstore::ClearMethod;
use common::*;
use futures::executor::block_on;
use lvol::{Lvol, LvolModule, LvsOpts};
use uuid::Uuid;

const BL: u32 = 4096;
const CLUSTER: u32 = 128 * 1024;
const DEV_BYTES: u64 = 4 * MIB;
const GROWN_BYTES: u64 = 5 * MIB;
const ESNAP_UUID: Uuid = Uuid::from_u128(0x7e5a_0000_e5a0_4e5a_8e5a_0000_0000_00e5);
/// Most cut points visited per operation (a fixed-seed sample beyond that).
const MAX_CUTS: usize = 24;
/// Random crash states per cut point (halved for operations with many writes, to keep the
/// sweep near a minute in a debug build).
const RANDOM_SEEDS: u64 = 4;

/// What an lvol looks like from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Meta {
    name: String,
    size: u64,
    thin: bool,
    read_only: bool,
    /// `none`, `snap:<uuid>` or `esnap:<bdev uuid>`.
    parent: String,
}

#[derive(Clone, Debug)]
struct State {
    lvs_name: String,
    lvs_uuid: Uuid,
    lvols: BTreeMap<Uuid, (Meta, Vec<u8>)>,
}

fn esnap_data() -> Vec<u8> {
    pattern(0xe5, 0, 2 * CLUSTER as usize)
}

async fn register_esnap_base(reg: &Registry) {
    let dev = MallocBdev::create("E", 2 * u64::from(CLUSTER / BL), BL, Some(ESNAP_UUID)).unwrap();
    dev.write(0, IoBuf::from_slice(&esnap_data(), 1))
        .await
        .unwrap();
    reg.register(dev).await.unwrap();
}

fn meta(l: &Lvol) -> Meta {
    let parent = if let Some(p) = l.parent_lvol() {
        format!("snap:{}", p.uuid())
    } else if let Some(e) = l.external_snapshot_name() {
        format!("esnap:{e}")
    } else {
        "none".into()
    };
    Meta {
        name: l.name(),
        size: l.size_bytes(),
        thin: l.is_thin(),
        read_only: l.is_read_only(),
        parent,
    }
}

/// The one store of `m` with every lvol's metadata and bytes; an error when it has no store
/// or an lvol cannot be read.
async fn capture(m: &LvolModule, reg: &Registry) -> Result<State, String> {
    let stores = m.lvstores();
    let [s] = stores.as_slice() else {
        return Err(format!("{} lvol stores loaded, want 1", stores.len()));
    };
    let mut lvols = BTreeMap::new();
    for l in s.lvols_in_order() {
        let d = reg
            .open(l.unique_id(), false)
            .map_err(|e| format!("open lvol {}: {e}", l.name()))?;
        let total = d.num_blocks() * u64::from(d.block_len());
        let mut data = Vec::with_capacity(total as usize);
        let mut off = 0;
        while off < total {
            let n = (total - off).min(MIB) as usize;
            let r = read_at(&d, off, n)
                .await
                .map_err(|e| format!("read lvol {} at {off}: {e}", l.name()))?;
            data.extend(r);
            off += n as u64;
        }
        lvols.insert(l.uuid(), (meta(&l), data));
    }
    Ok(State {
        lvs_name: s.name(),
        lvs_uuid: s.uuid(),
        lvols,
    })
}

/// Opens a crash image in a fresh registry (tasting) and captures what it holds.
fn reopen(img: Vec<u8>) -> Result<State, String> {
    block_on(async {
        let (reg, m) = setup();
        register_esnap_base(&reg).await;
        let dev = CachedBdev::from_image("dev", img, BL, None).unwrap();
        reg.register(dev).await.unwrap();
        reg.wait_for_examine().await;
        capture(&m, &reg).await
    })
}

/// Checks a reopened image against the states before and after the operation. `pre` is
/// `None` for the store's own create; `done` says the cut is after the operation returned.
fn judge(
    got: Result<State, String>,
    pre: Option<&State>,
    post: &State,
    done: bool,
) -> Result<(), String> {
    let got = match (got, pre) {
        (Ok(g), _) => g,
        // Before the create returned, no store is a valid outcome.
        (Err(_), None) if !done => return Ok(()),
        (Err(e), _) => return Err(format!("store does not load: {e}")),
    };
    if got.lvs_uuid != post.lvs_uuid {
        return Err(format!(
            "store uuid {} want {}",
            got.lvs_uuid, post.lvs_uuid
        ));
    }
    let names: Vec<&str> = pre
        .iter()
        .map(|p| p.lvs_name.as_str())
        .chain([post.lvs_name.as_str()])
        .filter(|n| !done || *n == post.lvs_name)
        .collect();
    if !names.contains(&got.lvs_name.as_str()) {
        return Err(format!(
            "store name {:?}, want one of {names:?}",
            got.lvs_name
        ));
    }
    let empty = BTreeMap::new();
    let pre_l = pre.map(|p| &p.lvols).unwrap_or(&empty);
    for (u, (gm, gd)) in &got.lvols {
        let cands: Vec<&(Meta, Vec<u8>)> = if done {
            post.lvols.get(u).into_iter().collect()
        } else {
            pre_l.get(u).into_iter().chain(post.lvols.get(u)).collect()
        };
        if cands.is_empty() {
            return Err(format!("lvol {u} ({gm:?}) should not exist"));
        }
        let Some((_, want)) = cands.iter().find(|(m, _)| m == gm) else {
            let w: Vec<&Meta> = cands.iter().map(|(m, _)| m).collect();
            return Err(format!("lvol {u}: {gm:?}, want one of {w:?}"));
        };
        if gd != want {
            let first = gd.iter().zip(want.iter()).position(|(a, b)| a != b);
            return Err(format!(
                "lvol {} data differs (len {} vs {}, first byte at {first:?})",
                gm.name,
                gd.len(),
                want.len()
            ));
        }
    }
    // Lost lvols: present before and after the operation (or after it returned), yet gone.
    for (u, (m, _)) in &post.lvols {
        let required = done || pre_l.contains_key(u);
        if required && !got.lvols.contains_key(u) {
            return Err(format!("lvol {} ({u}) is gone", m.name));
        }
    }
    if done {
        for (u, (m, _)) in pre_l {
            if !post.lvols.contains_key(u) && got.lvols.contains_key(u) {
                return Err(format!("deleted lvol {} ({u}) is back", m.name));
            }
        }
    }
    Ok(())
}

/// Cut points to visit out of `0..=events`: all, or a fixed-seed sample with both ends.
fn cuts(events: usize, seed: u64) -> Vec<usize> {
    if events < MAX_CUTS {
        return (0..=events).collect();
    }
    let mut v: Vec<usize> = (0..MAX_CUTS - 2)
        .map(|i| {
            let mut x = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x ^= x >> 31;
            x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x ^= x >> 29;
            1 + (x % (events as u64 - 1)) as usize
        })
        .collect();
    v.push(0);
    v.push(events);
    v.sort_unstable();
    v.dedup();
    v
}

/// Result of sweeping one operation.
#[derive(Default)]
struct Sweep {
    images: usize,
    failures: Vec<String>,
}

/// Crash images of every visited cut of the device's log since its mark, judged.
fn sweep(dev: &CachedBdev, op: &str, pre: Option<&State>, post: &State) -> Sweep {
    let events = dev.events();
    let visit = cuts(events, op.len() as u64 * 7919);
    let mut out = Sweep::default();
    let mut last_flushed_at = None;
    dev.for_each_cut(|cut, disk| {
        if visit.binary_search(&cut).is_err() {
            return true;
        }
        let done = cut == events;
        let mut plans = vec![CrashPlan::KeepAll];
        // LoseAll only differs from the previous cut's LoseAll after a flush.
        if last_flushed_at != Some(disk.flushes()) || done {
            plans.push(CrashPlan::LoseAll);
            last_flushed_at = Some(disk.flushes());
        }
        if disk.pending_writes() > 1 {
            let seeds = if events > 12 {
                RANDOM_SEEDS / 2
            } else {
                RANDOM_SEEDS
            };
            for s in 0..seeds {
                plans.push(CrashPlan::Random(cut as u64 * 1000 + s + 1));
            }
        }
        for plan in plans {
            out.images += 1;
            let img = disk.crash_image(plan);
            if let Err(e) = judge(reopen(img), pre, post, done) {
                out.failures
                    .push(format!("{op}: cut {cut}/{events} {plan:?}: {e}"));
            }
        }
        true
    });
    out
}

fn lvol_named(m: &LvolModule, name: &str) -> Arc<Lvol> {
    let s = m.lvstores().pop().expect("store");
    s.lvol_by_name(name)
        .unwrap_or_else(|| panic!("lvol {name}"))
}

/// Writes `data` at `off` of lvol `name` through its bdev, then flushes the bdev.
async fn client_write(reg: &Registry, m: &LvolModule, name: &str, off: u64, data: &[u8]) {
    let l = lvol_named(m, name);
    let d = reg.open(l.unique_id(), true).unwrap();
    write_at(&d, off, data).await.unwrap();
    d.flush().await.expect("lvol flush");
}

type OpFn = Box<dyn Fn(&Registry, &LvolModule, &CachedBdev) -> Result<(), String>>;
/// Client writes (each flushed) after an operation returned, outside its sweep window.
type DataFn = fn(&Registry, &LvolModule);

fn op(f: impl Fn(&Registry, &LvolModule, &CachedBdev) -> Result<(), String> + 'static) -> OpFn {
    Box::new(f)
}

fn e2s(e: lvol::LvolError) -> String {
    e.to_string()
}

const CS: u64 = CLUSTER as u64;

fn no_data(_: &Registry, _: &LvolModule) {}

/// An operation without client writes after it.
fn step(name: &'static str, f: OpFn) -> (&'static str, OpFn, DataFn) {
    (name, f, no_data)
}

/// Creates lvol `name` of `size` bytes (thin or thick) in the store.
fn new_lvol(name: &'static str, size: u64, thin: bool) -> OpFn {
    op(move |_, m, _| {
        let s = m.lvstores().pop().unwrap();
        block_on(m.create_lvol(&s, name, size, thin, ClearMethod::Default))
            .map(|_| ())
            .map_err(e2s)
    })
}

/// `f` on lvol `name` of the store.
fn on(
    name: &'static str,
    f: impl Fn(&LvolModule, &Arc<Lvol>) -> Result<(), lvol::LvolError> + 'static,
) -> OpFn {
    op(move |_, m, _| f(m, &lvol_named(m, name)).map_err(e2s))
}

/// Every lvol-level metadata operation, in order, with the client writes that follow it.
fn ops() -> Vec<(&'static str, OpFn, DataFn)> {
    vec![
        (
            "lvstore create",
            op(|_, m, _| {
                let mut o = LvsOpts::new("lvs");
                o.cluster_size = CLUSTER;
                block_on(m.create_lvstore("dev", o))
                    .map(|_| ())
                    .map_err(e2s)
            }),
            no_data,
        ),
        (
            "lvol create thick",
            new_lvol("a", 2 * CS, false),
            |reg, m| {
                block_on(client_write(reg, m, "a", 0, &pattern(0xa1, 0, 64 * 1024)));
                block_on(client_write(
                    reg,
                    m,
                    "a",
                    CS + 4096,
                    &pattern(0xa2, 0, 8192),
                ));
            },
        ),
        ("lvol create thin", new_lvol("b", 4 * CS, true), |reg, m| {
            block_on(client_write(reg, m, "b", CS, &pattern(0xb1, 0, 8192)));
            block_on(client_write(reg, m, "b", 3 * CS, &pattern(0xb3, 0, 4096)));
        }),
        (
            "snapshot",
            on("a", |m, a| block_on(m.create_snapshot(a, "sa")).map(|_| ())),
            // A copy-on-write write to the new clone.
            |reg, m| block_on(client_write(reg, m, "a", 8192, &pattern(0xa3, 0, 4096))),
        ),
        (
            "clone",
            on("sa", |m, sa| block_on(m.create_clone(sa, "c")).map(|_| ())),
            |reg, m| block_on(client_write(reg, m, "c", CS, &pattern(0xc1, 0, 4096))),
        ),
        step(
            "resize up",
            on("b", |m, b| block_on(m.resize_lvol(b, 6 * CS))),
        ),
        step(
            "resize down",
            on("b", |m, b| block_on(m.resize_lvol(b, 2 * CS))),
        ),
        step("rename", on("c", |m, c| block_on(m.rename_lvol(c, "c2")))),
        (
            "esnap clone create",
            op(|_, m, _| {
                let s = m.lvstores().pop().unwrap();
                block_on(m.create_esnap_clone(&ESNAP_UUID.to_string(), &s, "e"))
                    .map(|_| ())
                    .map_err(e2s)
            }),
            |reg, m| block_on(client_write(reg, m, "e", 4096, &pattern(0xe1, 0, 4096))),
        ),
        (
            "lvol create thin (set_parent target)",
            new_lvol("t", 2 * CS, true),
            no_data,
        ),
        step(
            "set_parent",
            on("t", |m, t| block_on(m.set_parent(t, &lvol_named(m, "sa")))),
        ),
        step("inflate", on("c2", |m, c2| block_on(m.inflate_lvol(c2)))),
        step("decouple", on("a", |m, a| block_on(m.decouple_parent(a)))),
        step(
            "set read-only",
            on("b", |m, b| block_on(m.set_read_only(b))),
        ),
        step("delete", on("c2", |m, c2| block_on(m.delete_lvol(c2)))),
        (
            "grow",
            op(|reg, m, dev| {
                dev.resize(GROWN_BYTES / u64::from(BL))
                    .map_err(|e| e.to_string())?;
                reg.notify_resize("dev");
                let s = m.lvstores().pop().unwrap();
                block_on(m.grow_lvstore(&s)).map_err(e2s)
            }),
            no_data,
        ),
        (
            "lvstore rename",
            op(|_, m, _| {
                let s = m.lvstores().pop().unwrap();
                block_on(m.rename_lvstore(&s, "lvs2")).map_err(e2s)
            }),
            no_data,
        ),
    ]
}

/// Runs every operation with a sweep after each; returns the operations with failures and a
/// per-operation report.
fn run_sweep(write_through: bool) -> (Vec<&'static str>, String) {
    let t0 = Instant::now();
    let (reg, m) = setup();
    block_on(register_esnap_base(&reg));
    let dev = CachedBdev::create("dev", DEV_BYTES / u64::from(BL), BL, None).unwrap();
    dev.set_write_through(write_through);
    block_on(reg.register(dev.clone())).unwrap();
    block_on(reg.wait_for_examine());
    let mut pre: Option<State> = None;
    let mut report = String::new();
    let mut failed_ops = Vec::new();
    let mut images = 0;
    for (name, f, data) in ops() {
        dev.mark();
        f(&reg, &m, &dev).unwrap_or_else(|e| panic!("{name} failed on the live store: {e}"));
        let post = block_on(capture(&m, &reg)).expect("live state");
        let s = sweep(&dev, name, pre.as_ref(), &post);
        images += s.images;
        let by = |p: &str| s.failures.iter().filter(|f| f.contains(p)).count();
        let _ = writeln!(
            report,
            "{name}: {} device events, {} images, {} failed (LoseAll {}, KeepAll {}, Random {})",
            dev.events(),
            s.images,
            s.failures.len(),
            by("LoseAll"),
            by("KeepAll"),
            by("Random")
        );
        if !s.failures.is_empty() {
            let _ = writeln!(report, "    first: {}", s.failures[0]);
            failed_ops.push(name);
        }
        data(&reg, &m);
        pre = Some(block_on(capture(&m, &reg)).expect("live state"));
    }
    let _ = writeln!(
        report,
        "{images} crash images in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    println!("{report}");
    (failed_ops, report)
}

/// Every lvol metadata operation survives a power cut at every write (`volatile_cache`), and
/// the control: on a device that keeps nothing volatile (`write_through`), a crash state is
/// an in-order prefix of the writes, so the same sweep passes. What fails on the first but
/// passes on the second is a missing flush, not a checker that asks too much.
#[rstest::rstest]
#[case::volatile_cache(false, "operations not crash-safe")]
#[case::write_through(true, "in-order crash states fail")]
fn every_lvol_metadata_operation_survives_a_power_cut(
    #[case] write_through: bool,
    #[case] what: &str,
) {
    let (failed_ops, report) = run_sweep(write_through);
    assert!(failed_ops.is_empty(), "{what}: {failed_ops:?}\n{report}");
}

#[test]
fn flushed_client_writes_survive_losing_every_unflushed_write() {
    let (reg, m) = setup();
    let dev = CachedBdev::create("dev", DEV_BYTES / u64::from(BL), BL, None).unwrap();
    block_on(async {
        reg.register(dev.clone()).await.unwrap();
        let s = lvs(&m, "dev", "lvs", CLUSTER).await;
        let thin = thin_lvol(&m, &s, "thin", 8 * u64::from(CLUSTER)).await;
        let thick = thick_lvol(&m, &s, "thick", 2 * u64::from(CLUSTER)).await;
        let dt = reg.open(thin.unique_id(), true).unwrap();
        let dk = reg.open(thick.unique_id(), true).unwrap();
        // The lvols say what their store's device says about a volatile cache.
        assert!(dt.device().has_volatile_cache());
        malloc(&reg, "M", 4 * MIB, BL).await;
        let ms = lvs(&m, "M", "lvs_m", CLUSTER).await;
        let ml = m
            .create_lvol(&ms, "v", u64::from(CLUSTER), true, ClearMethod::Default)
            .await
            .unwrap();
        assert!(!reg.get(ml.unique_id()).unwrap().has_volatile_cache());
        // Writes that allocate clusters of the thin lvol, and plain writes to the thick one.
        let flushes = dev.flushes();
        for i in 0..6u64 {
            write_at(
                &dt,
                i * u64::from(CLUSTER) + 4096,
                &pattern(i as u8, i, 8192),
            )
            .await
            .unwrap();
        }
        write_at(&dk, 0, &pattern(0x77, 0, 65536)).await.unwrap();
        dt.flush().await.unwrap();
        dk.flush().await.unwrap();
        assert!(
            dev.flushes() > flushes,
            "the lvol flush did not reach the device"
        );
        assert_eq!(dev.unflushed_writes(), 0, "writes left behind the flush");
        // Unflushed writes after the flush may be lost; they must not damage the rest.
        write_at(&dt, 7 * u64::from(CLUSTER), &fill(0xee, 4096))
            .await
            .unwrap();
    });
    for plan in [
        CrashPlan::LoseAll,
        CrashPlan::KeepAll,
        CrashPlan::Random(1),
        CrashPlan::Random(2),
    ] {
        let st = reopen(dev.crash_image(plan)).unwrap_or_else(|e| panic!("{plan:?}: {e}"));
        let by_name: BTreeMap<&str, &Vec<u8>> = st
            .lvols
            .values()
            .map(|(m, d)| (m.name.as_str(), d))
            .collect();
        let thin = by_name["thin"];
        for i in 0..6u64 {
            let o = (i * u64::from(CLUSTER) + 4096) as usize;
            assert_eq!(
                &thin[o..o + 8192],
                &pattern(i as u8, i, 8192)[..],
                "{plan:?}: thin cluster {i}"
            );
        }
        let tail = &thin[7 * CLUSTER as usize..7 * CLUSTER as usize + 4096];
        assert!(
            tail.iter().all(|&b| b == 0) || tail.iter().all(|&b| b == 0xee),
            "{plan:?}: unflushed write shows other bytes"
        );
        assert_eq!(
            &by_name["thick"][..65536],
            &pattern(0x77, 0, 65536)[..],
            "{plan:?}: thick"
        );
    }
}

#[test]
fn bs_dev_flush_reaches_only_devices_with_a_volatile_cache() {
    use bdev_core::backend::error::{ErrorBdev, Injection};
    use bdev_core::IoType;
    use blobstore::BsDev;
    use lvol::BdevBsDev;
    block_on(async {
        let reg = Registry::new();
        let cached = CachedBdev::create("C", 64, BL, None).unwrap();
        reg.register(cached).await.unwrap();
        malloc(&reg, "M", MIB, BL).await;
        for base in ["C", "M"] {
            let e = ErrorBdev::create("", reg.open(base, true).unwrap()).unwrap();
            e.inject(Injection::fail(Some(IoType::Flush)));
            reg.register(e).await.unwrap();
            let dev = BdevBsDev::new(reg.open(&format!("EE_{base}"), true).unwrap());
            let r = dev.flush().await;
            if base == "C" {
                // A volatile cache: the flush is sent (and fails as injected).
                assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
            } else {
                // RAM has nothing volatile: the flush is skipped.
                r.unwrap();
            }
        }
        // Straight on a cached device, the flush reaches it.
        let c2 = CachedBdev::create("C2", 64, BL, None).unwrap();
        reg.register(c2.clone()).await.unwrap();
        let dev = BdevBsDev::new(reg.open("C2", true).unwrap());
        dev.write(0, IoBuf::new(BL as usize, 1)).await.unwrap();
        assert_eq!(c2.unflushed_writes(), 1);
        dev.flush().await.unwrap();
        assert_eq!((c2.flushes(), c2.unflushed_writes()), (1, 0));
    });
}

#[test]
fn long_logs_are_sampled_with_both_ends_and_short_ones_walked_whole() {
    assert_eq!(cuts(5, 1), vec![0, 1, 2, 3, 4, 5]);
    let c = cuts(1000, 7);
    assert!(c.len() <= MAX_CUTS && c.len() > MAX_CUTS / 2, "{c:?}");
    assert_eq!((c[0], *c.last().unwrap()), (0, 1000));
    assert!(c.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(c, cuts(1000, 7), "fixed seed, same sample");
}
