//! xtask: the project's automation, run as `cargo xtask <command>` (see `.cargo/config.toml`).
//!
//! Owns the test pipeline (`test`), the benchmarks against peers (`bench`), fuzzing (`fuzz`),
//! long model-based runs (`soak`) and the doc build (`docs`). It runs cargo and the peer tools
//! as processes and depends on no workspace library crate; the benchmark workload generator is
//! the `bench` package, which `bench` builds and runs.

mod bench;
mod e2e;
mod fuzz;
mod soak;
mod test;
#[cfg(test)]
mod tidy;
mod util;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  test [-- ARGS]               fmt check, clippy -D warnings, cargo test --workspace [ARGS],
                               the tgt tests again with TGT_CORES=1 (one reactor), then the
                               blobcli end-to-end scenario
  bench [--quick] [--filter TEXT] [--rounds N] [--cpus LIST] [--data-dir DIR] [--list]
                               run the benchmarks against their peers (fio, qemu-img, qemu-nbd,
                               SPDK bdevperf if SPDK_BDEVPERF is set), every side pinned to
                               CPUS (taskset -c, default the last core), N rounds (default 5,
                               --quick 1) alternating the order, target/bench/<name>.json;
                               --data-dir puts the data files on another file system
  fuzz --time SECS             run every cargo-fuzz target for SECS seconds (needs cargo-fuzz
                               and a nightly toolchain; else replays the corpus via the tests)
  soak --time SECS [--cases N] run the blobstore model-based test with many cases for SECS
  e2e                          only the blobcli end-to-end scenario of `test`
  docs                         cargo doc --workspace --no-deps with RUSTDOCFLAGS=-Dwarnings
";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let cmd = args.next();
    let rest: Vec<String> = args.collect();
    let r = match cmd.as_deref() {
        Some("test") => test::run(&rest),
        Some("bench") => bench::run(&rest),
        Some("fuzz") => fuzz::run(&rest),
        Some("soak") => soak::run(&rest),
        Some("docs") => docs(&rest),
        Some("e2e") => e2e::run().map(|skipped| match skipped {
            None => eprintln!("e2e: passed"),
            Some(why) => eprintln!("e2e: skipped: {why}"),
        }),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(anyhow::anyhow!("unknown command {other:?}\n{USAGE}")),
        None => Err(anyhow::anyhow!("no command given\n{USAGE}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn docs(args: &[String]) -> anyhow::Result<()> {
    if let Some(a) = args.first() {
        anyhow::bail!("docs takes no arguments (got {a:?})");
    }
    util::run(
        "cargo doc",
        util::cargo()
            .args(["doc", "--workspace", "--no-deps"])
            .env("RUSTDOCFLAGS", "-Dwarnings"),
    )
}

/// Returns the value after `flag` in `args`, parsed.
fn flag_value<T: std::str::FromStr>(args: &[String], flag: &str) -> anyhow::Result<Option<T>> {
    match args.iter().position(|a| a == flag) {
        None => Ok(None),
        Some(i) => {
            let v = args
                .get(i + 1)
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
            v.parse::<T>()
                .map(Some)
                .map_err(|_| anyhow::anyhow!("{flag}: bad value {v:?}"))
        }
    }
}

/// Fails on an argument that is neither a known flag nor the value of a known valued flag.
fn check_args(args: &[String], switches: &[&str], valued: &[&str]) -> anyhow::Result<()> {
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if valued.contains(&a) {
            i += 2;
        } else if switches.contains(&a) {
            i += 1;
        } else {
            anyhow::bail!("unexpected argument {a:?}\n{USAGE}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn flag_values_parse_and_complain() {
        assert_eq!(
            flag_value::<u64>(&v("--time 30"), "--time").unwrap(),
            Some(30)
        );
        assert_eq!(flag_value::<u64>(&v("--quick"), "--time").unwrap(), None);
        assert!(flag_value::<u64>(&v("--time"), "--time").is_err());
        assert!(flag_value::<u64>(&v("--time x"), "--time").is_err());
    }

    #[test]
    fn unknown_arguments_are_refused() {
        assert!(check_args(&v("--quick --filter aio"), &["--quick"], &["--filter"]).is_ok());
        assert!(check_args(&v("--quick --bogus"), &["--quick"], &["--filter"]).is_err());
        assert!(check_args(&v("--filter"), &[], &["--filter"]).is_ok());
    }
}
