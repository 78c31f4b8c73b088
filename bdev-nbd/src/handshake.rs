//! The client side of the fixed-newstyle handshake over a blocking stream: `NBD_OPT_GO`
//! (with a fallback to `NBD_OPT_EXPORT_NAME` for servers that do not know it). The bytes are
//! encoded and decoded by `nbd_proto`; this file only reads and writes them.

use std::io::{Read, Write};

use nbd_proto::{
    ExportInfo, Info, ProtoError, INFO_BLOCK_SIZE, INFO_EXPORT, OPTION_REPLY_HEADER_LEN,
    OPT_EXPORT_NAME, OPT_GO, REP_ACK, REP_ERR_UNSUP, REP_FLAG_ERROR, REP_INFO, TFLAG_HAS_FLAGS,
};

use crate::{NbdError, Result};

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

fn send_option<W: Write>(w: &mut W, option: u32, data: &[u8]) -> Result<()> {
    let msg = nbd_proto::encode_option(option, data)
        .map_err(|e| NbdError::InvalidArgument(e.to_string()))?;
    w.write_all(&msg).map_err(NbdError::Socket)
}

/// Runs the client side of the handshake on a fresh connection and returns the export's
/// description. The stream is then in the transmission phase.
pub(crate) fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<ExportInfo> {
    let hflags = nbd_proto::parse_greeting(&read_n(s, nbd_proto::GREETING_LEN)?)?;
    let cflags = nbd_proto::client_flags(hflags);
    s.write_all(&cflags.to_be_bytes())
        .map_err(NbdError::Socket)?;
    let mut info = None;
    if cflags & nbd_proto::FLAG_C_FIXED_NEWSTYLE != 0 {
        info = opt_go(s, export)?;
    }
    let mut info = match info {
        Some(i) => i,
        None => export_name(s, export, cflags & nbd_proto::FLAG_C_NO_ZEROES != 0)?,
    };
    if !info.has(TFLAG_HAS_FLAGS) {
        // Without the "flags are valid" bit the other bits mean nothing.
        info.flags = 0;
    }
    Ok(info)
}

/// `NBD_OPT_GO`; `None` when the server does not know the option (fall back).
fn opt_go<S: Read + Write>(s: &mut S, export: &str) -> Result<Option<ExportInfo>> {
    let data = nbd_proto::encode_go(export, &[INFO_EXPORT, INFO_BLOCK_SIZE])
        .map_err(|e| NbdError::InvalidArgument(format!("export name: {e}")))?;
    send_option(s, OPT_GO, &data)?;

    let mut export_seen: Option<(u64, u16)> = None;
    let mut sizes: Option<(u32, u32, u32)> = None;
    loop {
        let h = nbd_proto::parse_option_reply_header(&read_n(s, OPTION_REPLY_HEADER_LEN)?)?;
        if h.option != OPT_GO {
            return Err(NbdError::Protocol(format!(
                "reply to option {} while waiting for NBD_OPT_GO",
                h.option
            )));
        }
        let data = read_n(s, h.len as usize)?;
        match h.reply {
            REP_INFO => match nbd_proto::parse_info(&data)? {
                Info::Export { size, flags } => export_seen = Some((size, flags)),
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => sizes = Some((min, preferred, max)),
                Info::Other(_) => {}
            },
            REP_ACK => {
                let (size, flags) = export_seen.ok_or_else(|| {
                    NbdError::Protocol("NBD_REP_ACK without NBD_INFO_EXPORT".into())
                })?;
                let mut info = ExportInfo::with_default_sizes(size, flags);
                if let Some((min, pref, max)) = sizes {
                    (info.min_block, info.pref_block, info.max_payload) = (min, pref, max);
                }
                info.check_block_sizes()?;
                return Ok(Some(info));
            }
            REP_ERR_UNSUP => return Ok(None),
            r if r & REP_FLAG_ERROR != 0 => {
                let (errno, what) = nbd_proto::option_error(r);
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
    let reply = read_n(s, nbd_proto::EXPORT_NAME_REPLY_LEN).map_err(|e| match e {
        NbdError::Socket(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            NbdError::OptionRefused {
                export: export.to_string(),
                reason: "server closed the connection".into(),
                errno: libc::ENOENT,
            }
        }
        other => other,
    })?;
    let (size, flags) = nbd_proto::parse_export_name_reply(&reply)?;
    if !no_zeroes {
        read_n(s, 124)?;
    }
    Ok(ExportInfo::with_default_sizes(size, flags))
}

impl From<ProtoError> for NbdError {
    fn from(e: ProtoError) -> Self {
        NbdError::Protocol(e.to_string())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nbd_proto::{
        FLAG_C_FIXED_NEWSTYLE, FLAG_FIXED_NEWSTYLE, IHAVEOPT, NBD_MAGIC, OPTION_HEADER_LEN,
        REP_ERR_UNKNOWN, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH,
    };
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
        s.write_all(&nbd_proto::greeting())?;
        let mut b4 = [0u8; 4];
        s.read_exact(&mut b4)?;
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        s.read_exact(&mut hdr)?;
        let h = nbd_proto::parse_option_header(&hdr).unwrap();
        assert_eq!(h.option, OPT_GO);
        let mut data = vec![0u8; h.len as usize];
        s.read_exact(&mut data)?;
        let name = nbd_proto::parse_go(&data).unwrap().name;
        let reply = |s: &mut UnixStream, rep: u32, payload: &[u8]| {
            s.write_all(&nbd_proto::option_reply(OPT_GO, rep, payload))
        };
        if name != export {
            reply(s, REP_ERR_UNKNOWN, b"no such export")?;
            return Ok(false);
        }
        reply(
            s,
            REP_INFO,
            &nbd_proto::encode_info(&Info::Export { size, flags }),
        )?;
        if let Some((min, preferred, max)) = block {
            let i = Info::BlockSize {
                min,
                preferred,
                max,
            };
            reply(s, REP_INFO, &nbd_proto::encode_info(&i))?;
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
    fn bad_block_sizes_are_a_protocol_error() {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            serve_handshake(&mut s, "v", 8192, 1, Some((3, 4096, 1 << 20)))
        });
        let err = handshake(&mut c, "v").unwrap_err();
        t.join().unwrap().unwrap();
        assert_eq!(err.errno(), libc::EPROTO);
        assert!(err.to_string().contains("bad block sizes"), "{err}");
    }

    #[test]
    fn falls_back_to_export_name_without_opt_go() {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            s.write_all(&NBD_MAGIC.to_be_bytes()).unwrap();
            s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
            s.write_all(&FLAG_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
            let mut b4 = [0u8; 4];
            s.read_exact(&mut b4).unwrap();
            assert_eq!(u32::from_be_bytes(b4), FLAG_C_FIXED_NEWSTYLE);
            let mut hdr = [0u8; OPTION_HEADER_LEN];
            s.read_exact(&mut hdr).unwrap();
            let h = nbd_proto::parse_option_header(&hdr).unwrap();
            let mut data = vec![0u8; h.len as usize];
            s.read_exact(&mut data).unwrap();
            s.write_all(&nbd_proto::option_reply(OPT_GO, REP_ERR_UNSUP, &[]))
                .unwrap();
            s.read_exact(&mut hdr).unwrap();
            let h = nbd_proto::parse_option_header(&hdr).unwrap();
            assert_eq!(h.option, OPT_EXPORT_NAME);
            let mut name = vec![0u8; h.len as usize];
            s.read_exact(&mut name).unwrap();
            assert_eq!(name, b"old");
            // Without NBD_FLAG_C_NO_ZEROES the 124 zero bytes follow.
            let info = ExportInfo::with_default_sizes(3 << 20, TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH);
            s.write_all(&nbd_proto::export_name_reply(&info, false))
                .unwrap();
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
}
