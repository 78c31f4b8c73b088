//! The operator-facing methods (issue 16) driven by SPDK's own `spdk-rpc`: logs, null
//! bdevs, SPDK's NBD disk methods, the lvol fragmap, set_parent_bdev error codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;

/// Starts the target with its stderr going to `dir/stderr.log` (returned) and `env` set.
fn start_logged(tools: &Tools, dir: &Path, env: &[(&str, &str)]) -> (Tgt, PathBuf) {
    let log = dir.join("stderr.log");
    let sock = dir.join("rpc.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tgt"));
    cmd.arg("-r")
        .arg(&sock)
        .current_dir(dir)
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().expect("spawn tgt");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "tgt did not open its socket");
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "tgt exited early: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Tgt {
        child: Some(child),
        sock,
        tools: tools.clone(),
    };
    (t, log)
}

fn read_log(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// Lines of `text` after the first `skip` bytes that mention `needle`.
fn lines_with(text: &str, skip: usize, needle: &str) -> usize {
    text[skip..].lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn log_levels_and_flags_drive_the_tracing_filter() {
    let Some((tools, dir)) = setup() else { return };
    let (t, log) = start_logged(&tools, dir.path(), &[]);
    // SPDK's shapes: levels are strings, flags an object of booleans.
    assert_eq!(t.ok(&["log_get_print_level"]), json!("WARNING"));
    assert_eq!(t.ok(&["log_get_level"]), json!("WARNING"));
    let flags = t.ok(&["log_get_flags"]);
    for f in ["lvol", "blob", "nbd", "bdev"] {
        assert_eq!(flags[f], json!(false), "{flags}");
    }
    t.ok(&["log_set_level", "ERROR"]);
    assert_eq!(t.ok(&["log_get_level"]), json!("ERROR"));
    assert_eq!(t.ok(&["log_get_print_level"]), json!("WARNING"));

    // A new lvol store on a file of its own: the lines the log gained that say it was
    // created, and the log.
    let new_store = |i: u32| {
        let f = dir.path().join(format!("{i}.img"));
        sparse_file(&f, 64 << 20);
        let (aio, lvs) = (format!("aio{i}"), format!("lvs{i}"));
        let mark = read_log(&log).len();
        t.ok(&["bdev_aio_create", f.to_str().unwrap(), &aio, "4096"]);
        t.ok(&["bdev_lvol_create_lvstore", &aio, &lvs]);
        let text = read_log(&log);
        (
            lines_with(&text, mark, &format!("lvol store {lvs} created")),
            text,
        )
    };
    // A new malloc bdev: the registry's lines the log gained, and what it gained.
    let new_malloc = |name: &str| {
        let mark = read_log(&log).len();
        t.ok(&["bdev_malloc_create", "-b", name, "1", "512"]);
        let text = read_log(&log);
        (
            lines_with(&text, mark, "registered"),
            text[mark..].to_string(),
        )
    };

    // At WARNING nothing of the lvol module's info or debug messages is printed.
    let (n, text) = new_store(0);
    assert_eq!(n, 0, "{text}");

    // INFO prints them.
    t.ok(&["log_set_print_level", "INFO"]);
    assert_eq!(t.ok(&["log_get_print_level"]), json!("INFO"));
    let (n, text) = new_store(1);
    assert_eq!(n, 1, "{text}");

    // The bdev flag turns the registry's debug messages on, and off again.
    let (n, text) = new_malloc("M0");
    assert_eq!(n, 0, "{text}");
    t.ok(&["log_set_flag", "bdev"]);
    assert_eq!(t.ok(&["log_get_flags"])["bdev"], json!(true));
    let (n, text) = new_malloc("M1");
    assert!(n >= 1, "{text}");
    assert!(text.contains("DEBUG"), "{text}");
    t.ok(&["log_clear_flag", "bdev"]);
    assert_eq!(t.ok(&["log_get_flags"])["bdev"], json!(false));
    let (n, text) = new_malloc("M2");
    assert_eq!(n, 0, "{text}");

    // "all" and unknown flags as SPDK.
    t.ok(&["log_set_flag", "all"]);
    let flags = t.ok(&["log_get_flags"]);
    assert!(flags
        .as_object()
        .unwrap()
        .values()
        .all(|v| v == &json!(true)));
    t.ok(&["log_clear_flag", "all"]);
    let e = t.err(&["log_set_flag", "nosuchflag"]);
    assert_eq!((e.code, e.message.as_str()), (-32602, "invalid log flag"));
    let e = t.err(&["log_clear_flag", "nosuchflag"]);
    assert_eq!(e.code, -32602);
    // ERROR silences the lvol module's info messages again.
    t.ok(&["log_set_print_level", "ERROR"]);
    let (n, text) = new_store(2);
    assert_eq!(n, 0, "{text}");
}

#[test]
fn log_methods_before_init_and_rust_log() {
    let Some((tools, dir)) = setup() else { return };
    let sock = dir.path().join("rpc.sock");
    let t = Tgt::start(&tools, dir.path(), &sock, &["--wait-for-rpc"]);
    // Allowed in the STARTUP state as in SPDK.
    t.ok(&["log_set_print_level", "DEBUG"]);
    assert_eq!(t.ok(&["log_get_print_level"]), json!("DEBUG"));
    drop(t);
    // A bare level in RUST_LOG is the initial print level.
    let d2 = tempfile::tempdir().unwrap();
    let (t, _log) = start_logged(&tools, d2.path(), &[("RUST_LOG", "debug,hyper=off")]);
    assert_eq!(t.ok(&["log_get_print_level"]), json!("DEBUG"));
    drop(t);
    // `-L FLAG` as spdk_tgt's; an unknown flag is reported, not fatal.
    let d3 = tempfile::tempdir().unwrap();
    let sock = d3.path().join("rpc.sock");
    let t = Tgt::start(&tools, d3.path(), &sock, &["-L", "lvol", "-L", "nope"]);
    let flags = t.ok(&["log_get_flags"]);
    assert_eq!(
        (flags["lvol"].clone(), flags["blob"].clone()),
        (json!(true), json!(false))
    );
}

#[test]
fn null_bdev_create_resize_delete() {
    let Some((tools, dir)) = setup() else { return };
    let t = start(&tools, dir.path());
    t.nbd_server_start(dir.path());
    let uuid = "7e5a0000-e5a0-4e5a-8e5a-0000000000aa";
    assert_eq!(
        t.ok(&["bdev_null_create", "-u", uuid, "N0", "4", "512"]),
        json!("N0")
    );
    let b = &t.ok(&["bdev_get_bdevs", "-b", "N0"])[0];
    assert_eq!(b["product_name"], json!("Null disk"));
    assert_eq!(
        (b["block_size"].clone(), b["num_blocks"].clone()),
        (json!(512), json!(8192))
    );
    assert_eq!(b["uuid"], json!(uuid));
    assert_eq!(t.err(&["bdev_null_create", "N0", "4", "512"]).code, -17);

    // Writes are discarded, reads give zeroes.
    let url = t.ok(&["nbd_start_disk", "N0"]);
    let url = url.as_str().unwrap();
    qemu_io_ok(&tools, url, &["write -P 0xab 0 64k", "read -P 0 0 64k"]);

    // Grow (MiB); shrinking and non-null bdevs are -22, a missing bdev -19.
    assert_eq!(t.ok(&["bdev_null_resize", "N0", "8"]), json!(true));
    assert_eq!(
        t.ok(&["bdev_get_bdevs", "-b", "N0"])[0]["num_blocks"],
        json!(16384)
    );
    assert_eq!(t.err(&["bdev_null_resize", "N0", "2"]).code, -22);
    t.ok(&["bdev_malloc_create", "-b", "M0", "4", "512"]);
    assert_eq!(t.err(&["bdev_null_resize", "M0", "8"]).code, -22);
    assert_eq!(t.err(&["bdev_null_resize", "nope", "8"]).code, -19);

    // What we do not implement is refused, not ignored.
    let e = t.err(&["bdev_null_create", "-m", "8", "N1", "4", "512"]);
    assert_eq!(e.code, -95, "{e:?}");
    assert_eq!(
        t.err(&["bdev_null_create", "-a", "8", "N1", "4", "512"])
            .code,
        -95
    );
    assert_eq!(t.err(&["bdev_null_create", "N1", "4", "1000"]).code, -22);
    assert!(t
        .ok(&["bdev_get_bdevs"])
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["name"] != "N1"));

    // save_config has the grown size.
    let cfg = bdev_config(&t.ok(&["save_config"]));
    let e = cfg
        .iter()
        .find(|e| e["method"] == "bdev_null_create")
        .expect("bdev_null_create in save_config");
    assert_eq!(e["params"]["name"], json!("N0"));
    assert_eq!(e["params"]["num_blocks"], json!(16384));
    assert_eq!(e["params"]["block_size"], json!(512));
    assert_eq!(e["params"]["uuid"], json!(uuid));

    // Delete: the malloc delete does not take it, the null one does.
    assert_eq!(t.err(&["bdev_malloc_delete", "N0"]).code, -19);
    t.ok(&["bdev_null_delete", "N0"]);
    assert_eq!(t.err(&["bdev_null_delete", "N0"]).code, -19);
    assert_eq!(t.err(&["bdev_get_bdevs", "-b", "N0"]).code, -19);
}

#[test]
fn nbd_disk_methods_map_onto_exports() {
    let Some((tools, dir)) = setup() else { return };
    let t = start(&tools, dir.path());
    t.ok(&["bdev_malloc_create", "-b", "M0", "8", "512"]);
    t.ok(&["bdev_malloc_create", "-b", "M1", "8", "512"]);
    // No server yet: nothing to start a disk on.
    let e = t.err(&["nbd_start_disk", "M0"]);
    assert_eq!(e.code, -19, "{e:?}");
    assert!(e.message.contains("nbd_server_start"), "{e:?}");
    let nbd = t.nbd_server_start(dir.path());

    let url = t.ok(&["nbd_start_disk", "M0"]);
    assert_eq!(url, json!(nbd_uri("M0", &nbd)));
    let url = url.as_str().unwrap().to_string();
    qemu_io_ok(&tools, &url, &["write -P 0x5a 4k 8k", "read -P 0x5a 4k 8k"]);
    // The same bytes through our own export listing.
    let ex = t.ok(&["nbd_get_exports"]);
    assert_eq!(ex[0]["bdev_name"], json!("M0"));

    // A kernel device path is refused clearly.
    let e = t.err(&["nbd_start_disk", "M1", "/dev/nbd0"]);
    assert_eq!(e.code, -95);
    assert!(e.message.contains("userspace NBD only"), "{e:?}");
    // An export URL of our server picks the export name.
    let u1 = nbd_uri("disk1", &nbd);
    assert_eq!(t.ok(&["nbd_start_disk", "M1", &u1]), json!(u1));
    qemu_io_ok(&tools, &u1, &["write -P 0x77 0 4k", "read -P 0x77 0 4k"]);
    // A URL of another socket is illegal; a bdev already started is busy.
    let other = nbd_uri("x", Path::new("/tmp/other.sock"));
    assert_eq!(t.err(&["nbd_start_disk", "M1", &other]).code, -19);
    assert_eq!(t.err(&["nbd_start_disk", "M0"]).code, -16);
    assert_eq!(t.err(&["nbd_start_disk", "nope"]).code, -19);

    let disks = t.ok(&["nbd_get_disks"]);
    let mut got: Vec<(String, String)> = disks
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["nbd_device"].as_str().unwrap().to_string(),
                d["bdev_name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![
        (url.clone(), "M0".to_string()),
        (u1.clone(), "M1".to_string()),
    ];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(
        t.ok(&["nbd_get_disks", "-n", &u1]),
        json!([{"nbd_device": u1, "bdev_name": "M1"}])
    );
    assert_eq!(t.err(&["nbd_get_disks", "-n", "/dev/nbd3"]).code, -19);

    // Stop: the export goes, a client can no longer open it.
    t.ok(&["nbd_stop_disk", &url]);
    let (ok, _) = qemu_io(&tools, &url, true, &["read 0 4k"]);
    assert!(!ok, "export still served after nbd_stop_disk");
    assert_eq!(t.err(&["nbd_stop_disk", &url]).code, -19);
    assert_eq!(t.err(&["nbd_stop_disk", "/dev/nbd0"]).code, -95);
    assert_eq!(t.ok(&["nbd_get_disks"]).as_array().unwrap().len(), 1);
    // The data written through the started disk is on the bdev (re-exported).
    let again = t.ok(&["nbd_start_disk", "M0"]);
    qemu_io_ok(
        &tools,
        again.as_str().unwrap(),
        &["read -P 0x5a 4k 8k", "read -P 0 0 4k"],
    );
}

#[test]
fn lvol_fragmap_and_set_parent_bdev_codes() {
    let Some((tools, dir)) = setup() else { return };
    let t = start(&tools, dir.path());
    aio_lvs(&t, dir.path(), 64 << 20);
    t.ok(&["bdev_lvol_create", "-l", "lvs", "-t", "v", "8"]);
    t.nbd_server_start(dir.path());
    let url = t.ok(&["nbd_start_disk", "lvs/v"]);
    let url = url.as_str().unwrap();

    // Nothing written: nothing allocated.
    let m = t.ok(&["bdev_lvol_get_fragmap", "lvs/v"]);
    assert_eq!(
        m,
        json!({"cluster_size": 1048576, "num_clusters": 8, "num_allocated_clusters": 0,
               "fragmap": "AA=="})
    );
    // Clusters 0, 3 and 4 written: bits 0, 3, 4 of the first byte (0x19).
    qemu_io_ok(
        &tools,
        url,
        &["write -P 1 0 4k", "write -P 2 3M 4k", "write -P 3 4M 1M"],
    );
    let m = t.ok(&["bdev_lvol_get_fragmap", "lvs/v"]);
    assert_eq!(m["num_clusters"], json!(8));
    assert_eq!(m["num_allocated_clusters"], json!(3));
    assert_eq!(m["fragmap"], json!("GQ=="));
    // A range: clusters 3..5 are bits 0 and 1.
    let m = t.ok(&[
        "bdev_lvol_get_fragmap",
        "lvs/v",
        "--offset",
        "3145728",
        "--size",
        "2097152",
    ]);
    assert_eq!(
        m,
        json!({"cluster_size": 1048576, "num_clusters": 2, "num_allocated_clusters": 2,
               "fragmap": "Aw=="})
    );
    // From an offset to the end: clusters 4..8, only the first set.
    let m = t.ok(&["bdev_lvol_get_fragmap", "lvs/v", "--offset", "4194304"]);
    assert_eq!(
        (m["num_clusters"].clone(), m["fragmap"].clone()),
        (json!(4), json!("AQ=="))
    );
    assert_eq!(
        t.err(&["bdev_lvol_get_fragmap", "lvs/v", "--offset", "1000"])
            .code,
        -22
    );
    assert_eq!(
        t.err(&[
            "bdev_lvol_get_fragmap",
            "lvs/v",
            "--offset",
            "7340032",
            "--size",
            "2097152"
        ])
        .code,
        -22
    );
    assert_eq!(
        t.err(&["bdev_lvol_get_fragmap", "lvs/v", "--offset", "16777216"])
            .code,
        -22
    );
    assert_eq!(t.err(&["bdev_lvol_get_fragmap", "lvs/nope"]).code, -19);

    // set_parent_bdev: a parent that does not exist is SPDK's -32602, a missing lvol -19.
    t.ok(&["bdev_lvol_create", "-l", "lvs", "-t", "w", "4"]);
    let e = t.err(&["bdev_lvol_set_parent_bdev", "lvs/w", "nope"]);
    assert_eq!((e.code, e.message.as_str()), (-32602, "No such device"));
    let e = t.err(&["bdev_lvol_set_parent_bdev", "lvs/nope", "aio0"]);
    assert_eq!(e.code, -19);
}

#[test]
fn aio_rescan_grows_the_bdev_and_lets_the_store_grow() {
    let Some((tools, dir)) = setup() else { return };
    let t = start(&tools, dir.path());
    let f = aio_lvs(&t, dir.path(), 32 << 20);
    let set_len = |len: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(len)
            .unwrap();
    };
    let aio_blocks = || t.ok(&["bdev_get_bdevs", "-b", "aio0"])[0]["num_blocks"].clone();
    let before = t.ok(&["bdev_lvol_get_lvstores", "-l", "lvs"])[0]["total_data_clusters"]
        .as_u64()
        .unwrap();
    // Nothing changed: still true, same size.
    assert_eq!(t.ok(&["bdev_aio_rescan", "aio0"]), json!(true));
    assert_eq!(aio_blocks(), json!(8192));

    set_len(64 << 20);
    assert_eq!(t.ok(&["bdev_aio_rescan", "aio0"]), json!(true));
    assert_eq!(aio_blocks(), json!(16384));
    t.ok(&["bdev_lvol_grow_lvstore", "-l", "lvs"]);
    let after = t.ok(&["bdev_lvol_get_lvstores", "-l", "lvs"])[0]["total_data_clusters"]
        .as_u64()
        .unwrap();
    assert!(after >= before + 32, "{before} -> {after}");

    // A smaller file is refused and the size stays; other bdevs are not aio bdevs.
    set_len(48 << 20);
    assert_eq!(t.err(&["bdev_aio_rescan", "aio0"]).code, -16);
    assert_eq!(aio_blocks(), json!(16384));
    t.ok(&["bdev_malloc_create", "-b", "M0", "4", "512"]);
    assert_eq!(t.err(&["bdev_aio_rescan", "M0"]).code, -19);
    assert_eq!(t.err(&["bdev_aio_rescan", "nope"]).code, -19);
}
