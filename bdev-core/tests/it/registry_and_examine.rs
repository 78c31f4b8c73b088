//! Registry behaviour: examine hooks, wait_for_examine, ordering, spawners, events, and the
//! error-injection bdev.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bdev_core::backend::error::{ErrorBdev, Injection};
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::conformance::{pattern, with_timeout};
use bdev_core::{BdevEvent, BlockDevice, Descriptor, ExamineHook, IoBuf, IoType, Registry};
use futures::executor::block_on;
use futures::{FutureExt, StreamExt};

fn malloc(name: &str, blocks: u64) -> Arc<MallocBdev> {
    MallocBdev::create(name, blocks, 512, None).unwrap()
}

/// Records what it examined; on a device named `base*` it registers `<name>-child` (as an lvol
/// store registers its lvols), after a short sleep to make wait_for_examine meaningful.
struct Hook {
    seen: Mutex<Vec<String>>,
}

#[async_trait]
impl ExamineHook for Hook {
    async fn examine(&self, registry: &Registry, name: &str) {
        self.seen.lock().unwrap().push(name.to_string());
        if name.starts_with("base") && !name.ends_with("-child") {
            futures_timer::Delay::new(Duration::from_millis(30)).await;
            let d = registry.open(name, false).expect("hook opens the device");
            drop(d);
            registry
                .register(malloc(&format!("{name}-child"), 8))
                .await
                .expect("hook registers a child");
        }
    }
}

#[test]
fn examine_hooks_see_new_devices_and_may_register() {
    let reg = Registry::new();
    block_on(reg.register(malloc("before", 8))).unwrap();
    let hook = Arc::new(Hook {
        seen: Mutex::new(Vec::new()),
    });
    reg.add_examine_hook(hook.clone());
    block_on(reg.register(malloc("base0", 8))).unwrap();
    assert_eq!(
        *hook.seen.lock().unwrap(),
        ["base0", "base0-child"],
        "hooks see devices registered after them, including ones a hook registers"
    );
    let names: Vec<String> = reg.list().iter().map(|d| d.name().to_string()).collect();
    assert_eq!(
        names,
        ["before", "base0", "base0-child"],
        "registration order"
    );
}

#[test]
fn wait_for_examine_waits_for_running_hooks() {
    let reg = Registry::new();
    let hook = Arc::new(Hook {
        seen: Mutex::new(Vec::new()),
    });
    reg.add_examine_hook(hook);
    let r2 = reg.clone();
    reg.spawn(
        async move {
            r2.register(malloc("base1", 8)).await.unwrap();
        }
        .boxed(),
    );
    // Wait until the register has started, then wait for examine.
    with_timeout(Duration::from_secs(10), "register started", async {
        while reg.get("base1").is_none() {
            futures_timer::Delay::new(Duration::from_millis(1)).await;
        }
    });
    with_timeout(
        Duration::from_secs(10),
        "wait_for_examine",
        reg.wait_for_examine(),
    );
    assert!(
        reg.get("base1-child").is_some(),
        "examine finished (child registered) before wait_for_examine returned"
    );
    // Nothing running: returns at once.
    with_timeout(Duration::from_secs(1), "idle", reg.wait_for_examine());
}

#[test]
fn custom_spawner_is_used() {
    let reg = Registry::new();
    let count = Arc::new(AtomicUsize::new(0));
    let c2 = count.clone();
    reg.set_spawner(Arc::new(move |fut| {
        c2.fetch_add(1, Ordering::SeqCst);
        std::thread::spawn(move || block_on(fut));
    }));
    let (tx, rx) = futures::channel::oneshot::channel();
    reg.spawn(
        async move {
            tx.send(7).unwrap();
        }
        .boxed(),
    );
    assert_eq!(with_timeout(Duration::from_secs(5), "spawned", rx), Ok(7));
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[test]
fn resize_event_on_every_descriptor() {
    let reg = Registry::new();
    block_on(reg.register(malloc("m", 16))).unwrap();
    let mut a = reg.open("m", true).unwrap();
    let mut b = reg.open("m", false).unwrap();
    assert_eq!(reg.open_count("m"), 2);
    reg.notify_resize("m");
    let want = Some(BdevEvent::Resize { num_blocks: 16 });
    assert_eq!(block_on(a.take_events().unwrap().next()), want);
    assert_eq!(block_on(b.take_events().unwrap().next()), want);
    drop(a);
    assert_eq!(reg.open_count("m"), 1);
}

#[test]
fn unregister_by_alias_and_uuid_and_missing_is_enodev() {
    let reg = Registry::new();
    let m = malloc("m1", 16);
    let uuid = m.uuid();
    block_on(reg.register(m)).unwrap();
    block_on(reg.register(malloc("m2", 16))).unwrap();
    reg.add_alias("m2", "lvs/x").unwrap();
    block_on(reg.unregister(&uuid.to_string())).unwrap();
    block_on(reg.unregister("lvs/x")).unwrap();
    assert!(reg.list().is_empty());
    assert!(reg.get("lvs/x").is_none());
    test_support::assert_errno!(block_on(reg.unregister("m1")), libc::ENODEV);
    // The names are free again.
    block_on(reg.register(malloc("m1", 16))).unwrap();
    reg.add_alias("m1", "lvs/x").unwrap();
}

#[test]
fn malloc_8g_is_sparse() {
    let reg = Registry::new();
    let m = MallocBdev::create("big", (8u64 << 30) / 4096, 4096, None).unwrap();
    block_on(reg.register(m.clone())).unwrap();
    let d = reg.open("big", true).unwrap();
    let last = d.num_blocks() - 1;
    block_on(d.write(last, pattern(&d, last, 1, 1))).unwrap();
    assert_eq!(m.allocated_bytes(), 2 << 20, "one 2 MiB chunk");
    let r = block_on(d.read(0, IoBuf::new(4096, 1))).unwrap();
    assert!(r.iter().all(|&b| b == 0));
    block_on(d.write_zeroes(0, d.num_blocks())).unwrap();
    assert_eq!(
        m.allocated_bytes(),
        0,
        "write_zeroes over everything frees the chunks"
    );
}

#[test]
fn malloc_concurrent_writers_from_many_threads() {
    let reg = Registry::new();
    block_on(reg.register(malloc("m", 8192))).unwrap();
    let d = Arc::new(reg.open("m", true).unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let lba = (i * 8 + t) * 5 % 8192;
                    let w = pattern(&d, lba, 1, t as u8);
                    let w = block_on(d.write(lba, w)).unwrap();
                    let r = block_on(d.read(lba, IoBuf::new(512, 1))).unwrap();
                    assert_eq!(r, w);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn error_setup() -> (Registry, Arc<ErrorBdev>) {
    let reg = Registry::new();
    block_on(reg.register(malloc("base", 64))).unwrap();
    let base = reg.open("base", true).unwrap();
    let e = ErrorBdev::create("", base).unwrap();
    assert_eq!(e.name(), "EE_base");
    block_on(reg.register(e.clone())).unwrap();
    (reg, e)
}

#[test]
fn error_bdev_claims_base_and_writes_config() {
    let (reg, e) = error_setup();
    assert_eq!(
        reg.claim_of("base"),
        Some(bdev_core::ClaimType::ExclusiveWrite)
    );
    assert_eq!(reg.open("base", true).unwrap_err().errno(), libc::EPERM);
    assert_eq!(e.module_name(), "error");
    assert_eq!(
        e.write_config().unwrap(),
        serde_json::json!({"method": "bdev_error_create", "params": {"base_name": "base"}})
    );
}

/// [`error_setup`] with `EE_base` open for writing.
fn error_setup_open() -> (Registry, Arc<ErrorBdev>, Descriptor) {
    let (reg, e) = error_setup();
    let d = reg.open("EE_base", true).unwrap();
    (reg, e, d)
}

#[test]
fn error_bdev_fails_after_n() {
    let (_reg, e, d) = error_setup_open();
    e.inject(Injection {
        after: 2,
        count: 2,
        ..Injection::fail(Some(IoType::Write))
    });
    let mut errs = Vec::new();
    for i in 0..6u64 {
        let r = block_on(d.write(i, pattern(&d, i, 1, 0)));
        errs.push(r.err().map(|e| e.errno()));
    }
    assert_eq!(
        errs,
        [None, None, Some(libc::EIO), Some(libc::EIO), None, None]
    );
    // Reads were not affected.
    block_on(d.read(0, IoBuf::new(512, 1))).unwrap();
    assert_eq!(e.writes_seen(), 4);
}

#[test]
fn error_bdev_range_rule_and_clear() {
    let (_reg, e, d) = error_setup_open();
    e.inject(Injection {
        range: Some((10, 5)),
        ..Injection::fail(Some(IoType::Read))
    });
    assert!(block_on(d.read(9, IoBuf::new(512, 1))).is_ok());
    assert_eq!(
        block_on(d.read(8, IoBuf::new(1024 * 2, 1)))
            .unwrap_err()
            .errno(),
        libc::EIO,
        "touches block 10"
    );
    test_support::assert_errno!(block_on(d.read(14, IoBuf::new(512, 1))), libc::EIO);
    assert!(block_on(d.read(15, IoBuf::new(512, 1))).is_ok());
    e.clear();
    assert!(block_on(d.read(12, IoBuf::new(512, 1))).is_ok());
}

#[test]
fn error_bdev_drop_writes_simulates_power_loss() {
    let (reg, e, d) = error_setup_open();
    e.inject(Injection::drop_writes_after(3));
    for i in 0..6u64 {
        block_on(d.write(i, pattern(&d, i, 1, 0xa5))).expect("acknowledged");
    }
    assert_eq!(e.writes_seen(), 3);
    let base = reg.open("base", false).unwrap();
    for i in 0..6u64 {
        let r = block_on(base.read(i, IoBuf::new(512, 1))).unwrap();
        if i < 3 {
            assert_eq!(
                r[..],
                pattern(&d, i, 1, 0xa5)[..],
                "block {i} reached the base"
            );
        } else {
            assert!(r.iter().all(|&b| b == 0), "block {i} must be lost");
        }
    }
}

#[test]
fn error_bdev_spdk_injection() {
    let (_reg, e, d) = error_setup_open();
    e.inject_spdk("read", "nomem", 1).unwrap();
    e.inject_spdk("all", "failure", 2).unwrap();
    test_support::assert_errno!(block_on(d.read(0, IoBuf::new(512, 1))), libc::ENOMEM);
    test_support::assert_errno!(block_on(d.flush()), libc::EIO);
    test_support::assert_errno!(block_on(d.write(0, IoBuf::new(512, 1))), libc::EIO);
    assert!(block_on(d.write(0, IoBuf::new(512, 1))).is_ok());
    assert_eq!(
        e.inject_spdk("bogus", "failure", 1).unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(
        e.inject_spdk("read", "bogus", 1).unwrap_err().errno(),
        libc::EINVAL
    );
}

#[test]
fn error_bdev_on_conformance() {
    let (reg, _e) = error_setup();
    bdev_core::conformance::check_read_write_round_trip(&reg, "EE_base");
    bdev_core::conformance::check_bounds(&reg, "EE_base");
    bdev_core::conformance::check_flush(&reg, "EE_base");
    bdev_core::conformance::check_claims(&reg, "EE_base");
    bdev_core::conformance::check_hot_remove_with_inflight(&reg, "EE_base");
    // Unregistering the error bdev released its claim on the base.
    assert_eq!(reg.claim_of("base"), None);
}
