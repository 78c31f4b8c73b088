//! The allocator: the three masks (md pages, clusters, blob ids), the stale-cluster map,
//! claims and releases of clusters and md pages, and the scrubbing of stale clusters. It has
//! its own lock ([`Allocator::lock`], a std mutex never held across an await), so claims
//! on the data path never wait for metadata I/O.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

use crate::barrier::Barrier;
use crate::error::enospc;
use crate::format::{Bitmap, PAGE};
use crate::store::{io_err, StoreInner};
use crate::{BsError, ClearMethod, Result};

/// What the allocator tracks.
pub(crate) struct AllocState {
    pub total_clusters: u64,
    pub used_pages: Bitmap,
    pub used_clusters: Bitmap,
    pub used_blobids: Bitmap,
    /// Clusters that may still hold bytes of an earlier owner (released without clearing,
    /// never cleared since init, or free after a load). A thick claim zeroes them first.
    pub stale: Bitmap,
    /// Md pages freed right after a zeroing that no flush has covered yet. On a shadowed
    /// device such a page must not become a root before that zeroing is durable: a torn
    /// zeroing leaves a bad CRC at the root's place, which recovery would "restore" from the
    /// new root's shadow although nothing it points at was flushed.
    pub zeroing: BTreeSet<u32>,
}

/// The allocator's state behind its own lock.
pub(crate) struct Allocator {
    st: Mutex<AllocState>,
}

impl Allocator {
    /// An allocator over masks read at load (or made at init).
    pub(crate) fn new(
        total_clusters: u64,
        used_pages: Bitmap,
        used_clusters: Bitmap,
        used_blobids: Bitmap,
        stale: Bitmap,
    ) -> Allocator {
        Allocator {
            st: Mutex::new(AllocState {
                total_clusters,
                used_pages,
                used_clusters,
                used_blobids,
                stale,
                zeroing: BTreeSet::new(),
            }),
        }
    }

    /// The allocator's state (never held across an await).
    pub(crate) fn lock(&self) -> MutexGuard<'_, AllocState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StoreInner {
    /// Claims the root page of a new blob. On a shadowed device, a page whose zeroing is not
    /// durable yet is first made so (see [`StoreState::zeroing`]).
    pub(crate) async fn alloc_root_page(&self) -> Result<u32> {
        let p = self.alloc_md_page()?;
        if self.shadowed && self.alloc.lock().zeroing.contains(&p) {
            if let Err(e) = self.barrier(Barrier::PreCommit).await {
                self.free_md_page(p);
                return Err(e);
            }
        }
        Ok(p)
    }

    pub(crate) fn alloc_md_page(&self) -> Result<u32> {
        self.alloc_md_page_from(0)
    }

    /// Claims the lowest free md page at or after `min`. Extent pages start at 1: an extent
    /// table entry of 0 means "no extent page", so page 0 (free once blob 0x100000000 is
    /// deleted) must never hold one.
    pub(crate) fn alloc_md_page_from(&self, min: u64) -> Result<u32> {
        let mut st = self.alloc.lock();
        let p = st
            .used_pages
            .first_clear(min)
            .ok_or_else(|| enospc("no free metadata page (the store is out of metadata space)"))?;
        st.used_pages.set(p);
        Ok(p as u32)
    }

    pub(crate) fn free_md_page(&self, p: u32) {
        self.alloc.lock().used_pages.clear(u64::from(p));
    }

    /// Claims the lowest free cluster.
    pub(crate) fn claim_cluster(&self) -> Result<u32> {
        let mut st = self.alloc.lock();
        let c = st
            .used_clusters
            .first_clear(self.geo.md_clusters)
            .ok_or_else(|| enospc("no free cluster"))?;
        st.used_clusters.set(c);
        Ok(c as u32)
    }

    /// Claims `n` clusters or none.
    pub(crate) fn claim_clusters(&self, n: u64) -> Result<Vec<u32>> {
        let mut st = self.alloc.lock();
        let free = st.total_clusters - st.used_clusters.count_ones();
        if n > free {
            return Err(enospc(format!("{n} clusters needed, {free} free")));
        }
        let mut out = Vec::new();
        out.try_reserve(n as usize)
            .map_err(|_| BsError::NoMemory(format!("{n} clusters to claim")))?;
        let mut from = self.geo.md_clusters;
        for _ in 0..n {
            let c = st
                .used_clusters
                .first_clear(from)
                .ok_or_else(|| enospc("no free cluster"))?;
            st.used_clusters.set(c);
            out.push(c as u32);
            from = c + 1;
        }
        Ok(out)
    }

    /// Gives back claimed clusters that may have been written (a failed operation): they
    /// count as stale until cleared.
    pub(crate) fn unclaim_clusters(&self, cs: &[u32]) {
        let mut st = self.alloc.lock();
        for &c in cs {
            if u64::from(c) >= self.geo.md_clusters {
                st.used_clusters.clear(u64::from(c));
                st.stale.set(u64::from(c));
            }
        }
    }

    /// Clears (per the clear method) and frees clusters. A cluster counts as cleared only
    /// when the device guarantees it reads zeroes now: a completed write_zeroes, or a
    /// completed unmap on a device whose unmap zeroes. Any other cluster stays stale and is
    /// scrubbed before a thick claim.
    pub(crate) async fn release_clusters(&self, cs: &[u32], method: ClearMethod) {
        let unmap_zeroes = self.dev.unmap_zeroes();
        for &c in cs {
            if c == 0 {
                continue;
            }
            let lba = u64::from(c) * self.geo.lba_per_cluster;
            let n = self.geo.lba_per_cluster;
            let r = match method {
                ClearMethod::None => Err(None),
                ClearMethod::WriteZeroes => self.dev.write_zeroes(lba, n).await.map_err(Some),
                ClearMethod::Default | ClearMethod::Unmap => {
                    self.dev.unmap(lba, n).await.map_err(Some)
                }
            };
            self.note_write();
            if let Err(Some(e)) = &r {
                tracing::debug!(target: "blob", "clearing cluster {c} failed: {e}");
            }
            let cleared = r.is_ok() && (method == ClearMethod::WriteZeroes || unmap_zeroes);
            let mut st = self.alloc.lock();
            if u64::from(c) >= self.geo.md_clusters {
                st.used_clusters.clear(u64::from(c));
                if cleared {
                    st.stale.clear(u64::from(c));
                } else {
                    st.stale.set(u64::from(c));
                }
            }
        }
    }

    /// Zeroes the stale clusters among `cs` (just claimed for a thick blob), so that the part
    /// of a new cluster the user has not written never shows an earlier owner's bytes.
    pub(crate) async fn scrub_clusters(&self, cs: &[u32]) -> Result<()> {
        let stale: Vec<u64> = {
            let st = self.alloc.lock();
            cs.iter()
                .map(|&c| u64::from(c))
                .filter(|&c| c != 0 && st.stale.get(c))
                .collect()
        };
        let lpc = self.geo.lba_per_cluster;
        let mut i = 0;
        while i < stale.len() {
            let mut j = i + 1;
            while j < stale.len() && stale[j] == stale[j - 1] + 1 {
                j += 1;
            }
            let r = self
                .dev
                .write_zeroes(stale[i] * lpc, (j - i) as u64 * lpc)
                .await;
            self.note_write();
            r.map_err(io_err)?;
            let mut st = self.alloc.lock();
            for &c in &stale[i..j] {
                st.stale.clear(c);
            }
            drop(st);
            i = j;
        }
        Ok(())
    }

    /// Zeroes then frees md pages (old chain pages, released extent pages).
    pub(crate) async fn release_md_pages(&self, pages: &[u32]) {
        let zero = vec![0u8; PAGE];
        for &p in pages {
            if p == 0 || p >= self.geo.md_len {
                continue;
            }
            if let Err(e) = self.write_md_page(p, &zero).await {
                tracing::debug!(target: "blob", "zeroing md page {p} failed: {e}");
                // Keep it claimed: an unzeroed page must not be reused while we are unsure.
                continue;
            }
            self.free_md_page(p);
            self.alloc.lock().zeroing.insert(p);
        }
    }

    pub(crate) fn free_clusters(&self) -> u64 {
        let st = self.alloc.lock();
        st.total_clusters - st.used_clusters.count_ones()
    }
}
