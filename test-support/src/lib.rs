//! Test support: finds the SPDK-written fixtures in the repository (`tests/fixtures/spdk`),
//! decompresses them into temp dirs (never writing in the repository), reads manifests and
//! hashes data; records skips; runs tests under timeouts. With the features `bdev` and `lvol`
//! it is also the shared harness of the integration tests (`tests/it/` of each crate):
//! registry, malloc/aio/error bdevs, blobs, lvol module and stores, byte-offset I/O, the one data
//! pattern, and `rpc!`/`rpc_err!` for in-process JSON-RPC calls; `tgt` starts the target
//! binary as a JSON-RPC peer. `use
//! test_support::prelude::*` brings all of it.
//! Used only by tests, benches and xtask; no production crate depends on it.

pub mod alloc;
#[cfg(feature = "bdev")]
pub mod bdev;
#[cfg(feature = "blob")]
pub mod blob;
#[cfg(feature = "lvol")]
pub mod lvol;
#[cfg(feature = "bdev")]
pub mod rpc;
pub mod tgt;
pub mod timeout;

/// Everything a test usually needs, for `use test_support::prelude::*`.
pub mod prelude {
    pub use crate::assert_errno;
    #[cfg(feature = "bdev")]
    pub use crate::assert_rpc_err;
    #[cfg(feature = "bdev")]
    pub use crate::bdev::*;
    #[cfg(feature = "blob")]
    pub use crate::blob::*;
    #[cfg(feature = "lvol")]
    pub use crate::lvol::*;
    pub use crate::timeout::{block_within, wait_until, with_timeout, within};
    #[cfg(feature = "bdev")]
    pub use crate::{rpc, rpc_err};
}

/// `assert_errno!(result, errno)`: `result` is an `Err` whose `errno()` is `errno` (for any
/// error type with an `errno()` method, as the bdev, blobstore and lvol errors have).
#[macro_export]
macro_rules! assert_errno {
    ($result:expr, $errno:expr $(,)?) => {
        match $result {
            Ok(_) => panic!(
                "`{}`: succeeded, expected errno {}",
                stringify!($result),
                $errno
            ),
            Err(e) => assert_eq!(e.errno(), $errno, "`{}`: {}", stringify!($result), e),
        }
    };
}

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(1)
        .expect("crate sits one level below the workspace root")
        .to_path_buf()
}

/// The SPDK-written fixtures: `$SPDK_RS_FIXTURES` if set, else `<workspace>/tests/fixtures/spdk`
/// (see the README there for how each was made).
pub fn spdk_fixtures_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SPDK_RS_FIXTURES") {
        return PathBuf::from(p);
    }
    workspace_root().join("tests").join("fixtures").join("spdk")
}

/// `tests/fixtures/spdk/<rel>`.
pub fn spdk_fixture(rel: &str) -> PathBuf {
    spdk_fixtures_dir().join(rel)
}

/// Reads `tests/fixtures/spdk/<dir>/MANIFEST.json`.
pub fn manifest(dir: &str) -> serde_json::Value {
    let p = spdk_fixture(dir).join("MANIFEST.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", p.display()))
}

/// Decompresses `tests/fixtures/spdk/<rel>` (a `.gz` file) into `dest_dir`, keeping holes
/// sparse, and returns the path of the decompressed file (the name without `.gz`).
pub fn gunzip_fixture(rel: &str, dest_dir: &Path) -> io::Result<PathBuf> {
    let src = spdk_fixture(rel);
    let name = src
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".gz").to_string())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad fixture name"))?;
    let dest = dest_dir.join(name);
    let mut dec = flate2::read::GzDecoder::new(File::open(&src)?);
    let mut out = File::create(&dest)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = dec.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if chunk.iter().all(|&b| b == 0) {
            // Leave a hole: seek instead of writing zeroes.
            use std::io::Seek;
            out.seek(io::SeekFrom::Current(n as i64))?;
        } else {
            out.write_all(chunk)?;
        }
        len += n as u64;
    }
    out.set_len(len)?;
    Ok(dest)
}

/// Decompresses a fixture into a new temp dir; returns the dir (keep it alive) and the path.
pub fn fixture_copy(rel: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = gunzip_fixture(rel, dir.path()).unwrap_or_else(|e| panic!("gunzip {rel}: {e}"));
    (dir, p)
}

/// Lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The deterministic pattern of `tests/fixtures/spdk/gen_pattern.py`: the 4096-byte block that
/// tag `tag` puts at absolute block index `block`.
pub fn pattern_block(tag: &str, block: u64) -> Vec<u8> {
    let mut hdr = format!("TAG={tag} blk={block:010}").into_bytes();
    hdr.resize(63, b'.');
    hdr.push(b'\n');
    let t: u64 = tag.bytes().map(u64::from).sum();
    let mut out = hdr;
    out.extend((0..(4096 - 64) as u64).map(|j| ((block * 31 + j * 7 + t) % 251) as u8));
    out
}

/// The environment variable naming the file where skipped tests are recorded (set by
/// `cargo xtask test`, which counts and reports them).
pub const SKIP_LOG_ENV: &str = "SPDK_RS_SKIP_LOG";

/// Records that `test` cannot run here because of `why`, and returns (the caller then returns
/// early). Under CI (`CI` set) it panics instead, so a missing tool fails the run rather than
/// passing it silently. Elsewhere the skip is appended to `$SPDK_RS_SKIP_LOG`, so that `cargo
/// xtask test` counts it as skipped, not passed; and it is printed.
pub fn skip(test: &str, why: &str) {
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    let log = std::env::var_os(SKIP_LOG_ENV).map(PathBuf::from);
    if let Err(msg) = record_skip(test, why, ci, log.as_deref()) {
        panic!("{msg}");
    }
}

/// [`skip`] without the environment: `Err` (the panic message) under CI, else the skip is
/// printed and appended to `log`.
fn record_skip(test: &str, why: &str, ci: bool, log: Option<&Path>) -> Result<(), String> {
    if ci {
        return Err(format!("{test}: cannot run under CI: {why}"));
    }
    eprintln!("{test}: SKIPPED: {why}");
    if let Some(log) = log {
        let line = format!("{test}\t{}\n", why.replace('\n', " "));
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
    Ok(())
}

/// True when every program in `tools` answers `--version` (or `-V`); otherwise records a skip
/// of `test` through [`skip`] and returns false.
pub fn require_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !tool_runs(t)).collect();
    if missing.is_empty() {
        return true;
    }
    skip(
        test,
        &format!("needs {} (not installed)", missing.join(", ")),
    );
    false
}

fn tool_runs(tool: &str) -> bool {
    ["--version", "-V"].iter().any(|arg| {
        std::process::Command::new(tool)
            .arg(arg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures_are_found_and_decompress() {
        let m = manifest("esnap");
        let want = m["files"]["esnap.img"]["sha256_uncompressed"]
            .as_str()
            .unwrap()
            .to_string();
        let (_d, p) = fixture_copy("esnap/esnap.img.gz");
        let data = std::fs::read(&p).unwrap();
        assert_eq!(sha256_hex(&data), want);
        // esnap.img is ESNAP blocks 0..4095.
        assert_eq!(&data[..4096], &pattern_block("ESNAP", 0)[..]);
        assert_eq!(&data[4096 * 77..4096 * 78], &pattern_block("ESNAP", 77)[..]);
    }

    #[test]
    fn a_skip_fails_under_ci_and_is_logged_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("skips.log");
        let err = super::record_skip("t1", "needs x", true, Some(&log)).unwrap_err();
        assert!(err.contains("t1") && err.contains("needs x"), "{err}");
        assert!(!log.exists(), "a CI failure is not logged as a skip");
        super::record_skip("t2", "needs y\nand z", false, Some(&log)).unwrap();
        super::record_skip("t3", "needs w", false, Some(&log)).unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text, "t2\tneeds y and z\nt3\tneeds w\n");
    }

    struct E(i32);
    impl E {
        fn errno(&self) -> i32 {
            self.0
        }
    }
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error {}", self.0)
        }
    }

    #[test]
    fn assert_errno_checks_the_errno_and_fails_on_ok() {
        assert_errno!(Err::<(), _>(E(5)), 5);
        assert!(std::panic::catch_unwind(|| assert_errno!(Err::<(), _>(E(5)), 6)).is_err());
        assert!(std::panic::catch_unwind(|| assert_errno!(Ok::<(), E>(()), 5)).is_err());
    }

    #[test]
    fn require_tools_finds_a_real_tool_and_not_a_missing_one() {
        assert!(super::tool_runs("cargo"));
        assert!(!super::tool_runs("no-such-tool-spdk-rs"));
    }
}
