//! Power cuts at the target level: a lvol store on a device whose writes and flushes are
//! recorded (bdev-core's `cached` device, RAM behind a volatile write cache), metadata
//! operations driven by SPDK's `spdk-rpc` against an in-process target, client data written
//! and flushed by `qemu-io` over the target's NBD export. Crash images are built from the
//! device's log at every cut point (`LoseAll`, `KeepAll` and seeded `Random` crash states),
//! opened again (tasting) and checked: the store loads, every lvol is as before or after the
//! operation in flight (and as after it once it returned), and every byte qemu-io wrote and
//! flushed reads back. The last image is also opened by a second target and read with
//! `spdk-rpc` and `qemu-io`.
//!
//! `spdk-rpc` (`$SPDK_RPC` or PATH) and `qemu-io` (`$QEMU_IO` or PATH) are required: without
//! them the test fails and says what is missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bdev_core::backend::cached::{CachedBdev, CrashPlan};
use bdev_core::{BlockDevice, IoBuf, Registry};
use serde_json::{json, Value};
use test_support::tgt::{find_tool, plugin_dir, qemu_io, spdk_rpc_raw, spdk_rpc_result};
use tgt::nbd::server::NbdServer;
use tgt::target::Target;
use tgt::{modules, server};

const BL: u32 = 4096;
const DEV_BYTES: u64 = 8 << 20;
const CLUSTER: u64 = 128 * 1024;
/// Random crash states at the cut where a step returned (one at other cuts).
const SEEDS: u64 = 2;
/// Cut points visited while a step runs, besides the one where it returned.
const MID_CUTS: usize = 4;

struct Tools {
    rpc: PathBuf,
    qemu_io: PathBuf,
}

/// The external tools, or a failure that names what is missing.
fn tools() -> Tools {
    let rpc = find_tool("SPDK_RPC", "spdk-rpc", &["/work/venv-spdk/bin/spdk-rpc"]);
    let qemu_io = find_tool("QEMU_IO", "qemu-io", &[]);
    match (rpc, qemu_io) {
        (Some(rpc), Some(qemu_io)) => Tools { rpc, qemu_io },
        (rpc, qemu_io) => panic!(
            "crash_tgt needs spdk-rpc (set SPDK_RPC or put it on PATH; pip install spdk): {rpc:?}, \
             and qemu-io (set QEMU_IO or install qemu-utils): {qemu_io:?}"
        ),
    }
}

/// A target running in this process on its own runtime, serving `registry`.
struct InProc {
    rt: tokio::runtime::Runtime,
    target: Arc<Target>,
    sock: PathBuf,
    nbd_sock: PathBuf,
}

impl InProc {
    /// Starts a target whose registry already holds `dev` (registered after the modules are
    /// wired, so the lvol module tastes it), with its NBD server on `<dir>/<tag>-nbd.sock`.
    fn start(dir: &Path, tag: &str, dev: Arc<dyn BlockDevice>, tools: &Tools) -> InProc {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let registry = Registry::new();
        let handle = rt.handle().clone();
        registry.set_spawner(Arc::new(move |f| {
            handle.spawn(f);
        }));
        let nbd = NbdServer::new(registry.clone());
        let wiring = modules::wiring(&registry, &nbd);
        let target = Target::new(registry.clone(), nbd, wiring, false);
        rt.block_on(async {
            registry.register(dev).await.unwrap();
            registry.wait_for_examine().await;
        });
        let sock = dir.join(format!("{tag}-rpc.sock"));
        let (listener, _bound) = rt.block_on(async { server::bind(&sock) }).unwrap();
        rt.spawn(server::run(target.clone(), listener));
        let p = InProc {
            rt,
            target,
            sock,
            nbd_sock: dir.join(format!("{tag}-nbd.sock")),
        };
        let listen = format!("unix:{}", p.nbd_sock.display());
        p.ok(tools, &["nbd_server_start", &listen]);
        p
    }

    /// Runs spdk-rpc; must succeed; its output parsed as JSON (null when empty).
    fn ok(&self, tools: &Tools, args: &[&str]) -> Value {
        spdk_rpc_result(&spdk_rpc_raw(&tools.rpc, &self.sock, args), args)
            .unwrap_or_else(|e| panic!("spdk-rpc {args:?}: {e:?}"))
    }

    /// Runs several argument-less spdk-rpc commands in one client process (commands on
    /// stdin, one a line); returns each one's JSON output, in order.
    fn ok_batch(&self, tools: &Tools, cmds: &[&str]) -> Vec<Value> {
        use std::io::Write;
        let mut child = Command::new(&tools.rpc)
            .arg("-s")
            .arg(&self.sock)
            .env("PYTHONPATH", plugin_dir())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run spdk-rpc");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(cmds.join("\n").as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "spdk-rpc {cmds:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let values: Vec<Value> = serde_json::Deserializer::from_str(&text)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("spdk-rpc {cmds:?} printed {text}: {e}"));
        assert_eq!(values.len(), cmds.len(), "spdk-rpc {cmds:?} printed {text}");
        values
    }

    /// Exports `bdev` over NBD, runs qemu-io commands on it, removes the export.
    fn qemu_io(&self, tools: &Tools, bdev: &str, cmds: &[&str]) -> String {
        let name = bdev.replace('/', "_");
        self.ok(tools, &["nbd_export_add", bdev, "-n", &name]);
        let uri = format!("nbd+unix:///{name}?socket={}", self.nbd_sock.display());
        let (ok, text) = qemu_io(&tools.qemu_io, &uri, false, cmds);
        self.ok(tools, &["nbd_export_remove", &name]);
        assert!(ok, "qemu-io {cmds:?} on {bdev}: {text}");
        text
    }

    /// Every lvol of the store, by UUID: (name, snapshot/clone/thin flags, size in bytes).
    fn lvols(&self, tools: &Tools) -> (String, BTreeMap<String, Value>) {
        let v = self.ok_batch(
            tools,
            &[
                "bdev_lvol_get_lvstores",
                "bdev_get_bdevs",
                "bdev_lvol_get_lvols",
            ],
        );
        let (stores, bdevs) = (&v[0], &v[1]);
        let lvs = stores[0]["name"].as_str().unwrap_or_default().to_string();
        let mut out = BTreeMap::new();
        for l in v[2].as_array().unwrap() {
            let uuid = l["uuid"].as_str().unwrap().to_string();
            let b = bdevs
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["uuid"] == l["uuid"])
                .unwrap_or_else(|| panic!("no bdev for lvol {uuid}"));
            let size = b["num_blocks"].as_u64().unwrap() * b["block_size"].as_u64().unwrap();
            out.insert(
                uuid,
                json!({"name": l["name"], "snapshot": l["is_snapshot"], "clone": l["is_clone"],
                       "thin": l["is_thin_provisioned"], "size": size}),
            );
        }
        (lvs, out)
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        let t = self.target.clone();
        self.rt.block_on(async move { t.teardown().await });
    }
}

/// What a reopened image holds: store name, lvols by UUID (as [`InProc::lvols`] describes
/// them) and each lvol's bytes.
struct Reopened {
    lvs: String,
    lvols: BTreeMap<String, Value>,
    data: BTreeMap<String, Vec<u8>>,
}

/// Opens a crash image with the lvol library (tasting in a fresh registry).
fn reopen(img: Vec<u8>) -> Result<Reopened, String> {
    futures::executor::block_on(async {
        let reg = Registry::new();
        let m = lvol::LvolModule::new(reg.clone());
        let dev = CachedBdev::from_image("cache0", img, BL, None).unwrap();
        reg.register(dev).await.unwrap();
        reg.wait_for_examine().await;
        let stores = m.lvstores();
        let [s] = stores.as_slice() else {
            return Err(format!("{} lvol stores loaded, want 1", stores.len()));
        };
        let mut lvols = BTreeMap::new();
        let mut data = BTreeMap::new();
        for l in s.lvols() {
            let uuid = l.uuid().to_string();
            lvols.insert(
                uuid.clone(),
                json!({"name": l.name(), "snapshot": l.is_snapshot(), "clone": l.is_clone(),
                       "thin": l.is_thin(), "size": l.size_bytes()}),
            );
            let d = reg.open(l.unique_id(), false).map_err(|e| e.to_string())?;
            let len = (d.num_blocks() * u64::from(d.block_len())) as usize;
            let r = d
                .read(0, IoBuf::new(len, 1))
                .await
                .map_err(|e| format!("read {}: {e}", l.name()))?;
            data.insert(uuid, r.to_vec());
        }
        Ok(Reopened {
            lvs: s.name(),
            lvols,
            data,
        })
    })
}

/// One step: a name, the device events when it returned, and the state then.
struct Step {
    name: String,
    events: usize,
    lvs: String,
    lvols: BTreeMap<String, Value>,
}

/// Bytes a client wrote and flushed: (lvol uuid, offset, length, pattern byte), required from
/// event `since` on and until event `until` (when a later write over them starts).
struct Flushed {
    uuid: String,
    off: usize,
    len: usize,
    byte: u8,
    since: usize,
    until: usize,
}

fn judge(
    got: Result<Reopened, String>,
    prev: Option<&Step>,
    cur: &Step,
    done: bool,
    cut: usize,
    flushed: &[Flushed],
) -> Result<(), String> {
    let got = match got {
        Ok(g) => g,
        Err(_) if prev.is_none() && !done => return Ok(()),
        Err(e) => return Err(format!("store does not load: {e}")),
    };
    let states: Vec<&Step> = if done {
        vec![cur]
    } else {
        prev.into_iter().chain([cur]).collect()
    };
    if !states.iter().any(|s| s.lvs == got.lvs) {
        return Err(format!("store name {}", got.lvs));
    }
    for (u, v) in &got.lvols {
        if !states.iter().any(|s| s.lvols.get(u) == Some(v)) {
            return Err(format!(
                "lvol {u} is {v}, not as before or after {}",
                cur.name
            ));
        }
    }
    for (u, v) in &cur.lvols {
        let required = done || prev.is_some_and(|p| p.lvols.contains_key(u));
        if required && !got.lvols.contains_key(u) {
            return Err(format!("lvol {} ({u}) is gone", v["name"]));
        }
    }
    for f in flushed.iter().filter(|f| cut >= f.since && cut <= f.until) {
        if let Some(d) = got.data.get(&f.uuid) {
            if d.len() < f.off + f.len || d[f.off..f.off + f.len].iter().any(|&b| b != f.byte) {
                return Err(format!(
                    "flushed bytes {:#x} at {} (+{}) of {} lost",
                    f.byte, f.off, f.len, f.uuid
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn spdk_rpc_operations_and_qemu_io_data_survive_power_cuts() {
    let tools = tools();
    let dir = tempfile::tempdir().unwrap();
    let dev = CachedBdev::create("cache0", DEV_BYTES / u64::from(BL), BL, None).unwrap();
    let t = InProc::start(dir.path(), "a", dev.clone(), &tools);
    let mut steps: Vec<Step> = Vec::new();
    let mut flushed: Vec<Flushed> = Vec::new();
    let record = |t: &InProc, name: &str, steps: &mut Vec<Step>| {
        let (lvs, lvols) = t.lvols(&tools);
        steps.push(Step {
            name: name.to_string(),
            events: dev.events(),
            lvs,
            lvols,
        });
    };
    let cs = CLUSTER.to_string();
    t.ok(
        &tools,
        &["bdev_lvol_create_lvstore", "-c", &cs, "cache0", "lvs"],
    );
    record(&t, "lvstore create", &mut steps);
    let v = t.ok(&tools, &["bdev_lvol_create", "-l", "lvs", "-t", "v", "2"]);
    let v = v.as_str().unwrap().to_string();
    record(&t, "lvol create thin", &mut steps);
    t.ok(&tools, &["bdev_lvol_create", "-l", "lvs", "k", "1"]);
    record(&t, "lvol create thick", &mut steps);
    // Client data, flushed by qemu-io (NBD_CMD_FLUSH, passed to the lvol and the device).
    let flushes = dev.flushes();
    t.qemu_io(
        &tools,
        "lvs/v",
        &["write -P 0x5a 0 64k", "write -P 0x6b 1M 4k", "flush"],
    );
    assert!(
        dev.flushes() > flushes,
        "qemu-io's flush never reached the device"
    );
    record(&t, "qemu-io write + flush", &mut steps);
    let since = dev.events();
    // 4k..8k is overwritten by the copy-on-write step below (its `until` is set there).
    for (off, len, byte) in [
        (0, 4096, 0x5a),
        (4096, 4096, 0x5a),
        (8192, 65536 - 8192, 0x5a),
        (1 << 20, 4096, 0x6b),
    ] {
        flushed.push(Flushed {
            uuid: v.clone(),
            off,
            len,
            byte,
            since,
            until: usize::MAX,
        });
    }
    let ops: [(&str, &[&str]); 9] = [
        ("snapshot", &["bdev_lvol_snapshot", "lvs/v", "s"]),
        ("clone", &["bdev_lvol_clone", "lvs/s", "c"]),
        ("resize", &["bdev_lvol_resize", "lvs/v", "3"]),
        ("rename", &["bdev_lvol_rename", "lvs/c", "c2"]),
        ("inflate", &["bdev_lvol_inflate", "lvs/c2"]),
        ("set read-only", &["bdev_lvol_set_read_only", "lvs/k"]),
        ("delete", &["bdev_lvol_delete", "lvs/c2"]),
        (
            "lvstore rename",
            &["bdev_lvol_rename_lvstore", "lvs", "lvs2"],
        ),
        (
            "create after rename",
            &["bdev_lvol_create", "-l", "lvs2", "-t", "w", "1"],
        ),
    ];
    for (name, args) in ops {
        t.ok(&tools, args);
        record(&t, name, &mut steps);
    }
    // Copy-on-write data into the clone of the snapshot, flushed.
    flushed[1].until = dev.events();
    t.qemu_io(&tools, "lvs2/v", &["write -P 0x7c 4k 4k", "flush"]);
    record(&t, "qemu-io copy-on-write + flush", &mut steps);
    flushed.push(Flushed {
        uuid: v.clone(),
        off: 4096,
        len: 4096,
        byte: 0x7c,
        since: dev.events(),
        until: usize::MAX,
    });
    // The live target itself reads what was written.
    t.qemu_io(
        &tools,
        "lvs2/v",
        &[
            "read -P 0x5a 0 4k",
            "read -P 0x7c 4k 4k",
            "read -P 0x6b 1M 4k",
        ],
    );

    // Every cut point of the log, several crash states each.
    let mut images = 0;
    let mut failures: Vec<String> = Vec::new();
    let mut step = 0;
    let total = dev.events();
    // Cuts visited: where each step returned, and up to `MID_CUTS` evenly spaced cuts while it
    // ran.
    let mut visit = std::collections::BTreeSet::new();
    let mut start = 0;
    for st in &steps {
        visit.insert(st.events);
        let span = st.events - start;
        for i in 0..MID_CUTS.min(span) {
            visit.insert(start + i * span / MID_CUTS.min(span));
        }
        start = st.events;
    }
    dev.for_each_cut(|cut, disk| {
        if !visit.contains(&cut) {
            return true;
        }
        while step < steps.len() && steps[step].events < cut {
            step += 1;
        }
        if step == steps.len() {
            return false;
        }
        let cur = &steps[step];
        let prev = step.checked_sub(1).map(|i| &steps[i]);
        let done = cur.events == cut;
        let mut plans = vec![CrashPlan::KeepAll, CrashPlan::LoseAll];
        let seeds = if done { SEEDS } else { 1 };
        plans.extend((0..seeds).map(|s| CrashPlan::Random(cut as u64 * 100 + s + 1)));
        for plan in plans {
            images += 1;
            if let Err(e) = judge(
                reopen(disk.crash_image(plan)),
                prev,
                cur,
                done,
                cut,
                &flushed,
            ) {
                failures.push(format!("{}: cut {cut}/{total} {plan:?}: {e}", cur.name));
            }
        }
        true
    });
    println!("{images} crash images over {total} device events");
    let mut per_step: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &failures {
        let step = f.split(':').next().unwrap();
        let n = per_step.entry(step).or_default();
        if *n == 0 {
            println!("first failure: {f}");
        }
        *n += 1;
    }

    // The image a power cut would leave now, losing every unflushed write, opened by a second
    // target: spdk-rpc lists the lvols, qemu-io reads the flushed bytes.
    let img = dev.crash_image(CrashPlan::LoseAll);
    drop(t);
    let dev2 = CachedBdev::from_image("cache0", img, BL, None).unwrap();
    let t2 = InProc::start(dir.path(), "b", dev2, &tools);
    let (lvs, lvols) = t2.lvols(&tools);
    let last = steps.last().unwrap();
    let second = if (lvs.as_str(), &lvols) == (last.lvs.as_str(), &last.lvols) {
        let (ok, text) = {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                t2.qemu_io(
                    &tools,
                    &format!("{lvs}/v"),
                    &[
                        "read -P 0x5a 0 4k",
                        "read -P 0x7c 4k 4k",
                        "read -P 0x6b 1M 4k",
                    ],
                )
            }));
            match r {
                Ok(t) => (true, t),
                Err(_) => (
                    false,
                    "qemu-io read of the flushed bytes failed".to_string(),
                ),
            }
        };
        if ok {
            None
        } else {
            Some(text)
        }
    } else {
        Some(format!(
            "second target sees store {lvs:?} with {lvols:?}, want {:?} with {:?}",
            last.lvs, last.lvols
        ))
    };
    for f in failures.iter().filter(|f| f.contains("KeepAll")) {
        println!("in-order crash state fails: {f}");
    }
    let by = |p: &str| failures.iter().filter(|f| f.contains(p)).count();
    assert!(
        failures.is_empty() && second.is_none(),
        "{} of {images} crash images fail (LoseAll {}, KeepAll {}, Random {}); per step: \
         {per_step:?}; first: {:?}; second target: {second:?}",
        failures.len(),
        by("LoseAll"),
        by("KeepAll"),
        by("Random"),
        failures.first()
    );
}
