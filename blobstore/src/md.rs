//! A blob's metadata in memory (flags, xattrs, cluster map, extent pages) and its
//! conversion to and from md-page chains.

use crate::error::corrupt;
use crate::format::*;
use crate::inspect::{Descriptor, MdPageInfo};
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
    pub clusters: Vec<u32>,
    /// Extent-page md index per 512-cluster chunk (extent-table blobs); 0 = none.
    pub eps: Vec<u32>,
}

/// Largest blob we accept from disk, in clusters (256 TiB with 1 MiB clusters). Keeps a
/// hostile md page from making us allocate gigabytes for a cluster map.
pub(crate) const MAX_BLOB_CLUSTERS: u64 = 1 << 28;

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
            Some(v) if v.len() == 8 => Ok(Some(rd_u64(v, 0))),
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
        self.clusters.iter().filter(|&&c| c != 0).count() as u64
    }
    /// Whether chunk `k` needs an extent page.
    pub(crate) fn chunk_needs_page(&self, k: usize) -> bool {
        if self.eps.get(k).copied().unwrap_or(0) != 0 {
            return true;
        }
        let s = k * EXTENTS_PER_EP;
        let e = (s + EXTENTS_PER_EP).min(self.clusters.len());
        self.clusters[s..e].iter().any(|&c| c != 0)
    }
    pub(crate) fn chunk_entries(&self, k: usize) -> &[u32] {
        let s = k * EXTENTS_PER_EP;
        let e = (s + EXTENTS_PER_EP).min(self.clusters.len());
        &self.clusters[s..e]
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
            let mut items = Vec::new();
            let mut i = 0;
            while i < self.eps.len() {
                let p = self.eps[i];
                let mut n = 1u32;
                if p == 0 {
                    while i + 1 < self.eps.len() && self.eps[i + 1] == 0 {
                        i += 1;
                        n += 1;
                    }
                }
                let mut it = p.to_le_bytes().to_vec();
                it.extend_from_slice(&n.to_le_bytes());
                items.push(it);
                i += 1;
            }
            let header = (self.clusters.len() as u64).to_le_bytes();
            pb.push_split(DESC_EXTENT_TABLE, &header, &items, 8);
        } else if !self.clusters.is_empty() {
            let mut runs: Vec<(u32, u32)> = Vec::new();
            for &c in &self.clusters {
                match runs.last_mut() {
                    Some((s, l)) if (*s == 0 && c == 0) || (*s != 0 && c != 0 && c == *s + *l) => {
                        *l += 1
                    }
                    _ => runs.push((c, 1)),
                }
            }
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
                            ci.md.clusters.extend(std::iter::repeat_n(0, l as usize));
                        } else {
                            let end = c.checked_add(l).ok_or_else(|| {
                                corrupt(format!("blob {id:#x}: extent run overflows"))
                            })?;
                            if u64::from(end) > max_cluster {
                                return Err(corrupt(format!(
                                    "blob {id:#x}: extent run {c}+{l} is beyond the store ({max_cluster} clusters)"
                                )));
                            }
                            ci.md.clusters.extend(c..end);
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
            clusters: vec![5, 6, 7, 0, 0, 9, 20, 21, 0],
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
            clusters: vec![0; 3000],
            eps: vec![3, 0, 0, 4, 0, 9],
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
