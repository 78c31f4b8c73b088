//! An open blob: its in-memory state, the back device chain and the I/O path
//! (read-through, allocate-on-write, copy-on-write, unmap release).

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use futures::FutureExt;
use iobuf::IoBuf;

use crate::error::{einval, eperm};
use crate::format::*;
use crate::md::BlobMd;
use crate::store::{io_err, StoreInner};
use crate::{BlobId, BsDev, BsError, Result};

/// Where unallocated clusters read from.
pub(crate) enum Back {
    /// Thick blob.
    None,
    /// Parentless thin blob.
    Zeroes,
    /// Clone: the open parent snapshot.
    Snapshot(Arc<BlobInner>),
    /// Esnap clone: the external device, if there is one now.
    Esnap(Option<Arc<dyn BsDev>>),
}

impl Back {
    pub(crate) fn clone_ref(&self) -> BackRef {
        match self {
            Back::None | Back::Zeroes => BackRef::Zeroes,
            Back::Snapshot(b) => BackRef::Snapshot(b.clone()),
            Back::Esnap(d) => BackRef::Esnap(d.clone()),
        }
    }
}

/// A cheap copy of the back device taken out of the lock for one I/O.
pub(crate) enum BackRef {
    Zeroes,
    Snapshot(Arc<BlobInner>),
    Esnap(Option<Arc<dyn BsDev>>),
}

pub(crate) struct BlobState {
    pub md: BlobMd,
    pub chain: Vec<u32>,
    pub dirty: bool,
    pub gen: u64,
    pub ep_dirty: BTreeSet<usize>,
    pub data_ro: bool,
    pub md_ro: bool,
    pub open_ref: u32,
    pub back: Back,
    pub pending_clusters: Vec<u32>,
    /// Map entries set by an acknowledged allocating write whose map change is not written
    /// yet (index -> cluster; `commit.rs`). They count as allocated for every request; a
    /// client flush, a metadata operation of the blob, its close or the store's bound on
    /// pending allocations commits them. A failed commit keeps them (and their clusters).
    pub uncommitted: std::collections::BTreeMap<usize, u32>,
    /// The cluster map as on disk before the first unsynced resize; a failed md write
    /// restores it.
    pub saved_clusters: Option<crate::md::ClusterMap>,
}

impl BlobState {
    pub(crate) fn new(md: BlobMd, chain: Vec<u32>, data_ro: bool, md_ro: bool, back: Back) -> Self {
        BlobState {
            md,
            chain,
            dirty: false,
            gen: 0,
            ep_dirty: BTreeSet::new(),
            data_ro,
            md_ro,
            open_ref: 1,
            back,
            pending_clusters: Vec::new(),
            uncommitted: std::collections::BTreeMap::new(),
            saved_clusters: None,
        }
    }
    pub(crate) fn touch(&mut self) {
        self.dirty = true;
        self.gen += 1;
    }
}

pub(crate) struct BlobInner {
    pub id: BlobId,
    pub bs: Arc<StoreInner>,
    pub freeze: crate::freeze::Freeze,
    /// Per-cluster allocation locks: allocations of different clusters run in parallel,
    /// two of the same cluster never do.
    alloc: Mutex<std::collections::HashMap<usize, Arc<async_lock::Mutex<()>>>>,
    st: Mutex<BlobState>,
    /// What the direct path reads without the lock, kept in step with `st` by
    /// [`StateGuard`] (`live.rs`).
    live: crate::live::LiveMap,
}

/// The blob's state, locked; on release the lock-free mirror is brought in step with
/// whatever changed (the one place every change of the state goes through). A guard only
/// read through (`Deref`) changed nothing (`BlobState` has no interior mutability), and its
/// release checks nothing.
pub(crate) struct StateGuard<'a> {
    blob: &'a BlobInner,
    g: MutexGuard<'a, BlobState>,
    /// Lent mutably (`DerefMut`): the mirror is checked on release.
    changed: bool,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = BlobState;
    fn deref(&self) -> &BlobState {
        &self.g
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut BlobState {
        self.changed = true;
        &mut self.g
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        if self.changed {
            self.blob.live.sync(&mut self.g, &self.blob.freeze);
        }
    }
}

/// Holds a cluster's allocation lock; drops the map entry when nobody else wants it.
struct ClusterGuard<'a> {
    blob: &'a BlobInner,
    idx: usize,
    _g: Option<async_lock::MutexGuardArc<()>>,
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.blob.alloc.lock().unwrap_or_else(|e| e.into_inner());
        self._g = None;
        if let Some(m) = map.get(&self.idx) {
            // Only the map holds it: nobody is waiting.
            if Arc::strong_count(m) == 1 {
                map.remove(&self.idx);
            }
        }
    }
}

/// Where a single-cluster request goes when it needs nothing of the general path.
#[derive(Clone, Copy)]
pub enum DirectTarget<'a> {
    /// The store's device, at this LBA (the blob's allocated cluster).
    Dev(u64),
    /// Reads as zeroes (an unallocated cluster with nothing behind it).
    Zero,
    /// The esnap clone's external device, at this LBA (in the device's blocks), borrowed
    /// for as long as the [`Direct`] it came from holds the blob's freeze.
    Esnap(&'a dyn BsDev, u64),
}

/// A request of a blob allowed to bypass the general I/O path: while it lives, the blob's
/// freeze is held shared, as by [`BlobInner::read`] and [`BlobInner::write`], so nothing
/// that moves the blob's clusters (snapshot, resize, set_parent, inflate, decouple, merge,
/// esnap swap, an unmap that releases) runs until the request that took it is done (see
/// [`crate::Blob::direct`]).
pub struct Direct<'a> {
    /// Valid while `_hold` is: private, and lent out only for a borrow of `self`.
    target: DirectTarget<'a>,
    _hold: crate::freeze::ReadGuard<'a>,
}

impl Direct<'_> {
    /// Where the request goes (for as long as this hold lives).
    #[inline]
    pub fn target(&self) -> DirectTarget<'_> {
        self.target
    }
}

impl<'a> Direct<'a> {
    /// The hold alone (one word), for a request sent to [`DirectTarget::Dev`] that must keep
    /// the cluster where it is until the request ends.
    #[inline]
    pub fn into_hold(self) -> impl Send + 'a {
        self._hold
    }

    /// The target and the hold apart (the hold is one word), for a request that keeps the
    /// hold until it ends.
    ///
    /// # Safety
    /// The target's [`DirectTarget::Esnap`] device is valid only while the hold lives: the
    /// caller must not use it (nor anything borrowed from it) once the hold is dropped.
    #[inline]
    pub unsafe fn into_parts(self) -> (DirectTarget<'a>, impl Send + 'a) {
        (self.target, self._hold)
    }
}

/// One piece of an I/O inside a single cluster.
struct Seg {
    cluster: usize,
    /// io_unit offset inside the cluster.
    off: u64,
    /// io_units.
    len: u64,
    /// byte offset inside the user buffer.
    buf_off: usize,
}

impl BlobInner {
    pub(crate) fn new(id: BlobId, bs: Arc<StoreInner>, mut st: BlobState) -> Self {
        let freeze = crate::freeze::Freeze::new();
        let live = crate::live::LiveMap::new(&mut st, &freeze);
        BlobInner {
            id,
            bs,
            freeze,
            alloc: Mutex::new(std::collections::HashMap::new()),
            st: Mutex::new(st),
            live,
        }
    }

    /// Takes the allocation lock of cluster `idx`.
    async fn lock_cluster(&self, idx: usize) -> ClusterGuard<'_> {
        let m = {
            let mut map = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(idx).or_default().clone()
        };
        let g = m.lock_arc().await;
        ClusterGuard {
            blob: self,
            idx,
            _g: Some(g),
        }
    }

    pub(crate) fn lock(&self) -> StateGuard<'_> {
        StateGuard {
            blob: self,
            g: self.st.lock().unwrap_or_else(|e| e.into_inner()),
            changed: false,
        }
    }

    /// The mirror's flags ([`crate::live::LiveMap::flags`]), read without the lock.
    #[inline]
    pub(crate) fn live_flags(&self) -> u32 {
        self.live.flags()
    }

    /// Whether the lock-free mirror says what the state says (tests).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn live_map_matches(&self) -> bool {
        let s = self.lock();
        self.live.matches(&s)
    }

    pub(crate) fn num_io_units(&self) -> u64 {
        self.lock().md.clusters.len() as u64 * self.bs.geo.lba_per_cluster
    }

    fn segments(&self, offset: u64, units: u64) -> Vec<Seg> {
        let lpc = self.bs.geo.lba_per_cluster;
        let iu = self.bs.geo.io_unit as usize;
        let mut out = Vec::new();
        let mut o = offset;
        let end = offset + units;
        while o < end {
            let c = o / lpc;
            let off = o % lpc;
            let len = (lpc - off).min(end - o);
            out.push(Seg {
                cluster: c as usize,
                off,
                len,
                buf_off: (o - offset) as usize * iu,
            });
            o += len;
        }
        out
    }

    fn check_range(&self, offset: u64, bytes: usize) -> Result<u64> {
        let iu = u64::from(self.bs.geo.io_unit);
        if !(bytes as u64).is_multiple_of(iu) {
            return Err(einval(format!(
                "length {bytes} is not a multiple of the io unit {iu}"
            )));
        }
        let units = bytes as u64 / iu;
        self.check_units(offset, units)?;
        Ok(units)
    }

    fn check_units(&self, offset: u64, units: u64) -> Result<()> {
        let s = self.lock();
        if s.open_ref == 0 {
            return Err(BsError::BadHandle(format!("blob {:#x} is closed", self.id)));
        }
        let total = s.md.clusters.len() as u64 * self.bs.geo.lba_per_cluster;
        if offset.checked_add(units).is_none_or(|e| e > total) {
            return Err(einval(format!(
                "i/o at {offset}+{units} is beyond the end of blob {:#x} ({total} io units)",
                self.id
            )));
        }
        Ok(())
    }

    /// The device cluster of map entry `idx`, 0 when unallocated.
    fn cluster_at(&self, idx: usize) -> u32 {
        self.lock().md.clusters.at(idx)
    }

    /// These uncommitted entries were written (an extent page or the whole md): drops those
    /// still pointing at the same cluster from the pending set.
    pub(crate) fn committed(&self, entries: &[(usize, u32)]) {
        let mut n = 0;
        {
            let mut s = self.lock();
            for &(i, c) in entries {
                if s.uncommitted.get(&i) == Some(&c) {
                    s.uncommitted.remove(&i);
                    n += 1;
                }
            }
        }
        self.bs.committer.removed(n);
    }

    /// Drops every uncommitted entry without writing it (the blob leaves memory after a
    /// failed commit at close): the store is marked tainted, so that unload leaves it dirty
    /// and the next load rebuilds the masks from the md (the clusters are free there).
    pub(crate) fn abandon_uncommitted(&self) {
        let n = {
            let mut s = self.lock();
            let n = s.uncommitted.len();
            s.uncommitted.clear();
            n
        };
        if n != 0 {
            self.bs.state().tainted = true;
            self.bs.committer.removed(n);
        }
    }

    // ---------------------------------------------------------------- read

    /// The fast path of a single-cluster write: returns the device LBA when the whole
    /// request falls in one allocated cluster of an open writable blob. `_hold`: the blob's
    /// freeze, held shared.
    fn fast_lba(
        &self,
        _hold: &crate::freeze::ReadGuard<'_>,
        offset: u64,
        bytes: usize,
        write: bool,
    ) -> Option<u64> {
        // SAFETY: the freeze is held (`_hold`) and only an LBA leaves.
        match unsafe { self.fast_target(offset, bytes, write) }? {
            DirectTarget::Dev(lba) => Some(lba),
            DirectTarget::Esnap(..) | DirectTarget::Zero => None,
        }
    }

    /// Where a single-cluster request can go without the general path: this blob's
    /// cluster, or (a read of an unallocated cluster) zeroes or straight to the external
    /// device. Lock-free: atomic loads of the blob's mirror (`live.rs`), no reference taken.
    ///
    /// # Safety
    /// The caller holds the blob's freeze shared for as long as it uses the target (the
    /// esnap device it may borrow is the mirror's, dropped only once no hold remains).
    #[inline]
    unsafe fn fast_target(
        &self,
        offset: u64,
        bytes: usize,
        write: bool,
    ) -> Option<DirectTarget<'_>> {
        let g = &self.bs.geo;
        let iu = u64::from(g.io_unit);
        let (units, rest) = iobuf::div_rem(bytes as u64, iu);
        let (idx, off) = iobuf::div_rem(offset, g.lba_per_cluster);
        if rest != 0 || units == 0 || off + units > g.lba_per_cluster {
            return None;
        }
        let f = self.live.flags();
        if f & crate::live::OPEN == 0 || (write && f & crate::live::DATA_RO != 0) {
            return None;
        }
        let idx = idx as usize;
        // SAFETY: the freeze is held (the caller's contract).
        let c = unsafe { self.live.entry(idx) }?;
        if c != 0 {
            return Some(DirectTarget::Dev(u64::from(c) * g.lba_per_cluster + off));
        }
        if write {
            return None;
        }
        if f & crate::live::BACK_ZEROES != 0 {
            return Some(DirectTarget::Zero);
        }
        if f & crate::live::BACK_ESNAP == 0 {
            return None;
        }
        // SAFETY: as above; the caller uses the device only while it holds the freeze.
        let d = unsafe { self.live.esnap() }?;
        let bl = u64::from(d.block_len());
        let lba = iobuf::div_rem(offset * iu, bl).0;
        let n = iobuf::div_rem(bytes as u64, bl).0;
        (lba + n <= d.block_count() && !d.is_degraded()).then_some(DirectTarget::Esnap(d, lba))
    }

    /// The target of a request that can bypass the general path, with the freeze held
    /// shared; `None` when the blob is frozen (an operation holds or waits for the freeze:
    /// the general path waits for it) or the request needs the general path. No lock, no
    /// allocation, no reference count.
    #[inline]
    pub(crate) fn direct(&self, offset: u64, bytes: usize, write: bool) -> Option<Direct<'_>> {
        let hold = self.freeze.try_hold()?;
        // SAFETY: the target is kept with the hold in `Direct`, which lends it out only for
        // a borrow of itself.
        let target = unsafe { self.fast_target(offset, bytes, write) }?;
        Some(Direct {
            target,
            _hold: hold,
        })
    }

    pub(crate) async fn read(self: &Arc<Self>, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let _f = self.freeze.read().await;
        // SAFETY: `_f` is held until the target's request is done.
        match unsafe { self.fast_target(offset, buf.len(), false) } {
            Some(DirectTarget::Dev(lba)) => {
                return self.bs.dev.read(lba, buf).await.map_err(io_err)
            }
            Some(DirectTarget::Esnap(d, lba)) => return d.read(lba, buf).await.map_err(io_err),
            Some(DirectTarget::Zero) => {
                let mut buf = buf;
                buf.fill(0);
                return Ok(buf);
            }
            None => {}
        }
        let units = self.check_range(offset, buf.len())?;
        if units == 0 {
            return Ok(buf);
        }
        self.read_through(offset, buf).await
    }

    /// Reads through the chain; anything past this blob's end reads as zeroes.
    pub(crate) fn read_through(
        self: &Arc<Self>,
        offset: u64,
        mut buf: IoBuf,
    ) -> BoxFuture<'_, Result<IoBuf>> {
        async move {
            let iu = self.bs.geo.io_unit as usize;
            let units = (buf.len() / iu) as u64;
            let total = self.num_io_units();
            if offset >= total {
                buf.fill(0);
                return Ok(buf);
            }
            let inside = units.min(total - offset);
            let segs = self.segments(offset, inside);
            if segs.len() == 1 && inside == units {
                return self.read_seg(&segs[0], buf).await;
            }
            for s in &segs {
                let sub = IoBuf::new(s.len as usize * iu, self.bs.align);
                let sub = self.read_seg(s, sub).await?;
                buf[s.buf_off..s.buf_off + sub.len()].copy_from_slice(&sub);
            }
            buf[inside as usize * iu..].fill(0);
            Ok(buf)
        }
        .boxed()
    }

    async fn read_seg(self: &Arc<Self>, s: &Seg, buf: IoBuf) -> Result<IoBuf> {
        let c = self.cluster_at(s.cluster);
        let lpc = self.bs.geo.lba_per_cluster;
        if c != 0 {
            return self
                .bs
                .dev
                .read(u64::from(c) * lpc + s.off, buf)
                .await
                .map_err(io_err);
        }
        let back = self.lock().back.clone_ref();
        self.read_back(&back, s.cluster as u64 * lpc + s.off, buf)
            .await
    }

    /// Reads `buf.len()` bytes at io_unit `offset` of the back device.
    pub(crate) async fn read_back(
        &self,
        back: &BackRef,
        offset: u64,
        mut buf: IoBuf,
    ) -> Result<IoBuf> {
        match back {
            BackRef::Zeroes => {
                buf.fill(0);
                Ok(buf)
            }
            BackRef::Snapshot(p) => p.read_through(offset, buf).await,
            BackRef::Esnap(None) => Err(BsError::Degraded(format!(
                "blob {:#x}: external snapshot device is missing",
                self.id
            ))),
            BackRef::Esnap(Some(d)) => {
                if d.is_degraded() {
                    return Err(BsError::Degraded(format!(
                        "blob {:#x}: external snapshot device is degraded",
                        self.id
                    )));
                }
                let bl = u64::from(d.block_len());
                let byte = offset * u64::from(self.bs.geo.io_unit);
                let lba = byte / bl;
                let n = buf.len() as u64 / bl;
                let dev_blocks = d.block_count();
                if lba >= dev_blocks {
                    buf.fill(0);
                    return Ok(buf);
                }
                if lba + n <= dev_blocks {
                    return d.read(lba, buf).await.map_err(io_err);
                }
                let have = (dev_blocks - lba) as usize * bl as usize;
                let sub = IoBuf::new(have, self.bs.align.max(d.buf_align()));
                let sub = d.read(lba, sub).await.map_err(io_err)?;
                buf[..have].copy_from_slice(&sub);
                buf[have..].fill(0);
                Ok(buf)
            }
        }
    }

    /// Whether a cluster range of the back device is known to read as zeroes.
    fn back_is_zeroes(&self, back: &BackRef, cluster: usize) -> bool {
        match back {
            BackRef::Zeroes => true,
            BackRef::Snapshot(p) => {
                let c = p.cluster_at(cluster);
                if cluster >= p.lock().md.clusters.len() {
                    return true;
                }
                if c != 0 {
                    return false;
                }
                let pb = p.lock().back.clone_ref();
                p.back_is_zeroes(&pb, cluster)
            }
            BackRef::Esnap(Some(d)) => {
                let lpc = self.bs.geo.lba_per_cluster;
                let bl = u64::from(d.block_len()).max(1);
                let byte = cluster as u64 * lpc * u64::from(self.bs.geo.io_unit);
                let cnt = u64::from(self.bs.geo.cluster_size) / bl;
                d.is_zeroes(byte / bl, cnt)
            }
            BackRef::Esnap(None) => false,
        }
    }

    // ---------------------------------------------------------------- write

    pub(crate) async fn write(self: &Arc<Self>, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let _f = self.freeze.read().await;
        if let Some(lba) = self.fast_lba(&_f, offset, buf.len(), true) {
            return self.bs.dev.write(lba, buf).await.map_err(io_err);
        }
        self.check_writable()?;
        let units = self.check_range(offset, buf.len())?;
        if units == 0 {
            return Ok(buf);
        }
        let segs = self.segments(offset, units);
        let iu = self.bs.geo.io_unit as usize;
        let lpc = self.bs.geo.lba_per_cluster;
        if segs.len() == 1 {
            let s = &segs[0];
            let c = self.cluster_at(s.cluster);
            if c != 0 {
                return self
                    .bs
                    .dev
                    .write(u64::from(c) * lpc + s.off, buf)
                    .await
                    .map_err(io_err);
            }
            if s.off == 0 && s.len == lpc {
                return self.alloc_write_full(s.cluster, buf).await;
            }
            self.alloc_write(s.cluster, s.off, s.len, Some(&buf))
                .await?;
            return Ok(buf);
        }
        // Every cluster of the request at once: base reads, copies and writes of different
        // clusters overlap, and their allocations share commits.
        let rs = futures::future::join_all(segs.iter().map(|s| {
            let data = &buf[s.buf_off..s.buf_off + s.len as usize * iu];
            async move {
                let c = self.cluster_at(s.cluster);
                if c != 0 {
                    let sub = IoBuf::from_slice(data, self.bs.align);
                    self.bs
                        .dev
                        .write(u64::from(c) * lpc + s.off, sub)
                        .await
                        .map(|_| ())
                        .map_err(io_err)
                } else {
                    self.alloc_write(s.cluster, s.off, s.len, Some(data)).await
                }
            }
        }))
        .await;
        rs.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(buf)
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        let s = self.lock();
        if s.data_ro {
            return Err(eperm(format!("blob {:#x} is read-only", self.id)));
        }
        Ok(())
    }

    /// Checks a write_zeroes or unmap of `units` io units at `offset`: false when there is
    /// nothing to do.
    fn check_change(&self, offset: u64, units: u64) -> Result<bool> {
        self.check_writable()?;
        self.check_units(offset, units)?;
        Ok(units != 0)
    }

    pub(crate) async fn write_zeroes(self: &Arc<Self>, offset: u64, units: u64) -> Result<()> {
        if !self.check_change(offset, units)? {
            return Ok(());
        }
        let _f = self.freeze.read().await;
        let lpc = self.bs.geo.lba_per_cluster;
        let segs = self.segments(offset, units);
        let rs = futures::future::join_all(segs.iter().map(|s| async move {
            let c = self.cluster_at(s.cluster);
            if c != 0 {
                self.bs
                    .dev
                    .write_zeroes(u64::from(c) * lpc + s.off, s.len)
                    .await
                    .map_err(io_err)
            } else {
                self.alloc_write(s.cluster, s.off, s.len, None).await
            }
        }))
        .await;
        rs.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    /// Allocates cluster `idx` (copying the parent's data, or zeroes) and writes `data` (or
    /// zeroes when `None`) at io_unit `off` of it. Serialised per blob; a cluster allocated
    /// meanwhile by someone else is written directly.
    pub(crate) async fn alloc_write(
        self: &Arc<Self>,
        idx: usize,
        off: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<()> {
        let _a = self.lock_cluster(idx).await;
        let lpc = self.bs.geo.lba_per_cluster;
        let c = self.cluster_at(idx);
        if c != 0 {
            let lba = u64::from(c) * lpc + off;
            return match data {
                Some(d) => self
                    .bs
                    .dev
                    .write(lba, IoBuf::from_slice(d, self.bs.align))
                    .await
                    .map(|_| ())
                    .map_err(io_err),
                None => self.bs.dev.write_zeroes(lba, len).await.map_err(io_err),
            };
        }
        let new_c = self.fill_new_cluster(idx, off, len, data).await?;
        self.commit_cluster(idx, new_c).await
    }

    /// Claims a cluster and writes what cluster `idx` of the blob would hold after writing
    /// `data` (or zeroes when `None`) at io_unit `off`: the back data (parent, esnap or
    /// zeroes) around it. Returns the new cluster, claimed but in no map; on error it is
    /// given back.
    pub(crate) async fn fill_new_cluster(
        self: &Arc<Self>,
        idx: usize,
        off: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<u32> {
        let lpc = self.bs.geo.lba_per_cluster;
        let iu = self.bs.geo.io_unit as usize;
        let back = self.lock().back.clone_ref();
        let full = off == 0 && len == lpc;
        let new_c = self.bs.claim_cluster()?;
        let res = async {
            let s = off as usize * iu;
            let e = s + len as usize * iu;
            if let (true, Some(d)) = (full, data) {
                let buf = IoBuf::from_slice(d, self.bs.align);
                let r = self.bs.dev.write(u64::from(new_c) * lpc, buf).await;
                self.bs.note_write();
                r.map_err(io_err)?;
                return Ok(());
            }
            let zero_back = self.back_is_zeroes(&back, idx);
            // A whole cluster of zeroes (write_zeroes) needs nothing from the back device.
            if !zero_back && !full && self.copy_in_kernel(&back, idx, new_c).await {
                // The new cluster holds the back data: put the caller's bytes on top.
                let lba = u64::from(new_c) * lpc + off;
                let r = match data {
                    Some(d) => self
                        .bs
                        .dev
                        .write(lba, IoBuf::from_slice(d, self.bs.align))
                        .await
                        .map(|_| ()),
                    None => self.bs.dev.write_zeroes(lba, len).await,
                };
                self.bs.note_write();
                r.map_err(io_err)?;
                return Ok(());
            }
            // Through memory: a pooled buffer, read whole from the back device or zeroed
            // only where the caller's bytes do not go.
            let mut b = self.bs.bufs.take();
            if zero_back || full {
                b[..s].fill(0);
                b[e..].fill(0);
            } else {
                b = self.read_back(&back, idx as u64 * lpc, b).await?;
            }
            match data {
                Some(d) => b[s..e].copy_from_slice(d),
                None => b[s..e].fill(0),
            }
            let r = self.bs.dev.write(u64::from(new_c) * lpc, b).await;
            self.bs.note_write();
            self.bs.bufs.give(r.map_err(io_err)?);
            Ok::<_, BsError>(())
        }
        .await;
        if let Err(e) = res {
            self.bs.unclaim_clusters(&[new_c]);
            return Err(e);
        }
        Ok(new_c)
    }

    /// Maps copies made by [`fill_new_cluster`](Self::fill_new_cluster) (freeze held
    /// exclusively, md_lock held): each entry still unallocated gets its copy, recorded as
    /// uncommitted so that the next md write of the blob covers it; a copy whose entry a
    /// client write allocated meanwhile is given back. Returns the entries mapped.
    pub(crate) fn map_copies(&self, copies: &[(usize, u32)]) -> Vec<(usize, u32)> {
        let mut mapped = Vec::new();
        let mut unused = Vec::new();
        {
            let mut s = self.lock();
            for &(i, c) in copies {
                if s.md.clusters.get(i) == Some(0) {
                    s.md.clusters.set(i, c);
                    s.uncommitted.insert(i, c);
                    mapped.push((i, c));
                } else {
                    unused.push(c);
                }
            }
        }
        for _ in &mapped {
            self.bs.committer.added();
        }
        self.bs.unclaim_clusters(&unused);
        mapped
    }

    /// Undoes [`map_copies`](Self::map_copies) after a failed md write (freeze held
    /// exclusively, so no request saw the clusters): the entries leave the pending set and
    /// the clusters go back (the caller restored the map).
    pub(crate) fn unmap_copies(&self, mapped: &[(usize, u32)]) {
        let mut n = 0;
        {
            let mut s = self.lock();
            for &(i, c) in mapped {
                if s.uncommitted.get(&i) == Some(&c) {
                    s.uncommitted.remove(&i);
                    n += 1;
                }
            }
        }
        self.bs.committer.removed(n);
        let cs: Vec<u32> = mapped.iter().map(|&(_, c)| c).collect();
        self.bs.unclaim_clusters(&cs);
    }

    /// Copies the back data of cluster `idx` into the new cluster `new_c` inside the kernel
    /// when the store's device can copy from where that data lives (an esnap base, or the
    /// store's own device for a cluster of the parent snapshot); false when it cannot, and
    /// the caller copies through memory.
    async fn copy_in_kernel(&self, back: &BackRef, idx: usize, new_c: u32) -> bool {
        let g = &self.bs.geo;
        let cs = u64::from(g.cluster_size);
        let (src, byte) = match back {
            BackRef::Esnap(Some(d)) if !d.is_degraded() => {
                let byte = idx as u64 * cs;
                if byte + cs > u64::from(d.block_len()) * d.block_count() {
                    return false;
                }
                match d.copy_source() {
                    Some(src) => (src, byte),
                    None => return false,
                }
            }
            BackRef::Snapshot(p) => {
                let pc = p.cluster_at(idx);
                match (pc, self.bs.dev.copy_source()) {
                    (1.., Some(src)) => (src, u64::from(pc) * cs),
                    _ => return false,
                }
            }
            _ => return false,
        };
        if !self.bs.dev.can_copy_from(&src) {
            return false;
        }
        let lba = u64::from(new_c) * g.lba_per_cluster;
        let r = self
            .bs
            .dev
            .copy_from(&src, byte, lba, g.lba_per_cluster)
            .await;
        self.bs.note_write();
        if let Err(e) = &r {
            tracing::debug!(target: "blob", "in-kernel copy of cluster {idx} failed ({e}); copying through memory");
        }
        r.is_ok()
    }

    /// A write of exactly one whole unallocated cluster: no copy, the caller's buffer goes
    /// straight to the new cluster.
    async fn alloc_write_full(self: &Arc<Self>, idx: usize, buf: IoBuf) -> Result<IoBuf> {
        let _a = self.lock_cluster(idx).await;
        let lpc = self.bs.geo.lba_per_cluster;
        let c = self.cluster_at(idx);
        if c != 0 {
            return self
                .bs
                .dev
                .write(u64::from(c) * lpc, buf)
                .await
                .map_err(io_err);
        }
        let new_c = self.bs.claim_cluster()?;
        let r = self.bs.dev.write(u64::from(new_c) * lpc, buf).await;
        self.bs.note_write();
        let buf = match r {
            Ok(b) => b,
            Err(e) => {
                self.bs.unclaim_clusters(&[new_c]);
                return Err(io_err(e));
            }
        };
        self.commit_cluster(idx, new_c).await?;
        Ok(buf)
    }

    /// Puts a written cluster into the map; its commit is deferred (`commit.rs`).
    async fn commit_cluster(self: &Arc<Self>, idx: usize, new_c: u32) -> Result<()> {
        self.bs.note_allocation(self, idx, new_c).await
    }

    /// Persists a change of one cluster-map entry (md_lock held): rewrites its extent page in
    /// place when it has one and nothing else is pending, else the whole md.
    pub(crate) async fn persist_cluster_locked(&self, idx: usize) -> Result<()> {
        let (page, entries) = {
            let s = self.lock();
            let k = idx / EXTENTS_PER_EP;
            let p = s.md.eps.get(k);
            if s.dirty || !s.md.use_et() || p == 0 || !s.ep_dirty.is_empty() {
                (None, Vec::new())
            } else {
                (
                    Some((p, (k * EXTENTS_PER_EP) as u32)),
                    s.md.chunk_entries(k).to_vec(),
                )
            }
        };
        match page {
            Some((p, start)) => {
                self.bs.mark_dirty().await?;
                // The cluster's data is durable before the extent page names it. No flush
                // after: an allocating write need not be durable before a client flush (or
                // the next commit's barrier) makes it so.
                let pg = build_extent_page(self.id, start, &entries);
                let shadow = self.bs.write_shadow(&shadow_of(&pg)).await?;
                if let Err(e) = self.bs.pre_commit().await {
                    self.bs.issued_shadow(shadow, true);
                    return Err(e);
                }
                let r = self.bs.write_md_page(p, &pg).await;
                self.bs.issued_shadow(shadow, true);
                r
            }
            None => {
                self.lock().touch();
                self.persist_locked().await
            }
        }
    }

    /// Puts back the on-disk cluster map after a failed md write of a resized blob: clusters
    /// claimed by a grow are given back, clusters a shrink was to free stay the blob's.
    fn undo_resize(&self) {
        let added: Vec<u32> = {
            let mut s = self.lock();
            let Some(saved) = s.saved_clusters.take() else {
                return;
            };
            let keep: HashSet<u32> = saved.allocated().map(|(_, c)| c).collect();
            let added =
                s.md.clusters
                    .allocated()
                    .map(|(_, c)| c)
                    .filter(|c| !keep.contains(c))
                    .collect();
            s.pending_clusters.retain(|c| !keep.contains(c));
            s.md.clusters = saved;
            if s.md.use_et() {
                let n = s.md.num_chunks();
                if s.md.eps.len() > n {
                    s.md.eps.resize(n);
                }
            }
            added
        };
        self.bs.unclaim_clusters(&added);
    }

    /// Writes the whole md (md_lock held). It commits the uncommitted allocations it holds
    /// too: their chunks get new extent pages (their data was written before the map named
    /// them, so the `PreCommit` flush covers it).
    pub(crate) async fn persist_locked(&self) -> Result<()> {
        let (md, chain, mut ep_dirty, pending, gen, unc) = {
            let s = self.lock();
            (
                s.md.clone(),
                s.chain.clone(),
                s.ep_dirty.clone(),
                s.pending_clusters.clone(),
                s.gen,
                s.uncommitted
                    .iter()
                    .map(|(&i, &c)| (i, c))
                    .collect::<Vec<_>>(),
            )
        };
        if md.use_et() {
            let n = md.num_chunks();
            ep_dirty.extend(
                unc.iter()
                    .map(|&(i, _)| i / EXTENTS_PER_EP)
                    .filter(|&k| k < n),
            );
        }
        let (new_chain, eps) = match self
            .bs
            .persist_md(self.id, &md, &chain, &ep_dirty, &pending)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                self.undo_resize();
                return Err(e);
            }
        };
        self.committed(&unc);
        let mut s = self.lock();
        s.saved_clusters = None;
        s.chain = new_chain;
        s.md.eps = eps;
        s.ep_dirty.clear();
        s.pending_clusters.drain(..pending.len());
        if s.gen == gen {
            s.dirty = false;
        }
        if s.md.data_ro & DATA_RO_READ_ONLY != 0 {
            s.data_ro = true;
            s.md_ro = true;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- unmap

    pub(crate) async fn unmap(self: &Arc<Self>, offset: u64, units: u64) -> Result<()> {
        if !self.check_change(offset, units)? {
            return Ok(());
        }
        let lpc = self.bs.geo.lba_per_cluster;
        let segs = self.segments(offset, units);
        // Whether whole clusters may be given back: a thin blob with nothing behind it (only
        // an exclusive freeze changes that). A request that translated to a cluster before
        // its map entry went may still be in flight (`Blob::direct` holds only the freeze,
        // shared), and its write must not land after the cluster has a new owner: so an
        // unmap that can release holds the freeze exclusively, which waits for every request
        // in flight on the blob and holds off new ones until the release is done.
        let can_release = || {
            let st = self.lock();
            st.md.thin() && matches!(st.back, Back::Zeroes)
        };
        let wants = segs.iter().any(|s| s.len == lpc) && can_release();
        let (_shared, _exclusive) = if wants {
            (None, Some(self.freeze.write().await))
        } else {
            (Some(self.freeze.read().await), None)
        };
        // Checked again under the freeze (set_parent or decouple may have run meanwhile).
        let releasing = wants && can_release();
        for s in segs {
            let c = self.cluster_at(s.cluster);
            if c == 0 {
                continue;
            }
            let release = releasing && s.len == lpc;
            if release {
                let _a = self.lock_cluster(s.cluster).await;
                let _m = self.bs.md_lock.lock().await;
                // The blob's pending allocations first: the map written below then names
                // only committed clusters besides this change.
                self.bs.commit_blob_locked(self).await?;
                if self.cluster_at(s.cluster) != c {
                    continue;
                }
                self.lock().md.clusters.set(s.cluster, 0);
                if let Err(e) = self.persist_cluster_locked(s.cluster).await {
                    self.lock().md.clusters.set(s.cluster, c);
                    return Err(e);
                }
                // The map without the cluster is durable before the cluster can be reused.
                self.bs.barrier(crate::barrier::Barrier::PostCommit).await?;
                let cm = self.lock().md.clear_method();
                let cm = if cm == crate::ClearMethod::None {
                    crate::ClearMethod::Unmap
                } else {
                    cm
                };
                self.bs.release_clusters(&[c], cm).await;
            } else {
                self.bs
                    .dev
                    .unmap(u64::from(c) * lpc + s.off, s.len)
                    .await
                    .map_err(io_err)?;
            }
        }
        Ok(())
    }

    pub(crate) fn next_io_unit(&self, offset: u64, allocated: bool) -> Option<u64> {
        let lpc = self.bs.geo.lba_per_cluster;
        let s = self.lock();
        let first = (offset / lpc) as usize;
        let idx = if allocated {
            s.md.clusters.next_allocated(first)?
        } else {
            s.md.clusters.next_unallocated(first)?
        };
        Some(if idx == first {
            offset
        } else {
            idx as u64 * lpc
        })
    }

    pub(crate) fn is_degraded(&self) -> bool {
        if self.bs.dev.is_degraded() {
            return true;
        }
        match self.lock().back.clone_ref() {
            BackRef::Zeroes => false,
            BackRef::Snapshot(p) => p.is_degraded(),
            BackRef::Esnap(None) => true,
            BackRef::Esnap(Some(d)) => d.is_degraded(),
        }
    }
}
