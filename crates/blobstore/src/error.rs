//! The blobstore error type. (Contract: variants are added in the blobstore issue; every
//! variant maps to SPDK's errno in `errno()`.)

/// Result alias for the blobstore.
pub type Result<T> = std::result::Result<T, BsError>;

/// Blobstore errors.
#[derive(Debug, thiserror::Error)]
pub enum BsError {
    /// Device I/O failed.
    #[error("device i/o failed: {0}")]
    Io(#[from] std::io::Error),
}

impl BsError {
    /// The positive errno SPDK returns for this error.
    pub fn errno(&self) -> i32 {
        match self {
            BsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}
