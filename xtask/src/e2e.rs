//! The blobcli end-to-end scenario of `cargo xtask test`, run against the built binary in a
//! temporary directory:
//!
//! 1. stores written by SPDK (`tests/fixtures/spdk/{basic,esnap}`: thick and thin lvols,
//!    a snapshot, a clone, esnap clones and a snapshot of an esnap clone) are loaded by a fresh
//!    process, listed, and every lvol is dumped through its whole chain and compared with the
//!    sha256 SPDK recorded. The esnap store's external snapshot is reached through a read-only
//!    bdev (`bdev_ro_create`) that carries the esnap's UUID;
//! 2. a new store is created, a blob filled, and a second process reloads it and compares.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::util;

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir> {
        let p = util::target_dir().join(format!("xtask-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `$SPDK_RS_FIXTURES` or `<root>/tests/fixtures/spdk` (the SPDK-written stores, in the repo).
fn fixtures_dir() -> PathBuf {
    std::env::var_os("SPDK_RS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            util::project_root()
                .join("tests")
                .join("fixtures")
                .join("spdk")
        })
}

/// Whether blobcli is still the workspace skeleton's placeholder (then the step is skipped).
fn blobcli_is_placeholder() -> bool {
    let main = util::project_root().join("blobcli/src/main.rs");
    std::fs::read_to_string(main)
        .map(|s| s.contains("(to be written)"))
        .unwrap_or(true)
}

/// Whether the built blobcli answers `-h` with its usage text.
fn blobcli_ready(bin: &Path) -> bool {
    Command::new(bin)
        .arg("-h")
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            text.contains("Usage: blobcli")
        })
        .unwrap_or(false)
}

/// Builds blobcli and runs the scenario. `Ok(None)` = passed, `Ok(Some(reason))` = skipped.
pub fn run() -> Result<Option<String>> {
    if blobcli_is_placeholder() {
        return Ok(Some("blobcli is still the skeleton's placeholder".into()));
    }
    util::run(
        "build blobcli",
        util::cargo().args(["build", "-p", "blobcli"]),
    )?;
    let bin = util::target_dir().join("debug").join("blobcli");
    if !blobcli_ready(&bin) {
        bail!("`{} -h` prints no usage text", bin.display());
    }
    let fixtures = fixtures_dir();
    if !fixtures.join("esnap").join("MANIFEST.json").is_file() {
        bail!(
            "SPDK fixtures not found at {} (tests/fixtures/spdk in the repository, or set SPDK_RS_FIXTURES)",
            fixtures.display()
        );
    }
    let tmp = TempDir::new("e2e")?;
    fixture_store(&bin, &fixtures, "basic", tmp.0.as_path())?;
    fixture_store(&bin, &fixtures, "esnap", tmp.0.as_path())?;
    create_reload_compare(&bin, tmp.0.as_path())?;
    Ok(None)
}

fn gunzip(src: &Path, dest: &Path) -> Result<()> {
    let mut dec = flate2::read::GzDecoder::new(
        File::open(src).with_context(|| format!("open {}", src.display()))?,
    );
    let mut out = File::create(dest).with_context(|| format!("create {}", dest.display()))?;
    std::io::copy(&mut dec, &mut out).with_context(|| format!("gunzip {}", src.display()))?;
    Ok(())
}

fn sha256_file(p: &Path) -> Result<String> {
    let mut f = File::open(p).with_context(|| format!("open {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Runs blobcli in `dir`; returns stdout; fails (showing the output) on a bad exit.
fn blobcli(bin: &Path, dir: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(bin);
    cmd.args(args).current_dir(dir);
    let shown = util::show(&cmd);
    eprintln!("$ {shown}");
    let out = cmd.output().with_context(|| format!("start {shown}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Loads an SPDK-written store, lists its lvols and dumps each one, comparing with SPDK's hash.
fn fixture_store(bin: &Path, fixtures: &Path, name: &str, tmp: &Path) -> Result<()> {
    eprintln!("==> e2e: SPDK store `{name}`: reload, list, dump every lvol, compare");
    let src = fixtures.join(name);
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir)?;
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(src.join("MANIFEST.json")).context("read MANIFEST.json")?,
    )
    .context("parse MANIFEST.json")?;
    let files = manifest["files"]
        .as_object()
        .ok_or_else(|| anyhow!("{name}: MANIFEST has no files"))?;
    for (file, info) in files {
        let gz = info["gz"].as_str().unwrap_or(file.as_str());
        gunzip(&src.join(gz), &dir.join(file))?;
    }
    let mut bdevs = vec![json!({"method": "bdev_aio_create",
        "params": {"name": "store", "filename": dir.join("store.img"), "block_size": 4096}})];
    let esnap_uuid = manifest["external_snapshot"]["bdev_uuid"].as_str();
    if let Some(uuid) = esnap_uuid {
        // The esnap file under another UUID, and a read-only view of it carrying the UUID the
        // clones recorded: the clones must find their base through the read-only bdev.
        bdevs.push(json!({"method": "bdev_aio_create",
            "params": {"name": "esnap_file", "filename": dir.join("esnap.img"),
                       "block_size": 4096, "readonly": true}}));
        bdevs.push(json!({"method": "bdev_ro_create",
            "params": {"name": "esnap_ro", "base_bdev_name": "esnap_file", "uuid": uuid}}));
    }
    let conf = json!({"subsystems": [{"subsystem": "bdev", "config": bdevs}]});
    let conf_path = dir.join("conf.json");
    std::fs::write(&conf_path, serde_json::to_string_pretty(&conf)?)?;
    let conf_s = conf_path.display().to_string();

    let listing = blobcli(bin, &dir, &["-j", &conf_s, "-b", "store", "-l", "lvols"])?;
    let lvols = manifest["lvols"]
        .as_array()
        .ok_or_else(|| anyhow!("{name}: MANIFEST has no lvols"))?;
    for lvol in lvols {
        let alias = lvol["alias"]
            .as_str()
            .ok_or_else(|| anyhow!("{name}: lvol without alias"))?;
        let line = listing
            .lines()
            .find(|l| l.split_whitespace().next() == Some(alias))
            .ok_or_else(|| anyhow!("`-l lvols` does not list {alias}:\n{listing}"))?;
        if let Some(uuid) = lvol["uuid"].as_str() {
            if !line.contains(uuid) {
                bail!("`-l lvols` shows {alias} without its uuid {uuid}: {line}");
            }
        }
        if lvol["external_snapshot_name"].is_string() && !line.contains("(present)") {
            bail!("esnap base of {alias} not found through the read-only bdev: {line}");
        }
        let want = lvol["sha256"]
            .as_str()
            .ok_or_else(|| anyhow!("{alias}: no sha256 in MANIFEST"))?;
        let out = dir.join(format!("{}.bin", alias.replace('/', "_")));
        let out_s = out.display().to_string();
        let text = blobcli(
            bin,
            &dir,
            &["-j", &conf_s, "-b", "store", "-d", alias, &out_s],
        )?;
        if !text.contains("File write complete") {
            bail!("dump of {alias} did not complete:\n{text}");
        }
        let got = sha256_file(&out)?;
        if got != want {
            bail!("{alias}: content sha256 {got}, SPDK read {want}");
        }
        let _ = std::fs::remove_file(&out);
        eprintln!("    {alias}: sha256 matches SPDK");
    }
    Ok(())
}

/// A new store on an image file: init, create and fill a blob, set an xattr; then another
/// process reloads it and dumps the blob.
fn create_reload_compare(bin: &Path, tmp: &Path) -> Result<()> {
    eprintln!("==> e2e: new store: create and fill a blob, reload in a new process, compare");
    let dir = tmp.join("new");
    std::fs::create_dir_all(&dir)?;
    let img = dir.join("new.img");
    File::create(&img)?.set_len(64 << 20)?;
    let img_s = img.display().to_string();
    let script = dir.join("make.bs");
    let mut f = File::create(&script)?;
    writeln!(f, "-i")?;
    writeln!(f, "-n 2")?;
    writeln!(f, "-f $B0 0x5a")?;
    writeln!(f, "-x $B0 owner xtask")?;
    drop(f);
    let script_s = script.display().to_string();
    let made = blobcli(
        bin,
        &dir,
        &["--image", &img_s, "-b", "new0", "-T", &script_s],
    )?;
    for want in [
        "blobstore init'd",
        "New blob id 0x",
        "Blob fill complete",
        "Xattr has been set",
    ] {
        if !made.contains(want) {
            bail!("creating the store: no `{want}` in:\n{made}");
        }
    }
    let listing = blobcli(bin, &dir, &["--image", &img_s, "-b", "new0", "-l", "blobs"])?;
    let ids: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Found blob with ID# "))
        .collect();
    let [id] = ids.as_slice() else {
        bail!("expected one blob after reload, got {ids:?}:\n{listing}");
    };
    let out = dir.join("blob.bin");
    let out_s = out.display().to_string();
    blobcli(
        bin,
        &dir,
        &["--image", &img_s, "-b", "new0", "-d", id, &out_s],
    )?;
    let data = std::fs::read(&out)?;
    if data.len() != 2 << 20 || data.iter().any(|&b| b != 0x5a) {
        bail!(
            "reloaded blob {id}: {} bytes, expected 2 MiB of 0x5a",
            data.len()
        );
    }
    let shown = blobcli(bin, &dir, &["--image", &img_s, "-b", "new0", "-s", id])?;
    if !shown.contains("owner") {
        bail!("reloaded blob {id} lost its xattr:\n{shown}");
    }
    eprintln!("    blob {id}: 2 MiB of 0x5a and its xattr survived the reload");
    Ok(())
}
