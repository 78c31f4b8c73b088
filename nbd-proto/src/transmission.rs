//! The transmission phase: request headers, simple replies and the checks a server applies
//! to a request before it reaches the device.

use crate::{be_u16, be_u32, be_u64, exact, ProtoError};
use crate::{
    CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, ENOSPC,
    EOVERFLOW, EPERM, MAX_PAYLOAD, REPLY_LEN, REQUEST_LEN, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};

/// The commands both ends use (the wire carries a `u16`, see `CMD_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
}

impl Cmd {
    /// The command's number on the wire.
    pub fn code(self) -> u16 {
        match self {
            Cmd::Read => CMD_READ,
            Cmd::Write => CMD_WRITE,
            Cmd::Disc => CMD_DISC,
            Cmd::Flush => CMD_FLUSH,
            Cmd::Trim => CMD_TRIM,
            Cmd::WriteZeroes => CMD_WRITE_ZEROES,
        }
    }

    /// The command with this number, if we know it.
    pub fn from_code(code: u16) -> Option<Cmd> {
        Some(match code {
            CMD_READ => Cmd::Read,
            CMD_WRITE => Cmd::Write,
            CMD_DISC => Cmd::Disc,
            CMD_FLUSH => Cmd::Flush,
            CMD_TRIM => Cmd::Trim,
            CMD_WRITE_ZEROES => Cmd::WriteZeroes,
            _ => return None,
        })
    }

    /// Name used in errors and traces.
    pub fn name(self) -> &'static str {
        match self {
            Cmd::Read => "read",
            Cmd::Write => "write",
            Cmd::Disc => "disconnect",
            Cmd::Flush => "flush",
            Cmd::Trim => "trim",
            Cmd::WriteZeroes => "write_zeroes",
        }
    }
}

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`; unknown values are kept so the server can refuse them).
    pub cmd: u16,
    /// Cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// A request without command flags.
    pub fn new(cmd: Cmd, cookie: u64, offset: u64, len: u32) -> Self {
        Request {
            flags: 0,
            cmd: cmd.code(),
            cookie,
            offset,
            len,
        }
    }
}

/// Decodes a 28-byte request header.
pub fn parse_request(b: &[u8]) -> Result<Request, ProtoError> {
    let b = exact("request header", b, REQUEST_LEN)?;
    let magic = be_u32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(u64::from(magic)));
    }
    Ok(Request {
        flags: be_u16(b, 4),
        cmd: be_u16(b, 6),
        cookie: be_u64(b, 8),
        offset: be_u64(b, 16),
        len: be_u32(b, 24),
    })
}

/// Encodes a request header (the payload of a write follows it on the wire).
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.cmd.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// A decoded simple reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The NBD error value (0 = success).
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

/// Encodes a simple reply header (a read's data follows it on the wire).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Decodes a simple reply header; a structured reply is an error (never negotiated).
pub fn parse_reply(b: &[u8]) -> Result<Reply, ProtoError> {
    let b = exact("reply header", b, REPLY_LEN)?;
    match be_u32(b, 0) {
        SIMPLE_REPLY_MAGIC => Ok(Reply {
            error: be_u32(b, 4),
            cookie: be_u64(b, 8),
        }),
        STRUCTURED_REPLY_MAGIC => Err(ProtoError::StructuredReply),
        m => Err(ProtoError::BadMagic(u64::from(m))),
    }
}

/// Whether the request carries a payload the server must read (only WRITE does).
pub fn has_payload(r: &Request) -> bool {
    r.cmd == CMD_WRITE
}

/// Checks a request against the export (server side); `Err` is the NBD error to reply with.
/// Unknown commands are `EINVAL`, writes to a read-only export `EPERM`, reads and writes over
/// [`MAX_PAYLOAD`] `EOVERFLOW`, a range past the end `ENOSPC` for writes and `EINVAL` for
/// reads.
pub fn check_request(r: &Request, size: u64, read_only: bool) -> Result<(), u32> {
    let writes = matches!(r.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    match r.cmd {
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {}
        CMD_FLUSH => return Ok(()),
        _ => return Err(EINVAL),
    }
    if writes && read_only {
        return Err(EPERM);
    }
    if matches!(r.cmd, CMD_READ | CMD_WRITE) && r.len > MAX_PAYLOAD {
        return Err(EOVERFLOW);
    }
    match r.offset.checked_add(u64::from(r.len)) {
        Some(end) if end <= size => Ok(()),
        _ if writes => Err(ENOSPC),
        _ => Err(EINVAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CMD_FLAG_FUA;

    #[test]
    fn requests_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            cmd: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            len: 512,
        };
        let b = encode_request(&r);
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(parse_request(&b), Ok(r));
        for cmd in [
            Cmd::Read,
            Cmd::Write,
            Cmd::Disc,
            Cmd::Flush,
            Cmd::Trim,
            Cmd::WriteZeroes,
        ] {
            assert_eq!(Cmd::from_code(cmd.code()), Some(cmd));
            let r = Request::new(cmd, 7, 1 << 40, u32::MAX);
            assert_eq!(parse_request(&encode_request(&r)), Ok(r));
        }
        assert_eq!(Cmd::from_code(5), None);
    }

    #[test]
    fn bad_requests_are_errors() {
        let b = encode_request(&Request::new(Cmd::Read, 1, 0, 512));
        let mut bad = b;
        bad[0] = 0;
        assert!(matches!(parse_request(&bad), Err(ProtoError::BadMagic(_))));
        assert!(matches!(
            parse_request(&b[..27]),
            Err(ProtoError::Length { got: 27, .. })
        ));
        let mut long = b.to_vec();
        long.push(0);
        assert!(parse_request(&long).is_err());
    }

    #[test]
    fn replies_round_trip_and_structured_is_refused() {
        let b = simple_reply(ENOSPC, 7);
        assert_eq!(
            parse_reply(&b),
            Ok(Reply {
                error: ENOSPC,
                cookie: 7
            })
        );
        let mut s = b;
        s[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(parse_reply(&s), Err(ProtoError::StructuredReply));
        s[0] = 0;
        assert!(matches!(parse_reply(&s), Err(ProtoError::BadMagic(_))));
        assert!(parse_reply(&b[..15]).is_err());
    }

    #[test]
    fn requests_are_checked() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            cmd: CMD_WRITE,
            cookie: 0xdead_beef,
            offset: 4096,
            len: 512,
        };
        assert!(has_payload(&r));
        assert_eq!(check_request(&r, 8192, false), Ok(()));
        assert_eq!(check_request(&r, 8192, true), Err(EPERM));
        assert_eq!(check_request(&r, 4096, false), Err(ENOSPC));
        let rd = Request { cmd: CMD_READ, ..r };
        assert!(!has_payload(&rd));
        assert_eq!(check_request(&rd, 4096, true), Err(EINVAL));
        let huge = Request {
            cmd: CMD_READ,
            offset: 0,
            len: MAX_PAYLOAD + 1,
            ..r
        };
        assert_eq!(check_request(&huge, u64::MAX, false), Err(EOVERFLOW));
        let wrap = Request {
            offset: u64::MAX,
            ..rd
        };
        assert_eq!(check_request(&wrap, u64::MAX, false), Err(EINVAL));
        assert_eq!(
            check_request(&Request { cmd: 42, ..r }, 8192, false),
            Err(EINVAL)
        );
        let flush = Request {
            cmd: CMD_FLUSH,
            ..r
        };
        assert_eq!(check_request(&flush, 0, true), Ok(()));
    }
}
