//! Reactor scaling entries of `cargo xtask bench` (issue 15: with 2 reactors and 2 clients,
//! at least 1.8x the IOPS of one reactor). Our `tgt` runs with `--cores 2` (ours) and with
//! `--cores 1` (the peer), everything else alike: two malloc bdevs (4 KiB blocks), a lvol
//! store (4 MiB clusters) on each with one thick lvol filling it, written once in full
//! (untimed), each lvol exported over NBD on one Unix socket; one fio process with two jobs,
//! each its own `nbd` engine connection to one export, 4 KiB QD32 random I/O, timed; the
//! figure is the sum of the two jobs' IOPS (each job's is in the details).
//!
//! Every process (tgt and fio) runs under `taskset -c` with two CPUs: `--cpus` when it lists
//! two or more, else the first two of our affinity mask; so the clients share the two CPUs
//! with the reactors. The target's `framework_get_reactors` after the run (which reactor was
//! busy) is kept in the details.
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
    Ok(Ctx {
        client_cpus: cpus.clone(),
        cpus,
        ..ctx.clone()
    })
}

/// fio with one `nbd` job per URI, the entry's workload; `prefill` = one sequential pass of
/// 1 MiB writes over each export instead (untimed).
fn fio(ctx: &Ctx, b: &Bench, uris: &[String], prefill: bool) -> Result<(Vec<f64>, String)> {
    let fio = util::which("fio").ok_or_else(|| anyhow!("fio missing (needed for NBD)"))?;
    let mut cmd = ctx.pinned(&fio);
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

/// The IOPS (read + write) of each of fio's jobs, from its JSON output; every job must have
/// completed requests.
fn jobs_iops(out: &str, jobs: usize) -> Result<Vec<f64>> {
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
    let mut each = Vec::new();
    for job in list {
        if job["error"].as_i64().unwrap_or(0) != 0 {
            bail!("fio job {} error {}", job["jobname"], job["error"]);
        }
        let iops = job["read"]["iops"].as_f64().unwrap_or(0.0)
            + job["write"]["iops"].as_f64().unwrap_or(0.0);
        if iops.is_nan() || iops <= 0.0 {
            bail!("fio job {} completed no request", job["jobname"]);
        }
        each.push(iops);
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
    let (per_client, client) = fio(ctx, b, &uris, false)?;
    commands.push(client);
    let reactors_json = rpc(&sock, "framework_get_reactors", json!({})).unwrap_or(Value::Null);
    let _ = rpc(&sock, "spdk_kill_instance", json!({"sig_name": "SIGTERM"}));
    drop(guard);
    Ok(Run {
        value: per_client.iter().sum(),
        commands,
        detail: json!({"reactors": reactors, "cpus": ctx.cpus, "per_client_iops": per_client,
                       "framework_get_reactors": reactors_json}),
    })
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
        assert_eq!(jobs_iops(out, 2).unwrap(), [1000.5, 999.5]);
        assert!(jobs_iops(out, 1).is_err(), "a missing client is an error");
        let idle = out.replace("999.5", "0");
        assert!(jobs_iops(&idle, 2).is_err(), "an idle client is an error");
        let failed = out.replacen("\"error\": 0", "\"error\": 5", 1);
        assert!(jobs_iops(&failed, 2).is_err());
        assert!(jobs_iops("no json", 2).is_err());
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
