//! The on-disk structures as stored (SPDK format version 3): the super block, md pages and
//! their descriptors, mask regions. Plain data, parsed and serialised by `format.rs`, shown
//! to tools by `inspect` (which re-exports them). No other module of the crate is imported
//! here, so the format, the store and the inspection tools all depend on this one leaf.

/// The super block as stored (no defaults applied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuperBlockInfo {
    /// Signature bytes (`SPDKBLOB` when valid).
    pub signature: [u8; 8],
    /// Format version.
    pub version: u32,
    /// `length` field.
    pub length: u32,
    /// Clean flag.
    pub clean: u32,
    /// Super blob id.
    pub super_blob: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Used md page mask start (pages).
    pub used_page_mask_start: u32,
    /// Used md page mask length (pages).
    pub used_page_mask_len: u32,
    /// Used cluster mask start (pages).
    pub used_cluster_mask_start: u32,
    /// Used cluster mask length (pages).
    pub used_cluster_mask_len: u32,
    /// md region start (pages).
    pub md_start: u32,
    /// md region length (pages).
    pub md_len: u32,
    /// bstype bytes.
    pub bstype: [u8; 16],
    /// Used blob id mask start (pages).
    pub used_blobid_mask_start: u32,
    /// Used blob id mask length (pages).
    pub used_blobid_mask_len: u32,
    /// Store size in bytes.
    pub size: u64,
    /// io_unit size in bytes (0 = 4096).
    pub io_unit_size: u32,
    /// md page size (0 = 4096).
    pub md_page_size: u32,
    /// Stored CRC.
    pub crc: u32,
    /// Whether the stored CRC matches.
    pub crc_ok: bool,
}

/// One metadata descriptor as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Descriptor {
    /// EXTENT_RLE: runs of (first cluster, length); cluster 0 = unallocated run.
    ExtentRle(Vec<(u32, u32)>),
    /// XATTR (internal = false) or XATTR_INTERNAL (internal = true).
    Xattr {
        /// XATTR_INTERNAL.
        internal: bool,
        /// Name bytes.
        name: Vec<u8>,
        /// Value bytes.
        value: Vec<u8>,
    },
    /// FLAGS.
    Flags {
        /// invalid_flags.
        invalid: u64,
        /// data_ro_flags.
        data_ro: u64,
        /// md_ro_flags.
        md_ro: u64,
    },
    /// EXTENT_TABLE: total clusters and (page index, page count) entries.
    ExtentTable {
        /// Blob size in clusters.
        num_clusters: u64,
        /// (md page index, number of pages); index 0 = unallocated pages.
        entries: Vec<(u32, u32)>,
    },
    /// EXTENT_PAGE: first cluster index and physical cluster numbers (0 = unallocated).
    ExtentPage {
        /// start_cluster_idx.
        start_cluster: u32,
        /// Physical cluster per blob cluster.
        clusters: Vec<u32>,
    },
    /// A descriptor type this version does not know, or a malformed one.
    Unknown {
        /// Type byte.
        desc_type: u8,
        /// Length field.
        length: u32,
    },
}

/// A metadata page as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MdPageInfo {
    /// Blob id in the header.
    pub id: u64,
    /// Sequence number.
    pub sequence_num: u32,
    /// Next page index (`u32::MAX` = none).
    pub next: u32,
    /// Stored CRC.
    pub crc: u32,
    /// Whether the stored CRC matches.
    pub crc_ok: bool,
    /// Descriptors up to the terminator.
    pub descriptors: Vec<Descriptor>,
}

/// A mask region as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskInfo {
    /// Mask type byte (0 pages, 1 clusters, 2 blob ids).
    pub mask_type: u8,
    /// Number of valid bits.
    pub length: u32,
    /// Indexes of the set bits.
    pub set_bits: Vec<u64>,
}
