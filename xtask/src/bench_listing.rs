//! Listing entries of `cargo xtask bench` (issue 16): `bdev_get_bdevs` and
//! `bdev_lvol_get_lvols` of our `tgt` on one lvol store of 10,000 thin lvols (1,000 with
//! `--quick`), timed by `python/bench_listing.py`, a client that reads each answer to its
//! final newline and parses it once with Python's `json` (as `spdk-rpc` does). The figure is
//! the best of that script's 5 calls, in ms, parse included; its target CPU time per call and
//! the time to the answer's last byte are kept in the details.
//!
//! A child module of `bench` (its types are private there).

use std::process::Command;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

use super::{util, work, Bench, Ctx, DataFile, Len, Order, Ours, Run, TmpDir, Unit};

/// Lvols of a complete run (a tenth with `--quick`).
pub(super) const LVOLS: u64 = 10_000;

/// The listing entries.
pub(super) fn benches() -> Vec<Bench> {
    [
        (
            "tgt_listing_bdev_get_bdevs_10k_lvols",
            "bdev_get_bdevs",
            "our tgt (release) with one lvol store (malloc base, 1 MiB clusters) of 10,000 thin lvols: `bdev_get_bdevs` without a name, timed by python/bench_listing.py to the answer's last byte plus its one json parse; best of 5 calls, in ms",
        ),
        (
            "tgt_listing_bdev_lvol_get_lvols_10k_lvols",
            "bdev_lvol_get_lvols",
            "the same tgt setup: `bdev_lvol_get_lvols` without a store, timed the same way",
        ),
    ]
    .into_iter()
    .map(|(name, method, what)| Bench {
        name,
        what,
        unit: Unit::Ms,
        work: work(false, Order::Seq, Len::Count(LVOLS, LVOLS / 10)),
        file: DataFile::Memory,
        ours: Ours::Listing { method },
        peers: vec![],
        spdk: None,
    })
    .collect()
}

/// One run: a fresh `tgt`, the lvols created in one batch, the script's timings.
pub(super) fn run(ctx: &Ctx, b: &Bench, method: &str) -> Result<Run> {
    let lvols = ctx.count(b.work.len).unwrap_or(LVOLS);
    let tmp = TmpDir::new(ctx, "listing")?;
    let sock = tmp.0.join("rpc.sock");
    let (guard, shown) = super::start_tgt(ctx, &sock, &[])?;
    let script = util::project_root().join("python/bench_listing.py");
    let mut client = Command::new("python3");
    client
        .arg(&script)
        .arg(&sock)
        .arg(lvols.to_string())
        .args(["--setup", "--json"])
        .env("TGT_PID", guard.0.id().to_string());
    let commands = vec![shown, util::show(&client)];
    let out = util::output("python/bench_listing.py", &mut client)?;
    figure(&out, method, lvols).map(|(value, detail)| Run {
        value,
        commands,
        detail,
    })
}

/// The figure (ms, parse included) of `method` in the script's JSON, and its details.
fn figure(out: &str, method: &str, lvols: u64) -> Result<(f64, Value)> {
    let v: Value = serde_json::from_str(out.trim())
        .with_context(|| format!("bench_listing.py printed no JSON: {out:?}"))?;
    let m = &v[method];
    let entries = m["entries"].as_u64().unwrap_or(0);
    // bdev_get_bdevs also lists the malloc base.
    if entries < lvols {
        return Err(anyhow!(
            "{method} listed {entries} entries, expected {lvols}: {v}"
        ));
    }
    let secs = m["parsed_s"]
        .as_f64()
        .ok_or_else(|| anyhow!("no parsed_s for {method} in {v}"))?;
    Ok((secs * 1000.0, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_json_gives_the_figure_in_ms() {
        let out = r#"{"bdev_get_bdevs": {"entries": 10001, "bytes": 9000000, "parsed_s": 0.105, "last_byte_s": 0.04, "cpu_s": 0.02}}"#;
        let (ms, detail) = figure(out, "bdev_get_bdevs", 10_000).unwrap();
        assert!((ms - 105.0).abs() < 1e-9);
        assert_eq!(detail["bdev_get_bdevs"]["bytes"], 9_000_000);
        assert!(figure(out, "bdev_get_bdevs", 20_000).is_err());
        assert!(figure(out, "bdev_lvol_get_lvols", 1).is_err());
        assert!(figure("created", "bdev_get_bdevs", 1).is_err());
    }
}
