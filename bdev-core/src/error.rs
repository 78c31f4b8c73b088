//! The bdev-core error type.

use crate::device::{ClaimType, IoType};

/// Result alias for bdev-core.
pub type Result<T> = std::result::Result<T, BdevError>;

/// Everything that can fail in the block-device layer.
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    /// A name, alias or UUID is already registered.
    #[error("{what} already exists")]
    AlreadyExists {
        /// The name, alias or UUID that clashed.
        what: String,
    },
    /// The device is busy (for example, an unregister is already in progress).
    #[error("bdev {0} is busy")]
    Busy(String),
    /// A conflicting claim is held on the device.
    #[error("bdev {name} is already claimed ({held:?})")]
    ClaimConflict {
        /// Device name.
        name: String,
        /// The claim already held.
        held: ClaimType,
    },
    /// Invalid argument (bad size, bad block size, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// I/O error from the operating system or a backend.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// No device with that name, alias or UUID (or it was hot-removed).
    #[error("no such device: {0}")]
    NoDevice(String),
    /// The I/O type is not supported by the device.
    #[error("i/o type {0:?} not supported")]
    NotSupported(IoType),
    /// I/O outside the device.
    #[error("i/o out of range: offset {offset} + {num_blocks} blocks > {device_blocks}")]
    OutOfRange {
        /// First block.
        offset: u64,
        /// Number of blocks.
        num_blocks: u64,
        /// Size of the device in blocks.
        device_blocks: u64,
    },
    /// Write through a read-only descriptor.
    #[error("descriptor is read-only")]
    ReadOnlyDescriptor,
    /// A claim that forbids other writers was asked for while another descriptor is open for
    /// writing.
    #[error("bdev {name} is open for writing by another descriptor")]
    WriterConflict {
        /// Device name.
        name: String,
    },
}

impl BdevError {
    /// The positive errno SPDK would report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            BdevError::AlreadyExists { .. } => libc::EEXIST,
            BdevError::Busy(_) => libc::EBUSY,
            BdevError::ClaimConflict { .. } => libc::EPERM,
            BdevError::InvalidArgument(_) => libc::EINVAL,
            BdevError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            BdevError::NoDevice(_) => libc::ENODEV,
            BdevError::NotSupported(_) => libc::ENOTSUP,
            BdevError::OutOfRange { .. } => libc::EINVAL,
            BdevError::ReadOnlyDescriptor => libc::EBADF,
            BdevError::WriterConflict { .. } => libc::EPERM,
        }
    }
}

impl From<BdevError> for std::io::Error {
    fn from(e: BdevError) -> Self {
        match e {
            BdevError::Io(io) => io,
            other => std::io::Error::from_raw_os_error(other.errno()),
        }
    }
}
