//! The driver against a real device: counts, direction mix and data actually written.

use std::time::Duration;

use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{IoBuf, Registry};
use bench::{run, Pattern, Workload};
use futures::executor::block_on;

fn malloc(reg: &Registry, mib: u64) {
    let m = MallocBdev::create("m0", (mib << 20) / 512, 512, None).unwrap();
    block_on(reg.register(m)).unwrap();
}

#[test]
fn count_bound_mixed_run_completes_every_request() {
    let reg = Registry::new();
    malloc(&reg, 16);
    let d = reg.open("m0", true).unwrap();
    let w = Workload {
        pattern: Pattern::RandRw,
        read_pct: 50,
        bs: 4096,
        qd: 16,
        duration: None,
        count: Some(5000),
        ..Default::default()
    };
    let s = block_on(run(&d, &w)).unwrap();
    assert_eq!(s.errors, 0, "{:?}", s.first_error);
    assert_eq!(s.reads + s.writes, 5000);
    assert!(s.reads > 2000 && s.writes > 2000, "{s:?}");
    assert!(s.iops() > 0.0);
}

#[test]
fn sequential_writes_land_where_the_pattern_says() {
    let reg = Registry::new();
    malloc(&reg, 1);
    let d = reg.open("m0", true).unwrap();
    // 4 KiB every 8 KiB from offset 0, 64 requests: the even 4 KiB pieces of the first 512 KiB.
    let w = Workload {
        pattern: Pattern::Write,
        bs: 4096,
        step: Some(8192),
        qd: 4,
        duration: None,
        count: Some(64),
        ..Default::default()
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
    let reg = Registry::new();
    malloc(&reg, 8);
    let d = reg.open("m0", false).unwrap();
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
