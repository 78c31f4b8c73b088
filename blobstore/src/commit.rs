//! The metadata committer: group commit of cluster allocations and grouped flushes.
//!
//! An allocating write puts its new cluster's data on the device first (no store-wide lock
//! held), then hands `(blob, cluster index, new cluster)` to [`Committer`]. One task at a
//! time is the *leader*: it takes every allocation queued so far (of any blob) as one batch
//! and commits it under the store's `md_lock` with the protocol of "Metadata ordering" in
//! `docs/architecture.md`: one `PreCommit` flush for the data of every allocation in the
//! batch (and the shadows of the pages about to be rewritten in place), then one extent-page
//! write per extent page touched (covering every allocation in that page), or, for a blob
//! whose chunk has no extent page yet, one whole-md commit covering all its allocations.
//! While a leader commits, new allocations queue up for the next batch; when its own
//! allocation is done the leader hands the lead to a queued task, so no task commits for
//! others forever.
//!
//! [`FlushGroup`] makes concurrent barriers and client flushes share device flushes: a
//! caller takes a ticket, and a flush that started after the ticket was taken covers it
//! (writes completed before the call are in the device cache when that flush starts).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::channel::oneshot;

use crate::blob::BlobInner;
use crate::error::einval;
use crate::format::*;
use crate::store::StoreInner;
use crate::{BsError, Result};

/// One allocation waiting for its commit.
struct Request {
    blob: Arc<BlobInner>,
    idx: usize,
    cluster: u32,
    ticket: u64,
    /// `None` once the lead was handed to this request's task.
    tx: Option<oneshot::Sender<Msg>>,
}

/// A blob and its allocations by extent-page chunk.
type BlobPages = (Arc<BlobInner>, BTreeMap<usize, Vec<Request>>);

enum Msg {
    /// The commit of this allocation finished.
    Done(Result<()>),
    /// The previous leader finished its own batch: this task leads now.
    Lead,
}

#[derive(Default)]
struct Queue {
    items: Vec<Request>,
    /// Some task is the leader (it will look at the queue again before giving up the lead).
    leader: bool,
    next_ticket: u64,
}

/// The queue of allocations waiting for a commit, and its leader.
#[derive(Default)]
pub(crate) struct Committer {
    q: Mutex<Queue>,
}

impl Committer {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Gives up (or hands on) the lead when the leading task finishes or is dropped mid-batch.
struct LeadGuard<'a> {
    c: &'a Committer,
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        let mut q = self.c.queue();
        // Hand the lead to the first queued task still waiting; if none is, nobody leads
        // and the next submitter becomes the leader.
        for r in q.items.iter_mut() {
            if let Some(tx) = r.tx.take() {
                if tx.send(Msg::Lead).is_ok() {
                    return;
                }
            }
        }
        q.leader = false;
    }
}

/// Copies an error for every allocation of a failed batch (`BsError` is not `Clone`).
fn dup_err(e: &BsError) -> BsError {
    match e {
        BsError::Io(io) => BsError::Io(match io.raw_os_error() {
            Some(n) => std::io::Error::from_raw_os_error(n),
            None => std::io::Error::new(io.kind(), io.to_string()),
        }),
        BsError::BadHandle(m) => BsError::BadHandle(m.clone()),
        BsError::BadSuperBlock(m) => BsError::BadSuperBlock(m.clone()),
        BsError::BstypeMismatch { found, wanted } => BsError::BstypeMismatch {
            found: found.clone(),
            wanted: wanted.clone(),
        },
        BsError::Busy(m) => BsError::Busy(m.clone()),
        BsError::Corrupt(m) => BsError::Corrupt(m.clone()),
        BsError::Degraded(m) => BsError::Degraded(m.clone()),
        BsError::Exists(m) => BsError::Exists(m.clone()),
        BsError::InvalidArgument(m) => BsError::InvalidArgument(m.clone()),
        BsError::NoMemory(m) => BsError::NoMemory(m.clone()),
        BsError::NoSpace(m) => BsError::NoSpace(m.clone()),
        BsError::NotFound(m) => BsError::NotFound(m.clone()),
        BsError::NotSupported(m) => BsError::NotSupported(m.clone()),
        BsError::ReadOnly(m) => BsError::ReadOnly(m.clone()),
        BsError::TooLarge(m) => BsError::TooLarge(m.clone()),
    }
}

fn dup_result(r: &Result<()>) -> Result<()> {
    r.as_ref().map(|_| ()).map_err(dup_err)
}

impl StoreInner {
    /// Commits the allocation of cluster `idx` of `blob` to physical cluster `cluster`,
    /// whose data is already written: returns when the map naming it is written (after a
    /// barrier that made the data durable first). On failure the map entry is undone and
    /// the cluster given back.
    pub(crate) async fn commit_allocation(
        &self,
        blob: &Arc<BlobInner>,
        idx: usize,
        cluster: u32,
    ) -> Result<()> {
        let (rx, ticket, lead) = {
            let mut q = self.committer.queue();
            let (tx, rx) = oneshot::channel();
            q.next_ticket += 1;
            let ticket = q.next_ticket;
            q.items.push(Request {
                blob: blob.clone(),
                idx,
                cluster,
                ticket,
                tx: Some(tx),
            });
            let lead = !q.leader;
            q.leader = true;
            (rx, ticket, lead)
        };
        if !lead {
            match rx.await {
                Ok(Msg::Done(r)) => return r,
                Ok(Msg::Lead) => {}
                // The leader was dropped with our request in its batch: its outcome is
                // unknown, so report it as failed (the store is tainted by then, if the
                // batch had started writing).
                Err(_) => {
                    return Err(BsError::Io(std::io::Error::from_raw_os_error(libc::EIO)));
                }
            }
        }
        let _lead = LeadGuard { c: &self.committer };
        loop {
            let _m = self.md_lock.lock().await;
            let batch = std::mem::take(&mut self.committer.queue().items);
            if batch.is_empty() {
                // Our request went into an earlier batch that a dropped leader lost.
                return Err(BsError::Io(std::io::Error::from_raw_os_error(libc::EIO)));
            }
            let mut mine = None;
            for (r, res) in self.run_batch(batch).await {
                if r.ticket == ticket {
                    mine = Some(res);
                } else if let Some(tx) = r.tx {
                    let _ = tx.send(Msg::Done(res));
                }
            }
            if let Some(res) = mine {
                return res;
            }
        }
    }

    /// Commits one batch (md_lock held); returns every request with its outcome. Once the
    /// outcomes are known the entries count as allocated again (or are undone).
    async fn run_batch(&self, batch: Vec<Request>) -> Vec<(Request, Result<()>)> {
        // A guard, so that a leader dropped mid-batch does not leave entries marked forever.
        let _done = Committed(batch.iter().map(|r| (r.blob.clone(), r.idx)).collect());
        self.run_batch_inner(batch).await
    }

    async fn run_batch_inner(&self, batch: Vec<Request>) -> Vec<(Request, Result<()>)> {
        let mut out: Vec<(Request, Result<()>)> = Vec::with_capacity(batch.len());
        // Group by blob (pointer identity) so that each blob's map changes are applied
        // together and committed by one write per extent page or one whole-md commit.
        let mut by_blob: BTreeMap<usize, Vec<Request>> = BTreeMap::new();
        for r in batch {
            by_blob
                .entry(Arc::as_ptr(&r.blob) as usize)
                .or_default()
                .push(r);
        }
        // Apply the map entries; split into blobs whose extent pages can be rewritten in
        // place and blobs that need a whole-md commit.
        let mut in_place: Vec<BlobPages> = Vec::new();
        let mut whole: Vec<(Arc<BlobInner>, Vec<Request>)> = Vec::new();
        for (_, reqs) in by_blob {
            let blob = reqs[0].blob.clone();
            let mut ok = Vec::new();
            {
                let mut s = blob.lock();
                for r in reqs {
                    if r.idx >= s.md.clusters.len() {
                        out.push((r, Err(einval("blob shrank during allocation"))));
                    } else {
                        s.md.clusters.set(r.idx, r.cluster);
                        s.committing.push(r.idx);
                        ok.push(r);
                    }
                }
            }
            if ok.is_empty() {
                continue;
            }
            let pages = {
                let s = blob.lock();
                let simple = !s.dirty && s.md.use_et() && s.ep_dirty.is_empty();
                let mut pages: BTreeMap<usize, Vec<Request>> = BTreeMap::new();
                let mut all = simple;
                for r in &ok {
                    all &= s.md.eps.get(r.idx / EXTENTS_PER_EP) != 0;
                }
                if all {
                    for r in ok.drain(..) {
                        pages.entry(r.idx / EXTENTS_PER_EP).or_default().push(r);
                    }
                }
                pages
            };
            if pages.is_empty() {
                whole.push((blob, ok));
            } else {
                in_place.push((blob, pages));
            }
        }
        // Undo for failed requests: map entry back to unallocated, cluster given back.
        let undo = |r: &Request| {
            r.blob.lock().md.clusters.set(r.idx, 0);
            self.unclaim_clusters(&[r.cluster]);
        };
        if let Err(e) = self.mark_dirty().await {
            for (b, pages) in in_place {
                let _ = b;
                for r in pages.into_values().flatten() {
                    undo(&r);
                    out.push((r, Err(dup_err(&e))));
                }
            }
            for (_, reqs) in whole {
                for r in reqs {
                    undo(&r);
                    out.push((r, Err(dup_err(&e))));
                }
            }
            return out;
        }
        if !in_place.is_empty() {
            self.commit_in_place(in_place, &mut out, &undo).await;
        }
        for (blob, reqs) in whole {
            // One whole-md commit for every allocation of this blob in the batch.
            blob.lock().touch();
            let r = blob.persist_locked().await;
            for q in reqs {
                if r.is_err() {
                    undo(&q);
                }
                out.push((q, dup_result(&r)));
            }
        }
        out
    }

    /// Rewrites extent pages in place: their shadows (on devices whose io unit is under an
    /// md page), one `PreCommit` flush for the data of every allocation and the shadows,
    /// then one write per page. No flush after: an allocating write is made durable by a
    /// client flush or the next commit's barrier.
    async fn commit_in_place(
        &self,
        in_place: Vec<BlobPages>,
        out: &mut Vec<(Request, Result<()>)>,
        undo: &impl Fn(&Request),
    ) {
        struct PageWrite {
            page: u32,
            bytes: Vec<u8>,
            shadow: Option<u32>,
            reqs: Vec<Request>,
        }
        let mut writes: Vec<PageWrite> = Vec::new();
        for (blob, pages) in in_place {
            for (k, reqs) in pages {
                let (page, bytes) = {
                    let s = blob.lock();
                    (
                        s.md.eps.get(k),
                        build_extent_page(
                            blob.id,
                            (k * EXTENTS_PER_EP) as u32,
                            s.md.chunk_entries(k),
                        ),
                    )
                };
                writes.push(PageWrite {
                    page,
                    bytes,
                    shadow: None,
                    reqs,
                });
            }
        }
        let fail_all = |writes: Vec<PageWrite>, e: &BsError, out: &mut Vec<_>| {
            for w in writes {
                self.issued_shadow(w.shadow, true);
                for r in w.reqs {
                    undo(&r);
                    out.push((r, Err(dup_err(e))));
                }
            }
        };
        for i in 0..writes.len() {
            match self.write_shadow(&shadow_of(&writes[i].bytes)).await {
                Ok(sh) => writes[i].shadow = sh,
                Err(e) => return fail_all(writes, &e, out),
            }
        }
        if let Err(e) = self.pre_commit().await {
            return fail_all(writes, &e, out);
        }
        // The commit writes of the batch go out together.
        let results =
            futures::future::join_all(writes.iter().map(|w| self.write_md_page(w.page, &w.bytes)))
                .await;
        for (w, r) in writes.into_iter().zip(results) {
            self.issued_shadow(w.shadow, true);
            for q in w.reqs {
                if r.is_err() {
                    undo(&q);
                }
                out.push((q, dup_result(&r)));
            }
        }
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

/// The map entries of a batch; dropping it ends their "commit under way" state
/// ([`crate::blob::BlobState::committing`]).
struct Committed(Vec<(Arc<BlobInner>, usize)>);

impl Drop for Committed {
    fn drop(&mut self) {
        for (blob, idx) in self.0.drain(..) {
            let mut s = blob.lock();
            if let Some(i) = s.committing.iter().position(|&x| x == idx) {
                s.committing.swap_remove(i);
            }
        }
    }
}
