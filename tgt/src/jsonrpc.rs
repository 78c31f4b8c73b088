//! JSON-RPC 2.0 framing as SPDK's `lib/jsonrpc` does it: requests are concatenated JSON values
//! with no length prefix, each response is one JSON object followed by `\n`.
//!
//! Everything here is pure (no sockets): [`StreamParser`] turns received bytes into JSON values,
//! [`parse_request`] checks one value against the JSON-RPC rules, and [`response_ok`] /
//! [`response_err`] build the answers. The socket loop lives in [`crate::server`].

use bdev_core::rpc::{RpcError, INVALID_REQUEST, PARSE_ERROR};
use serde_json::{json, Value};

/// The largest request the server buffers (SPDK's receive buffer limit is 32 MiB).
pub const MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;

/// What the stream parser found.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// One complete JSON value.
    Value(Value),
    /// The buffer holds an incomplete value; read more.
    NeedMore,
    /// The bytes are not JSON; answer -32700 and close the connection.
    ParseError,
    /// The pending request exceeds [`MAX_REQUEST_BYTES`]; answer and close.
    TooLarge,
}

/// Incremental parser over a growing receive buffer.
#[derive(Debug, Default)]
pub struct StreamParser {
    buf: Vec<u8>,
    /// Buffer length at the last attempt that ended in an incomplete value; a large incomplete
    /// request is only re-parsed when it doubled or a closing bracket arrived, so a slowly
    /// arriving 32 MiB request does not cost quadratic time.
    incomplete_len: usize,
    limit: usize,
}

impl StreamParser {
    /// A parser with the default size limit.
    pub fn new() -> Self {
        Self::with_limit(MAX_REQUEST_BYTES)
    }

    /// A parser with an explicit size limit (tests).
    pub fn with_limit(limit: usize) -> Self {
        StreamParser {
            buf: Vec::new(),
            incomplete_len: 0,
            limit,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        let big = self.buf.len() > 1024 * 1024;
        let closes = data.iter().any(|&b| b == b'}' || b == b']');
        self.buf.extend_from_slice(data);
        if !big || closes || self.buf.len() >= 2 * self.incomplete_len {
            self.incomplete_len = 0;
        }
    }

    /// Bytes buffered and not yet returned as values.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next complete value, if any.
    pub fn next_frame(&mut self) -> Frame {
        let start = self
            .buf
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.buf.len());
        if start > 0 {
            self.buf.drain(..start);
        }
        if self.buf.is_empty() {
            return Frame::NeedMore;
        }
        if self.incomplete_len != 0 && self.buf.len() <= self.limit {
            return Frame::NeedMore;
        }
        let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
        match it.next() {
            Some(Ok(v)) => {
                let used = it.byte_offset();
                self.buf.drain(..used);
                self.incomplete_len = 0;
                Frame::Value(v)
            }
            Some(Err(e)) if e.is_eof() => {
                if self.buf.len() > self.limit {
                    Frame::TooLarge
                } else {
                    self.incomplete_len = self.buf.len();
                    Frame::NeedMore
                }
            }
            Some(Err(_)) => Frame::ParseError,
            None => Frame::NeedMore,
        }
    }
}

/// One validated request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Method name.
    pub method: String,
    /// The `params` member, if present and not null.
    pub params: Option<Value>,
    /// The id; `None` for a notification (no id, or `"id": null`).
    pub id: Option<Value>,
}

/// Checks one JSON value against the JSON-RPC 2.0 request rules as SPDK applies them.
/// On failure returns the id to answer with (null when unknown) and the error.
pub fn parse_request(v: Value) -> Result<Request, (Value, RpcError)> {
    let invalid = |id: Value| (id, RpcError::new(INVALID_REQUEST, "Invalid request"));
    let Value::Object(mut obj) = v else {
        return Err(invalid(Value::Null));
    };
    let id = match obj.remove("id") {
        None | Some(Value::Null) => None,
        Some(id @ (Value::String(_) | Value::Number(_))) => Some(id),
        Some(_) => return Err(invalid(Value::Null)),
    };
    let id_or_null = id.clone().unwrap_or(Value::Null);
    match obj.get("jsonrpc") {
        None => {}
        Some(Value::String(s)) if s == "2.0" => {}
        Some(_) => return Err(invalid(id_or_null)),
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => return Err(invalid(id_or_null)),
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => None,
        Some(p @ (Value::Object(_) | Value::Array(_))) => Some(p),
        Some(_) => return Err(invalid(id_or_null)),
    };
    Ok(Request { method, params, id })
}

/// A success response object.
pub fn response_ok(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// An error response object.
pub fn response_err(id: Value, err: &RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": err.code, "message": err.message}})
}

/// The -32700 answer to bytes that are not JSON.
pub fn parse_error_response() -> Value {
    response_err(Value::Null, &RpcError::new(PARSE_ERROR, "Parse error"))
}

/// The answer to a request over [`MAX_REQUEST_BYTES`]: SPDK counts a request that is too
/// long as a parse error (`doc/jsonrpc.md`).
pub fn too_large_response() -> Value {
    response_err(
        Value::Null,
        &RpcError::new(PARSE_ERROR, "Request too large"),
    )
}

/// Serialises a response as it goes on the wire: the object, then `\n`.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(p: &mut StreamParser) -> Vec<Frame> {
        let mut out = Vec::new();
        loop {
            match p.next_frame() {
                Frame::NeedMore => return out,
                f => {
                    let stop = !matches!(f, Frame::Value(_));
                    out.push(f);
                    if stop {
                        return out;
                    }
                }
            }
        }
    }

    #[test]
    fn concatenated_values_without_separators() {
        let mut p = StreamParser::new();
        p.push(br#"{"method":"a","id":1}{"method":"b","id":2} {"method":"c"}"#);
        let f = frames(&mut p);
        assert_eq!(f.len(), 3);
        assert_eq!(f[1], Frame::Value(json!({"method":"b","id":2})));
        assert_eq!(p.buffered(), 0);
    }

    #[test]
    fn partial_input_waits_for_the_rest() {
        let mut p = StreamParser::new();
        let req = br#"{"jsonrpc":"2.0","method":"spdk_get_version","id":7}"#;
        for chunk in req.chunks(5) {
            assert!(frames(&mut p).is_empty());
            p.push(chunk);
        }
        assert_eq!(
            frames(&mut p),
            vec![Frame::Value(serde_json::from_slice(req).unwrap())]
        );
    }

    #[test]
    fn garbage_is_a_parse_error() {
        let mut p = StreamParser::new();
        p.push(b"{\"method\": x}");
        assert_eq!(frames(&mut p), vec![Frame::ParseError]);
        let mut p = StreamParser::new();
        p.push(b"\x00\xff garbage");
        assert_eq!(frames(&mut p), vec![Frame::ParseError]);
    }

    #[test]
    fn oversized_incomplete_request_is_refused() {
        let mut p = StreamParser::with_limit(64);
        p.push(b"{\"method\":\"");
        p.push(&[b'a'; 100]);
        assert_eq!(frames(&mut p), vec![Frame::TooLarge]);
    }

    #[test]
    fn large_incomplete_value_completes_eventually() {
        let mut p = StreamParser::new();
        p.push(b"{\"params\":\"");
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..40 {
            p.push(&chunk);
            assert!(frames(&mut p).is_empty());
        }
        p.push(b"\",\"method\":\"m\"}");
        let f = frames(&mut p);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn request_rules() {
        let r =
            parse_request(json!({"jsonrpc":"2.0","method":"m","id":3,"params":{"a":1}})).unwrap();
        assert_eq!(r.id, Some(json!(3)));
        assert_eq!(r.params, Some(json!({"a":1})));
        let n = parse_request(json!({"method":"m","id":null})).unwrap();
        assert_eq!(n.id, None);
        let (id, e) = parse_request(json!({"jsonrpc":"1.0","method":"m","id":"x"})).unwrap_err();
        assert_eq!((id, e.code), (json!("x"), INVALID_REQUEST));
        let (_, e) = parse_request(json!({"id":1})).unwrap_err();
        assert_eq!(e.code, INVALID_REQUEST);
        let (id, e) = parse_request(json!(5)).unwrap_err();
        assert_eq!((id, e.code), (Value::Null, INVALID_REQUEST));
        let (_, e) = parse_request(json!({"method":"m","id":1,"params":3})).unwrap_err();
        assert_eq!(e.code, INVALID_REQUEST);
        let (id, _) = parse_request(json!({"method":"m","id":[1]})).unwrap_err();
        assert_eq!(id, Value::Null);
    }

    #[test]
    fn responses_are_one_line_in_spdk_key_order() {
        let r = encode(&response_ok(json!(1), json!(true)));
        assert_eq!(r, b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":true}\n");
        let e = encode(&response_err(json!(2), &RpcError::method_not_found()));
        assert_eq!(
            String::from_utf8(e).unwrap(),
            "{\"jsonrpc\":\"2.0\",\"id\":2,\"error\":{\"code\":-32601,\"message\":\"Method not found\"}}\n"
        );
    }
}
