//! The driver against a real device: counts, direction mix and data actually written.

use std::time::Duration;

use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{Descriptor, IoBuf, Registry};
use bench::{run, Pattern, Workload};
use futures::executor::block_on;

/// A malloc bdev `m0` of `mib` MiB in a new registry, opened (writable when `write`).
fn malloc(mib: u64, write: bool) -> (Registry, Descriptor) {
    let reg = Registry::new();
    let m = MallocBdev::create("m0", (mib << 20) / 512, 512, None).unwrap();
    block_on(reg.register(m)).unwrap();
    let d = reg.open("m0", write).unwrap();
    (reg, d)
}

/// A workload of `count` requests of `bs` bytes, `qd` at a time.
fn counted(pattern: Pattern, bs: u64, qd: usize, count: u64) -> Workload {
    Workload {
        pattern,
        bs,
        qd,
        duration: None,
        count: Some(count),
        ..Default::default()
    }
}

#[test]
fn count_bound_mixed_run_completes_every_request() {
    let (_reg, d) = malloc(16, true);
    let w = Workload {
        read_pct: 50,
        ..counted(Pattern::RandRw, 4096, 16, 5000)
    };
    let s = block_on(run(&d, &w)).unwrap();
    assert_eq!(s.errors, 0, "{:?}", s.first_error);
    assert_eq!(s.reads + s.writes, 5000);
    assert!(s.reads > 2000 && s.writes > 2000, "{s:?}");
    assert!(s.iops() > 0.0);
}

#[test]
fn sequential_writes_land_where_the_pattern_says() {
    let (_reg, d) = malloc(1, true);
    // 4 KiB every 8 KiB from offset 0, 64 requests: the even 4 KiB pieces of the first 512 KiB.
    let w = Workload {
        step: Some(8192),
        ..counted(Pattern::Write, 4096, 4, 64)
    };
    let s = block_on(run(&d, &w)).unwrap();
    assert_eq!((s.writes, s.errors), (64, 0));
    let all = block_on(d.read(0, IoBuf::new(1 << 20, 1))).unwrap();
    for piece in 0..256 {
        let chunk = &all[piece * 4096..(piece + 1) * 4096];
        let written = piece % 2 == 0 && piece < 128;
        assert_eq!(chunk.iter().any(|&b| b != 0), written, "piece {piece}");
    }
}

#[test]
fn time_bound_read_run_stops_and_a_read_only_descriptor_refuses_writes() {
    let (_reg, d) = malloc(8, false);
    let w = Workload {
        pattern: Pattern::RandRead,
        qd: 8,
        duration: Some(Duration::from_millis(200)),
        ..Default::default()
    };
    let s = block_on(run(&d, &w)).unwrap();
    assert!(s.reads > 0 && s.writes == 0 && s.errors == 0);
    assert!(s.elapsed < Duration::from_secs(5));
    let bad = Workload {
        pattern: Pattern::RandWrite,
        count: Some(1),
        ..Default::default()
    };
    assert!(block_on(run(&d, &bad)).is_err());
}
