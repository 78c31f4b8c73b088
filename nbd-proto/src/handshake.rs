//! The fixed-newstyle handshake: greeting, client flags, options and their replies, and the
//! server's answer to each option.

use crate::{be_u16, be_u32, be_u64, exact, ProtoError};
use crate::{
    CLISERV_MAGIC, EXPORT_NAME_REPLY_LEN, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, GREETING_LEN, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT,
    MAX_OPTION_LEN, MAX_PAYLOAD, NBD_MAGIC, OPTION_HEADER_LEN, OPTION_REPLY_HEADER_LEN, OPT_ABORT,
    OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_REPLY_MAGIC, OPT_STARTTLS, REP_ACK,
    REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_SERVER,
    TFLAG_CAN_MULTI_CONN, TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA,
    TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
};

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags (fixed newstyle, no
/// zeroes).
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Decodes the server's greeting; returns its handshake flags.
pub fn parse_greeting(b: &[u8]) -> Result<u16, ProtoError> {
    let b = exact("greeting", b, GREETING_LEN)?;
    let magic = be_u64(b, 0);
    if magic != NBD_MAGIC {
        return Err(ProtoError::BadMagic(magic));
    }
    match be_u64(b, 8) {
        IHAVEOPT => Ok(be_u16(b, 16)),
        CLISERV_MAGIC => Err(ProtoError::OldStyle),
        m => Err(ProtoError::BadMagic(m)),
    }
}

/// The client flags a client answers the handshake flags with: fixed newstyle and no zeroes,
/// each when the server offers it.
pub fn client_flags(handshake_flags: u16) -> u32 {
    let mut c = 0;
    if handshake_flags & FLAG_FIXED_NEWSTYLE != 0 {
        c |= FLAG_C_FIXED_NEWSTYLE;
    }
    if handshake_flags & FLAG_NO_ZEROES != 0 {
        c |= FLAG_C_NO_ZEROES;
    }
    c
}

/// Decodes the client flags (server side); returns whether the client asked for no zero
/// padding. A client that does not speak fixed newstyle, or sets unknown flags, is refused.
pub fn parse_client_flags(b: &[u8]) -> Result<bool, ProtoError> {
    let b = exact("client flags", b, 4)?;
    let f = be_u32(b, 0);
    if f & FLAG_C_FIXED_NEWSTYLE == 0 || f & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::ClientFlags(f));
    }
    Ok(f & FLAG_C_NO_ZEROES != 0)
}

/// An option header: the option and its payload length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number.
    pub option: u32,
    /// Payload length (at most [`MAX_OPTION_LEN`]).
    pub len: u32,
}

/// Encodes an option (header and payload), as a client sends it.
pub fn encode_option(option: u32, data: &[u8]) -> Result<Vec<u8>, ProtoError> {
    let len = u32::try_from(data.len())
        .ok()
        .filter(|l| *l <= MAX_OPTION_LEN)
        .ok_or(ProtoError::OptionTooLong(
            u32::try_from(data.len()).unwrap_or(u32::MAX),
        ))?;
    let mut b = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    Ok(b)
}

/// Checks an option (reply) header: exactly `n` bytes, `magic` first, and a payload length
/// (at byte `len_at`) of at most [`MAX_OPTION_LEN`]. Returns the header and that length.
fn checked_header<'a>(
    what: &'static str,
    b: &'a [u8],
    n: usize,
    magic: u64,
    len_at: usize,
) -> Result<(&'a [u8], u32), ProtoError> {
    let b = exact(what, b, n)?;
    let got = be_u64(b, 0);
    if got != magic {
        return Err(ProtoError::BadMagic(got));
    }
    let len = be_u32(b, len_at);
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLong(len));
    }
    Ok((b, len))
}

/// Decodes a 16-byte option header; a payload over [`MAX_OPTION_LEN`] is refused before
/// anything is allocated for it.
pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, ProtoError> {
    let (b, len) = checked_header("option header", b, OPTION_HEADER_LEN, IHAVEOPT, 12)?;
    Ok(OptionHeader {
        option: be_u32(b, 8),
        len,
    })
}

/// Encodes an option reply (header and payload), as a server sends it.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    // Our replies are export names, info and short texts: far below 4 GiB.
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A decoded option reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// Reply type (`REP_*`).
    pub reply: u32,
    /// Payload length (at most [`MAX_OPTION_LEN`]).
    pub len: u32,
}

/// Decodes a 20-byte option reply header (client side); a payload over [`MAX_OPTION_LEN`] is
/// refused.
pub fn parse_option_reply_header(b: &[u8]) -> Result<OptionReplyHeader, ProtoError> {
    let (b, len) = checked_header(
        "option reply header",
        b,
        OPTION_REPLY_HEADER_LEN,
        OPT_REPLY_MAGIC,
        16,
    )?;
    Ok(OptionReplyHeader {
        option: be_u32(b, 8),
        reply: be_u32(b, 12),
        len,
    })
}

/// The payload of an `NBD_REP_INFO` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_BLOCK_SIZE`: the block size constraints.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Largest payload.
        max: u32,
    },
    /// A type we do not use (names, descriptions, future types); ignored as the spec asks.
    Other(u16),
}

/// Encodes an `NBD_REP_INFO` payload.
pub fn encode_info(info: &Info) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    match *info {
        Info::Export { size, flags } => {
            b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
            b.extend_from_slice(&size.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
        }
        Info::BlockSize {
            min,
            preferred,
            max,
        } => {
            b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            for v in [min, preferred, max] {
                b.extend_from_slice(&v.to_be_bytes());
            }
        }
        Info::Other(t) => b.extend_from_slice(&t.to_be_bytes()),
    }
    b
}

/// Decodes an `NBD_REP_INFO` payload; the types we use must have their exact length.
pub fn parse_info(b: &[u8]) -> Result<Info, ProtoError> {
    if b.len() < 2 {
        return Err(ProtoError::Truncated("NBD_REP_INFO"));
    }
    let info = be_u16(b, 0);
    let bad = || ProtoError::InfoLength { info, len: b.len() };
    match info {
        INFO_EXPORT if b.len() == 12 => Ok(Info::Export {
            size: be_u64(b, 2),
            flags: be_u16(b, 10),
        }),
        INFO_BLOCK_SIZE if b.len() == 14 => Ok(Info::BlockSize {
            min: be_u32(b, 2),
            preferred: be_u32(b, 6),
            max: be_u32(b, 10),
        }),
        INFO_EXPORT | INFO_BLOCK_SIZE => Err(bad()),
        t => Ok(Info::Other(t)),
    }
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoRequest {
    /// Export name (`""` is the default export).
    pub name: String,
    /// The `NBD_INFO_*` types the client asks for.
    pub infos: Vec<u16>,
}

/// Encodes the payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn encode_go(name: &str, infos: &[u16]) -> Result<Vec<u8>, ProtoError> {
    let total = 4 + name.len() + 2 + 2 * infos.len();
    if total > MAX_OPTION_LEN as usize {
        return Err(ProtoError::NameTooLong(name.len()));
    }
    let mut b = Vec::with_capacity(total);
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    Ok(b)
}

/// Decodes the payload of `NBD_OPT_INFO` / `NBD_OPT_GO`: name length, name, info count, info
/// types, and nothing after them.
pub fn parse_go(b: &[u8]) -> Result<GoRequest, ProtoError> {
    if b.len() < 6 {
        return Err(ProtoError::Truncated("NBD_OPT_GO"));
    }
    let nlen = be_u32(b, 0) as usize;
    let rest = &b[4..];
    if nlen > rest.len().saturating_sub(2) {
        return Err(ProtoError::Truncated("NBD_OPT_GO name"));
    }
    let name = std::str::from_utf8(&rest[..nlen])
        .map_err(|_| ProtoError::NameNotUtf8)?
        .to_string();
    let nreq = be_u16(rest, nlen) as usize;
    let list = &rest[nlen + 2..];
    if list.len() != 2 * nreq {
        return Err(ProtoError::Length {
            what: "NBD_OPT_GO info list",
            expected: 2 * nreq,
            got: list.len(),
        });
    }
    let infos = list.chunks_exact(2).map(|c| be_u16(c, 0)).collect();
    Ok(GoRequest { name, infos })
}

/// What a handshake knows of one export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
    /// Minimum block size.
    pub min_block: u32,
    /// Preferred block size.
    pub pref_block: u32,
    /// Largest read or write payload.
    pub max_payload: u32,
}

impl ExportInfo {
    /// An export as a server describes it: its device's block size is the minimum, the
    /// preferred size at least 4 KiB, and [`MAX_PAYLOAD`] the largest payload.
    pub fn new(size: u64, flags: u16, block_size: u32) -> Self {
        ExportInfo {
            size,
            flags,
            min_block: block_size,
            pref_block: block_size.max(4096),
            max_payload: MAX_PAYLOAD,
        }
    }

    /// An export whose server sent no block size info: the protocol's defaults (1 byte,
    /// 4 KiB, 32 MiB).
    pub fn with_default_sizes(size: u64, flags: u16) -> Self {
        ExportInfo {
            size,
            flags,
            min_block: 1,
            pref_block: 4096,
            max_payload: 1 << 25,
        }
    }

    /// Whether a transmission flag is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Checks the block sizes against the protocol's rules (powers of two, minimum at most
    /// 64 KiB, payload at least the minimum).
    pub fn check_block_sizes(&self) -> Result<(), ProtoError> {
        let ok = self.min_block.is_power_of_two()
            && self.min_block <= 65536
            && self.pref_block.is_power_of_two()
            && self.max_payload >= self.min_block;
        if ok {
            Ok(())
        } else {
            Err(ProtoError::BlockSizes {
                min: self.min_block,
                preferred: self.pref_block,
                max: self.max_payload,
            })
        }
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless the client
/// asked for no zeroes.
pub fn export_name_reply(info: &ExportInfo, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(EXPORT_NAME_REPLY_LEN + 124);
    b.extend_from_slice(&info.size.to_be_bytes());
    b.extend_from_slice(&info.flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// Decodes the first 10 bytes of the `NBD_OPT_EXPORT_NAME` reply: size and flags.
pub fn parse_export_name_reply(b: &[u8]) -> Result<(u64, u16), ProtoError> {
    let b = exact("NBD_OPT_EXPORT_NAME reply", b, EXPORT_NAME_REPLY_LEN)?;
    Ok((be_u64(b, 0), be_u16(b, 8)))
}

/// Transmission flags a server advertises for an export.
pub fn transmission_flags(read_only: bool, trim: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
    if read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_FUA | TFLAG_SEND_WRITE_ZEROES;
        if trim {
            f |= TFLAG_SEND_TRIM;
        }
    }
    f
}

/// What the server's connection does after an option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Send the bytes, read the next option.
    Continue,
    /// Send the bytes, then start transmission on this export.
    Transmit(String),
    /// Send the bytes, then close.
    Close,
}

/// The server's answer to one option: bytes to send and what comes next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionOutcome {
    /// Bytes to send.
    pub reply: Vec<u8>,
    /// Next step.
    pub next: Next,
}

/// The exports a server's handshake can see.
pub trait ExportLookup {
    /// Resolves an export name (`""` is the default export) to its real name and info.
    fn lookup(&self, name: &str) -> Option<(String, ExportInfo)>;
    /// Names of every export.
    fn names(&self) -> Vec<String>;
}

fn info_replies(option: u32, info: &ExportInfo) -> Vec<u8> {
    let export = Info::Export {
        size: info.size,
        flags: info.flags,
    };
    let sizes = Info::BlockSize {
        min: info.min_block,
        preferred: info.pref_block,
        max: info.max_payload,
    };
    let mut out = option_reply(option, REP_INFO, &encode_info(&export));
    out.extend(option_reply(option, REP_INFO, &encode_info(&sizes)));
    out.extend(option_reply(option, REP_ACK, &[]));
    out
}

/// The server's answer to one handshake option. `NBD_OPT_INFO` and `NBD_OPT_GO` always get
/// the export and block-size info, whatever the client asked for.
pub fn handle_option(
    option: u32,
    data: &[u8],
    no_zeroes: bool,
    exports: &dyn ExportLookup,
) -> OptionOutcome {
    let cont = |reply| OptionOutcome {
        reply,
        next: Next::Continue,
    };
    match option {
        OPT_EXPORT_NAME => {
            let found = std::str::from_utf8(data)
                .ok()
                .and_then(|n| exports.lookup(n));
            match found {
                Some((name, info)) => OptionOutcome {
                    reply: export_name_reply(&info, no_zeroes),
                    next: Next::Transmit(name),
                },
                // No error reply is possible for EXPORT_NAME: the server closes.
                None => OptionOutcome {
                    reply: Vec::new(),
                    next: Next::Close,
                },
            }
        }
        OPT_ABORT => OptionOutcome {
            reply: option_reply(option, REP_ACK, &[]),
            next: Next::Close,
        },
        OPT_LIST => {
            if !data.is_empty() {
                return cont(option_reply(option, REP_ERR_INVALID, b"list takes no data"));
            }
            let mut out = Vec::new();
            for n in exports.names() {
                let mut d = Vec::with_capacity(4 + n.len());
                d.extend_from_slice(&(n.len() as u32).to_be_bytes());
                d.extend_from_slice(n.as_bytes());
                out.extend(option_reply(option, REP_SERVER, &d));
            }
            out.extend(option_reply(option, REP_ACK, &[]));
            cont(out)
        }
        OPT_INFO | OPT_GO => {
            let Ok(go) = parse_go(data) else {
                return cont(option_reply(option, REP_ERR_INVALID, b"malformed request"));
            };
            match exports.lookup(&go.name) {
                None => cont(option_reply(option, REP_ERR_UNKNOWN, b"unknown export")),
                Some((real, info)) => {
                    let reply = info_replies(option, &info);
                    if option == OPT_GO {
                        OptionOutcome {
                            reply,
                            next: Next::Transmit(real),
                        }
                    } else {
                        cont(reply)
                    }
                }
            }
        }
        OPT_STARTTLS => cont(option_reply(option, REP_ERR_POLICY, b"tls not supported")),
        _ => cont(option_reply(option, REP_ERR_UNSUP, b"unsupported option")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct One;
    impl ExportLookup for One {
        fn lookup(&self, name: &str) -> Option<(String, ExportInfo)> {
            (name == "v" || name.is_empty()).then(|| {
                (
                    "v".to_string(),
                    ExportInfo::new(1 << 20, transmission_flags(false, true), 512),
                )
            })
        }
        fn names(&self) -> Vec<String> {
            vec!["v".into()]
        }
    }

    /// Splits a stream of option replies with the client's decoders.
    fn replies(mut b: &[u8]) -> Vec<(OptionReplyHeader, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let h = parse_option_reply_header(&b[..OPTION_REPLY_HEADER_LEN]).unwrap();
            let end = OPTION_REPLY_HEADER_LEN + h.len as usize;
            out.push((h, b[OPTION_REPLY_HEADER_LEN..end].to_vec()));
            b = &b[end..];
        }
        out
    }

    #[test]
    fn greeting_round_trips_and_client_flags_follow_it() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        let hflags = parse_greeting(&g).unwrap();
        assert_eq!(hflags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        let c = client_flags(hflags).to_be_bytes();
        assert_eq!(parse_client_flags(&c), Ok(true));
        let c = client_flags(FLAG_FIXED_NEWSTYLE).to_be_bytes();
        assert_eq!(parse_client_flags(&c), Ok(false));
        // Not fixed newstyle, or unknown bits: refused.
        assert_eq!(
            parse_client_flags(&[0, 0, 0, 0]),
            Err(ProtoError::ClientFlags(0))
        );
        assert!(parse_client_flags(&[0, 0, 1, 1]).is_err());
    }

    #[test]
    fn greeting_errors() {
        let mut g = greeting();
        g[8..16].copy_from_slice(&CLISERV_MAGIC.to_be_bytes());
        assert_eq!(parse_greeting(&g), Err(ProtoError::OldStyle));
        g[0] = b'X';
        assert!(matches!(parse_greeting(&g), Err(ProtoError::BadMagic(_))));
        assert!(matches!(
            parse_greeting(b"HTTP/1.1 400 Bad"),
            Err(ProtoError::Length { got: 16, .. })
        ));
    }

    #[test]
    fn option_header_round_trip_and_limits() {
        let o = encode_option(OPT_GO, b"payload").unwrap();
        let h = parse_option_header(&o[..OPTION_HEADER_LEN]).unwrap();
        assert_eq!(
            h,
            OptionHeader {
                option: OPT_GO,
                len: 7
            }
        );
        assert_eq!(&o[OPTION_HEADER_LEN..], b"payload");
        let big = vec![0u8; MAX_OPTION_LEN as usize + 1];
        assert_eq!(
            encode_option(OPT_GO, &big),
            Err(ProtoError::OptionTooLong(MAX_OPTION_LEN + 1))
        );
        let mut h = [0u8; OPTION_HEADER_LEN];
        h.copy_from_slice(&o[..OPTION_HEADER_LEN]);
        h[12..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_option_header(&h),
            Err(ProtoError::OptionTooLong(u32::MAX))
        );
        h[0] = b'X';
        assert!(matches!(
            parse_option_header(&h),
            Err(ProtoError::BadMagic(_))
        ));
        assert!(matches!(
            parse_option_header(&o[..15]),
            Err(ProtoError::Length { got: 15, .. })
        ));
        assert!(matches!(
            parse_option_header(&o),
            Err(ProtoError::Length { .. })
        ));
    }

    #[test]
    fn option_reply_header_round_trip_and_limits() {
        let r = option_reply(OPT_GO, REP_ERR_UNKNOWN, b"nope");
        let (h, d) = &replies(&r)[0];
        assert_eq!(
            (h.option, h.reply, d.as_slice()),
            (OPT_GO, REP_ERR_UNKNOWN, &b"nope"[..])
        );
        let mut hdr = r[..OPTION_REPLY_HEADER_LEN].to_vec();
        hdr[16..20].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(
            parse_option_reply_header(&hdr),
            Err(ProtoError::OptionTooLong(_))
        ));
        assert!(parse_option_reply_header(&hdr[..19]).is_err());
        hdr[0] ^= 1;
        assert!(matches!(
            parse_option_reply_header(&hdr),
            Err(ProtoError::BadMagic(_))
        ));
    }

    #[test]
    fn info_round_trips_and_bad_lengths_fail() {
        for i in [
            Info::Export {
                size: 1 << 40,
                flags: 0x1ff,
            },
            Info::BlockSize {
                min: 512,
                preferred: 4096,
                max: 1 << 25,
            },
            Info::Other(1),
        ] {
            assert_eq!(parse_info(&encode_info(&i)), Ok(i));
        }
        let e = encode_info(&Info::Export { size: 1, flags: 1 });
        assert_eq!(
            parse_info(&e[..11]),
            Err(ProtoError::InfoLength { info: 0, len: 11 })
        );
        let mut long = e.clone();
        long.push(0);
        assert!(parse_info(&long).is_err());
        assert_eq!(parse_info(&[0]), Err(ProtoError::Truncated("NBD_REP_INFO")));
    }

    #[test]
    fn go_payload_round_trips_and_malformed_fails() {
        let p = encode_go("vol0", &[INFO_BLOCK_SIZE, INFO_EXPORT]).unwrap();
        assert_eq!(
            parse_go(&p),
            Ok(GoRequest {
                name: "vol0".into(),
                infos: vec![INFO_BLOCK_SIZE, INFO_EXPORT]
            })
        );
        // Truncated anywhere, or with a trailing byte: an error.
        for n in 0..p.len() {
            assert!(parse_go(&p[..n]).is_err(), "prefix {n}");
        }
        let mut long = p.clone();
        long.push(0);
        assert!(parse_go(&long).is_err());
        // A name length beyond the payload.
        assert!(parse_go(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
        assert_eq!(
            parse_go(&[0, 0, 0, 1, 0xff, 0, 0]),
            Err(ProtoError::NameNotUtf8)
        );
        let huge = "n".repeat(MAX_OPTION_LEN as usize);
        assert_eq!(
            encode_go(&huge, &[]),
            Err(ProtoError::NameTooLong(huge.len()))
        );
    }

    #[test]
    fn export_name_reply_round_trip() {
        let info = ExportInfo::new(3 << 20, TFLAG_HAS_FLAGS | TFLAG_READ_ONLY, 512);
        let r = export_name_reply(&info, true);
        assert_eq!(
            parse_export_name_reply(&r),
            Ok((3 << 20, TFLAG_HAS_FLAGS | TFLAG_READ_ONLY))
        );
        let r = export_name_reply(&info, false);
        assert_eq!(r.len(), EXPORT_NAME_REPLY_LEN + 124);
        assert!(r[EXPORT_NAME_REPLY_LEN..].iter().all(|b| *b == 0));
        assert!(parse_export_name_reply(&r).is_err());
        assert!(parse_export_name_reply(&r[..9]).is_err());
    }

    #[test]
    fn block_sizes_are_checked() {
        assert_eq!(ExportInfo::new(0, 0, 512).check_block_sizes(), Ok(()));
        assert_eq!(
            ExportInfo::with_default_sizes(0, 0).check_block_sizes(),
            Ok(())
        );
        let mut i = ExportInfo::new(0, 0, 512);
        i.min_block = 3;
        assert!(i.check_block_sizes().is_err());
        i.min_block = 1 << 17;
        assert!(i.check_block_sizes().is_err());
        i.min_block = 4096;
        i.max_payload = 512;
        assert!(i.check_block_sizes().is_err());
    }

    #[test]
    fn go_sends_export_and_block_size_info_then_transmits() {
        let p = encode_go("v", &[INFO_BLOCK_SIZE]).unwrap();
        let o = handle_option(OPT_GO, &p, true, &One);
        assert_eq!(o.next, Next::Transmit("v".into()));
        let r = replies(&o.reply);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].0.reply, REP_INFO);
        assert_eq!(
            parse_info(&r[0].1),
            Ok(Info::Export {
                size: 1 << 20,
                flags: transmission_flags(false, true)
            })
        );
        assert_eq!(
            parse_info(&r[1].1),
            Ok(Info::BlockSize {
                min: 512,
                preferred: 4096,
                max: MAX_PAYLOAD
            })
        );
        assert_eq!(r[2].0.reply, REP_ACK);
        // The default export "" resolves too.
        let o = handle_option(OPT_GO, &encode_go("", &[]).unwrap(), true, &One);
        assert_eq!(o.next, Next::Transmit("v".into()));
    }

    #[test]
    fn info_unknown_list_abort_and_unsupported() {
        let o = handle_option(OPT_INFO, &encode_go("v", &[]).unwrap(), true, &One);
        assert_eq!(o.next, Next::Continue);
        let o = handle_option(OPT_GO, &encode_go("nope", &[]).unwrap(), true, &One);
        assert_eq!(o.next, Next::Continue);
        assert_eq!(replies(&o.reply)[0].0.reply, REP_ERR_UNKNOWN);
        let o = handle_option(OPT_GO, &[0, 0, 0, 9, b'a'], true, &One);
        assert_eq!(replies(&o.reply)[0].0.reply, REP_ERR_INVALID);
        let o = handle_option(OPT_LIST, &[], true, &One);
        let r = replies(&o.reply);
        assert_eq!(r[0].0.reply, REP_SERVER);
        assert_eq!(&r[0].1[4..], b"v");
        assert_eq!(r[1].0.reply, REP_ACK);
        let o = handle_option(OPT_LIST, b"x", true, &One);
        assert_eq!(replies(&o.reply)[0].0.reply, REP_ERR_INVALID);
        let o = handle_option(OPT_ABORT, &[], true, &One);
        assert_eq!(o.next, Next::Close);
        let o = handle_option(99, &[], true, &One);
        assert_eq!(replies(&o.reply)[0].0.reply, REP_ERR_UNSUP);
        let o = handle_option(OPT_STARTTLS, &[], true, &One);
        assert_eq!(replies(&o.reply)[0].0.reply, REP_ERR_POLICY);
    }

    #[test]
    fn export_name_option_with_and_without_zeroes() {
        let o = handle_option(OPT_EXPORT_NAME, b"v", false, &One);
        assert_eq!(o.next, Next::Transmit("v".into()));
        assert_eq!(o.reply.len(), 134);
        let o = handle_option(OPT_EXPORT_NAME, b"v", true, &One);
        assert_eq!(parse_export_name_reply(&o.reply).unwrap().0, 1 << 20);
        let o = handle_option(OPT_EXPORT_NAME, b"x", true, &One);
        assert_eq!(o.next, Next::Close);
        assert!(o.reply.is_empty());
    }

    #[test]
    fn read_only_exports_advertise_no_writes() {
        let f = transmission_flags(true, true);
        assert_ne!(f & TFLAG_READ_ONLY, 0);
        assert_eq!(
            f & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FUA),
            0
        );
        let f = transmission_flags(false, false);
        assert_eq!(f & TFLAG_SEND_TRIM, 0);
        assert_ne!(f & TFLAG_SEND_WRITE_ZEROES, 0);
    }
}
