//! Fuzz drivers: each takes arbitrary bytes and pushes them through a parser exactly as the
//! server (or, for [`nbd_client_session`], the NBD client) does, checking the properties that
//! must hold for any input (no panic, progress on every frame, bounded buffering).

use nbd_proto::{self as proto, ExportInfo, ExportLookup, Next};
use serde_json::Value;
use tgt::jsonrpc::{self, Frame, StreamParser};

/// Size limit used by the JSON-RPC driver, small so the fuzzer reaches the too-large path.
pub const FUZZ_RPC_LIMIT: usize = 64 * 1024;

/// What one driver run saw (for replay tests that want to assert on the outcome).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RpcOutcome {
    /// Complete JSON values found.
    pub values: usize,
    /// Values that were valid JSON-RPC requests.
    pub requests: usize,
    /// The stream ended in a parse error.
    pub parse_error: bool,
    /// The stream ended in a too-large error.
    pub too_large: bool,
}

/// Feeds `data` to the JSON-RPC stream parser in chunks whose sizes are derived from the
/// first byte, then checks every value with [`jsonrpc::parse_request`] (each element of a
/// batch too) and encodes an answer, as the server does.
pub fn jsonrpc_stream(data: &[u8]) -> RpcOutcome {
    let (chunk, body) = match data.split_first() {
        Some((c, rest)) => (usize::from(*c % 64) + 1, rest),
        None => (1, data),
    };
    let mut p = StreamParser::with_limit(FUZZ_RPC_LIMIT);
    let mut out = RpcOutcome::default();
    for piece in body.chunks(chunk) {
        p.push(piece);
        loop {
            let before = p.buffered();
            match p.next_frame() {
                Frame::Value(v) => {
                    // Every value consumes at least one byte: no endless loop.
                    assert!(p.buffered() < before, "value without progress");
                    out.values += 1;
                    out.requests += answer(v);
                }
                Frame::NeedMore => {
                    // Never buffers more than the limit plus one chunk.
                    assert!(p.buffered() <= FUZZ_RPC_LIMIT + chunk, "unbounded buffer");
                    break;
                }
                Frame::ParseError => {
                    let _ = jsonrpc::encode(&jsonrpc::parse_error_response());
                    out.parse_error = true;
                    return out;
                }
                Frame::TooLarge => {
                    let _ = jsonrpc::encode(&jsonrpc::too_large_response());
                    out.too_large = true;
                    return out;
                }
            }
        }
    }
    out
}

fn answer(v: Value) -> usize {
    let items = match v {
        Value::Array(items) => items,
        v => vec![v],
    };
    let mut ok = 0;
    for item in items {
        let resp = match jsonrpc::parse_request(item) {
            Ok(r) => {
                ok += 1;
                jsonrpc::response_ok(r.id.unwrap_or(Value::Null), Value::Bool(true))
            }
            Err((id, e)) => {
                // The id echoed is only ever a string, a number or null.
                assert!(matches!(
                    id,
                    Value::Null | Value::String(_) | Value::Number(_)
                ));
                jsonrpc::response_err(id, &e)
            }
        };
        let bytes = jsonrpc::encode(&resp);
        assert_eq!(bytes.last(), Some(&b'\n'));
    }
    ok
}

/// What one NBD session run saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NbdOutcome {
    /// Options handled in the handshake.
    pub options: usize,
    /// The session reached transmission.
    pub transmitting: bool,
    /// Requests parsed in transmission.
    pub requests: usize,
    /// Requests the checks accepted.
    pub accepted: usize,
}

struct Exports;

impl ExportLookup for Exports {
    fn lookup(&self, name: &str) -> Option<(String, ExportInfo)> {
        let (real, ro) = match name {
            "" | "vol0" => ("vol0", false),
            "ro" => ("ro", true),
            _ => return None,
        };
        Some((
            real.to_string(),
            ExportInfo::new(1 << 20, proto::transmission_flags(ro, true), 512),
        ))
    }
    fn names(&self) -> Vec<String> {
        vec!["vol0".into(), "ro".into()]
    }
}

/// A cursor over the fuzz input playing the client's side of the socket.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    /// One option frame, sent or replied: a `header_len`-byte header that `parse` accepts,
    /// then the payload of `len(&header)` bytes, which the parser already bounded by
    /// `MAX_OPTION_LEN`. `None` when the input runs out or the header is malformed.
    fn option_frame<H>(
        &mut self,
        header_len: usize,
        parse: impl FnOnce(&[u8]) -> Result<H, proto::ProtoError>,
        len: impl FnOnce(&H) -> u32,
    ) -> Option<(H, &'a [u8])> {
        let h = parse(self.take(header_len)?).ok()?;
        let n = len(&h);
        assert!(n <= proto::MAX_OPTION_LEN);
        Some((h, self.take(n as usize)?))
    }
}

/// Plays `data` as everything a client sends to the NBD server: client flags, options
/// (header + payload) until an export is chosen, then request headers and write payloads.
/// Mirrors the server's loop in `tgt::nbd::server` with the pure functions of
/// `nbd_proto`; a write payload is only "allocated" after the length checks the server
/// applies, so no input makes it allocate more than `MAX_PAYLOAD`; an oversized write is
/// skipped with an `EOVERFLOW` reply, as the server does.
pub fn nbd_session(data: &[u8]) -> NbdOutcome {
    let mut out = NbdOutcome::default();
    let mut inp = Input(data);
    let Some(f) = inp.take(4) else { return out };
    let Ok(no_zeroes) = proto::parse_client_flags(f) else {
        return out;
    };
    let export = loop {
        let frame = inp.option_frame(proto::OPTION_HEADER_LEN, proto::parse_option_header, |h| {
            h.len
        });
        let Some((h, payload)) = frame else {
            return out;
        };
        out.options += 1;
        let o = proto::handle_option(h.option, payload, no_zeroes, &Exports);
        match o.next {
            Next::Continue => assert!(!o.reply.is_empty(), "option without a reply"),
            Next::Close => return out,
            Next::Transmit(name) => break name,
        }
    };
    out.transmitting = true;
    let (_, info) = Exports.lookup(&export).expect("transmit to a known export");
    let ro = info.flags & proto::TFLAG_READ_ONLY != 0;
    loop {
        let Some(h) = inp.take(proto::REQUEST_LEN) else {
            return out;
        };
        let Ok(req) = proto::parse_request(h) else {
            return out;
        };
        out.requests += 1;
        assert_eq!(proto::parse_request(&proto::encode_request(&req)), Ok(req));
        if req.cmd == proto::CMD_DISC {
            return out;
        }
        if proto::has_payload(&req) {
            // The payload is consumed (an oversized one streamed and discarded, never
            // allocated) before the request is judged.
            if inp.take(req.len as usize).is_none() {
                return out;
            }
            if req.len > proto::MAX_PAYLOAD {
                // The server answers EOVERFLOW and goes on with the next request.
                let r = proto::simple_reply(proto::EOVERFLOW, req.cookie);
                assert_eq!(&r[8..], &req.cookie.to_be_bytes());
                continue;
            }
        }
        match proto::check_request(&req, info.size, ro) {
            Ok(()) => {
                out.accepted += 1;
                // An accepted data request lies inside the export.
                if req.cmd != proto::CMD_FLUSH {
                    assert!(req.offset + u64::from(req.len) <= info.size);
                }
            }
            Err(e) => {
                let r = proto::simple_reply(e, req.cookie);
                assert_eq!(&r[8..], &req.cookie.to_be_bytes());
            }
        }
    }
}

/// What one NBD client run saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NbdClientOutcome {
    /// Option replies decoded in the handshake.
    pub option_replies: usize,
    /// The handshake reached `NBD_REP_ACK` with a valid export.
    pub transmitting: bool,
    /// Simple replies decoded in transmission.
    pub replies: usize,
}

/// Plays `data` as everything a server sends to the NBD client (`bdev-nbd`): the greeting,
/// option replies to `NBD_OPT_GO` until `NBD_REP_ACK`, then simple replies, each decoded with
/// the `nbd_proto` functions the client uses. No reply length makes it allocate more than
/// `MAX_OPTION_LEN` (the header decoder refuses longer ones first).
pub fn nbd_client_session(data: &[u8]) -> NbdClientOutcome {
    let mut out = NbdClientOutcome::default();
    let mut inp = Input(data);
    let Some(g) = inp.take(proto::GREETING_LEN) else {
        return out;
    };
    let Ok(hflags) = proto::parse_greeting(g) else {
        return out;
    };
    if proto::client_flags(hflags) & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
        return out;
    }
    let mut export = None;
    let mut sizes = None;
    loop {
        let frame = inp.option_frame(
            proto::OPTION_REPLY_HEADER_LEN,
            proto::parse_option_reply_header,
            |h| h.len,
        );
        let Some((h, payload)) = frame else {
            return out;
        };
        out.option_replies += 1;
        match h.reply {
            proto::REP_INFO => match proto::parse_info(payload) {
                Ok(proto::Info::Export { size, flags }) => export = Some((size, flags)),
                Ok(proto::Info::BlockSize {
                    min,
                    preferred,
                    max,
                }) => sizes = Some((min, preferred, max)),
                Ok(proto::Info::Other(_)) => {}
                Err(_) => return out,
            },
            proto::REP_ACK => {
                let Some((size, flags)) = export else {
                    return out;
                };
                let mut info = ExportInfo::with_default_sizes(size, flags);
                if let Some((min, pref, max)) = sizes {
                    (info.min_block, info.pref_block, info.max_payload) = (min, pref, max);
                }
                if info.check_block_sizes().is_err() {
                    return out;
                }
                // What the check accepts is usable: powers of two, a payload of a block.
                assert!(info.min_block.is_power_of_two() && info.max_payload >= info.min_block);
                break;
            }
            r => {
                // An error reply maps to an errno; anything else ends the handshake.
                if r & proto::REP_FLAG_ERROR != 0 {
                    assert!(proto::option_error(r).0 > 0);
                }
                return out;
            }
        }
    }
    out.transmitting = true;
    while let Some(h) = inp.take(proto::REPLY_LEN) {
        let Ok(r) = proto::parse_reply(h) else {
            return out;
        };
        out.replies += 1;
        assert_eq!(proto::simple_reply(r.error, r.cookie), h);
        if r.error != 0 {
            assert!(proto::nbd_to_errno(r.error) > 0);
        }
    }
    out
}
