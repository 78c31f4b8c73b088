//! The blobstore error type. Every variant maps to the errno SPDK returns in `errno()`.

/// Result alias for the blobstore.
pub type Result<T> = std::result::Result<T, BsError>;

/// Blobstore errors. Messages name what is wrong (blob id, page, field).
#[derive(Debug, thiserror::Error)]
pub enum BsError {
    /// Blob not open (close of a closed blob).
    #[error("blob not open: {0}")]
    BadHandle(String),
    /// The super block is not a valid blobstore super block (signature, version, crc, size).
    #[error("bad super block: {0}")]
    BadSuperBlock(String),
    /// The store's bstype differs from the one asked for.
    #[error("blobstore type mismatch: store has {found:?}, asked for {wanted:?}")]
    BstypeMismatch {
        /// bstype on disk.
        found: String,
        /// bstype requested.
        wanted: String,
    },
    /// The blob or store is busy (open elsewhere, has clones, operation in progress).
    #[error("busy: {0}")]
    Busy(String),
    /// Metadata on disk is malformed (bad md-page crc, bad descriptor, bad flags).
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    /// A back device is missing or degraded, so data that needs it cannot be served.
    #[error("degraded: {0}")]
    Degraded(String),
    /// Something with that name or relation already exists.
    #[error("already exists: {0}")]
    Exists(String),
    /// Bad argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Device I/O failed.
    #[error("device i/o failed: {0}")]
    Io(#[from] std::io::Error),
    /// Out of metadata pages, or an xattr too large for one md page.
    #[error("no memory: {0}")]
    NoMemory(String),
    /// Out of free clusters, or the device cannot hold the request.
    #[error("no space: {0}")]
    NoSpace(String),
    /// Blob or xattr not found.
    #[error("not found: {0}")]
    NotFound(String),
    /// Not supported (esnap clone opened without a factory).
    #[error("not supported: {0}")]
    NotSupported(String),
    /// Write or metadata change on a read-only blob.
    #[error("read-only: {0}")]
    ReadOnly(String),
    /// A size larger than the store can describe (a blob of more than 2^28 clusters).
    #[error("too large: {0}")]
    TooLarge(String),
}

impl BsError {
    /// The positive errno SPDK returns for this error.
    pub fn errno(&self) -> i32 {
        match self {
            BsError::BadHandle(_) => libc::EBADF,
            BsError::BadSuperBlock(_) => libc::EILSEQ,
            BsError::BstypeMismatch { .. } => libc::ENXIO,
            BsError::Busy(_) => libc::EBUSY,
            BsError::Corrupt(_) => libc::EINVAL,
            BsError::Degraded(_) => libc::EIO,
            BsError::Exists(_) => libc::EEXIST,
            BsError::InvalidArgument(_) => libc::EINVAL,
            BsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            BsError::NoMemory(_) => libc::ENOMEM,
            BsError::NoSpace(_) => libc::ENOSPC,
            BsError::NotFound(_) => libc::ENOENT,
            BsError::NotSupported(_) => libc::ENOTSUP,
            BsError::ReadOnly(_) => libc::EPERM,
            BsError::TooLarge(_) => libc::EFBIG,
        }
    }
}

/// Short constructors of the variants that carry a message: `einval(m)` is
/// `BsError::InvalidArgument(m.into())`, and so on.
macro_rules! constructors {
    ($($name:ident => $variant:ident),+ $(,)?) => {
        $(
            pub(crate) fn $name(msg: impl Into<String>) -> BsError {
                BsError::$variant(msg.into())
            }
        )+
    };
}

constructors! {
    einval => InvalidArgument,
    corrupt => Corrupt,
    busy => Busy,
    enoent => NotFound,
    eperm => ReadOnly,
    enospc => NoSpace,
}
