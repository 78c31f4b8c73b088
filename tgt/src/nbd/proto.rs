//! The NBD wire protocol (newstyle fixed handshake and simple replies), as pure functions over
//! byte slices: nothing here does I/O, so a fuzz target can drive it directly.
//!
//! Reference: the NBD protocol document (`doc/proto.md` of the nbd project).

/// `NBDMAGIC`.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no zero padding after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 2;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Read-only export.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Flush supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// FUA supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Trim supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Write zeroes supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Several connections see the same data (flush covers all of them).
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort the handshake.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// TLS (not supported).
pub const OPT_STARTTLS: u32 = 5;
/// Export info.
pub const OPT_INFO: u32 = 6;
/// Export info, then transmission.
pub const OPT_GO: u32 = 7;

/// Option reply: acknowledged.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: info.
pub const REP_INFO: u32 = 3;
/// Error bit of option replies.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Unsupported option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Malformed option.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Unknown export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

/// Info type: export size and flags.
pub const INFO_EXPORT: u16 = 0;
/// Info type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1;

/// Errors in replies (NBD's fixed errno values).
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Out of memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space (write past the end).
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Not supported.
pub const ENOTSUP: u32 = 95;
/// Server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// The largest payload we accept or serve in one request (32 MiB).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// The longest option payload we accept.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Length of a request header.
pub const REQUEST_LEN: usize = 28;

/// A protocol violation that ends the connection.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Wrong magic number.
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// The client does not speak fixed newstyle, or sent unknown flags.
    #[error("unsupported client flags {0:#x}")]
    ClientFlags(u32),
    /// An option longer than we accept.
    #[error("option too long ({0} bytes)")]
    OptionTooLong(u32),
}

/// The server's first message: magic, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Parses the client flags; returns whether the client asked for no zero padding.
pub fn parse_client_flags(b: [u8; 4]) -> Result<bool, ProtoError> {
    let f = u32::from_be_bytes(b);
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
    /// Payload length.
    pub len: u32,
}

/// Parses a 16-byte option header.
pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, ProtoError> {
    let magic = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    let option = u32::from_be_bytes(b[8..12].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(b[12..16].try_into().unwrap_or_default());
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLong(len));
    }
    Ok(OptionHeader { option, len })
}

/// An option reply.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// What the handshake knows of one export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Block size of the device (minimum I/O size we advertise).
    pub block_size: u32,
}

/// What the connection does after an option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Send the bytes, read the next option.
    Continue,
    /// Send the bytes, then start transmission on this export.
    Transmit(String),
    /// Send the bytes, then close.
    Close,
}

/// The result of one option: bytes to send and what comes next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionOutcome {
    /// Bytes to send.
    pub reply: Vec<u8>,
    /// Next step.
    pub next: Next,
}

/// The exports a handshake can see.
pub trait ExportLookup {
    /// Resolves an export name (`""` is the default export).
    fn lookup(&self, name: &str) -> Option<(String, ExportInfo)>;
    /// Names of every export.
    fn names(&self) -> Vec<String>;
}

/// Transmission flags for an export.
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

/// The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES.
pub fn export_name_reply(info: &ExportInfo, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&info.size.to_be_bytes());
    b.extend_from_slice(&info.flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

fn info_replies(option: u32, info: &ExportInfo) -> Vec<u8> {
    let mut out = Vec::new();
    let mut export = Vec::with_capacity(12);
    export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    export.extend_from_slice(&info.size.to_be_bytes());
    export.extend_from_slice(&info.flags.to_be_bytes());
    out.extend(option_reply(option, REP_INFO, &export));
    let mut bs = Vec::with_capacity(14);
    bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    bs.extend_from_slice(&info.block_size.to_be_bytes());
    bs.extend_from_slice(&info.block_size.max(4096).to_be_bytes());
    bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    out.extend(option_reply(option, REP_INFO, &bs));
    out.extend(option_reply(option, REP_ACK, &[]));
    out
}

/// Parses the payload of NBD_OPT_INFO / NBD_OPT_GO: the export name (the info requests that
/// follow are ignored: we always send export and block-size info).
pub fn parse_go(data: &[u8]) -> Option<String> {
    if data.len() < 6 {
        return None;
    }
    let nlen = u32::from_be_bytes(data[..4].try_into().ok()?) as usize;
    let rest = &data[4..];
    if nlen > rest.len().saturating_sub(2) {
        return None;
    }
    let name = std::str::from_utf8(&rest[..nlen]).ok()?.to_string();
    let nreq = u16::from_be_bytes(rest[nlen..nlen + 2].try_into().ok()?) as usize;
    if rest.len() != nlen + 2 + 2 * nreq {
        return None;
    }
    Some(name)
}

/// Handles one option of the handshake.
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
            let Some(name) = parse_go(data) else {
                return cont(option_reply(option, REP_ERR_INVALID, b"malformed request"));
            };
            match exports.lookup(&name) {
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

/// A transmission request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub cmd: u16,
    /// Cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

/// Parses a 28-byte request header.
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(magic as u64));
    }
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_be_bytes(a)
    };
    Ok(Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        cmd: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64_at(8),
        offset: u64_at(16),
        len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
    })
}

/// Encodes a request header (used by tests and clients).
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

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Whether the request carries a payload the server must read (only WRITE does).
pub fn has_payload(r: &Request) -> bool {
    r.cmd == CMD_WRITE
}

/// Checks a request against the export; `Err` is the NBD error to reply with.
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
    match r.offset.checked_add(r.len as u64) {
        Some(end) if end <= size => Ok(()),
        _ if writes => Err(ENOSPC),
        _ => Err(EINVAL),
    }
}

/// Maps an errno from the device to the NBD error set.
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EBADF | libc::EROFS => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ENODEV | libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
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
                    ExportInfo {
                        size: 1 << 20,
                        flags: transmission_flags(false, true),
                        block_size: 512,
                    },
                )
            })
        }
        fn names(&self) -> Vec<String> {
            vec!["v".into()]
        }
    }

    fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Splits a stream of option replies into (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(
                u64::from_be_bytes(b[..8].try_into().unwrap()),
                OPT_REPLY_MAGIC
            );
            let opt = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let ty = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            out.push((opt, ty, b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        out
    }

    #[test]
    fn greeting_and_client_flags() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        assert_eq!(parse_client_flags([0, 0, 0, 3]), Ok(true));
        assert_eq!(parse_client_flags([0, 0, 0, 1]), Ok(false));
        assert!(parse_client_flags([0, 0, 0, 0]).is_err());
        assert!(parse_client_flags([0, 0, 1, 1]).is_err());
    }

    #[test]
    fn option_header() {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(b"IHAVEOPT");
        h[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        h[12..].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&h),
            Ok(OptionHeader {
                option: OPT_GO,
                len: 7
            })
        );
        h[12..].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(
            parse_option_header(&h),
            Err(ProtoError::OptionTooLong(_))
        ));
        h[0] = b'X';
        assert!(matches!(
            parse_option_header(&h),
            Err(ProtoError::BadMagic(_))
        ));
    }

    #[test]
    fn go_sends_export_and_block_size_info_then_transmits() {
        let o = handle_option(OPT_GO, &go_payload("v", &[INFO_BLOCK_SIZE]), true, &One);
        assert_eq!(o.next, Next::Transmit("v".into()));
        let r = replies(&o.reply);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].1, r[0].2.len()), (REP_INFO, 12));
        assert_eq!(
            u64::from_be_bytes(r[0].2[2..10].try_into().unwrap()),
            1 << 20
        );
        assert_eq!((r[1].1, r[1].2.len()), (REP_INFO, 14));
        assert_eq!(u32::from_be_bytes(r[1].2[2..6].try_into().unwrap()), 512);
        assert_eq!(r[2].1, REP_ACK);
        // The default export "" resolves too.
        let o = handle_option(OPT_GO, &go_payload("", &[]), true, &One);
        assert_eq!(o.next, Next::Transmit("v".into()));
    }

    #[test]
    fn info_unknown_list_abort_and_unsupported() {
        let o = handle_option(OPT_INFO, &go_payload("v", &[]), true, &One);
        assert_eq!(o.next, Next::Continue);
        let o = handle_option(OPT_GO, &go_payload("nope", &[]), true, &One);
        assert_eq!(
            (o.next, replies(&o.reply)[0].1),
            (Next::Continue, REP_ERR_UNKNOWN)
        );
        let o = handle_option(OPT_GO, &[0, 0, 0, 9, b'a'], true, &One);
        assert_eq!(replies(&o.reply)[0].1, REP_ERR_INVALID);
        let o = handle_option(OPT_LIST, &[], true, &One);
        let r = replies(&o.reply);
        assert_eq!(r[0].1, REP_SERVER);
        assert_eq!(&r[0].2[4..], b"v");
        assert_eq!(r[1].1, REP_ACK);
        let o = handle_option(OPT_ABORT, &[], true, &One);
        assert_eq!(o.next, Next::Close);
        let o = handle_option(99, &[], true, &One);
        assert_eq!(replies(&o.reply)[0].1, REP_ERR_UNSUP);
        let o = handle_option(OPT_STARTTLS, &[], true, &One);
        assert_eq!(replies(&o.reply)[0].1, REP_ERR_POLICY);
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        let o = handle_option(OPT_EXPORT_NAME, b"v", false, &One);
        assert_eq!(o.next, Next::Transmit("v".into()));
        assert_eq!(o.reply.len(), 134);
        let o = handle_option(OPT_EXPORT_NAME, b"v", true, &One);
        assert_eq!(o.reply.len(), 10);
        let o = handle_option(OPT_EXPORT_NAME, b"x", true, &One);
        assert_eq!(o.next, Next::Close);
    }

    #[test]
    fn requests_round_trip_and_are_checked() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            cmd: CMD_WRITE,
            cookie: 0xdead_beef,
            offset: 4096,
            len: 512,
        };
        assert_eq!(parse_request(&encode_request(&r)), Ok(r));
        let mut bad = encode_request(&r);
        bad[0] = 0;
        assert!(parse_request(&bad).is_err());
        assert_eq!(check_request(&r, 8192, false), Ok(()));
        assert_eq!(check_request(&r, 8192, true), Err(EPERM));
        assert_eq!(check_request(&r, 4096, false), Err(ENOSPC));
        let rd = Request { cmd: CMD_READ, ..r };
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
        assert_eq!(
            check_request(
                &Request {
                    cmd: CMD_FLUSH,
                    ..r
                },
                0,
                true
            ),
            Ok(())
        );
        assert_eq!(simple_reply(1, 7)[4..8], [0, 0, 0, 1]);
    }
}
