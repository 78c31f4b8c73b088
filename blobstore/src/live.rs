//! The lock-free mirror of what an open blob's direct I/O path needs: the cluster map, the
//! open and read-only flags and where unallocated clusters read from.
//!
//! [`crate::blob::BlobInner::direct`] runs for every request of an lvol: it takes the
//! blob's freeze shared and reads this mirror with atomic loads only — no lock, no
//! allocation, no reference count. The blob's state ([`BlobState`], under its mutex) stays
//! the truth; the mirror is brought in step with it each time the state's lock is released
//! ([`LiveMap::sync`], called by the state guard's drop), whatever changed it: the cluster
//! map records the entries set since the mirror last matched it, and anything else (a
//! resize, a whole replacement of the map) rebuilds the mirror.
//!
//! Layout: a table of `len` entries in chunks of 512 `AtomicU32` (one extent page each),
//! grouped 512 chunks to a directory; chunks and directories exist only where a cluster is
//! allocated, as in the map, so a huge thin blob costs one pointer per 2^18 entries of
//! length. An entry is set in place; a chunk (or directory) is published into its empty
//! slot, or unlinked when its last cluster goes; the table is replaced only by a rebuild (a
//! length change, a replaced map).
//!
//! Reclamation: what is unlinked (a chunk, a table, an esnap device) is retired to the
//! blob's freeze and dropped only when no shared hold can still see it (`freeze.rs`). Every
//! reader holds the freeze shared (or the state mutex, which excludes the writer). So a
//! reader never sees freed memory, and it never sees an entry of a cluster being freed
//! either: the operations that free or move a blob's clusters (an unmap that releases, a
//! shrink, snapshot, inflate, decouple, set_parent, the merge of a delete, an esnap swap)
//! hold the freeze exclusively while they change the map, so the mirror names the new map
//! before any request can look again. An allocation runs under a shared hold: a reader
//! that does not see its entry yet finds 0 and takes the general path, which waits for the
//! state lock.

use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::blob::{Back, BlobState};
use crate::format::EXTENTS_PER_EP;
use crate::freeze::Freeze;
use crate::md::ClusterMap;
use crate::BsDev;

const CH: usize = EXTENTS_PER_EP;

/// The blob is open (`open_ref > 0`).
pub(crate) const OPEN: u32 = 1;
/// The blob's data is read-only.
pub(crate) const DATA_RO: u32 = 2;
/// Unallocated clusters read as zeroes (a thick or parentless thin blob).
pub(crate) const BACK_ZEROES: u32 = 4;
/// Unallocated clusters read from the esnap device ([`LiveMap::esnap`]).
pub(crate) const BACK_ESNAP: u32 = 8;
/// The blob's metadata is read-only (with [`DATA_RO`]: [`crate::Blob::is_read_only`]).
pub(crate) const MD_RO: u32 = 16;

static STAMPS: AtomicU64 = AtomicU64::new(1);

/// A stamp no mirror state had before (never 0).
fn fresh_stamp() -> u64 {
    STAMPS.fetch_add(1, Ordering::Relaxed)
}

struct Chunk([AtomicU32; CH]);

impl Chunk {
    fn boxed(entries: &[u32]) -> *mut Chunk {
        let c = Box::new(Chunk(std::array::from_fn(|j| {
            AtomicU32::new(entries.get(j).copied().unwrap_or(0))
        })));
        Box::into_raw(c)
    }
}

/// The chunks of [`DIR`] consecutive chunk slots; owns them.
struct Dir([AtomicPtr<Chunk>; DIR]);

/// Chunk slots per directory: a directory covers 2^18 entries.
const DIR: usize = 512;

impl Dir {
    fn boxed() -> *mut Dir {
        Box::into_raw(Box::new(Dir(std::array::from_fn(|_| {
            AtomicPtr::new(ptr::null_mut())
        }))))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        for s in &self.0 {
            let p = s.load(Ordering::Relaxed);
            if !p.is_null() {
                // SAFETY: a non-null slot holds a chunk made by `Chunk::boxed` that only this
                // directory owns (an unlinked chunk is nulled out of its slot first).
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

/// The published table: `len` entries, a directory slot per [`DIR`] chunks (null where no
/// cluster is allocated, so a huge thin blob costs a pointer per 2^18 entries); owns its
/// directories.
struct Table {
    len: usize,
    dirs: Box<[AtomicPtr<Dir>]>,
}

impl Table {
    fn build(map: &ClusterMap) -> Box<Table> {
        let dirs: Box<[AtomicPtr<Dir>]> = (0..map.len().div_ceil(CH).div_ceil(DIR))
            .map(|_| AtomicPtr::new(ptr::null_mut()))
            .collect();
        for k in map.allocated_chunks() {
            let slot = &dirs[k / DIR];
            if slot.load(Ordering::Relaxed).is_null() {
                slot.store(Dir::boxed(), Ordering::Relaxed);
            }
            // SAFETY: made just above, not shared yet.
            let d = unsafe { &*slot.load(Ordering::Relaxed) };
            d.0[k % DIR].store(Chunk::boxed(map.chunk(k)), Ordering::Relaxed);
        }
        Box::new(Table {
            len: map.len(),
            dirs,
        })
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        for s in self.dirs.iter() {
            let p = s.load(Ordering::Relaxed);
            if !p.is_null() {
                // SAFETY: a non-null slot holds a directory made by `Dir::boxed` that only
                // this table owns (an unlinked one is nulled out of its slot first).
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

/// Owner of an unlinked chunk or directory, retired to the freeze.
struct Old<T>(*mut T);

// SAFETY: chunks and directories are atomics only; the pointer is the sole owner once
// unlinked.
unsafe impl<T> Send for Old<T> {}

impl<T> Drop for Old<T> {
    fn drop(&mut self) {
        // SAFETY: made by `Box::into_raw` (`Chunk::boxed`, `Dir::boxed`), unlinked from its
        // table, dropped once.
        drop(unsafe { Box::from_raw(self.0) });
    }
}

/// The flags the mirror shows for `st`.
#[inline]
fn flags_of(st: &BlobState) -> u32 {
    let mut f = match &st.back {
        Back::None | Back::Zeroes => BACK_ZEROES,
        Back::Esnap(Some(_)) => BACK_ESNAP,
        Back::Esnap(None) | Back::Snapshot(_) => 0,
    };
    if st.open_ref > 0 {
        f |= OPEN;
    }
    if st.data_ro {
        f |= DATA_RO;
    }
    if st.md_ro {
        f |= MD_RO;
    }
    f
}

/// The mirror (module doc). Written only with the blob's state mutex held.
pub(crate) struct LiveMap {
    table: AtomicPtr<Table>,
    flags: AtomicU32,
    /// The esnap device (a box of the blob's `Arc`), null when there is none.
    esnap: AtomicPtr<Arc<dyn BsDev>>,
    /// Stamp of the map state mirrored (writer side).
    stamp: AtomicU64,
}

impl LiveMap {
    /// The mirror of `st` (the blob's state, not shared yet).
    pub(crate) fn new(st: &mut BlobState, freeze: &Freeze) -> Self {
        let m = LiveMap {
            table: AtomicPtr::new(ptr::null_mut()),
            flags: AtomicU32::new(0),
            esnap: AtomicPtr::new(ptr::null_mut()),
            stamp: AtomicU64::new(0),
        };
        m.sync(st, freeze);
        m
    }

    /// Brings the mirror in step with `st` (the state mutex is held: the only writer). Runs
    /// at every release of the state lock: the common case (nothing the mirror shows
    /// changed) is a few compares.
    #[inline]
    pub(crate) fn sync(&self, st: &mut BlobState, freeze: &Freeze) {
        if !st.md.clusters.in_step(self.stamp.load(Ordering::Relaxed)) {
            self.sync_map(st, freeze);
        }
        let esnap = match &st.back {
            Back::Esnap(Some(d)) => Arc::as_ptr(d) as *const (),
            _ => ptr::null(),
        };
        let cur = self.esnap.load(Ordering::Relaxed);
        // SAFETY: the current device box, which only this writer replaces or frees.
        let cur = unsafe { cur.as_ref() }.map_or(ptr::null(), |d| Arc::as_ptr(d) as *const ());
        if self.flags.load(Ordering::Relaxed) != flags_of(st) || cur != esnap {
            self.sync_back(st, freeze);
        }
    }

    #[cold]
    fn sync_map(&self, st: &mut BlobState, freeze: &Freeze) {
        let map = &mut st.md.clusters;
        match map.changes_since(self.stamp.load(Ordering::Relaxed)) {
            Some([]) => {}
            Some(changed) => {
                let t = self.table.load(Ordering::Relaxed);
                // SAFETY: the current table, which only this writer replaces or frees.
                let t = unsafe { &*t };
                for &i in changed {
                    Self::set_entry(t, map, i, freeze);
                    // SAFETY: the state mutex is held (the writer).
                    debug_assert_eq!(unsafe { self.entry(i) }, map.get(i));
                }
                let s = fresh_stamp();
                map.mark_synced(s);
                self.stamp.store(s, Ordering::Relaxed);
            }
            None => {
                let new = Box::into_raw(Table::build(map));
                let old = self.table.swap(new, Ordering::AcqRel);
                if !old.is_null() {
                    // SAFETY: unlinked just now; made by `Box::into_raw` and dropped once,
                    // when no reader can hold it any more.
                    freeze.retire(unsafe { Box::from_raw(old) });
                }
                let s = fresh_stamp();
                map.mark_synced(s);
                self.stamp.store(s, Ordering::Relaxed);
            }
        }
    }

    /// Entry `i` of the table from the map (`i` < len: a length change rebuilds).
    fn set_entry(t: &Table, map: &ClusterMap, i: usize, freeze: &Freeze) {
        debug_assert!(i < t.len && t.len == map.len());
        let k = i / CH;
        let Some(dslot) = t.dirs.get(k / DIR) else {
            return;
        };
        let dp = dslot.load(Ordering::Relaxed);
        if dp.is_null() {
            if map.chunk_allocated(k) {
                let d = Dir::boxed();
                // SAFETY: made just above, not shared yet.
                unsafe { &*d }.0[k % DIR].store(Chunk::boxed(map.chunk(k)), Ordering::Relaxed);
                // Initialised before it is published (`Release`).
                dslot.store(d, Ordering::Release);
            }
            return;
        }
        // SAFETY: linked in the current table: freed only after this writer unlinks it.
        let d = unsafe { &*dp };
        let slot = &d.0[k % DIR];
        let p = slot.load(Ordering::Relaxed);
        if p.is_null() {
            if map.chunk_allocated(k) {
                slot.store(Chunk::boxed(map.chunk(k)), Ordering::Release);
            }
        } else if !map.chunk_allocated(k) {
            slot.store(ptr::null_mut(), Ordering::Release);
            freeze.retire(Box::new(Old(p)));
            let first = k - k % DIR;
            if !map.chunks_allocated_in(first..first + DIR) {
                dslot.store(ptr::null_mut(), Ordering::Release);
                freeze.retire(Box::new(Old(dp)));
            }
        } else {
            // SAFETY: linked in the current table: freed only after this writer unlinks it.
            let c = unsafe { &*p };
            c.0[i % CH].store(map.at(i), Ordering::Release);
        }
    }

    #[cold]
    fn sync_back(&self, st: &BlobState, freeze: &Freeze) {
        let want = match &st.back {
            Back::Esnap(Some(d)) => Some(d),
            _ => None,
        };
        let cur = self.esnap.load(Ordering::Relaxed);
        // SAFETY: the current device box, which only this writer replaces or frees.
        let same = match (want, unsafe { cur.as_ref() }) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if !same {
            let new = want.map_or(ptr::null_mut(), |d| Box::into_raw(Box::new(d.clone())));
            self.esnap.store(new, Ordering::Release);
            if !cur.is_null() {
                // SAFETY: unlinked just now; made by `Box::into_raw`, dropped once.
                freeze.retire(unsafe { Box::from_raw(cur) });
            }
        }
        let f = flags_of(st);
        if self.flags.load(Ordering::Relaxed) != f {
            self.flags.store(f, Ordering::Release);
        }
    }

    /// [`OPEN`], [`DATA_RO`], [`MD_RO`], [`BACK_ZEROES`], [`BACK_ESNAP`].
    #[inline]
    pub(crate) fn flags(&self) -> u32 {
        self.flags.load(Ordering::Acquire)
    }

    /// Entry `i` (0: unallocated), `None` beyond the end.
    ///
    /// # Safety
    /// The caller holds the blob's freeze shared, or its state mutex.
    #[inline]
    pub(crate) unsafe fn entry(&self, i: usize) -> Option<u32> {
        let t = self.table.load(Ordering::Acquire);
        // SAFETY: never null after `new`; a table unlinked is retired to the freeze, which
        // drops it only when no shared hold is left (the caller's contract).
        let t = unsafe { &*t };
        if i >= t.len {
            return None;
        }
        let k = i / CH;
        let d = t.dirs[k / DIR].load(Ordering::Acquire);
        // SAFETY: as the table: an unlinked directory is retired, not freed.
        let Some(d) = (unsafe { d.as_ref() }) else {
            return Some(0);
        };
        let p = d.0[k % DIR].load(Ordering::Acquire);
        // SAFETY: as the table: an unlinked chunk is retired, not freed.
        let Some(c) = (unsafe { p.as_ref() }) else {
            return Some(0);
        };
        Some(c.0[i % CH].load(Ordering::Acquire))
    }

    /// The esnap device, if there is one now.
    ///
    /// # Safety
    /// The caller holds the blob's freeze shared (or its state mutex) for as long as it uses
    /// the reference: the lifetime is the blob's, not the hold's.
    #[inline]
    pub(crate) unsafe fn esnap(&self) -> Option<&dyn BsDev> {
        let p = self.esnap.load(Ordering::Acquire);
        // SAFETY: a device box unlinked is retired to the freeze (the caller's contract).
        unsafe { p.as_ref() }.map(|d| &**d)
    }

    /// Whether the mirror says what `st` says (tests: `Blob::live_map_matches`).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn matches(&self, st: &BlobState) -> bool {
        let map = &st.md.clusters;
        // SAFETY: the caller holds the state mutex (`st` is borrowed from its guard), which
        // excludes the only writer.
        let t = unsafe { &*self.table.load(Ordering::Acquire) };
        let nchunks = map.len().div_ceil(CH);
        let entries = t.len == map.len()
            && t.dirs.len() == nchunks.div_ceil(DIR)
            && t.dirs.iter().enumerate().all(|(di, dslot)| {
                let first = di * DIR;
                // SAFETY: as above.
                match unsafe { dslot.load(Ordering::Acquire).as_ref() } {
                    None => !map.chunks_allocated_in(first..first + DIR),
                    Some(d) => d.0.iter().enumerate().all(|(j, slot)| {
                        let k = first + j;
                        // SAFETY: as above.
                        match unsafe { slot.load(Ordering::Acquire).as_ref() } {
                            None => !map.chunk_allocated(k),
                            Some(c) => {
                                k < nchunks
                                    && map.chunk_allocated(k)
                                    && map
                                        .chunk(k)
                                        .iter()
                                        .zip(c.0.iter())
                                        .all(|(&m, a)| a.load(Ordering::Acquire) == m)
                            }
                        }
                    }),
                }
            });
        let want = match &st.back {
            Back::Esnap(Some(d)) => Some(Arc::as_ptr(d) as *const ()),
            _ => None,
        };
        // SAFETY: as above.
        let have = unsafe { self.esnap() }.map(|d| d as *const dyn BsDev as *const ());
        entries && want == have && self.flags() == flags_of(st)
    }
}

impl Drop for LiveMap {
    fn drop(&mut self) {
        let t = *self.table.get_mut();
        if !t.is_null() {
            // SAFETY: the current table; nothing can read it any more (`&mut self`).
            drop(unsafe { Box::from_raw(t) });
        }
        let d = *self.esnap.get_mut();
        if !d.is_null() {
            // SAFETY: as the table.
            drop(unsafe { Box::from_raw(d) });
        }
    }
}
