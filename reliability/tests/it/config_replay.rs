//! One SPDK config file, replayed by `tgt --json` (the target's replay) and by `blobcli -j`
//! (its config loader): both go through `bdev_core::config`, so they create the same bdevs
//! with the same bytes and refuse a bad parameter with the same error.

use bdev_core::{IoBuf, Registry};
use std::path::Path;
use tgt::modules;
use tgt::nbd::server::NbdServer;
use tgt::target::Target;

const UUID: &str = "7e5a0000-e5a0-4e5a-8e5a-00000000c0f1";

/// What a replay produced: per bdev (sorted by name) its facts and its first 8 KiB.
type Snapshot = Vec<(String, String, u32, u64, String, bool, Vec<u8>)>;

fn snapshot(registry: &Registry) -> Snapshot {
    let mut out = Vec::new();
    for d in registry.list() {
        let desc = registry.open(d.name(), false).unwrap();
        let bl = d.block_len();
        let buf = IoBuf::new(8192, bl as usize);
        let buf = futures::executor::block_on(desc.read(0, buf)).unwrap();
        out.push((
            d.name().to_string(),
            d.product_name().to_string(),
            bl,
            d.num_blocks(),
            d.uuid().to_string(),
            d.io_type_supported(bdev_core::IoType::Write),
            buf.to_vec(),
        ));
    }
    out.sort();
    out
}

fn config(dir: &Path, malloc_block_size: u32) -> std::path::PathBuf {
    let img = dir.join("base.img");
    let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&img, &pattern).unwrap();
    let text = format!(
        r#"{{"subsystems":[
          {{"subsystem":"accel","config":[{{"method":"accel_set_options","params":{{"small_cache_size":128}}}}]}},
          {{"subsystem":"bdev","config":[
            {{"method":"bdev_set_options","params":{{"bdev_io_pool_size":65535,"bdev_io_cache_size":256,"bdev_auto_examine":true}}}},
            {{"method":"bdev_malloc_create","params":{{"name":"Malloc0","num_blocks":4096,"block_size":{malloc_block_size},"uuid":"{UUID}"}}}},
            {{"method":"bdev_aio_create","params":{{"name":"aio0","filename":"{}","block_size":4096,"readonly":true,"uuid":"7e5a0000-e5a0-4e5a-8e5a-00000000c0f2"}}}},
            {{"method":"bdev_ro_create","params":{{"name":"ro0","base_bdev_name":"aio0","uuid":"7e5a0000-e5a0-4e5a-8e5a-00000000c0f3"}}}},
            {{"method":"bdev_null_create","params":{{"name":"null0","num_blocks":1024,"block_size":512,"uuid":"7e5a0000-e5a0-4e5a-8e5a-00000000c0f4"}}}},
            {{"method":"bdev_wait_for_examine"}}
          ]}}]}}"#,
        img.display()
    );
    let p = dir.join(format!("conf-{malloc_block_size}.json"));
    std::fs::write(&p, text).unwrap();
    p
}

/// Replays `path` in an in-process target; returns what it made (or the error text).
fn via_tgt(path: &Path) -> Result<Snapshot, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let registry = Registry::new();
        let nbd = NbdServer::new(registry.clone());
        let wiring = modules::wiring(&registry, &nbd);
        let target = Target::new(registry.clone(), nbd, wiring, true);
        let r = tgt::config::replay_file(target.as_ref(), path, false).await;
        let out = match r {
            Ok(()) => Ok(snapshot(&registry)),
            Err(e) => Err(e.to_string()),
        };
        // The aio file is opened exclusively: release it for the other replay.
        target.teardown().await;
        out
    })
}

fn via_blobcli(path: &Path) -> Result<Snapshot, String> {
    let registry = Registry::new();
    let r = futures::executor::block_on(blobcli::config::load_config_file(&registry, path));
    let out = match r {
        Ok(()) => Ok(snapshot(&registry)),
        Err(e) => Err(e.root_cause().to_string()),
    };
    for d in registry.list().iter().rev() {
        futures::executor::block_on(registry.unregister(d.name())).unwrap();
    }
    out
}

/// The config with `block_size` for the malloc bdev, replayed by tgt and by blobcli.
fn replay_both(block_size: u32) -> (Result<Snapshot, String>, Result<Snapshot, String>) {
    let dir = tempfile::tempdir().unwrap();
    let p = config(dir.path(), block_size);
    (via_tgt(&p), via_blobcli(&p))
}

#[test]
fn one_config_replays_identically_in_tgt_and_blobcli() {
    let (a, b) = replay_both(512);
    let (a, b) = (a.unwrap(), b.unwrap());
    let names: Vec<&str> = a.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(names, ["Malloc0", "aio0", "null0", "ro0"]);
    let facts = |s: &Snapshot| -> Vec<String> {
        s.iter()
            .map(|d| format!("{} {} {} {} {} {}", d.0, d.1, d.2, d.3, d.4, d.5))
            .collect()
    };
    assert_eq!(facts(&a), facts(&b));
    for (x, y) in a.iter().zip(&b) {
        assert!(x.6 == y.6, "bytes of {} differ", x.0);
    }
    // The bytes are the file's (aio and the read-only bdev over it) and zeroes (malloc).
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(a[1].6, pattern);
    assert_eq!(a[3].6, pattern);
    assert!(a[0].6.iter().all(|b| *b == 0));
    assert_eq!(a[0].4, UUID);
    assert!(!a[3].5, "ro0 must be read-only");
}

#[test]
fn a_bad_parameter_fails_the_same_way_in_both() {
    let (a, b) = replay_both(1000);
    let (a, b) = (a.unwrap_err(), b.unwrap_err());
    assert_eq!(a, b);
    assert!(
        a.starts_with("bdev_malloc_create failed: Invalid argument: block_size 1000"),
        "{a}"
    );
    assert!(a.ends_with("(-22)"), "{a}");
}
