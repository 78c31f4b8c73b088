//! External snapshots: esnap clones of bdevs, the shared read-only claim, degraded mode at
//! load, surprise removal with I/O in flight, surprise add (healing), chains.

use std::time::Duration;

use bdev_core::ClaimType;
use futures::executor::block_on;
use test_support::prelude::*;
use uuid::Uuid;

const ESNAP_UUID: &str = "2abddd12-c08d-40ad-bccf-ab131586ee4c";

/// A file-backed base bdev with a known pattern and UUID; it can be removed and re-added with
/// the same content (the examine hook claims it as soon as it is registered).
async fn esnap_base(
    reg: &bdev_core::Registry,
    dir: &std::path::Path,
    name: &str,
    uuid: Uuid,
    size: u64,
) -> Vec<u8> {
    let path = dir.join(format!("{name}.img"));
    let data = pattern(0x5a, 0, size as usize);
    if !path.exists() {
        std::fs::write(&path, &data).unwrap();
    }
    aio(reg, name, &path, 512, Some(uuid), false).await;
    data
}

/// Store `lvs` (1 MiB clusters) on malloc `M` of `store` bytes, and [`esnap_base`] `base`
/// of `base` bytes with a new UUID in a temp dir (returned first: keep it alive).
async fn esnap_world(
    store: u64,
    base: u64,
) -> (
    tempfile::TempDir,
    bdev_core::Registry,
    lvol::LvolModule,
    std::sync::Arc<lvol::LvolStore>,
    Uuid,
    Vec<u8>,
) {
    let bdir = tempfile::tempdir().unwrap();
    let (reg, m, s) = malloc_store(store, "lvs", MIB as u32).await;
    let (u, data) = new_esnap_base(&reg, bdir.path(), base).await;
    (bdir, reg, m, s, u, data)
}

/// [`esnap_base`] `base` with a new UUID; returns the UUID and the content.
async fn new_esnap_base(
    reg: &bdev_core::Registry,
    dir: &std::path::Path,
    size: u64,
) -> (Uuid, Vec<u8>) {
    let u = Uuid::new_v4();
    (u, esnap_base(reg, dir, "base", u, size).await)
}

#[test]
fn clone_bdev_by_uuid_and_name_reads_through_and_claims() {
    block_on(async {
        let bdir = tempfile::tempdir().unwrap();
        let (reg, m, s) = malloc_store(128 * MIB, "lvs_test", 16384).await;
        let u = Uuid::parse_str(ESNAP_UUID).unwrap();
        let base = esnap_base(&reg, bdir.path(), "esnap1", u, MIB).await;
        let unknown = Uuid::new_v4().hyphenated().to_string();
        assert_errno!(m.create_esnap_clone(&unknown, &s, "c0").await, libc::ENODEV);
        let v1 = m.create_esnap_clone(ESNAP_UUID, &s, "vol1").await.unwrap();
        let v2 = m.create_esnap_clone("esnap1", &s, "vol2").await.unwrap();
        for v in [&v1, &v2] {
            assert!(v.is_esnap_clone());
            assert!(!v.is_clone());
            assert!(!v.is_degraded());
            assert!(v.is_thin());
            assert_eq!(v.num_allocated_clusters(), 0);
            assert_eq!(v.external_snapshot_name().as_deref(), Some(ESNAP_UUID));
            let dev = reg.get(v.unique_id()).unwrap();
            assert_eq!(dev.num_blocks() * 512, MIB);
            let ds = dev.driver_specific();
            assert_eq!(ds["lvol"]["esnap_clone"], true);
            assert_eq!(ds["lvol"]["external_snapshot_name"], ESNAP_UUID);
            let info = v.info_json();
            assert_eq!(info["is_esnap_clone"], true);
            assert_eq!(info["is_clone"], false);
            assert_eq!(info["is_degraded"], false);
            let d = open(&reg, v.unique_id(), false);
            assert_eq!(read_all(&d).await, base);
        }
        assert_eq!(v1.blob().esnap_id().unwrap(), lvol::esnap_id_for(&u));
        // The base is claimed read-only and opened once for the store.
        assert_eq!(reg.claim_of("esnap1"), Some(ClaimType::ReadManyWriteNone));
        assert!(reg.open("esnap1", true).is_err());
        // Copy-on-write on a partial write.
        let d = open_fill(&reg, "lvs_test/vol1", 4096, 512, 0xee).await;
        assert_eq!(v1.num_allocated_clusters(), 1);
        let got = read_at(&d, 0, 16384).await.unwrap();
        let mut want = base[..16384].to_vec();
        want[4096..4608].copy_from_slice(&fill(0xee, 512));
        assert_eq!(got, want);
        // Size not a cluster multiple.
        malloc(&reg, "odd", 16384 * 3 + 4096, 512).await;
        assert_errno!(m.create_esnap_clone("odd", &s, "c3").await, libc::EINVAL);
        // Deleting every clone releases the claim.
        drop(d);
        m.delete_lvol(&v1).await.unwrap();
        assert_eq!(reg.claim_of("esnap1"), Some(ClaimType::ReadManyWriteNone));
        m.delete_lvol(&v2).await.unwrap();
        assert_eq!(reg.claim_of("esnap1"), None);
        assert!(reg.open("esnap1", true).is_ok());
    });
}

/// esnap <- clone (esnap clone) <- snapshot <- clone, then reload without and with the base.
#[test]
fn chain_degrades_without_base_and_heals_when_it_returns() {
    block_on(async {
        let bdir = tempfile::tempdir().unwrap();
        let (_dir, reg, m, s, f) = aio_store_tmp(64 * MIB, "lvs", MIB as u32).await;
        let u = Uuid::new_v4();
        let base = esnap_base(&reg, bdir.path(), "base", u, 4 * MIB).await;
        let ec = m.create_esnap_clone("base", &s, "ec").await.unwrap();
        {
            let _d = open_fill(&reg, "lvs/ec", 0, 4096, 0xe1).await; // CoW of cluster 0
        }
        let snap = m.create_snapshot(&ec, "snap").await.unwrap();
        // The esnap link moved to the snapshot.
        assert!(snap.is_esnap_clone());
        assert!(!ec.is_esnap_clone());
        assert!(ec.is_clone());
        let c2 = m.create_clone(&snap, "c2").await.unwrap();
        {
            let _d = open_fill(&reg, "lvs/c2", 2 * MIB, 4096, 0xc2).await; // CoW of cluster 2 from base
        }
        let mut want_c2 = base.clone();
        want_c2[..4096].copy_from_slice(&fill(0xe1, 4096));
        want_c2[(2 * MIB) as usize..(2 * MIB) as usize + 4096].copy_from_slice(&fill(0xc2, 4096));
        let c2_id = c2.unique_id().to_string();
        let ec_id = ec.unique_id().to_string();
        drop((ec, snap, c2, s));

        // Reload without the base.
        reg.unregister("aio0").await.unwrap();
        reg.unregister("base").await.unwrap();
        aio(&reg, "aio0", &f, 512, None, false).await;
        let s = m.lvstore_by_name("lvs").expect("tasted");
        assert_eq!(s.missing_esnaps(), vec![lvol::esnap_id_for(&u)]);
        for n in ["ec", "snap", "c2"] {
            let l = s.lvol_by_name(n).unwrap();
            assert!(l.is_degraded(), "{n} degraded");
            assert!(l.is_registered(), "{n} still has its bdev");
            assert_eq!(l.info_json()["is_degraded"], true);
            let ds = reg.get(l.unique_id()).unwrap().driver_specific();
            assert_eq!(ds["lvol"]["degraded"], true);
        }
        let d = open(&reg, &c2_id, true);
        // Owned clusters work.
        assert_eq!(read_at(&d, 2 * MIB, 4096).await.unwrap(), fill(0xc2, 4096));
        // Through the snapshot, which owns cluster 0.
        assert_eq!(read_at(&d, 0, 4096).await.unwrap(), fill(0xe1, 4096));
        write_at(&d, 2 * MIB + 8192, &fill(0x77, 4096))
            .await
            .unwrap();
        // Base-needing reads fail with EIO after the retries.
        let t0 = std::time::Instant::now();
        assert_errno!(read_at(&d, 3 * MIB, 4096).await, libc::EIO);
        assert!(
            t0.elapsed() >= Duration::from_millis(10),
            "retried with delays"
        );
        // A CoW that needs the base fails and leaks nothing.
        let free = s.free_clusters();
        let c2l = m.find_lvol(&c2_id).unwrap();
        let alloc = c2l.num_allocated_clusters();
        assert_errno!(write_at(&d, MIB + 4096, &fill(0x99, 4096)).await, libc::EIO);
        assert_eq!(s.free_clusters(), free);
        assert_eq!(c2l.num_allocated_clusters(), alloc);
        let de = open(&reg, &ec_id, false);
        assert_eq!(read_at(&de, 0, 4096).await.unwrap(), fill(0xe1, 4096));
        assert_errno!(read_at(&de, MIB, 4096).await, libc::EIO);

        // Surprise add: heal in place, same descriptors.
        esnap_base(&reg, bdir.path(), "base", u, 4 * MIB).await;
        reg.wait_for_examine().await;
        assert!(s.missing_esnaps().is_empty());
        for n in ["ec", "snap", "c2"] {
            let l = s.lvol_by_name(n).unwrap();
            assert!(!l.is_degraded(), "{n} healed");
            let ds = reg.get(l.unique_id()).unwrap().driver_specific();
            assert!(ds["lvol"].get("degraded").is_none());
        }
        assert_eq!(reg.claim_of("base"), Some(ClaimType::ReadManyWriteNone));
        want_c2[(2 * MIB) as usize + 8192..(2 * MIB) as usize + 12288]
            .copy_from_slice(&fill(0x77, 4096));
        assert_eq!(read_all(&d).await, want_c2);
        assert_eq!(
            read_at(&de, MIB, 4096).await.unwrap(),
            base[(MIB) as usize..(MIB) as usize + 4096].to_vec()
        );
        // A second registration of something else heals nothing twice.
        malloc(&reg, "unrelated", MIB, 512).await;
        assert_eq!(m.heal_all().await, 0);
    });
}

#[test]
fn surprise_removal_with_io_in_flight_degrades_dependents_only() {
    block_on(async {
        let (bdir, reg, m, s, u, base) = esnap_world(64 * MIB, 8 * MIB).await;
        let ec = m.create_esnap_clone("base", &s, "ec").await.unwrap();
        let plain = thick_lvol(&m, &s, "plain", 4 * MIB).await;
        let dp = open_fill(&reg, "lvs/plain", 0, 4096, 0x42).await;
        let d = open_fill(&reg, "lvs/ec", 0, 4096, 0x10).await;
        m.set_esnap_retry(1, Duration::from_millis(1));

        // Readers in flight while the base goes away; they keep going until after the
        // removal completed.
        let done = std::sync::atomic::AtomicBool::new(false);
        let reads = async {
            let (mut ok, mut eio, mut after) = (0, 0, 0);
            let mut i = 0u64;
            while after < 4 {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    after += 1;
                }
                let o = MIB + (i % 7) * MIB / 2;
                i += 1;
                match read_at(&d, o, 65536).await {
                    Ok(b) => {
                        assert_eq!(b, base[o as usize..o as usize + 65536].to_vec());
                        ok += 1;
                    }
                    Err(e) => {
                        assert_eq!(e.errno(), libc::EIO);
                        eio += 1;
                    }
                }
            }
            (ok, eio)
        };
        let removal = async {
            futures_timer::Delay::new(Duration::from_millis(2)).await;
            let r = reg.unregister("base").await;
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        };
        let ((ok, eio), removed) = futures::join!(reads, removal);
        removed.expect("removal completes");
        assert!(ok >= 1, "reads before the removal succeed");
        assert!(eio >= 4, "reads after the removal fail with EIO");
        assert!(reg.get("base").is_none());
        assert!(ec.is_degraded());
        assert!(!plain.is_degraded());
        assert_eq!(read_at(&dp, 0, 4096).await.unwrap(), fill(0x42, 4096));
        assert_eq!(read_at(&d, 0, 4096).await.unwrap(), fill(0x10, 4096));
        assert_errno!(read_at(&d, 2 * MIB, 4096).await, libc::EIO);
        assert_eq!(ec.info_json()["is_degraded"], true);
        // The base returns.
        esnap_base(&reg, bdir.path(), "base", u, 8 * MIB).await;
        reg.wait_for_examine().await;
        assert!(!ec.is_degraded());
        assert_eq!(
            read_at(&d, 2 * MIB, 4096).await.unwrap(),
            base[(2 * MIB) as usize..(2 * MIB) as usize + 4096].to_vec()
        );
    });
}

#[test]
fn inflate_and_decouple_of_esnap_clone_make_it_standalone() {
    block_on(async {
        let (_bdir, reg, m, s, _, base) = esnap_world(64 * MIB, 2 * MIB).await;
        let a = m.create_esnap_clone("base", &s, "a").await.unwrap();
        let b = m.create_esnap_clone("base", &s, "b").await.unwrap();
        m.inflate_lvol(&a).await.unwrap();
        assert!(!a.is_esnap_clone());
        assert!(!a.is_thin());
        assert!(a.blob().get_internal_xattr("EXTSNAP").is_err());
        m.decouple_parent(&b).await.unwrap();
        assert!(!b.is_esnap_clone());
        assert_eq!(reg.claim_of("base"), None);
        reg.unregister("base").await.unwrap();
        for n in ["lvs/a", "lvs/b"] {
            let d = open(&reg, n, false);
            assert_eq!(read_all(&d).await, base);
        }
    });
}

#[test]
fn set_parent_bdev_makes_an_esnap_clone() {
    block_on(async {
        let (_bdir, reg, m, s, u, base) = esnap_world(64 * MIB, 4 * MIB).await;
        let t = thin_lvol(&m, &s, "t", 4 * MIB).await;
        let d = open_fill(&reg, "lvs/t", 0, 4096, 0x33).await;
        let thick = thick_lvol(&m, &s, "k", 4 * MIB).await;
        assert_errno!(m.set_parent_bdev(&thick, "base").await, libc::EINVAL);
        assert_errno!(m.set_parent_bdev(&t, "nope").await, libc::ENODEV);
        m.set_parent_bdev(&t, &u.to_string()).await.unwrap();
        assert!(t.is_esnap_clone());
        assert_eq!(t.external_snapshot_name(), Some(u.hyphenated().to_string()));
        assert_errno!(m.set_parent_bdev(&t, "base").await, libc::EEXIST);
        let got = read_all(&d).await;
        assert_eq!(&got[..4096], &fill(0x33, 4096)[..]);
        assert_eq!(&got[MIB as usize..], &base[MIB as usize..]);
        assert_eq!(reg.claim_of("base"), Some(ClaimType::ReadManyWriteNone));
        // Then back to a snapshot parent: the esnap claim goes away.
        let x = thin_lvol(&m, &s, "x", 4 * MIB).await;
        let sx = m.create_snapshot(&x, "sx").await.unwrap();
        m.set_parent(&t, &sx).await.unwrap();
        assert!(!t.is_esnap_clone());
        assert_eq!(reg.claim_of("base"), None);
    });
}

/// One failing heal (a base whose block size does not divide a store's io unit) does not stop
/// the others, and is retried when the base is registered again.
#[test]
fn failing_heal_does_not_stop_others_and_is_retried() {
    block_on(async {
        let (reg, m) = setup();
        let bdir = tempfile::tempdir().unwrap();
        malloc(&reg, "MA", 32 * MIB, 512).await;
        malloc(&reg, "MB", 32 * MIB, 4096).await;
        let sa = lvs(&m, "MA", "lvsa", MIB as u32).await;
        let sb = lvs(&m, "MB", "lvsb", MIB as u32).await;
        let u = Uuid::new_v4();
        let base = esnap_base(&reg, bdir.path(), "base", u, 4 * MIB).await;
        let ea = m.create_esnap_clone("base", &sa, "ea").await.unwrap();
        let eb = m.create_esnap_clone("base", &sb, "eb").await.unwrap();
        let da = open(&reg, "lvsa/ea", false);
        let db = open(&reg, "lvsb/eb", false);
        assert_eq!(
            read_at(&da, MIB, 4096).await.unwrap(),
            base[MIB as usize..MIB as usize + 4096].to_vec()
        );
        reg.unregister("base").await.unwrap();
        assert!(ea.is_degraded() && eb.is_degraded());
        // Back with 4096-byte blocks: only the 4096-byte store can use it.
        let path = bdir.path().join("base.img");
        aio(&reg, "base", &path, 4096, Some(u), false).await;
        assert!(ea.is_degraded());
        assert!(!eb.is_degraded());
        assert_eq!(
            read_at(&db, MIB, 4096).await.unwrap(),
            base[MIB as usize..MIB as usize + 4096].to_vec()
        );
        assert_errno!(read_at(&da, MIB, 4096).await, libc::EIO);
        // Another registration retries (and fails again) without disturbing the healed one.
        malloc(&reg, "other", MIB, 512).await;
        assert!(ea.is_degraded());
        assert!(!eb.is_degraded());
        // A new esnap clone on an incompatible base is refused.
        assert_errno!(m.create_esnap_clone("base", &sa, "ea2").await, libc::EINVAL);
        // Removed and back with 512-byte blocks: both heal.
        reg.unregister("base").await.unwrap();
        assert!(eb.is_degraded());
        aio(&reg, "base", &path, 512, Some(u), false).await;
        assert!(!ea.is_degraded());
        assert!(!eb.is_degraded());
        assert_eq!(read_all(&da).await, base);
        assert_eq!(read_all(&db).await, base);
    });
}

#[test]
fn esnap_link_moves_with_snapshot_and_back_on_its_delete() {
    block_on(async {
        let (_bdir, reg, m, s, u, base) = esnap_world(64 * MIB, 4 * MIB).await;
        let ec = m.create_esnap_clone("base", &s, "ec").await.unwrap();
        let d = open_fill(&reg, "lvs/ec", 0, 4096, 0x44).await;
        let snap = m.create_snapshot(&ec, "snap").await.unwrap();
        assert!(snap.is_esnap_clone());
        assert_eq!(
            snap.external_snapshot_name(),
            Some(u.hyphenated().to_string())
        );
        assert!(ec.is_clone() && !ec.is_esnap_clone());
        let ds = reg.get(snap.unique_id()).unwrap().driver_specific();
        assert_eq!(ds["lvol"]["esnap_clone"], true);
        assert_eq!(ds["lvol"]["clones"], serde_json::json!(["ec"]));
        // A clone of that snapshot is a plain clone.
        let c = m.create_clone(&snap, "c").await.unwrap();
        assert!(c.is_clone() && !c.is_esnap_clone());
        m.delete_lvol(&c).await.unwrap();
        // Deleting the snapshot gives the esnap link back to its clone.
        m.delete_lvol(&snap).await.unwrap();
        assert!(ec.is_esnap_clone());
        assert!(!ec.is_clone());
        assert_eq!(
            ec.external_snapshot_name(),
            Some(u.hyphenated().to_string())
        );
        assert_eq!(reg.claim_of("base"), Some(ClaimType::ReadManyWriteNone));
        let mut want = base.clone();
        want[..4096].copy_from_slice(&fill(0x44, 4096));
        assert_eq!(read_all(&d).await, want);
        // And the link still follows removal.
        reg.unregister("base").await.unwrap();
        assert!(ec.is_degraded());
    });
}

/// The external snapshot is an lvol of another store: removing that store's base degrades
/// the clone, re-adding it (tasting registers the lvol bdev again) heals it.
#[test]
fn esnap_base_that_is_an_lvol_of_another_store() {
    block_on(async {
        let (reg, m) = setup();
        let dir = tempfile::tempdir().unwrap();
        let f = aio_sparse(&reg, dir.path(), "aioA", 32 * MIB).await;
        malloc(&reg, "MB", 32 * MIB, 512).await;
        let sa = lvs(&m, "aioA", "lvsA", MIB as u32).await;
        let sb = lvs(&m, "MB", "lvsB", MIB as u32).await;
        let golden = thick_lvol(&m, &sa, "golden", 4 * MIB).await;
        let gid = golden.unique_id().to_string();
        let data = pattern(0x17, 0, (4 * MIB) as usize);
        {
            let d = open(&reg, &gid, true);
            write_at(&d, 0, &data).await.unwrap();
        }
        let c = m.create_esnap_clone("lvsA/golden", &sb, "c").await.unwrap();
        assert_eq!(c.external_snapshot_name(), Some(gid.clone()));
        let d = open(&reg, "lvsB/c", false);
        assert_eq!(read_all(&d).await, data);
        drop((golden, sa));
        reg.unregister("aioA").await.unwrap();
        assert!(c.is_degraded());
        assert_errno!(read_at(&d, 0, 4096).await, libc::EIO);
        aio(&reg, "aioA", &f, 512, None, false).await;
        assert!(!c.is_degraded());
        assert_eq!(read_all(&d).await, data);
        // The golden lvol is now claimed read-only: its own writers are refused.
        assert!(reg.open(&gid, true).is_err());
    });
}

/// A read that waits in its retries succeeds when the base comes back meanwhile.
#[test]
fn retrying_read_completes_when_the_base_returns() {
    block_on(async {
        let (bdir, reg, m, s, u, base) = esnap_world(32 * MIB, 2 * MIB).await;
        let ec = m.create_esnap_clone("base", &s, "ec").await.unwrap();
        let d = open(&reg, "lvs/ec", false);
        reg.unregister("base").await.unwrap();
        assert!(ec.is_degraded());
        m.set_esnap_retry(200, Duration::from_millis(5));
        let read = read_at(&d, MIB, 4096);
        let comeback = async {
            futures_timer::Delay::new(Duration::from_millis(30)).await;
            esnap_base(&reg, bdir.path(), "base", u, 2 * MIB).await;
        };
        let (got, ()) = futures::join!(read, comeback);
        assert_eq!(
            got.unwrap(),
            base[MIB as usize..MIB as usize + 4096].to_vec()
        );
        assert!(!ec.is_degraded());
        // With no retries, a degraded read fails at once.
        reg.unregister("base").await.unwrap();
        m.set_esnap_retry(0, Duration::from_secs(10));
        let t0 = std::time::Instant::now();
        assert_errno!(read_at(&d, MIB, 4096).await, libc::EIO);
        assert!(t0.elapsed() < Duration::from_secs(5));
    });
}

/// Remove and re-add the base several times while a reader keeps going: no hang, every read
/// returns the base's data or EIO, and the clone ends healed.
#[test]
fn repeated_surprise_removal_and_return_under_io() {
    block_on(async {
        let (bdir, reg, m, s, u, base) = esnap_world(32 * MIB, 4 * MIB).await;
        let ec = m.create_esnap_clone("base", &s, "ec").await.unwrap();
        m.set_esnap_retry(0, Duration::from_millis(1));
        let d = open(&reg, "lvs/ec", false);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let reader = async {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let o = (n % 64) * 65536;
                match read_at(&d, o, 65536).await {
                    Ok(b) => assert_eq!(b, base[o as usize..o as usize + 65536].to_vec()),
                    Err(e) => assert_eq!(e.errno(), libc::EIO),
                }
                n += 1;
                futures_timer::Delay::new(Duration::from_micros(200)).await;
            }
            n
        };
        let churn = async {
            for _ in 0..5 {
                futures_timer::Delay::new(Duration::from_millis(3)).await;
                reg.unregister("base").await.unwrap();
                futures_timer::Delay::new(Duration::from_millis(3)).await;
                esnap_base(&reg, bdir.path(), "base", u, 4 * MIB).await;
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        };
        let (n, ()) = futures::join!(reader, churn);
        assert!(n > 0);
        assert!(!ec.is_degraded());
        assert_eq!(read_all(&d).await, base);
        assert_eq!(reg.claim_of("base"), Some(ClaimType::ReadManyWriteNone));
    });
}
