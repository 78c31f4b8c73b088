//! `cargo xtask bench`: our figures next to a peer's on the same file, same pattern, same
//! queue depth, one JSON file per benchmark under `target/bench/`.
//!
//! A benchmark is one [`Bench`] entry: what we run (an [`Ours`] setup driven by the `bench`
//! package's workload generator) and which [`Peer`] measures the same thing. Later benchmarks
//! (blobstore thick blob vs raw device, lvol vs base, esnap clone reads vs base, CoW vs
//! `qemu-img bench -w` on a qcow2 with a raw backing file, NBD vs qemu-nbd) are more entries:
//! a new `Ours` variant tells the `bench` binary which stack to build, a new `Peer` variant
//! how to measure the counterpart; `Peer::Ours` compares with one of our own setups (as
//! `lvol_randread_4k_qd32` compares a thick lvol with the raw aio bdev under it).

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
}

impl Ours {
    fn direct(self) -> bool {
        match self {
            Ours::AioFile { direct, .. } | Ours::Lvol { direct, .. } => direct,
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
    /// The data file (under target/bench-data/).
    file: &'static str,
    ours: Ours,
    peer: Peer,
}

const RAW_FILE: &str = "disk-1g.raw";
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
    vec![
        Bench {
            name: "aio_randread_4k_qd32",
            workload: "randread",
            bs: 4096,
            qd: 32,
            step: None,
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
            file: LVS_FILE,
            ours: lvol,
            peer: Peer::Ours(aio),
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
                Peer::Ours(setup) => (
                    format!("ours: {}", setup_label(setup)),
                    run_ours(ctx, b, setup),
                ),
            };
            peer_name = name;
            match peer {
                Ok(p) => peer_runs.push(p.iops),
                Err(e) => {
                    eprintln!("note: peer {peer_name} not measured: {e:#}");
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
    params["direct"] = json!(b.ours.direct());
    params["ours_setup"] = json!(setup_label(b.ours));
    params["ours_engine"] = ours.detail["engine"].clone();
    params["seconds"] = json!(ctx.seconds);
    if let Peer::QemuImgBench = b.peer {
        params["peer_count"] = json!("our request count of the same round (at least 1000)");
    }
    let record = json!({
        "name": b.name,
        "workload": b.workload,
        "params": params,
        "unit": "IOPS",
        "ours": round1(ours.iops),
        "peer": peer_name,
        "peer_value": peer_value.as_ref().map(|p| round1(p.iops)),
        "ratio": ratio.map(|r| (r * 1000.0).round() / 1000.0),
    });
    let path = ctx.out_dir.join(format!("{}.json", b.name));
    std::fs::write(&path, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("write {}", path.display()))?;
    Ok(format!(
        "{:<34} ours {:>8.0} IOPS   {:<46} {:>13}   ratio {}",
        b.name,
        ours.iops,
        peer_name,
        peer_value
            .as_ref()
            .map(|p| format!("{:.0} IOPS", p.iops))
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
    };
    format!(
        "{what} ({engine}{})",
        if direct { ", O_DIRECT" } else { "" }
    )
}

fn run_ours(ctx: &Ctx, b: &Bench, setup: Ours) -> Result<Measured> {
    let mut cmd = Command::new(&ctx.bench_bin);
    let file = ctx.data_dir.join(b.file);
    let (kind, engine, direct) = match setup {
        Ours::AioFile { engine, direct } => ("aio", engine, direct),
        Ours::Lvol { engine, direct } => ("lvol", engine, direct),
    };
    cmd.arg("--target")
        .arg(format!("{kind}:{}", file.display()))
        .args(["--engine", engine]);
    if direct {
        cmd.arg("--direct");
    }
    cmd.args(["--rw", b.workload])
        .args(["--bs", &b.bs.to_string()])
        .args(["--qd", &b.qd.to_string()])
        .args(["--time", &ctx.seconds.to_string()]);
    if let Some(s) = b.step {
        cmd.args(["--step", &s.to_string()]);
    }
    let out = util::output("our benchmark", &mut cmd)?;
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
        assert!(all
            .iter()
            .all(|b| ["read", "write", "randread", "randwrite", "randrw"].contains(&b.workload)));
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
