//! `bench`: runs one workload against one bdev-core device and prints the result as one JSON
//! object on stdout. `cargo xtask bench` drives it; it can be run by hand too:
//!
//! ```text
//! bench --target aio:/path/file --engine uring --direct --rw randread --bs 4096 --qd 32 --time 10
//! bench --target malloc:1024 --rw randwrite --bs 4096 --qd 32 --count 100000
//! bench --target lvol:/path/file --engine uring --direct --rw randread --bs 4096 --qd 32
//! ```
//!
//! `lvol:PATH` is a thick lvol filling an lvol store on an aio bdev over PATH (store
//! `bench_lvs`, lvol `vol`, 4 MiB clusters, created on first use without clearing the data,
//! found again by examine on later runs).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bdev_core::backend::aio::{AioBdev, AioEngine, AioOpts};
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::Registry;
use bench::{Pattern, Workload};
use blobstore::ClearMethod;
use lvol::{LvolModule, LvsClearMethod, LvsOpts};
use serde_json::json;

const USAGE: &str =
    "usage: bench --target aio:PATH|lvol:PATH|malloc:MIB [--engine auto|uring|threadpool] \
[--direct] [--block-len 512|4096] --rw read|write|randread|randwrite|randrw [--rwmix-read PCT] \
[--bs BYTES] [--qd N] [--time SECS] [--count N] [--step BYTES] [--offset BYTES] [--seed N]";

/// The device a run goes against.
enum Target {
    Aio(PathBuf),
    Lvol(PathBuf),
    Malloc { mib: u64 },
}

struct Args {
    target: Target,
    engine: AioEngine,
    direct: bool,
    block_len: Option<u32>,
    workload: Workload,
}

fn parse_num(flag: &str, v: Option<String>) -> Result<u64, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    let (digits, mult) = match v.as_bytes().last() {
        Some(b'k' | b'K') => (&v[..v.len() - 1], 1u64 << 10),
        Some(b'm' | b'M') => (&v[..v.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&v[..v.len() - 1], 1 << 30),
        _ => (&v[..], 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{flag}: bad number {v:?}"))
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut target = None;
    let mut engine = AioEngine::Auto;
    let mut direct = false;
    let mut block_len = None;
    let mut w = Workload {
        duration: None,
        ..Default::default()
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--target" => {
                let v = it.next().ok_or("--target needs a value")?;
                target = Some(if let Some(p) = v.strip_prefix("aio:") {
                    Target::Aio(PathBuf::from(p))
                } else if let Some(p) = v.strip_prefix("lvol:") {
                    Target::Lvol(PathBuf::from(p))
                } else if let Some(m) = v.strip_prefix("malloc:") {
                    Target::Malloc {
                        mib: parse_num("--target malloc:", Some(m.to_string()))?,
                    }
                } else {
                    return Err(format!("unknown target {v:?}"));
                });
            }
            "--engine" => {
                engine = match it.next().as_deref() {
                    Some("auto") => AioEngine::Auto,
                    Some("uring" | "io_uring") => AioEngine::Uring,
                    Some("threadpool" | "thread-pool") => AioEngine::ThreadPool,
                    other => return Err(format!("bad --engine {other:?}")),
                }
            }
            "--direct" => direct = true,
            "--block-len" => block_len = Some(parse_num("--block-len", it.next())? as u32),
            "--rw" => {
                let v = it.next().ok_or("--rw needs a value")?;
                w.pattern = Pattern::parse(&v).ok_or_else(|| format!("bad --rw {v:?}"))?;
            }
            "--rwmix-read" => w.read_pct = parse_num("--rwmix-read", it.next())? as u32,
            "--bs" => w.bs = parse_num("--bs", it.next())?,
            "--qd" => w.qd = parse_num("--qd", it.next())? as usize,
            "--time" => {
                w.duration = Some(Duration::from_secs_f64(
                    it.next()
                        .and_then(|s| s.parse::<f64>().ok())
                        .filter(|s| *s > 0.0)
                        .ok_or("--time needs a positive number of seconds")?,
                ))
            }
            "--count" => w.count = Some(parse_num("--count", it.next())?),
            "--step" => w.step = Some(parse_num("--step", it.next())?),
            "--offset" => w.offset = parse_num("--offset", it.next())?,
            "--seed" => w.seed = parse_num("--seed", it.next())?,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let target = target.ok_or_else(|| format!("--target is required\n{USAGE}"))?;
    if w.duration.is_none() && w.count.is_none() {
        w.duration = Some(Duration::from_secs(10));
    }
    Ok(Args {
        target,
        engine,
        direct,
        block_len,
        workload: w,
    })
}

fn engine_name(e: AioEngine) -> &'static str {
    match e {
        AioEngine::Auto => "auto",
        AioEngine::Uring => "io_uring",
        AioEngine::ThreadPool => "thread_pool",
    }
}

fn aio_bdev(args: &Args, name: &str, path: &Path) -> Result<Arc<AioBdev>, String> {
    AioBdev::create(AioOpts {
        name: name.into(),
        filename: path.to_path_buf(),
        block_len: args.block_len,
        direct: args.direct,
        engine: args.engine,
        ..Default::default()
    })
    .map_err(|e| format!("aio bdev on {}: {e}", path.display()))
}

/// A thick lvol over the whole store on `path`, created on first use; returns its bdev name
/// and the aio engine under it.
async fn lvol_target(
    reg: &Registry,
    m: &LvolModule,
    args: &Args,
    path: &Path,
) -> Result<(String, AioEngine), String> {
    let a = aio_bdev(args, "bench_base", path)?;
    let engine = a.engine();
    reg.register(a)
        .await
        .map_err(|e| format!("register: {e}"))?;
    reg.wait_for_examine().await;
    let store = match m.lvstore_by_name("bench_lvs") {
        Some(s) => s,
        None => {
            let mut o = LvsOpts::new("bench_lvs");
            o.clear_method = LvsClearMethod::None;
            m.create_lvstore("bench_base", o)
                .await
                .map_err(|e| format!("create lvol store: {e}"))?
        }
    };
    let lvol = match store.lvol_by_name("vol") {
        Some(l) => l,
        None => {
            let size = store.free_clusters() * u64::from(store.cluster_size());
            m.create_lvol(&store, "vol", size, false, ClearMethod::None)
                .await
                .map_err(|e| format!("create lvol: {e}"))?
        }
    };
    Ok((lvol.unique_id().to_string(), engine))
}

fn run(args: Args) -> Result<serde_json::Value, String> {
    let reg = Registry::new();
    let mut _lvol_module = None;
    let (name, target_desc, engine) = match &args.target {
        Target::Aio(path) => {
            let a = aio_bdev(&args, "bench0", path)?;
            let eng = a.engine();
            futures::executor::block_on(reg.register(a)).map_err(|e| format!("register: {e}"))?;
            (
                "bench0".to_string(),
                format!("aio:{}", path.display()),
                Some(eng),
            )
        }
        Target::Lvol(path) => {
            let m = LvolModule::new(reg.clone());
            let (name, eng) = futures::executor::block_on(lvol_target(&reg, &m, &args, path))?;
            _lvol_module = Some(m);
            (name, format!("lvol:{}", path.display()), Some(eng))
        }
        Target::Malloc { mib } => {
            let bl = args.block_len.unwrap_or(512);
            let m = MallocBdev::create("bench0", (mib << 20) / bl as u64, bl, None)
                .map_err(|e| format!("malloc bdev: {e}"))?;
            futures::executor::block_on(reg.register(m)).map_err(|e| format!("register: {e}"))?;
            ("bench0".to_string(), format!("malloc:{mib}"), None)
        }
    };
    let w = &args.workload;
    let desc = reg
        .open(&name, w.pattern.writes())
        .map_err(|e| format!("open: {e}"))?;
    let dev = desc.device().clone();
    // The reactor submits and reaps this thread's aio requests inline (SPDK's reactor with
    // its io_uring poller), as fio does; other devices run as under any executor.
    let stats = bdev_core::reactor::block_on(bench::run(&desc, w))?;
    Ok(json!({
        "target": target_desc,
        "engine": engine.map(engine_name),
        "direct": args.direct,
        "block_len": dev.block_len(),
        "size_bytes": dev.num_blocks() * dev.block_len() as u64,
        "rw": w.pattern.name(),
        "bs": w.bs,
        "qd": w.qd,
        "step": w.step,
        "reads": stats.reads,
        "writes": stats.writes,
        "ios": stats.reads + stats.writes,
        "errors": stats.errors,
        "first_error": stats.first_error,
        "seconds": stats.elapsed.as_secs_f64(),
        "iops": stats.iops(),
        "mib_per_s": stats.iops() * w.bs as f64 / (1 << 20) as f64,
    }))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(v) => {
            println!("{v}");
            if v["errors"].as_u64().unwrap_or(0) > 0 {
                eprintln!(
                    "bench: {} requests failed: {}",
                    v["errors"], v["first_error"]
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Args, String> {
        parse_args(s.split_whitespace().map(str::to_string))
    }

    #[test]
    fn parses_a_full_command_line() {
        let a =
            args("--target aio:/x --engine uring --direct --rw randwrite --bs 4k --qd 32 --time 2")
                .unwrap();
        assert!(matches!(a.target, Target::Aio(ref p) if p == &PathBuf::from("/x")));
        assert_eq!(a.engine, AioEngine::Uring);
        assert!(a.direct);
        assert_eq!(a.workload.pattern, Pattern::RandWrite);
        assert_eq!(a.workload.bs, 4096);
        assert_eq!(a.workload.qd, 32);
        assert_eq!(a.workload.duration, Some(Duration::from_secs(2)));
    }

    #[test]
    fn defaults_and_errors() {
        let a = args("--target malloc:64 --rw read --step 64k --count 1000").unwrap();
        assert!(matches!(a.target, Target::Malloc { mib: 64 }));
        assert_eq!(a.workload.step, Some(65536));
        assert_eq!(a.workload.count, Some(1000));
        assert_eq!(a.workload.duration, None);
        let l = args("--target lvol:/f --rw randread").unwrap();
        assert!(matches!(l.target, Target::Lvol(ref p) if p == &PathBuf::from("/f")));
        let d = args("--target malloc:64 --rw read").unwrap();
        assert_eq!(d.workload.duration, Some(Duration::from_secs(10)));
        assert!(args("--rw read").is_err());
        assert!(args("--target nvme:0 --rw read").is_err());
        assert!(args("--target malloc:64 --rw sideways").is_err());
        assert!(args("--target malloc:64 --bs 4x").is_err());
        assert!(args("--target malloc:64 --time -1").is_err());
    }
}
