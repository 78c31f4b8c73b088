//! The NBD wire format, client side: the fixed-newstyle handshake ending in `NBD_OPT_GO`
//! (with a fallback to `NBD_OPT_EXPORT_NAME` for servers that do not know it), request
//! headers and simple reply headers. Everything is big-endian ("network byte order").
//!
//! Structured replies are never negotiated, so the server must answer every request with a
//! simple reply; a structured-reply magic on the wire is a protocol error.

use std::io::{Read, Write};

use crate::{NbdError, Result};

/// `NBDMAGIC`, the first 8 bytes the server sends.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the prefix of every option the client sends.
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle magic (after `NBDMAGIC`), which we do not speak.
const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of an option reply.
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a request.
const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (only legal after `NBD_OPT_STRUCTURED_REPLY`).
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the zeroes.
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
const REP_ERR_PLATFORM: u32 = REP_ERR_BIT | 4;
const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT | 7;
const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT | 8;
const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Largest option reply payload we accept (names and descriptions are far smaller).
const MAX_OPT_REPLY: u32 = 64 * 1024;

/// Transmission flag: the flags field is valid (always set).
pub(crate) const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub(crate) const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub(crate) const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub(crate) const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub(crate) const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: several connections to the export share one cache.
pub(crate) const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Request types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cmd {
    Read = 0,
    Write = 1,
    Disc = 2,
    Flush = 3,
    Trim = 4,
    WriteZeroes = 6,
}

impl Cmd {
    /// Name used in errors and traces.
    pub(crate) fn name(self) -> &'static str {
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

/// What the server said about the export during the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
    /// Minimum block size (1 when the server did not say).
    pub min_block: u32,
    /// Preferred block size (4096 when the server did not say).
    pub pref_block: u32,
    /// Largest read or write payload (32 MiB when the server did not say).
    pub max_payload: u32,
}

impl ExportInfo {
    /// Whether a transmission flag is set.
    pub(crate) fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn read_n<R: Read>(r: &mut R, n: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    r.read_exact(&mut v).map_err(|e| match e.kind() {
        // The handshake runs with a socket timeout; say so rather than "try again".
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            NbdError::Socket(std::io::Error::from_raw_os_error(libc::ETIMEDOUT))
        }
        _ => NbdError::Socket(e),
    })?;
    Ok(v)
}

fn read_u16<R: Read>(r: &mut R) -> Result<u16> {
    Ok(be_u16(&read_n(r, 2)?))
}

fn read_u32<R: Read>(r: &mut R) -> Result<u32> {
    Ok(be_u32(&read_n(r, 4)?))
}

fn read_u64<R: Read>(r: &mut R) -> Result<u64> {
    Ok(be_u64(&read_n(r, 8)?))
}

fn send_option<W: Write>(w: &mut W, option: u32, data: &[u8]) -> Result<()> {
    let len = u32::try_from(data.len())
        .map_err(|_| NbdError::InvalidArgument("option data too long".into()))?;
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(data);
    w.write_all(&msg).map_err(NbdError::Socket)
}

/// The errno and text for an `NBD_REP_ERR_*` reply type.
fn option_error(rep: u32) -> (i32, &'static str) {
    match rep {
        REP_ERR_UNSUP => (libc::ENOTSUP, "option not supported"),
        REP_ERR_POLICY => (libc::EACCES, "forbidden by server policy"),
        REP_ERR_INVALID => (libc::EINVAL, "invalid option"),
        REP_ERR_PLATFORM => (libc::ENOTSUP, "not supported on the server's platform"),
        REP_ERR_TLS_REQD => (libc::EACCES, "tls required"),
        REP_ERR_UNKNOWN => (libc::ENOENT, "unknown export"),
        REP_ERR_SHUTDOWN => (libc::ESHUTDOWN, "server is shutting down"),
        REP_ERR_BLOCK_SIZE_REQD => (libc::EINVAL, "block size negotiation required"),
        REP_ERR_TOO_BIG => (libc::E2BIG, "request too big"),
        _ => (libc::EPROTO, "unknown error reply"),
    }
}

fn check_sizes(info: &ExportInfo) -> Result<()> {
    let ok = info.min_block.is_power_of_two()
        && info.min_block <= 65536
        && info.pref_block.is_power_of_two()
        && info.max_payload >= info.min_block;
    if !ok {
        return Err(NbdError::Protocol(format!(
            "bad block sizes: minimum {}, preferred {}, maximum payload {}",
            info.min_block, info.pref_block, info.max_payload
        )));
    }
    Ok(())
}

/// Runs the client side of the handshake on a fresh connection and returns the export's
/// description. The stream is then in the transmission phase.
pub(crate) fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<ExportInfo> {
    if read_u64(s)? != NBDMAGIC {
        return Err(NbdError::Protocol("not an nbd server (bad magic)".into()));
    }
    let magic = read_u64(s)?;
    if magic == CLISERV_MAGIC {
        return Err(NbdError::Protocol(
            "server speaks the oldstyle handshake only".into(),
        ));
    }
    if magic != IHAVEOPT {
        return Err(NbdError::Protocol(format!("bad newstyle magic {magic:#x}")));
    }
    let hflags = read_u16(s)?;
    let mut cflags = 0u32;
    if hflags & FLAG_FIXED_NEWSTYLE != 0 {
        cflags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())
        .map_err(NbdError::Socket)?;
    let mut info = None;
    if hflags & FLAG_FIXED_NEWSTYLE != 0 {
        info = opt_go(s, export)?;
    }
    let mut info = match info {
        Some(i) => i,
        None => export_name(s, export, cflags & FLAG_C_NO_ZEROES != 0)?,
    };
    if !info.has(TFLAG_HAS_FLAGS) {
        // Without the "flags are valid" bit the other bits mean nothing.
        info.flags = 0;
    }
    Ok(info)
}

/// `NBD_OPT_GO`; `None` when the server does not know the option (fall back).
fn opt_go<S: Read + Write>(s: &mut S, export: &str) -> Result<Option<ExportInfo>> {
    let name = export.as_bytes();
    let name_len = u32::try_from(name.len())
        .map_err(|_| NbdError::InvalidArgument("export name too long".into()))?;
    let mut data = Vec::with_capacity(4 + name.len() + 6);
    data.extend_from_slice(&name_len.to_be_bytes());
    data.extend_from_slice(name);
    data.extend_from_slice(&2u16.to_be_bytes());
    data.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data)?;

    let mut export_seen: Option<(u64, u16)> = None;
    let mut sizes: Option<(u32, u32, u32)> = None;
    loop {
        let magic = read_u64(s)?;
        if magic != OPT_REPLY_MAGIC {
            return Err(NbdError::Protocol(format!(
                "bad option reply magic {magic:#x}"
            )));
        }
        let option = read_u32(s)?;
        let rep = read_u32(s)?;
        let len = read_u32(s)?;
        if option != OPT_GO {
            return Err(NbdError::Protocol(format!(
                "reply to option {option} while waiting for NBD_OPT_GO"
            )));
        }
        if len > MAX_OPT_REPLY {
            return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
        }
        let data = read_n(s, len as usize)?;
        match rep {
            REP_INFO => {
                if data.len() < 2 {
                    return Err(NbdError::Protocol("short NBD_REP_INFO".into()));
                }
                match be_u16(&data) {
                    INFO_EXPORT if data.len() == 12 => {
                        export_seen = Some((be_u64(&data[2..]), be_u16(&data[10..])));
                    }
                    INFO_BLOCK_SIZE if data.len() == 14 => {
                        sizes = Some((be_u32(&data[2..]), be_u32(&data[6..]), be_u32(&data[10..])));
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(NbdError::Protocol(format!(
                            "NBD_REP_INFO of bad length {}",
                            data.len()
                        )));
                    }
                    // Names, descriptions and future types are ignored, as the spec asks.
                    _ => {}
                }
            }
            REP_ACK => {
                let (size, flags) = export_seen.ok_or_else(|| {
                    NbdError::Protocol("NBD_REP_ACK without NBD_INFO_EXPORT".into())
                })?;
                let (min_block, pref_block, max_payload) = sizes.unwrap_or((1, 4096, 1 << 25));
                let info = ExportInfo {
                    size,
                    flags,
                    min_block,
                    pref_block,
                    max_payload,
                };
                check_sizes(&info)?;
                return Ok(Some(info));
            }
            REP_ERR_UNSUP => return Ok(None),
            r if r & REP_ERR_BIT != 0 => {
                let (errno, what) = option_error(r);
                let text = String::from_utf8_lossy(&data);
                let reason = if text.is_empty() {
                    what.to_string()
                } else {
                    format!("{what}: {text}")
                };
                return Err(NbdError::OptionRefused {
                    export: export.to_string(),
                    reason,
                    errno,
                });
            }
            other => {
                return Err(NbdError::Protocol(format!(
                    "unexpected option reply type {other}"
                )))
            }
        }
    }
}

/// `NBD_OPT_EXPORT_NAME`, for servers without `NBD_OPT_GO`. A server that does not have the
/// export just closes the connection.
fn export_name<S: Read + Write>(s: &mut S, export: &str, no_zeroes: bool) -> Result<ExportInfo> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    let size = read_u64(s).map_err(|e| match e {
        NbdError::Socket(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            NbdError::OptionRefused {
                export: export.to_string(),
                reason: "server closed the connection".into(),
                errno: libc::ENOENT,
            }
        }
        other => other,
    })?;
    let flags = read_u16(s)?;
    if !no_zeroes {
        read_n(s, 124)?;
    }
    Ok(ExportInfo {
        size,
        flags,
        min_block: 1,
        pref_block: 4096,
        max_payload: 1 << 25,
    })
}

/// Length of a request header.
pub(crate) const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub(crate) const REPLY_LEN: usize = 16;

/// Encodes a request header (the payload of a write follows it on the wire).
pub(crate) fn request(cmd: Cmd, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    // Command flags: none (no FUA, no NO_HOLE).
    b[6..8].copy_from_slice(&(cmd as u16).to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// A decoded simple reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reply {
    /// The NBD error value (0 = success).
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

/// Decodes a simple reply header.
pub(crate) fn parse_reply(b: &[u8; REPLY_LEN]) -> Result<Reply> {
    match be_u32(b) {
        SIMPLE_REPLY_MAGIC => Ok(Reply {
            error: be_u32(&b[4..]),
            cookie: be_u64(&b[8..]),
        }),
        STRUCTURED_REPLY_MAGIC => Err(NbdError::Protocol(
            "structured reply although none was negotiated".into(),
        )),
        m => Err(NbdError::Protocol(format!("bad reply magic {m:#x}"))),
    }
}

/// The errno for an NBD error value. Unknown values count as EINVAL, as the spec asks.
pub(crate) fn errno_of(nbd_error: u32) -> i32 {
    match nbd_error {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::ENOTSUP,
        108 => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

/// `NBD_ESHUTDOWN`: the server is going away; the client must disconnect (we then reconnect).
pub(crate) const NBD_ESHUTDOWN: u32 = 108;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// The server side of a fixed-newstyle handshake, for tests: answers `NBD_OPT_GO` for
    /// `export` with the given info (or `NBD_REP_ERR_UNKNOWN` for any other name).
    pub(crate) fn serve_handshake(
        s: &mut UnixStream,
        export: &str,
        size: u64,
        flags: u16,
        block: Option<(u32, u32, u32)>,
    ) -> std::io::Result<bool> {
        s.write_all(&NBDMAGIC.to_be_bytes())?;
        s.write_all(&IHAVEOPT.to_be_bytes())?;
        s.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        let mut b4 = [0u8; 4];
        s.read_exact(&mut b4)?;
        let mut hdr = [0u8; 16];
        s.read_exact(&mut hdr)?;
        assert_eq!(be_u64(&hdr), IHAVEOPT);
        assert_eq!(be_u32(&hdr[8..]), OPT_GO);
        let mut data = vec![0u8; be_u32(&hdr[12..]) as usize];
        s.read_exact(&mut data)?;
        let nlen = be_u32(&data) as usize;
        let name = String::from_utf8_lossy(&data[4..4 + nlen]).to_string();
        let reply = |s: &mut UnixStream, rep: u32, payload: &[u8]| -> std::io::Result<()> {
            s.write_all(&OPT_REPLY_MAGIC.to_be_bytes())?;
            s.write_all(&OPT_GO.to_be_bytes())?;
            s.write_all(&rep.to_be_bytes())?;
            s.write_all(&(payload.len() as u32).to_be_bytes())?;
            s.write_all(payload)
        };
        if name != export {
            reply(s, REP_ERR_UNKNOWN, b"no such export")?;
            return Ok(false);
        }
        let mut p = INFO_EXPORT.to_be_bytes().to_vec();
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        reply(s, REP_INFO, &p)?;
        if let Some((a, b, c)) = block {
            let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for v in [a, b, c] {
                p.extend_from_slice(&v.to_be_bytes());
            }
            reply(s, REP_INFO, &p)?;
        }
        reply(s, REP_ACK, &[])?;
        Ok(true)
    }

    #[test]
    fn opt_go_reports_size_flags_and_block_sizes() {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            serve_handshake(
                &mut s,
                "golden",
                1 << 20,
                0x1 | 0x2,
                Some((512, 4096, 1 << 20)),
            )
            .unwrap()
        });
        let info = handshake(&mut c, "golden").unwrap();
        assert!(t.join().unwrap());
        assert_eq!(info.size, 1 << 20);
        assert!(info.has(TFLAG_READ_ONLY));
        assert_eq!(
            (info.min_block, info.pref_block, info.max_payload),
            (512, 4096, 1 << 20)
        );
    }

    #[test]
    fn unknown_export_is_enoent() {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || serve_handshake(&mut s, "golden", 4096, 1, None));
        let err = handshake(&mut c, "other").unwrap_err();
        assert!(!t.join().unwrap().unwrap());
        assert_eq!(err.errno(), libc::ENOENT);
        assert!(err.to_string().contains("no such export"), "{err}");
    }

    #[test]
    fn defaults_apply_without_block_size_info() {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || serve_handshake(&mut s, "", 8192, 1, None));
        let info = handshake(&mut c, "").unwrap();
        t.join().unwrap().unwrap();
        assert_eq!((info.min_block, info.max_payload), (1, 1 << 25));
    }

    #[test]
    fn falls_back_to_export_name_without_opt_go() {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            s.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
            s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
            s.write_all(&FLAG_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
            let mut b4 = [0u8; 4];
            s.read_exact(&mut b4).unwrap();
            assert_eq!(be_u32(&b4), FLAG_C_FIXED_NEWSTYLE);
            let mut hdr = [0u8; 16];
            s.read_exact(&mut hdr).unwrap();
            let mut data = vec![0u8; be_u32(&hdr[12..]) as usize];
            s.read_exact(&mut data).unwrap();
            s.write_all(&OPT_REPLY_MAGIC.to_be_bytes()).unwrap();
            s.write_all(&OPT_GO.to_be_bytes()).unwrap();
            s.write_all(&REP_ERR_UNSUP.to_be_bytes()).unwrap();
            s.write_all(&0u32.to_be_bytes()).unwrap();
            s.read_exact(&mut hdr).unwrap();
            assert_eq!(be_u32(&hdr[8..]), OPT_EXPORT_NAME);
            let mut name = vec![0u8; be_u32(&hdr[12..]) as usize];
            s.read_exact(&mut name).unwrap();
            assert_eq!(name, b"old");
            s.write_all(&(3u64 << 20).to_be_bytes()).unwrap();
            s.write_all(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes())
                .unwrap();
            // Without NBD_FLAG_C_NO_ZEROES the 124 zero bytes follow.
            s.write_all(&[0u8; 124]).unwrap();
        });
        let info = handshake(&mut c, "old").unwrap();
        t.join().unwrap();
        assert_eq!(info.size, 3 << 20);
        assert!(info.has(TFLAG_SEND_FLUSH));
        assert_eq!((info.min_block, info.max_payload), (1, 1 << 25));
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        drop(s);
        assert_eq!(handshake(&mut c, "x").unwrap_err().errno(), libc::EPROTO);
    }

    #[test]
    fn request_and_reply_encoding() {
        let r = request(Cmd::Write, 0x0102_0304_0506_0708, 4096, 512);
        assert_eq!(&r[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&r[4..8], &[0, 0, 0, 1]);
        assert_eq!(be_u64(&r[8..]), 0x0102_0304_0506_0708);
        assert_eq!(be_u64(&r[16..]), 4096);
        assert_eq!(be_u32(&r[24..]), 512);
        let mut rep = [0u8; REPLY_LEN];
        rep[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        rep[4..8].copy_from_slice(&28u32.to_be_bytes());
        rep[8..16].copy_from_slice(&7u64.to_be_bytes());
        assert_eq!(
            parse_reply(&rep).unwrap(),
            Reply {
                error: 28,
                cookie: 7
            }
        );
        assert_eq!(errno_of(28), libc::ENOSPC);
        assert_eq!(errno_of(9999), libc::EINVAL);
        rep[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert!(matches!(parse_reply(&rep), Err(NbdError::Protocol(_))));
    }
}
