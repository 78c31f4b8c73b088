//! `cargo xtask soak --time SECS [--cases N]`: the blobstore model-based test
//! (`blob_model::store_matches_model` in the `reliability` package's test binary), many cases,
//! new seeds, until the time is up.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::util;

/// The model-based test, by its full name (run with `--exact`, so no other test whose name
/// contains "model" is swept in).
const FILTER: &str = "blob_model::store_matches_model";
/// The package whose test binary holds it (`reliability/tests/it/blob_model.rs`).
const PACKAGES: [&str; 1] = ["reliability"];

/// A test executable and the package directory it runs in.
struct TestBin {
    exe: PathBuf,
    dir: PathBuf,
}

/// Builds the candidate packages' test binaries in release mode, then runs the `model` tests
/// over and over with `PROPTEST_CASES`, `SOAK=1` and a fresh `PROPTEST_RNG_SEED` each round
/// until the time is up. A round still running at the deadline is stopped and counts as
/// passed.
pub fn run(args: &[String]) -> Result<()> {
    crate::check_args(args, &[], &["--time", "--cases"])?;
    let secs: u64 = crate::flag_value(args, "--time")?.unwrap_or(600);
    let cases: u64 = crate::flag_value(args, "--cases")?.unwrap_or(4000);
    let packages: Vec<&str> = PACKAGES
        .into_iter()
        .filter(|p| util::project_root().join(p).join("Cargo.toml").is_file())
        .collect();
    let bins = if packages.is_empty() {
        Vec::new()
    } else {
        test_binaries(&packages)?
    };
    let with_model: Vec<&TestBin> = bins
        .iter()
        .filter(|b| lists_model_test(&b.exe).unwrap_or(false))
        .collect();
    if with_model.is_empty() {
        bail!("no test `{FILTER}` in the test binaries of {PACKAGES:?}: nothing to soak");
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut round = 0u64;
    let mut complete = 0u64;
    let base_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    while Instant::now() < deadline {
        round += 1;
        let mut cut = false;
        let seed = base_seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(round);
        for bin in &with_model {
            eprintln!(
                "\n==> soak round {round}: {} seed {seed}",
                bin.exe.display()
            );
            let mut cmd = Command::new(&bin.exe);
            cmd.args([FILTER, "--exact"])
                .env("PROPTEST_CASES", cases.to_string())
                .env("PROPTEST_RNG_SEED", seed.to_string())
                .env("SOAK", "1")
                .current_dir(&bin.dir);
            match run_until(&mut cmd, deadline)? {
                Some(true) => {}
                None => cut = true,
                Some(false) => bail!(
                    "soak failed in round {round}; reproduce with PROPTEST_RNG_SEED={seed} \
                     PROPTEST_CASES={cases} SOAK=1 {} {FILTER} --exact (run in {})",
                    bin.exe.display(),
                    bin.dir.display()
                ),
            }
        }
        if !cut {
            complete += 1;
        }
    }
    let partial = if complete < round {
        " (plus one cut short at the deadline, no failure so far)"
    } else {
        ""
    };
    eprintln!("soak: {complete} complete rounds of {cases} cases passed in {secs} s{partial}");
    Ok(())
}

/// Runs a command until it exits (`Some(success)`) or the deadline passes (`None`, killed).
fn run_until(cmd: &mut Command, deadline: Instant) -> Result<Option<bool>> {
    eprintln!("$ {}", util::show(cmd));
    let mut child = cmd.spawn().context("start test binary")?;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st.success()));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("soak: time is up, stopped the running round");
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The packages' test executables, built in release mode.
fn test_binaries(packages: &[&str]) -> Result<Vec<TestBin>> {
    let mut cmd = util::cargo();
    cmd.args(["test", "--release", "--no-run", "--message-format=json"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    let out = util::output("build the test binaries", &mut cmd)?;
    let mut bins = Vec::new();
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact" && v["profile"]["test"] == Value::Bool(true) {
            if let (Some(exe), Some(manifest)) =
                (v["executable"].as_str(), v["manifest_path"].as_str())
            {
                let dir = PathBuf::from(manifest)
                    .parent()
                    .map(PathBuf::from)
                    .unwrap_or_else(util::project_root);
                bins.push(TestBin {
                    exe: exe.into(),
                    dir,
                });
            }
        }
    }
    if bins.is_empty() {
        return Err(anyhow!("no test binaries in {packages:?}"));
    }
    Ok(bins)
}

fn lists_model_test(bin: &std::path::Path) -> Result<bool> {
    let out = Command::new(bin)
        .args(["--list", FILTER, "--exact"])
        .output()
        .context("list tests")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.ends_with(": test")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_report_exit_status_or_deadline() {
        let far = Instant::now() + Duration::from_secs(30);
        assert_eq!(
            run_until(&mut Command::new("true"), far).unwrap(),
            Some(true)
        );
        assert_eq!(
            run_until(&mut Command::new("false"), far).unwrap(),
            Some(false)
        );
        let t0 = Instant::now();
        let soon = t0 + Duration::from_millis(200);
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        assert_eq!(run_until(&mut sleeper, soon).unwrap(), None);
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the round was stopped"
        );
    }
}
