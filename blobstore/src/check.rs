//! Offline consistency check of a store (`inspect::check`): reads only, never writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use iobuf::IoBuf;

/// Findings of [`crate::inspect::check`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// One line per problem found (bad CRC at page N, cluster C owned twice, leaked cluster,
    /// mask differs from scan, broken chain, ...). Empty when the store is consistent.
    pub problems: Vec<String>,
    /// Blobs found.
    pub blobs: u64,
    /// md pages in use according to the scan.
    pub used_md_pages: u64,
    /// Clusters in use according to the scan (including metadata clusters).
    pub used_clusters: u64,
}

use crate::format::*;
use crate::layout::Descriptor;
use crate::load::{geo_from_super, validate_super};
use crate::md::parse_chain;
use crate::store::{io_err, PageCache};
use crate::{BsDev, Result};

pub(crate) async fn check(dev: Arc<dyn BsDev>) -> Result<CheckReport> {
    let align = dev.buf_align();
    let buf = dev.read(0, IoBuf::new(PAGE, align)).await.map_err(io_err)?;
    let sbi = parse_super(&buf)?;
    validate_super(&sbi, dev.as_ref(), None)?;
    let (geo, total) = geo_from_super(&sbi, dev.as_ref());
    let mut rep = CheckReport::default();
    let md_len = geo.md_len;
    let mut used_pages = Bitmap::new(u64::from(md_len));
    let mut used_blobids = Bitmap::new(u64::from(md_len));
    let mut owner: HashMap<u32, u64> = HashMap::new();
    let mut parents: BTreeMap<u64, u64> = BTreeMap::new();
    let mut cache = PageCache::new(dev.as_ref(), &geo, align);
    let mut heads = Vec::new();
    for p in 0..md_len {
        let info = parse_md_page(cache.get(p).await?)?;
        if info.sequence_num == 0 && info.id == page_to_blobid(p) {
            if info.crc_ok {
                heads.push(p);
            } else {
                rep.problems.push(format!(
                    "bad crc at md page {p} (root page of blob {:#x})",
                    info.id
                ));
            }
        }
    }
    for p in heads {
        let id = page_to_blobid(p);
        let mut pages = Vec::new();
        let mut cur = p;
        let mut chain = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut ok = true;
        loop {
            if !seen.insert(cur) {
                rep.problems
                    .push(format!("blob {id:#x}: md chain loops back to page {cur}"));
                ok = false;
                break;
            }
            let info = parse_md_page(cache.get(cur).await?)?;
            if !info.crc_ok {
                rep.problems.push(format!(
                    "blob {id:#x}: bad crc at md page {cur} (chain page {})",
                    chain.len()
                ));
                ok = false;
                break;
            }
            chain.push(cur);
            let next = info.next;
            pages.push(info);
            if next == INVALID_PAGE {
                break;
            }
            if next >= md_len {
                rep.problems.push(format!(
                    "blob {id:#x}: md page {cur} points to page {next} outside the md region"
                ));
                ok = false;
                break;
            }
            cur = next;
        }
        for &c in &chain {
            if used_pages.get(u64::from(c)) {
                rep.problems
                    .push(format!("md page {c} is used twice (blob {id:#x})"));
            }
            used_pages.set(u64::from(c));
        }
        used_blobids.set(u64::from(p));
        rep.blobs += 1;
        if !ok {
            continue;
        }
        let ci = match parse_chain(id, &pages, total) {
            Ok(ci) => ci,
            Err(e) => {
                rep.problems.push(format!("{e}"));
                continue;
            }
        };
        for x in [XATTR_SNAPTMP, XATTR_SNAPRM] {
            if ci.md.get_internal(x).is_some() {
                rep.problems
                    .push(format!("blob {id:#x}: unfinished operation marker {x}"));
            }
        }
        if let Ok(Some(par)) = ci.md.snap_parent() {
            parents.insert(id, par);
        }
        // Only allocated entries: a huge thin blob costs nothing here.
        let mut clusters: Vec<u32> = ci.md.clusters.allocated().map(|(_, c)| c).collect();
        if let Some((_, entries)) = &ci.table {
            for &(pi, _) in entries {
                if pi == 0 {
                    continue;
                }
                if pi >= md_len {
                    rep.problems.push(format!(
                        "blob {id:#x}: extent page {pi} is outside the md region"
                    ));
                    continue;
                }
                let info = parse_md_page(cache.get(pi).await?)?;
                if !info.crc_ok {
                    rep.problems.push(format!(
                        "blob {id:#x}: bad crc at md page {pi} (extent page)"
                    ));
                    continue;
                }
                let Some((_, e)) = extent_page_contents(&info) else {
                    rep.problems.push(format!(
                        "blob {id:#x}: md page {pi} is not a valid extent page"
                    ));
                    continue;
                };
                if used_pages.get(u64::from(pi)) {
                    rep.problems.push(format!(
                        "md page {pi} is used twice (extent page of {id:#x})"
                    ));
                }
                used_pages.set(u64::from(pi));
                clusters.extend_from_slice(e);
            }
        }
        for c in clusters.into_iter().filter(|&c| c != 0) {
            if u64::from(c) >= total || u64::from(c) < geo.md_clusters {
                rep.problems.push(format!(
                    "blob {id:#x}: cluster {c} is outside the data area"
                ));
                continue;
            }
            if let Some(o) = owner.insert(c, id) {
                rep.problems.push(format!(
                    "cluster {c} is owned twice (blobs {o:#x} and {id:#x})"
                ));
            }
        }
        for d in pages.iter().flat_map(|p| p.descriptors.iter()) {
            if let Descriptor::Unknown { desc_type, length } = d {
                if !(1..=6).contains(desc_type) {
                    rep.problems.push(format!(
                        "blob {id:#x}: unknown descriptor type {desc_type} (length {length})"
                    ));
                }
            }
        }
    }
    for (c, p) in &parents {
        if !used_blobids.get(u64::from(*p as u32)) || p >> 32 != 1 {
            rep.problems.push(format!(
                "blob {c:#x}: parent snapshot {p:#x} does not exist"
            ));
        }
    }
    let mut used_clusters = Bitmap::new(total);
    for c in 0..geo.md_clusters.min(total) {
        used_clusters.set(c);
    }
    for &c in owner.keys() {
        used_clusters.set(u64::from(c));
    }
    rep.used_md_pages = used_pages.count_ones();
    rep.used_clusters = used_clusters.count_ones();
    if sbi.clean == 1 && sbi.used_blobid_mask_len != 0 {
        let rd = |start: u32, len: u32| {
            let dev = dev.clone();
            async move {
                dev.read(
                    u64::from(start) * geo.lba_per_page,
                    IoBuf::new(len as usize * PAGE, align),
                )
                .await
                .map_err(io_err)
            }
        };
        let masks = [
            (
                "used page",
                MASK_PAGES,
                rd(sbi.used_page_mask_start, sbi.used_page_mask_len).await?,
                &used_pages,
                u64::from(md_len),
            ),
            (
                "used cluster",
                MASK_CLUSTERS,
                rd(sbi.used_cluster_mask_start, sbi.used_cluster_mask_len).await?,
                &used_clusters,
                total,
            ),
            (
                "used blobid",
                MASK_BLOBIDS,
                rd(sbi.used_blobid_mask_start, sbi.used_blobid_mask_len).await?,
                &used_blobids,
                u64::from(md_len),
            ),
        ];
        for (name, t, raw, scan, len) in masks {
            let Some(m) = Bitmap::from_mask(&raw, t, len) else {
                rep.problems
                    .push(format!("{name} mask header is invalid (type or length)"));
                continue;
            };
            for i in 0..len {
                match (m.get(i), scan.get(i)) {
                    (true, false) if t == MASK_CLUSTERS => rep.problems.push(format!(
                        "leaked cluster {i}: set in the mask, owned by no blob"
                    )),
                    (false, true) if t == MASK_CLUSTERS => rep.problems.push(format!(
                        "cluster {i} is owned by blob {:#x} but clear in the mask",
                        owner.get(&(i as u32)).copied().unwrap_or(0)
                    )),
                    (true, false) => rep
                        .problems
                        .push(format!("{name} mask: bit {i} set but not used by the scan")),
                    (false, true) => rep
                        .problems
                        .push(format!("{name} mask: bit {i} clear but used by the scan")),
                    _ => {}
                }
            }
        }
    }
    Ok(rep)
}
