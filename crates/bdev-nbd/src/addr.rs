//! Server addresses (`unix:PATH` or `HOST:PORT`) and the socket they open.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
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
