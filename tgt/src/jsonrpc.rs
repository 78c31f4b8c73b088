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
    /// The text of the ids of the last value that `f64` does not reproduce (see
    /// [`StreamParser::take_raw_ids`]).
    raw_ids: Vec<String>,
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
            raw_ids: Vec::new(),
        }
    }

    /// The buffer capacity after pushing `extra` more bytes: it doubles, but never beyond
    /// the limit plus the bytes pushed, so the memory a connection can pin is bounded by
    /// the request limit (a caller charges it to a budget before reading).
    pub fn capacity_after(&self, extra: usize) -> usize {
        let need = self.buf.len() + extra;
        if need <= self.buf.capacity() {
            return self.buf.capacity();
        }
        (self.buf.capacity() * 2)
            .max(need)
            .max(4096)
            .min(need.max(self.limit + extra))
    }

    /// Bytes allocated for the receive buffer.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Gives memory back once a large request was consumed.
    pub fn shrink(&mut self) {
        let cap = self.buf.capacity();
        if cap > 64 * 1024 && self.buf.len() < cap / 4 {
            self.buf.shrink_to(self.buf.len().max(16 * 1024));
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        let big = self.buf.len() > 1024 * 1024;
        let closes = data.iter().any(|&b| b == b'}' || b == b']');
        let cap = self.capacity_after(data.len());
        if cap > self.buf.capacity() {
            self.buf.reserve_exact(cap - self.buf.len());
        }
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
                self.raw_ids = inexact_ids(&v, &self.buf[..used]);
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

impl StreamParser {
    /// The ids of the last value returned that are numbers `f64` does not reproduce as sent
    /// (2^64, 1e2, ...), as the client wrote them, in document order (the order of the
    /// responses that carry them). Give them to [`encode_exact`], as SPDK echoes ids verbatim.
    pub fn take_raw_ids(&mut self) -> Vec<String> {
        std::mem::take(&mut self.raw_ids)
    }
}

fn is_inexact_id(v: &Value) -> bool {
    matches!(v.get("id"), Some(Value::Number(n)) if n.is_f64())
}

/// The raw text of the ids of `v` (its top-level object, or each object of a batch) that are
/// numbers parsed as `f64`; `raw` is the text `v` was parsed from.
fn inexact_ids(v: &Value, raw: &[u8]) -> Vec<String> {
    let wanted = match v {
        Value::Object(_) => is_inexact_id(v),
        Value::Array(a) => a.iter().any(is_inexact_id),
        _ => false,
    };
    if !wanted {
        return Vec::new();
    }
    let mut sc = Scan { b: raw, i: 0 };
    sc.ws();
    let texts: Vec<Option<String>> = match sc.peek() {
        Some(b'{') => vec![sc.object_id()],
        Some(b'[') => sc.array_ids(),
        _ => Vec::new(),
    };
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        v => vec![v],
    };
    items
        .iter()
        .zip(texts)
        .filter(|(item, _)| is_inexact_id(item))
        .filter_map(|(_, t)| t)
        .collect()
}

/// A scanner over bytes already known to be one valid JSON value.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn string(&mut self) {
        self.i += 1;
        while let Some(c) = self.peek() {
            self.i += 1;
            match c {
                b'\\' => self.i += 1,
                b'"' => return,
                _ => {}
            }
        }
    }
    fn value(&mut self) {
        match self.peek() {
            Some(b'"') => self.string(),
            Some(b'{' | b'[') => {
                let mut depth = 0usize;
                while let Some(c) = self.peek() {
                    match c {
                        b'"' => {
                            self.string();
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return;
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                while self
                    .peek()
                    .is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
                {
                    self.i += 1;
                }
            }
        }
    }
    /// At `{`: the text of the last member named `id`.
    fn object_id(&mut self) -> Option<String> {
        let mut found = None;
        self.i += 1;
        loop {
            self.ws();
            match self.peek() {
                Some(b'"') => {}
                Some(b',') => {
                    self.i += 1;
                    continue;
                }
                _ => {
                    self.i += 1;
                    return found;
                }
            }
            let k0 = self.i;
            self.string();
            let key = serde_json::from_slice::<String>(&self.b[k0..self.i]).ok();
            self.ws();
            self.i += 1; // ':'
            self.ws();
            let v0 = self.i;
            self.value();
            if key.as_deref() == Some("id") {
                found = std::str::from_utf8(&self.b[v0..self.i])
                    .ok()
                    .map(str::to_string);
            }
        }
    }
    /// At `[`: per element, the id text of objects (`None` for other elements).
    fn array_ids(&mut self) -> Vec<Option<String>> {
        let mut out = Vec::new();
        self.i += 1;
        loop {
            self.ws();
            match self.peek() {
                Some(b']') | None => return out,
                Some(b',') => self.i += 1,
                Some(b'{') => out.push(self.object_id()),
                Some(_) => {
                    self.value();
                    out.push(None);
                }
            }
        }
    }
}

/// [`encode`], with the ids that are `f64` numbers written as the client sent them: the
/// `n`-th such id among the responses takes `raw_ids[n]` (see
/// [`StreamParser::take_raw_ids`]); a text that does not parse to the same number is ignored.
pub fn encode_exact(v: &Value, raw_ids: &[String]) -> Vec<u8> {
    if raw_ids.is_empty() {
        return encode(v);
    }
    let mut next = raw_ids.iter();
    let mut one = |r: &Value, out: &mut Vec<u8>| {
        if is_inexact_id(r) {
            if let Some(raw) = next.next() {
                let same = serde_json::from_str::<Value>(raw).ok().as_ref() == r.get("id");
                if same {
                    if let Some(body) = without_id(r) {
                        out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
                        out.extend_from_slice(raw.as_bytes());
                        out.extend_from_slice(&body);
                        return;
                    }
                }
            }
        }
        out.extend(serde_json::to_vec(r).unwrap_or_else(|_| b"{}".to_vec()));
    };
    let mut out = Vec::new();
    match v {
        Value::Array(items) => {
            out.push(b'[');
            for (i, r) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                one(r, &mut out);
            }
            out.push(b']');
        }
        r => one(r, &mut out),
    }
    out.push(b'\n');
    out
}

/// A response serialised after its `"jsonrpc":"2.0","id":X` prefix: `,"result":...}`.
fn without_id(r: &Value) -> Option<Vec<u8>> {
    let mut m = r.as_object()?.clone();
    m.shift_remove("jsonrpc");
    m.shift_remove("id");
    let mut body = serde_json::to_vec(&Value::Object(m)).ok()?;
    // `{...}` -> `,...}` (the object is never empty: it has a result or an error).
    body[0] = b',';
    Some(body)
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

/// The answer to a connection whose partial request waited for memory longer than the stall
/// timeout (other connections hold the RPC budget); the connection is then closed.
pub fn busy_response() -> Value {
    response_err(
        Value::Null,
        &RpcError::new(
            -libc::ENOBUFS,
            "Server busy: request buffer budget exhausted",
        ),
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
    fn big_and_odd_number_ids_are_echoed_as_sent() {
        let mut p = StreamParser::new();
        p.push(br#"{"method":"m","params":{"id":1.5},"id" : 18446744073709551616}"#);
        let Frame::Value(v) = p.next_frame() else {
            panic!()
        };
        let raw = p.take_raw_ids();
        assert_eq!(raw, vec!["18446744073709551616".to_string()]);
        let r = parse_request(v).unwrap();
        let out = encode_exact(&response_ok(r.id.unwrap(), json!(true)), &raw);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"jsonrpc\":\"2.0\",\"id\":18446744073709551616,\"result\":true}\n"
        );
        // A batch: only the inexact ids are kept, in order; exact ones are left alone.
        p.push(br#"[{"id":1e2,"method":"a"},{"id":7,"method":"b"},3,{"method":"c","id":-99999999999999999999}]"#);
        let Frame::Value(Value::Array(items)) = p.next_frame() else {
            panic!()
        };
        let raw = p.take_raw_ids();
        assert_eq!(
            raw,
            vec!["1e2".to_string(), "-99999999999999999999".to_string()]
        );
        let resp: Vec<Value> = items
            .into_iter()
            .map(|i| match parse_request(i) {
                Ok(r) => response_ok(r.id.unwrap(), json!(1)),
                Err((id, e)) => response_err(id, &e),
            })
            .collect();
        let out = String::from_utf8(encode_exact(&Value::Array(resp), &raw)).unwrap();
        assert!(
            out.starts_with(
                "[{\"jsonrpc\":\"2.0\",\"id\":1e2,\"result\":1},{\"jsonrpc\":\"2.0\",\"id\":7,"
            ),
            "{out}"
        );
        assert!(
            out.ends_with("{\"jsonrpc\":\"2.0\",\"id\":-99999999999999999999,\"result\":1}]\n"),
            "{out}"
        );
        let back: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back.as_array().unwrap().len(), 4);
        // Nothing inexact: nothing recorded.
        p.push(br#"{"id":"x\"id\":1e2","method":"m"}"#);
        assert!(matches!(p.next_frame(), Frame::Value(_)));
        assert!(p.take_raw_ids().is_empty());
    }

    #[test]
    fn buffer_capacity_is_bounded_by_the_limit() {
        let mut p = StreamParser::with_limit(1 << 20);
        p.push(b"{\"method\":\"");
        let chunk = vec![b'a'; 64 * 1024];
        while p.next_frame() == Frame::NeedMore {
            assert!(p.capacity_after(chunk.len()) <= (1 << 20) + 2 * chunk.len());
            p.push(&chunk);
            assert!(
                p.capacity() <= (1 << 20) + 2 * chunk.len(),
                "{}",
                p.capacity()
            );
        }
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
