//! The vbdev-ro error type.

use bdev_core::BdevError;

/// Result alias for vbdev-ro.
pub type Result<T> = std::result::Result<T, RoError>;

/// Everything that can fail when creating or deleting a read-only bdev.
#[derive(Debug, thiserror::Error)]
pub enum RoError {
    /// The base bdev was not found by name, alias or UUID.
    #[error("base bdev {0} not found")]
    BaseNotFound(String),
    /// The block-device layer refused (duplicate name or UUID, claim conflict, ...).
    #[error(transparent)]
    Bdev(#[from] BdevError),
    /// No read-only bdev with that name exists.
    #[error("read-only bdev {0} not found")]
    NotFound(String),
}

impl RoError {
    /// The positive errno SPDK would report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            RoError::BaseNotFound(_) => libc::ENODEV,
            RoError::Bdev(e) => e.errno(),
            RoError::NotFound(_) => libc::ENODEV,
        }
    }
}
