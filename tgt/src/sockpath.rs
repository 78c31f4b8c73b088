//! Unix socket paths given by an operator (`tgt -r PATH`, `nbd_server_start unix:PATH`).
//!
//! The only file ever replaced is a stale socket: a socket nobody listens on (a connect is
//! refused). A live socket is "in use"; a regular file, directory, fifo, device or symlink is
//! refused and left untouched (a store image given by mistake must not be deleted); a path
//! that does not fit in `sockaddr_un.sun_path` is refused before anything is touched. On
//! shutdown the socket is removed only if the path still names the socket we bound.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The longest path a socket address holds (`sun_path` is 108 bytes with the final NUL).
pub const MAX_PATH_LEN: usize = 107;

/// Why a socket path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SockPathError {
    /// Longer than [`MAX_PATH_LEN`].
    #[error("unix socket path is {len} bytes long, more than the {MAX_PATH_LEN} a socket address holds (File name too long)")]
    TooLong {
        /// Length in bytes.
        len: usize,
    },
    /// The path names something that is not a socket.
    #[error("{path} exists and is {kind}, not a socket; refusing to replace it (Socket operation on non-socket)")]
    NotSocket {
        /// The path.
        path: PathBuf,
        /// What it is ("a regular file", "a directory", ...).
        kind: &'static str,
    },
    /// Another process listens on the socket.
    #[error("another process is listening on {0} (Address already in use)")]
    InUse(PathBuf),
    /// Empty path.
    #[error("empty unix socket path (Invalid argument)")]
    Empty,
    /// Any other failure (permissions, ...).
    #[error("{path}: {err}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
}

impl SockPathError {
    /// The errno an RPC answers with (negated): `ENAMETOOLONG`, `EEXIST` for something that
    /// is not a socket, `EADDRINUSE`, `EINVAL`, or the underlying errno.
    pub fn errno(&self) -> i32 {
        match self {
            SockPathError::TooLong { .. } => libc::ENAMETOOLONG,
            SockPathError::NotSocket { .. } => libc::EEXIST,
            SockPathError::InUse(_) => libc::EADDRINUSE,
            SockPathError::Empty => libc::EINVAL,
            SockPathError::Io { err, .. } => err.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_fifo() {
        "a fifo"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else {
        "not a socket"
    }
}

/// Makes `path` ready for `bind`: nothing there, or a stale socket (removed). Everything
/// else is an error and nothing is changed.
pub fn prepare(path: &Path) -> Result<(), SockPathError> {
    let len = path.as_os_str().len();
    if len == 0 {
        return Err(SockPathError::Empty);
    }
    if len > MAX_PATH_LEN {
        return Err(SockPathError::TooLong { len });
    }
    let io = |err| SockPathError::Io {
        path: path.to_path_buf(),
        err,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SockPathError::NotSocket {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SockPathError::InUse(path.to_path_buf())),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            // Stale: nobody listens. Remove it only if it is still the socket we looked at.
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.ino() == meta.ino() && m.dev() == meta.dev() => {
                    std::fs::remove_file(path).map_err(io)
                }
                Ok(_) => Err(SockPathError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io(e)),
            }
        }
        // EACCES and the like: not ours to judge, not ours to delete.
        Err(e) => Err(io(e)),
    }
}

/// The socket file we created: removed at shutdown only if the path still names it.
#[derive(Debug, Clone)]
pub struct BoundPath {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl BoundPath {
    /// Records the socket just bound at `path`.
    pub fn new(path: &Path) -> Option<BoundPath> {
        let m = std::fs::symlink_metadata(path).ok()?;
        Some(BoundPath {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket if the path still names it (not a file put there since).
    pub fn remove(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// [`prepare`], then binds a tokio listener; returns it with the bound path.
pub fn bind(path: &Path) -> Result<(tokio::net::UnixListener, Option<BoundPath>), SockPathError> {
    prepare(path)?;
    let l = tokio::net::UnixListener::bind(path).map_err(|err| {
        if err.raw_os_error() == Some(libc::EADDRINUSE) {
            SockPathError::InUse(path.to_path_buf())
        } else {
            SockPathError::Io {
                path: path.to_path_buf(),
                err,
            }
        }
    })?;
    Ok((l, BoundPath::new(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_stale_sockets_are_replaced() {
        let d = tempfile::tempdir().unwrap();
        // A regular file survives with its bytes.
        let f = d.path().join("precious.txt");
        std::fs::write(&f, b"keep me").unwrap();
        let e = bind(&f).unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST);
        assert!(e.to_string().contains("a regular file"), "{e}");
        assert_eq!(std::fs::read(&f).unwrap(), b"keep me");
        // A directory.
        let e = bind(d.path()).unwrap_err();
        assert!(matches!(
            e,
            SockPathError::NotSocket {
                kind: "a directory",
                ..
            }
        ));
        // A live socket is in use, a stale one is replaced.
        let s = d.path().join("s.sock");
        let (l, bound) = bind(&s).unwrap();
        assert_eq!(bind(&s).unwrap_err().errno(), libc::EADDRINUSE);
        drop(l);
        assert!(bound.is_some());
        let (_l2, bound2) = bind(&s).unwrap();
        // Removal at shutdown leaves a file put at the path since.
        std::fs::remove_file(&s).unwrap();
        std::fs::write(&s, b"new").unwrap();
        bound2.clone().unwrap().remove();
        assert_eq!(std::fs::read(&s).unwrap(), b"new");
        std::fs::remove_file(&s).unwrap();
        let (_l3, bound3) = bind(&s).unwrap();
        bound3.unwrap().remove();
        assert!(!s.exists());
        // Too long.
        let long = d.path().join("x".repeat(220));
        assert_eq!(bind(&long).unwrap_err().errno(), libc::ENAMETOOLONG);
        assert_eq!(prepare(Path::new("")).unwrap_err().errno(), libc::EINVAL);
    }
}
