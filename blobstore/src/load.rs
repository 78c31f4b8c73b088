//! Load and recovery: init (layout of a new store), load (clean masks or a recovery scan,
//! torn-page repair on 512-byte devices, the SNAPTMP / SNAPRM fix-ups) and unload (masks,
//! then `clean = 1`, each made durable). The load path fills the allocator and the blob
//! graph; the super block state it keeps is the store's own (`StoreState`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use iobuf::IoBuf;

use crate::alloc::Allocator;
use crate::barrier::Barrier;
use crate::bufpool::BufPool;
use crate::commit::{Committer, FlushGroup};
use crate::error::{einval, enospc};
use crate::format::*;
use crate::graph::Graph;
use crate::layout::{Descriptor, MdPageInfo, SuperBlockInfo};
use crate::md::parse_chain;
use crate::store::{io_err, Geo, PageCache, StoreInner, StoreState};
use crate::{BlobId, BsDev, BsError, BsOpts, ClearMethod, Result, BLOBID_INVALID};

/// Computed layout for init.
struct Layout {
    total_clusters: u64,
    page_mask_len: u32,
    cluster_mask_start: u32,
    cluster_mask_len: u32,
    blobid_mask_start: u32,
    blobid_mask_len: u32,
    md_start: u32,
    md_len: u32,
    md_clusters: u64,
}

fn mask_pages(bits: u64) -> u32 {
    (5 + bits.div_ceil(8)).div_ceil(PAGE as u64) as u32
}

fn compute_layout(dev_bytes: u64, cluster_size: u32, num_md_pages: Option<u32>) -> Result<Layout> {
    if cluster_size < PAGE as u32 || !cluster_size.is_multiple_of(PAGE as u32) {
        return Err(einval(format!(
            "cluster size {cluster_size} is not a multiple of {PAGE}"
        )));
    }
    if dev_bytes < u64::from(cluster_size) {
        return Err(enospc(format!(
            "device of {dev_bytes} bytes is smaller than one cluster ({cluster_size})"
        )));
    }
    let total_clusters = dev_bytes / u64::from(cluster_size);
    let md_len64 = match num_md_pages {
        Some(n) if n != u32::MAX => u64::from(n),
        _ => total_clusters,
    };
    let md_len = u32::try_from(md_len64)
        .map_err(|_| BsError::NoMemory(format!("{md_len64} md pages is too many")))?;
    let page_mask_len = mask_pages(md_len64);
    let cluster_mask_len = mask_pages(total_clusters);
    let reserved = cluster_mask_len.max(mask_pages(md_len64));
    let cluster_mask_start = 1 + page_mask_len;
    let blobid_mask_start = cluster_mask_start + reserved;
    let blobid_mask_len = mask_pages(md_len64);
    let md_start = blobid_mask_start + blobid_mask_len;
    let ppc = u64::from(cluster_size) / PAGE as u64;
    let md_clusters = (u64::from(md_start) + md_len64).div_ceil(ppc);
    if md_clusters > total_clusters {
        return Err(BsError::NoMemory(format!(
            "metadata needs {md_clusters} clusters but the device has {total_clusters}"
        )));
    }
    Ok(Layout {
        total_clusters,
        page_mask_len,
        cluster_mask_start,
        cluster_mask_len,
        blobid_mask_start,
        blobid_mask_len,
        md_start,
        md_len,
        md_clusters,
    })
}

fn bstype_str(b: &[u8; 16]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(16);
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Validates a super block as `bs_super_validate` does, plus geometry sanity checks so a
/// hostile super block can never make us index outside the device.
pub(crate) fn validate_super(
    s: &SuperBlockInfo,
    dev: &dyn BsDev,
    bstype: Option<&[u8; 16]>,
) -> Result<()> {
    if !(1..=VERSION).contains(&s.version) {
        return Err(BsError::BadSuperBlock(format!(
            "unsupported version {}",
            s.version
        )));
    }
    if &s.signature != SIGNATURE {
        return Err(BsError::BadSuperBlock(format!(
            "signature {:02x?} is not SPDKBLOB",
            s.signature
        )));
    }
    if !s.crc_ok {
        return Err(BsError::BadSuperBlock(format!(
            "crc mismatch (stored {:#010x})",
            s.crc
        )));
    }
    if let Some(want) = bstype {
        if want.iter().any(|&b| b != 0) && want != &s.bstype {
            return Err(BsError::BstypeMismatch {
                found: bstype_str(&s.bstype),
                wanted: bstype_str(want),
            });
        }
    }
    let dev_bytes = u64::from(dev.block_len()).saturating_mul(dev.block_count());
    if s.size > dev_bytes {
        return Err(BsError::BadSuperBlock(format!(
            "store size {} is larger than the device ({dev_bytes} bytes)",
            s.size
        )));
    }
    if s.md_page_size != 0 && s.md_page_size != PAGE as u32 {
        return Err(einval(format!(
            "md page size {} is not supported (only 4096)",
            s.md_page_size
        )));
    }
    let io_unit = if s.io_unit_size == 0 {
        4096
    } else {
        s.io_unit_size
    };
    if io_unit != dev.block_len() {
        return Err(einval(format!(
            "store io_unit_size {io_unit} differs from the device block size {}",
            dev.block_len()
        )));
    }
    if s.cluster_size < PAGE as u32 || !s.cluster_size.is_multiple_of(PAGE as u32) {
        return Err(BsError::BadSuperBlock(format!(
            "cluster size {} is not a multiple of 4096",
            s.cluster_size
        )));
    }
    let size = if s.size == 0 { dev_bytes } else { s.size };
    let total_pages = size / PAGE as u64;
    let md_end = u64::from(s.md_start) + u64::from(s.md_len);
    let regions = [
        (
            s.used_page_mask_start,
            s.used_page_mask_len,
            "used page mask",
        ),
        (
            s.used_cluster_mask_start,
            s.used_cluster_mask_len,
            "used cluster mask",
        ),
        (
            s.used_blobid_mask_start,
            s.used_blobid_mask_len,
            "used blobid mask",
        ),
    ];
    for (start, len, what) in regions {
        if u64::from(start) + u64::from(len) > total_pages {
            return Err(BsError::BadSuperBlock(format!(
                "{what} (pages {start}+{len}) lies outside the store"
            )));
        }
    }
    if md_end > total_pages || s.md_start == 0 {
        return Err(BsError::BadSuperBlock(format!(
            "md region (pages {}+{}) lies outside the store",
            s.md_start, s.md_len
        )));
    }
    let clusters = size / u64::from(s.cluster_size);
    let fits = |len: u32, bits: u64| u64::from(len) * PAGE as u64 >= 5 + bits.div_ceil(8);
    if !fits(s.used_page_mask_len, u64::from(s.md_len)) {
        return Err(BsError::BadSuperBlock(format!(
            "used page mask ({} pages) cannot hold {} bits",
            s.used_page_mask_len, s.md_len
        )));
    }
    if !fits(s.used_cluster_mask_len, clusters) {
        return Err(BsError::BadSuperBlock(format!(
            "used cluster mask ({} pages) cannot hold {clusters} bits",
            s.used_cluster_mask_len
        )));
    }
    if s.used_blobid_mask_len != 0 && !fits(s.used_blobid_mask_len, u64::from(s.md_len)) {
        return Err(BsError::BadSuperBlock(format!(
            "used blobid mask ({} pages) cannot hold {} bits",
            s.used_blobid_mask_len, s.md_len
        )));
    }
    let max_mask = mask_pages(clusters.max(u64::from(s.md_len))) + 1;
    for (len, what) in [
        (s.used_page_mask_len, "used page mask"),
        (s.used_cluster_mask_len, "used cluster mask"),
        (s.used_blobid_mask_len, "used blobid mask"),
    ] {
        if len > max_mask {
            return Err(BsError::BadSuperBlock(format!(
                "{what} is {len} pages long, more than the store can need"
            )));
        }
    }
    if size / u64::from(s.cluster_size) == 0 {
        return Err(BsError::BadSuperBlock("store holds no cluster".into()));
    }
    if (size / u64::from(s.cluster_size)) > u64::from(u32::MAX) {
        return Err(BsError::BadSuperBlock("too many clusters".into()));
    }
    Ok(())
}

/// What the load-time scan learns about one blob without opening it.
#[derive(Default)]
struct BlobSummary {
    parent: Option<BlobId>,
    snaptmp: Option<BlobId>,
    snaprm: Option<BlobId>,
}

/// The summary of blob `id` from its whole md chain; `None` (with a warning) when the chain
/// does not parse.
fn summarize(id: BlobId, pages: &[MdPageInfo], total_clusters: u64) -> Option<BlobSummary> {
    let ci = match parse_chain(id, pages, total_clusters) {
        Ok(ci) => ci,
        Err(e) => {
            tracing::warn!(target: "blob", "blob {id:#x}: {e}, skipped");
            return None;
        }
    };
    let get = |n: &str| {
        ci.md
            .get_internal(n)
            .filter(|v| v.len() == 8)
            .and_then(|v| rd_u64(v, 0).ok())
    };
    Some(BlobSummary {
        parent: ci.md.snap_parent().ok().flatten(),
        snaptmp: get(XATTR_SNAPTMP),
        snaprm: get(XATTR_SNAPRM),
    })
}

/// What a recovery scan found: the three masks and, per blob whose chain it read whole, its
/// summary (`None` for a chain that is unreadable), so the load need not read them again.
type Recovered = (
    Bitmap,
    Bitmap,
    Bitmap,
    BTreeMap<BlobId, Option<BlobSummary>>,
);

// ---------------------------------------------------------------------------------------
// init / load / unload

/// The store's in-memory state as init and load build it: the super block `sbi` (whose
/// super blob it takes), the allocator, and fresh locks, counters and pools.
#[allow(clippy::too_many_arguments)]
fn assemble(
    dev: Arc<dyn BsDev>,
    geo: Geo,
    align: usize,
    io_unit: u32,
    alloc: Allocator,
    sbi: SuperBlockInfo,
    clean_on_disk: bool,
    opts: &BsOpts,
) -> Arc<StoreInner> {
    let bufs = BufPool::new(geo.cluster_size as usize, align);
    Arc::new(StoreInner {
        dev,
        geo,
        align,
        md_lock: async_lock::Mutex::new(()),
        graph: Graph::default(),
        alloc,
        st: Mutex::new(StoreState {
            super_blob: sbi.super_blob,
            sbi,
            clean_on_disk,
            unloaded: false,
            doomed: Vec::new(),
            tainted: false,
            shadows: Vec::new(),
        }),
        factory: opts.esnap_factory.clone(),
        write_seq: AtomicU64::new(0),
        durable_seq: AtomicU64::new(0),
        flushes: FlushGroup::default(),
        committer: Committer::default(),
        bufs,
        // The io unit is smaller than an md page: in-place md writes may tear (shadows).
        shadowed: io_unit < PAGE as u32,
    })
}

pub(crate) async fn init(dev: Arc<dyn BsDev>, opts: &BsOpts) -> Result<Arc<StoreInner>> {
    let bl = dev.block_len();
    if !bl.is_power_of_two() || !(512..=PAGE as u32).contains(&bl) {
        return Err(einval(format!(
            "device block size {bl} is not a power of two between 512 and 4096"
        )));
    }
    let cluster_size = if opts.cluster_size == 0 {
        1 << 20
    } else {
        opts.cluster_size
    };
    let dev_bytes = u64::from(bl).saturating_mul(dev.block_count());
    let l = compute_layout(dev_bytes, cluster_size, opts.num_md_pages)?;
    let lba_per_page = PAGE as u64 / u64::from(bl);
    let md_end_lba = (u64::from(l.md_start) + u64::from(l.md_len)) * lba_per_page;
    dev.write_zeroes(0, md_end_lba).await.map_err(io_err)?;
    let data_start = md_end_lba;
    let data_end = l.total_clusters * (u64::from(cluster_size) / u64::from(bl));
    // The data region reads zeroes only after a write_zeroes, or an unmap that zeroes.
    let mut data_clean = match opts.clear_method {
        ClearMethod::None => false,
        ClearMethod::WriteZeroes => true,
        ClearMethod::Default | ClearMethod::Unmap => dev.unmap_zeroes(),
    };
    if data_end > data_start {
        let r = match opts.clear_method {
            ClearMethod::None => Ok(()),
            ClearMethod::WriteZeroes => dev.write_zeroes(data_start, data_end - data_start).await,
            ClearMethod::Default | ClearMethod::Unmap => {
                dev.unmap(data_start, data_end - data_start).await
            }
        };
        if let Err(e) = r {
            if opts.clear_method == ClearMethod::WriteZeroes {
                return Err(io_err(e));
            }
            tracing::debug!(target: "blob", "unmap at init failed: {e}");
            data_clean = false;
        }
    }
    let sbi = SuperBlockInfo {
        signature: *SIGNATURE,
        version: VERSION,
        length: PAGE as u32,
        clean: 0,
        super_blob: BLOBID_INVALID,
        cluster_size,
        used_page_mask_start: 1,
        used_page_mask_len: l.page_mask_len,
        used_cluster_mask_start: l.cluster_mask_start,
        used_cluster_mask_len: l.cluster_mask_len,
        md_start: l.md_start,
        md_len: l.md_len,
        bstype: opts.bstype,
        used_blobid_mask_start: l.blobid_mask_start,
        used_blobid_mask_len: l.blobid_mask_len,
        size: dev_bytes,
        io_unit_size: bl,
        md_page_size: 0,
        crc: 0,
        crc_ok: true,
    };
    let align = dev.buf_align();
    dev.write(0, IoBuf::from_slice(&write_super(&sbi), align))
        .await
        .map_err(io_err)?;
    let geo = Geo {
        io_unit: bl,
        cluster_size,
        md_start: l.md_start,
        md_len: l.md_len,
        lba_per_cluster: u64::from(cluster_size) / u64::from(bl),
        lba_per_page,
        md_clusters: l.md_clusters,
    };
    let mut used_clusters = Bitmap::new(l.total_clusters);
    for c in 0..l.md_clusters {
        used_clusters.set(c);
    }
    let mut stale = Bitmap::new(l.total_clusters);
    if !data_clean {
        for c in l.md_clusters..l.total_clusters {
            stale.set(c);
        }
    }
    let alloc = Allocator::new(
        l.total_clusters,
        Bitmap::new(u64::from(l.md_len)),
        used_clusters,
        Bitmap::new(u64::from(l.md_len)),
        stale,
    );
    let inner = assemble(dev, geo, align, bl, alloc, sbi, false, opts);
    // init returns a store that a power cut cannot take back.
    inner.barrier(Barrier::Super).await?;
    Ok(inner)
}

/// Validated geometry from a super block.
pub(crate) fn geo_from_super(s: &SuperBlockInfo, dev: &dyn BsDev) -> (Geo, u64) {
    let dev_bytes = u64::from(dev.block_len()) * dev.block_count();
    let size = if s.size == 0 { dev_bytes } else { s.size };
    let io_unit = dev.block_len();
    let ppc = u64::from(s.cluster_size) / PAGE as u64;
    let geo = Geo {
        io_unit,
        cluster_size: s.cluster_size,
        md_start: s.md_start,
        md_len: s.md_len,
        lba_per_cluster: u64::from(s.cluster_size) / u64::from(io_unit),
        lba_per_page: PAGE as u64 / u64::from(io_unit),
        md_clusters: (u64::from(s.md_start) + u64::from(s.md_len)).div_ceil(ppc),
    };
    (geo, size / u64::from(s.cluster_size))
}

/// Masks read from disk for a clean store, or `None` when they do not hold up.
async fn read_masks(
    dev: &dyn BsDev,
    s: &SuperBlockInfo,
    geo: &Geo,
    total: u64,
    align: usize,
) -> Result<Option<(Bitmap, Bitmap, Bitmap)>> {
    let read = |start: u32, len: u32| async move {
        let buf = IoBuf::new(len as usize * PAGE, align);
        dev.read(u64::from(start) * geo.lba_per_page, buf)
            .await
            .map_err(io_err)
    };
    let md_len = u64::from(geo.md_len);
    let pb = read(s.used_page_mask_start, s.used_page_mask_len).await?;
    let cb = read(s.used_cluster_mask_start, s.used_cluster_mask_len).await?;
    let bb = read(s.used_blobid_mask_start, s.used_blobid_mask_len).await?;
    let (Some(p), Some(c), Some(b)) = (
        Bitmap::from_mask(&pb, MASK_PAGES, md_len),
        Bitmap::from_mask(&cb, MASK_CLUSTERS, total),
        Bitmap::from_mask(&bb, MASK_BLOBIDS, md_len),
    ) else {
        return Ok(None);
    };
    Ok(Some((p, c, b)))
}

/// Finds the copy of a torn super block: a valid super block in the md region whose first io
/// unit equals the torn one's (so its fields are the ones the torn page holds).
async fn find_super_shadow(
    dev: &dyn BsDev,
    torn: &[u8],
    sbi: &SuperBlockInfo,
    align: usize,
) -> Result<Option<Vec<u8>>> {
    let mut probe = sbi.clone();
    probe.crc_ok = true;
    if validate_super(&probe, dev, None).is_err() {
        return Ok(None);
    }
    let (geo, _) = geo_from_super(&probe, dev);
    let unit = dev.block_len() as usize;
    let mut cache = PageCache::new(dev, &geo, align);
    for p in 0..geo.md_len {
        let pg = cache.get(p).await?;
        if &pg[..8] == SIGNATURE && pg[..unit] == torn[..unit] && parse_super(pg)?.crc_ok {
            return Ok(Some(pg.to_vec()));
        }
    }
    Ok(None)
}

/// Before a recovery load on a device whose io unit is smaller than an md page: puts back
/// the md pages (roots, extent pages) that a power cut tore during their in-place write,
/// from the shadow copies made durable before it, writes a restored super block, then
/// zeroes every shadow (a stale one must never stand for a later write). Writes nothing
/// when there is no shadow.
async fn repair_torn(
    dev: &dyn BsDev,
    geo: &Geo,
    align: usize,
    super_fix: Option<Vec<u8>>,
) -> Result<()> {
    let mut cache = PageCache::new(dev, geo, align);
    let mut shadows: Vec<(u32, MdPageInfo, Vec<u8>)> = Vec::new();
    let mut bad: BTreeSet<u32> = BTreeSet::new();
    let mut roots: Vec<u32> = Vec::new();
    for p in 0..geo.md_len {
        let pg = cache.get(p).await?;
        if is_shadow(pg) {
            shadows.push((p, parse_md_page(pg)?, pg.to_vec()));
            continue;
        }
        let info = parse_md_page(pg)?;
        // An all-zero page is not torn: nothing reached it (a create's root write wholly
        // lost, maybe before its PreCommit flush) or a zeroing completed. Either way it is a
        // whole state; a shadow of a new root must not resurrect it, since the pages that
        // root points at may not be durable.
        if !info.crc_ok && pg.iter().any(|&b| b != 0) {
            bad.insert(p);
        } else if info.sequence_num == 0 && info.id == page_to_blobid(p) {
            roots.push(p);
        }
    }
    if shadows.is_empty() && super_fix.is_none() {
        return Ok(());
    }
    let ep_of = |i: &MdPageInfo| extent_page_contents(i).map(|(s, _)| s);
    let mut fixes: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for &p in &bad {
        let id = page_to_blobid(p);
        let Some((_, info, sh)) = shadows.iter().find(|(_, i, _)| {
            i.id == id
                && (i.sequence_num == TOMBSTONE_SEQ || (i.sequence_num == 0 && ep_of(i).is_none()))
        }) else {
            continue;
        };
        if info.sequence_num == TOMBSTONE_SEQ {
            // A delete whose root zeroing tore: finish it.
            fixes.insert(p, vec![0u8; PAGE]);
        } else {
            fixes.insert(p, unshadow(sh));
            roots.push(p);
        }
    }
    if shadows.iter().any(|(_, i, _)| ep_of(i).is_some()) {
        for &r in &roots {
            let id = page_to_blobid(r);
            // The extent table of the (maybe restored) chain.
            let mut entries: Vec<(u32, u32)> = Vec::new();
            let mut cur = match fixes.get(&r) {
                Some(b) => parse_md_page(b)?,
                None => parse_md_page(cache.get(r).await?)?,
            };
            let mut seen = HashSet::from([r]);
            loop {
                for d in &cur.descriptors {
                    if let Descriptor::ExtentTable { entries: e, .. } = d {
                        entries.extend_from_slice(e);
                    }
                }
                let next = cur.next;
                if next == INVALID_PAGE || next >= geo.md_len || !seen.insert(next) {
                    break;
                }
                cur = parse_md_page(cache.get(next).await?)?;
                if !cur.crc_ok {
                    break;
                }
            }
            let mut idx = 0u64;
            for (pidx, n) in entries {
                if pidx == 0 {
                    idx += u64::from(n);
                    continue;
                }
                let start = idx * EXTENTS_PER_EP as u64;
                idx += 1;
                if pidx >= geo.md_len || fixes.contains_key(&pidx) {
                    continue;
                }
                let info = parse_md_page(cache.get(pidx).await?)?;
                if info.crc_ok {
                    continue;
                }
                if let Some((_, _, sh)) = shadows
                    .iter()
                    .find(|(_, i, _)| i.id == id && ep_of(i).map(u64::from) == Some(start))
                {
                    fixes.insert(pidx, unshadow(sh));
                }
            }
        }
    }
    for (p, b) in &fixes {
        tracing::warn!(target: "blob", "md page {p} torn by a power cut: restored from its shadow");
        dev.write(geo.page_lba(*p), IoBuf::from_slice(b, align))
            .await
            .map_err(io_err)?;
    }
    if let Some(b) = &super_fix {
        dev.write(0, IoBuf::from_slice(b, align))
            .await
            .map_err(io_err)?;
    }
    dev.flush().await.map_err(io_err)?;
    for (p, _, _) in &shadows {
        dev.write_zeroes(geo.page_lba(*p), geo.lba_per_page)
            .await
            .map_err(io_err)?;
    }
    dev.flush().await.map_err(io_err)?;
    Ok(())
}

/// Rebuilds the three masks by walking md pages (format §8).
async fn recover_masks(dev: &dyn BsDev, geo: &Geo, total: u64, align: usize) -> Result<Recovered> {
    let md_len = geo.md_len;
    let mut pages = Bitmap::new(u64::from(md_len));
    let mut clusters = Bitmap::new(total);
    let mut blobids = Bitmap::new(u64::from(md_len));
    let mut summaries = BTreeMap::new();
    let mut cache = PageCache::new(dev, geo, align);
    let mark = |clusters: &mut Bitmap, c: u32, what: u64| {
        if u64::from(c) < total {
            clusters.set(u64::from(c));
        } else {
            tracing::warn!(target: "blob", "recovery: blob {what:#x} maps cluster {c} beyond the store");
        }
    };
    for p in 0..md_len {
        if pages.get(u64::from(p)) {
            continue;
        }
        let pg = cache.get(p).await?;
        // Only a root page can start a chain: check its id and sequence number before
        // paying for the CRC and the descriptor walk (most pages of a scan are not roots).
        if rd_u64(pg, 0)? != page_to_blobid(p) || rd_u32(pg, 8)? != 0 {
            continue;
        }
        let info = parse_md_page(pg)?;
        if !info.crc_ok || info.sequence_num != 0 || info.id != page_to_blobid(p) {
            continue;
        }
        let id = info.id;
        pages.set(u64::from(p));
        blobids.set(u64::from(p));
        let mut ep_list: Vec<u32> = Vec::new();
        let mut chain = vec![info];
        let mut seen = HashSet::from([p]);
        let whole = loop {
            let Some(cur) = chain.last() else { break false };
            for d in &cur.descriptors {
                match d {
                    Descriptor::ExtentRle(runs) => {
                        for &(c, l) in runs {
                            if c != 0 {
                                let end = (u64::from(c) + u64::from(l)).min(total);
                                if u64::from(c) + u64::from(l) > total {
                                    mark(&mut clusters, u32::MAX, id);
                                }
                                for k in u64::from(c)..end {
                                    clusters.set(k);
                                }
                            }
                        }
                    }
                    Descriptor::ExtentTable { entries, .. } => {
                        ep_list.extend(entries.iter().filter(|e| e.0 != 0).map(|e| e.0));
                    }
                    _ => {}
                }
            }
            let next = cur.next;
            if next == INVALID_PAGE {
                break true;
            }
            if next >= md_len || !seen.insert(next) {
                break false;
            }
            let ni = parse_md_page(cache.get(next).await?)?;
            if !ni.crc_ok {
                break false;
            }
            pages.set(u64::from(next));
            chain.push(ni);
        };
        let summary = if whole {
            summarize(id, &chain, total)
        } else {
            tracing::warn!(target: "blob", "blob {id:#x}: unreadable md chain, skipped");
            None
        };
        summaries.insert(id, summary);
        for ep in ep_list {
            if ep >= md_len {
                continue;
            }
            let info = parse_md_page(cache.get(ep).await?)?;
            let Some((_, entries)) = extent_page_contents(&info) else {
                tracing::warn!(target: "blob", "recovery: extent page {ep} of blob {id:#x} is invalid");
                continue;
            };
            pages.set(u64::from(ep));
            for &c in entries {
                if c != 0 {
                    mark(&mut clusters, c, id);
                }
            }
        }
    }
    for c in 0..geo.md_clusters.min(total) {
        clusters.set(c);
    }
    Ok((pages, clusters, blobids, summaries))
}

pub(crate) async fn load(dev: Arc<dyn BsDev>, opts: &BsOpts) -> Result<Arc<StoreInner>> {
    let align = dev.buf_align();
    let bl = dev.block_len();
    if !bl.is_power_of_two() || !(512..=PAGE as u32).contains(&bl) {
        return Err(einval(format!(
            "device block size {bl} is not a power of two between 512 and 4096"
        )));
    }
    if dev.block_count().saturating_mul(u64::from(bl)) < PAGE as u64 {
        return Err(BsError::BadSuperBlock(
            "device is smaller than a super block".into(),
        ));
    }
    let buf = dev.read(0, IoBuf::new(PAGE, align)).await.map_err(io_err)?;
    let mut sbi = parse_super(&buf)?;
    // A super block write torn by a power cut (io unit < 4 KiB) keeps one version's fields
    // in its first io unit: take the durable copy written before it that matches.
    let mut super_fix = None;
    if !sbi.crc_ok && bl < PAGE as u32 && &sbi.signature == SIGNATURE {
        if let Some(fixed) = find_super_shadow(dev.as_ref(), &buf, &sbi, align).await? {
            sbi = parse_super(&fixed)?;
            tracing::warn!(target: "blob", "super block torn by a power cut: restored from its copy");
            super_fix = Some(fixed);
        }
    }
    validate_super(&sbi, dev.as_ref(), Some(&opts.bstype))?;
    let (geo, total) = geo_from_super(&sbi, dev.as_ref());
    if geo.md_clusters > total {
        return Err(BsError::BadSuperBlock(format!(
            "metadata ({} clusters) does not fit in the store ({total} clusters)",
            geo.md_clusters
        )));
    }
    let need_recovery = sbi.used_blobid_mask_len == 0
        || sbi.clean == 0
        || opts.force_recover
        || super_fix.is_some();
    if need_recovery && bl < PAGE as u32 {
        repair_torn(dev.as_ref(), &geo, align, super_fix).await?;
    }
    let masks = if need_recovery {
        None
    } else {
        read_masks(dev.as_ref(), &sbi, &geo, total, align).await?
    };
    let (used_pages, mut used_clusters, used_blobids, scanned) = match masks {
        Some((p, c, b)) => (p, c, b, None),
        None => {
            if !need_recovery {
                tracing::warn!(target: "blob", "masks of a clean store are invalid; recovering");
            }
            let (p, c, b, sums) = recover_masks(dev.as_ref(), &geo, total, align).await?;
            (p, c, b, Some(sums))
        }
    };
    for c in 0..geo.md_clusters {
        used_clusters.set(c);
    }
    let clean_on_disk = sbi.clean == 1 && !need_recovery;
    // What was released without clearing before this load is not recorded on disk: every
    // free cluster may hold old bytes (also those of a write whose allocation a power cut
    // lost). A thick claim zeroes them; thin allocations write whole clusters anyway.
    let mut stale = Bitmap::new(total);
    for c in geo.md_clusters..total {
        if !used_clusters.get(c) {
            stale.set(c);
        }
    }
    let alloc = Allocator::new(total, used_pages, used_clusters, used_blobids, stale);
    let inner = assemble(dev, geo, align, bl, alloc, sbi, clean_on_disk, opts);
    inner.build_relations(scanned).await?;
    Ok(inner)
}

/// The indices of the `(index, cluster or page)` entries whose cluster or page is in `other`:
/// what a blob shares with another one.
fn shared_with(entries: impl Iterator<Item = (usize, u32)>, other: &HashSet<u32>) -> Vec<usize> {
    entries
        .filter(|(_, x)| other.contains(x))
        .map(|(i, _)| i)
        .collect()
}

impl StoreInner {
    /// Reads the md chain of every blob in the blob-id mask and summarises it.
    async fn read_summaries(&self) -> Result<BTreeMap<BlobId, BlobSummary>> {
        let ids: Vec<u64> = self.alloc.lock().used_blobids.iter_ones().collect();
        let total = self.alloc.lock().total_clusters;
        let mut summaries = BTreeMap::new();
        let mut cache = PageCache::new(self.dev.as_ref(), &self.geo, self.align);
        for p in ids {
            let p = p as u32;
            let id = page_to_blobid(p);
            let mut pages = Vec::new();
            let mut cur = p;
            let mut seen = HashSet::new();
            let ok = loop {
                if !seen.insert(cur) {
                    break false;
                }
                let info = parse_md_page(cache.get(cur).await?)?;
                if !info.crc_ok || (pages.is_empty() && info.id != id) {
                    break false;
                }
                let next = info.next;
                pages.push(info);
                if next == INVALID_PAGE {
                    break true;
                }
                if next >= self.geo.md_len || pages.len() > self.geo.md_len as usize {
                    break false;
                }
                cur = next;
            };
            if !ok {
                tracing::warn!(target: "blob", "blob {id:#x}: unreadable md chain, skipped");
                continue;
            }
            if let Some(sum) = summarize(id, &pages, total) {
                summaries.insert(id, sum);
            }
        }
        Ok(summaries)
    }

    /// Reads every blob's chain to build the snapshot/clone graph, then runs the
    /// SNAPTMP / SNAPRM power-failure fix-ups.
    async fn build_relations(
        self: &Arc<Self>,
        scanned: Option<BTreeMap<BlobId, Option<BlobSummary>>>,
    ) -> Result<()> {
        let summaries: BTreeMap<BlobId, BlobSummary> = match scanned {
            // A recovery scan read every chain already.
            Some(sums) => sums
                .into_iter()
                .filter_map(|(id, s)| s.map(|s| (id, s)))
                .collect(),
            None => self.read_summaries().await?,
        };
        for (id, s) in &summaries {
            if let Some(p) = s.parent {
                self.add_relation(p, *id);
            }
        }
        for (id, s) in &summaries {
            let target = s.snaptmp.or(s.snaprm);
            if let Some(t) = target {
                self.fixup_pending_snapshot(*id, t, s.snaptmp.is_some())
                    .await?;
            }
        }
        Ok(())
    }

    /// A snapshot left with SNAPTMP (creation) or SNAPRM (deletion) by a power failure:
    /// keep it if `target` already points at it, else delete it without freeing anything
    /// `target` also owns.
    async fn fixup_pending_snapshot(
        self: &Arc<Self>,
        snap: BlobId,
        target: BlobId,
        creating: bool,
    ) -> Result<()> {
        let _g = self.md_lock.lock().await;
        let (mut md, chain) = self.load_blob_md(snap).await?;
        let points_here = self.graph.lock().parent_of.get(&target) == Some(&snap);
        if points_here {
            md.remove_internal(if creating {
                XATTR_SNAPTMP
            } else {
                XATTR_SNAPRM
            });
            if creating {
                md.data_ro |= DATA_RO_READ_ONLY;
            }
            self.persist_md(snap, &md, &chain, &BTreeSet::new(), &[])
                .await?;
            tracing::info!(target: "blob", "recovery: kept snapshot {snap:#x}");
            return Ok(());
        }
        let (tclusters, teps): (HashSet<u32>, HashSet<u32>) = match self.load_blob_md(target).await
        {
            Ok((tmd, _)) => (
                tmd.clusters.allocated().map(|(_, c)| c).collect(),
                tmd.eps.pages().map(|(_, p)| p).collect(),
            ),
            Err(_) => (HashSet::new(), HashSet::new()),
        };
        for i in shared_with(md.clusters.allocated(), &tclusters) {
            md.clusters.set(i, 0);
        }
        for k in shared_with(md.eps.pages(), &teps) {
            md.eps.set(k, 0);
        }
        self.alloc.lock().used_blobids.clear(u64::from(snap as u32));
        self.persist_delete(snap, &md, &chain).await?;
        self.forget_blob(snap);
        let orphans: Vec<BlobId> = self.graph.lock().clones.remove(&snap).unwrap_or_default();
        for o in orphans {
            self.graph.lock().parent_of.remove(&o);
        }
        tracing::info!(target: "blob", "recovery: deleted unfinished snapshot {snap:#x}");
        Ok(())
    }

    pub(crate) async fn unload(&self) -> Result<()> {
        let _g = self.md_lock.lock().await;
        {
            if self.state().unloaded {
                return Err(BsError::BadHandle(
                    "the blobstore was already unloaded".into(),
                ));
            }
            let open = self.graph.lock().open.len();
            if open != 0 {
                return Err(crate::error::busy(format!("{open} blob(s) still open")));
            }
        }
        let r = self.write_clean().await;
        // Like SPDK, a failed unload (a device gone away) still ends this store.
        self.state().unloaded = true;
        r
    }

    /// Writes the three masks, then the super block with clean = 1.
    async fn write_clean(&self) -> Result<()> {
        if self.state().tainted {
            tracing::warn!(target: "blob", "an md write failed earlier: the store is left dirty for recovery at the next load");
            return Ok(());
        }
        // A blob left out of the masks must be gone from the disk too, else a clean load
        // would never see (and never finish deleting) it. If it still cannot be deleted, the
        // store stays dirty and the next load's recovery deletes it.
        let doomed = std::mem::take(&mut self.state().doomed);
        for (i, (id, md, chain)) in doomed.iter().enumerate() {
            if let Err(e) = self.persist_delete(*id, md, chain).await {
                self.state().doomed.extend(doomed[i..].iter().cloned());
                return Err(e);
            }
        }
        // Retire the shadows of earlier in-place writes (their zeroing is made durable by the
        // masks' barrier below), so that the masks do not count them.
        self.flush_all().await?;
        let s = self.read_super().await?;
        let (pm, cm, bm, total) = {
            let st = self.alloc.lock();
            (
                st.used_pages.to_mask(MASK_PAGES, s.used_page_mask_len),
                st.used_clusters
                    .to_mask(MASK_CLUSTERS, s.used_cluster_mask_len),
                st.used_blobids
                    .to_mask(MASK_BLOBIDS, s.used_blobid_mask_len),
                st.total_clusters,
            )
        };
        let lpp = self.geo.lba_per_page;
        let w = |start: u32, data: Vec<u8>| async move {
            self.dev
                .write(u64::from(start) * lpp, IoBuf::from_slice(&data, self.align))
                .await
                .map_err(io_err)
        };
        w(s.used_page_mask_start, pm).await?;
        if s.used_blobid_mask_len != 0 {
            w(s.used_blobid_mask_start, bm).await?;
        }
        w(s.used_cluster_mask_start, cm).await?;
        // The masks are durable before the store says they are valid.
        self.barrier(Barrier::UnloadMasks).await?;
        let dev_bytes = u64::from(self.dev.block_len()) * self.dev.block_count();
        let super_blob = self.state().super_blob;
        self.update_super(|s| {
            s.clean = 1;
            s.super_blob = super_blob;
            if s.size == 0 {
                s.size = dev_bytes;
            }
            let _ = total;
        })
        .await?;
        self.barrier(Barrier::UnloadClean).await?;
        self.state().clean_on_disk = true;
        Ok(())
    }
}
