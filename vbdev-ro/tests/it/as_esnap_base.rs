//! A read-only bdev as the base of esnap clones: reads through the chain, reload, surprise
//! removal of the ro bdev's base with reads in flight (degraded, not hung), and healing when
//! the base and the read-only bdev come back.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use bdev_core::{ClaimType, Registry};
use futures::executor::block_on;
use lvol::LvolModule;
use test_support::prelude::*;
use uuid::Uuid;
use vbdev_ro::{create, RoOpts};

const BASE_SIZE: u64 = 8 * MIB;

/// What the base bdev `B` holds.
fn base_pattern() -> Vec<u8> {
    pattern(0x3c, 0, BASE_SIZE as usize)
}

/// A registry with the lvol module, a store `lvs` on an aio file, a base bdev `B` (aio, with
/// a pattern and a fixed UUID) and the read-only bdev `B_ro` over it with UUID `ro_uuid`.
struct Setup {
    reg: Registry,
    m: LvolModule,
    dir: tempfile::TempDir,
    base_uuid: Uuid,
    ro_uuid: Uuid,
}

impl Setup {
    fn store_path(&self) -> std::path::PathBuf {
        self.dir.path().join("store.img")
    }
    fn base_path(&self) -> std::path::PathBuf {
        self.dir.path().join("base.img")
    }
    async fn add_base_and_ro(&self) {
        let uuid = Some(self.base_uuid);
        aio(&self.reg, "B", &self.base_path(), 512, uuid, false).await;
        create(
            &self.reg,
            RoOpts {
                base_bdev_name: "B".into(),
                name: None,
                uuid: Some(self.ro_uuid),
            },
        )
        .await
        .unwrap();
        self.reg.wait_for_examine().await;
    }
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (reg, m, _, _) = aio_store(dir.path(), 64 * MIB, "lvs", MIB as u32).await;
    m.set_esnap_retry(1, Duration::from_millis(1));
    let s = Setup {
        reg,
        m,
        dir,
        base_uuid: Uuid::new_v4(),
        ro_uuid: Uuid::new_v4(),
    };
    std::fs::write(s.base_path(), base_pattern()).unwrap();
    s.add_base_and_ro().await;
    s
}

#[test]
fn esnap_clone_over_ro_bdev_reads_through_and_survives_reload() {
    within(120, "esnap over ro", || block_on(reload_scenario()));
}

async fn reload_scenario() {
    {
        let s = setup().await;
        let store = s.m.lvstore_by_name("lvs").unwrap();
        let ec = s.m.create_esnap_clone("B_ro", &store, "ec").await.unwrap();
        // The clone records the read-only bdev, not the base under it.
        assert_eq!(
            ec.external_snapshot_name().as_deref(),
            Some(s.ro_uuid.to_string().as_str())
        );
        assert_eq!(s.reg.claim_of("B_ro"), Some(ClaimType::ReadManyWriteNone));
        assert_eq!(s.reg.claim_of("B"), Some(ClaimType::ReadManyWriteNone));
        assert!(s.reg.open("B", true).is_err(), "base stays unwritable");
        assert!(s.reg.open("B_ro", true).is_err());

        let base = base_pattern();
        let d = s.reg.open("lvs/ec", true).unwrap();
        assert_eq!(read_at(&d, 0, BASE_SIZE as usize).await.unwrap(), base);
        // Copy-on-write lands in the clone, never in the base.
        write_at(&d, MIB + 4096, &[0xee; 4096]).await.unwrap();
        let mut want = base.clone();
        want[(MIB + 4096) as usize..(MIB + 8192) as usize].fill(0xee);
        assert_eq!(read_at(&d, 0, BASE_SIZE as usize).await.unwrap(), want);
        assert_eq!(std::fs::read(s.base_path()).unwrap(), base);
        drop(d);
        drop((ec, store));

        // Reload: the store goes away and comes back by examine; the clone finds B_ro again.
        s.reg.unregister("aio0").await.unwrap();
        assert!(s.reg.get("lvs/ec").is_none());
        aio(&s.reg, "aio0", &s.store_path(), 512, None, false).await;
        let store = s.m.lvstore_by_name("lvs").expect("store tasted again");
        assert!(store.missing_esnaps().is_empty());
        let ec = store.lvol_by_name("ec").unwrap();
        assert!(ec.is_esnap_clone() && !ec.is_degraded());
        let d = s.reg.open("lvs/ec", false).unwrap();
        assert_eq!(read_at(&d, 0, BASE_SIZE as usize).await.unwrap(), want);
    }
}

#[test]
fn base_removal_under_ro_degrades_the_esnap_clone_and_it_heals() {
    within(
        120,
        "base removal under a ro bdev with reads in flight",
        removal_and_heal,
    );
}

fn removal_and_heal() {
    let s = block_on(setup());
    let (ec, d) = block_on(async {
        let store = s.m.lvstore_by_name("lvs").unwrap();
        let ec = s.m.create_esnap_clone("B_ro", &store, "ec").await.unwrap();
        let d = s.reg.open("lvs/ec", true).unwrap();
        write_at(&d, 0, &[0x11; 4096]).await.unwrap(); // cluster 0 is the clone's own
        (ec, d)
    });
    let base = base_pattern();

    // Readers of base-backed clusters keep going while the base under the ro bdev is removed.
    let done = AtomicBool::new(false);
    let started = AtomicU32::new(0);
    let (ok, eio) = std::thread::scope(|sc| {
        let reader = sc.spawn(|| {
            block_on(async {
                let (mut ok, mut eio, mut after) = (0u32, 0u32, 0u32);
                let mut i = 0u64;
                while after < 4 {
                    if done.load(Ordering::SeqCst) {
                        after += 1;
                    }
                    let off = MIB + (i % 11) * MIB / 2;
                    i += 1;
                    match read_at(&d, off, 65536).await {
                        Ok(b) => {
                            assert_eq!(b[..], base[off as usize..off as usize + 65536]);
                            ok += 1;
                            started.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            assert_eq!(e.errno(), libc::EIO, "{e}");
                            eio += 1;
                        }
                    }
                }
                (ok, eio)
            })
        });
        // Start the removal once reads are flowing.
        while started.load(Ordering::SeqCst) == 0 && !reader.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        block_on(s.reg.unregister("B")).expect("base removal completes");
        done.store(true, Ordering::SeqCst);
        reader.join().unwrap()
    });
    assert!(ok >= 1, "reads before the removal succeed");
    assert!(eio >= 4, "reads after the removal fail with EIO");
    assert!(s.reg.get("B").is_none());
    assert!(
        s.reg.get("B_ro").is_none(),
        "the ro bdev went with its base"
    );
    assert!(ec.is_degraded());
    block_on(async {
        assert_eq!(read_at(&d, 0, 4096).await.unwrap(), vec![0x11; 4096]);
        assert_errno!(read_at(&d, 3 * MIB, 4096).await, libc::EIO);
        // Base and ro bdev come back (same UUIDs): the clone heals in place.
        s.add_base_and_ro().await;
    });
    assert!(!ec.is_degraded(), "healed");
    block_on(async {
        let mut want = base.clone();
        want[..4096].fill(0x11);
        assert_eq!(read_at(&d, 0, BASE_SIZE as usize).await.unwrap(), want);
    });
}
