//! Metadata operations on blobs: create, delete (with snapshot merge), resize, snapshot,
//! clone, inflate, decouple, set_parent, external parents, shallow copy, grow.
//!
//! Every operation that changes more than one md chain orders its writes so that a power
//! failure at any write leaves the store in the before or the after state (or in a state
//! the load-time SNAPTMP/SNAPRM fix-ups turn into one of them).

use std::collections::BTreeSet;
use std::sync::Arc;

use iobuf::IoBuf;

use crate::blob::{Back, BlobInner, BlobState};
use crate::error::{busy, einval, enospc, eperm};
use crate::format::*;
use crate::graph::BusyGuard;
use crate::md::{check_xattr_size, BlobMd, ClusterMap, EpMap};
use crate::store::{io_err, StoreInner};
use crate::{BlobId, BlobOpts, BsDev, BsError, Parent, Result, BLOBID_INVALID};

/// Yields once to the executor, so that an operation marked busy is observable by others.
pub async fn yield_now() {
    let mut yielded = false;
    futures::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

fn clear_bits(m: crate::ClearMethod) -> u64 {
    match m {
        crate::ClearMethod::Default => 0,
        crate::ClearMethod::None => 1,
        crate::ClearMethod::Unmap => 2,
        crate::ClearMethod::WriteZeroes => 3,
    }
}

impl StoreInner {
    /// Claims a root page and persists a new blob (md_lock held). Thick blobs get their
    /// clusters here.
    pub(crate) async fn create_locked(&self, md: BlobMd, n: u64) -> Result<BlobId> {
        self.create_locked_chain(md, n).await.map(|(id, _)| id)
    }

    /// As [`create_locked`](Self::create_locked), also returning the chain written.
    pub(crate) async fn create_locked_chain(
        &self,
        mut md: BlobMd,
        n: u64,
    ) -> Result<(BlobId, Vec<u32>)> {
        crate::md::check_blob_clusters(n)?;
        let page = self.alloc_root_page().await?;
        let id = page_to_blobid(page);
        self.alloc.lock().used_blobids.set(u64::from(page));
        let claimed = if md.thin() {
            md.clusters = ClusterMap::zeroed(n as usize);
            Vec::new()
        } else {
            match self.claim_clusters(n) {
                Ok(c) => {
                    if let Err(e) = self.scrub_clusters(&c).await {
                        self.undo_create(page, &c);
                        return Err(e);
                    }
                    md.clusters = ClusterMap::from_slice(&c);
                    c
                }
                Err(e) => {
                    self.undo_create(page, &[]);
                    return Err(e);
                }
            }
        };
        md.eps = if md.use_et() {
            EpMap::zeroed(md.num_chunks())
        } else {
            EpMap::default()
        };
        match self.persist_md(id, &md, &[], &BTreeSet::new(), &[]).await {
            Ok((chain, _)) => Ok((id, chain)),
            Err(e) => {
                self.undo_create(page, &claimed);
                Err(e)
            }
        }
    }

    fn undo_create(&self, page: u32, clusters: &[u32]) {
        self.unclaim_clusters(clusters);
        let mut st = self.alloc.lock();
        st.used_blobids.clear(u64::from(page));
        st.used_pages.clear(u64::from(page));
    }

    pub(crate) async fn create_blob(self: &Arc<Self>, opts: &BlobOpts) -> Result<BlobId> {
        self.check_live()?;
        check_new_xattrs(opts.xattrs.iter().chain(opts.internal_xattrs.iter()))?;
        let mut md = BlobMd::default();
        if opts.use_extent_table {
            md.invalid |= INV_EXTENT_TABLE;
        }
        if opts.thin || opts.esnap_id.is_some() {
            md.invalid |= INV_THIN;
        }
        md.md_ro |= clear_bits(opts.clear_method);
        md.xattrs = opts.xattrs.clone();
        md.internal = opts.internal_xattrs.clone();
        if let Some(e) = &opts.esnap_id {
            if e.is_empty() || e.len() > u16::MAX as usize {
                return Err(einval(format!("esnap id of {} bytes", e.len())));
            }
            md.invalid |= INV_ESNAP;
            crate::md::set_in(&mut md.internal, XATTR_EXTSNAP, e);
        }
        if !md.internal.is_empty() {
            md.invalid |= INV_INTERNAL_XATTR;
        }
        let _g = self.md_lock.lock().await;
        self.create_locked(md, opts.num_clusters).await
    }

    /// Opens, runs `f`, closes; all with md_lock taken around open and close only.
    pub(crate) async fn open_internal(self: &Arc<Self>, id: BlobId) -> Result<Arc<BlobInner>> {
        let _g = self.md_lock.lock().await;
        self.open_locked(id).await
    }

    pub(crate) async fn close_internal(self: &Arc<Self>, b: Arc<BlobInner>) -> Result<()> {
        let _g = self.md_lock.lock().await;
        self.close_locked(b).await
    }

    /// The start of a snapshot or clone of `from`: the store is live, the new blob's xattrs
    /// are valid and `from` is marked busy (visible to others once this returns).
    async fn start_new_blob_from(
        self: &Arc<Self>,
        from: BlobId,
        xattrs: &[(String, Vec<u8>)],
    ) -> Result<BusyGuard> {
        self.check_live()?;
        check_new_xattrs(xattrs.iter())?;
        let busy = self.busy_guard(&[from])?;
        yield_now().await;
        Ok(busy)
    }

    // ------------------------------------------------------------------ snapshot

    pub(crate) async fn create_snapshot(
        self: &Arc<Self>,
        orig_id: BlobId,
        xattrs: Vec<(String, Vec<u8>)>,
    ) -> Result<BlobId> {
        let _busy = self.start_new_blob_from(orig_id, &xattrs).await?;
        let orig = self.open_internal(orig_id).await?;
        let r = self.snapshot_inner(&orig, xattrs).await;
        let c = self.close_internal(orig).await;
        let id = r?;
        c?;
        Ok(id)
    }

    /// Deletes a blob just created by a failed operation (md_lock held; nothing else refers
    /// to it). Its clusters and extent pages are not touched: the empty md names none. If
    /// the delete cannot be written, the blob still leaves the listing: it carries SNAPTMP,
    /// so unload retries the delete or the load-time fix-up does it.
    async fn discard_new_blob(&self, id: BlobId, chain: &[u32]) {
        self.alloc.lock().used_blobids.clear(u64::from(id as u32));
        self.delete_or_doom(id, &BlobMd::default(), chain).await;
        self.forget_blob(id);
    }

    async fn snapshot_inner(
        self: &Arc<Self>,
        orig: &Arc<BlobInner>,
        xattrs: Vec<(String, Vec<u8>)>,
    ) -> Result<BlobId> {
        {
            let s = orig.lock();
            if s.data_ro || s.md_ro {
                return Err(einval(format!(
                    "blob {:#x} is read-only and cannot be snapshotted",
                    orig.id
                )));
            }
        }
        let _f = orig.freeze.write().await;
        let _g = self.md_lock.lock().await;
        // The blob's deferred allocations are committed before its md changes.
        self.commit_blob_locked(orig).await?;
        // The snapshot takes the map as it is on disk: settle pending changes first.
        if orig.lock().dirty {
            orig.persist_locked().await?;
        }
        // 1. The new blob, empty, marked SNAPTMP.
        let (n, use_et) = {
            let s = orig.lock();
            (s.md.clusters.len() as u64, s.md.use_et())
        };
        let mut smd = BlobMd {
            invalid: INV_THIN | if use_et { INV_EXTENT_TABLE } else { 0 },
            xattrs,
            ..Default::default()
        };
        smd.set_internal(XATTR_SNAPTMP, &orig.id.to_le_bytes());
        let (sid, smd_chain) = self.create_locked_chain(smd.clone(), n).await?;
        // 2. Take over the original's map, flags and parent.
        let mut sst = {
            let mut os = orig.lock();
            let mut m = smd;
            m.clusters = std::mem::take(&mut os.md.clusters);
            m.eps = std::mem::take(&mut os.md.eps);
            m.invalid = os.md.invalid | INV_INTERNAL_XATTR;
            m.md_ro = (m.md_ro & !MD_RO_CLEAR_MASK) | (os.md.md_ro & MD_RO_CLEAR_MASK);
            if os.md.esnap() {
                if let Some(v) = os.md.get_internal(XATTR_EXTSNAP) {
                    let v = v.to_vec();
                    m.set_internal(XATTR_EXTSNAP, &v);
                }
            } else if let Some(v) = os.md.get_internal(XATTR_SNAP) {
                if os.md.thin() {
                    let v = v.to_vec();
                    m.set_internal(XATTR_SNAP, &v);
                }
            }
            os.md.clusters = ClusterMap::zeroed(n as usize);
            os.md.eps = EpMap::zeroed(os.md.num_chunks());
            BlobState::new(m, smd_chain, false, false, Back::None)
        };
        let restore = |orig: &Arc<BlobInner>, sst: &mut BlobState| {
            let mut os = orig.lock();
            os.md.clusters = std::mem::take(&mut sst.md.clusters);
            os.md.eps = std::mem::take(&mut sst.md.eps);
        };
        match self
            .persist_md(sid, &sst.md, &sst.chain, &BTreeSet::new(), &[])
            .await
        {
            Ok((c, e)) => {
                sst.chain = c;
                sst.md.eps = e;
            }
            Err(e) => {
                restore(orig, &mut sst);
                self.discard_new_blob(sid, &sst.chain).await;
                return Err(e);
            }
        }
        // 3. The original becomes a clone of the snapshot.
        let old_parent = self.graph.lock().parent_of.get(&orig.id).copied();
        let (saved_md, saved_dirty) = {
            let os = orig.lock();
            let mut m = os.md.clone();
            m.clusters = sst.md.clusters.clone();
            m.eps = sst.md.eps.clone();
            (m, os.dirty)
        };
        let old_back = {
            let mut os = orig.lock();
            os.md.invalid |= INV_THIN;
            os.md.invalid &= !INV_ESNAP;
            os.md.remove_internal(XATTR_EXTSNAP);
            os.md.set_internal(XATTR_SNAP, &sid.to_le_bytes());
            os.ep_dirty.clear();
            os.touch();
            std::mem::replace(&mut os.back, Back::None)
        };
        sst.back = old_back;
        sst.open_ref = 1;
        let snap = Arc::new(BlobInner::new(sid, self.clone(), sst));
        self.graph.lock().open.insert(sid, snap.clone());
        orig.lock().back = Back::Snapshot(snap.clone());
        if let Err(e) = orig.persist_locked().await {
            // Not committed: the original keeps its map, flags and parent; the snapshot goes.
            let back = {
                let mut ss = snap.lock();
                ss.open_ref = 0;
                std::mem::replace(&mut ss.back, Back::None)
            };
            self.graph.lock().open.remove(&sid);
            {
                let mut os = orig.lock();
                os.md = saved_md;
                os.back = back;
                os.ep_dirty.clear();
                os.dirty = saved_dirty;
            }
            let chain = snap.lock().chain.clone();
            drop(snap);
            self.discard_new_blob(sid, &chain).await;
            return Err(e);
        }
        if let Some(p) = old_parent {
            self.remove_relation(orig.id);
            self.add_relation(p, sid);
        }
        self.add_relation(sid, orig.id);
        // 4. Finish the snapshot.
        {
            let mut s = snap.lock();
            s.md.remove_internal(XATTR_SNAPTMP);
            s.md.data_ro |= DATA_RO_READ_ONLY;
            s.touch();
        }
        // The snapshot is committed (the original points at it); if clearing SNAPTMP cannot
        // be written, the load-time fix-up finishes it, so this is still a success.
        if let Err(e) = snap.persist_locked().await {
            tracing::warn!(target: "blob", "snapshot {sid:#x}: final md write failed: {e}");
            let mut s = snap.lock();
            s.data_ro = true;
            s.md_ro = true;
        }
        Ok(sid)
    }

    // ------------------------------------------------------------------ clone

    pub(crate) async fn create_clone(
        self: &Arc<Self>,
        snap_id: BlobId,
        xattrs: Vec<(String, Vec<u8>)>,
    ) -> Result<BlobId> {
        let _busy = self.start_new_blob_from(snap_id, &xattrs).await?;
        let _g = self.md_lock.lock().await;
        let snap = self.open_locked(snap_id).await?;
        let r = async {
            let (n, use_et, cm) = {
                let s = snap.lock();
                if !(s.data_ro && s.md_ro) {
                    return Err(einval(format!(
                        "blob {snap_id:#x} is not read-only and cannot be cloned"
                    )));
                }
                (
                    s.md.clusters.len() as u64,
                    s.md.use_et(),
                    s.md.md_ro & MD_RO_CLEAR_MASK,
                )
            };
            let mut md = BlobMd {
                invalid: INV_THIN | if use_et { INV_EXTENT_TABLE } else { 0 },
                md_ro: cm,
                xattrs,
                ..Default::default()
            };
            md.set_internal(XATTR_SNAP, &snap_id.to_le_bytes());
            let cid = self.create_locked(md, n).await?;
            self.add_relation(snap_id, cid);
            Ok(cid)
        }
        .await;
        self.close_locked(snap).await?;
        r
    }

    // ------------------------------------------------------------------ delete

    pub(crate) async fn delete_blob(self: &Arc<Self>, id: BlobId) -> Result<()> {
        self.check_live()?;
        let _busy = self.busy_guard(&[id])?;
        loop {
            let clones = self.clones_of(id);
            if clones.len() > 1 {
                return Err(busy(format!(
                    "blob {id:#x} has {} clones and cannot be deleted",
                    clones.len()
                )));
            }
            let clone_open = clones
                .first()
                .and_then(|c| self.graph.lock().open.get(c).cloned());
            let _f = match &clone_open {
                Some(c) => Some(c.freeze.write().await),
                None => None,
            };
            let _g = self.md_lock.lock().await;
            let now = self.clones_of(id);
            let now_open = now
                .first()
                .and_then(|c| self.graph.lock().open.get(c).cloned());
            if now != clones || now_open.is_some() != clone_open.is_some() {
                continue;
            }
            // The merge rewrites the open clone's map: its deferred allocations first.
            if let Some(c) = &now_open {
                self.commit_blob_locked(c).await?;
            }
            return match now.first() {
                None => self.delete_plain_locked(id).await,
                Some(&c) => self.delete_merge_locked(id, c).await,
            };
        }
    }

    async fn delete_plain_locked(self: &Arc<Self>, id: BlobId) -> Result<()> {
        if self.graph.lock().open.contains_key(&id) {
            return Err(busy(format!("blob {id:#x} is open")));
        }
        let (md, chain) = self.load_blob_md(id).await?;
        let page = blobid_to_page(id).unwrap_or(0);
        self.alloc.lock().used_blobids.clear(u64::from(page));
        if let Err(e) = self.persist_delete(id, &md, &chain).await {
            self.alloc.lock().used_blobids.set(u64::from(page));
            return Err(e);
        }
        self.forget_blob(id);
        Ok(())
    }

    async fn delete_merge_locked(self: &Arc<Self>, sid: BlobId, cid: BlobId) -> Result<()> {
        let pre_ref = self
            .graph
            .lock()
            .open
            .get(&sid)
            .map(|b| b.lock().open_ref)
            .unwrap_or(0);
        let clone_was_open = self.graph.lock().open.contains_key(&cid);
        if pre_ref > u32::from(clone_was_open) {
            return Err(busy(format!("blob {sid:#x} is open")));
        }
        let cb = self.open_locked(cid).await?;
        let r = self.merge_inner(sid, &cb).await;
        self.close_locked(cb).await?;
        r
    }

    async fn merge_inner(self: &Arc<Self>, sid: BlobId, cb: &Arc<BlobInner>) -> Result<()> {
        let snap = self
            .graph
            .lock()
            .open
            .get(&sid)
            .cloned()
            .ok_or_else(|| einval(format!("snapshot {sid:#x} of {:#x} is not open", cb.id)))?;
        // 1. Power-failure marker.
        {
            let mut s = snap.lock();
            s.md.set_internal(XATTR_SNAPRM, &cb.id.to_le_bytes());
            s.touch();
        }
        if let Err(e) = snap.persist_locked().await {
            snap.lock().md.remove_internal(XATTR_SNAPRM);
            return Err(e);
        }
        // 2. The clone takes every cluster it does not have, and the snapshot's parent.
        let mut moved = Vec::new();
        let saved_cmd = cb.lock().md.clone();
        {
            let (smd, sback) = {
                let mut s = snap.lock();
                (s.md.clone(), std::mem::replace(&mut s.back, Back::None))
            };
            let mut c = cb.lock();
            let n = c.md.clusters.len().min(smd.clusters.len());
            for (i, sc) in smd.clusters.allocated() {
                if i < n && c.md.clusters.at(i) == 0 {
                    c.md.clusters.set(i, sc);
                    moved.push(i);
                    c.ep_dirty.insert(i / EXTENTS_PER_EP);
                }
            }
            c.md.remove_internal(XATTR_SNAP);
            if smd.esnap() {
                if let Some(v) = smd.get_internal(XATTR_EXTSNAP) {
                    let v = v.to_vec();
                    c.md.set_internal(XATTR_EXTSNAP, &v);
                }
                c.md.invalid |= INV_ESNAP;
            } else if let Some(g) = smd.snap_parent().ok().flatten() {
                c.md.set_internal(XATTR_SNAP, &g.to_le_bytes());
            }
            c.touch();
            let old = std::mem::replace(&mut c.back, sback);
            drop(c);
            // The clone's reference to the snapshot goes away with the snapshot.
            drop(old);
        }
        if let Err(e) = cb.persist_locked().await {
            // Not committed: the clone keeps its map and the snapshot; on disk the snapshot
            // may carry SNAPRM, which the load-time fix-up removes since the clone still
            // points at it. Do the same here.
            let sback = {
                let mut c = cb.lock();
                c.md = saved_cmd;
                std::mem::replace(&mut c.back, Back::Snapshot(snap.clone()))
            };
            let mut s = snap.lock();
            s.back = sback;
            s.md.remove_internal(XATTR_SNAPRM);
            s.touch();
            return Err(e);
        }
        // 3. Delete the snapshot, freeing only what the clone did not take.
        let (mut smd, chain) = {
            let s = snap.lock();
            (s.md.clone(), s.chain.clone())
        };
        for i in moved {
            smd.clusters.set(i, 0);
        }
        self.graph.lock().open.remove(&sid);
        self.alloc.lock().used_blobids.clear(u64::from(sid as u32));
        let g = self.graph.lock().parent_of.get(&sid).copied();
        self.remove_relation(cb.id);
        self.forget_blob(sid);
        if let Some(g) = g {
            self.add_relation(g, cb.id);
        }
        // The clone no longer points at the snapshot: the delete is committed. If zeroing the
        // snapshot's md fails, it carries SNAPRM and is deleted at unload or recovery.
        self.delete_or_doom(sid, &smd, &chain).await;
        Ok(())
    }

    // ------------------------------------------------------------------ resize

    pub(crate) async fn resize(self: &Arc<Self>, b: &Arc<BlobInner>, n: u64) -> Result<()> {
        {
            let s = b.lock();
            if s.md_ro {
                return Err(eperm(format!("blob {:#x} metadata is read-only", b.id)));
            }
            if s.md.clusters.len() as u64 == n {
                return Ok(());
            }
        }
        crate::md::check_blob_clusters(n)?;
        let _busy = self.busy_guard(&[b.id])?;
        yield_now().await;
        let _f = b.freeze.write().await;
        let _g = self.md_lock.lock().await;
        // The blob's deferred allocations are committed before its md changes.
        self.commit_blob_locked(b).await?;
        let (old, thin) = {
            let mut s = b.lock();
            if s.saved_clusters.is_none() {
                s.saved_clusters = Some(s.md.clusters.clone());
            }
            (s.md.clusters.len() as u64, s.md.thin())
        };
        if n > old {
            if thin {
                b.lock().md.clusters.push_zeros((n - old) as usize);
            } else {
                let c = self.claim_clusters(n - old)?;
                if let Err(e) = self.scrub_clusters(&c).await {
                    self.unclaim_clusters(&c);
                    return Err(e);
                }
                b.lock().md.clusters.push_slice(&c);
            }
        } else {
            let mut s = b.lock();
            let tail: Vec<u32> =
                s.md.clusters
                    .allocated()
                    .filter(|&(i, _)| i >= n as usize)
                    .map(|(_, c)| c)
                    .collect();
            s.pending_clusters.extend(tail);
            s.md.clusters.truncate(n as usize);
        }
        {
            let mut s = b.lock();
            if s.md.use_et() {
                let chunks = s.md.num_chunks();
                if s.md.eps.len() < chunks {
                    s.md.eps.resize(chunks);
                }
                // The extent pages whose entries change: from the old last chunk on. A thin
                // blob only has pages where it owns clusters (a huge grow costs nothing).
                let first = (old.min(n) as usize) / EXTENTS_PER_EP;
                let dirty: Vec<usize> = if thin {
                    let mut v: Vec<usize> = s.md.eps.pages().map(|(k, _)| k).collect();
                    v.extend(s.md.clusters.allocated_chunks());
                    v.retain(|&k| k >= first);
                    v
                } else {
                    (first..s.md.eps.len()).collect()
                };
                s.ep_dirty.extend(dirty);
            }
            s.touch();
        }
        // Durable before returning (a failed write puts the old map back).
        b.persist_locked().await
    }

    // ------------------------------------------------------------------ inflate / decouple

    pub(crate) async fn inflate(self: &Arc<Self>, id: BlobId, allocate_all: bool) -> Result<()> {
        self.check_live()?;
        let _busy = self.busy_guard(&[id])?;
        yield_now().await;
        let b = self.open_internal(id).await?;
        let r = self.inflate_inner(&b, allocate_all).await;
        self.close_internal(b).await?;
        r
    }

    async fn inflate_inner(self: &Arc<Self>, b: &Arc<BlobInner>, allocate_all: bool) -> Result<()> {
        let (thin, back) = {
            let s = b.lock();
            (s.md.thin(), s.back.clone_ref())
        };
        if !thin {
            return Ok(());
        }
        let parent = match &back {
            crate::blob::BackRef::Snapshot(p) => Some(p.clone()),
            _ => None,
        };
        let is_esnap = matches!(back, crate::blob::BackRef::Esnap(_));
        if !allocate_all && parent.is_none() && !is_esnap {
            return Err(einval(format!("blob {:#x} has no parent", b.id)));
        }
        let allocate_all = allocate_all || is_esnap;
        if b.lock().data_ro {
            // Snapshots can be decoupled (SPDK allows md updates of snapshots here).
        }
        // Counted before anything is allocated: inflating a huge thin blob is refused with
        // ENOSPC, not by building a list as long as the blob.
        let need = {
            let s = b.lock();
            if allocate_all {
                s.md.clusters.len() as u64 - s.md.clusters.count_allocated()
            } else {
                let pc = parent
                    .as_ref()
                    .map(|p| p.lock().md.clusters.clone())
                    .unwrap_or_default();
                pc.allocated()
                    .filter(|&(i, _)| s.md.clusters.get(i) == Some(0))
                    .count() as u64
            }
        };
        if need > self.free_clusters() {
            return Err(enospc(format!(
                "inflating blob {:#x} needs {need} clusters, {} free",
                b.id,
                self.free_clusters()
            )));
        }
        let todo: Vec<usize> = {
            let s = b.lock();
            let mut v = Vec::new();
            v.try_reserve(need as usize)
                .map_err(|_| BsError::NoMemory(format!("{need} clusters to inflate")))?;
            if allocate_all {
                let mut i = 0;
                while let Some(j) = s.md.clusters.next_unallocated(i) {
                    v.push(j);
                    i = j + 1;
                }
            } else if let Some(p) = parent.as_ref() {
                let ps = p.lock();
                v.extend(
                    ps.md
                        .clusters
                        .allocated()
                        .map(|(i, _)| i)
                        .filter(|&i| s.md.clusters.get(i) == Some(0)),
                );
            }
            v
        };
        // The copies are made with client I/O going on, into clusters no map names yet: a
        // failed inflate gives them back, and nobody ever saw them.
        let mut copies: Vec<(usize, u32)> = Vec::new();
        copies
            .try_reserve(todo.len())
            .map_err(|_| BsError::NoMemory(format!("{need} clusters to inflate")))?;
        {
            let _f = b.freeze.read().await;
            for i in todo {
                match b.fill_new_cluster(i, 0, 0, Some(&[])).await {
                    Ok(c) => copies.push((i, c)),
                    Err(e) => {
                        let cs: Vec<u32> = copies.iter().map(|&(_, c)| c).collect();
                        self.unclaim_clusters(&cs);
                        return Err(e);
                    }
                }
            }
        }
        let _f = b.freeze.write().await;
        let _g = self.md_lock.lock().await;
        // The blob's deferred allocations are committed before its md changes.
        if let Err(e) = self.commit_blob_locked(b).await {
            let cs: Vec<u32> = copies.iter().map(|&(_, c)| c).collect();
            self.unclaim_clusters(&cs);
            return Err(e);
        }
        let saved_md = b.lock().md.clone();
        // The copies join the map; the md write below commits them with the parent change.
        let mapped = b.map_copies(&copies);
        let saved_parent = self.graph.lock().parent_of.get(&b.id).copied();
        let old_back = {
            let mut s = b.lock();
            let old = std::mem::replace(&mut s.back, Back::None);
            s.md.remove_internal(XATTR_SNAP);
            s.md.remove_internal(XATTR_EXTSNAP);
            s.md.invalid &= !INV_ESNAP;
            if allocate_all {
                s.md.invalid &= !INV_THIN;
                s.back = Back::None;
            } else {
                s.back = Back::Zeroes;
            }
            s.touch();
            old
        };
        self.remove_relation(b.id);
        let r = async {
            if !allocate_all {
                if let Back::Snapshot(p) = &old_back {
                    let (pmd_parent, pback) = {
                        let ps = p.lock();
                        (ps.md.snap_parent().ok().flatten(), ps.back.clone_ref())
                    };
                    if let Some(g) = pmd_parent {
                        let gb = self.open_locked(g).await?;
                        let mut s = b.lock();
                        s.md.set_internal(XATTR_SNAP, &g.to_le_bytes());
                        s.back = Back::Snapshot(gb);
                        drop(s);
                        self.add_relation(g, b.id);
                    } else if let crate::blob::BackRef::Esnap(d) = pback {
                        let ev = p.lock().md.get_internal(XATTR_EXTSNAP).map(|v| v.to_vec());
                        if let Some(ev) = ev {
                            let mut s = b.lock();
                            s.md.set_internal(XATTR_EXTSNAP, &ev);
                            s.md.invalid |= INV_ESNAP;
                            s.back = Back::Esnap(d);
                        }
                    }
                }
            }
            b.persist_locked().await
        }
        .await;
        if let Err(e) = r {
            // Not written: the blob keeps its parent and its map; the copies go back.
            let new_back = {
                let mut s = b.lock();
                s.md = saved_md;
                std::mem::replace(&mut s.back, old_back)
            };
            b.unmap_copies(&mapped);
            self.remove_relation(b.id);
            if let Some(p) = saved_parent {
                self.add_relation(p, b.id);
            }
            if let Back::Snapshot(gb) = new_back {
                let _ = self.close_locked(gb).await;
            }
            return Err(e);
        }
        if let Back::Snapshot(p) = old_back {
            self.close_locked(p).await?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------ set_parent

    pub(crate) async fn set_parent(self: &Arc<Self>, id: BlobId, snap: BlobId) -> Result<()> {
        self.check_live()?;
        if snap == BLOBID_INVALID {
            return Err(einval("snapshot id is invalid"));
        }
        if snap == id {
            return Err(einval("a blob cannot be its own parent"));
        }
        if self.graph.lock().parent_of.get(&id) == Some(&snap) {
            return Err(BsError::Exists(format!(
                "blob {snap:#x} is already the parent of {id:#x}"
            )));
        }
        let _busy = self.busy_guard(&[id, snap])?;
        let b = self.open_internal(id).await?;
        let r = async {
            if !b.lock().md.thin() {
                return Err(einval(format!("blob {id:#x} is not thin")));
            }
            if !self.graph.lock().clones.contains_key(&snap) {
                return Err(einval(format!("blob {snap:#x} is not a snapshot")));
            }
            let _f = b.freeze.write().await;
            let _g = self.md_lock.lock().await;
            // The blob's deferred allocations are committed before its md changes.
            self.commit_blob_locked(&b).await?;
            let sb = self.open_locked(snap).await?;
            if sb.lock().md.clusters.len() != b.lock().md.clusters.len() {
                self.close_locked(sb).await?;
                return Err(einval(format!(
                    "blob {id:#x} and snapshot {snap:#x} differ in size"
                )));
            }
            let saved_md = b.lock().md.clone();
            let old = {
                let mut s = b.lock();
                s.md.remove_internal(XATTR_EXTSNAP);
                s.md.invalid &= !INV_ESNAP;
                s.md.set_internal(XATTR_SNAP, &snap.to_le_bytes());
                s.touch();
                std::mem::replace(&mut s.back, Back::Snapshot(sb))
            };
            if let Err(e) = b.persist_locked().await {
                let new = {
                    let mut s = b.lock();
                    s.md = saved_md;
                    std::mem::replace(&mut s.back, old)
                };
                if let Back::Snapshot(sb) = new {
                    let _ = self.close_locked(sb).await;
                }
                return Err(e);
            }
            self.parent_switched(id, Some(snap), old).await
        }
        .await;
        self.close_internal(b).await?;
        r
    }

    /// After blob `id`'s new parent is durable: the graph names the new parent (a snapshot,
    /// or none for an external one) and the old parent snapshot is closed.
    async fn parent_switched(
        self: &Arc<Self>,
        id: BlobId,
        snap: Option<BlobId>,
        old: Back,
    ) -> Result<()> {
        self.remove_relation(id);
        if let Some(snap) = snap {
            self.add_relation(snap, id);
        }
        if let Back::Snapshot(p) = old {
            self.close_locked(p).await?;
        }
        Ok(())
    }

    pub(crate) async fn set_external_parent(
        self: &Arc<Self>,
        id: BlobId,
        dev: Arc<dyn BsDev>,
        esnap_id: &[u8],
    ) -> Result<()> {
        self.check_live()?;
        if esnap_id.is_empty() || esnap_id.len() > u16::MAX as usize {
            return Err(einval(format!("esnap id of {} bytes", esnap_id.len())));
        }
        if esnap_id == id.to_le_bytes() {
            return Err(einval("esnap id equals the blob id"));
        }
        let bytes = u64::from(dev.block_len()) * dev.block_count();
        if !bytes.is_multiple_of(u64::from(self.geo.cluster_size)) {
            return Err(einval(format!(
                "esnap device of {bytes} bytes is not a multiple of the cluster size"
            )));
        }
        self.check_esnap_dev(dev.as_ref())?;
        let _busy = self.busy_guard(&[id])?;
        let b = self.open_internal(id).await?;
        let r = async {
            {
                let s = b.lock();
                if s.md.esnap() && s.md.get_internal(XATTR_EXTSNAP) == Some(esnap_id) {
                    return Err(BsError::Exists(format!(
                        "blob {id:#x} already has this external parent"
                    )));
                }
                if !s.md.thin() {
                    return Err(einval(format!("blob {id:#x} is not thin")));
                }
            }
            let _f = b.freeze.write().await;
            let _g = self.md_lock.lock().await;
            // The blob's deferred allocations are committed before its md changes.
            self.commit_blob_locked(&b).await?;
            let saved_md = b.lock().md.clone();
            let old = {
                let mut s = b.lock();
                s.md.remove_internal(XATTR_SNAP);
                s.md.set_internal(XATTR_EXTSNAP, esnap_id);
                s.md.invalid |= INV_ESNAP;
                s.touch();
                std::mem::replace(&mut s.back, Back::Esnap(Some(dev)))
            };
            if let Err(e) = b.persist_locked().await {
                let mut s = b.lock();
                s.md = saved_md;
                s.back = old;
                return Err(e);
            }
            self.parent_switched(id, None, old).await
        }
        .await;
        self.close_internal(b).await?;
        r
    }

    // ------------------------------------------------------------------ shallow copy

    pub(crate) async fn shallow_copy(
        self: &Arc<Self>,
        id: BlobId,
        dst: Arc<dyn BsDev>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64> {
        self.check_live()?;
        let b = self.open_internal(id).await?;
        let r = async {
            let (ro, clusters) = {
                let s = b.lock();
                (s.data_ro, s.md.clusters.clone())
            };
            if !ro {
                return Err(eperm(format!("blob {id:#x} is not read-only")));
            }
            let dbl = u64::from(dst.block_len());
            let cs = u64::from(self.geo.cluster_size);
            if dbl == 0
                || u64::from(self.geo.io_unit) % dbl != 0
                || dst.block_count().saturating_mul(dbl) < clusters.len() as u64 * cs
            {
                return Err(einval(format!(
                    "destination ({} blocks of {dbl}) cannot hold blob {id:#x}",
                    dst.block_count()
                )));
            }
            let _busy = self.busy_guard(&[id])?;
            let mut copied = 0;
            for (i, c) in clusters.allocated() {
                let buf = IoBuf::new(cs as usize, self.align.max(dst.buf_align()));
                let buf = self
                    .dev
                    .read(u64::from(c) * self.geo.lba_per_cluster, buf)
                    .await
                    .map_err(io_err)?;
                dst.write(i as u64 * cs / dbl, buf).await.map_err(io_err)?;
                copied += 1;
                progress(copied);
            }
            Ok(copied)
        }
        .await;
        self.close_internal(b).await?;
        r
    }

    // ------------------------------------------------------------------ grow

    pub(crate) async fn grow(&self) -> Result<()> {
        self.check_live()?;
        let _g = self.md_lock.lock().await;
        let dev_bytes = u64::from(self.dev.block_len()) * self.dev.block_count();
        let total = self.alloc.lock().total_clusters;
        let new_total = dev_bytes / u64::from(self.geo.cluster_size);
        if new_total < total {
            return Err(enospc(format!(
                "the device shrank to {new_total} clusters, the store has {total}"
            )));
        }
        if new_total == total {
            return Ok(());
        }
        let s = self.read_super().await?;
        let need = (5 + new_total.div_ceil(8)).div_ceil(PAGE as u64) as u32;
        let reserved = s.used_blobid_mask_start - s.used_cluster_mask_start;
        if need > reserved || new_total > u64::from(u32::MAX) {
            return Err(enospc(format!(
                "the cluster mask for {new_total} clusters does not fit in the space reserved at init"
            )));
        }
        self.update_super(|s| {
            s.size = dev_bytes;
            s.used_cluster_mask_len = need;
            s.clean = 0;
        })
        .await?;
        self.barrier(crate::barrier::Barrier::Super).await?;
        {
            let mut a = self.alloc.lock();
            a.total_clusters = new_total;
            a.used_clusters.resize(new_total);
            a.stale.resize(new_total);
            for c in total..new_total {
                a.stale.set(c);
            }
        }
        self.state().clean_on_disk = false;
        Ok(())
    }

    pub(crate) fn max_growable_size(&self) -> u64 {
        let md_len = u64::from(self.geo.md_len);
        let pages = (5 + md_len.div_ceil(8)).div_ceil(PAGE as u64);
        (pages * PAGE as u64 - 5) * 8 * u64::from(self.geo.cluster_size)
    }
}

impl BlobInner {
    pub(crate) fn cluster_at_pub(&self, idx: usize) -> u32 {
        self.lock().md.clusters.at(idx)
    }

    pub(crate) fn parent(&self) -> Parent {
        let s = self.lock();
        if s.md.esnap() {
            return Parent::External(
                s.md.get_internal(XATTR_EXTSNAP)
                    .map(|v| v.to_vec())
                    .unwrap_or_default(),
            );
        }
        if let Ok(Some(p)) = s.md.snap_parent() {
            return Parent::Snapshot(p);
        }
        if s.md.thin() {
            Parent::Zeroes
        } else {
            Parent::None
        }
    }

    pub(crate) async fn set_esnap_dev(&self, dev: Option<Arc<dyn BsDev>>) -> Result<()> {
        if let Some(d) = &dev {
            self.bs.check_esnap_dev(d.as_ref())?;
        }
        let _f = self.freeze.write().await;
        let mut s = self.lock();
        if !s.md.esnap() {
            return Err(einval(format!("blob {:#x} is not an esnap clone", self.id)));
        }
        s.back = Back::Esnap(dev);
        Ok(())
    }
}

/// The xattrs a new blob is created with: each needs a name and a value, and must fit a
/// descriptor.
fn check_new_xattrs<'a>(xattrs: impl Iterator<Item = &'a (String, Vec<u8>)>) -> Result<()> {
    for (n, v) in xattrs {
        if n.is_empty() || v.is_empty() {
            return Err(einval(format!("xattr {n:?} has an empty name or value")));
        }
        check_xattr_size(n, v)?;
    }
    Ok(())
}
