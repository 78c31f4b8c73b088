//! nbd-proto: the NBD wire format, written once for both ends.
//!
//! Owns the protocol constants, the codecs of the fixed-newstyle handshake (greeting, client
//! flags, options, option replies, `NBD_INFO_*` payloads, the `NBD_OPT_EXPORT_NAME` reply), of
//! transmission requests and simple replies, the request checks a server applies, the
//! server's answer to each handshake option ([`handle_option`]) and the mapping between host
//! errnos and NBD error values in both directions.
//!
//! Nothing here does I/O: every function takes and returns bytes, so the client (`bdev-nbd`),
//! the server (`tgt`'s NBD export) and the fuzz drivers (`reliability::fuzz`) share one
//! implementation. Every decoder checks its input's length: a truncated or oversized input
//! is a [`ProtoError`], never a panic or an allocation sized by the peer.
//!
//! Everything on the wire is big-endian. Reference: the NBD protocol document (`doc/proto.md`
//! of the nbd project). Structured replies are never negotiated.

mod errno;
mod handshake;
mod transmission;

pub use errno::{errno_to_nbd, nbd_to_errno, option_error};
pub use handshake::{
    client_flags, encode_go, encode_info, encode_option, export_name_reply, greeting,
    handle_option, option_reply, parse_client_flags, parse_export_name_reply, parse_go,
    parse_greeting, parse_info, parse_option_header, parse_option_reply_header, transmission_flags,
    ExportInfo, ExportLookup, GoRequest, Info, Next, OptionHeader, OptionOutcome,
    OptionReplyHeader,
};
pub use transmission::{
    check_request, encode_request, has_payload, parse_reply, parse_request, simple_reply, Cmd,
    Reply, Request,
};

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle magic (after `NBDMAGIC`), which neither end here speaks.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of option replies.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks (only legal after `NBD_OPT_STRUCTURED_REPLY`).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no zero padding after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: the flags field is valid (always set).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: several connections see the same data (a flush covers all of them).
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose an export, old form (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: TLS (not supported).
pub const OPT_STARTTLS: u32 = 5;
/// Option: export info.
pub const OPT_INFO: u32 = 6;
/// Option: export info, then transmission.
pub const OPT_GO: u32 = 7;

/// Option reply: acknowledged.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: an `NBD_INFO_*` payload.
pub const REP_INFO: u32 = 3;
/// Error bit of option replies.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option reply error: unsupported option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option reply error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option reply error: malformed option.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option reply error: not supported on the server's platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Option reply error: TLS required.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option reply error: unknown export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option reply error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Option reply error: block size negotiation required.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option reply error: request too big.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Info type: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (the payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim.
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1;

/// NBD error value: operation not permitted.
pub const EPERM: u32 = 1;
/// NBD error value: I/O error.
pub const EIO: u32 = 5;
/// NBD error value: out of memory.
pub const ENOMEM: u32 = 12;
/// NBD error value: invalid argument.
pub const EINVAL: u32 = 22;
/// NBD error value: no space (a write past the end).
pub const ENOSPC: u32 = 28;
/// NBD error value: value too large.
pub const EOVERFLOW: u32 = 75;
/// NBD error value: not supported.
pub const ENOTSUP: u32 = 95;
/// NBD error value: the server is shutting down; the client must disconnect.
pub const ESHUTDOWN: u32 = 108;

/// The largest read or write payload we accept or serve in one request (32 MiB).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// The longest option payload (sent or received) we accept.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Length of the server's greeting.
pub const GREETING_LEN: usize = 18;
/// Length of an option header (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of the `NBD_OPT_EXPORT_NAME` reply without its 124 bytes of zero padding.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const REPLY_LEN: usize = 16;

/// A protocol violation: input that no correct peer sends. Each ends the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A fixed-size message of the wrong length (truncated or with trailing bytes).
    #[error("{what}: {got} bytes, expected {expected}")]
    Length {
        /// The message.
        what: &'static str,
        /// Its length on the wire.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// A variable-size message shorter than its own fields say.
    #[error("{0} truncated")]
    Truncated(&'static str),
    /// Wrong magic number.
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// The server speaks only the oldstyle handshake.
    #[error("server speaks the oldstyle handshake only")]
    OldStyle,
    /// The client does not speak fixed newstyle, or sent unknown flags.
    #[error("unsupported client flags {0:#x}")]
    ClientFlags(u32),
    /// An option (or option reply) longer than we accept.
    #[error("option too long ({0} bytes)")]
    OptionTooLong(u32),
    /// A name longer than an option can carry.
    #[error("name too long ({0} bytes)")]
    NameTooLong(usize),
    /// A name that is not UTF-8.
    #[error("name is not utf-8")]
    NameNotUtf8,
    /// An `NBD_INFO_*` payload whose length does not fit its type.
    #[error("NBD_INFO type {info} of bad length {len}")]
    InfoLength {
        /// Info type.
        info: u16,
        /// Payload length (with the type).
        len: usize,
    },
    /// Block sizes that break the protocol's rules.
    #[error("bad block sizes: minimum {min}, preferred {preferred}, maximum payload {max}")]
    BlockSizes {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload.
        max: u32,
    },
    /// A structured reply although none was negotiated.
    #[error("structured reply although none was negotiated")]
    StructuredReply,
}

/// Checks that a fixed-size message has exactly its length.
fn exact<'a>(what: &'static str, b: &'a [u8], expected: usize) -> Result<&'a [u8], ProtoError> {
    if b.len() != expected {
        return Err(ProtoError::Length {
            what,
            expected,
            got: b.len(),
        });
    }
    Ok(b)
}

/// Big-endian field readers over a slice whose length the caller checked.
fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}
