//! On-disk encoding: super block, masks, md pages and descriptors (SPDK format version 3).
//!
//! Everything here is pure byte manipulation: no device access, no store state. Parsers never
//! panic and never trust a length read from disk beyond the buffer they were given.

use crate::layout::{Descriptor, MaskInfo, MdPageInfo, SuperBlockInfo};
use crate::{BsError, Result};

/// Size of a metadata page and of the super block struct.
pub(crate) const PAGE: usize = 4096;
/// Bytes of descriptors in a md page.
pub(crate) const DESC_AREA: usize = 4072;
/// Offset of the descriptor area in a md page.
pub(crate) const DESC_OFF: usize = 16;
/// Offset of `next` in a md page.
pub(crate) const NEXT_OFF: usize = 4088;
/// Offset of the CRC in any CRC-protected page.
pub(crate) const CRC_OFF: usize = 4092;
/// `SPDK_INVALID_MD_PAGE`.
pub(crate) const INVALID_PAGE: u32 = u32::MAX;
/// `SPDK_EXTENTS_PER_EP` for 4 KiB pages.
pub(crate) const EXTENTS_PER_EP: usize = 512;
/// Super block signature.
pub(crate) const SIGNATURE: &[u8; 8] = b"SPDKBLOB";
/// Format version written at init.
pub(crate) const VERSION: u32 = 3;

pub(crate) const DESC_PADDING: u8 = 0;
pub(crate) const DESC_EXTENT_RLE: u8 = 1;
pub(crate) const DESC_XATTR: u8 = 2;
pub(crate) const DESC_FLAGS: u8 = 3;
pub(crate) const DESC_XATTR_INTERNAL: u8 = 4;
pub(crate) const DESC_EXTENT_TABLE: u8 = 5;
pub(crate) const DESC_EXTENT_PAGE: u8 = 6;

/// invalid_flags bits.
pub(crate) const INV_THIN: u64 = 0x1;
pub(crate) const INV_INTERNAL_XATTR: u64 = 0x2;
pub(crate) const INV_EXTENT_TABLE: u64 = 0x4;
pub(crate) const INV_ESNAP: u64 = 0x8;
pub(crate) const INV_MASK: u64 = 0xF;
/// data_ro_flags bits.
pub(crate) const DATA_RO_READ_ONLY: u64 = 0x1;
/// md_ro_flags bits.
pub(crate) const MD_RO_CLEAR_MASK: u64 = 0x3;

/// Internal xattr names.
pub(crate) const XATTR_SNAP: &str = "SNAP";
pub(crate) const XATTR_SNAPTMP: &str = "SNAPTMP";
pub(crate) const XATTR_SNAPRM: &str = "SNAPRM";
pub(crate) const XATTR_EXTSNAP: &str = "EXTSNAP";

/// Mask types.
pub(crate) const MASK_PAGES: u8 = 0;
pub(crate) const MASK_CLUSTERS: u8 = 1;
pub(crate) const MASK_BLOBIDS: u8 = 2;

/// Reads `N` bytes at `off`, or a corrupt-metadata error naming the short read: a field that
/// lies past the end of what was read is never taken as 0.
fn rd_bytes<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N]> {
    off.checked_add(N)
        .and_then(|end| b.get(off..end))
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| {
            BsError::Corrupt(format!(
                "short read: a {N}-byte field at offset {off} lies past the end of {} bytes",
                b.len()
            ))
        })
}
/// Little-endian u16 at `off`; a short read is an error.
pub(crate) fn rd_u16(b: &[u8], off: usize) -> Result<u16> {
    rd_bytes(b, off).map(u16::from_le_bytes)
}
/// Little-endian u32 at `off`; a short read is an error.
pub(crate) fn rd_u32(b: &[u8], off: usize) -> Result<u32> {
    rd_bytes(b, off).map(u32::from_le_bytes)
}
/// Little-endian u64 at `off`; a short read is an error.
pub(crate) fn rd_u64(b: &[u8], off: usize) -> Result<u64> {
    rd_bytes(b, off).map(u64::from_le_bytes)
}
pub(crate) fn wr_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn wr_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// CRC of a 4096-byte page (SPDK `blob_md_page_calc_crc`).
pub(crate) fn page_crc(page: &[u8]) -> u32 {
    crc32c::crc32c(&page[..CRC_OFF])
}

/// Fills in the CRC of a 4096-byte page.
pub(crate) fn seal_page(page: &mut [u8]) {
    let c = page_crc(page);
    wr_u32(page, CRC_OFF, c);
}

/// Offset of the md page's `reserved` field, which SPDK (and our own md pages) leave zero.
pub(crate) const RESERVED_OFF: usize = 12;

/// `reserved` of a shadow page: a copy of an md page about to be rewritten in place, kept in
/// a free md page until that write is durable (see "Metadata ordering" in the docs).
pub(crate) const SHADOW_TAG: u32 = 0x5744_4853; // "SHDW"

/// The shadow of md page `page`: the same bytes, tagged, CRC resealed.
pub(crate) fn shadow_of(page: &[u8]) -> Vec<u8> {
    let mut p = page.to_vec();
    wr_u32(&mut p, RESERVED_OFF, SHADOW_TAG);
    seal_page(&mut p);
    p
}

/// The md page a shadow stands for (tag cleared, CRC resealed).
pub(crate) fn unshadow(shadow: &[u8]) -> Vec<u8> {
    let mut p = shadow.to_vec();
    wr_u32(&mut p, RESERVED_OFF, 0);
    seal_page(&mut p);
    p
}

/// `sequence_num` of a tombstone: the shadow of a root page about to be zeroed (a blob
/// delete), so that a delete torn by a power cut is told from a damaged root page.
pub(crate) const TOMBSTONE_SEQ: u32 = u32::MAX;

/// The tombstone of blob `id` (a shadow page).
pub(crate) fn tombstone(id: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    wr_u64(&mut p, 0, id);
    wr_u32(&mut p, 8, TOMBSTONE_SEQ);
    wr_u32(&mut p, NEXT_OFF, INVALID_PAGE);
    shadow_of(&p)
}

/// Whether `page` is a shadow of an md page with a valid CRC.
pub(crate) fn is_shadow(page: &[u8]) -> bool {
    page.len() >= PAGE
        && rd_u32(page, RESERVED_OFF).is_ok_and(|t| t == SHADOW_TAG)
        && rd_u32(page, CRC_OFF).is_ok_and(|c| c == page_crc(page))
}

/// Blob id of md page `idx`.
pub(crate) fn page_to_blobid(idx: u32) -> u64 {
    (1u64 << 32) | u64::from(idx)
}

/// md page of a blob id, if the id is well-formed.
pub(crate) fn blobid_to_page(id: u64) -> Option<u32> {
    if id >> 32 == 1 {
        Some(id as u32)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------
// Super block

pub(crate) mod sb {
    pub const VERSION: usize = 8;
    pub const LENGTH: usize = 12;
    pub const CLEAN: usize = 16;
    pub const SUPER_BLOB: usize = 20;
    pub const CLUSTER_SIZE: usize = 28;
    pub const PAGE_MASK_START: usize = 32;
    pub const PAGE_MASK_LEN: usize = 36;
    pub const CLUSTER_MASK_START: usize = 40;
    pub const CLUSTER_MASK_LEN: usize = 44;
    pub const MD_START: usize = 48;
    pub const MD_LEN: usize = 52;
    pub const BSTYPE: usize = 56;
    pub const BLOBID_MASK_START: usize = 72;
    pub const BLOBID_MASK_LEN: usize = 76;
    pub const SIZE: usize = 80;
    pub const IO_UNIT_SIZE: usize = 88;
    pub const MD_PAGE_SIZE: usize = 92;
}

/// Parses the raw super block fields (no validation beyond the length).
pub(crate) fn parse_super(b: &[u8]) -> Result<SuperBlockInfo> {
    if b.len() < PAGE {
        return Err(BsError::InvalidArgument(format!(
            "super block buffer is {} bytes, need {PAGE}",
            b.len()
        )));
    }
    let mut signature = [0u8; 8];
    signature.copy_from_slice(&b[0..8]);
    let mut bstype = [0u8; 16];
    bstype.copy_from_slice(&b[sb::BSTYPE..sb::BSTYPE + 16]);
    let crc = rd_u32(b, CRC_OFF)?;
    Ok(SuperBlockInfo {
        signature,
        version: rd_u32(b, sb::VERSION)?,
        length: rd_u32(b, sb::LENGTH)?,
        clean: rd_u32(b, sb::CLEAN)?,
        super_blob: rd_u64(b, sb::SUPER_BLOB)?,
        cluster_size: rd_u32(b, sb::CLUSTER_SIZE)?,
        used_page_mask_start: rd_u32(b, sb::PAGE_MASK_START)?,
        used_page_mask_len: rd_u32(b, sb::PAGE_MASK_LEN)?,
        used_cluster_mask_start: rd_u32(b, sb::CLUSTER_MASK_START)?,
        used_cluster_mask_len: rd_u32(b, sb::CLUSTER_MASK_LEN)?,
        md_start: rd_u32(b, sb::MD_START)?,
        md_len: rd_u32(b, sb::MD_LEN)?,
        bstype,
        used_blobid_mask_start: rd_u32(b, sb::BLOBID_MASK_START)?,
        used_blobid_mask_len: rd_u32(b, sb::BLOBID_MASK_LEN)?,
        size: rd_u64(b, sb::SIZE)?,
        io_unit_size: rd_u32(b, sb::IO_UNIT_SIZE)?,
        md_page_size: rd_u32(b, sb::MD_PAGE_SIZE)?,
        crc,
        crc_ok: page_crc(b) == crc,
    })
}

/// Serialises a super block (4096 bytes, CRC filled in).
pub(crate) fn write_super(s: &SuperBlockInfo) -> Vec<u8> {
    let mut b = vec![0u8; PAGE];
    b[0..8].copy_from_slice(&s.signature);
    wr_u32(&mut b, sb::VERSION, s.version);
    wr_u32(&mut b, sb::LENGTH, s.length);
    wr_u32(&mut b, sb::CLEAN, s.clean);
    wr_u64(&mut b, sb::SUPER_BLOB, s.super_blob);
    wr_u32(&mut b, sb::CLUSTER_SIZE, s.cluster_size);
    wr_u32(&mut b, sb::PAGE_MASK_START, s.used_page_mask_start);
    wr_u32(&mut b, sb::PAGE_MASK_LEN, s.used_page_mask_len);
    wr_u32(&mut b, sb::CLUSTER_MASK_START, s.used_cluster_mask_start);
    wr_u32(&mut b, sb::CLUSTER_MASK_LEN, s.used_cluster_mask_len);
    wr_u32(&mut b, sb::MD_START, s.md_start);
    wr_u32(&mut b, sb::MD_LEN, s.md_len);
    b[sb::BSTYPE..sb::BSTYPE + 16].copy_from_slice(&s.bstype);
    wr_u32(&mut b, sb::BLOBID_MASK_START, s.used_blobid_mask_start);
    wr_u32(&mut b, sb::BLOBID_MASK_LEN, s.used_blobid_mask_len);
    wr_u64(&mut b, sb::SIZE, s.size);
    wr_u32(&mut b, sb::IO_UNIT_SIZE, s.io_unit_size);
    wr_u32(&mut b, sb::MD_PAGE_SIZE, s.md_page_size);
    seal_page(&mut b);
    b
}

// ---------------------------------------------------------------------------------------
// Masks

/// A fixed-length bit array (SPDK `spdk_bit_array`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    pub(crate) fn new(len: u64) -> Bitmap {
        Bitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }
    pub(crate) fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    pub(crate) fn set(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }
    pub(crate) fn clear(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }
    pub(crate) fn resize(&mut self, len: u64) {
        let old = self.len;
        self.words.resize(len.div_ceil(64) as usize, 0);
        self.len = len;
        if len < old {
            // Clear bits past the new end in the last word.
            for i in len..(self.words.len() as u64 * 64) {
                self.words[(i / 64) as usize] &= !(1 << (i % 64));
            }
        }
    }
    /// First clear bit at or after `from`.
    pub(crate) fn first_clear(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let w = self.words[(i / 64) as usize];
            if w == u64::MAX && i.is_multiple_of(64) {
                i += 64;
                continue;
            }
            if w & (1 << (i % 64)) == 0 {
                return Some(i);
            }
            i += 1;
        }
        None
    }
    pub(crate) fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    pub(crate) fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(move |(wi, &w)| {
            let len = self.len;
            (0..64u64).filter_map(move |b| {
                let i = wi as u64 * 64 + b;
                (w & (1 << b) != 0 && i < len).then_some(i)
            })
        })
    }
    /// Serialises as a mask region of `pages` pages.
    pub(crate) fn to_mask(&self, mask_type: u8, pages: u32) -> Vec<u8> {
        let mut b = vec![0u8; pages as usize * PAGE];
        if b.len() < 5 {
            return b;
        }
        b[0] = mask_type;
        wr_u32(&mut b, 1, self.len as u32);
        for i in self.iter_ones() {
            let byte = 5 + (i / 8) as usize;
            if byte < b.len() {
                b[byte] |= 1 << (i % 8);
            }
        }
        b
    }
    /// Parses a mask region; `None` if the header does not match or the bits do not fit.
    pub(crate) fn from_mask(b: &[u8], mask_type: u8, len: u64) -> Option<Bitmap> {
        if b.len() < 5 || b[0] != mask_type {
            return None;
        }
        let stored = u64::from(rd_u32(b, 1).ok()?);
        if stored < len || 5 + (len as usize).div_ceil(8) > b.len() {
            return None;
        }
        let mut m = Bitmap::new(len);
        for i in 0..len {
            if b[5 + (i / 8) as usize] & (1 << (i % 8)) != 0 {
                m.set(i);
            }
        }
        Some(m)
    }
}

/// Parses a mask region into the public view.
pub(crate) fn parse_mask(b: &[u8]) -> Result<MaskInfo> {
    if b.len() < 5 {
        return Err(BsError::InvalidArgument(format!(
            "mask region is {} bytes, need at least 5",
            b.len()
        )));
    }
    let length = rd_u32(b, 1)?;
    let avail = ((b.len() - 5) * 8) as u64;
    let n = u64::from(length).min(avail);
    let mut set_bits = Vec::new();
    for i in 0..n {
        if b[5 + (i / 8) as usize] & (1 << (i % 8)) != 0 {
            set_bits.push(i);
        }
    }
    Ok(MaskInfo {
        mask_type: b[0],
        length,
        set_bits,
    })
}

// ---------------------------------------------------------------------------------------
// md pages and descriptors

/// Parses a md page: header, CRC, descriptors up to the terminator. Malformed descriptors
/// come back as `Descriptor::Unknown` with their (known) type byte, which ends the walk.
pub(crate) fn parse_md_page(b: &[u8]) -> Result<MdPageInfo> {
    if b.len() < PAGE {
        return Err(BsError::InvalidArgument(format!(
            "md page buffer is {} bytes, need {PAGE}",
            b.len()
        )));
    }
    let crc = rd_u32(b, CRC_OFF)?;
    let mut descriptors = Vec::new();
    let area = &b[DESC_OFF..DESC_OFF + DESC_AREA];
    let mut off = 0usize;
    while off < area.len() {
        let t = area[off];
        if off + 5 > area.len() {
            // A header cut off by the end of the area: zero padding ends the walk, anything
            // else is a truncated descriptor (never read as zeroes).
            if area[off..].iter().any(|&x| x != 0) {
                descriptors.push(Descriptor::Unknown {
                    desc_type: t,
                    length: 0,
                });
            }
            break;
        }
        let len = rd_u32(area, off + 1)?;
        if t == DESC_PADDING && len == 0 {
            break;
        }
        let start = off + 5;
        let end = start.checked_add(len as usize);
        let body = match end {
            Some(e) if e <= area.len() => &area[start..e],
            _ => {
                descriptors.push(Descriptor::Unknown {
                    desc_type: t,
                    length: len,
                });
                break;
            }
        };
        let d = parse_descriptor(t, len, body);
        let malformed =
            matches!(d, Descriptor::Unknown { desc_type, .. } if (1..=6).contains(&desc_type));
        if t != DESC_PADDING {
            descriptors.push(d);
        }
        if malformed {
            break;
        }
        off = start + len as usize;
    }
    Ok(MdPageInfo {
        id: rd_u64(b, 0)?,
        sequence_num: rd_u32(b, 8)?,
        next: rd_u32(b, NEXT_OFF)?,
        crc,
        crc_ok: page_crc(b) == crc,
        descriptors,
    })
}

fn parse_descriptor(t: u8, len: u32, body: &[u8]) -> Descriptor {
    let bad = Descriptor::Unknown {
        desc_type: t,
        length: len,
    };
    // A field read past the body's end (a short read) makes the descriptor malformed.
    parse_descriptor_body(t, len, body)
        .ok()
        .flatten()
        .unwrap_or(bad)
}

/// The descriptor of type `t`, `Ok(None)` when its length does not fit the type, an error
/// when a field lies past the end of `body`.
fn parse_descriptor_body(t: u8, len: u32, body: &[u8]) -> Result<Option<Descriptor>> {
    let pairs = |b: &[u8]| -> Result<Vec<(u32, u32)>> {
        b.chunks_exact(8)
            .map(|c| Ok((rd_u32(c, 0)?, rd_u32(c, 4)?)))
            .collect()
    };
    Ok(Some(match t {
        DESC_EXTENT_RLE => {
            if len == 0 || !len.is_multiple_of(8) {
                return Ok(None);
            }
            Descriptor::ExtentRle(pairs(body)?)
        }
        DESC_XATTR | DESC_XATTR_INTERNAL => {
            let nl = rd_u16(body, 0)? as usize;
            let vl = rd_u16(body, 2)? as usize;
            if 4 + nl + vl != body.len() {
                return Ok(None);
            }
            Descriptor::Xattr {
                internal: t == DESC_XATTR_INTERNAL,
                name: body[4..4 + nl].to_vec(),
                value: body[4 + nl..].to_vec(),
            }
        }
        DESC_FLAGS => {
            if body.len() != 24 {
                return Ok(None);
            }
            Descriptor::Flags {
                invalid: rd_u64(body, 0)?,
                data_ro: rd_u64(body, 8)?,
                md_ro: rd_u64(body, 16)?,
            }
        }
        DESC_EXTENT_TABLE => {
            if body.len() < 8 || !(body.len() - 8).is_multiple_of(8) {
                return Ok(None);
            }
            Descriptor::ExtentTable {
                num_clusters: rd_u64(body, 0)?,
                entries: pairs(&body[8..])?,
            }
        }
        DESC_EXTENT_PAGE => {
            if body.len() <= 4 || !(body.len() - 4).is_multiple_of(4) {
                return Ok(None);
            }
            Descriptor::ExtentPage {
                start_cluster: rd_u32(body, 0)?,
                clusters: body[4..]
                    .chunks_exact(4)
                    .map(|c| rd_u32(c, 0))
                    .collect::<Result<_>>()?,
            }
        }
        _ => return Ok(None),
    }))
}

/// Builds md pages from a descriptor stream: each page gets `id`, its sequence number and
/// as many descriptors as fit. `next` and CRC are filled in by the writer.
pub(crate) struct PageBuilder {
    id: u64,
    pages: Vec<Vec<u8>>,
    off: usize,
}

impl PageBuilder {
    pub(crate) fn new(id: u64) -> PageBuilder {
        let mut b = PageBuilder {
            id,
            pages: Vec::new(),
            off: 0,
        };
        b.add_page();
        b
    }
    fn add_page(&mut self) {
        let mut p = vec![0u8; PAGE];
        wr_u64(&mut p, 0, self.id);
        wr_u32(&mut p, 8, self.pages.len() as u32);
        wr_u32(&mut p, NEXT_OFF, INVALID_PAGE);
        self.pages.push(p);
        self.off = 0;
    }
    fn remaining(&self) -> usize {
        DESC_AREA - self.off
    }
    /// Appends a descriptor whole, starting a new page when it does not fit.
    pub(crate) fn push(&mut self, t: u8, body: &[u8]) {
        if 5 + body.len() > self.remaining() {
            self.add_page();
        }
        let p = self.pages.last_mut().expect("at least one page");
        let o = DESC_OFF + self.off;
        p[o] = t;
        wr_u32(p, o + 1, body.len() as u32);
        p[o + 5..o + 5 + body.len()].copy_from_slice(body);
        self.off += 5 + body.len();
    }
    /// Appends items of `item_len` bytes as one or more descriptors of type `t`, each
    /// starting with `header`, splitting across pages (RLE and extent table).
    pub(crate) fn push_split(&mut self, t: u8, header: &[u8], items: &[Vec<u8>], item_len: usize) {
        let mut i = 0;
        loop {
            let fixed = 5 + header.len();
            if self.remaining() < fixed + if items.is_empty() { 0 } else { item_len } {
                self.add_page();
            }
            let fit = (self.remaining() - fixed) / item_len;
            let n = fit.min(items.len() - i);
            let mut body = header.to_vec();
            for it in &items[i..i + n] {
                body.extend_from_slice(it);
            }
            self.push(t, &body);
            i += n;
            if i >= items.len() {
                break;
            }
            self.add_page();
        }
    }
    pub(crate) fn finish(self) -> Vec<Vec<u8>> {
        self.pages
    }
}

/// Builds an extent page for clusters `[start, start + entries.len())`.
pub(crate) fn build_extent_page(id: u64, start: u32, entries: &[u32]) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    wr_u64(&mut p, 0, id);
    wr_u32(&mut p, NEXT_OFF, INVALID_PAGE);
    let o = DESC_OFF;
    p[o] = DESC_EXTENT_PAGE;
    wr_u32(&mut p, o + 1, (4 + 4 * entries.len()) as u32);
    wr_u32(&mut p, o + 5, start);
    for (i, c) in entries.iter().enumerate() {
        wr_u32(&mut p, o + 9 + 4 * i, *c);
    }
    seal_page(&mut p);
    p
}

/// Checks an extent page the way `bs_load_cur_extent_page_valid` does; returns its
/// descriptor contents.
pub(crate) fn extent_page_contents(info: &MdPageInfo) -> Option<(u32, &[u32])> {
    if !info.crc_ok || info.sequence_num != 0 || info.next != INVALID_PAGE {
        return None;
    }
    match info.descriptors.as_slice() {
        [Descriptor::ExtentPage {
            start_cluster,
            clusters,
        }] => Some((*start_cluster, clusters)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn short_reads_are_errors() {
        let b = [1u8, 2, 3, 4, 5, 6, 7];
        assert_eq!(rd_u16(&b, 5).unwrap(), 0x0706);
        assert_eq!(rd_u32(&b, 3).unwrap(), 0x0706_0504);
        for e in [
            rd_u16(&b, 6).err(),
            rd_u32(&b, 4).err(),
            rd_u64(&b, 0).err(),
            rd_u64(&b, usize::MAX - 2).err(),
        ] {
            match e {
                Some(BsError::Corrupt(m)) => assert!(m.contains("short read"), "{m}"),
                other => panic!("expected a short-read error, got {other:?}"),
            }
        }
        // A cut descriptor body is malformed, not a descriptor of zero fields.
        assert_eq!(
            parse_descriptor(DESC_XATTR, 3, &[5, 0, 1]),
            Descriptor::Unknown {
                desc_type: DESC_XATTR,
                length: 3
            }
        );
        assert!(Bitmap::from_mask(&[MASK_PAGES, 9, 0, 0], MASK_PAGES, 9).is_none());
    }

    #[test]
    fn bitmap_roundtrip() {
        let mut m = Bitmap::new(70);
        m.set(0);
        m.set(3);
        m.set(69);
        let b = m.to_mask(MASK_CLUSTERS, 1);
        assert_eq!(b[0], 1);
        assert_eq!(rd_u32(&b, 1).unwrap(), 70);
        assert_eq!(b[5], 0b1001);
        let back = Bitmap::from_mask(&b, MASK_CLUSTERS, 70).unwrap();
        assert_eq!(back, m);
        assert_eq!(m.first_clear(0), Some(1));
        assert_eq!(m.count_ones(), 3);
        assert!(Bitmap::from_mask(&b, MASK_PAGES, 70).is_none());
    }

    #[test]
    fn page_builder_splits() {
        let mut pb = PageBuilder::new(page_to_blobid(3));
        pb.push(DESC_FLAGS, &[0u8; 24]);
        let items: Vec<Vec<u8>> = (0..1000u32)
            .map(|i| {
                let mut v = i.to_le_bytes().to_vec();
                v.extend_from_slice(&1u32.to_le_bytes());
                v
            })
            .collect();
        pb.push_split(DESC_EXTENT_RLE, &[], &items, 8);
        let pages = pb.finish();
        assert_eq!(pages.len(), 2);
        let mut runs = 0;
        for p in &pages {
            let info = parse_md_page(p).unwrap();
            for d in info.descriptors {
                if let Descriptor::ExtentRle(r) = d {
                    runs += r.len();
                }
            }
        }
        assert_eq!(runs, 1000);
    }
}
