//! The bdev-nbd error type.

use bdev_core::BdevError;

/// Result alias for bdev-nbd.
pub type Result<T> = std::result::Result<T, NbdError>;

/// Everything that can fail in the NBD client: address parsing, connecting, the handshake,
/// the transmission phase and the module's bookkeeping.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The address is neither `unix:PATH` nor `HOST:PORT`.
    #[error("bad address {0:?} (expected unix:PATH or HOST:PORT)")]
    BadAddress(String),
    /// The block-device layer refused (duplicate name or UUID, ...).
    #[error(transparent)]
    Bdev(#[from] BdevError),
    /// Connecting to the server failed.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// The address as given.
        address: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The connection to the server is gone and was not re-established within the budget.
    #[error("connection to {0} lost")]
    Disconnected(String),
    /// A name or UUID is already used by another NBD client.
    #[error("{0} already exists")]
    Exists(String),
    /// A parameter is out of range (zero block size, negative delay, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The server reported an error for one request (an NBD error value).
    #[error("server error {errno} for {command}")]
    Io {
        /// The request type (`read`, `write`, ...).
        command: &'static str,
        /// The errno the NBD error value maps to.
        errno: i32,
    },
    /// No NBD client with that name exists.
    #[error("nbd client {0} not found")]
    NotFound(String),
    /// The server refused the option negotiation (an `NBD_REP_ERR_*` reply).
    #[error("server refused export {export:?}: {reason} ({errno})")]
    OptionRefused {
        /// The export name asked for.
        export: String,
        /// The reply type's meaning (`unknown export`, `tls required`, ...).
        reason: String,
        /// The errno chosen for the reply type.
        errno: i32,
    },
    /// The server broke the protocol (bad magic, unexpected cookie, bad lengths).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The export is read-only (by the server's flags or by request).
    #[error("export {0} is read-only")]
    ReadOnly(String),
    /// A socket read or write failed.
    #[error("socket error: {0}")]
    Socket(#[source] std::io::Error),
    /// The client was deleted.
    #[error("nbd client {0} was deleted")]
    Stopped(String),
}

impl NbdError {
    /// The positive errno SPDK would report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            NbdError::BadAddress(_) => libc::EINVAL,
            NbdError::Bdev(e) => e.errno(),
            NbdError::Connect { source, .. } => {
                source.raw_os_error().unwrap_or(match source.kind() {
                    std::io::ErrorKind::TimedOut => libc::ETIMEDOUT,
                    std::io::ErrorKind::NotFound => libc::ENOENT,
                    _ => libc::EIO,
                })
            }
            NbdError::Disconnected(_) => libc::EIO,
            NbdError::Exists(_) => libc::EEXIST,
            NbdError::InvalidArgument(_) => libc::EINVAL,
            NbdError::Io { errno, .. } => *errno,
            NbdError::NotFound(_) => libc::ENODEV,
            NbdError::OptionRefused { errno, .. } => *errno,
            NbdError::Protocol(_) => libc::EPROTO,
            NbdError::ReadOnly(_) => libc::EPERM,
            NbdError::Socket(e) => e.raw_os_error().unwrap_or(libc::EIO),
            NbdError::Stopped(_) => libc::ENODEV,
        }
    }
}

impl From<NbdError> for BdevError {
    fn from(e: NbdError) -> Self {
        match e {
            NbdError::Bdev(b) => b,
            other => BdevError::Io(std::io::Error::from_raw_os_error(other.errno())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_survives_conversion_to_bdev_error() {
        let e = NbdError::Io {
            command: "write",
            errno: libc::ENOSPC,
        };
        assert_eq!(BdevError::from(e).errno(), libc::ENOSPC);
        let e = NbdError::Disconnected("unix:/x".into());
        assert_eq!(BdevError::from(e).errno(), libc::EIO);
        let e = NbdError::Connect {
            address: "unix:/x".into(),
            source: std::io::Error::from_raw_os_error(libc::ECONNREFUSED),
        };
        assert_eq!(e.errno(), libc::ECONNREFUSED);
    }
}
