//! `cargo xtask bench`: our figures next to a peer's on the same file, same pattern, same
//! queue depth, one JSON file per benchmark under `target/bench/`.
//!
//! A benchmark is one [`Bench`] entry: what we run (an [`Ours`] setup driven by the `bench`
//! package's workload generator, or for NBD our `tgt` process) and which [`Peer`] measures
//! the same thing: fio, `qemu-img bench` (raw, or `-w` on a qcow2 clone with a raw backing
//! file), `qemu-nbd` with `qemu-img bench` as the client, or `Peer::Ours`, one of our own
//! setups (as `lvol_randread_4k_qd32` compares a thick lvol with the raw aio bdev under it).
//! Load and creation benchmarks report `ms` or `ops/s` instead of IOPS. docs/benchmarks.md
//! lists every entry and the figures measured.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::util;

/// Size of the data file every benchmark runs on.
const FILE_SIZE: u64 = 1 << 30;

/// What we measure.
#[derive(Clone, Copy, Debug)]
enum Ours {
    /// Our aio bdev over the data file.
    AioFile {
        /// `uring`, `threadpool` or `auto`.
        engine: &'static str,
        /// O_DIRECT.
        direct: bool,
    },
    /// A thick lvol filling an lvol store on our aio bdev over the data file.
    Lvol {
        /// `uring`, `threadpool` or `auto`.
        engine: &'static str,
        /// O_DIRECT.
        direct: bool,
    },
    /// A fresh esnap clone (nothing allocated) of our aio bdev over the data file, its lvol
    /// store on a new sparse file next to it; 4 KiB blocks.
    Esnap {
        /// `uring`, `threadpool` or `auto`.
        engine: &'static str,
        /// O_DIRECT.
        direct: bool,
        /// Cluster size of the clone's store (None: 4 MiB).
        cluster: Option<u32>,
    },
    /// A thick blob filling a blobstore (1 MiB clusters) initialised on our aio bdev over the
    /// data file at every run, driven through the blob API.
    Blob {
        /// `uring`, `threadpool` or `auto`.
        engine: &'static str,
        /// O_DIRECT.
        direct: bool,
    },
    /// Load time (ms) of a blobstore with `blobs` blobs on a sparse file next to the data file
    /// (O_DIRECT, io_uring); `recover` loads it the way a dirty store is loaded.
    BsLoad {
        /// Blobs in the store.
        blobs: u64,
        /// Force recovery (the dirty-store path).
        recover: bool,
    },
    /// Snapshot + clone creations per second on an lvol store holding `lvols` thin lvols.
    SnapClone {
        /// Thin lvols in the store.
        lvols: u64,
    },
    /// Our `tgt` process serving a fresh esnap clone (1 MiB clusters) of the data file over
    /// its NBD export on a Unix socket; `qemu-img bench` is the client.
    NbdTgtEsnap,
    /// A fresh esnap clone (store in memory, 1 MiB clusters) whose base is our NBD client
    /// bdev connected to `qemu-nbd` serving the data file (raw, read-only) on a Unix socket.
    NbdClientEsnap,
}

impl Ours {
    fn direct(self) -> bool {
        match self {
            Ours::AioFile { direct, .. }
            | Ours::Lvol { direct, .. }
            | Ours::Esnap { direct, .. }
            | Ours::Blob { direct, .. } => direct,
            Ours::BsLoad { .. }
            | Ours::SnapClone { .. }
            | Ours::NbdTgtEsnap
            | Ours::NbdClientEsnap => true,
        }
    }

    /// The unit of the figure the setup reports.
    fn unit(self) -> &'static str {
        match self {
            Ours::BsLoad { .. } => "ms",
            Ours::SnapClone { .. } => "ops/s",
            Ours::AioFile { .. }
            | Ours::Lvol { .. }
            | Ours::Esnap { .. }
            | Ours::Blob { .. }
            | Ours::NbdTgtEsnap
            | Ours::NbdClientEsnap => "IOPS",
        }
    }
}

/// Who we compare with.
#[derive(Clone, Copy, Debug)]
enum Peer {
    /// fio, io_uring engine, same direct flag, time based.
    Fio,
    /// `qemu-img bench` on the raw file with `-t none` (O_DIRECT), same count as our run.
    QemuImgBench,
    /// One of our own setups on the same file (e.g. the raw base under an lvol).
    Ours(Ours),
    /// `qemu-img bench -w` on a fresh qcow2 image whose backing file is the raw data file
    /// (`-o cluster_size=N`), `-t none`, the same count, depth, size and step as ours.
    QemuQcow2Cow {
        /// qcow2 cluster size in bytes.
        cluster: u32,
    },
    /// No peer measures the same thing.
    None,
    /// `qemu-nbd` serving a fresh qcow2 clone (raw backing = the data file, 1 MiB clusters)
    /// on a Unix socket; `qemu-img bench` is the client.
    QemuNbdQcow2,
    /// `qemu-img bench` straight from `qemu-nbd` serving the data file (raw, read-only) on a
    /// Unix socket.
    QemuImgNbdRaw,
}

/// One benchmark.
#[derive(Clone, Debug)]
struct Bench {
    name: &'static str,
    /// fio's pattern name: `read`, `write`, `randread`, `randwrite`, `randrw`.
    workload: &'static str,
    bs: u64,
    qd: u32,
    /// Sequential patterns: bytes from one request's start to the next's.
    step: Option<u64>,
    /// A fixed request count instead of a time (e.g. one write per cluster).
    count: Option<u64>,
    /// The data file (under target/bench-data/).
    file: &'static str,
    ours: Ours,
    peer: Peer,
}

const RAW_FILE: &str = "disk-1g.raw";
/// Requests per NBD run (sequential 4 KiB, so 50,000 cover about 195 MiB).
const NBD_COUNT: u64 = 50_000;
/// The uuid our tgt gives the base bdev of the NBD esnap clone.
const NBD_BASE_UUID: &str = "7e5a0000-e5a0-4e5a-8e5a-0000000000b0";
/// The lvol benchmarks get their own file: the store's metadata lives at its start.
const LVS_FILE: &str = "disk-1g-lvs.raw";

fn benches() -> Vec<Bench> {
    let aio = Ours::AioFile {
        engine: "uring",
        direct: true,
    };
    let lvol = Ours::Lvol {
        engine: "uring",
        direct: true,
    };
    let blob = Ours::Blob {
        engine: "uring",
        direct: true,
    };
    vec![
        Bench {
            name: "aio_randread_4k_qd32",
            workload: "randread",
            bs: 4096,
            qd: 32,
            step: None,
            count: None,
            file: RAW_FILE,
            ours: aio,
            peer: Peer::Fio,
        },
        Bench {
            name: "aio_randwrite_4k_qd32",
            workload: "randwrite",
            bs: 4096,
            qd: 32,
            step: None,
            count: None,
            file: RAW_FILE,
            ours: aio,
            peer: Peer::Fio,
        },
        Bench {
            name: "aio_stride_read_4k_step64k_qd32",
            workload: "read",
            bs: 4096,
            qd: 32,
            step: Some(64 << 10),
            count: None,
            file: RAW_FILE,
            ours: aio,
            peer: Peer::QemuImgBench,
        },
        Bench {
            name: "lvol_randread_4k_qd32",
            workload: "randread",
            bs: 4096,
            qd: 32,
            step: None,
            count: None,
            file: LVS_FILE,
            ours: lvol,
            peer: Peer::Ours(aio),
        },
        Bench {
            name: "lvol_randwrite_4k_qd32",
            workload: "randwrite",
            bs: 4096,
            qd: 32,
            step: None,
            count: None,
            file: LVS_FILE,
            ours: lvol,
            peer: Peer::Ours(aio),
        },
        Bench {
            name: "esnap_randread_4k_qd32",
            workload: "randread",
            bs: 4096,
            qd: 32,
            step: None,
            count: None,
            file: RAW_FILE,
            ours: Ours::Esnap {
                engine: "uring",
                direct: true,
                cluster: None,
            },
            peer: Peer::Ours(aio),
        },
        Bench {
            name: "esnap_cow_first_write_4k_1m_clusters_qd32",
            workload: "write",
            bs: 4096,
            qd: 32,
            step: Some(1 << 20),
            count: Some(FILE_SIZE >> 20),
            file: RAW_FILE,
            ours: Ours::Esnap {
                engine: "uring",
                direct: true,
                cluster: Some(1 << 20),
            },
            peer: Peer::QemuQcow2Cow { cluster: 1 << 20 },
        },
        Bench {
            name: "blob_randread_4k_qd32",
            workload: "randread",
            bs: 4096,
            qd: 32,
            step: None,
            count: None,
            file: RAW_FILE,
            ours: blob,
            peer: Peer::Ours(aio),
        },
        Bench {
            name: "blob_randwrite_4k_qd32",
            workload: "randwrite",
            bs: 4096,
            qd: 32,
            step: None,
            count: None,
            file: RAW_FILE,
            ours: blob,
            peer: Peer::Ours(aio),
        },
        Bench {
            name: "blobstore_load_clean_10k_blobs",
            workload: "load",
            bs: 0,
            qd: 1,
            step: None,
            count: None,
            file: RAW_FILE,
            ours: Ours::BsLoad {
                blobs: 10_000,
                recover: false,
            },
            peer: Peer::None,
        },
        Bench {
            name: "blobstore_load_dirty_10k_blobs",
            workload: "load",
            bs: 0,
            qd: 1,
            step: None,
            count: None,
            file: RAW_FILE,
            ours: Ours::BsLoad {
                blobs: 10_000,
                recover: true,
            },
            peer: Peer::Ours(Ours::BsLoad {
                blobs: 10_000,
                recover: false,
            }),
        },
        Bench {
            name: "lvol_snapshot_clone_1k_lvols",
            workload: "create",
            bs: 0,
            qd: 1,
            step: None,
            count: Some(1000),
            file: RAW_FILE,
            ours: Ours::SnapClone { lvols: 1000 },
            peer: Peer::None,
        },
        Bench {
            name: "nbd_esnap_read_4k_qd32",
            workload: "read",
            bs: 4096,
            qd: 32,
            step: None,
            count: Some(NBD_COUNT),
            file: RAW_FILE,
            ours: Ours::NbdTgtEsnap,
            peer: Peer::QemuNbdQcow2,
        },
        Bench {
            name: "nbd_esnap_write_4k_qd32",
            workload: "write",
            bs: 4096,
            qd: 32,
            step: None,
            count: Some(NBD_COUNT),
            file: RAW_FILE,
            ours: Ours::NbdTgtEsnap,
            peer: Peer::QemuNbdQcow2,
        },
        Bench {
            name: "nbd_client_esnap_read_4k_qd32",
            workload: "read",
            bs: 4096,
            qd: 32,
            step: None,
            count: Some(NBD_COUNT),
            file: RAW_FILE,
            ours: Ours::NbdClientEsnap,
            peer: Peer::QemuImgNbdRaw,
        },
    ]
}

/// One measured figure.
struct Measured {
    iops: f64,
    /// Requests completed (used to size count-based peers).
    ios: u64,
    detail: Value,
}

struct Ctx {
    data_dir: PathBuf,
    bench_bin: PathBuf,
    seconds: u64,
    rounds: u32,
    out_dir: PathBuf,
}

/// Entry point: `bench [--quick] [--filter NAME] [--rounds N] [--list]`.
pub fn run(args: &[String]) -> Result<()> {
    crate::check_args(args, &["--quick", "--list"], &["--filter", "--rounds"])?;
    let rounds: u32 = crate::flag_value(args, "--rounds")?.unwrap_or(1).max(1);
    let quick = args.iter().any(|a| a == "--quick");
    let filter: Option<String> = crate::flag_value(args, "--filter")?;
    let all = benches();
    if args.iter().any(|a| a == "--list") {
        for b in &all {
            println!("{}", b.name);
        }
        return Ok(());
    }
    let selected: Vec<Bench> = all
        .into_iter()
        .filter(|b| filter.as_deref().is_none_or(|f| b.name.contains(f)))
        .collect();
    if selected.is_empty() {
        bail!("no benchmark matches {filter:?} (see `cargo xtask bench --list`)");
    }
    let target = util::target_dir();
    let ctx = Ctx {
        data_dir: target.join("bench-data"),
        bench_bin: target.join("release").join("bench"),
        seconds: if quick { 2 } else { 10 },
        rounds,
        out_dir: target.join("bench"),
    };
    std::fs::create_dir_all(&ctx.out_dir)?;
    let mut files: Vec<&str> = selected.iter().map(|b| b.file).collect();
    files.sort_unstable();
    files.dedup();
    for f in files {
        prepare_data_file(&ctx.data_dir.join(f), FILE_SIZE)?;
    }
    util::run(
        "build the bench binary",
        util::cargo().args(["build", "--release", "-p", "bench"]),
    )?;
    if selected.iter().any(|b| matches!(b.ours, Ours::NbdTgtEsnap)) {
        util::run(
            "build the tgt binary",
            util::cargo().args(["build", "--release", "-p", "tgt", "--bin", "tgt"]),
        )?;
    }

    let mut lines = Vec::new();
    let mut failures = Vec::new();
    for b in &selected {
        eprintln!("\n==> bench {} ({} s)", b.name, ctx.seconds);
        match run_one(&ctx, b) {
            Ok(line) => {
                println!("{line}");
                lines.push(line);
            }
            Err(e) => {
                eprintln!("bench {}: FAILED: {e:#}", b.name);
                failures.push(b.name);
            }
        }
    }
    println!("\nresults (JSON in {}):", ctx.out_dir.display());
    for l in &lines {
        println!("{l}");
    }
    if !failures.is_empty() {
        bail!("benchmarks failed: {}", failures.join(", "));
    }
    Ok(())
}

/// The median of some figures (the upper middle one for an even count).
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Runs ours and the peer alternately, `rounds` times each, so that a change in the machine's
/// load hits both sides; the figures are the medians.
fn run_one(ctx: &Ctx, b: &Bench) -> Result<String> {
    let mut ours_runs = Vec::new();
    let mut peer_runs = Vec::new();
    let mut peer_name = String::new();
    let mut peer_missing = false;
    for round in 0..ctx.rounds {
        if ctx.rounds > 1 {
            eprintln!("--- round {}/{}", round + 1, ctx.rounds);
        }
        let ours = run_ours(ctx, b, b.ours)?;
        if !peer_missing {
            let (name, peer) = match b.peer {
                Peer::Fio => run_fio(ctx, b),
                Peer::QemuImgBench => run_qemu_img_bench(ctx, b, ours.ios),
                Peer::QemuQcow2Cow { cluster } => run_qemu_qcow2_cow(ctx, b, cluster),
                Peer::None => (
                    "none".to_string(),
                    Err(anyhow!("no peer for this benchmark")),
                ),
                Peer::QemuNbdQcow2 => run_qemu_nbd_qcow2(ctx, b),
                Peer::QemuImgNbdRaw => run_qemu_img_nbd_raw(ctx, b),
                Peer::Ours(setup) => (
                    format!("ours: {}", setup_label(setup)),
                    run_ours(ctx, b, setup),
                ),
            };
            peer_name = name;
            match peer {
                Ok(p) => peer_runs.push(p.iops),
                Err(e) => {
                    if !matches!(b.peer, Peer::None) {
                        eprintln!("note: peer {peer_name} not measured: {e:#}");
                    }
                    peer_missing = true;
                }
            }
        }
        ours_runs.push(ours);
    }
    let ours_iops: Vec<f64> = ours_runs.iter().map(|m| m.iops).collect();
    let ours = Measured {
        iops: median(ours_iops.clone()).unwrap_or(0.0),
        ios: ours_runs.iter().map(|m| m.ios).max().unwrap_or(0),
        detail: ours_runs
            .first()
            .map(|m| m.detail.clone())
            .unwrap_or(Value::Null),
    };
    let peer_value = if peer_missing {
        None
    } else {
        median(peer_runs.clone()).map(|iops| Measured {
            iops,
            ios: 0,
            detail: Value::Null,
        })
    };
    let ratio = peer_value.as_ref().map(|p| ours.iops / p.iops);
    let mut params = json!({
        "bs": b.bs,
        "qd": b.qd,
        "file_size": FILE_SIZE,
        "file": ctx.data_dir.join(b.file).display().to_string(),
        "rounds": ctx.rounds,
        "ours_runs": ours_iops.iter().map(|x| round1(*x)).collect::<Vec<_>>(),
        "peer_runs": peer_runs.iter().map(|x| round1(*x)).collect::<Vec<_>>(),
    });
    if let Some(s) = b.step {
        params["step"] = json!(s);
    }
    if let Some(n) = b.count {
        params["count"] = json!(n);
    }
    params["direct"] = json!(b.ours.direct());
    params["ours_setup"] = json!(setup_label(b.ours));
    params["ours_engine"] = ours.detail["engine"].clone();
    params["seconds"] = json!(ctx.seconds);
    match (b.ours, b.peer) {
        (Ours::BsLoad { recover: true, .. }, _) => {
            params["dirty"] = json!(
                "the store is loaded with forced recovery (blobcli -R), the path a store not \
                 marked clean takes; peer: the clean load of the same store; ratio = dirty ms / clean ms"
            );
        }
        (_, Peer::None) => {
            params["peer_note"] = json!("no peer measures the same thing");
        }
        _ => {}
    }
    if let Ours::SnapClone { .. } = b.ours {
        params["op"] = json!("one snapshot or one clone creation (count = snapshot+clone pairs)");
    }
    if let Peer::QemuImgBench = b.peer {
        params["peer_count"] = json!("our request count of the same round (at least 1000)");
    }
    let record = json!({
        "name": b.name,
        "workload": b.workload,
        "params": params,
        "unit": b.ours.unit(),
        "ours": round1(ours.iops),
        "peer": peer_name,
        "peer_value": peer_value.as_ref().map(|p| round1(p.iops)),
        "ratio": ratio.map(|r| (r * 1000.0).round() / 1000.0),
    });
    let unit = b.ours.unit();
    let path = ctx.out_dir.join(format!("{}.json", b.name));
    std::fs::write(&path, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("write {}", path.display()))?;
    Ok(format!(
        "{:<34} ours {:>8.1} {unit}   {:<46} {:>13}   ratio {}",
        b.name,
        ours.iops,
        peer_name,
        peer_value
            .as_ref()
            .map(|p| format!("{:.1} {unit}", p.iops))
            .unwrap_or_else(|| "n/a".into()),
        ratio
            .map(|r| format!("{r:.3}"))
            .unwrap_or_else(|| "n/a".into()),
    ))
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Creates the data file (fully written, so reads hit real blocks rather than holes) unless a
/// fully allocated file of the right size is already there.
fn prepare_data_file(path: &Path, size: u64) -> Result<()> {
    if let Ok(m) = std::fs::metadata(path) {
        if m.len() == size && m.blocks() * 512 >= size {
            return Ok(());
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    eprintln!(
        "==> writing the {} MiB data file {}",
        size >> 20,
        path.display()
    );
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        // Distinct, never-zero content per MiB.
        let tag = (off >> 20) as u32;
        for (i, x) in chunk.iter_mut().enumerate() {
            *x = ((i as u32).wrapping_mul(2_654_435_761) ^ tag.wrapping_mul(40_503)) as u8 | 1;
        }
        let n = chunk.len().min((size - off) as usize);
        f.write_all(&chunk[..n])?;
        off += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// How a setup is described in results.
fn setup_label(o: Ours) -> String {
    let (what, engine, direct) = match o {
        Ours::AioFile { engine, direct } => ("aio bdev", engine, direct),
        Ours::Lvol { engine, direct } => ("thick lvol on aio bdev", engine, direct),
        Ours::Esnap { engine, direct, .. } => (
            "fresh esnap clone of aio bdev (4 KiB blocks)",
            engine,
            direct,
        ),
        Ours::Blob { engine, direct } => ("thick blob on aio bdev", engine, direct),
        Ours::BsLoad { blobs, recover } => {
            return format!(
                "blobstore load, {blobs} blobs, {} (aio uring, O_DIRECT)",
                if recover {
                    "recovery path of a dirty store"
                } else {
                    "clean"
                }
            )
        }
        Ours::SnapClone { lvols } => {
            return format!("snapshot + clone creation, {lvols} thin lvols (aio uring, O_DIRECT)")
        }
        Ours::NbdTgtEsnap => {
            return "tgt NBD export (unix socket) of an esnap clone, 1 MiB clusters; client qemu-img bench".into()
        }
        Ours::NbdClientEsnap => {
            return "esnap clone (1 MiB clusters) over our NBD client bdev, qemu-nbd raw export on a unix socket".into()
        }
    };
    format!(
        "{what} ({engine}{})",
        if direct { ", O_DIRECT" } else { "" }
    )
}

fn run_ours(ctx: &Ctx, b: &Bench, setup: Ours) -> Result<Measured> {
    if let Ours::NbdTgtEsnap = setup {
        return run_tgt_nbd_esnap(ctx, b);
    }
    let mut cmd = Command::new(&ctx.bench_bin);
    let mut file = ctx.data_dir.join(b.file);
    let mut server = None;
    let qdir = ctx.data_dir.join(format!("{}.ours-tmp", b.name));
    if let Ours::NbdClientEsnap = setup {
        let (srv, sock) = start_qemu_nbd_raw(ctx, b, &qdir)?;
        server = Some(srv);
        file = sock;
    }
    let (kind, engine, direct) = match setup {
        Ours::AioFile { engine, direct } => ("aio", engine, direct),
        Ours::Lvol { engine, direct } => ("lvol", engine, direct),
        Ours::Esnap {
            engine,
            direct,
            cluster,
        } => {
            // 512-byte blocks under an esnap clone fail reads with EIO (lvol issue).
            cmd.args(["--block-len", "4096"]);
            if let Some(c) = cluster {
                cmd.args(["--cluster-size", &c.to_string()]);
            }
            ("esnap", engine, direct)
        }
        Ours::Blob { engine, direct } => ("blob", engine, direct),
        Ours::BsLoad { blobs, recover } => {
            cmd.args(["--blobs", &blobs.to_string()]);
            if recover {
                cmd.arg("--recover");
            }
            ("bsload", "uring", true)
        }
        Ours::SnapClone { lvols } => {
            cmd.args(["--lvols", &lvols.to_string()]);
            ("snapclone", "uring", true)
        }
        Ours::NbdClientEsnap => ("nbdesnap", "auto", false),
        Ours::NbdTgtEsnap => unreachable!("handled above"),
    };
    cmd.arg("--target")
        .arg(format!("{kind}:{}", file.display()))
        .args(["--engine", engine]);
    if direct {
        cmd.arg("--direct");
    }
    // Load and creation benchmarks do no I/O pattern of their own.
    let rw = match b.workload {
        "load" | "create" => "read",
        w => w,
    };
    cmd.args(["--rw", rw])
        .args(["--bs", &b.bs.to_string()])
        .args(["--qd", &b.qd.to_string()]);
    match b.count {
        Some(n) => cmd.args(["--count", &n.to_string()]),
        None => cmd.args(["--time", &ctx.seconds.to_string()]),
    };
    if let Some(s) = b.step {
        cmd.args(["--step", &s.to_string()]);
    }
    let out = util::output("our benchmark", &mut cmd);
    if server.take().is_some() {
        let _ = std::fs::remove_dir_all(&qdir);
    }
    let out = out?;
    let v: Value = serde_json::from_str(out.trim())
        .with_context(|| format!("bench printed no JSON: {out:?}"))?;
    let iops = v["iops"]
        .as_f64()
        .ok_or_else(|| anyhow!("no iops in {v}"))?;
    Ok(Measured {
        iops,
        ios: v["ios"].as_u64().unwrap_or(0),
        detail: v,
    })
}

/// Runs fio with the same pattern; returns the peer's label and its figure.
fn run_fio(ctx: &Ctx, b: &Bench) -> (String, Result<Measured>) {
    let Some(fio) = util::find_or_install("fio", "fio") else {
        return ("fio (not installed)".into(), Err(anyhow!("fio missing")));
    };
    let version = util::version_of(&fio).unwrap_or_else(|| "fio".into());
    let direct = b.ours.direct();
    let label = format!("{version} io_uring direct={}", u8::from(direct));
    // fio's rw=read:<skip> skips `skip` bytes after each request.
    let rw = match b.step {
        Some(s) if s > b.bs => format!("{}:{}", b.workload, s - b.bs),
        _ => b.workload.to_string(),
    };
    let mut cmd = Command::new(&fio);
    cmd.arg(format!("--name={}", b.name))
        .arg(format!(
            "--filename={}",
            ctx.data_dir.join(b.file).display()
        ))
        .arg(format!("--size={FILE_SIZE}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", b.bs))
        .arg(format!("--iodepth={}", b.qd))
        .arg("--ioengine=io_uring")
        .arg(format!("--direct={}", u8::from(direct)))
        .arg("--time_based=1")
        .arg(format!("--runtime={}", ctx.seconds))
        .arg("--norandommap=1")
        .arg("--randrepeat=0")
        .arg("--numjobs=1")
        .arg("--output-format=json");
    let r = util::output("fio", &mut cmd).and_then(|out| parse_fio(&out));
    (label, r)
}

/// Extracts the IOPS (read + write) of the first job from fio's JSON output.
fn parse_fio(out: &str) -> Result<Measured> {
    let start = out
        .find('{')
        .ok_or_else(|| anyhow!("no JSON in fio output"))?;
    let v: Value = serde_json::from_str(&out[start..]).context("parse fio JSON")?;
    let job = &v["jobs"][0];
    if job.is_null() {
        bail!("fio reported no job");
    }
    if job["error"].as_i64().unwrap_or(0) != 0 {
        bail!("fio job error {}", job["error"]);
    }
    let iops =
        job["read"]["iops"].as_f64().unwrap_or(0.0) + job["write"]["iops"].as_f64().unwrap_or(0.0);
    let ios = job["read"]["total_ios"].as_u64().unwrap_or(0)
        + job["write"]["total_ios"].as_u64().unwrap_or(0);
    Ok(Measured {
        iops,
        ios,
        detail: Value::Null,
    })
}

/// Runs `qemu-img bench` with the same request size, step and depth for `count` requests.
fn run_qemu_img_bench(ctx: &Ctx, b: &Bench, count: u64) -> (String, Result<Measured>) {
    let Some(qemu) = util::find_or_install("qemu-img", "qemu-utils") else {
        return (
            "qemu-img bench (not installed)".into(),
            Err(anyhow!("qemu-img missing")),
        );
    };
    let version = util::version_of(&qemu)
        .and_then(|v| v.split_whitespace().nth(2).map(str::to_string))
        .unwrap_or_default();
    let count = count.max(1000);
    let mut last_err = anyhow!("not run");
    // io_uring like ours when qemu was built with it, else Linux native AIO.
    for aio in ["io_uring", "native"] {
        let mut cmd = Command::new(&qemu);
        cmd.args(["bench", "-f", "raw", "-t", "none", "-i", aio])
            .args(["-c", &count.to_string()])
            .args(["-d", &b.qd.to_string()])
            .args(["-s", &b.bs.to_string()]);
        if let Some(s) = b.step {
            cmd.args(["-S", &s.to_string()]);
        }
        if b.workload == "write" {
            cmd.arg("-w");
        }
        cmd.arg(ctx.data_dir.join(b.file));
        match util::output("qemu-img bench", &mut cmd).and_then(|o| parse_qemu_img_bench(&o, count))
        {
            Ok(m) => {
                return (
                    format!("qemu-img {version} bench aio={aio} cache=none"),
                    Ok(m),
                )
            }
            Err(e) => last_err = e,
        }
    }
    (format!("qemu-img {version} bench"), Err(last_err))
}

/// `qemu-img bench -w` on a new qcow2 clone of the raw data file: the same request count,
/// depth, size and step as ours, so each write lands in an unallocated cluster as in ours.
fn run_qemu_qcow2_cow(ctx: &Ctx, b: &Bench, cluster: u32) -> (String, Result<Measured>) {
    let Some(qemu) = util::find_or_install("qemu-img", "qemu-utils") else {
        return (
            "qemu-img bench (not installed)".into(),
            Err(anyhow!("qemu-img missing")),
        );
    };
    let version = util::version_of(&qemu)
        .and_then(|v| v.split_whitespace().nth(2).map(str::to_string))
        .unwrap_or_default();
    let label = format!(
        "qemu-img {version} bench -w qcow2 (raw backing, cluster_size={cluster}) cache=none"
    );
    let base = ctx.data_dir.join(b.file);
    let clone = ctx.data_dir.join(format!("{}.qcow2", b.name));
    let count = b.count.unwrap_or(1000);
    let r = (|| -> Result<Measured> {
        let _ = std::fs::remove_file(&clone);
        util::run(
            "qemu-img create",
            Command::new(&qemu)
                .args(["create", "-q", "-f", "qcow2", "-b"])
                .arg(&base)
                .args(["-F", "raw", "-o", &format!("cluster_size={cluster}")])
                .arg(&clone)
                .arg(FILE_SIZE.to_string()),
        )?;
        let mut last_err = anyhow!("not run");
        for aio in ["io_uring", "native"] {
            let mut cmd = Command::new(&qemu);
            cmd.args(["bench", "-w", "-f", "qcow2", "-t", "none", "-i", aio])
                .args(["-c", &count.to_string()])
                .args(["-d", &b.qd.to_string()])
                .args(["-s", &b.bs.to_string()]);
            if let Some(s) = b.step {
                cmd.args(["-S", &s.to_string()]);
            }
            cmd.arg(&clone);
            match util::output("qemu-img bench", &mut cmd)
                .and_then(|o| parse_qemu_img_bench(&o, count))
            {
                Ok(m) => return Ok(m),
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    })();
    let _ = std::fs::remove_file(&clone);
    (label, r)
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until a Unix socket accepts connections.
fn wait_socket(p: &Path) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(p).is_ok() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    bail!("{} never accepted connections", p.display())
}

/// One JSON-RPC call over our target's socket.
fn rpc(sock: &Path, method: &str, params: Value) -> Result<Value> {
    use std::io::BufRead;
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connect {}", sock.display()))?;
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    s.write_all(req.to_string().as_bytes())?;
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).with_context(|| format!("{method}: {line:?}"))?;
    match v.get("error") {
        Some(e) => bail!("{method}: {e}"),
        None => Ok(v["result"].clone()),
    }
}

/// `qemu-img bench` over an NBD URI: the bench's size, depth, pattern and count.
fn qemu_img_bench_nbd(b: &Bench, uri: &str) -> Result<Measured> {
    let count = b.count.unwrap_or(NBD_COUNT);
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bench", "-f", "raw"])
        .args(["-c", &count.to_string()])
        .args(["-d", &b.qd.to_string()])
        .args(["-s", &b.bs.to_string()]);
    if let Some(s) = b.step {
        cmd.args(["-S", &s.to_string()]);
    }
    if b.workload == "write" {
        cmd.arg("-w");
    }
    cmd.arg(uri);
    let out = util::output("qemu-img bench", &mut cmd)?;
    parse_qemu_img_bench(&out, count)
}

/// Ours over NBD: a `tgt` process (built by `cargo build --release -p tgt`), an aio base bdev
/// over the data file, a fresh lvol store on a sparse file, an esnap clone exported over NBD.
fn run_tgt_nbd_esnap(ctx: &Ctx, b: &Bench) -> Result<Measured> {
    let tgt = ctx.bench_bin.with_file_name("tgt");
    let dir = ctx.data_dir.join(format!("{}.tmp", b.name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let store = dir.join("store.img");
    File::create(&store)?.set_len(FILE_SIZE + (256 << 20))?;
    let sock = dir.join("rpc.sock");
    let nbd = dir.join("nbd.sock");
    let child = Command::new(&tgt)
        .arg("-r")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("start {}", tgt.display()))?;
    let guard = KillOnDrop(child);
    let r = (|| -> Result<Measured> {
        wait_socket(&sock)?;
        let base = ctx.data_dir.join(b.file);
        rpc(
            &sock,
            "bdev_aio_create",
            json!({"name": "base", "filename": base, "block_size": 4096,
                   "readonly": true, "uuid": NBD_BASE_UUID}),
        )?;
        rpc(
            &sock,
            "bdev_aio_create",
            json!({"name": "store", "filename": store, "block_size": 4096}),
        )?;
        rpc(
            &sock,
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "store", "lvs_name": "lvs", "cluster_sz": 1 << 20,
                   "clear_method": "none"}),
        )?;
        rpc(
            &sock,
            "bdev_lvol_clone_bdev",
            json!({"bdev": NBD_BASE_UUID, "lvs_name": "lvs", "clone_name": "ec"}),
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
        qemu_img_bench_nbd(b, &format!("nbd+unix:///ec?socket={}", nbd.display()))
    })();
    let _ = rpc(&sock, "spdk_kill_instance", json!({"sig_name": "SIGTERM"}));
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// Starts `qemu-nbd` serving the data file read-only as export `base` on `dir/q.sock`.
fn start_qemu_nbd_raw(ctx: &Ctx, b: &Bench, dir: &Path) -> Result<(KillOnDrop, PathBuf)> {
    let qemu_nbd =
        util::find_or_install("qemu-nbd", "qemu-utils").ok_or_else(|| anyhow!("no qemu-nbd"))?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let sock = dir.join("q.sock");
    let child = Command::new(qemu_nbd)
        .args(["-r", "-t", "-e", "8", "-x", "base", "-f", "raw", "-k"])
        .arg(&sock)
        .arg(ctx.data_dir.join(b.file))
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("start qemu-nbd")?;
    let srv = KillOnDrop(child);
    wait_socket(&sock)?;
    Ok((srv, sock))
}

/// The peer of the NBD client: `qemu-img bench` straight from qemu-nbd.
fn run_qemu_img_nbd_raw(ctx: &Ctx, b: &Bench) -> (String, Result<Measured>) {
    let version = util::version_of("qemu-nbd")
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_default();
    let label = format!("qemu-img bench straight from qemu-nbd {version} (raw, unix socket)");
    let dir = ctx.data_dir.join(format!("{}.peer-tmp", b.name));
    let r = start_qemu_nbd_raw(ctx, b, &dir).and_then(|(_srv, sock)| {
        qemu_img_bench_nbd(b, &format!("nbd+unix:///base?socket={}", sock.display()))
    });
    let _ = std::fs::remove_dir_all(&dir);
    (label, r)
}

/// The peer over NBD: `qemu-nbd` serving a fresh qcow2 clone of the data file (raw backing,
/// 1 MiB clusters) on a Unix socket.
fn run_qemu_nbd_qcow2(ctx: &Ctx, b: &Bench) -> (String, Result<Measured>) {
    let Some(qemu_nbd) = util::find_or_install("qemu-nbd", "qemu-utils") else {
        return (
            "qemu-nbd (not installed)".into(),
            Err(anyhow!("qemu-nbd missing")),
        );
    };
    let version = util::version_of(&qemu_nbd)
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_default();
    let label = format!("qemu-nbd {version} qcow2 clone (raw backing, 1 MiB clusters), unix socket; client qemu-img bench");
    let dir = ctx.data_dir.join(format!("{}.qtmp", b.name));
    let r = (|| -> Result<Measured> {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let qcow = dir.join("clone.qcow2");
        util::run(
            "qemu-img create",
            Command::new("qemu-img")
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
                .arg(ctx.data_dir.join(b.file))
                .arg(&qcow),
        )?;
        let qsock = dir.join("q.sock");
        let child = Command::new(&qemu_nbd)
            .args(["-f", "qcow2", "-x", "q", "-t", "-k"])
            .arg(&qsock)
            .arg(&qcow)
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("start qemu-nbd")?;
        let _q = KillOnDrop(child);
        wait_socket(&qsock)?;
        qemu_img_bench_nbd(b, &format!("nbd+unix:///q?socket={}", qsock.display()))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    (label, r)
}

/// `Run completed in 1.234 seconds.` → IOPS for `count` requests.
fn parse_qemu_img_bench(out: &str, count: u64) -> Result<Measured> {
    let secs = out
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Run completed in ")
                .and_then(|r| r.strip_suffix(" seconds."))
                .and_then(|s| s.trim().parse::<f64>().ok())
        })
        .ok_or_else(|| anyhow!("no `Run completed in` line in qemu-img output: {out:?}"))?;
    if secs <= 0.0 {
        bail!("qemu-img reported {secs} seconds");
    }
    Ok(Measured {
        iops: count as f64 / secs,
        ios: count,
        detail: Value::Null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_json_is_parsed_even_after_warnings() {
        let out = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"fio version": "fio-3.33", "jobs": [{"jobname": "x", "error": 0,
 "read": {"iops": 1234.5, "total_ios": 2469}, "write": {"iops": 0.0, "total_ios": 0}}]}"#;
        let m = parse_fio(out).unwrap();
        assert_eq!(m.iops, 1234.5);
        assert_eq!(m.ios, 2469);
        assert!(parse_fio("garbage").is_err());
        assert!(parse_fio(r#"{"jobs": []}"#).is_err());
        assert!(parse_fio(r#"{"jobs": [{"error": 5, "read": {"iops": 1.0}}]}"#).is_err());
    }

    #[test]
    fn qemu_img_bench_output_is_parsed() {
        let out = "Sending 1000 read requests, 4096 bytes each, 32 in parallel \
                   (starting at offset 0, step size 65536)\nRun completed in 0.500 seconds.\n";
        let m = parse_qemu_img_bench(out, 1000).unwrap();
        assert_eq!(m.iops, 2000.0);
        assert!(parse_qemu_img_bench("nothing", 1000).is_err());
    }

    #[test]
    fn units_and_counts_fit_each_setup() {
        for b in benches() {
            match b.ours {
                Ours::BsLoad { .. } => assert_eq!(b.ours.unit(), "ms", "{}", b.name),
                Ours::SnapClone { .. } => {
                    assert_eq!(b.ours.unit(), "ops/s");
                    assert!(b.count.is_some(), "{}", b.name);
                }
                Ours::NbdTgtEsnap | Ours::NbdClientEsnap => {
                    assert_eq!(b.ours.unit(), "IOPS");
                    assert!(b.count.is_some(), "{} is count-based", b.name);
                }
                _ => assert_eq!(b.ours.unit(), "IOPS"),
            }
            // The CoW entry writes each cluster exactly once.
            if let Peer::QemuQcow2Cow { cluster } = b.peer {
                assert_eq!(b.step, Some(u64::from(cluster)));
                assert_eq!(b.count, Some(FILE_SIZE / u64::from(cluster)));
            }
        }
    }

    #[test]
    fn median_takes_the_middle_run() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![5.0]), Some(5.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(4.0));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn bench_names_are_unique_and_file_safe() {
        let all = benches();
        let mut names: Vec<&str> = all.iter().map(|b| b.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')));
        assert!(all.iter().all(|b| [
            "read",
            "write",
            "randread",
            "randwrite",
            "randrw",
            "load",
            "create"
        ]
        .contains(&b.workload)));
    }

    #[test]
    fn data_file_is_fully_written_and_reused() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        let p = dir.join("d.raw");
        prepare_data_file(&p, 3 << 20).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 3 << 20);
        assert!(m.blocks() * 512 >= 3 << 20, "no holes");
        let data = std::fs::read(&p).unwrap();
        assert!(data.iter().all(|&b| b != 0));
        let mtime = m.modified().unwrap();
        prepare_data_file(&p, 3 << 20).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), mtime);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
