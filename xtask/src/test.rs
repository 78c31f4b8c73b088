//! `cargo xtask test`: the whole test pipeline, one step after the other.

use std::time::Instant;

use anyhow::{bail, Result};

use crate::util;

/// What a step ended with, when it did not fail.
enum Outcome {
    Passed,
    Skipped(String),
}

struct Step {
    name: &'static str,
    run: Box<dyn Fn() -> Result<Outcome>>,
}

/// Runs fmt, clippy, the workspace tests (with the arguments after `--`, if any), the
/// target's tests again with one reactor, and the blobcli end-to-end scenario; stops at the
/// first failing step and names it.
pub fn run(args: &[String]) -> Result<()> {
    let test_args: Vec<String> = match args.split_first() {
        None => Vec::new(),
        Some((first, rest)) if first == "--" => rest.to_vec(),
        Some((first, _)) => bail!("test: unexpected argument {first:?} (use `test -- ARGS`)"),
    };
    let one_reactor_args = test_args.clone();
    let steps = [
        Step {
            name: "fmt",
            run: Box::new(|| {
                util::run(
                    "cargo fmt --check",
                    util::cargo().args(["fmt", "--all", "--", "--check"]),
                )
                .map(|_| Outcome::Passed)
            }),
        },
        Step {
            name: "clippy",
            run: Box::new(|| {
                util::run(
                    "cargo clippy",
                    util::cargo().args([
                        "clippy",
                        "--workspace",
                        "--all-targets",
                        "--",
                        "-D",
                        "warnings",
                    ]),
                )
                .map(|_| Outcome::Passed)
            }),
        },
        Step {
            name: "test",
            run: Box::new(move || cargo_test(&test_args)),
        },
        Step {
            // The target's tests ran above with one reactor per core; the data path must
            // hold with a single reactor too (issue 15), so they run again with one.
            name: "tgt tests with one reactor",
            run: Box::new(move || {
                if !one_reactor_args.is_empty() {
                    return Ok(Outcome::Skipped(
                        "test arguments given: only the main test step runs".into(),
                    ));
                }
                util::run(
                    "TGT_CORES=1 cargo test -p tgt --test it",
                    util::cargo()
                        .env("TGT_CORES", "1")
                        .args(["test", "-p", "tgt", "--test", "it"]),
                )
                .map(|_| Outcome::Passed)
            }),
        },
        Step {
            name: "blobcli end-to-end",
            run: Box::new(blobcli_e2e),
        },
    ];
    let total = steps.len();
    let t0 = Instant::now();
    let mut summary = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        eprintln!("\n==> xtask test [{}/{total}] {}", i + 1, step.name);
        let t = Instant::now();
        match (step.run)() {
            Ok(Outcome::Passed) => {
                summary.push(format!("  ok       {} ({:.0?})", step.name, t.elapsed()));
            }
            Ok(Outcome::Skipped(why)) => {
                eprintln!("==> skipped: {why}");
                summary.push(format!("  skipped  {} ({why})", step.name));
            }
            Err(e) => {
                eprintln!(
                    "\nxtask test: step {}/{total} `{}` FAILED: {e:#}",
                    i + 1,
                    step.name
                );
                for s in &summary {
                    eprintln!("{s}");
                }
                eprintln!("  FAILED   {}", step.name);
                bail!("step `{}` failed", step.name);
            }
        }
    }
    eprintln!("\nxtask test: all steps passed in {:.0?}", t0.elapsed());
    for s in &summary {
        eprintln!("{s}");
    }
    Ok(())
}

/// Test counts summed over every test binary of a run.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Counts {
    /// Adds a libtest summary line (`test result: ok. 5 passed; 0 failed; 1 ignored; ...`);
    /// other lines are ignored.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// `cargo test --workspace --no-fail-fast`, with its output passed through and counted. Tests
/// that could not run record themselves in a skip log (`test_support::skip`); they are counted
/// as skipped, not passed, and under CI (`CI` set) any skip fails the step.
fn cargo_test(test_args: &[String]) -> Result<Outcome> {
    use std::io::{BufRead, BufReader};
    let skip_log = util::target_dir().join("test-skips.log");
    std::fs::create_dir_all(util::target_dir())?;
    std::fs::write(&skip_log, b"")?;
    let mut c = util::cargo();
    // Run every test binary even after a failure, so one report lists them all.
    c.args(["test", "--workspace", "--no-fail-fast"]);
    c.env("SPDK_RS_SKIP_LOG", &skip_log);
    if !test_args.is_empty() {
        c.arg("--").args(test_args);
    }
    eprintln!("$ {}", util::show(&c));
    let mut child = c.stdout(std::process::Stdio::piped()).spawn()?;
    let mut counts = Counts::default();
    let stdout = child.stdout.take().expect("piped above");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        counts.add_line(&line);
    }
    let status = child.wait()?;
    let skips: Vec<String> = std::fs::read_to_string(&skip_log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    // A test that skipped returned early, so libtest counted it as passed.
    let skipped = skips.len() as u64 + counts.ignored;
    let passed = counts.passed.saturating_sub(skips.len() as u64);
    for s in &skips {
        eprintln!("skipped: {}", s.replace('\t', ": "));
    }
    println!(
        "{passed} passed, {} failed, {skipped} skipped",
        counts.failed
    );
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if skipped > 0 && std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        bail!("{skipped} tests skipped under CI (every test must run here)");
    }
    Ok(Outcome::Passed)
}

/// The blobcli scenario (SPDK-written stores with snapshots, clones and esnap clones reloaded
/// and compared; a new store created, reloaded and compared) in a temp dir; see `e2e.rs`.
fn blobcli_e2e() -> Result<Outcome> {
    Ok(match crate::e2e::run()? {
        None => Outcome::Passed,
        Some(why) => Outcome::Skipped(why),
    })
}

#[cfg(test)]
mod tests {
    use super::Counts;

    #[test]
    fn counts_sum_libtest_summaries() {
        let mut c = Counts::default();
        c.add_line("test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        c.add_line(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        c.add_line("running 4 tests");
        c.add_line("test foo ... ok");
        assert_eq!(
            c,
            Counts {
                passed: 8,
                failed: 2,
                ignored: 1
            }
        );
    }
}
