//! The kinds of flush the blobstore issues, named so that a test can leave one out.

/// The kinds of flush the blobstore issues (see "Metadata ordering" in
/// `docs/architecture.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Barrier {
    /// The super block marked dirty is durable before the first md write after a clean load.
    DirtyMark,
    /// New md pages, new cluster data and cleared clusters are durable before the commit
    /// write (a root page, or an extent page rewritten in place).
    PreCommit,
    /// The commit write is durable before the operation returns or frees what it dropped.
    PostCommit,
    /// At unload, the masks are durable before `clean = 1` is written.
    UnloadMasks,
    /// At unload, the super block with `clean = 1` is durable.
    UnloadClean,
    /// A page about to be rewritten in place on a device whose io unit is smaller than an md
    /// page has a durable shadow copy first (not a flush: the write of the copy).
    Shadow,
    /// Any other super block update (init, grow, set_super_blob, destroy) is durable.
    Super,
}
