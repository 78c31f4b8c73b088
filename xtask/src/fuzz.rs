//! `cargo xtask fuzz --time SECS`: every cargo-fuzz target under `fuzz/` for SECS seconds.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

use crate::util;

/// Runs the fuzz targets when cargo-fuzz and a nightly toolchain are available; otherwise says
/// so and replays the corpora through the ordinary tests (the crates keep corpus-replay tests).
pub fn run(args: &[String]) -> Result<()> {
    crate::check_args(args, &[], &["--time"])?;
    let secs: u64 = crate::flag_value(args, "--time")?.unwrap_or(60);
    let fuzz_dir = util::project_root().join("fuzz");
    let targets = fuzz_targets(&fuzz_dir);
    if targets.is_empty() {
        eprintln!("note: no fuzz targets under {}", fuzz_dir.display());
        return replay_corpus();
    }
    if let Err(why) = fuzz_tooling() {
        eprintln!("note: not fuzzing: {why}");
        return replay_corpus();
    }
    let mut failed = Vec::new();
    for t in &targets {
        eprintln!("\n==> fuzz {t} for {secs} s");
        // New inputs go to a corpus under target/ (seeded by the committed one), so fuzzing
        // leaves the source tree as it was.
        let work = util::target_dir().join("fuzz-corpus").join(t);
        std::fs::create_dir_all(&work)?;
        let seed = fuzz_dir.join("corpus").join(t);
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo", "fuzz", "run", t])
            .arg(&work)
            .current_dir(&fuzz_dir);
        if seed.is_dir() {
            cmd.arg(&seed);
        }
        cmd.arg("--").arg(format!("-max_total_time={secs}"));
        let r = util::run(&format!("fuzz target {t}"), &mut cmd);
        if let Err(e) = r {
            eprintln!("fuzz {t}: {e:#}");
            failed.push(t.clone());
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets found failures: {} (see fuzz/artifacts)",
            failed.join(", ")
        );
    }
    eprintln!("fuzzing done: {} targets, {secs} s each", targets.len());
    Ok(())
}

/// The names of `fuzz/fuzz_targets/*.rs`.
fn fuzz_targets(fuzz_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fuzz_dir.join("fuzz_targets"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "rs").then(|| p.file_stem()?.to_str().map(str::to_string))?
        })
        .collect();
    v.sort();
    v
}

fn fuzz_tooling() -> Result<(), String> {
    if util::which("rustup").is_none() {
        return Err("rustup is not installed (a nightly toolchain is needed)".into());
    }
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !nightly {
        return Err("no nightly toolchain (rustup toolchain install nightly)".into());
    }
    let cargo_fuzz = Command::new("rustup")
        .args(["run", "nightly", "cargo", "fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !cargo_fuzz {
        return Err("cargo-fuzz is not installed (cargo install cargo-fuzz)".into());
    }
    Ok(())
}

fn replay_corpus() -> Result<()> {
    eprintln!(
        "==> replaying the fuzz corpora through the ordinary tests (names with `corpus` or `fuzz`)"
    );
    util::run(
        "corpus replay tests",
        util::cargo().args(["test", "--workspace", "--", "corpus", "fuzz"]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_the_rs_files_of_fuzz_targets() {
        let dir = std::env::temp_dir().join(format!("xtask-fuzz-{}", std::process::id()));
        let t = dir.join("fuzz_targets");
        std::fs::create_dir_all(&t).unwrap();
        for f in ["md_page.rs", "super_block.rs", "README.md"] {
            std::fs::write(t.join(f), "").unwrap();
        }
        assert_eq!(fuzz_targets(&dir), vec!["md_page", "super_block"]);
        assert!(fuzz_targets(&dir.join("missing")).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
