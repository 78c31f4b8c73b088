//! Shallow copy (`bdev_lvol_start_shallow_copy`): copies a read-only lvol's allocated
//! clusters onto another bdev in the background, with progress kept by operation id.

use super::*;

/// State of a shallow copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShallowCopyState {
    /// Running.
    InProgress,
    /// Done.
    Complete,
    /// Failed; the errno is in [`ShallowCopyStatus::error`].
    Error,
}

impl ShallowCopyState {
    /// SPDK's text.
    pub fn as_str(self) -> &'static str {
        match self {
            ShallowCopyState::InProgress => "in progress",
            ShallowCopyState::Complete => "complete",
            ShallowCopyState::Error => "error",
        }
    }
}

/// Progress of a shallow copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShallowCopyStatus {
    /// Clusters copied so far.
    pub copied_clusters: u64,
    /// Clusters to copy (the source's allocated clusters).
    pub total_clusters: u64,
    /// State.
    pub state: ShallowCopyState,
    /// errno of a failed copy.
    pub error: Option<i32>,
}

impl LvolModule {
    /// Starts copying the allocated clusters of a read-only lvol onto a bdev; returns the
    /// operation id (from 1).
    pub fn start_shallow_copy(&self, lvol: &Arc<Lvol>, dst_bdev: &str) -> Result<u32> {
        let store = lvol.require_store()?;
        let desc = self.0.registry.open(dst_bdev, true)?;
        desc.claim(ClaimType::ReadManyWriteOne)?;
        let dst = Arc::new(BdevBsDev::new(desc));
        let op = self.0.next_op.fetch_add(1, Ordering::SeqCst);
        let total = lvol.num_allocated_clusters();
        lock(&self.0.shallow).insert(
            op,
            ShallowCopyStatus {
                copied_clusters: 0,
                total_clusters: total,
                state: ShallowCopyState::InProgress,
                error: None,
            },
        );
        let inner = Arc::downgrade(&self.0);
        let lvol = lvol.clone();
        self.0.registry.spawn(Box::pin(async move {
            let progress_inner = inner.clone();
            let progress = move |n: u64| {
                if let Some(m) = progress_inner.upgrade() {
                    if let Some(s) = lock(&m.shallow).get_mut(&op) {
                        s.copied_clusters = n;
                    }
                }
            };
            let res = if !lvol.is_read_only() {
                Err(libc::EPERM)
            } else {
                store
                    .bs
                    .shallow_copy(lvol.blob_id, dst.clone(), &progress)
                    .await
                    .map_err(|e| e.errno())
            };
            dst.close();
            if let Some(m) = inner.upgrade() {
                if let Some(s) = lock(&m.shallow).get_mut(&op) {
                    match res {
                        Ok(n) => {
                            s.copied_clusters = n;
                            s.state = ShallowCopyState::Complete;
                        }
                        Err(errno) => {
                            s.state = ShallowCopyState::Error;
                            s.error = Some(errno);
                        }
                    }
                }
            }
        }));
        Ok(op)
    }

    /// Status of a shallow copy; a finished (complete or failed) entry is forgotten once
    /// reported. `None` for an unknown id.
    pub fn check_shallow_copy(&self, op: u32) -> Option<ShallowCopyStatus> {
        let mut map = lock(&self.0.shallow);
        let s = map.get(&op)?.clone();
        if s.state != ShallowCopyState::InProgress {
            map.remove(&op);
        }
        Some(s)
    }
}
