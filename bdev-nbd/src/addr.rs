//! Server addresses (`unix:PATH` or `HOST:PORT`) and the socket they open.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::{NbdError, Result};

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A Unix-domain socket path (`unix:/run/nbd.sock`).
    Unix(PathBuf),
    /// A host name or IP address and a TCP port (`10.0.0.1:10809`, `[::1]:10809`).
    Tcp(String),
}

impl Address {
    /// Parses `unix:PATH` or `HOST:PORT`.
    pub fn parse(s: &str) -> Result<Address> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(NbdError::BadAddress(s.to_string()));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| NbdError::BadAddress(s.to_string()))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(NbdError::BadAddress(s.to_string()));
        }
        // A bare IPv6 address needs brackets, or the port would be ambiguous.
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(NbdError::BadAddress(s.to_string()));
        }
        Ok(Address::Tcp(s.to_string()))
    }

    /// Opens a socket to the server, giving up after `timeout` per address tried.
    pub(crate) fn connect(&self, timeout: Duration) -> io::Result<Stream> {
        match self {
            Address::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            Address::Tcp(hp) => {
                let mut last = None;
                for sa in hp.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => {
                            // Requests are small and latency-bound; do not let Nagle hold them.
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "host name resolved to nothing")
                }))
            }
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(hp) => f.write_str(hp),
        }
    }
}

/// A connected stream socket of either family.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
    }

    /// Ends both directions; a thread blocked in `read` on a clone wakes up with EOF.
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// For TCP: turns on keepalive probes so that a peer that vanished while the connection
    /// was idle (host down, network cut) is noticed within about three times `idle`, and
    /// bounds unacknowledged sends by the same time (`TCP_USER_TIMEOUT`). Unix sockets need
    /// nothing: their peer cannot vanish silently.
    pub(crate) fn set_keepalive(&self, idle: Duration) -> io::Result<()> {
        let Stream::Tcp(s) = self else {
            return Ok(());
        };
        let fd = s.as_raw_fd();
        let secs = idle.as_secs().clamp(1, 3600) as libc::c_int;
        let ms = (idle.as_millis().clamp(1000, 3_600_000) * 3) as libc::c_uint;
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs)?;
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs)?;
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 2)?;
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            ms as libc::c_int,
        )
    }

    pub(crate) fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn setsockopt(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is an open socket owned by the caller for the duration of the call, and
    // the option value is a live `c_int` whose size is passed along with it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_tcp_addresses() {
        assert_eq!(
            Address::parse("unix:/tmp/a.sock").unwrap(),
            Address::Unix("/tmp/a.sock".into())
        );
        assert_eq!(
            Address::parse("10.0.0.1:10809").unwrap(),
            Address::Tcp("10.0.0.1:10809".into())
        );
        assert_eq!(
            Address::parse("[::1]:10809").unwrap(),
            Address::Tcp("[::1]:10809".into())
        );
        assert_eq!(Address::parse("unix:/x").unwrap().to_string(), "unix:/x");
        for bad in [
            "",
            "unix:",
            "host",
            "host:",
            "host:99999",
            ":10809",
            "::1:10809",
        ] {
            assert_eq!(
                Address::parse(bad).unwrap_err().errno(),
                libc::EINVAL,
                "{bad}"
            );
        }
    }
}
