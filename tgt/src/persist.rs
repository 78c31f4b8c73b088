//! The config of the embedded default that survives a restart.
//!
//! With no arguments, `tgt` keeps `tgt-data/config.json` next to its store: after every
//! client method that succeeded and may have changed state, the document `save_config`
//! gives is built and, when it differs from the file, written atomically (a temp file,
//! fsync, rename over the old one, fsync of the directory). At the next start the file is
//! replayed before the default setup fills in what is missing. A kill or a power cut at any
//! moment leaves the old file or the new one, never a mix: the rename is the commit point,
//! and the temp file is written and made durable before it.
//!
//! `--json` mode and any start with arguments do not use it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::target::Target;

/// The file name, in the data directory.
pub const FILE_NAME: &str = "config.json";
/// The temp file a save writes before renaming it over [`FILE_NAME`].
pub const TEMP_NAME: &str = ".config.json.tmp";

/// The steps of an atomic write, in order (a crash test stops after any of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// The temp file is created and its bytes written.
    Written,
    /// The temp file is fsynced.
    Synced,
    /// The temp file is renamed over the target.
    Renamed,
    /// The directory is fsynced (done).
    DirSynced,
}

/// Writes `bytes` to `path` atomically and durably. `stop_after` ends the write after that
/// step, as a crash there would (tests only).
pub fn write_atomic_steps(
    path: &Path,
    bytes: &[u8],
    stop_after: Option<Step>,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(TEMP_NAME);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    if stop_after == Some(Step::Written) {
        return Ok(());
    }
    f.sync_all()?;
    drop(f);
    if stop_after == Some(Step::Synced) {
        return Ok(());
    }
    std::fs::rename(&tmp, path)?;
    if stop_after == Some(Step::Renamed) {
        return Ok(());
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_steps(path, bytes, None)
}

/// Whether a method can only read: its success changes nothing worth saving. Anything else
/// (including methods we do not know) rebuilds the document, which is written only if it
/// changed.
pub fn read_only_method(m: &str) -> bool {
    m.contains("_get_")
        || m.starts_with("get_")
        || m.ends_with("_get")
        || m.contains("wait")
        || m.contains("check")
        || matches!(
            m,
            "rpc_get_methods" | "spdk_get_version" | "spdk_kill_instance"
        )
}

/// The document `spdk-rpc save_config` writes, built from the target.
pub async fn document(target: &Arc<Target>) -> Result<Value, bdev_core::rpc::RpcError> {
    let mut subs = Vec::new();
    for s in crate::framework::subsystems()
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = s["subsystem"].clone();
        let config = target
            .call("framework_get_config", Some(json!({"name": name})))
            .await?;
        subs.push(json!({"subsystem": name, "config": config}));
    }
    Ok(json!({"subsystems": subs}))
}

/// The persisted config of one target.
pub struct Persist {
    path: PathBuf,
    /// The bytes last written (or read at start); saves are serialised by this lock.
    last: tokio::sync::Mutex<Option<Vec<u8>>>,
}

impl Persist {
    /// The config file in `dir`.
    pub fn new(dir: &Path) -> Arc<Self> {
        Arc::new(Persist {
            path: dir.join(FILE_NAME),
            last: tokio::sync::Mutex::new(None),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replays the saved file, if there is one. Failures are reported and skipped (the
    /// target comes up with what it can); then the old file is kept as `config.json.prev`,
    /// since the next save writes what is live.
    pub async fn replay(&self, target: &Arc<Target>) -> Result<bool, String> {
        let _ = std::fs::remove_file(self.path.with_file_name(TEMP_NAME));
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        let doc: Value =
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let known: Vec<&str> = crate::framework::SUBSYSTEMS.iter().map(|s| s.0).collect();
        let list = bdev_core::config::entries(&doc, &known).map_err(|e| e.to_string())?;
        let mut failed = 0;
        for (method, params) in list {
            if let Err(e) = target.call(&method, params).await {
                failed += 1;
                eprintln!(
                    "tgt: {}: {method} failed: {} ({}); going on",
                    self.path.display(),
                    e.message,
                    e.code
                );
            }
        }
        if failed > 0 {
            let prev = self.path.with_extension("json.prev");
            if let Err(e) = std::fs::copy(&self.path, &prev) {
                eprintln!("tgt: cannot keep {}: {e}", prev.display());
            }
        }
        Ok(true)
    }

    /// Saves the live config if it differs from the last one saved.
    pub async fn save(&self, target: &Arc<Target>) -> Result<(), String> {
        let mut last = self.last.lock().await;
        let doc = document(target).await.map_err(|e| e.to_string())?;
        let mut bytes = serde_json::to_vec_pretty(&doc).map_err(|e| e.to_string())?;
        bytes.push(b'\n');
        if last.as_deref() == Some(bytes.as_slice()) {
            return Ok(());
        }
        // The first save after start skips a write when the file already holds this
        // document; both the read and the write run off the async thread.
        let first = last.is_none();
        let path = self.path.clone();
        let b = bytes.clone();
        tokio::task::spawn_blocking(move || {
            if first && std::fs::read(&path).is_ok_and(|old| old == b) {
                return Ok(());
            }
            write_atomic(&path, &b)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{}: {e}", self.path.display()))?;
        *last = Some(bytes);
        Ok(())
    }

    /// Installs the hook that saves after each client method that may change state.
    pub fn install(self: &Arc<Self>, target: &Arc<Target>) {
        let me = self.clone();
        let weak = Arc::downgrade(target);
        target.set_on_success(Arc::new(move |method: String| {
            let me = me.clone();
            let weak = weak.clone();
            Box::pin(async move {
                if read_only_method(&method) {
                    return;
                }
                let Some(t) = weak.upgrade() else { return };
                if let Err(e) = me.save(&t).await {
                    tracing::error!(target: "tgt::persist", "saving the config failed: {e}");
                }
            })
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crash after any step leaves the old content or the new one, and the reader that a
    /// restart runs (parse, ignore the temp file) sees a whole document.
    #[test]
    fn a_crash_between_any_two_steps_leaves_old_or_new() {
        let old = serde_json::to_vec_pretty(
            &json!({"subsystems": [{"subsystem": "bdev", "config": []}]}),
        )
        .unwrap();
        let new = serde_json::to_vec_pretty(&json!({"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 8, "block_size": 512}}]}]}))
        .unwrap();
        for (stop, expect_new) in [
            (Some(Step::Written), false),
            (Some(Step::Synced), false),
            (Some(Step::Renamed), true),
            (Some(Step::DirSynced), true),
            (None, true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join(FILE_NAME);
            write_atomic(&p, &old).unwrap();
            // A torn temp file from an earlier crash is overwritten, never read.
            std::fs::write(dir.path().join(TEMP_NAME), b"{\"subsys").unwrap();
            write_atomic_steps(&p, &new, stop).unwrap();
            let got = std::fs::read(&p).unwrap();
            let want = if expect_new { &new } else { &old };
            assert_eq!(&got, want, "stopped after {stop:?}");
            assert!(serde_json::from_slice::<Value>(&got).is_ok());
            assert_eq!(
                dir.path().join(TEMP_NAME).exists(),
                matches!(stop, Some(Step::Written | Step::Synced)),
                "{stop:?}"
            );
        }
    }

    #[test]
    fn read_only_methods_are_not_saved_for() {
        for m in [
            "bdev_get_bdevs",
            "bdev_lvol_get_lvols",
            "framework_get_config",
            "bdev_wait_for_examine",
            "bdev_lvol_check_shallow_copy",
            "nbd_get_exports",
            "bdev_get_iostat",
        ] {
            assert!(read_only_method(m), "{m}");
        }
        for m in [
            "bdev_aio_create",
            "nbd_export_add",
            "bdev_ro_create",
            "nbd_server_start",
            "bdev_enable_histogram",
            "bdev_lvol_set_esnap_retry",
        ] {
            assert!(!read_only_method(m), "{m}");
        }
    }
}
