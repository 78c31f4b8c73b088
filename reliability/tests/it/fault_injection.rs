//! Fault injection through the error bdev (issue 9 part 4): write and read errors on the lvol
//! store's device at every point of the metadata paths, and read errors on an esnap base.
//! Each failing operation returns EIO; what the store holds in memory is what a reload from
//! the device finds (the store is cut off from the device with dropped writes before the
//! reload, so nothing in memory can be written down after the fact); the reloaded store is
//! consistent.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::common::*;
use bdev_core::backend::error::{ErrorBdev, Injection};
use bdev_core::{IoType, Registry};
use futures::executor::block_on;
use lvol::{Lvol, LvolModule, LvolStore};

type Listing = BTreeMap<String, (u64, bool, bool, Option<String>, u64, Vec<u8>)>;

async fn listing(reg: &Registry, s: &Arc<LvolStore>) -> Listing {
    let mut out = BTreeMap::new();
    for l in s.lvols() {
        let d = reg.open(l.unique_id(), false).unwrap();
        let data = read_at(&d, 0, l.size_bytes() as usize)
            .await
            .unwrap_or_default();
        out.insert(
            l.name(),
            (
                l.size_bytes(),
                l.is_thin(),
                l.is_read_only(),
                l.parent_lvol().map(|p| p.name()),
                l.num_allocated_clusters(),
                data,
            ),
        );
    }
    out
}

struct Env {
    reg: Registry,
    m: LvolModule,
    ee: Arc<ErrorBdev>,
    s: Arc<LvolStore>,
}

/// A store on `EE_m0` with a thick lvol (data), a thin lvol with a snapshot and a clone.
async fn env() -> Env {
    let (reg, m) = setup();
    let ee = error_over_malloc(&reg, "m0", 8 * MIB).await;
    let s = lvs(&m, "EE_m0", "lvs", CLUSTER).await;
    let a = thick_lvol(&m, &s, "thick", 2 * u64::from(CLUSTER)).await;
    let b = thin_lvol(&m, &s, "thin", 3 * u64::from(CLUSTER)).await;
    for (l, seed) in [(&a, 1u8), (&b, 2)] {
        let d = reg.open(l.unique_id(), true).unwrap();
        write_at(&d, 4096, &pattern(seed, 0, 8192)).await.unwrap();
    }
    let snap = m.create_snapshot(&b, "snap").await.unwrap();
    m.create_clone(&snap, "clone").await.unwrap();
    Env { reg, m, ee, s }
}

fn by_name(s: &Arc<LvolStore>, n: &str) -> Arc<Lvol> {
    s.lvol_by_name(n).unwrap_or_else(|| panic!("no lvol {n}"))
}

type Op = for<'a> fn(&'a Env) -> Pin<Box<dyn Future<Output = Result<(), i32>> + 'a>>;

/// An operation's outcome as an errno.
fn errno_of<T>(r: lvol::Result<T>) -> Result<(), i32> {
    r.map(|_| ()).map_err(|e| e.errno())
}

fn ops() -> Vec<(&'static str, Op)> {
    vec![
        ("create", |e| {
            let size = 2 * u64::from(CLUSTER);
            Box::pin(async move {
                errno_of(
                    e.m.create_lvol(&e.s, "new", size, false, Default::default())
                        .await,
                )
            })
        }),
        ("snapshot", |e| {
            Box::pin(async move {
                errno_of(e.m.create_snapshot(&by_name(&e.s, "thick"), "snap2").await)
            })
        }),
        ("clone", |e| {
            Box::pin(
                async move { errno_of(e.m.create_clone(&by_name(&e.s, "snap"), "clone2").await) },
            )
        }),
        ("resize", |e| {
            let size = 4 * u64::from(CLUSTER);
            Box::pin(async move { errno_of(e.m.resize_lvol(&by_name(&e.s, "thick"), size).await) })
        }),
        ("delete", |e| {
            Box::pin(async move { errno_of(e.m.delete_lvol(&by_name(&e.s, "clone")).await) })
        }),
        ("inflate", |e| {
            Box::pin(async move { errno_of(e.m.inflate_lvol(&by_name(&e.s, "clone")).await) })
        }),
        ("decouple", |e| {
            Box::pin(async move { errno_of(e.m.decouple_parent(&by_name(&e.s, "thin")).await) })
        }),
        ("rename", |e| {
            Box::pin(async move {
                errno_of(
                    e.m.rename_lvol(&by_name(&e.s, "thin"), "thin-renamed")
                        .await,
                )
            })
        }),
    ]
}

/// Cuts the store off the device (every later write dropped), unloads it, and loads it
/// again from what reached the device.
async fn crash_reload(e: &Env, what: &str) -> Result<Arc<LvolStore>, String> {
    e.ee.clear();
    e.ee.inject(Injection::drop_writes_after(0));
    e.m.unload_lvstore(&e.s)
        .await
        .map_err(|x| format!("{what}: unload: {x}"))?;
    e.ee.clear();
    let s =
        e.m.load_lvstore("EE_m0")
            .await
            .map_err(|x| format!("{what}: reload: {x}"))?;
    let rep = blobstore::inspect::check(s.blobstore().device())
        .await
        .unwrap();
    if !rep.problems.is_empty() {
        return Err(format!("{what}: check: {:?}", rep.problems));
    }
    Ok(s)
}

/// Makes every write of the operation `only` fail in turn (sampled to about 12 points) and
/// checks the outcome; panics with the list of every problem found.
fn sweep(only: &'static str) {
    sweep_io(only, IoType::Write)
}

/// The same with `io_type` faults: for reads, the first 10 reads of the operation in turn
/// (an operation that reads less simply succeeds, which the reload must confirm).
fn sweep_io(only: &'static str, io_type: IoType) {
    let kind = if io_type == IoType::Read {
        "read"
    } else {
        "write"
    };
    with_timeout(100, move || {
        block_on(async {
            let mut total_faults = 0;
            let mut failures: Vec<String> = Vec::new();
            for (name, op) in ops().into_iter().filter(|(n, _)| *n == only) {
                // Reference run: how many writes the operation needs.
                let e = env().await;
                let w0 = e.ee.writes_seen();
                op(&e)
                    .await
                    .unwrap_or_else(|x| panic!("{name}: reference run failed: {x}"));
                let mut writes = e.ee.writes_seen() - w0;
                assert!(writes > 0, "{name} wrote nothing");
                if io_type == IoType::Read {
                    writes = 10;
                }
                let step = (writes / 12).max(1);
                for k in (0..writes).step_by(step as usize) {
                    let e = env().await;
                    e.ee.inject(fail_from(io_type, k));
                    total_faults += 1;
                    let r = op(&e).await;
                    // Success is only acceptable when the failed write was not needed: the
                    // reload below must then show the completed operation.
                    if r != Err(libc::EIO) && r != Ok(()) {
                        failures.push(format!("{name}: {kind} {k} of {writes} failed: got {r:?}"));
                        continue;
                    }
                    e.ee.clear();
                    let mem = listing(&e.reg, &e.s).await;
                    let s = match crash_reload(&e, &format!("{name} {kind} {k}")).await {
                        Ok(s) => s,
                        Err(x) => {
                            failures.push(x);
                            continue;
                        }
                    };
                    let disk = listing(&e.reg, &s).await;
                    if mem.keys().ne(disk.keys()) {
                        failures.push(format!(
                            "{name}: {kind} {k}: lvols in memory {:?} vs on disk {:?}",
                            mem.keys().collect::<Vec<_>>(),
                            disk.keys().collect::<Vec<_>>()
                        ));
                        continue;
                    }
                    for (n, v) in &mem {
                        let d = &disk[n];
                        if d != v {
                            failures.push(format!(
                                "{name}: {kind} {k}: lvol {n} (size, thin, ro, parent, allocated) \
                                 in memory {:?} vs on disk {:?}, same data: {}",
                                (v.0, v.1, v.2, &v.3, v.4),
                                (d.0, d.1, d.2, &d.3, d.4),
                                v.5 == d.5
                            ));
                        }
                    }
                    // The store still works: a new lvol can be made and written.
                    let l = thin_lvol(&e.m, &s, "after", u64::from(CLUSTER)).await;
                    let d = e.reg.open(l.unique_id(), true).unwrap();
                    write_at(&d, 0, &[7; 4096]).await.unwrap();
                    assert_eq!(read_at(&d, 0, 4096).await.unwrap(), vec![7; 4096]);
                }
            }
            eprintln!("{only}: {kind} faults injected: {total_faults}");
            assert!(
                failures.is_empty(),
                "{} failures:\n{}",
                failures.len(),
                failures.join("\n")
            );
        })
    });
}

/// One `#[test]` per `test_name: "operation"` pair, each running `$sweep("operation")`.
macro_rules! test_per_op {
    ($sweep:expr, { $($test:ident: $op:literal),* $(,)? }) => {
        $(
            #[test]
            fn $test() {
                ($sweep)($op)
            }
        )*
    };
}

test_per_op!(sweep, {
    write_errors_in_create: "create",
    write_errors_in_snapshot: "snapshot",
    write_errors_in_clone: "clone",
    write_errors_in_resize: "resize",
    write_errors_in_delete: "delete",
    write_errors_in_inflate: "inflate",
    write_errors_in_decouple: "decouple",
    write_errors_in_rename: "rename",
});

test_per_op!(|op| sweep_io(op, IoType::Read), {
    read_errors_in_create: "create",
    read_errors_in_snapshot: "snapshot",
    read_errors_in_clone: "clone",
    read_errors_in_resize: "resize",
    read_errors_in_delete: "delete",
    read_errors_in_inflate: "inflate",
    read_errors_in_decouple: "decouple",
    read_errors_in_rename: "rename",
});

#[test]
fn read_errors_while_loading_never_write_and_leave_the_store_loadable() {
    with_timeout(60, || {
        block_on(async {
            let e = env().await;
            let want = listing(&e.reg, &e.s).await;
            e.m.unload_lvstore(&e.s).await.unwrap();
            for k in 0..40 {
                e.ee.inject(fail_from(IoType::Read, k));
                let w0 = e.ee.writes_seen();
                match e.m.load_lvstore("EE_m0").await {
                    Err(x) => {
                        // FINDING: lvol reports a failed super blob read as ENODEV (wrapping the
                        // EIO); accepted here, listed in docs/reliability.md.
                        assert!(
                            x.errno() == libc::EIO
                                || (x.errno() == libc::ENODEV && x.to_string().contains("i/o")),
                            "read {k}: {x}"
                        );
                        assert_eq!(e.ee.writes_seen(), w0, "a failed load wrote to the device");
                        e.ee.clear();
                    }
                    Ok(s) => {
                        // Loaded before the k-th read: every lvol is there.
                        e.ee.clear();
                        assert_eq!(listing(&e.reg, &s).await, want);
                        e.m.unload_lvstore(&s).await.unwrap();
                        break;
                    }
                }
            }
            let s = e.m.load_lvstore("EE_m0").await.unwrap();
            assert_eq!(listing(&e.reg, &s).await, want);
        })
    });
}

#[test]
fn read_errors_on_the_esnap_base_fail_with_eio_and_allocate_nothing() {
    lvol_test(|reg, m| async move {
        malloc(&reg, "store", 8 * MIB, 512).await;
        let base = error_over_malloc(&reg, "gold", 4 * u64::from(CLUSTER)).await;
        let golden = pattern(9, 0, 4 * CLUSTER as usize);
        {
            let d = reg.open("EE_gold", true).unwrap();
            write_at(&d, 0, &golden).await.unwrap();
        }
        let s = lvs(&m, "store", "lvs", CLUSTER).await;
        let c = m.create_esnap_clone("EE_gold", &s, "ec").await.unwrap();
        let d = reg.open(c.unique_id(), true).unwrap();
        assert_eq!(read_at(&d, 0, 8192).await.unwrap(), golden[..8192]);
        base.inject(Injection::fail(Some(IoType::Read)));
        let free = s.free_clusters();
        assert_errno!(read_at(&d, 4096, 4096).await, libc::EIO);
        // A partial-cluster write needs the copy-on-write read of the base.
        assert_errno!(write_at(&d, 512, &[1; 512]).await, libc::EIO);
        assert_eq!(
            s.free_clusters(),
            free,
            "a failed copy-on-write leaked a cluster"
        );
        assert_eq!(c.num_allocated_clusters(), 0);
        // A full-cluster write needs no base read and works.
        write_at(&d, u64::from(CLUSTER), &vec![3; CLUSTER as usize])
            .await
            .unwrap();
        base.clear();
        write_at(&d, 512, &[1; 512]).await.unwrap();
        let mut want = golden.clone();
        want[512..1024].fill(1);
        want[CLUSTER as usize..2 * CLUSTER as usize].fill(3);
        assert_eq!(read_at(&d, 0, want.len()).await.unwrap(), want);
    });
}

#[test]
fn read_errors_on_the_esnap_base_during_inflate_and_decouple() {
    with_timeout(60, || {
        block_on(async {
            let cs = CLUSTER as usize;
            for (op, k) in [
                ("inflate", 0u64),
                ("inflate", 1),
                ("inflate", 2),
                ("decouple", 0),
                ("decouple", 2),
            ] {
                let (reg, m) = setup();
                malloc(&reg, "store", 8 * MIB, 512).await;
                let base = error_over_malloc(&reg, "gold", 4 * u64::from(CLUSTER)).await;
                let golden = pattern(0x33, 0, 4 * cs);
                {
                    let d = reg.open("EE_gold", true).unwrap();
                    write_at(&d, 0, &golden).await.unwrap();
                }
                let s = lvs(&m, "store", "lvs", CLUSTER).await;
                let c = m.create_esnap_clone("EE_gold", &s, "ec").await.unwrap();
                let mut want = golden.clone();
                {
                    let d = reg.open(c.unique_id(), true).unwrap();
                    write_at(&d, u64::from(CLUSTER) + 512, &[0xee; 512])
                        .await
                        .unwrap();
                    want[cs + 512..cs + 1024].fill(0xee);
                }
                let free = s.free_clusters();
                base.inject(fail_from(IoType::Read, k));
                let r = if op == "inflate" {
                    m.inflate_lvol(&c).await
                } else {
                    m.decouple_parent(&c).await
                };
                assert_eq!(r.map_err(|e| e.errno()), Err(libc::EIO), "{op} read {k}");
                base.clear();
                // The clone is still an esnap clone and reads as before; nothing leaked
                // beyond the clusters whose copy completed (each is durable on its own).
                assert!(c.is_esnap_clone(), "{op} read {k}");
                let d = reg.open(c.unique_id(), false).unwrap();
                assert_eq!(
                    read_at(&d, 0, want.len()).await.unwrap(),
                    want,
                    "{op} read {k}"
                );
                drop(d);
                let copied = c.num_allocated_clusters() - 1;
                assert_eq!(free - s.free_clusters(), copied, "{op} read {k}: leak");
                // Reload: same state, consistent store; then the operation succeeds.
                m.unload_lvstore(&s).await.unwrap();
                let s = m.load_lvstore("store").await.unwrap();
                assert_consistent(&s).await;
                let c = s.lvol_by_name("ec").unwrap();
                assert!(c.is_esnap_clone());
                let r = if op == "inflate" {
                    m.inflate_lvol(&c).await
                } else {
                    m.decouple_parent(&c).await
                };
                r.unwrap();
                assert!(!c.is_esnap_clone());
                let d = reg.open(c.unique_id(), false).unwrap();
                assert_eq!(read_at(&d, 0, want.len()).await.unwrap(), want);
            }
        })
    });
}

/// Power loss at every write of each lvol metadata operation (error bdev drop-writes): the
/// reloaded store shows every lvol as it was before or after the operation, never between,
/// and is consistent.
fn power_loss_sweep(only: &'static str) {
    with_timeout(100, move || {
        block_on(async {
            let (name, op) = ops().into_iter().find(|(n, _)| *n == only).unwrap();
            let e = env().await;
            let before = listing(&e.reg, &e.s).await;
            let w0 = e.ee.writes_seen();
            op(&e).await.unwrap();
            let writes = e.ee.writes_seen() - w0;
            let after = listing(&e.reg, &e.s).await;
            let mut failures = Vec::new();
            for k in 0..=writes {
                let e = env().await;
                e.ee.inject(Injection::drop_writes_after(k));
                let _ = op(&e).await;
                // Power is off: nothing more reaches the device, whatever unload writes.
                e.m.unload_lvstore(&e.s).await.ok();
                e.ee.clear();
                let s = match e.m.load_lvstore("EE_m0").await {
                    Ok(s) => s,
                    Err(x) => {
                        failures.push(format!("{name}: cut after {k}: load: {x}"));
                        continue;
                    }
                };
                let rep = blobstore::inspect::check(s.blobstore().device())
                    .await
                    .unwrap();
                if !rep.problems.is_empty() {
                    failures.push(format!("{name}: cut after {k}: {:?}", rep.problems));
                }
                let now = listing(&e.reg, &s).await;
                // Inflate and decouple copy one cluster at a time, each copy durable on its
                // own: a cut may leave some clusters copied (same bytes, more allocated).
                let progressive = matches!(name, "inflate" | "decouple");
                let same_but_alloc =
                    |a: &(u64, bool, bool, Option<String>, u64, Vec<u8>),
                     b: &(u64, bool, bool, Option<String>, u64, Vec<u8>),
                     c: &(u64, bool, bool, Option<String>, u64, Vec<u8>)| {
                        a.0 == b.0
                            && a.2 == b.2
                            && a.5 == b.5
                            && a.3 == b.3
                            && a.1 == b.1
                            && a.4 >= b.4.min(c.4)
                            && a.4 <= b.4.max(c.4)
                    };
                for (n, v) in &now {
                    let mut ok = before.get(n) == Some(v) || after.get(n) == Some(v);
                    if !ok && progressive {
                        if let (Some(b), Some(a)) = (before.get(n), after.get(n)) {
                            ok = same_but_alloc(v, b, a);
                        }
                    }
                    if !ok {
                        failures.push(format!(
                            "{name}: cut after {k}: lvol {n} is neither before nor after"
                        ));
                    }
                }
                let names: Vec<_> = now.keys().collect();
                if names != before.keys().collect::<Vec<_>>()
                    && names != after.keys().collect::<Vec<_>>()
                {
                    failures.push(format!("{name}: cut after {k}: lvols {names:?}"));
                }
            }
            eprintln!("{name}: power cut at each of {} writes", writes + 1);
            assert!(
                failures.is_empty(),
                "{} failures:\n{}",
                failures.len(),
                failures.join("\n")
            );
        })
    });
}

test_per_op!(power_loss_sweep, {
    power_loss_in_create: "create",
    power_loss_in_snapshot: "snapshot",
    power_loss_in_clone: "clone",
    power_loss_in_resize: "resize",
    power_loss_in_delete: "delete",
    power_loss_in_inflate: "inflate",
    power_loss_in_decouple: "decouple",
    power_loss_in_rename: "rename",
});
