//! Lvol stores and volumes through the target: created and inspected with `spdk-rpc`, data
//! moved with qemu-io over NBD.

use std::path::Path;

use crate::common::*;
use nbd_proto as proto;
use serde_json::{json, Value};

const ESNAP_UUID: &str = "7e5a0000-e5a0-4e5a-8e5a-000000000001";

struct Env {
    tools: Tools,
    dir: tempfile::TempDir,
    nbd: std::path::PathBuf,
}

impl Env {
    fn new() -> Option<Env> {
        let tools = tools()?;
        let dir = tempfile::tempdir().unwrap();
        let nbd = dir.path().join("nbd.sock");
        Some(Env { tools, dir, nbd })
    }
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
    fn start(&self, extra: &[&str]) -> Tgt {
        let t = Tgt::start(&self.tools, self.dir.path(), &self.path("rpc.sock"), extra);
        if extra.is_empty() {
            t.ok(&["nbd_server_start", &format!("unix:{}", self.nbd.display())]);
        }
        t
    }
    /// Exports `bdev` as `name` and runs qemu-io commands on it, then removes the export.
    fn io(&self, t: &Tgt, bdev: &str, cmds: &[&str]) -> (bool, String) {
        let name = format!("x{}", bdev.replace('/', "_"));
        t.ok(&["nbd_export_add", bdev, "-n", &name]);
        let writes = cmds
            .iter()
            .any(|c| c.starts_with("write") || c.starts_with("discard"));
        let r = qemu_io(&self.tools, &nbd_uri(&name, &self.nbd), !writes, cmds);
        t.ok(&["nbd_export_remove", &name]);
        r
    }
    fn io_ok(&self, t: &Tgt, bdev: &str, cmds: &[&str]) {
        let (ok, text) = self.io(t, bdev, cmds);
        assert!(ok, "qemu-io {cmds:?} on {bdev}: {text}");
    }
}

/// A store on a 64 MiB file with 1 MiB clusters.
fn store(env: &Env, t: &Tgt) -> String {
    let f = env.path("store.img");
    if !f.exists() {
        sparse_file(&f, 64 << 20);
    }
    t.ok(&["bdev_aio_create", f.to_str().unwrap(), "aio0", "4096"]);
    t.ok(&["bdev_lvol_create_lvstore", "-c", "1048576", "aio0", "lvs"])
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn store_and_volume_lifecycle() {
    let Some(env) = Env::new() else { return };
    let t = env.start(&[]);
    let lvs_uuid = store(&env, &t);
    let stores = t.ok(&["bdev_lvol_get_lvstores"]);
    assert_eq!(stores[0]["uuid"], json!(lvs_uuid));
    assert_eq!(stores[0]["name"], json!("lvs"));
    assert_eq!(stores[0]["base_bdev"], json!("aio0"));
    assert_eq!(stores[0]["cluster_size"], json!(1 << 20));
    assert_eq!(stores[0]["block_size"], json!(4096));
    let total = stores[0]["total_data_clusters"].as_u64().unwrap();
    assert!(total > 50 && total < 64, "{total}");
    let base = &t.ok(&["bdev_get_bdevs", "-b", "aio0"])[0];
    assert_eq!(base["claim_type"], json!("read_many_write_one"));
    // A second store on the same bdev, or a store name taken.
    assert_eq!(
        t.err(&["bdev_lvol_create_lvstore", "aio0", "lvs2"]).code,
        -1
    );
    t.ok(&["bdev_malloc_create", "-b", "M0", "16", "512"]);
    assert_eq!(t.err(&["bdev_lvol_create_lvstore", "M0", "lvs"]).code, -17);
    assert_eq!(t.err(&["bdev_lvol_create_lvstore", "nope", "x"]).code, -19);

    let thick = t.ok(&["bdev_lvol_create", "-l", "lvs", "thick", "8"]);
    let thin = t.ok(&["bdev_lvol_create", "-l", "lvs", "-t", "thin", "16"]);
    assert_eq!(
        t.err(&["bdev_lvol_create", "-l", "lvs", "thin", "4"]).code,
        -17
    );
    assert_eq!(
        t.err(&["bdev_lvol_create", "-l", "nope", "v", "4"]).code,
        -19
    );
    let e = t.err(&["bdev_lvol_create", "-l", "lvs", "huge", "1000"]);
    assert_eq!(
        (e.code, e.message.as_str()),
        (-32602, "No space left on device")
    );

    let b = &t.ok(&["bdev_get_bdevs", "-b", "lvs/thin"])[0];
    assert_eq!(b["name"], thin);
    assert_eq!(b["aliases"], json!(["lvs/thin"]));
    assert_eq!(b["product_name"], json!("Logical Volume"));
    assert_eq!(b["num_blocks"], json!(4096));
    let ds = &b["driver_specific"]["lvol"];
    assert_eq!(ds["lvol_store_uuid"], json!(lvs_uuid));
    assert_eq!(ds["base_bdev"], json!("aio0"));
    assert_eq!(ds["thin_provision"], json!(true));
    assert_eq!(ds["num_allocated_clusters"], json!(0));
    let lvols = t.ok(&["bdev_lvol_get_lvols"]);
    assert_eq!(named(&lvols, "thick")["uuid"], thick);
    assert_eq!(named(&lvols, "thick")["num_allocated_clusters"], json!(8));
    assert_eq!(named(&lvols, "thin")["is_thin_provisioned"], json!(true));

    // Data through NBD, allocation on write.
    env.io_ok(
        &t,
        "lvs/thin",
        &[
            "write -P 0x61 0 1M",
            "write -P 0x62 5M 4k",
            "read -P 0x61 0 1M",
        ],
    );
    env.io_ok(
        &t,
        "lvs/thin",
        &["read -P 0x61 0 1M", "read -P 0x62 5M 4k", "read -P 0 1M 4M"],
    );
    let lvols = t.ok(&["bdev_lvol_get_lvols"]);
    assert_eq!(named(&lvols, "thin")["num_allocated_clusters"], json!(2));

    // Rename and resize.
    assert_eq!(
        t.ok(&["bdev_lvol_rename", "lvs/thin", "thin2"]),
        Value::Null
    );
    assert_eq!(t.err(&["bdev_get_bdevs", "-b", "lvs/thin"]).code, -19);
    assert_eq!(
        t.ok(&["bdev_get_bdevs", "-b", "lvs/thin2"])[0]["name"],
        thin
    );
    assert_eq!(t.ok(&["bdev_lvol_resize", "lvs/thin2", "32"]), Value::Null);
    assert_eq!(
        t.ok(&["bdev_get_bdevs", "-b", "lvs/thin2"])[0]["num_blocks"],
        json!(8192)
    );
    env.io_ok(
        &t,
        "lvs/thin2",
        &[
            "read -P 0x62 5M 4k",
            "write -P 0x63 31M 1M",
            "read -P 0x63 31M 1M",
        ],
    );
    assert_eq!(t.err(&["bdev_lvol_resize", "nope", "4"]).code, -19);

    // Rename the store; aliases follow.
    assert_eq!(
        t.ok(&["bdev_lvol_rename_lvstore", "lvs", "lvsb"]),
        Value::Null
    );
    assert_eq!(
        t.ok(&["bdev_get_bdevs", "-b", "lvsb/thick"])[0]["name"],
        thick
    );
    assert_eq!(
        t.ok(&["bdev_lvol_rename_lvstore", "lvsb", "lvs"]),
        Value::Null
    );

    // Delete volumes, then the store; the base is free again.
    assert_eq!(t.ok(&["bdev_lvol_delete", "lvs/thick"]), Value::Null);
    assert_eq!(t.err(&["bdev_lvol_delete", "lvs/thick"]).code, -19);
    assert_eq!(t.ok(&["bdev_lvol_delete", "lvs/thin2"]), Value::Null);
    assert_eq!(
        t.ok(&["bdev_lvol_delete_lvstore", "-l", "lvs"]),
        Value::Null
    );
    assert_eq!(t.ok(&["bdev_lvol_get_lvstores"]), json!([]));
    assert_eq!(
        t.ok(&["bdev_get_bdevs", "-b", "aio0"])[0]["claimed"],
        json!(false)
    );
}

#[test]
fn snapshot_clone_inflate_decouple_data() {
    let Some(env) = Env::new() else { return };
    let t = env.start(&[]);
    store(&env, &t);
    t.ok(&["bdev_lvol_create", "-l", "lvs", "-t", "v", "8"]);
    env.io_ok(&t, "lvs/v", &["write -P 0xaa 0 4M"]);
    let snap = t.ok(&["bdev_lvol_snapshot", "lvs/v", "snap"]);
    // v's writes after the snapshot do not reach the snapshot.
    env.io_ok(
        &t,
        "lvs/v",
        &[
            "write -P 0xbb 1M 1M",
            "read -P 0xaa 0 1M",
            "read -P 0xbb 1M 1M",
            "read -P 0xaa 2M 2M",
        ],
    );
    env.io_ok(&t, "lvs/snap", &["read -P 0xaa 0 4M", "read -P 0 4M 4M"]);
    // The snapshot is read-only.
    let s = &t.ok(&["bdev_get_bdevs", "-b", "lvs/snap"])[0];
    assert_eq!(s["name"], snap);
    assert_eq!(s["supported_io_types"]["write"], json!(false));
    assert_eq!(s["driver_specific"]["lvol"]["snapshot"], json!(true));
    assert_eq!(t.ok(&["nbd_export_add", "lvs/snap", "-n", "s"]), json!("s"));
    assert_eq!(t.ok(&["nbd_get_exports"])[0]["writable"], json!(false));
    let mut c = NbdClient::connect(&env.nbd, "s").unwrap();
    let (err, _) = c.request(proto::CMD_WRITE, 0, 4096, &[0u8; 4096]).unwrap();
    assert_eq!(err, proto::EPERM);
    drop(c);
    t.ok(&["nbd_export_remove", "s"]);

    // A clone reads the snapshot's data and diverges on write.
    t.ok(&["bdev_lvol_clone", "lvs/snap", "c"]);
    assert_eq!(t.err(&["bdev_lvol_clone", "lvs/v", "c2"]).code, -32602);
    let cb = &t.ok(&["bdev_get_bdevs", "-b", "lvs/c"])[0];
    assert_eq!(cb["driver_specific"]["lvol"]["clone"], json!(true));
    assert_eq!(
        cb["driver_specific"]["lvol"]["base_snapshot"],
        json!("snap")
    );
    env.io_ok(&t, "lvs/c", &["read -P 0xaa 0 4M", "write -P 0xcc 3M 1M"]);
    env.io_ok(&t, "lvs/snap", &["read -P 0xaa 3M 1M"]);
    // Deleting a snapshot with two clones is refused.
    let e = t.err(&["bdev_lvol_delete", "lvs/snap"]);
    assert_eq!(
        (e.code, e.message.as_str()),
        (-32603, "Operation not permitted")
    );

    // Inflate c: every cluster allocated, no parent, same data. Decouple v: only its own
    // clusters plus the parent's, no parent any more, same data.
    let steps: [(&str, &str, u64, &[&str]); 2] = [
        (
            "bdev_lvol_inflate",
            "c",
            8,
            &["read -P 0xaa 0 3M", "read -P 0xcc 3M 1M", "read -P 0 4M 4M"],
        ),
        (
            "bdev_lvol_decouple_parent",
            "v",
            4,
            &[
                "read -P 0xaa 0 1M",
                "read -P 0xbb 1M 1M",
                "read -P 0xaa 2M 2M",
                "read -P 0 4M 4M",
            ],
        ),
    ];
    for (method, name, clusters, reads) in steps {
        let bdev = format!("lvs/{name}");
        assert_eq!(t.ok(&[method, &bdev]), Value::Null);
        let lvols = t.ok(&["bdev_lvol_get_lvols"]);
        assert_eq!(named(&lvols, name)["is_clone"], json!(false));
        assert_eq!(
            named(&lvols, name)["num_allocated_clusters"],
            json!(clusters)
        );
        env.io_ok(&t, &bdev, reads);
    }
    let e = t.err(&["bdev_lvol_decouple_parent", "lvs/v"]);
    assert_eq!(e.code, -32602);
    // Now the snapshot has no clones and can go.
    assert_eq!(t.ok(&["bdev_lvol_delete", "lvs/snap"]), Value::Null);
    env.io_ok(&t, "lvs/v", &["read -P 0xaa 0 1M", "read -P 0xbb 1M 1M"]);
}

/// A 4 MiB file where block b (4 KiB) is filled with byte (b % 200) + 1.
fn esnap_file(path: &Path) {
    let mut data = vec![0u8; 4 << 20];
    for (b, chunk) in data.chunks_mut(4096).enumerate() {
        chunk.fill((b % 200) as u8 + 1);
    }
    std::fs::write(path, data).unwrap();
}

/// Registers `file` read-only as the aio bdev `esnap` with the external snapshot's uuid.
fn add_esnap(t: &Tgt, file: &str) {
    t.ok(&[
        "bdev_aio_create",
        "-r",
        "-u",
        ESNAP_UUID,
        file,
        "esnap",
        "4096",
    ]);
}

#[test]
fn esnap_clone_degraded_and_healed() {
    let Some(env) = Env::new() else { return };
    let t = env.start(&[]);
    store(&env, &t);
    let ef = env.path("esnap.img");
    esnap_file(&ef);
    let efs = ef.to_str().unwrap();
    add_esnap(&t, efs);
    let ec = t.ok(&["bdev_lvol_clone_bdev", ESNAP_UUID, "lvs", "ec"]);
    assert_eq!(
        t.err(&["bdev_lvol_clone_bdev", "nope", "lvs", "x"]).code,
        -32602
    );
    let b = &t.ok(&["bdev_get_bdevs", "-b", "lvs/ec"])[0];
    assert_eq!(b["name"], ec);
    assert_eq!(b["num_blocks"], json!(1024));
    assert_eq!(b["driver_specific"]["lvol"]["esnap_clone"], json!(true));
    assert_eq!(
        b["driver_specific"]["lvol"]["external_snapshot_name"],
        json!(ESNAP_UUID)
    );
    let e = &t.ok(&["bdev_get_bdevs", "-b", "esnap"])[0];
    assert_eq!(e["claim_type"], json!("read_many_write_none"));

    // Reads come from the external snapshot; writes land in the clone only.
    env.io_ok(
        &t,
        "lvs/ec",
        &[
            "read -P 1 0 4k",
            "read -P 2 4k 4k",
            "read -P 11 40k 4k",
            "write -P 0xee 8k 8k",
        ],
    );
    env.io_ok(
        &t,
        "lvs/ec",
        &["read -P 1 0 4k", "read -P 0xee 8k 8k", "read -P 5 16k 4k"],
    );
    let data = std::fs::read(&ef).unwrap();
    assert!(
        data[8192..16384].iter().all(|&x| x == 3 || x == 4),
        "esnap file unchanged"
    );

    // Unload the store, remove the external snapshot, load the store again: the clone is
    // degraded. This project keeps its bdev (SPDK would not create one): the cluster the
    // clone owns stays readable, I/O that needs the missing base fails (no retries here).
    assert_eq!(
        t.ok(&["bdev_lvol_set_esnap_retry", "-r", "0", "-d", "0"]),
        json!(true)
    );
    assert_eq!(t.ok(&["bdev_lvol_get_esnap_retry"])["retries"], json!(0));
    t.ok(&["bdev_aio_delete", "aio0"]);
    assert_eq!(t.ok(&["bdev_lvol_get_lvstores"]), json!([]));
    t.ok(&["bdev_aio_delete", "esnap"]);
    let sf = env.path("store.img");
    t.ok(&["bdev_aio_create", sf.to_str().unwrap(), "aio0", "4096"]);
    let lvols = t.ok(&["bdev_lvol_get_lvols"]);
    assert_eq!(named(&lvols, "ec")["is_degraded"], json!(true));
    assert_eq!(named(&lvols, "ec")["is_esnap_clone"], json!(true));
    env.io_ok(&t, "lvs/ec", &["read -P 1 0 4k", "read -P 0xee 8k 8k"]);
    let (ok, _) = env.io(&t, "lvs/ec", &["read -P 57 1M 4k"]);
    assert!(
        !ok,
        "a read that needs the missing external snapshot must fail"
    );

    // The external snapshot comes back: healed, same data.
    add_esnap(&t, efs);
    t.ok(&["bdev_wait_for_examine"]);
    let lvols = t.ok(&["bdev_lvol_get_lvols"]);
    assert_eq!(named(&lvols, "ec")["is_degraded"], json!(false));
    env.io_ok(
        &t,
        "lvs/ec",
        &[
            "read -P 1 0 4k",
            "read -P 0xee 8k 8k",
            "read -P 5 16k 4k",
            "read -P 57 1M 4k",
        ],
    );
}

#[test]
fn read_only_volumes_and_restart_with_saved_config() {
    let Some(env) = Env::new() else { return };
    let mut t = env.start(&[]);
    let lvs_uuid = store(&env, &t);
    let v = t.ok(&["bdev_lvol_create", "-l", "lvs", "-t", "v", "4"]);
    env.io_ok(&t, "lvs/v", &["write -P 0x77 0 2M"]);
    assert_eq!(t.ok(&["bdev_lvol_set_read_only", "lvs/v"]), Value::Null);
    let b = &t.ok(&["bdev_get_bdevs", "-b", "lvs/v"])[0];
    assert_eq!(b["supported_io_types"]["write"], json!(false));
    assert_eq!(b["supported_io_types"]["unmap"], json!(false));
    assert_eq!(b["supported_io_types"]["write_zeroes"], json!(false));
    assert_eq!(b["supported_io_types"]["read"], json!(true));
    // Exported read-only; writes get EPERM.
    t.ok(&["nbd_export_add", "lvs/v", "-n", "v"]);
    assert_eq!(t.ok(&["nbd_get_exports"])[0]["writable"], json!(false));
    let mut c = NbdClient::connect(&env.nbd, "v").unwrap();
    let (err, _) = c.request(proto::CMD_WRITE, 0, 4096, &[0u8; 4096]).unwrap();
    assert_eq!(err, proto::EPERM);
    let (err, data) = c.request(proto::CMD_READ, 0, 4096, &[]).unwrap();
    assert_eq!(err, 0);
    assert!(data.iter().all(|&b| b == 0x77));
    drop(c);
    // A read-only bdev over a writable lvol.
    t.ok(&["bdev_lvol_create", "-l", "lvs", "-t", "w", "4"]);
    env.io_ok(&t, "lvs/w", &["write -P 0x78 0 1M"]);
    assert_eq!(
        t.ok(&["bdev_ro_create", "lvs/w", "-n", "ro_w"]),
        json!("ro_w")
    );
    t.ok(&["nbd_export_add", "ro_w"]);

    let cfg_path = env.path("config.json");
    let cfg = t.save_config(false);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let text = serde_json::to_string(&cfg).unwrap();
    assert!(
        !text.contains("bdev_lvol_"),
        "lvols never appear in the config: {text}"
    );
    assert_eq!(t.stop(), 0);

    let t = env.start(&["--json", cfg_path.to_str().unwrap()]);
    let stores = t.ok(&["bdev_lvol_get_lvstores"]);
    assert_eq!(stores[0]["uuid"], json!(lvs_uuid));
    assert_eq!(t.ok(&["bdev_get_bdevs", "-b", "lvs/v"])[0]["name"], v);
    assert_eq!(
        t.ok(&["bdev_get_bdevs", "-b", "lvs/v"])[0]["supported_io_types"]["write"],
        json!(false)
    );
    assert_eq!(
        t.ok(&["bdev_get_bdevs", "-b", "ro_w"])[0]["supported_io_types"]["write"],
        json!(false)
    );
    let exports = t.ok(&["nbd_get_exports"]);
    assert_eq!(exports.as_array().unwrap().len(), 2);
    qemu_io_ro_ok(&env.tools, &nbd_uri("v", &env.nbd), &["read -P 0x77 0 2M"]);
    qemu_io_ro_ok(
        &env.tools,
        &nbd_uri("ro_w", &env.nbd),
        &["read -P 0x78 0 1M"],
    );
    assert_eq!(t.save_config(false), cfg);
}

#[test]
fn embedded_default_with_no_arguments() {
    let Some(env) = Env::new() else { return };
    let _lock = DefaultSocketLock::take();
    let default_sock = Path::new("/var/tmp/spdk.sock");
    assert!(
        std::os::unix::net::UnixStream::connect(default_sock).is_err(),
        "another target listens on /var/tmp/spdk.sock"
    );
    let mut t = Tgt::start_default(&env.tools, env.dir.path());
    let data = env.path("tgt-data");
    let store = data.join("store.img");
    assert_eq!(std::fs::metadata(&store).unwrap().len(), 8 << 30);
    let stores = t.ok(&["bdev_lvol_get_lvstores"]);
    assert_eq!(stores[0]["name"], json!("lvs0"));
    assert_eq!(stores[0]["base_bdev"], json!("store0"));
    let lvs_uuid = stores[0]["uuid"].clone();
    t.ok(&["bdev_lvol_create", "-l", "lvs0", "-t", "vol0", "64"]);
    t.ok(&["nbd_export_add", "lvs0/vol0", "-n", "vol0"]);
    let nbd = data.join("nbd.sock");
    qemu_io_ok(
        &env.tools,
        &nbd_uri("vol0", &nbd),
        &["write -P 0xab 0 1M", "read -P 0xab 0 1M"],
    );
    assert_eq!(t.stop(), 0);
    assert!(!default_sock.exists());

    // The second start finds the store again by tasting instead of creating a new one.
    let mut t = Tgt::start_default(&env.tools, env.dir.path());
    let stores = t.ok(&["bdev_lvol_get_lvstores"]);
    assert_eq!(stores.as_array().unwrap().len(), 1);
    assert_eq!(stores[0]["uuid"], lvs_uuid);
    // The export name defaults to the bdev name, slash included (as the README shows).
    assert_eq!(
        t.ok(&["nbd_export_add", "lvs0/vol0", "--writable"]),
        json!("lvs0/vol0")
    );
    qemu_io_ro_ok(
        &env.tools,
        &nbd_uri("lvs0/vol0", &nbd),
        &["read -P 0xab 0 1M"],
    );
    assert_eq!(t.stop(), 0);
}

/// The super block's `clean` field (offset 16, u32 LE) of the store file.
fn clean_flag(path: &Path) -> u32 {
    let data = std::fs::read(path).unwrap();
    u32::from_le_bytes(data[16..20].try_into().unwrap())
}

#[test]
fn clean_shutdown_and_crash_recovery() {
    let Some(env) = Env::new() else { return };
    let mut t = env.start(&[]);
    store(&env, &t);
    t.ok(&["bdev_lvol_create", "-l", "lvs", "-t", "a", "8"]);
    env.io_ok(&t, "lvs/a", &["write -P 0x1a 0 2M"]);
    let cfg_path = env.path("config.json");
    std::fs::write(&cfg_path, t.save_config(false).to_string()).unwrap();
    // A clean shutdown unloads the store: clean = 1.
    assert_eq!(t.stop(), 0);
    let sf = env.path("store.img");
    assert_eq!(clean_flag(&sf), 1);

    // Restart, change metadata, then die without unloading (spdk_kill_instance SIGKILL).
    let mut t = env.start(&["--json", cfg_path.to_str().unwrap()]);
    t.ok(&["bdev_lvol_create", "-l", "lvs", "-t", "b", "4"]);
    env.io_ok(&t, "lvs/b", &["write -P 0x1b 1M 1M"]);
    let _ = t.rpc_raw(&["spdk_kill_instance", "SIGKILL"]);
    let mut child = t.child.take().unwrap();
    let st = child.wait().unwrap();
    assert!(!st.success(), "killed, not a clean exit");
    assert_eq!(clean_flag(&sf), 0, "a store in use is marked dirty on disk");

    // The next start recovers the store by tasting: both volumes with their data.
    let _ = std::fs::remove_file(env.path("rpc.sock"));
    let _ = std::fs::remove_file(&env.nbd);
    let t = env.start(&["--json", cfg_path.to_str().unwrap()]);
    let lvols = t.ok(&["bdev_lvol_get_lvols"]);
    assert_eq!(lvols.as_array().unwrap().len(), 2, "{lvols}");
    env.io_ok(&t, "lvs/a", &["read -P 0x1a 0 2M"]);
    env.io_ok(&t, "lvs/b", &["read -P 0x1b 1M 1M", "read -P 0 0 1M"]);
}
