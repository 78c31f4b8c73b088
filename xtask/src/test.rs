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

/// Runs fmt, clippy, the workspace tests (with the arguments after `--`, if any) and the
/// blobcli end-to-end scenario; stops at the first failing step and names it.
pub fn run(args: &[String]) -> Result<()> {
    let test_args: Vec<String> = match args.split_first() {
        None => Vec::new(),
        Some((first, rest)) if first == "--" => rest.to_vec(),
        Some((first, _)) => bail!("test: unexpected argument {first:?} (use `test -- ARGS`)"),
    };
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
            run: Box::new(move || {
                let mut c = util::cargo();
                // Run every test binary even after a failure, so one report lists them all.
                c.args(["test", "--workspace", "--no-fail-fast"]);
                if !test_args.is_empty() {
                    c.arg("--").args(&test_args);
                }
                util::run("cargo test", &mut c).map(|_| Outcome::Passed)
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

/// The blobcli scenario (SPDK-written stores with snapshots, clones and esnap clones reloaded
/// and compared; a new store created, reloaded and compared) in a temp dir; see `e2e.rs`.
fn blobcli_e2e() -> Result<Outcome> {
    Ok(match crate::e2e::run()? {
        None => Outcome::Passed,
        Some(why) => Outcome::Skipped(why),
    })
}
