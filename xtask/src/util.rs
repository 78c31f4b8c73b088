//! Process helpers: the workspace root, `$CARGO`, running steps, finding and installing tools.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The workspace root (the parent of this crate's directory).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits one level below the workspace root")
        .to_path_buf()
}

/// A `cargo` command (the one that runs us, from `$CARGO`) in the workspace root.
pub fn cargo() -> Command {
    let bin = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(bin);
    c.current_dir(project_root());
    c
}

/// The target directory (`$CARGO_TARGET_DIR` or `<root>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let p = PathBuf::from(d);
            if p.is_absolute() {
                p
            } else {
                project_root().join(p)
            }
        }
        None => project_root().join("target"),
    }
}

/// Shows a command the way a shell would print it.
pub fn show(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            s.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command with inherited stdio; an unsuccessful exit is an error naming `what`.
pub fn run(what: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {}", show(cmd)))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout (stderr passes through); fails on a bad exit.
pub fn output(what: &str, cmd: &mut Command) -> Result<String> {
    eprintln!("$ {}", show(cmd));
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("{what}: cannot start {}", show(cmd)))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("{what} failed ({}):\n{stdout}", out.status);
    }
    Ok(stdout)
}

/// Finds an executable on `$PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Whether we run as root (then we may install packages).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Finds `program`, or installs Debian package `package` with apt-get when we are root.
/// Returns `None` (after saying why) when the tool stays unavailable.
pub fn find_or_install(program: &str, package: &str) -> Option<PathBuf> {
    if let Some(p) = which(program) {
        return Some(p);
    }
    if !is_root() || which("apt-get").is_none() {
        eprintln!(
            "note: {program} not found and cannot install {package} (not root or no apt-get)"
        );
        return None;
    }
    eprintln!("note: {program} not found; installing {package}");
    let install = |update: bool| {
        if update {
            let _ = quiet_status(Command::new("apt-get").arg("update"));
        }
        quiet_status(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", package])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if !install(false) && !install(true) {
        eprintln!("note: apt-get install {package} failed");
    }
    let found = which(program);
    if found.is_none() {
        eprintln!("note: {program} still not available");
    }
    found
}

fn quiet_status(cmd: &mut Command) -> bool {
    eprintln!("$ {}", show(cmd));
    cmd.stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The first line of `program --version`, for reports.
pub fn version_of(program: impl AsRef<OsStr>) -> Option<String> {
    let out = Command::new(program).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

#[cfg(test)]
/// The library and binary crates of the workspace: every top-level folder with a
/// `Cargo.toml` except `xtask` itself and `fuzz` (not a workspace member).
pub fn crate_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(project_root())
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.retain(|p| {
        p.join("Cargo.toml").is_file()
            && !p
                .file_name()
                .is_some_and(|n| n == "xtask" || n == "fuzz" || n == "target")
    });
    dirs.sort();
    dirs
}
