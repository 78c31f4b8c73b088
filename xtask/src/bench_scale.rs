//! Reactor scaling entries of `cargo xtask bench` (issue 15: with 2 reactors and 2 clients,
//! at least 1.8x the IOPS of one reactor). Our `tgt` runs with `--cores 2` (ours) and with
//! `--cores 1` (the peer), everything else alike: two malloc bdevs (4 KiB blocks), a lvol
//! store (4 MiB clusters) on each with one thick lvol filling it, written once in full
//! (untimed), each lvol exported over NBD on one Unix socket; one fio process with two jobs,
//! each its own `nbd` engine connection to one export, 4 KiB QD32 random I/O, timed; the
//! figure is the sum of the two jobs' IOPS (each job's is in the details).
//!
//! `tgt` runs under `taskset -c` with two CPUs: `--cpus` when it lists two or more, else the
//! first two of our affinity mask. fio runs on the same two CPUs (the clients share the cores
//! with the reactors), or on `--client-cpus` when that option names other CPUs. The target's
//! `framework_get_reactors` after the run (which reactor was busy) is kept in the details,
//! with the CPU time of the server (`/proc/PID/stat`) and of the clients (fio's `usr_cpu` and
//! `sys_cpu`) over the timed run, per request, and how busy that kept the CPUs.
//!
//! Why the CPU figures: with the clients on the reactors' two CPUs, the total is two CPUs
//! whatever the reactor count. If a request costs the server `s` and the client `c` of CPU
//! time, one reactor reaches at most `min(1/s, 1/c)` (the reactor on one CPU, the clients
//! on the other) and two reactors at most `2/(s+c)`, a ratio of at most
//! `2·max(s,c)/(s+c)`: 1.8 needs one side to cost 9 times the other.
//!
//! A child module of `bench` (its types are private there).

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::{
    parse_cpu_list, rpc, util, work, Bench, Ctx, DataFile, Len, Order, Ours, Run, TmpDir, Unit,
    FULL_SECS,
};

/// Cluster size of the stores.
pub(super) const CLUSTER: u64 = 4 << 20;
/// Clients (and exports, lvols, malloc bdevs).
const CLIENTS: usize = 2;

/// The scaling entries: random read and random write.
pub(super) fn benches() -> Vec<Bench> {
    [
        ("nbd_lvol_scaling_randread_4k_qd32_malloc_4m_clusters_2clients", false),
        ("nbd_lvol_scaling_randwrite_4k_qd32_malloc_4m_clusters_2clients", true),
    ]
    .into_iter()
    .map(|(name, write)| Bench {
        name,
        what: "reactor scaling: our tgt with --cores 2 (ours) against --cores 1 (peer); two malloc bdevs (4 KiB blocks) each holding a store (4 MiB clusters) with one thick lvol filling it, written once in full (untimed), each exported over NBD (unix socket); two fio nbd-engine clients (one fio process, one job per export), 4 KiB QD32, IOPS summed; tgt and fio all pinned to the same two CPUs, so the clients share the cores with the reactors (issue 15's target: ratio >= 1.8)",
        unit: Unit::Iops,
        work: work(write, Order::Rand, Len::Secs(FULL_SECS)),
        file: DataFile::Memory,
        ours: Ours::NbdScale { reactors: 2 },
        peers: vec![super::Peer::Ours(Ours::NbdScale { reactors: 1 })],
        spdk: None,
    })
    .collect()
}

/// The CPU set of a scaling entry: `cpus` if it lists at least two CPUs, else the first two of
/// `allowed` (our affinity mask).
pub(super) fn cpu_set(cpus: &str, allowed: &str) -> Result<String> {
    if parse_cpu_list(cpus)?.len() >= CLIENTS {
        return Ok(cpus.to_string());
    }
    let allowed = parse_cpu_list(allowed)?;
    if allowed.len() < CLIENTS {
        bail!("the scaling entries need two CPUs; the affinity mask has {allowed:?}");
    }
    Ok(allowed[..CLIENTS]
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(","))
}

/// The context of a scaling entry: `ctx` with its two-CPU set.
pub(super) fn ctx_for(ctx: &Ctx) -> Result<Ctx> {
    let allowed = super::allowed_cpus()
        .ok_or_else(|| anyhow!("no Cpus_allowed_list in /proc/self/status"))?;
    let cpus = cpu_set(&ctx.cpus, &allowed)?;
    // `--client-cpus` given (different from `--cpus`): the clients stay there.
    let client_cpus = if ctx.client_cpus != ctx.cpus {
        ctx.client_cpus.clone()
    } else {
        cpus.clone()
    };
    Ok(Ctx {
        client_cpus,
        cpus,
        ..ctx.clone()
    })
}

/// fio with one `nbd` job per URI, the entry's workload; `prefill` = one sequential pass of
/// 1 MiB writes over each export instead (untimed). Returns what each job did, and the
/// command.
fn fio(ctx: &Ctx, b: &Bench, uris: &[String], prefill: bool) -> Result<(Jobs, String)> {
    let fio = util::which("fio").ok_or_else(|| anyhow!("fio missing (needed for NBD)"))?;
    let mut cmd = ctx.client_pinned(&fio);
    cmd.arg("--ioengine=nbd").arg("--output-format=json");
    if prefill {
        cmd.args(["--rw=write", "--bs=1m", "--iodepth=8"]);
    } else {
        let w = &b.work;
        let secs = ctx
            .secs_of(w.len)
            .ok_or_else(|| anyhow!("the scaling entries are timed"))?;
        cmd.arg(format!("--rw={}", w.rw()))
            .arg(format!("--bs={}", w.bs))
            .arg(format!("--iodepth={}", w.qd))
            .args(["--norandommap=1", "--randrepeat=0", "--time_based=1"])
            .arg(format!("--runtime={}ms", (secs * 1000.0) as u64));
    }
    // Options before the first --name are global; each --name starts a job (a process of
    // its own, with its own connection).
    for (i, uri) in uris.iter().enumerate() {
        cmd.arg(format!("--name=client{i}"))
            .arg(format!("--uri={uri}"));
    }
    let out = util::output("fio (nbd, two clients)", &mut cmd)?;
    Ok((jobs_iops(&out, uris.len())?, util::show(&cmd)))
}

/// What fio's jobs did.
#[derive(Debug, Default, PartialEq)]
struct Jobs {
    /// IOPS (read + write) of each job.
    iops: Vec<f64>,
    /// Requests completed, all jobs.
    requests: u64,
    /// CPU time (user + system) of all jobs, in seconds (fio's `usr_cpu` and `sys_cpu`,
    /// percentages of each job's `job_runtime`); `None` when fio did not report them.
    cpu_seconds: Option<f64>,
}

/// The IOPS (read + write) of each of fio's jobs, from its JSON output; every job must have
/// completed requests.
fn jobs_iops(out: &str, jobs: usize) -> Result<Jobs> {
    let start = out
        .find('{')
        .ok_or_else(|| anyhow!("no JSON in fio output"))?;
    let v: Value = serde_json::from_str(&out[start..]).context("parse fio JSON")?;
    let list = v["jobs"]
        .as_array()
        .ok_or_else(|| anyhow!("fio reported no job"))?;
    if list.len() != jobs {
        bail!("fio reported {} jobs, expected {jobs}", list.len());
    }
    let mut each = Jobs {
        cpu_seconds: Some(0.0),
        ..Jobs::default()
    };
    for job in list {
        if job["error"].as_i64().unwrap_or(0) != 0 {
            bail!("fio job {} error {}", job["jobname"], job["error"]);
        }
        let iops = job["read"]["iops"].as_f64().unwrap_or(0.0)
            + job["write"]["iops"].as_f64().unwrap_or(0.0);
        if iops.is_nan() || iops <= 0.0 {
            bail!("fio job {} completed no request", job["jobname"]);
        }
        each.iops.push(iops);
        each.requests += job["read"]["total_ios"].as_u64().unwrap_or(0)
            + job["write"]["total_ios"].as_u64().unwrap_or(0);
        let cpu = match (
            job["usr_cpu"].as_f64(),
            job["sys_cpu"].as_f64(),
            job["job_runtime"].as_f64(),
        ) {
            (Some(u), Some(s), Some(ms)) => Some((u + s) / 100.0 * ms / 1000.0),
            _ => None,
        };
        each.cpu_seconds = each.cpu_seconds.zip(cpu).map(|(a, b)| a + b);
    }
    Ok(each)
}

/// One run: a fresh `tgt --cores N`, the two exports, the prefill, the timed clients.
pub(super) fn run(ctx: &Ctx, b: &Bench, reactors: usize) -> Result<Run> {
    let tmp = TmpDir::new(ctx, "scale")?;
    let sock = tmp.0.join("rpc.sock");
    let nbd = tmp.0.join("nbd.sock");
    let (guard, shown) = super::start_tgt(ctx, &sock, &["--cores", &reactors.to_string()])?;
    let mut commands = vec![shown];
    let mut call = |m: &str, p: Value| -> Result<Value> {
        let r = rpc(&sock, m, p.clone())?;
        commands.push(format!("rpc {m} {p}"));
        Ok(r)
    };
    // Room for the store's metadata: the lvol is the data file size.
    let malloc_blocks = (ctx.file_size + (64 << 20)) / 4096;
    for i in 0..CLIENTS {
        call(
            "bdev_malloc_create",
            json!({"name": format!("m{i}"), "num_blocks": malloc_blocks, "block_size": 4096}),
        )?;
        call(
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": format!("m{i}"), "lvs_name": format!("lvs{i}"),
                   "cluster_sz": CLUSTER, "clear_method": "none"}),
        )?;
        call(
            "bdev_lvol_create",
            json!({"lvs_name": format!("lvs{i}"), "lvol_name": "v",
                   "size_in_mib": ctx.file_size >> 20, "thin_provision": false}),
        )?;
    }
    call(
        "nbd_server_start",
        json!({"listen": format!("unix:{}", nbd.display())}),
    )?;
    let mut uris = Vec::new();
    for i in 0..CLIENTS {
        call(
            "nbd_export_add",
            json!({"bdev_name": format!("lvs{i}/v"), "name": format!("e{i}")}),
        )?;
        uris.push(format!("nbd+unix:///e{i}?socket={}", nbd.display()));
    }
    // A malloc bdev keeps zeroed chunks unbacked: write every block once, untimed.
    let (_, prefill) = fio(ctx, b, &uris, true)?;
    commands.push(format!("(untimed prefill) {prefill}"));
    let pid = guard.0.id();
    let t0 = server_ticks(pid)?;
    let start = std::time::Instant::now();
    let (jobs, client) = fio(ctx, b, &uris, false)?;
    let wall = start.elapsed().as_secs_f64();
    let server_secs =
        server_ticks(pid)?.saturating_sub(t0) as f64 / super::clock_ticks_per_second();
    commands.push(client);
    let cpu = cpu_detail(ctx, server_secs, &jobs, wall)?;
    let reactors_json = rpc(&sock, "framework_get_reactors", json!({})).unwrap_or(Value::Null);
    let _ = rpc(&sock, "spdk_kill_instance", json!({"sig_name": "SIGTERM"}));
    drop(guard);
    Ok(Run {
        value: jobs.iops.iter().sum(),
        commands,
        detail: json!({"reactors": reactors, "cpus": ctx.cpus, "client_cpus": ctx.client_cpus,
                       "per_client_iops": jobs.iops, "cpu": cpu,
                       "framework_get_reactors": reactors_json}),
    })
}

/// utime + stime of a process, in clock ticks.
fn server_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    super::parse_stat_cpu_ticks(&stat)
}

/// The CPU time of a timed run per request (server, clients), and the share of the CPUs both
/// kept busy: `(server + clients) / (wall × CPUs)`, the CPUs being the union of the server's
/// and the clients' sets.
fn cpu_detail(ctx: &Ctx, server_secs: f64, jobs: &Jobs, wall: f64) -> Result<Value> {
    let set = super::cpu_union(ctx)?;
    let per = |secs: f64| (jobs.requests > 0).then(|| secs * 1e6 / jobs.requests as f64);
    let busy = jobs
        .cpu_seconds
        .filter(|_| wall > 0.0)
        .map(|c| (server_secs + c) / (wall * set.len() as f64) * 100.0);
    Ok(json!({
        "requests": jobs.requests,
        "wall_seconds": wall,
        "server_cpu_seconds": server_secs,
        "server_cpu_us_per_request": per(server_secs),
        "clients_cpu_seconds": jobs.cpu_seconds,
        "clients_cpu_us_per_request": jobs.cpu_seconds.and_then(per),
        "cpus": set.len(),
        "cpus_busy_percent": busy,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_cpus_from_the_option_or_the_affinity_mask() {
        assert_eq!(cpu_set("1", "0-1").unwrap(), "0,1");
        assert_eq!(cpu_set("1", "2,5-7").unwrap(), "2,5");
        assert_eq!(cpu_set("2-3", "0-7").unwrap(), "2-3");
        assert!(cpu_set("1", "1").is_err());
        assert!(cpu_set("x", "0-1").is_err());
    }

    #[test]
    fn each_clients_iops_is_read() {
        let out = r#"fio: warning
{"jobs": [{"jobname": "client0", "error": 0, "read": {"iops": 1000.5}, "write": {"iops": 0}},
          {"jobname": "client1", "error": 0, "read": {"iops": 999.5}, "write": {"iops": 0}}]}"#;
        let jobs = jobs_iops(out, 2).unwrap();
        assert_eq!(jobs.iops, [1000.5, 999.5]);
        assert_eq!(jobs.cpu_seconds, None, "no CPU figures in this output");
        assert!(jobs_iops(out, 1).is_err(), "a missing client is an error");
        let idle = out.replace("999.5", "0");
        assert!(jobs_iops(&idle, 2).is_err(), "an idle client is an error");
        let failed = out.replacen("\"error\": 0", "\"error\": 5", 1);
        assert!(jobs_iops(&failed, 2).is_err());
        assert!(jobs_iops("no json", 2).is_err());
    }

    #[test]
    fn the_clients_cpu_and_requests_are_summed_over_the_jobs() {
        let out = r#"{"jobs": [
  {"jobname": "client0", "error": 0, "usr_cpu": 10.0, "sys_cpu": 40.0, "job_runtime": 2000,
   "read": {"iops": 500.0, "total_ios": 1000}, "write": {"iops": 0, "total_ios": 0}},
  {"jobname": "client1", "error": 0, "usr_cpu": 5.0, "sys_cpu": 20.0, "job_runtime": 4000,
   "read": {"iops": 250.0, "total_ios": 1000}, "write": {"iops": 0, "total_ios": 0}}]}"#;
        let jobs = jobs_iops(out, 2).unwrap();
        assert_eq!(jobs.requests, 2000);
        // 50 % of 2 s and 25 % of 4 s.
        assert_eq!(jobs.cpu_seconds, Some(2.0));
        let ctx_cpus = |cpus: &str, clients: &str| Ctx {
            cpus: cpus.into(),
            client_cpus: clients.into(),
            ..super::super::tests::test_ctx()
        };
        let d = cpu_detail(&ctx_cpus("0,1", "0,1"), 3.0, &jobs, 2.5).unwrap();
        assert_eq!(d["server_cpu_us_per_request"], json!(1500.0));
        assert_eq!(d["clients_cpu_us_per_request"], json!(1000.0));
        assert_eq!(d["cpus"], json!(2));
        assert_eq!(d["cpus_busy_percent"], json!(100.0));
        // Clients on two other CPUs: four CPUs, half busy.
        let d = cpu_detail(&ctx_cpus("0,1", "2-3"), 3.0, &jobs, 2.5).unwrap();
        assert_eq!(d["cpus"], json!(4));
        assert_eq!(d["cpus_busy_percent"], json!(50.0));
    }

    #[test]
    fn ours_has_two_reactors_and_the_peer_one() {
        for b in benches() {
            assert_eq!(b.ours, Ours::NbdScale { reactors: 2 }, "{}", b.name);
            assert_eq!(
                b.peers,
                [super::super::Peer::Ours(Ours::NbdScale { reactors: 1 })]
            );
            assert!(b.name.contains(if b.work.write {
                "randwrite"
            } else {
                "randread"
            }));
        }
    }
}
