//! Fuzz drivers: each takes arbitrary bytes and pushes them through a parser of the target
//! exactly as the server does, checking the properties that must hold for any input (no
//! panic, progress on every frame, bounded buffering).

use serde_json::Value;
use tgt::jsonrpc::{self, Frame, StreamParser};
use tgt::nbd::proto::{self, ExportInfo, ExportLookup, Next};

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
            ExportInfo {
                size: 1 << 20,
                flags: proto::transmission_flags(ro, true),
                block_size: 512,
            },
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
}

/// Plays `data` as everything a client sends to the NBD server: client flags, options
/// (header + payload) until an export is chosen, then request headers and write payloads.
/// Mirrors the server's loop in `tgt::nbd::server` with the pure functions of
/// `tgt::nbd::proto`; a write payload is only "allocated" after the length checks the server
/// applies, so no input makes it allocate more than `MAX_PAYLOAD`; an oversized write is
/// skipped with an `EOVERFLOW` reply, as the server does.
pub fn nbd_session(data: &[u8]) -> NbdOutcome {
    let mut out = NbdOutcome::default();
    let mut inp = Input(data);
    let Some(f) = inp.take(4) else { return out };
    let Ok(no_zeroes) = proto::parse_client_flags([f[0], f[1], f[2], f[3]]) else {
        return out;
    };
    let export = loop {
        let Some(h) = inp.take(16) else { return out };
        let mut hdr = [0u8; 16];
        hdr.copy_from_slice(h);
        let Ok(h) = proto::parse_option_header(&hdr) else {
            return out;
        };
        assert!(h.len <= proto::MAX_OPTION_LEN);
        let Some(payload) = inp.take(h.len as usize) else {
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
        let mut hdr = [0u8; proto::REQUEST_LEN];
        hdr.copy_from_slice(h);
        let Ok(req) = proto::parse_request(&hdr) else {
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
