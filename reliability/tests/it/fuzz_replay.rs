//! Replays every corpus and regression file of the fuzz targets through the same drivers the
//! fuzzer runs (so CI on stable covers them), plus hostile inputs that prove the parsers never
//! allocate without bound on huge lengths.

use std::path::{Path, PathBuf};

use blobstore::inspect;
use nbd_proto as proto;
use reliability::fuzz::{jsonrpc_stream, nbd_client_session, nbd_session, FUZZ_RPC_LIMIT};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every file under `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`, plus flat
/// regression files whose name starts with `<target>`.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let d = fuzz_dir();
    for dir in [
        d.join("corpus").join(target),
        d.join("regressions").join(target),
    ] {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_file() {
                    out.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
        }
    }
    out.sort();
    out
}

/// Replays every input of fuzz target `target` (at least `min_files` of them) through `run`
/// and sums what `count` takes from each outcome.
fn replay<O: std::fmt::Debug>(
    target: &str,
    min_files: usize,
    run: impl Fn(&[u8]) -> O,
    count: impl Fn(&O) -> usize,
) -> usize {
    let files = inputs(target);
    assert!(files.len() >= min_files, "corpus missing: {}", files.len());
    let mut total = 0;
    for (p, data) in &files {
        let o = run(data);
        eprintln!("{}: {o:?}", p.display());
        total += count(&o);
    }
    total
}

/// Fails unless `got` (of `what`) is at least `min`: the seeds hold that many good inputs,
/// so a parser that refuses everything fails.
fn at_least(got: usize, min: usize, what: &str) {
    assert!(got >= min, "only {got} {what} (at least {min} expected)");
}

#[test]
fn jsonrpc_corpus_replays() {
    let requests = replay("jsonrpc_request", 10, jsonrpc_stream, |o| o.requests);
    // The seeds hold valid requests; a parser that rejects everything would fail here.
    at_least(requests, 7, "valid requests in the corpus");
}

#[test]
fn nbd_corpus_replays() {
    let accepted = replay("nbd_request", 8, nbd_session, |o| o.accepted);
    at_least(accepted, 6, "accepted requests in the corpus");
}

#[test]
fn nbd_client_corpus_replays() {
    let files = inputs("nbd_reply");
    assert!(files.len() >= 8, "corpus missing: {}", files.len());
    let (mut transmitting, mut replies) = (0, 0);
    for (p, data) in &files {
        let o = nbd_client_session(data);
        eprintln!("{}: {o:?}", p.display());
        transmitting += usize::from(o.transmitting);
        replies += o.replies;
    }
    // The seeds hold complete handshakes; decoders that refuse everything fail here.
    at_least(transmitting, 3, "handshakes completed");
    at_least(replies, 4, "replies decoded");
}

#[test]
fn blobstore_corpora_and_regressions_replay() {
    let d = fuzz_dir();
    let mut n = 0;
    for sub in ["corpus/super_block", "corpus/md_page", "regressions"] {
        for e in std::fs::read_dir(d.join(sub)).unwrap().flatten() {
            if !e.path().is_file() {
                continue;
            }
            let data = std::fs::read(e.path()).unwrap();
            let _ = inspect::parse_super(&data);
            let _ = inspect::parse_md_page(&data);
            let _ = inspect::parse_mask(&data);
            for page in data.chunks(4096) {
                let _ = inspect::parse_md_page(page);
            }
            n += 1;
        }
    }
    assert!(n >= 8, "only {n} files");
}

#[test]
fn seeds_decode_as_intended() {
    // The valid single request is found; the garbage one ends in a parse error.
    let o = jsonrpc_stream(b"\x07{\"jsonrpc\":\"2.0\",\"method\":\"bdev_get_bdevs\",\"id\":1}");
    assert_eq!((o.values, o.requests, o.parse_error), (1, 1, false));
    let o = jsonrpc_stream(b"\x02}}}{{");
    assert!(o.parse_error);
    // Batch: two valid, two invalid members.
    let o = jsonrpc_stream(b"\x10[{\"method\":\"a\",\"id\":1},{\"method\":\"b\"},5,{\"id\":[1]}]");
    assert_eq!((o.values, o.requests), (1, 2));
}

#[test]
fn hostile_rpc_lengths_are_bounded() {
    // An unterminated string longer than the limit ends in TooLarge, not unbounded growth.
    let mut data = vec![63u8];
    data.extend_from_slice(b"{\"method\":\"");
    data.extend(std::iter::repeat_n(b'a', FUZZ_RPC_LIMIT * 2));
    let o = jsonrpc_stream(&data);
    assert!(o.too_large, "{o:?}");
    // Deep nesting: serde's recursion limit answers a parse error, no stack overflow.
    let mut deep = vec![63u8];
    deep.extend(std::iter::repeat_n(b'[', 100_000));
    let o = jsonrpc_stream(&deep);
    assert!(o.parse_error, "{o:?}");
    // Whitespace only is skipped without buffering.
    let ws = vec![b' '; 1 << 20];
    assert_eq!(jsonrpc_stream(&ws), Default::default());
}

#[test]
fn hostile_nbd_lengths_are_bounded() {
    // Option payload lengths above MAX_OPTION_LEN are refused before any allocation.
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    h[8..12].copy_from_slice(&7u32.to_be_bytes());
    h[12..].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(
        proto::parse_option_header(&h),
        Err(proto::ProtoError::OptionTooLong(u32::MAX))
    );
    // A NBD_OPT_GO whose name length runs past the payload is malformed, not a huge read.
    let mut go = u32::MAX.to_be_bytes().to_vec();
    go.extend_from_slice(b"ab\0\0");
    assert_eq!(
        proto::parse_go(&go),
        Err(proto::ProtoError::Truncated("NBD_OPT_GO name"))
    );
    // A read larger than MAX_PAYLOAD is refused with EOVERFLOW; a write ends the session
    // before its payload is read.
    let r = proto::Request {
        flags: 0,
        cmd: proto::CMD_READ,
        cookie: 7,
        offset: 0,
        len: u32::MAX,
    };
    assert_eq!(
        proto::check_request(&r, u64::MAX, false),
        Err(proto::EOVERFLOW)
    );
    let r = proto::Request {
        cmd: proto::CMD_WRITE,
        ..r
    };
    let mut s = 3u32.to_be_bytes().to_vec();
    s.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    s.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
    s.extend_from_slice(&4u32.to_be_bytes());
    s.extend_from_slice(b"vol0");
    s.extend_from_slice(&proto::encode_request(&r));
    let o = nbd_session(&s);
    assert!(o.transmitting);
    assert_eq!((o.requests, o.accepted), (1, 0));
    // Offsets that overflow u64 with the length are refused, never wrapped.
    let r = proto::Request {
        cmd: proto::CMD_READ,
        offset: u64::MAX - 10,
        len: 4096,
        ..r
    };
    assert_eq!(proto::check_request(&r, 1 << 20, false), Err(proto::EINVAL));
}

/// Per-thread allocation accounting, to measure what a parser keeps for a hostile stream.
#[global_allocator]
static METER: test_support::alloc::CountingAlloc = test_support::alloc::CountingAlloc;

#[test]
fn hostile_rpc_stream_memory_is_bounded_by_the_request_limit() {
    use tgt::jsonrpc::{Frame, StreamParser, MAX_REQUEST_BYTES};
    // 48 MiB of an unterminated string arriving in 64 KiB reads, as the server reads them.
    let mut fed = 0usize;
    let mut end = None;
    let used = test_support::alloc::peak_during(|| {
        let mut p = StreamParser::new();
        let mut chunk = vec![b'a'; 64 * 1024];
        chunk[..11].copy_from_slice(b"{\"method\":\"");
        while fed < 48 << 20 {
            p.push(&chunk);
            chunk[..11].fill(b'a');
            fed += chunk.len();
            match p.next_frame() {
                Frame::NeedMore => {}
                f => {
                    end = Some(f);
                    break;
                }
            }
        }
    });
    assert_eq!(end, Some(Frame::TooLarge), "after {fed} bytes");
    assert!(
        fed <= MAX_REQUEST_BYTES + 2 * 64 * 1024,
        "gave up only after {fed} bytes"
    );
    eprintln!(
        "peak parser memory for a hostile stream: {} MiB",
        used >> 20
    );
    // The buffer may double once past the limit; nothing more.
    assert!(used <= 3 * MAX_REQUEST_BYTES as isize, "peak {used} bytes");
}

#[test]
fn hostile_nbd_session_allocates_little() {
    // A session announcing the largest option and then garbage requests.
    let mut s = 3u32.to_be_bytes().to_vec();
    for _ in 0..100 {
        s.extend_from_slice(&nbd_proto::IHAVEOPT.to_be_bytes());
        s.extend_from_slice(&99u32.to_be_bytes());
        s.extend_from_slice(&nbd_proto::MAX_OPTION_LEN.to_be_bytes());
        s.extend(std::iter::repeat_n(
            0xeeu8,
            nbd_proto::MAX_OPTION_LEN as usize,
        ));
    }
    let mut options = 0;
    let used = test_support::alloc::peak_during(|| options = nbd_session(&s).options);
    assert_eq!(options, 100);
    eprintln!("peak NBD handshake memory: {used} bytes");
    assert!(used < 1 << 20, "peak {used} bytes");
}
