//! Concurrency at the lvol level, on real threads: copy-on-writes into an esnap clone while
//! its base bdev is hot-removed, store unload and hot-removal of the store's base with I/O in
//! flight, delete racing a clone, two decouples racing. Each call succeeds or fails with a
//! clear errno; nothing hangs (timeouts) and acknowledged data is there afterwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::common::*;
use futures::executor::block_on;
use uuid::Uuid;

#[test]
fn copy_on_write_while_the_esnap_base_is_hot_removed() {
    with_timeout(60, || {
        let (reg, m) = setup();
        let cs = CLUSTER as usize;
        let u = Uuid::new_v4();
        const N: u64 = 128;
        let golden = pattern(0x5a, 0, N as usize * cs);
        block_on(async {
            malloc(&reg, "store", 2 * N * u64::from(CLUSTER), 512).await;
            malloc_uuid(&reg, "gold", N * u64::from(CLUSTER), 512, u).await;
            let d = reg.open("gold", true).unwrap();
            write_at(&d, 0, &golden).await.unwrap();
        });
        let s = block_on(lvs(&m, "store", "lvs", CLUSTER));
        let ec = block_on(m.create_esnap_clone("gold", &s, "ec")).unwrap();
        let d = Arc::new(reg.open(ec.unique_id(), true).unwrap());
        let removed = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = {
            let d = d.clone();
            let removed = removed.clone();
            std::thread::spawn(move || {
                block_on(async {
                    let mut res = Vec::new();
                    for c in 0..N {
                        let after = removed.load(Ordering::SeqCst);
                        // 512 bytes into each cluster: needs a copy of the rest from the base.
                        let r =
                            write_at(&d, c * u64::from(CLUSTER) + 1024, &[c as u8 + 1; 512]).await;
                        if after {
                            // Started after the removal completed: the base is gone.
                            assert!(r.is_err(), "cluster {c}: copy-on-write without a base");
                        }
                        res.push(r.map_err(|e| e.errno()));
                        if c == 4 {
                            let _ = tx.send(());
                        }
                    }
                    res
                })
            })
        };
        rx.recv().unwrap();
        block_on(reg.unregister("gold")).expect("hot-remove completes");
        removed.store(true, Ordering::SeqCst);
        let res = writer.join().expect("writer thread");
        let ok = res.iter().filter(|r| r.is_ok()).count();
        eprintln!("copy-on-writes: {ok} landed, {} failed", res.len() - ok);
        assert!(ok >= 5);
        assert!(ec.is_degraded());
        // Every write either landed (cluster allocated, base copied around it) or failed with
        // EIO / ENODEV leaving the cluster unallocated.
        block_on(async {
            for (c, r) in res.iter().enumerate() {
                let off = c as u64 * u64::from(CLUSTER);
                match r {
                    Ok(()) => {
                        let got = read_at(&d, off, cs).await.unwrap();
                        let mut want = golden[c * cs..(c + 1) * cs].to_vec();
                        want[1024..1536].fill(c as u8 + 1);
                        assert_eq!(got, want, "cluster {c}");
                    }
                    Err(e) => {
                        errno_in(&e, *e, &[libc::EIO, libc::ENODEV]);
                        assert_errno!(read_at(&d, off, 512).await, libc::EIO);
                    }
                }
            }
            let done = res.iter().filter(|r| r.is_ok()).count() as u64;
            assert_eq!(
                ec.num_allocated_clusters(),
                done,
                "failed copy-on-writes allocated"
            );
            // The base comes back: the clone heals in place and the rest reads the base.
            // A new (zero-filled) bdev with the base's UUID: the examine hook claims it at
            // once, so its content is zeroes.
            malloc_uuid(&reg, "gold2", N * u64::from(CLUSTER), 512, u).await;
            reg.wait_for_examine().await;
            if ec.is_degraded() {
                m.heal_all().await;
            }
            assert!(!ec.is_degraded());
            for (c, r) in res.iter().enumerate() {
                if r.is_err() {
                    let off = c as u64 * u64::from(CLUSTER);
                    assert_eq!(read_at(&d, off, cs).await.unwrap(), vec![0; cs]);
                }
            }
        });
    });
}

/// Hot-removal of the store's base bdev (`hot = true`) or an lvstore unload while a writer
/// thread has I/O in flight; then the store comes back and every acknowledged write is there.
fn io_in_flight_during(hot: bool) {
    with_timeout(60, move || {
        let (reg, m) = setup();
        // The store sits on an error bdev (no injection) over a malloc: hot-removing the
        // error bdev keeps the malloc's bytes, and a new error bdev over it brings it back.
        block_on(error_over_malloc(&reg, "m0", 16 * MIB));
        let s = block_on(lvs(&m, "EE_m0", "lvs", CLUSTER));
        let v = block_on(thin_lvol(&m, &s, "v", 16 * u64::from(CLUSTER)));
        // The writer owns the only descriptor and drops it when done: removal and unload
        // wait for users to close, as SPDK's do.
        let d = reg.open(v.unique_id(), true).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            block_on(async {
                let mut acked = Vec::new();
                let mut errors = 0;
                for i in 0..3000u64 {
                    let blk = (i * 7) % 256;
                    match write_at(&d, blk * 4096, &[(i % 251) as u8 + 1; 4096]).await {
                        Ok(()) => acked.push((blk, (i % 251) as u8 + 1)),
                        Err(e) => {
                            errno_in(&e, e.errno(), &[libc::ENODEV, libc::EIO, libc::ENXIO]);
                            errors += 1;
                            if errors > 20 {
                                break;
                            }
                        }
                    }
                    if i == 10 {
                        let _ = tx.send(());
                    }
                }
                (acked, errors)
            })
        });
        rx.recv().unwrap();
        if hot {
            block_on(reg.unregister("EE_m0")).expect("hot-remove completes");
        } else {
            let r = block_on(m.unload_lvstore(&s));
            if let Err(e) = &r {
                errno_in(e, e.errno(), &[libc::EBUSY]);
            }
        }
        let (acked, errors) = writer.join().expect("writer");
        eprintln!(
            "hot {hot}: {} writes acknowledged, {errors} failed",
            acked.len()
        );
        if hot {
            assert!(m.lvstores().is_empty());
            let d = reg.open("m0", true).unwrap();
            let e = bdev_core::backend::error::ErrorBdev::create("", d).unwrap();
            block_on(reg.register(e)).unwrap();
            block_on(reg.wait_for_examine());
        } else {
            if m.lvstores().iter().any(|x| x.name() == "lvs") {
                block_on(m.unload_lvstore(&s)).unwrap();
            }
            block_on(m.load_lvstore("EE_m0")).unwrap();
        }
        let s = m.lvstore_by_name("lvs").expect("store back");
        let v = s.lvol_by_name("v").unwrap();
        let d = reg.open(v.unique_id(), false).unwrap();
        let mut last = std::collections::BTreeMap::new();
        for (blk, val) in acked {
            last.insert(blk, val);
        }
        block_on(async {
            for (blk, val) in last {
                assert_eq!(
                    read_at(&d, blk * 4096, 4096).await.unwrap(),
                    vec![val; 4096],
                    "acknowledged write to block {blk} lost"
                );
            }
        });
        block_on(assert_consistent(&s));
    });
}

#[test]
fn store_base_hot_removed_with_io_in_flight() {
    io_in_flight_during(true);
}

#[test]
fn unload_with_io_in_flight_then_reload_keeps_acknowledged_writes() {
    io_in_flight_during(false);
}

#[test]
fn delete_racing_clone_and_two_decouples_racing() {
    with_timeout(60, || {
        let (reg, m) = setup();
        block_on(malloc(&reg, "m0", 16 * MIB, 512));
        let s = block_on(lvs(&m, "m0", "lvs", CLUSTER));
        let v = block_on(thick_lvol(&m, &s, "v", 4 * u64::from(CLUSTER)));
        {
            let d = reg.open(v.unique_id(), true).unwrap();
            block_on(write_at(&d, 0, &pattern(3, 0, 4 * CLUSTER as usize))).unwrap();
        }
        let snap = block_on(m.create_snapshot(&v, "snap")).unwrap();
        let (m1, m2, s1, s2) = (m.clone(), m.clone(), snap.clone(), snap.clone());
        let t1 =
            std::thread::spawn(move || block_on(m1.create_clone(&s1, "c")).map_err(|e| e.errno()));
        let t2 = std::thread::spawn(move || block_on(m2.delete_lvol(&s2)).map_err(|e| e.errno()));
        let (c, del) = (t1.join().unwrap(), t2.join().unwrap());
        if let Err(e) = del {
            errno_in(&e, e, &[libc::EBUSY, libc::EPERM]);
        }
        if let Err(e) = c {
            errno_in(
                &e,
                e,
                &[libc::ENOENT, libc::ENODEV, libc::EBUSY, libc::EINVAL],
            );
        }
        let want = pattern(3, 0, 4 * CLUSTER as usize);
        for name in ["v", "c"] {
            if let Some(l) = s.lvol_by_name(name) {
                let d = reg.open(l.unique_id(), false).unwrap();
                assert_eq!(
                    block_on(read_at(&d, 0, want.len())).unwrap(),
                    want,
                    "{name}"
                );
            }
        }
        // Two decouples of the same clone at once.
        if let Some(l) = s.lvol_by_name("v").filter(|l| l.is_clone()) {
            let (m1, m2, l1, l2) = (m.clone(), m.clone(), l.clone(), l.clone());
            let t1 = std::thread::spawn(move || {
                block_on(m1.decouple_parent(&l1)).map_err(|e| e.errno())
            });
            let t2 = std::thread::spawn(move || {
                block_on(m2.decouple_parent(&l2)).map_err(|e| e.errno())
            });
            let rs = [t1.join().unwrap(), t2.join().unwrap()];
            assert!(rs.iter().any(|r| r.is_ok()), "{rs:?}");
            for r in rs {
                if let Err(e) = r {
                    errno_in(&e, e, &[libc::EBUSY, libc::EINVAL, libc::EAGAIN]);
                }
            }
            let d = reg.open(l.unique_id(), false).unwrap();
            assert_eq!(block_on(read_at(&d, 0, want.len())).unwrap(), want);
        }
        block_on(assert_consistent(&s));
    });
}
