//! The store: geometry, super block state and writes, barriers (grouped flushes, shadows),
//! md persistence (the commit protocol of `persist_md` / `persist_delete`) and blob
//! open/close. Its parts live in their own files with their own locks: the allocator
//! (`alloc.rs`), the blob graph (`graph.rs`), the committer (`commit.rs`); init, load,
//! recovery and unload are in `load.rs`.
//!
//! Lock order, always: a blob's freeze lock, then a cluster's allocation lock, then the
//! store's `md_lock`, then the std mutexes (never held across an await).

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use futures::FutureExt;
use iobuf::IoBuf;

use crate::alloc::Allocator;
use crate::barrier::Barrier;
use crate::blob::{Back, BlobInner, BlobState};
use crate::bufpool::BufPool;
use crate::commit::{Committer, FlushGroup};
use crate::error::{corrupt, einval, enoent};
use crate::format::*;
use crate::graph::Graph;
use crate::layout::SuperBlockInfo;
use crate::load::validate_super;
use crate::md::{parse_chain, BlobMd, ClusterMap, EpMap};
use crate::{BlobId, BsDev, BsError, EsnapDevFactory, Result};

/// Longest snapshot chain we open (guards recursion against hostile metadata).
pub(crate) const MAX_CHAIN_DEPTH: usize = 1024;

/// Fixed geometry of a loaded store.
#[derive(Clone, Debug)]
pub(crate) struct Geo {
    pub io_unit: u32,
    pub cluster_size: u32,
    pub md_start: u32,
    pub md_len: u32,
    pub lba_per_cluster: u64,
    pub lba_per_page: u64,
    pub md_clusters: u64,
}

impl Geo {
    pub(crate) fn page_lba(&self, md_page: u32) -> u64 {
        (u64::from(self.md_start) + u64::from(md_page)) * self.lba_per_page
    }
}

pub(crate) struct StoreState {
    pub sbi: SuperBlockInfo,
    pub clean_on_disk: bool,
    pub super_blob: u64,
    pub unloaded: bool,
    /// Blobs already gone from the listing whose on-disk delete could not be written (each
    /// carries SNAPTMP / SNAPRM, so a recovery load deletes it); retried at unload.
    pub doomed: Vec<(BlobId, BlobMd, Vec<u32>)>,
    /// An md write failed: what the disk holds may differ from what we think (a root page
    /// that may or may not have landed, pages claimed for it, an unfinished-operation
    /// marker). Unload then leaves the store dirty so the next load recovers it.
    pub tainted: bool,
    /// Shadow pages whose in-place write was issued (page, zero it when retired): retired
    /// once a flush started after that write completed.
    pub shadows: Vec<(u32, bool)>,
}

pub(crate) struct StoreInner {
    pub dev: Arc<dyn BsDev>,
    pub geo: Geo,
    pub align: usize,
    pub md_lock: async_lock::Mutex<()>,
    /// Masks, claims and stale clusters, behind their own lock.
    pub alloc: Allocator,
    /// Open blobs and the snapshot/clone relations, behind their own lock.
    pub graph: Graph,
    pub st: Mutex<StoreState>,
    pub factory: Option<Arc<dyn EsnapDevFactory>>,
    /// Writes the store completed (md pages, cluster data of an allocation, clearing),
    /// counted; `durable_seq` is the count a completed flush covers. A commit write is
    /// preceded by a flush unless every counted write is covered.
    pub write_seq: AtomicU64,
    /// The `write_seq` read when the latest completed flush started.
    pub durable_seq: AtomicU64,
    /// Concurrent barriers and client flushes share device flushes.
    pub flushes: FlushGroup,
    /// The count of deferred (uncommitted) cluster allocations.
    pub committer: Committer,
    /// Cluster-sized buffers for copy-on-write through memory.
    pub bufs: BufPool,
    /// The device's io unit is smaller than an md page, so a 4 KiB in-place write may tear:
    /// such writes are preceded by a durable shadow copy.
    pub shadowed: bool,
}

pub(crate) fn io_err(e: std::io::Error) -> BsError {
    BsError::Io(e)
}

/// Pages per read of a [`PageCache`] (256 KiB).
const CACHE_CHUNK: u32 = 64;
/// Reads issued together when a [`PageCache`] misses: a window of 512 KiB read as two
/// concurrent reads (measured on the 2-core VM, 10,000 blobs: two beat one and four).
const CACHE_DEPTH: u32 = 2;
/// Windows a [`PageCache`] keeps (2 MiB), so that a chain or extent page near the page a
/// scan is at, behind or ahead of it, is usually a hit.
const CACHE_WINDOWS: usize = 4;

/// Reads md pages for scans: a miss reads the window around the page as [`CACHE_DEPTH`]
/// concurrent reads, and the last [`CACHE_WINDOWS`] windows stay cached.
pub(crate) struct PageCache<'a> {
    dev: &'a dyn BsDev,
    geo: &'a Geo,
    align: usize,
    /// (first page, pages) per window, most recently used last.
    windows: Vec<(u32, Vec<IoBuf>)>,
    /// The buffers of the last evicted window, reused by the next read: a fresh large
    /// allocation costs a page fault per page (as much as the read itself here).
    spare: Vec<IoBuf>,
}

impl<'a> PageCache<'a> {
    pub(crate) fn new(dev: &'a dyn BsDev, geo: &'a Geo, align: usize) -> PageCache<'a> {
        PageCache {
            dev,
            geo,
            align,
            windows: Vec::with_capacity(CACHE_WINDOWS),
            spare: Vec::new(),
        }
    }

    /// Reads the window starting at page `base` (up to the end of the md region).
    async fn read_window(&mut self, base: u32) -> Result<Vec<IoBuf>> {
        let end = (base + CACHE_CHUNK * CACHE_DEPTH).min(self.geo.md_len);
        let mut spare = std::mem::take(&mut self.spare);
        let reads = (base..end).step_by(CACHE_CHUNK as usize).map(|b| {
            let len = CACHE_CHUNK.min(end - b) as usize * PAGE;
            let buf = match spare.pop() {
                Some(buf) if buf.len() == len => buf,
                _ => IoBuf::new(len, self.align),
            };
            self.dev.read(self.geo.page_lba(b), buf)
        });
        futures::future::join_all(reads)
            .await
            .into_iter()
            .map(|r| r.map_err(io_err))
            .collect()
    }

    pub(crate) async fn get(&mut self, p: u32) -> Result<&[u8]> {
        if p >= self.geo.md_len {
            return Err(corrupt(format!(
                "md page {p} is outside the md region ({} pages)",
                self.geo.md_len
            )));
        }
        let span = CACHE_CHUNK * CACHE_DEPTH;
        let base = p - p % span;
        match self.windows.iter().position(|(b, _)| *b == base) {
            Some(i) => {
                let w = self.windows.remove(i);
                self.windows.push(w);
            }
            None => {
                if self.windows.len() == CACHE_WINDOWS {
                    self.spare = self.windows.remove(0).1;
                }
                let bufs = self.read_window(base).await?;
                self.windows.push((base, bufs));
            }
        }
        let Some((_, bufs)) = self.windows.last() else {
            return Err(corrupt("md page cache is empty"));
        };
        let off = p - base;
        let buf = &bufs[(off / CACHE_CHUNK) as usize];
        let o = (off % CACHE_CHUNK) as usize * PAGE;
        buf.get(o..o + PAGE)
            .ok_or_else(|| corrupt("md page cache: short window"))
    }
}

impl StoreInner {
    pub(crate) fn state(&self) -> MutexGuard<'_, StoreState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn check_live(&self) -> Result<()> {
        if self.state().unloaded {
            return Err(BsError::BadHandle("the blobstore was unloaded".into()));
        }
        Ok(())
    }

    pub(crate) async fn read_md_page(&self, p: u32) -> Result<Vec<u8>> {
        if p >= self.geo.md_len {
            return Err(corrupt(format!(
                "md page {p} is outside the md region ({} pages)",
                self.geo.md_len
            )));
        }
        let buf = IoBuf::new(PAGE, self.align);
        let buf = self
            .dev
            .read(self.geo.page_lba(p), buf)
            .await
            .map_err(io_err)?;
        Ok(buf.to_vec())
    }

    pub(crate) async fn write_md_page(&self, p: u32, data: &[u8]) -> Result<()> {
        let buf = IoBuf::from_slice(data, self.align);
        let r = self.dev.write(self.geo.page_lba(p), buf).await;
        self.note_write();
        if let Err(e) = r {
            self.state().tainted = true;
            return Err(io_err(e));
        }
        Ok(())
    }

    /// Records that the store wrote to the device (after the write completed, so that a
    /// flush started later covers it).
    pub(crate) fn note_write(&self) {
        self.write_seq.fetch_add(1, Ordering::SeqCst);
    }

    /// Makes every write completed so far durable (a flush), unless a test switched this
    /// kind of barrier off. A failed flush taints the store: what reached the disk is
    /// unknown, so the next load recovers.
    pub(crate) async fn barrier(&self, kind: Barrier) -> Result<()> {
        #[cfg(feature = "testing")]
        if crate::testing::barrier_skipped(kind) {
            return Ok(());
        }
        let _ = kind;
        let r = self.grouped_flush().await;
        if r.is_err() {
            self.state().tainted = true;
        }
        r
    }

    /// One device flush shared by every caller waiting for it: a caller is covered by a
    /// flush that started after its call (so after every write that completed before it).
    /// Shadows whose in-place write completed before the flush started are retired after it.
    async fn grouped_flush(&self) -> Result<()> {
        let ticket = self.flushes.ticket();
        let _g = self.flushes.lock().await;
        if self.flushes.covered(ticket) {
            return Ok(());
        }
        let issued = self.flushes.issued();
        let (retire, zeroed) = self.take_unflushed();
        let seq = self.write_seq.load(Ordering::SeqCst);
        if let Err(e) = self.dev.flush().await {
            self.state().shadows.extend(retire);
            self.alloc.lock().zeroing.extend(zeroed);
            return Err(io_err(e));
        }
        self.durable_seq.fetch_max(seq, Ordering::SeqCst);
        self.flushes.complete(issued);
        self.retire_shadows(retire).await;
        Ok(())
    }

    /// Writes a shadow copy of a page about to be written in place, when such a write may
    /// tear; the caller then flushes before the in-place write and hands the page to
    /// [`issued_shadow`](Self::issued_shadow) after it.
    pub(crate) async fn write_shadow(&self, bytes: &[u8]) -> Result<Option<u32>> {
        if !self.shadowed {
            return Ok(None);
        }
        let kind = Barrier::Shadow;
        #[cfg(feature = "testing")]
        if crate::testing::barrier_skipped(kind) {
            return Ok(None);
        }
        let _ = kind;
        let p = self.alloc_md_page()?;
        if let Err(e) = self.write_md_page(p, bytes).await {
            self.free_md_page(p);
            return Err(e);
        }
        Ok(Some(p))
    }

    /// What a flush about to start settles: the shadows to retire after it and the zeroed
    /// pages that it makes durable.
    fn take_unflushed(&self) -> (Vec<(u32, bool)>, BTreeSet<u32>) {
        let shadows = std::mem::take(&mut self.state().shadows);
        (shadows, std::mem::take(&mut self.alloc.lock().zeroing))
    }

    /// The in-place write a shadow covers was issued: retire the shadow after the next flush.
    pub(crate) fn issued_shadow(&self, p: Option<u32>, zero: bool) {
        if let Some(p) = p {
            self.state().shadows.push((p, zero));
        }
    }

    /// The writes these shadows covered are durable: md-page shadows are zeroed (a stale one
    /// must never be taken for the copy of a later write), super block shadows are only
    /// freed (they are matched by content).
    async fn retire_shadows(&self, retire: Vec<(u32, bool)>) {
        for (p, zero) in retire {
            if zero && self.write_md_page(p, &[0u8; PAGE]).await.is_err() {
                // Left claimed: the store is tainted and the next load clears it.
                continue;
            }
            self.free_md_page(p);
            if zero {
                self.alloc.lock().zeroing.insert(p);
            }
        }
    }

    /// A client flush: everything written so far is durable.
    pub(crate) async fn flush_all(&self) -> Result<()> {
        self.grouped_flush().await
    }

    /// A client flush of a blob (`Blob::flush`): the store's deferred allocations are
    /// committed (behind the `PreCommit` flush that makes their data durable), then a device
    /// flush makes everything written so far durable, their map changes included. A failed
    /// commit fails the flush and leaves the allocations pending (the next flush retries).
    pub(crate) async fn flush_blob(&self) -> Result<()> {
        if self.committer.pending() != 0 {
            let _m = self.md_lock.lock().await;
            self.commit_all_locked().await?;
        }
        self.flush_all().await
    }

    /// The barrier before a commit write: flushes only if the store wrote since the start
    /// of its last completed flush (new md pages, new cluster data, cleared clusters).
    pub(crate) async fn pre_commit(&self) -> Result<()> {
        if self.durable_seq.load(Ordering::SeqCst) < self.write_seq.load(Ordering::SeqCst) {
            self.barrier(Barrier::PreCommit).await?;
        }
        Ok(())
    }

    pub(crate) async fn read_super(&self) -> Result<SuperBlockInfo> {
        let n = PAGE as u64 / u64::from(self.geo.io_unit);
        let _ = n;
        let buf = IoBuf::new(PAGE, self.align);
        let buf = self.dev.read(0, buf).await.map_err(io_err)?;
        let s = parse_super(&buf)?;
        validate_super(&s, self.dev.as_ref(), None)?;
        Ok(s)
    }

    async fn write_super(&self, s: &SuperBlockInfo) -> Result<()> {
        let b = write_super(s);
        let r = self.dev.write(0, IoBuf::from_slice(&b, self.align)).await;
        self.note_write();
        r.map_err(io_err)?;
        Ok(())
    }

    /// Rewrites the super block after patching it; re-reads and validates first.
    /// When the super block write may tear, copies of the old and the new super block are
    /// made durable first: a torn super block keeps one version's fields in its first io
    /// unit, and load takes the copy whose first io unit matches.
    pub(crate) async fn update_super(&self, f: impl FnOnce(&mut SuperBlockInfo)) -> Result<()> {
        let mut s = self.read_super().await?;
        let old = write_super(&s);
        f(&mut s);
        let mut shadows = [None, None];
        if self.shadowed {
            shadows[0] = self.write_shadow(&old).await?;
            shadows[1] = match self.write_shadow(&write_super(&s)).await {
                Ok(p) => p,
                Err(e) => {
                    self.issued_shadow(shadows[0], false);
                    return Err(e);
                }
            };
            let r = self.barrier(Barrier::PreCommit).await;
            if let Err(e) = r {
                for p in shadows {
                    self.issued_shadow(p, false);
                }
                return Err(e);
            }
        }
        let r = self.write_super(&s).await;
        for p in shadows {
            self.issued_shadow(p, false);
        }
        r?;
        self.state().sbi = s;
        Ok(())
    }

    /// Marks the super block dirty before the first md write (md_lock held).
    pub(crate) async fn mark_dirty(&self) -> Result<()> {
        if !self.state().clean_on_disk {
            return Ok(());
        }
        let size = self.state().sbi.size;
        let dev_bytes = u64::from(self.dev.block_len()) * self.dev.block_count();
        self.update_super(|s| {
            s.clean = 0;
            if size == 0 {
                s.size = dev_bytes;
            }
        })
        .await?;
        self.barrier(Barrier::DirtyMark).await?;
        self.state().clean_on_disk = false;
        Ok(())
    }

    /// Writes a blob's metadata (md_lock held): new and changed extent pages to fresh pages,
    /// continuation pages to fresh pages, then the root page (the commit point), then frees
    /// what the old version used. Returns the new chain and extent-page list.
    pub(crate) async fn persist_md(
        &self,
        id: BlobId,
        md: &BlobMd,
        old_chain: &[u32],
        ep_dirty: &BTreeSet<usize>,
        pending_clusters: &[u32],
    ) -> Result<(Vec<u32>, EpMap)> {
        let root = blobid_to_page(id).ok_or_else(|| einval(format!("bad blob id {id:#x}")))?;
        self.mark_dirty().await?;
        let mut md = md.clone();
        let mut new_pages: Vec<u32> = Vec::new();
        let mut old_eps: Vec<u32> = Vec::new();
        let res = async {
            if md.use_et() {
                let n = md.num_chunks();
                if md.eps.len() > n {
                    old_eps.extend(md.eps.pages_from(n));
                }
                md.eps.resize(n);
                // A thick blob has a page per chunk; a thin one only where it has a page or
                // owns a cluster (so a huge thin blob costs what it owns).
                let chunks: Vec<usize> = if md.thin() {
                    let set: BTreeSet<usize> = md
                        .eps
                        .pages()
                        .map(|(k, _)| k)
                        .chain(md.clusters.allocated_chunks())
                        .filter(|&k| k < n)
                        .collect();
                    set.into_iter().collect()
                } else {
                    (0..n).collect()
                };
                for k in chunks {
                    let needs = !md.thin() || md.chunk_needs_page(k);
                    if !needs {
                        continue;
                    }
                    let cur = md.eps.get(k);
                    if cur != 0 && !ep_dirty.contains(&k) {
                        continue;
                    }
                    let p = self.alloc_md_page_from(1)?;
                    new_pages.push(p);
                    let page =
                        build_extent_page(id, (k * EXTENTS_PER_EP) as u32, md.chunk_entries(k));
                    self.write_md_page(p, &page).await?;
                    if cur != 0 {
                        old_eps.push(cur);
                    }
                    md.eps.set(k, p);
                }
            } else {
                old_eps.extend(md.eps.pages().map(|(_, p)| p));
                md.eps.clear();
            }
            let mut pages = md.serialize(id)?;
            let mut chain = vec![root];
            for _ in 1..pages.len() {
                let p = self.alloc_md_page()?;
                new_pages.push(p);
                chain.push(p);
            }
            for (i, page) in pages.iter_mut().enumerate() {
                let next = chain.get(i + 1).copied().unwrap_or(INVALID_PAGE);
                wr_u32(page, NEXT_OFF, next);
                seal_page(page);
            }
            for i in 1..pages.len() {
                self.write_md_page(chain[i], &pages[i]).await?;
            }
            Ok::<_, BsError>((chain, pages))
        }
        .await;
        let (chain, pages) = match res {
            Ok(v) => v,
            Err(e) => {
                for p in new_pages {
                    self.free_md_page(p);
                }
                return Err(e);
            }
        };
        // New pages, the data of new clusters and the root's shadow (if the root may tear)
        // are durable before the commit point.
        let shadow = match self.write_shadow(&shadow_of(&pages[0])).await {
            Ok(sh) => sh,
            Err(e) => {
                for p in new_pages {
                    self.free_md_page(p);
                }
                return Err(e);
            }
        };
        if let Err(e) = self.pre_commit().await {
            for p in new_pages {
                self.free_md_page(p);
            }
            self.issued_shadow(shadow, true);
            return Err(e);
        }
        // The commit point. On failure the new pages stay claimed (we cannot know whether
        // the root reached the disk); recovery sorts them out.
        let r = self.write_md_page(root, &pages[0]).await;
        self.issued_shadow(shadow, true);
        r?;
        // Durable before we return, and before the old pages and clusters are freed: a
        // freed cluster may be reused at once, so the root that dropped it must not be lost.
        self.barrier(Barrier::PostCommit).await?;
        let mut stale: Vec<u32> = old_chain
            .iter()
            .skip(1)
            .copied()
            .filter(|p| !chain.contains(p))
            .collect();
        stale.extend(old_eps);
        self.release_md_pages(&stale).await;
        self.release_clusters(pending_clusters, md.clear_method())
            .await;
        Ok((chain, md.eps))
    }

    /// Deletes a blob's metadata (md_lock held): zeroes the root first (the commit point),
    /// then the other pages, then releases clusters.
    /// Deletes a blob already dropped from the in-memory listing (md_lock held); if the
    /// delete cannot be written, it is retried at unload.
    pub(crate) async fn delete_or_doom(&self, id: BlobId, md: &BlobMd, chain: &[u32]) {
        if let Err(e) = self.persist_delete(id, md, chain).await {
            tracing::warn!(target: "blob", "deleting blob {id:#x} failed, retried at unload: {e}");
            self.state().doomed.push((id, md.clone(), chain.to_vec()));
        }
    }

    pub(crate) async fn persist_delete(
        &self,
        id: BlobId,
        md: &BlobMd,
        chain: &[u32],
    ) -> Result<()> {
        let root = blobid_to_page(id).ok_or_else(|| einval(format!("bad blob id {id:#x}")))?;
        self.mark_dirty().await?;
        // A zeroing of the root torn by a power cut must read as a delete, not as damage.
        let tomb = self.write_shadow(&tombstone(id)).await?;
        if let Err(e) = self.pre_commit().await {
            self.issued_shadow(tomb, true);
            return Err(e);
        }
        let r = self.write_md_page(root, &vec![0u8; PAGE]).await;
        self.issued_shadow(tomb, true);
        r?;
        self.barrier(Barrier::PostCommit).await?;
        let mut pages: Vec<u32> = chain.iter().skip(1).copied().collect();
        pages.extend(md.eps.pages().map(|(_, p)| p));
        self.release_md_pages(&pages).await;
        self.free_md_page(root);
        let cs: Vec<u32> = md.clusters.allocated().map(|(_, c)| c).collect();
        self.release_clusters(&cs, md.clear_method()).await;
        Ok(())
    }

    /// Reads and checks a blob's chain and extent pages (md_lock held or blob not open).
    pub(crate) async fn load_blob_md(&self, id: BlobId) -> Result<(BlobMd, Vec<u32>)> {
        let root = blobid_to_page(id)
            .filter(|&p| p < self.geo.md_len)
            .ok_or_else(|| enoent(format!("blob {id:#x} does not exist")))?;
        if !self.alloc.lock().used_blobids.get(u64::from(root)) {
            return Err(enoent(format!("blob {id:#x} does not exist")));
        }
        let mut pages = Vec::new();
        let mut chain = Vec::new();
        let mut p = root;
        let mut seen = HashSet::new();
        loop {
            if !seen.insert(p) {
                return Err(corrupt(format!("blob {id:#x}: md chain loops at page {p}")));
            }
            let raw = self.read_md_page(p).await?;
            let info = parse_md_page(&raw)?;
            if !info.crc_ok {
                return Err(corrupt(format!("blob {id:#x}: bad crc in md page {p}")));
            }
            if chain.is_empty() && info.id != id {
                return Err(enoent(format!(
                    "blob {id:#x}: md page {p} belongs to {:#x}",
                    info.id
                )));
            }
            chain.push(p);
            let next = info.next;
            pages.push(info);
            if next == INVALID_PAGE {
                break;
            }
            if next >= self.geo.md_len {
                return Err(corrupt(format!(
                    "blob {id:#x}: md page {p} points to page {next} outside the md region"
                )));
            }
            p = next;
        }
        let total = self.alloc.lock().total_clusters;
        let ci = parse_chain(id, &pages, total)?;
        let mut md = ci.md;
        if let Some((num, entries)) = ci.table {
            md.clusters = ClusterMap::default();
            md.eps.clear();
            let mut remaining = num;
            for (pidx, npages) in entries {
                if pidx == 0 {
                    if !md.thin() {
                        return Err(corrupt(format!(
                            "blob {id:#x}: unallocated extent pages in a thick blob"
                        )));
                    }
                    // A run of chunks without pages: no memory for them.
                    let n = remaining.min(u64::from(npages) * EXTENTS_PER_EP as u64);
                    md.clusters.push_zeros(n as usize);
                    md.eps
                        .push_zeros(n.div_ceil(EXTENTS_PER_EP as u64) as usize);
                    remaining -= n;
                    continue;
                }
                let raw = self.read_md_page(pidx).await?;
                let info = parse_md_page(&raw)?;
                if !info.crc_ok {
                    return Err(corrupt(format!(
                        "blob {id:#x}: bad crc in extent page {pidx}"
                    )));
                }
                if info.next != INVALID_PAGE {
                    return Err(corrupt(format!(
                        "blob {id:#x}: extent page {pidx} has a next pointer"
                    )));
                }
                let (start, entries) = extent_page_contents(&info).ok_or_else(|| {
                    enoent(format!(
                        "blob {id:#x}: md page {pidx} is not an extent page"
                    ))
                })?;
                if start as usize != md.clusters.len() {
                    return Err(corrupt(format!(
                        "blob {id:#x}: extent page {pidx} starts at cluster {start}, expected {}",
                        md.clusters.len()
                    )));
                }
                if entries.len() > EXTENTS_PER_EP || entries.len() as u64 > remaining {
                    return Err(corrupt(format!(
                        "blob {id:#x}: extent page {pidx} holds {} entries, more than the table allows",
                        entries.len()
                    )));
                }
                md.clusters.push_slice(entries);
                md.eps.push(pidx);
                remaining -= entries.len() as u64;
            }
        }
        let st = self.alloc.lock();
        if !md.thin() && md.clusters.count_allocated() != md.clusters.len() as u64 {
            let i = md.clusters.next_unallocated(0).unwrap_or(0);
            return Err(corrupt(format!(
                "blob {id:#x}: cluster {i} unallocated in a thick blob"
            )));
        }
        for (i, c) in md.clusters.allocated() {
            if u64::from(c) >= st.total_clusters
                || u64::from(c) < self.geo.md_clusters
                || !st.used_clusters.get(u64::from(c))
            {
                return Err(corrupt(format!(
                    "blob {id:#x}: cluster {i} maps to cluster {c}, which is not a used data cluster"
                )));
            }
        }
        drop(st);
        Ok((md, chain))
    }

    /// Opens a blob (md_lock held). An open blob gets `open_ref + 1`.
    pub(crate) fn open_locked(
        self: &Arc<Self>,
        id: BlobId,
    ) -> BoxFuture<'_, Result<Arc<BlobInner>>> {
        self.open_chain(id, Vec::new())
    }

    /// Opens `id`; `children` are the clones being opened below it (cycle and depth guard).
    fn open_chain(
        self: &Arc<Self>,
        id: BlobId,
        mut children: Vec<BlobId>,
    ) -> BoxFuture<'_, Result<Arc<BlobInner>>> {
        async move {
            if children.contains(&id) {
                return Err(corrupt(format!(
                    "blob {id:#x}: snapshot chain loops back to itself"
                )));
            }
            if children.len() >= MAX_CHAIN_DEPTH {
                return Err(corrupt(format!(
                    "blob {id:#x}: snapshot chain deeper than {MAX_CHAIN_DEPTH}"
                )));
            }
            if let Some(b) = self.graph.lock().open.get(&id).cloned() {
                b.lock().open_ref += 1;
                return Ok(b);
            }
            let (md, chain) = self.load_blob_md(id).await?;
            let data_ro = md.data_ro != 0;
            let md_ro = data_ro || md.md_ro & !MD_RO_CLEAR_MASK != 0;
            let back = if md.esnap() {
                let f = self.factory.clone().ok_or_else(|| {
                    BsError::NotSupported(format!(
                        "blob {id:#x} is an esnap clone and no esnap device factory was given"
                    ))
                })?;
                let eid = md
                    .get_internal(XATTR_EXTSNAP)
                    .ok_or_else(|| einval(format!("esnap clone {id:#x} has no EXTSNAP xattr")))?
                    .to_vec();
                let dev = f.create(id, &eid).await?;
                if let Some(d) = &dev {
                    self.check_esnap_dev(d.as_ref())?;
                }
                Back::Esnap(dev)
            } else if let Some(p) = md.snap_parent()? {
                children.push(id);
                Back::Snapshot(self.open_chain(p, children).await?)
            } else if md.thin() {
                Back::Zeroes
            } else {
                Back::None
            };
            let inner = Arc::new(BlobInner::new(
                id,
                self.clone(),
                BlobState::new(md, chain, data_ro, md_ro, back),
            ));
            self.graph.lock().open.insert(id, inner.clone());
            Ok(inner)
        }
        .boxed()
    }

    pub(crate) fn check_esnap_dev(&self, d: &dyn BsDev) -> Result<()> {
        let bl = d.block_len();
        if bl == 0 || !self.geo.io_unit.is_multiple_of(bl) {
            return Err(einval(format!(
                "esnap device block size {bl} does not divide the io unit {}",
                self.geo.io_unit
            )));
        }
        Ok(())
    }

    /// Drops one open reference (md_lock held); persists dirty md first.
    pub(crate) fn close_locked(self: &Arc<Self>, b: Arc<BlobInner>) -> BoxFuture<'_, Result<()>> {
        async move {
            {
                let s = b.lock();
                if s.open_ref == 0 {
                    return Err(BsError::BadHandle(format!("blob {:#x} is not open", b.id)));
                }
            }
            // The reference is dropped even when the persist fails: the handle is consumed
            // by every caller, so a kept reference could never be released (EBUSY at unload).
            // The last close commits the blob's deferred allocations (a whole-md write for
            // dirty md covers them too); while other handles stay open, their flushes do.
            let (dirty, last) = {
                let s = b.lock();
                (s.dirty, s.open_ref == 1)
            };
            let r = if dirty {
                b.persist_locked().await
            } else if last {
                self.commit_blob_locked(&b).await
            } else {
                Ok(())
            };
            let back = {
                let mut s = b.lock();
                s.open_ref -= 1;
                if s.open_ref > 0 {
                    return r;
                }
                std::mem::replace(&mut s.back, Back::None)
            };
            // Leaving memory: what is still uncommitted (a failed commit) is given up and
            // the store left for recovery at the next load (the clusters are free there).
            b.abandon_uncommitted();
            self.graph.lock().open.remove(&b.id);
            if let Back::Snapshot(p) = back {
                let rp = self.close_locked(p).await;
                r.and(rp)
            } else {
                r
            }
        }
        .boxed()
    }
}
