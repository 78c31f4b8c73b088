//! Deferred commit of cluster allocations, and grouped flushes.
//!
//! An allocating write (the first write to a cluster of a thin blob, a clone or an esnap
//! clone) puts its new cluster's data on the device first (no store-wide lock held), then
//! points the blob's in-memory map at the cluster and records the entry as *uncommitted*
//! ([`crate::blob::BlobState::uncommitted`]) — and returns. From then on the cluster is the
//! blob's for every read and write, exactly as a committed one. The map change is written
//! later, at the first of:
//!
//! - a client flush (`Blob::flush`): every uncommitted allocation of the store is committed
//!   ([`StoreInner::commit_all_locked`]: one `PreCommit` flush for the data of all of them,
//!   then the extent-page or root-page writes), then a device flush;
//! - a metadata operation of the blob (sync_md, snapshot, resize, set_parent,
//!   set_external_parent, inflate, decouple, an unmap that releases clusters, the merge into
//!   an open clone on delete, close): its allocations are committed first
//!   ([`StoreInner::commit_blob_locked`]), and any whole-md write of the blob
//!   ([`crate::blob::BlobInner::persist_locked`]) covers the uncommitted entries it holds;
//! - the bound: an allocating write that finds [`PENDING_LIMIT`] uncommitted allocations in
//!   the store commits them all before it adds its own.
//!
//! A commit groups the pending allocations of every blob it covers: one write
//! per extent page touched (in place, covering every allocation in that page, behind one
//! `PreCommit` flush for all of them), or one whole-md commit for a blob whose chunk has no
//! extent page yet. A failed commit changes nothing in memory: the entries stay uncommitted
//! (retried at the next flush) and their clusters stay the blob's (a cluster whose write was
//! acknowledged is never given back). A power cut before the commit loses the map change:
//! the cluster is free after recovery (and stale, so a thick claim scrubs it), and the
//! blob reads what it read before the write.
//!
//! [`FlushGroup`] makes concurrent barriers and client flushes share device flushes: a
//! caller takes a ticket, and a flush that started after the ticket was taken covers it
//! (writes completed before the call are in the device cache when that flush starts).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::blob::BlobInner;
use crate::error::einval;
use crate::format::*;
use crate::store::StoreInner;
use crate::Result;

/// How many uncommitted allocations a store holds: an allocating write that finds this many
/// pending commits them all before it adds its own (so at most this many plus the
/// allocating writes in flight are pending). 1024 clusters is 1 GiB of first writes with the
/// default 1 MiB cluster; the pending state costs a map entry each.
pub const PENDING_LIMIT: usize = 1024;

/// The count of uncommitted allocations of the store (the entries themselves live in their
/// blobs' [`crate::blob::BlobState::uncommitted`]).
#[derive(Default)]
pub(crate) struct Committer {
    pending: AtomicUsize,
}

impl Committer {
    /// Uncommitted allocations of the store.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }
    pub(crate) fn added(&self) {
        self.pending.fetch_add(1, Ordering::SeqCst);
    }
    pub(crate) fn removed(&self, n: usize) {
        if n != 0 {
            self.pending.fetch_sub(n, Ordering::SeqCst);
        }
    }
}

/// One extent page rewritten in place by a commit.
struct PageWrite {
    blob: Arc<BlobInner>,
    page: u32,
    bytes: Vec<u8>,
    shadow: Option<u32>,
    /// The uncommitted entries this page commits.
    entries: Vec<(usize, u32)>,
}

impl StoreInner {
    /// Records the allocation of map entry `idx` of `blob` to cluster `cluster`, whose data
    /// is written: the in-memory map points at it from now on, and its commit is deferred
    /// (module doc). When the store already holds [`PENDING_LIMIT`] pending allocations,
    /// they are all committed first; if that fails, this write fails and its cluster is
    /// given back unmapped (nobody ever saw it), the others stay pending.
    pub(crate) async fn note_allocation(
        &self,
        blob: &Arc<BlobInner>,
        idx: usize,
        cluster: u32,
    ) -> Result<()> {
        if self.committer.pending() >= PENDING_LIMIT {
            let _m = self.md_lock.lock().await;
            if self.committer.pending() >= PENDING_LIMIT {
                if let Err(e) = self.commit_all_locked().await {
                    self.unclaim_clusters(&[cluster]);
                    return Err(e);
                }
            }
        }
        let closed = {
            let mut s = blob.lock();
            if idx >= s.md.clusters.len() {
                drop(s);
                self.unclaim_clusters(&[cluster]);
                return Err(einval("blob shrank during allocation"));
            }
            s.md.clusters.set(idx, cluster);
            s.uncommitted.insert(idx, cluster);
            s.open_ref == 0
        };
        self.committer.added();
        if closed {
            // Closed meanwhile: nothing else would ever commit it.
            let _m = self.md_lock.lock().await;
            return self.commit_blob_locked(blob).await;
        }
        Ok(())
    }

    /// Commits every uncommitted allocation of the store (md_lock held).
    pub(crate) async fn commit_all_locked(&self) -> Result<()> {
        if self.committer.pending() == 0 {
            return Ok(());
        }
        let open: Vec<Arc<BlobInner>> = self.graph.lock().open.values().cloned().collect();
        let blobs: Vec<Arc<BlobInner>> = open
            .into_iter()
            .filter(|b| !b.lock().uncommitted.is_empty())
            .collect();
        self.commit_blobs_locked(blobs).await
    }

    /// Commits the uncommitted allocations of `blob` (md_lock held).
    pub(crate) async fn commit_blob_locked(&self, blob: &Arc<BlobInner>) -> Result<()> {
        if blob.lock().uncommitted.is_empty() {
            return Ok(());
        }
        self.commit_blobs_locked(vec![blob.clone()]).await
    }

    /// Commits the uncommitted allocations of `blobs` (md_lock held): extent pages in place
    /// behind one `PreCommit` flush where every touched chunk has one and the blob has no
    /// other md change pending, else one whole-md commit per blob. No flush after: the
    /// caller flushes (a client flush) or does not need one (the map change of an
    /// acknowledged write may be lost until a flush). Entries committed are dropped from the
    /// pending set; on error the rest stay pending.
    async fn commit_blobs_locked(&self, blobs: Vec<Arc<BlobInner>>) -> Result<()> {
        let mut writes: Vec<PageWrite> = Vec::new();
        let mut whole: Vec<Arc<BlobInner>> = Vec::new();
        for blob in blobs {
            let s = blob.lock();
            if s.uncommitted.is_empty() {
                continue;
            }
            let mut chunks: BTreeMap<usize, Vec<(usize, u32)>> = BTreeMap::new();
            for (&i, &c) in &s.uncommitted {
                chunks.entry(i / EXTENTS_PER_EP).or_default().push((i, c));
            }
            let in_place = !s.dirty
                && s.md.use_et()
                && s.ep_dirty.is_empty()
                && chunks.keys().all(|&k| s.md.eps.get(k) != 0);
            if !in_place {
                drop(s);
                whole.push(blob);
                continue;
            }
            for (k, entries) in chunks {
                writes.push(PageWrite {
                    blob: blob.clone(),
                    page: s.md.eps.get(k),
                    bytes: build_extent_page(
                        blob.id,
                        (k * EXTENTS_PER_EP) as u32,
                        s.md.chunk_entries(k),
                    ),
                    shadow: None,
                    entries,
                });
            }
        }
        let mut res: Result<()> = Ok(());
        if !writes.is_empty() {
            res = self.write_pages(&mut writes).await;
        }
        for blob in whole {
            // One whole-md commit (it covers every uncommitted entry of the blob).
            blob.lock().touch();
            if let Err(e) = blob.persist_locked().await {
                if res.is_ok() {
                    res = Err(e);
                }
            }
        }
        res
    }

    /// Shadows, one `PreCommit` flush, the page writes together; the entries of each
    /// page written are committed.
    async fn write_pages(&self, writes: &mut [PageWrite]) -> Result<()> {
        self.mark_dirty().await?;
        let undo_shadows = |writes: &mut [PageWrite]| {
            for w in writes.iter_mut() {
                self.issued_shadow(w.shadow.take(), true);
            }
        };
        for i in 0..writes.len() {
            match self.write_shadow(&shadow_of(&writes[i].bytes)).await {
                Ok(sh) => writes[i].shadow = sh,
                Err(e) => {
                    undo_shadows(writes);
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.pre_commit().await {
            undo_shadows(writes);
            return Err(e);
        }
        let results =
            futures::future::join_all(writes.iter().map(|w| self.write_md_page(w.page, &w.bytes)))
                .await;
        let mut res = Ok(());
        for (w, r) in writes.iter_mut().zip(results) {
            self.issued_shadow(w.shadow.take(), true);
            match r {
                Ok(()) => w.blob.committed(&w.entries),
                Err(e) => {
                    if res.is_ok() {
                        res = Err(e);
                    }
                }
            }
        }
        res
    }
}

/// Concurrent flushes share device flushes (see the module doc).
#[derive(Default)]
pub(crate) struct FlushGroup {
    tickets: Mutex<(u64, u64)>,
    lock: async_lock::Mutex<()>,
}

impl FlushGroup {
    /// A ticket: a flush that starts after this call covers the caller.
    pub(crate) fn ticket(&self) -> u64 {
        let mut t = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        t.0 += 1;
        t.0
    }
    /// Whether a completed flush covers `ticket`.
    pub(crate) fn covered(&self, ticket: u64) -> bool {
        self.tickets.lock().unwrap_or_else(|e| e.into_inner()).1 >= ticket
    }
    /// The highest ticket taken so far (a flush starting now covers it).
    pub(crate) fn issued(&self) -> u64 {
        self.tickets.lock().unwrap_or_else(|e| e.into_inner()).0
    }
    /// A flush that started when `issued` was the highest ticket completed.
    pub(crate) fn complete(&self, issued: u64) {
        let mut t = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        t.1 = t.1.max(issued);
    }
    /// Serialises the device flushes of the group.
    pub(crate) async fn lock(&self) -> async_lock::MutexGuard<'_, ()> {
        self.lock.lock().await
    }
}
