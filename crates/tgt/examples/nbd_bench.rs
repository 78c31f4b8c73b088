//! NBD benchmark: 4 KiB requests at queue depth 32 with `qemu-img bench` as the client,
//! against (a) `tgt` serving an esnap clone of a raw base file and (b) `qemu-nbd` serving a
//! qcow2 clone of the same base with the same cluster size (1 MiB). Prints one JSON object
//! with both figures and their ratio.
//!
//!     cargo build --release -p tgt --examples
//!     target/release/examples/nbd_bench [--size-mib 1024] [--count 100000] [--dir DIR]
//!
//! Needs qemu-img and qemu-nbd on PATH; uses the `tgt` binary next to this example's
//! directory (target/<profile>/tgt).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const ESNAP_UUID: &str = "7e5a0000-e5a0-4e5a-8e5a-0000000000b0";
const CLUSTER: u64 = 1 << 20;

type Res<T> = Result<T, String>;

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn wait_socket(p: &Path) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if UnixStream::connect(p).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("{} never accepted connections", p.display()))
}

/// One JSON-RPC call over the target's socket.
fn rpc(sock: &Path, method: &str, params: Value) -> Res<Value> {
    let mut s = UnixStream::connect(sock).map_err(|e| e.to_string())?;
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    s.write_all(req.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
    match v.get("error") {
        Some(e) => Err(format!("{method}: {e}")),
        None => Ok(v["result"].clone()),
    }
}

/// Runs `qemu-img bench` and returns IOPS.
fn bench(uri: &str, count: u64, write: bool) -> Res<f64> {
    let mut c = Command::new("qemu-img");
    c.args(["bench", "-f", "raw", "-d", "32", "-s", "4096", "-S", "4096"])
        .args(["-c", &count.to_string()]);
    if write {
        c.arg("-w");
    }
    let out = c.arg(uri).output().map_err(|e| format!("qemu-img: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let secs: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            format!(
                "qemu-img bench failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok(count as f64 / secs)
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("nbd_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let size = arg(&args, "--size-mib", 1024) << 20;
    let count = arg(&args, "--count", 100_000);
    let tmp;
    let dir: PathBuf = match args.iter().position(|a| a == "--dir") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--dir needs a value")?),
        None => {
            tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
            tmp.path().to_path_buf()
        }
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let tgt = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("tgt"))
        .filter(|p| p.is_file())
        .ok_or("tgt binary not found next to the examples directory (cargo build -p tgt)")?;

    // The base: every byte non-zero, so reads through the clone are real reads.
    let base = dir.join("base.raw");
    {
        let mut f = std::fs::File::create(&base).map_err(|e| e.to_string())?;
        let chunk: Vec<u8> = (0..CLUSTER).map(|i| (i % 251) as u8 + 1).collect();
        for _ in 0..size / CLUSTER {
            f.write_all(&chunk).map_err(|e| e.to_string())?;
        }
    }
    let store = dir.join("store.img");
    std::fs::File::create(&store)
        .and_then(|f| f.set_len(size * 2 + (64 << 20)))
        .map_err(|e| e.to_string())?;

    // (a) ours.
    let sock = dir.join("rpc.sock");
    let nbd = dir.join("nbd.sock");
    let child = Command::new(&tgt)
        .arg("-r")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", tgt.display()))?;
    let _tgt = Kill(child);
    wait_socket(&sock)?;
    rpc(
        &sock,
        "bdev_aio_create",
        json!({"name": "base", "filename": base, "block_size": 4096,
        "readonly": true, "uuid": ESNAP_UUID}),
    )?;
    rpc(
        &sock,
        "bdev_aio_create",
        json!({"name": "store", "filename": store, "block_size": 4096}),
    )?;
    rpc(
        &sock,
        "bdev_lvol_create_lvstore",
        json!({"bdev_name": "store", "lvs_name": "lvs",
        "cluster_sz": CLUSTER}),
    )?;
    rpc(
        &sock,
        "bdev_lvol_clone_bdev",
        json!({"bdev": ESNAP_UUID, "lvs_name": "lvs",
        "clone_name": "ec"}),
    )?;
    rpc(
        &sock,
        "nbd_server_start",
        json!({"listen": format!("unix:{}", nbd.display())}),
    )?;
    rpc(
        &sock,
        "nbd_export_add",
        json!({"bdev_name": "lvs/ec", "name": "ec"}),
    )?;
    let uri = format!("nbd+unix:///ec?socket={}", nbd.display());
    let ours_read = bench(&uri, count, false)?;
    let ours_write = bench(&uri, count, true)?;
    let _ = rpc(&sock, "spdk_kill_instance", json!({"sig_name": "SIGTERM"}));
    drop(_tgt);

    // (b) qemu-nbd over a qcow2 clone of the same base, same cluster size.
    let qcow = dir.join("clone.qcow2");
    let st = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-o",
            "cluster_size=1M",
            "-b",
        ])
        .arg(&base)
        .arg(&qcow)
        .status()
        .map_err(|e| format!("qemu-img create: {e}"))?;
    if !st.success() {
        return Err("qemu-img create failed".into());
    }
    let qsock = dir.join("q.sock");
    let child = Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-x", "q", "-t", "-k"])
        .arg(&qsock)
        .arg(&qcow)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("qemu-nbd: {e}"))?;
    let _q = Kill(child);
    wait_socket(&qsock)?;
    let quri = format!("nbd+unix:///q?socket={}", qsock.display());
    let q_read = bench(&quri, count, false)?;
    let q_write = bench(&quri, count, true)?;

    let out = json!({
        "workload": format!("qemu-img bench, 4 KiB, queue depth 32, {count} requests, sequential, {} MiB base, 1 MiB clusters", size >> 20),
        "ours_esnap_clone_nbd": {"read_iops": ours_read.round(), "write_iops": ours_write.round()},
        "qemu_nbd_qcow2_clone": {"read_iops": q_read.round(), "write_iops": q_write.round()},
        "ratio_ours_over_qemu": {
            "read": (ours_read / q_read * 100.0).round() / 100.0,
            "write": (ours_write / q_write * 100.0).round() / 100.0,
        },
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(())
}
