//! A blob's metadata in memory (flags, xattrs, cluster map, extent pages) and its
//! conversion to and from md-page chains.

use std::collections::BTreeMap;

use crate::error::corrupt;
use crate::format::*;
use crate::layout::{Descriptor, MdPageInfo};
use crate::{ClearMethod, Result};

/// One blob's persistent metadata.
#[derive(Clone, Debug, Default)]
pub(crate) struct BlobMd {
    pub invalid: u64,
    pub data_ro: u64,
    pub md_ro: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub internal: Vec<(String, Vec<u8>)>,
    /// Physical cluster per blob cluster; 0 = unallocated.
    pub clusters: ClusterMap,
    /// Extent-page md index per 512-cluster chunk (extent-table blobs); 0 = none.
    pub eps: EpMap,
}

const CH: usize = EXTENTS_PER_EP;
static ZEROS: [u32; CH] = [0; CH];

/// A blob's cluster map: the physical cluster of every blob cluster (0 = unallocated), kept
/// in chunks of 512 entries (one extent page each) that exist only where a cluster is
/// allocated. A thin blob costs memory for what it owns, not for its size (a 1 PiB thin
/// blob that was never written is a length). Invariant: no stored chunk is all zero and
/// nothing is stored at or beyond `len`.
///
/// The map also records what changed since its open blob's lock-free mirror last matched it
/// (`live.rs`): the mirror is brought in step from that record whenever the blob's state
/// lock is released, whatever changed the map (a setter, a resize, a whole replacement).
#[derive(Clone, Debug, Default)]
pub(crate) struct ClusterMap {
    len: usize,
    chunks: BTreeMap<usize, Box<[u32; CH]>>,
    /// The mirror stamp this map's content is known relative to (0: none, the mirror is
    /// rebuilt), and the entries set since. Copied by `clone`: a copy restored later is
    /// either still relative to the mirror's stamp (then it equals the mirror plus these
    /// entries) or not (any change to the mirror takes a new stamp), and then rebuilt.
    synced: u64,
    changed: Vec<usize>,
}

/// Entries set between two mirror updates beyond which a rebuild is cheaper than the record.
const MAX_CHANGED: usize = 64;

impl PartialEq for ClusterMap {
    fn eq(&self, o: &Self) -> bool {
        self.len == o.len && self.chunks == o.chunks
    }
}
impl Eq for ClusterMap {}

impl ClusterMap {
    /// `len` unallocated clusters.
    pub(crate) fn zeroed(len: usize) -> Self {
        ClusterMap {
            len,
            ..Default::default()
        }
    }
    /// A map holding `v` (tests, thick blobs).
    pub(crate) fn from_slice(v: &[u32]) -> Self {
        let mut m = Self::default();
        m.push_slice(v);
        m
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The entry at `i`, or None beyond the end.
    pub(crate) fn get(&self, i: usize) -> Option<u32> {
        (i < self.len).then(|| self.chunks.get(&(i / CH)).map_or(0, |c| c[i % CH]))
    }
    /// The entry at `i` (0 beyond the end).
    pub(crate) fn at(&self, i: usize) -> u32 {
        self.get(i).unwrap_or(0)
    }
    /// Sets entry `i` (< len; ignored beyond the end).
    pub(crate) fn set(&mut self, i: usize, c: u32) {
        if i >= self.len {
            return;
        }
        if self.synced != 0 {
            if self.changed.len() < MAX_CHANGED {
                self.changed.push(i);
            } else {
                self.unsync();
            }
        }
        let k = i / CH;
        if c == 0 {
            if let Some(ch) = self.chunks.get_mut(&k) {
                ch[i % CH] = 0;
                if ch.iter().all(|&x| x == 0) {
                    self.chunks.remove(&k);
                }
            }
        } else {
            self.chunks.entry(k).or_insert_with(|| Box::new([0; CH]))[i % CH] = c;
        }
    }
    /// The entries of chunk `k` (512, fewer for the last chunk).
    pub(crate) fn chunk(&self, k: usize) -> &[u32] {
        let s = k.saturating_mul(CH);
        if s >= self.len {
            return &[];
        }
        let n = (self.len - s).min(CH);
        match self.chunks.get(&k) {
            Some(c) => &c[..n],
            None => &ZEROS[..n],
        }
    }
    /// Whether chunk `k` holds an allocated cluster.
    pub(crate) fn chunk_allocated(&self, k: usize) -> bool {
        self.chunks.contains_key(&k)
    }
    /// Whether a chunk in `ks` holds an allocated cluster.
    pub(crate) fn chunks_allocated_in(&self, ks: std::ops::Range<usize>) -> bool {
        self.chunks.range(ks).next().is_some()
    }
    /// Chunks holding an allocated cluster, in order.
    pub(crate) fn allocated_chunks(&self) -> impl Iterator<Item = usize> + '_ {
        self.chunks.keys().copied()
    }
    /// Drops the entries at and beyond `n`.
    pub(crate) fn truncate(&mut self, n: usize) {
        if n >= self.len {
            return;
        }
        self.unsync();
        self.len = n;
        let first_gone = n.div_ceil(CH);
        self.chunks.split_off(&first_gone);
        if !n.is_multiple_of(CH) {
            let k = n / CH;
            if let Some(ch) = self.chunks.get_mut(&k) {
                ch[n % CH..].fill(0);
                if ch.iter().all(|&x| x == 0) {
                    self.chunks.remove(&k);
                }
            }
        }
    }
    /// Appends `n` unallocated entries.
    pub(crate) fn push_zeros(&mut self, n: usize) {
        self.unsync();
        self.len += n;
    }
    /// Appends `v`.
    pub(crate) fn push_slice(&mut self, v: &[u32]) {
        self.unsync();
        for &c in v {
            self.len += 1;
            if c != 0 {
                self.set(self.len - 1, c);
            }
        }
    }
    /// Allocated entries `(index, cluster)`, in order.
    pub(crate) fn allocated(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.chunks.iter().flat_map(|(&k, c)| {
            c.iter()
                .enumerate()
                .filter(|(_, &x)| x != 0)
                .map(move |(j, &x)| (k * CH + j, x))
        })
    }
    /// Number of allocated entries.
    pub(crate) fn count_allocated(&self) -> u64 {
        self.chunks
            .values()
            .map(|c| c.iter().filter(|&&x| x != 0).count() as u64)
            .sum()
    }
    /// First allocated index at or after `from`.
    pub(crate) fn next_allocated(&self, from: usize) -> Option<usize> {
        for (&k, c) in self.chunks.range(from / CH..) {
            let start = if k == from / CH { from % CH } else { 0 };
            if let Some(j) = (start..CH).find(|&j| c[j] != 0) {
                return Some(k * CH + j);
            }
        }
        None
    }
    /// First unallocated index at or after `from`.
    pub(crate) fn next_unallocated(&self, from: usize) -> Option<usize> {
        let mut i = from;
        while i < self.len {
            match self.chunks.get(&(i / CH)) {
                None => return Some(i),
                Some(c) if c[i % CH] == 0 => return Some(i),
                Some(_) => i += 1,
            }
        }
        None
    }
    /// The entries set since the mirror was at `stamp` (non-zero), or `None` when this map
    /// is not known relative to it (the mirror is rebuilt).
    pub(crate) fn changes_since(&self, stamp: u64) -> Option<&[usize]> {
        (self.synced != 0 && self.synced == stamp).then_some(&self.changed[..])
    }
    /// Whether the mirror at `stamp` already says what this map says.
    #[inline]
    pub(crate) fn in_step(&self, stamp: u64) -> bool {
        self.synced != 0 && self.synced == stamp && self.changed.is_empty()
    }
    /// The mirror now matches this map, at `stamp`.
    pub(crate) fn mark_synced(&mut self, stamp: u64) {
        self.synced = stamp;
        self.changed.clear();
    }
    /// Forgets the change record: the mirror is rebuilt from the whole map.
    fn unsync(&mut self) {
        self.synced = 0;
        self.changed = Vec::new();
    }
    /// Runs `(first cluster, length)` as the extent RLE descriptor stores them (0 = an
    /// unallocated run; an allocated run is physically contiguous).
    pub(crate) fn runs(&self) -> Vec<(u32, u32)> {
        let mut runs: Vec<(u32, u32)> = Vec::new();
        let push = |runs: &mut Vec<(u32, u32)>, c: u32, n: u32| match runs.last_mut() {
            Some((s, l)) if (*s == 0 && c == 0) || (*s != 0 && c != 0 && c == *s + *l) => *l += n,
            _ => runs.push((c, n)),
        };
        let mut pos = 0usize;
        for (&k, ch) in &self.chunks {
            let s = k * CH;
            if s > pos {
                push(&mut runs, 0, (s - pos) as u32);
            }
            for &c in &ch[..(self.len - s).min(CH)] {
                push(&mut runs, c, 1);
            }
            pos = s + (self.len - s).min(CH);
        }
        if self.len > pos {
            push(&mut runs, 0, (self.len - pos) as u32);
        }
        runs
    }
}

/// The extent page of every chunk of an extent-table blob (0 = none), stored sparsely.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct EpMap {
    len: usize,
    pages: BTreeMap<usize, u32>,
}

impl EpMap {
    /// `len` chunks without extent pages.
    pub(crate) fn zeroed(len: usize) -> Self {
        EpMap {
            len,
            pages: BTreeMap::new(),
        }
    }
    /// A map holding `v` (tests).
    #[cfg(test)]
    pub(crate) fn from_slice(v: &[u32]) -> Self {
        let mut m = Self::default();
        for &p in v {
            m.push(p);
        }
        m
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    /// The page of chunk `k` (0: none, or beyond the end).
    pub(crate) fn get(&self, k: usize) -> u32 {
        self.pages.get(&k).copied().unwrap_or(0)
    }
    /// Sets the page of chunk `k` (< len).
    pub(crate) fn set(&mut self, k: usize, p: u32) {
        if k >= self.len {
            return;
        }
        if p == 0 {
            self.pages.remove(&k);
        } else {
            self.pages.insert(k, p);
        }
    }
    pub(crate) fn push(&mut self, p: u32) {
        self.len += 1;
        self.set(self.len - 1, p);
    }
    pub(crate) fn push_zeros(&mut self, n: usize) {
        self.len += n;
    }
    /// Grows (with no pages) or shrinks to `n` chunks.
    pub(crate) fn resize(&mut self, n: usize) {
        if n < self.len {
            self.pages.split_off(&n);
        }
        self.len = n;
    }
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }
    /// `(chunk, page)` of every chunk that has a page, in order.
    pub(crate) fn pages(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.pages.iter().map(|(&k, &p)| (k, p))
    }
    /// Pages of the chunks at and beyond `n`.
    pub(crate) fn pages_from(&self, n: usize) -> impl Iterator<Item = u32> + '_ {
        self.pages.range(n..).map(|(_, &p)| p)
    }
}

/// Largest blob we accept from disk, in clusters (256 TiB with 1 MiB clusters). Keeps a
/// hostile md page from making us allocate gigabytes for a cluster map.
pub(crate) const MAX_BLOB_CLUSTERS: u64 = 1 << 28;

/// Refuses a blob size the store cannot describe (EFBIG), before anything is allocated.
pub(crate) fn check_blob_clusters(n: u64) -> Result<()> {
    if n > MAX_BLOB_CLUSTERS {
        return Err(crate::BsError::TooLarge(format!(
            "{n} clusters is more than a blob can have ({MAX_BLOB_CLUSTERS})"
        )));
    }
    Ok(())
}

/// What a chain says before its extent pages are read.
#[derive(Debug, Default)]
pub(crate) struct ChainInfo {
    pub md: BlobMd,
    /// Extent table: total clusters and entries, if the chain had one.
    pub table: Option<(u64, Vec<(u32, u32)>)>,
}

impl BlobMd {
    pub(crate) fn use_et(&self) -> bool {
        self.invalid & INV_EXTENT_TABLE != 0
    }
    pub(crate) fn thin(&self) -> bool {
        self.invalid & INV_THIN != 0
    }
    pub(crate) fn esnap(&self) -> bool {
        self.invalid & INV_ESNAP != 0
    }
    pub(crate) fn clear_method(&self) -> ClearMethod {
        match self.md_ro & MD_RO_CLEAR_MASK {
            1 => ClearMethod::None,
            2 => ClearMethod::Unmap,
            3 => ClearMethod::WriteZeroes,
            _ => ClearMethod::Default,
        }
    }
    pub(crate) fn get_internal(&self, name: &str) -> Option<&[u8]> {
        self.internal
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
    pub(crate) fn set_internal(&mut self, name: &str, value: &[u8]) {
        set_in(&mut self.internal, name, value);
        self.invalid |= INV_INTERNAL_XATTR;
    }
    pub(crate) fn remove_internal(&mut self, name: &str) -> bool {
        let n = self.internal.len();
        self.internal.retain(|(k, _)| k != name);
        if self.internal.is_empty() {
            self.invalid &= !INV_INTERNAL_XATTR;
        }
        n != self.internal.len()
    }
    /// Parent snapshot id from `SNAP` (only meaningful on thin blobs).
    pub(crate) fn snap_parent(&self) -> Result<Option<u64>> {
        if !self.thin() {
            return Ok(None);
        }
        match self.get_internal(XATTR_SNAP) {
            None => Ok(None),
            Some(v) if v.len() == 8 => rd_u64(v, 0).map(Some),
            Some(v) => Err(corrupt(format!(
                "internal xattr SNAP has {} bytes, expected 8",
                v.len()
            ))),
        }
    }
    /// Number of extent pages the cluster count needs.
    pub(crate) fn num_chunks(&self) -> usize {
        self.clusters.len().div_ceil(EXTENTS_PER_EP)
    }
    pub(crate) fn allocated(&self) -> u64 {
        self.clusters.count_allocated()
    }
    /// Whether chunk `k` needs an extent page.
    pub(crate) fn chunk_needs_page(&self, k: usize) -> bool {
        self.eps.get(k) != 0 || self.clusters.chunk_allocated(k)
    }
    pub(crate) fn chunk_entries(&self, k: usize) -> &[u32] {
        self.clusters.chunk(k)
    }

    /// Serialises the chain (FLAGS, xattrs, internal xattrs, extents); `next` and CRCs are
    /// left for the writer. `eps` must already hold the pages to reference.
    pub(crate) fn serialize(&self, id: u64) -> Result<Vec<Vec<u8>>> {
        let mut pb = PageBuilder::new(id);
        let mut flags = [0u8; 24];
        wr_u64(&mut flags, 0, self.invalid);
        wr_u64(&mut flags, 8, self.data_ro);
        wr_u64(&mut flags, 16, self.md_ro);
        pb.push(DESC_FLAGS, &flags);
        for (internal, list) in [(false, &self.xattrs), (true, &self.internal)] {
            for (n, v) in list.iter() {
                let body = xattr_body(n, v)?;
                pb.push(
                    if internal {
                        DESC_XATTR_INTERNAL
                    } else {
                        DESC_XATTR
                    },
                    &body,
                );
            }
        }
        if self.use_et() {
            let item = |p: u32, n: u32| {
                let mut it = p.to_le_bytes().to_vec();
                it.extend_from_slice(&n.to_le_bytes());
                it
            };
            let mut items = Vec::new();
            let mut pos = 0usize;
            for (k, p) in self.eps.pages() {
                if k > pos {
                    items.push(item(0, (k - pos) as u32));
                }
                items.push(item(p, 1));
                pos = k + 1;
            }
            if self.eps.len() > pos {
                items.push(item(0, (self.eps.len() - pos) as u32));
            }
            let header = (self.clusters.len() as u64).to_le_bytes();
            pb.push_split(DESC_EXTENT_TABLE, &header, &items, 8);
        } else if !self.clusters.is_empty() {
            let runs = self.clusters.runs();
            let items: Vec<Vec<u8>> = runs
                .iter()
                .map(|(s, l)| {
                    let mut v = s.to_le_bytes().to_vec();
                    v.extend_from_slice(&l.to_le_bytes());
                    v
                })
                .collect();
            pb.push_split(DESC_EXTENT_RLE, &[], &items, 8);
        }
        Ok(pb.finish())
    }
}

pub(crate) fn set_in(list: &mut Vec<(String, Vec<u8>)>, name: &str, value: &[u8]) {
    if let Some(e) = list.iter_mut().find(|(n, _)| n == name) {
        e.1 = value.to_vec();
    } else {
        list.push((name.to_string(), value.to_vec()));
    }
}

/// Checks an xattr fits in one md page (SPDK: `-ENOMEM` otherwise).
pub(crate) fn check_xattr_size(name: &str, value: &[u8]) -> Result<()> {
    if name.len() > u16::MAX as usize
        || value.len() > u16::MAX as usize
        || 9 + name.len() + value.len() > DESC_AREA
    {
        return Err(crate::BsError::NoMemory(format!(
            "xattr {name:?} with a {}-byte value does not fit in one md page",
            value.len()
        )));
    }
    Ok(())
}

fn xattr_body(n: &str, v: &[u8]) -> Result<Vec<u8>> {
    check_xattr_size(n, v)?;
    let mut b = Vec::with_capacity(4 + n.len() + v.len());
    b.extend_from_slice(&(n.len() as u16).to_le_bytes());
    b.extend_from_slice(&(v.len() as u16).to_le_bytes());
    b.extend_from_slice(n.as_bytes());
    b.extend_from_slice(v);
    Ok(b)
}

/// Interprets a chain's pages (already CRC-checked) into metadata; extent pages are read
/// by the caller from `table`.
pub(crate) fn parse_chain(id: u64, pages: &[MdPageInfo], max_cluster: u64) -> Result<ChainInfo> {
    let mut ci = ChainInfo::default();
    let mut seen_flags = false;
    let mut seen_rle = false;
    for (pi, p) in pages.iter().enumerate() {
        for d in &p.descriptors {
            match d {
                Descriptor::Flags {
                    invalid,
                    data_ro,
                    md_ro,
                } => {
                    if invalid & !INV_MASK != 0 {
                        return Err(corrupt(format!(
                            "blob {id:#x}: unknown invalid_flags bits {invalid:#x}"
                        )));
                    }
                    ci.md.invalid = *invalid;
                    ci.md.data_ro = *data_ro;
                    ci.md.md_ro = *md_ro;
                    seen_flags = true;
                }
                Descriptor::ExtentRle(runs) => {
                    if ci.table.is_some() {
                        return Err(corrupt(format!(
                            "blob {id:#x}: extent RLE together with an extent table"
                        )));
                    }
                    seen_rle = true;
                    for &(c, l) in runs {
                        if c == 0 {
                            if !ci.md.thin() {
                                return Err(corrupt(format!(
                                    "blob {id:#x}: unallocated run in a thick blob"
                                )));
                            }
                            if ci.md.clusters.len() as u64 + u64::from(l) > MAX_BLOB_CLUSTERS {
                                return Err(corrupt(format!("blob {id:#x}: too many clusters")));
                            }
                            ci.md.clusters.push_zeros(l as usize);
                        } else {
                            let end = c.checked_add(l).ok_or_else(|| {
                                corrupt(format!("blob {id:#x}: extent run overflows"))
                            })?;
                            if u64::from(end) > max_cluster {
                                return Err(corrupt(format!(
                                    "blob {id:#x}: extent run {c}+{l} is beyond the store ({max_cluster} clusters)"
                                )));
                            }
                            if ci.md.clusters.len() as u64 + u64::from(l) > MAX_BLOB_CLUSTERS {
                                return Err(corrupt(format!("blob {id:#x}: too many clusters")));
                            }
                            let run: Vec<u32> = (c..end).collect();
                            ci.md.clusters.push_slice(&run);
                        }
                    }
                    if ci.md.clusters.is_empty() {
                        return Err(corrupt(format!("blob {id:#x}: empty extent RLE")));
                    }
                }
                Descriptor::Xattr {
                    internal,
                    name,
                    value,
                } => {
                    let n = String::from_utf8_lossy(name).into_owned();
                    let list = if *internal {
                        &mut ci.md.internal
                    } else {
                        &mut ci.md.xattrs
                    };
                    list.push((n, value.clone()));
                }
                Descriptor::ExtentTable {
                    num_clusters,
                    entries,
                } => {
                    if seen_rle {
                        return Err(corrupt(format!(
                            "blob {id:#x}: extent table together with extent RLE"
                        )));
                    }
                    if *num_clusters > MAX_BLOB_CLUSTERS {
                        return Err(corrupt(format!(
                            "blob {id:#x}: extent table claims {num_clusters} clusters"
                        )));
                    }
                    match &mut ci.table {
                        Some((n, e)) => {
                            if *n != *num_clusters {
                                return Err(corrupt(format!(
                                    "blob {id:#x}: extent table descriptors disagree on size ({n} vs {num_clusters})"
                                )));
                            }
                            e.extend_from_slice(entries);
                        }
                        None => ci.table = Some((*num_clusters, entries.clone())),
                    }
                }
                Descriptor::ExtentPage { .. } => {}
                Descriptor::Unknown { desc_type, length } => {
                    if (1..=6).contains(desc_type) {
                        return Err(corrupt(format!(
                            "blob {id:#x}: malformed descriptor type {desc_type} length {length} in chain page {pi}"
                        )));
                    }
                }
            }
        }
    }
    if !seen_flags {
        // Very old blobs have no FLAGS descriptor; treat as all zero.
        ci.md.invalid = 0;
    }
    if ci.table.is_some() && !ci.md.use_et() {
        ci.md.invalid |= INV_EXTENT_TABLE;
    }
    Ok(ci)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{parse_md_page, seal_page, wr_u32, NEXT_OFF};

    fn roundtrip(md: &BlobMd) -> ChainInfo {
        let id = page_to_blobid(7);
        let mut pages = md.serialize(id).unwrap();
        let n = pages.len();
        for (i, p) in pages.iter_mut().enumerate() {
            wr_u32(
                p,
                NEXT_OFF,
                if i + 1 < n { 100 + i as u32 } else { u32::MAX },
            );
            seal_page(p);
        }
        let infos: Vec<_> = pages.iter().map(|p| parse_md_page(p).unwrap()).collect();
        assert!(infos.iter().all(|i| i.crc_ok && i.id == id));
        assert!(infos
            .iter()
            .enumerate()
            .all(|(k, i)| i.sequence_num == k as u32));
        parse_chain(id, &infos, 1 << 20).unwrap()
    }

    #[test]
    fn rle_roundtrip_merges_runs() {
        let md = BlobMd {
            invalid: INV_THIN,
            xattrs: vec![("name".into(), b"x\0".to_vec())],
            clusters: ClusterMap::from_slice(&[5, 6, 7, 0, 0, 9, 20, 21, 0]),
            ..Default::default()
        };
        let ci = roundtrip(&md);
        assert_eq!(ci.md.clusters, md.clusters);
        assert_eq!(ci.md.xattrs, md.xattrs);
        assert!(ci.table.is_none());
    }

    #[test]
    fn extent_table_roundtrip_with_spill() {
        let mut md = BlobMd {
            invalid: INV_THIN | INV_EXTENT_TABLE | INV_INTERNAL_XATTR,
            clusters: ClusterMap::zeroed(3000),
            eps: EpMap::from_slice(&[3, 0, 0, 4, 0, 9]),
            ..Default::default()
        };
        for i in 0..5 {
            md.xattrs.push((format!("a{i}"), vec![i; 1000]));
        }
        md.set_internal(XATTR_SNAP, &page_to_blobid(2).to_le_bytes());
        let ci = roundtrip(&md);
        let (n, entries) = ci.table.unwrap();
        assert_eq!(n, 3000);
        assert_eq!(entries, vec![(3, 1), (0, 2), (4, 1), (0, 1), (9, 1)]);
        assert_eq!(ci.md.xattrs.len(), 5);
        assert_eq!(ci.md.snap_parent().unwrap(), Some(page_to_blobid(2)));
    }

    #[test]
    fn zero_cluster_blob_has_an_empty_table() {
        let md = BlobMd {
            invalid: INV_EXTENT_TABLE,
            ..Default::default()
        };
        let ci = roundtrip(&md);
        assert_eq!(ci.table, Some((0, vec![])));
    }

    #[test]
    fn unknown_invalid_flag_and_bad_snap_are_rejected() {
        let md = BlobMd {
            invalid: 0x10,
            ..Default::default()
        };
        let pages = md.serialize(page_to_blobid(1)).unwrap();
        let info = parse_md_page(&pages[0]).unwrap();
        assert!(parse_chain(page_to_blobid(1), &[info], 10).is_err());
        let mut md = BlobMd {
            invalid: INV_THIN,
            ..Default::default()
        };
        md.set_internal(XATTR_SNAP, b"short");
        assert_eq!(md.snap_parent().unwrap_err().errno(), libc::EINVAL);
    }
}
