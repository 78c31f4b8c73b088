//! Output formats SPDK shares with blobcli: `spdk_log_dump`'s hex dump and `spdk_bs_dump`'s
//! metadata dump (`-D`), written from the raw device without loading the store.

use std::io::Write;

use blobstore::inspect::{self, MaskInfo, SuperBlockInfo};
use blobstore::BsDev;

use crate::bsdev::read_bytes;

const PAGE: u64 = 4096;
const INVALID_MD_PAGE: u32 = u32::MAX;

fn printable(b: u8) -> char {
    if (0x20..0x7f).contains(&b) {
        b as char
    } else {
        '.'
    }
}

/// SPDK `spdk_log_dump(fp, label, buf, len)`: the label line, then 16 bytes a line with the
/// offset, two groups of 8 hex bytes and the printable characters.
pub fn hexdump(out: &mut dyn Write, label: &str, buf: &[u8]) -> std::io::Result<()> {
    writeln!(out, "{label}")?;
    let mut line = String::new();
    let mut text = String::new();
    let mut idx = 0usize;
    while idx < buf.len() {
        if idx != 0 && idx.is_multiple_of(16) {
            writeln!(out, "{line} {text}")?;
            line.clear();
            text.clear();
        }
        if idx.is_multiple_of(16) {
            line.push_str(&format!("{idx:08x} "));
        }
        if idx.is_multiple_of(8) {
            line.push(' ');
        }
        line.push_str(&format!("{:02x} ", buf[idx]));
        text.push(printable(buf[idx]));
        idx += 1;
    }
    while !idx.is_multiple_of(16) {
        if idx == 8 {
            line.push(' ');
        }
        line.push_str("   ");
        idx += 1;
    }
    writeln!(out, "{line}  {text}")
}

/// Prints an xattr value the way blobcli's `bsdump_print_xattr` does: the name and uuid of
/// lvol stores as text, anything else as `?`.
fn xattr_text(bstype: &[u8; 16], name: &[u8], value: &[u8]) -> String {
    let end = bstype.iter().position(|&b| b == 0).unwrap_or(16);
    if &bstype[..end] != b"LVOLSTORE" {
        return "?".into();
    }
    let cstr = |v: &[u8]| {
        let e = v.iter().position(|&b| b == 0).unwrap_or(v.len());
        String::from_utf8_lossy(&v[..e]).into_owned()
    };
    match name {
        b"name" => cstr(value),
        b"uuid" => {
            let s = cstr(value);
            if s.len() == 36 && uuid::Uuid::parse_str(&s).is_ok() {
                s
            } else {
                "? Invalid UUID".into()
            }
        }
        _ => "?".into(),
    }
}

/// The known values of a flags field: (mask, value, SPDK's name).
type FlagTable = [(u64, u64, &'static str)];

fn print_flag_bits(out: &mut dyn Write, flags: u64, table: &FlagTable) -> std::io::Result<()> {
    let mut covered = 0u64;
    for &(mask, val, name) in table {
        if mask & flags != val {
            continue;
        }
        write!(out, "\t\t 0x{val:016x} {name}")?;
        if mask != val {
            write!(out, " (mask 0x{mask:x} value 0x{val:x})")?;
        }
        writeln!(out)?;
        covered |= mask;
    }
    if flags & !covered != 0 {
        writeln!(out, "\t\t 0x{:016x} Unknown", flags & !covered)?;
    }
    Ok(())
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// The bits of a mask region, or an empty set when it cannot be read or is not that mask.
async fn read_mask(
    dev: &dyn BsDev,
    page_size: u64,
    start: u32,
    len: u32,
    mask_type: u8,
) -> Option<MaskInfo> {
    // Masks are a few pages; a huge length is damage, not something to allocate.
    if len == 0 || len > 16384 {
        return None;
    }
    let bytes = read_bytes(
        dev,
        start as u64 * page_size,
        (len as u64 * page_size) as usize,
    )
    .await
    .ok()?;
    let m = inspect::parse_mask(&bytes).ok()?;
    (m.mask_type == mask_type).then_some(m)
}

/// SPDK `spdk_bs_dump`: the super block, then every md page whose header id is not 0 (except
/// our crash-safety copies in free pages, which are not metadata).
/// Returns a negative errno when the dump stopped early (nothing more is printed then, as
/// SPDK does).
pub async fn dump_metadata(out: &mut dyn Write, dev: &dyn BsDev) -> Result<(), i32> {
    let io = |_e: std::io::Error| -libc::EIO;
    let raw = read_bytes(dev, 0, PAGE as usize).await.map_err(io)?;
    let sig_end = raw[..8].iter().position(|&b| b == 0).unwrap_or(8);
    let _ = write!(
        out,
        "Signature: \"{}\" ",
        String::from_utf8_lossy(&raw[..sig_end])
    );
    if &raw[..8] != b"SPDKBLOB" {
        let _ = writeln!(out, "(Mismatch)");
        return Err(-libc::EILSEQ);
    }
    let _ = writeln!(out, "(OK)");
    let sb: SuperBlockInfo = inspect::parse_super(&raw).map_err(|e| -e.errno())?;
    let _ = writeln!(out, "Version: {}", sb.version);
    let _ = writeln!(
        out,
        "CRC: 0x{:x} ({})",
        sb.crc,
        if sb.crc_ok { "OK" } else { "Mismatch" }
    );
    let bt_end = sb.bstype.iter().position(|&b| b == 0).unwrap_or(16);
    let _ = writeln!(
        out,
        "Blobstore Type: {}",
        String::from_utf8_lossy(&sb.bstype[..bt_end])
    );
    let _ = writeln!(out, "Cluster Size: {}", sb.cluster_size);
    if sb.super_blob == u64::MAX {
        let _ = writeln!(out, "Super Blob ID: (None)");
    } else {
        let _ = writeln!(out, "Super Blob ID: 0x{:x}", sb.super_blob);
    }
    let _ = writeln!(out, "Clean: {}", sb.clean);
    let _ = writeln!(
        out,
        "Used Metadata Page Mask Start: {}",
        sb.used_page_mask_start
    );
    let _ = writeln!(
        out,
        "Used Metadata Page Mask Length: {}",
        sb.used_page_mask_len
    );
    let _ = writeln!(
        out,
        "Used Cluster Mask Start: {}",
        sb.used_cluster_mask_start
    );
    let _ = writeln!(
        out,
        "Used Cluster Mask Length: {}",
        sb.used_cluster_mask_len
    );
    let _ = writeln!(
        out,
        "Used Blob ID Mask Start: {}",
        sb.used_blobid_mask_start
    );
    let _ = writeln!(out, "Used Blob ID Mask Length: {}", sb.used_blobid_mask_len);
    let _ = writeln!(out, "Metadata Start: {}", sb.md_start);
    let _ = writeln!(out, "Metadata Length: {}", sb.md_len);

    // 0 (every store before v25.01) and anything SPDK would not have written mean 4096.
    let md_page_size =
        if sb.md_page_size.is_power_of_two() && (4096..=65536).contains(&sb.md_page_size) {
            sb.md_page_size as u64
        } else {
            PAGE
        };
    let used_md = read_mask(
        dev,
        md_page_size,
        sb.used_page_mask_start,
        sb.used_page_mask_len,
        0,
    )
    .await;
    let used_ids = read_mask(
        dev,
        md_page_size,
        sb.used_blobid_mask_start,
        sb.used_blobid_mask_len,
        2,
    )
    .await;
    let in_mask = |m: &Option<MaskInfo>, idx: u64| {
        m.as_ref()
            .map(|m| idx < m.length as u64 && m.set_bits.binary_search(&idx).is_ok())
            .unwrap_or(false)
    };
    let io_unit = dev.block_len().max(1) as u64;
    let page_to_lba = |idx: u64| (sb.md_start as u64 + idx) * md_page_size / io_unit;

    for idx in 0..sb.md_len as u64 {
        let page = read_bytes(
            dev,
            (sb.md_start as u64 + idx) * md_page_size,
            PAGE as usize,
        )
        .await
        .map_err(io)?;
        let id = le64(&page, 0);
        if id == 0 {
            continue;
        }
        // Our crash-safety copies in free pages are not metadata (SPDK never writes them).
        if !in_mask(&used_md, idx) && inspect::is_crash_copy(&page) {
            continue;
        }
        let seq = le32(&page, 8);
        let next = le32(&page, 4088);
        let crc = le32(&page, 4092);
        let crc_ok = crc32c::crc32c(&page[..4092]) == crc;
        let _ = writeln!(out, "=========");
        let _ = writeln!(out, "Metadata Page Index: {idx} (0x{idx:x})");
        let _ = writeln!(out, "Start LBA: {}", page_to_lba(idx));
        let _ = writeln!(out, "Blob ID: 0x{id:x}");
        let _ = writeln!(out, "Sequence: {seq}");
        if next == INVALID_MD_PAGE {
            let _ = writeln!(out, "Next: None");
        } else {
            let _ = writeln!(out, "Next: {next}");
        }
        let _ = write!(
            out,
            "In used bit array{}:",
            if sb.clean != 0 {
                ""
            } else {
                " (not clean: dubious)"
            }
        );
        if in_mask(&used_md, idx) {
            let _ = write!(out, " md");
        }
        if in_mask(&used_ids, idx) {
            let _ = write!(out, " blob");
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "CRC: 0x{crc:x} ({})",
            if crc_ok { "OK" } else { "Mismatch" }
        );
        walk_descriptors(out, &sb, &page, &page_to_lba);
    }
    Ok(())
}

/// SPDK's descriptor walk for the dump: every descriptor up to the terminator, decoded from
/// the raw page (extent pages print every slot the descriptor holds, as SPDK does).
fn walk_descriptors(
    out: &mut dyn Write,
    sb: &SuperBlockInfo,
    page: &[u8],
    page_to_lba: &dyn Fn(u64) -> u64,
) {
    const DESC_START: usize = 16;
    const DESC_SIZE: usize = 4072;
    let area = &page[DESC_START..DESC_START + DESC_SIZE];
    let mut cur = 0usize;
    while cur + 5 <= DESC_SIZE {
        let ty = area[cur];
        let length = le32(area, cur + 1) as usize;
        let body_end = (cur + 5).saturating_add(length).min(DESC_SIZE);
        let body = &area[cur + 5..body_end];
        match ty {
            0 => {
                if length == 0 {
                    break;
                }
            }
            1 => {
                for run in body.chunks_exact(8) {
                    let start = le32(run, 0);
                    let len = le32(run, 4);
                    if start != 0 {
                        let _ = writeln!(out, "Allocated Extent - Start: {start} Length: {len}");
                    } else {
                        let _ = writeln!(out, "Unallocated Extent -  Length: {len}");
                    }
                }
            }
            2 | 4 => print_xattr(out, sb, ty == 4, body),
            3 => {
                if body.len() >= 24 {
                    print_flags(out, le64(body, 0), le64(body, 8), le64(body, 16));
                }
            }
            5 => {
                let _ = writeln!(out, "Extent table:");
                if body.len() >= 8 {
                    for e in body[8..].chunks_exact(8) {
                        let page_idx = le32(e, 0);
                        let num_pages = le32(e, 4);
                        if page_idx == 0 {
                            continue;
                        }
                        let _ = writeln!(
                            out,
                            "\tExtent page: {page_idx:5} length {num_pages:3} at LBA {}",
                            page_to_lba(page_idx as u64)
                        );
                    }
                }
            }
            6 => {
                if body.len() >= 4 {
                    for c in body[4..].chunks_exact(4) {
                        let c = le32(c, 0);
                        if c != 0 {
                            let _ = writeln!(out, "Allocated Extent - Start: {c}");
                        } else {
                            let _ = writeln!(out, "Unallocated Extent");
                        }
                    }
                }
            }
            other => {
                let _ = writeln!(out, "Unknown descriptor type {other}");
            }
        }
        cur = cur.saturating_add(5 + length);
        if cur + 5 > DESC_SIZE {
            break;
        }
    }
}

fn print_xattr(out: &mut dyn Write, sb: &SuperBlockInfo, internal: bool, body: &[u8]) {
    if body.len() < 4 {
        return;
    }
    let name_len = u16::from_le_bytes([body[0], body[1]]) as usize;
    let value_len = u16::from_le_bytes([body[2], body[3]]) as usize;
    let name = &body[4..(4 + name_len).min(body.len())];
    let vstart = (4 + name_len).min(body.len());
    let value = &body[vstart..(vstart + value_len).min(body.len())];
    let kind = if internal { "XATTR_INTERNAL" } else { "XATTR" };
    let _ = writeln!(out, "{kind}: name = \"{}\"", String::from_utf8_lossy(name));
    let _ = writeln!(
        out,
        "       value = \"{}\"",
        xattr_text(&sb.bstype, name, value)
    );
    let mut line = String::new();
    for (i, b) in value.iter().enumerate() {
        if i % 16 == 0 {
            line.push_str("               ");
        }
        line.push_str(&format!("{b:02x} "));
        if (i + 1) % 16 == 0 {
            let _ = writeln!(out, "{line}");
            line.clear();
        }
    }
    if !value.len().is_multiple_of(16) {
        let _ = writeln!(out, "{line}");
    }
}

fn print_flags(out: &mut dyn Write, invalid: u64, data_ro: u64, md_ro: u64) {
    let _ = writeln!(out, "Flags:");
    let groups: [(&str, u64, &FlagTable); 3] = [
        (
            "invalid",
            invalid,
            &[
                (1, 1, "SPDK_BLOB_THIN_PROV"),
                (2, 2, "SPDK_BLOB_INTERNAL_XATTR"),
                (4, 4, "SPDK_BLOB_EXTENT_TABLE"),
            ],
        ),
        ("data_ro", data_ro, &[(1, 1, "SPDK_BLOB_READ_ONLY")]),
        (
            "  md_ro",
            md_ro,
            &[
                (3, 0, "BLOB_CLEAR_WITH_DEFAULT"),
                (3, 1, "BLOB_CLEAR_WITH_NONE"),
                (3, 2, "BLOB_CLEAR_WITH_UNMAP"),
                (3, 3, "BLOB_CLEAR_WITH_WRITE_ZEROES"),
            ],
        ),
    ];
    for (label, value, bits) in groups {
        let _ = writeln!(out, "\t{label}: 0x{value:016x}");
        let _ = print_flag_bits(out, value, bits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hexdump_matches_spdk_log_dump() {
        let mut out = Vec::new();
        hexdump(&mut out, "", b"val").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\n00000000  76 61 6c                                           val\n"
        );
        let mut out = Vec::new();
        hexdump(&mut out, "\tblobstore type:", &[0u8; 16]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\tblobstore type:\n00000000  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00   ................\n"
        );
        let mut out = Vec::new();
        hexdump(&mut out, "", b"df8e0522-e50f-4416-b634-044436b9885c").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\n00000000  64 66 38 65 30 35 32 32  2d 65 35 30 66 2d 34 34  df8e0522-e50f-44\n\
             00000010  31 36 2d 62 36 33 34 2d  30 34 34 34 33 36 62 39  16-b634-044436b9\n\
             00000020  38 38 35 63                                       885c\n"
        );
        let mut out = Vec::new();
        hexdump(&mut out, "", b"lvs_basic").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\n00000000  6c 76 73 5f 62 61 73 69  63                        lvs_basic\n"
        );
    }

    #[test]
    fn xattr_text_follows_bstype() {
        let mut lvs = [0u8; 16];
        lvs[..9].copy_from_slice(b"LVOLSTORE");
        assert_eq!(xattr_text(&lvs, b"name", b"thick\0\0\0"), "thick");
        assert_eq!(
            xattr_text(&lvs, b"uuid", b"df8e0522-e50f-4416-b634-044436b9885c\0"),
            "df8e0522-e50f-4416-b634-044436b9885c"
        );
        assert_eq!(xattr_text(&lvs, b"uuid", b"nope\0"), "? Invalid UUID");
        assert_eq!(xattr_text(&lvs, b"SNAP", b"\x05"), "?");
        assert_eq!(xattr_text(&[0u8; 16], b"name", b"alpha\0"), "?");
    }
}
