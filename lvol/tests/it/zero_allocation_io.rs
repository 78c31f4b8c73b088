//! The steady-state data path of an lvol allocates nothing: a thick lvol's reads and writes
//! (allocated clusters), an esnap clone's reads from its base and the read-only bdev over an
//! lvol, with `qd` requests in flight whose futures are kept in place (as the bench driver
//! does). This module installs the counting allocator for the whole binary; it counts per
//! thread, so the other modules' tests do not disturb the figures.

use std::sync::Arc;

use bdev_core::{reactor, Registry};
use lvol::{LvolModule, LvolStore};
use test_support::alloc::CountingAlloc;
use test_support::prelude::*;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const MIB: u64 = 1 << 20;

/// Runs `f` on a thread of its own (the reactor and the allocation counts are per thread).
fn on_thread(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(f).join().unwrap();
}

/// A registry with the lvol module and store `lvs` (1 MiB clusters) on malloc bdev `M`
/// (64 MiB, 4 KiB blocks), and a thick lvol `v` of 16 MiB; returns the store and the lvol's
/// bdev name.
fn thick_world() -> (Registry, LvolModule, Arc<LvolStore>, String) {
    reactor::block_on(async {
        let (reg, m) = setup();
        malloc(&reg, "M", 64 * MIB, 4096).await;
        let s = lvs(&m, "M", "lvs", MIB as u32).await;
        let v = thick_lvol(&m, &s, "v", 16 * MIB).await;
        (reg, m, s, v.unique_id().to_string())
    })
}

#[test]
fn thick_lvol_reads_and_writes_allocate_nothing_per_request() {
    on_thread(|| {
        let (reg, _m, _s, name) = thick_world();
        let d = open(&reg, &name, true);
        let w = steady_state_allocs(&d, true, 32, 6000, 1000);
        let r = steady_state_allocs(&d, false, 32, 6000, 1000);
        assert_eq!(w, 0, "allocations in 5000 steady-state lvol writes");
        assert_eq!(r, 0, "allocations in 5000 steady-state lvol reads");
        // The requests reached the right place: a pattern written through the lvol reads
        // back through it and lies in the store's device where the cluster map says.
        let data = pattern(3, 5 * MIB + 8192, 8192);
        reactor::block_on(write_at(&d, 5 * MIB + 8192, &data)).unwrap();
        let back = reactor::block_on(read_at(&d, 5 * MIB + 8192, 8192)).unwrap();
        assert_eq!(back, data);
    });
}

#[rstest::rstest]
#[case::base512(512)]
#[case::base4096(4096)]
fn esnap_clone_reads_from_the_base_allocate_nothing_per_request(#[case] base_block: u32) {
    on_thread(move || {
        let (reg, m, s, _) = thick_world();
        let clone = reactor::block_on(async {
            malloc(&reg, "B", 16 * MIB, base_block).await;
            fill_pattern(&reg, "B", 9).await;
            m.create_esnap_clone("B", &s, "ec").await.unwrap()
        });
        let d = open(&reg, clone.unique_id(), false);
        let r = steady_state_allocs(&d, false, 32, 6000, 1000);
        assert_eq!(r, 0, "allocations in 5000 steady-state esnap reads");
        // Every read came from the base: nothing was allocated in the clone, and its bytes
        // are the base's.
        assert_eq!(clone.num_allocated_clusters(), 0);
        for off in [0, 4096, 3 * MIB + 512 * 8, 16 * MIB - 4096] {
            let got = reactor::block_on(read_at(&d, off, 4096)).unwrap();
            assert_eq!(got, pattern(9, off, 4096), "esnap clone at {off}");
        }
    });
}

#[test]
fn ro_bdev_over_an_lvol_reads_allocate_nothing_per_request() {
    on_thread(|| {
        let (reg, _m, _s, name) = thick_world();
        let data = pattern(5, 2 * MIB, 4096);
        reactor::block_on(async {
            let w = open(&reg, &name, true);
            write_at(&w, 2 * MIB, &data).await.unwrap();
        });
        let ro = reactor::block_on(vbdev_ro::create(
            &reg,
            vbdev_ro::RoOpts {
                base_bdev_name: name.clone(),
                name: Some("ro".into()),
                uuid: None,
            },
        ))
        .expect("ro bdev over the lvol");
        let d = open(&reg, "ro", false);
        let r = steady_state_allocs(&d, false, 32, 6000, 1000);
        assert_eq!(
            r, 0,
            "allocations in 5000 steady-state reads of the ro bdev"
        );
        let got = reactor::block_on(read_at(&d, 2 * MIB, 4096)).unwrap();
        assert_eq!(got, data, "the ro bdev reads the lvol's bytes");
        drop(ro);
    });
}
