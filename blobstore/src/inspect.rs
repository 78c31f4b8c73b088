//! Raw, read-only views of the on-disk structures for inspection tools (blobcli `-D`,
//! `--check`) and fuzzing. Nothing here writes to a device or needs a loaded store.

use std::sync::Arc;

use crate::{BsDev, Result};

pub use crate::check::CheckReport;
pub use crate::layout::{Descriptor, MaskInfo, MdPageInfo, SuperBlockInfo};

/// Parses a 4096-byte super block. Never panics; EINVAL if `bytes` is shorter than 4096.
pub fn parse_super(bytes: &[u8]) -> Result<SuperBlockInfo> {
    crate::format::parse_super(bytes)
}

/// Parses a 4096-byte md page. Never panics, never allocates beyond the page's own size.
pub fn parse_md_page(bytes: &[u8]) -> Result<MdPageInfo> {
    crate::format::parse_md_page(bytes)
}

/// Whether an md-region page is one of our crash-safety copies (see "Metadata ordering" in
/// `docs/architecture.md`): the shadow of an md page about to be rewritten in place, or a
/// copy of the super block, kept in a free md page on devices whose io unit is under 4 KiB
/// until the in-place write is durable. SPDK ignores them (they sit in free pages).
pub fn is_crash_copy(page: &[u8]) -> bool {
    crate::format::is_shadow(page)
        || (page.len() >= 4096
            && &page[..8] == b"SPDKBLOB"
            && parse_super(page).is_ok_and(|s| s.crc_ok))
}

/// Parses a mask region (all its pages concatenated).
pub fn parse_mask(bytes: &[u8]) -> Result<MaskInfo> {
    crate::format::parse_mask(bytes)
}

/// Checks a store without modifying it: every md page CRC, chains, masks against a full
/// scan, cluster ownership (double ownership, leaks). Errors only when the device cannot be
/// read or holds no blobstore at all.
pub async fn check(dev: Arc<dyn BsDev>) -> Result<CheckReport> {
    crate::check::check(dev).await
}
