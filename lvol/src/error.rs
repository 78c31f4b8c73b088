//! The lvol error type.

use bdev_core::BdevError;
use blobstore::BsError;

/// Result alias for the lvol crate.
pub type Result<T> = std::result::Result<T, LvolError>;

/// Everything that can fail in the lvol layer. Each variant maps to the errno SPDK's lvol and
/// vbdev_lvol code report in the same situation (see `errno()`).
#[derive(Debug, thiserror::Error)]
pub enum LvolError {
    /// A store or lvol name (or UUID) is already taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A bdev-layer operation failed.
    #[error("bdev: {0}")]
    Bdev(#[from] BdevError),
    /// A blobstore operation failed.
    #[error("blobstore: {0}")]
    Blobstore(#[from] BsError),
    /// The object is busy (open, operation in progress).
    #[error("{0} is busy")]
    Busy(String),
    /// Bad argument: a name, a size, a cluster size, a relation that does not fit.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// I/O that needs a missing external snapshot failed after its retries.
    #[error("i/o error: {0}")]
    Io(String),
    /// No such store, lvol or bdev.
    #[error("no such device: {0}")]
    NoDevice(String),
    /// Refused: a snapshot with two or more clones, a read-only lvol.
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
}

impl LvolError {
    /// The positive errno SPDK reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            LvolError::AlreadyExists(_) => libc::EEXIST,
            LvolError::Bdev(e) => e.errno(),
            LvolError::Blobstore(e) => e.errno(),
            LvolError::Busy(_) => libc::EBUSY,
            LvolError::InvalidArgument(_) => libc::EINVAL,
            LvolError::Io(_) => libc::EIO,
            LvolError::NoDevice(_) => libc::ENODEV,
            LvolError::NotPermitted(_) => libc::EPERM,
        }
    }
}

impl From<LvolError> for std::io::Error {
    fn from(e: LvolError) -> Self {
        std::io::Error::from_raw_os_error(e.errno())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_follows_spdk() {
        assert_eq!(LvolError::AlreadyExists("x".into()).errno(), libc::EEXIST);
        assert_eq!(LvolError::NotPermitted("x".into()).errno(), libc::EPERM);
        let bs = BsError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(LvolError::from(bs).errno(), libc::ENOSPC);
        assert_eq!(LvolError::NoDevice("x".into()).errno(), libc::ENODEV);
    }
}
