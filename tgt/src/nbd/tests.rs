//! The NBD server's tests: sessions over in-memory pipes against malloc bdevs.

use super::rmw::span;
use super::server::NbdServer;
use super::session::{CLOSE_GRACE, RBUF_LEN, WBUF_LEN};
use crate::limits::Limits;
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{IoType, Registry};
use iobuf::IoBuf;
use nbd_proto as proto;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// One client option: magic, code, length, data.
fn option(code: u32, data: &[u8]) -> Vec<u8> {
    [
        &proto::IHAVEOPT.to_be_bytes()[..],
        &code.to_be_bytes(),
        &(data.len() as u32).to_be_bytes(),
        data,
    ]
    .concat()
}

/// The client's handshake: `NBD_OPT_GO` for `export`; returns its size and flags.
async fn client_go<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, export: &str) -> (u64, u16) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(g, proto::greeting());
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    let go = [
        &(export.len() as u32).to_be_bytes()[..],
        export.as_bytes(),
        &0u16.to_be_bytes(),
    ]
    .concat();
    s.write_all(&option(proto::OPT_GO, &go)).await.unwrap();
    let (mut size, mut flags) = (0, 0);
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.unwrap();
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut data).await.unwrap();
        if ty == proto::REP_INFO && data[..2] == [0, 0] {
            size = u64::from_be_bytes(data[2..10].try_into().unwrap());
            flags = u16::from_be_bytes([data[10], data[11]]);
        }
        if ty == proto::REP_ACK {
            return (size, flags);
        }
        assert_eq!(ty & proto::REP_FLAG_ERROR, 0);
    }
}

/// A session under test: the registry, the server, the client's end of the pipe (past the
/// handshake) and the export's size and flags.
struct Conn {
    registry: Registry,
    server: Arc<NbdServer>,
    c: tokio::io::DuplexStream,
    size: u64,
    flags: u16,
}

/// Registers `dev`, exports it writable (as `name`, default its bdev name) from a server
/// with `limits`, and connects a client over a pipe of `pipe` bytes asking for `go`.
async fn connect(
    dev: Arc<dyn bdev_core::BlockDevice>,
    name: Option<&str>,
    limits: Limits,
    pipe: usize,
    go: &str,
) -> Conn {
    let registry = Registry::new();
    let bdev = dev.name().to_string();
    registry.register(dev).await.unwrap();
    let server = NbdServer::with_limits(registry.clone(), limits);
    server.add_export(&bdev, name, true).unwrap();
    let (mut c, s) = tokio::io::duplex(pipe);
    server.spawn_conn(s);
    let (size, flags) = client_go(&mut c, go).await;
    Conn {
        registry,
        server,
        c,
        size,
        flags,
    }
}

/// A malloc bdev "M".
fn malloc(blocks: u64, bl: u32) -> Arc<dyn bdev_core::BlockDevice> {
    MallocBdev::create("M", blocks, bl, None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_unaligned_io_and_removal() {
    let Conn {
        registry,
        server,
        mut c,
        size,
        flags,
    } = connect(
        malloc(2048, 512),
        Some("m"),
        Limits::default(),
        1 << 20,
        "m",
    )
    .await;
    assert_eq!(server.export_names(), [("m".to_string(), "M".to_string())]);
    assert_eq!(size, 1 << 20);
    assert_eq!(flags & proto::TFLAG_READ_ONLY, 0);

    // 64 writes of 1000 bytes at unaligned offsets, all sent before any reply is read.
    let mut msg = Vec::new();
    for i in 0..64u64 {
        let r = req(proto::CMD_WRITE, 0, i, i * 1000 + 7, 1000);
        msg.extend_from_slice(&r);
        msg.extend(std::iter::repeat_n(i as u8 + 1, 1000));
    }
    c.write_all(&msg).await.unwrap();
    let mut seen = HashMap::new();
    for _ in 0..64 {
        let mut h = [0u8; 16];
        c.read_exact(&mut h).await.unwrap();
        let cookie = u64::from_be_bytes(h[8..].try_into().unwrap());
        seen.insert(cookie, u32::from_be_bytes(h[4..8].try_into().unwrap()));
    }
    assert_eq!(seen.len(), 64);
    assert!(seen.values().all(|&e| e == 0));
    // Write zeroes over part of the range, then read everything back in one request.
    let z = req(proto::CMD_WRITE_ZEROES, 0, 100, 1500, 600);
    c.write_all(&z).await.unwrap();
    let mut h = [0u8; 16];
    c.read_exact(&mut h).await.unwrap();
    assert_eq!(h, proto::simple_reply(0, 100));
    let rd = req(proto::CMD_READ, 0, 101, 0, 65_000);
    c.write_all(&rd).await.unwrap();
    c.read_exact(&mut h).await.unwrap();
    assert_eq!(h, proto::simple_reply(0, 101));
    let mut data = vec![0u8; 65_000];
    c.read_exact(&mut data).await.unwrap();
    for (off, &b) in data.iter().enumerate() {
        let expect = if !(7..64 * 1000 + 7).contains(&off) || (1500..2100).contains(&off) {
            0
        } else {
            ((off - 7) / 1000) as u8 + 1
        };
        assert_eq!(b, expect, "byte {off}");
    }
    assert_eq!(server.list()[0]["connections"], serde_json::json!(1));
    // Hot removal: the unregister completes and the connection is closed.
    registry.unregister("M").await.unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).await.unwrap(), 0);
    assert_eq!(server.list(), serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_split_across_reads_and_refused_requests() {
    // A 4 KiB pipe: every large payload arrives in many pieces.
    let Conn { c, size, .. } = connect(malloc(1024, 4096), None, Limits::default(), 4096, "").await;
    assert_eq!(size, 4 << 20);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let w = req(
        proto::CMD_WRITE,
        proto::CMD_FLAG_FUA,
        1,
        8192,
        data.len() as u32,
    );
    let bad = req(proto::CMD_READ, 0, 2, 4 << 20, 4096);
    let r = req(proto::CMD_READ, 0, 3, 8192, data.len() as u32);
    let mut msg = w;
    msg.extend_from_slice(&data);
    msg.extend_from_slice(&bad);
    let (mut rd, mut wr) = tokio::io::split(c);
    let writer = tokio::spawn(async move {
        wr.write_all(&msg).await.unwrap();
        // The read goes out only after the write's reply came back (below).
        wr
    });
    let mut h = [0u8; 16];
    rd.read_exact(&mut h).await.unwrap();
    assert_eq!(h, proto::simple_reply(0, 1));
    rd.read_exact(&mut h).await.unwrap();
    assert_eq!(h, proto::simple_reply(proto::EINVAL, 2));
    let mut wr = writer.await.unwrap();
    wr.write_all(&r).await.unwrap();
    rd.read_exact(&mut h).await.unwrap();
    assert_eq!(h, proto::simple_reply(0, 3));
    let mut back = vec![0u8; data.len()];
    rd.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);
    // Disconnect: the server closes its side.
    let d = req(proto::CMD_DISC, 0, 4, 0, 0);
    wr.write_all(&d).await.unwrap();
    let mut b = [0u8; 1];
    assert_eq!(rd.read(&mut b).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_cannot_block_removal() {
    let Conn {
        registry,
        server,
        mut c,
        ..
    } = connect(malloc(4096, 4096), None, Limits::default(), 64 << 10, "M").await;
    // 16 MiB of read replies that nobody reads.
    for i in 0..16u64 {
        let r = req(proto::CMD_READ, 0, i, i << 20, 1 << 20);
        c.write_all(&r).await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let t0 = std::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(10), registry.unregister("M"))
        .await
        .expect("removal completes")
        .unwrap();
    assert!(t0.elapsed() >= CLOSE_GRACE / 2);
    assert_eq!(server.list(), serde_json::json!([]));
    drop(c);
}

/// A malloc device that counts the flushes it receives.
struct Counting {
    inner: Arc<MallocBdev>,
    flushes: Arc<AtomicUsize>,
    /// Reads and writes of blocks from this one on wait `delay` first (the others too when
    /// `jitter`, for a pseudo-random part of it), so that requests overlap and complete out
    /// of order.
    slow_from: u64,
    delay: Duration,
    jitter: bool,
    ios: AtomicUsize,
}

impl Counting {
    fn new(inner: Arc<MallocBdev>, flushes: Arc<AtomicUsize>) -> Self {
        Counting {
            inner,
            flushes,
            slow_from: u64::MAX,
            delay: Duration::ZERO,
            jitter: false,
            ios: AtomicUsize::new(0),
        }
    }

    /// Over a malloc bdev of `blocks` 512-byte blocks, reads and writes delayed as the
    /// fields say.
    fn slow(blocks: u64, slow_from: u64, delay: Duration, jitter: bool) -> Self {
        Counting {
            slow_from,
            delay,
            jitter,
            ..Counting::new(
                MallocBdev::create("M", blocks, 512, None).unwrap(),
                Arc::new(AtomicUsize::new(0)),
            )
        }
    }

    async fn wait(&self, block: u64) {
        let n = self.ios.fetch_add(1, Ordering::SeqCst) as u32;
        let d = if block >= self.slow_from {
            self.delay
        } else if self.jitter {
            // A fixed pseudo-random sequence: 0 to 7 eighths of the delay.
            self.delay * (n.wrapping_mul(2_654_435_761) >> 29) / 8
        } else {
            Duration::ZERO
        };
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

#[async_trait::async_trait]
impl bdev_core::BlockDevice for Counting {
    fn name(&self) -> &str {
        "C"
    }
    fn product_name(&self) -> &str {
        "counting"
    }
    fn module_name(&self) -> &str {
        "test"
    }
    fn uuid(&self) -> uuid::Uuid {
        self.inner.uuid()
    }
    fn block_len(&self) -> u32 {
        self.inner.block_len()
    }
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        self.inner.io_type_supported(t)
    }
    async fn read(&self, o: u64, b: IoBuf) -> bdev_core::Result<IoBuf> {
        self.wait(o).await;
        self.inner.read(o, b).await
    }
    async fn write(&self, o: u64, b: IoBuf) -> bdev_core::Result<IoBuf> {
        self.wait(o).await;
        self.inner.write(o, b).await
    }
    async fn flush(&self) -> bdev_core::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush().await
    }
    async fn unmap(&self, o: u64, n: u64) -> bdev_core::Result<()> {
        self.inner.unmap(o, n).await
    }
    async fn write_zeroes(&self, o: u64, n: u64) -> bdev_core::Result<()> {
        self.inner.write_zeroes(o, n).await
    }
}

async fn reply<S: AsyncRead + Unpin>(c: &mut S) -> (u32, u64) {
    let mut h = [0u8; 16];
    c.read_exact(&mut h).await.unwrap();
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..].try_into().unwrap()),
    )
}

fn req(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    proto::encode_request(&proto::Request {
        flags,
        cmd,
        cookie,
        offset,
        len,
    })
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fua_writes_and_flushes_reach_the_device() {
    let flushes = Arc::new(AtomicUsize::new(0));
    let dev = Counting::new(
        MallocBdev::create("M", 1024, 512, None).unwrap(),
        flushes.clone(),
    );
    let Conn { mut c, flags, .. } = serve_counting(dev).await;
    assert_ne!(flags & proto::TFLAG_SEND_FUA, 0);
    assert_ne!(flags & proto::TFLAG_SEND_FLUSH, 0);
    // A plain write does not flush.
    let mut m = req(proto::CMD_WRITE, 0, 1, 0, 512);
    m.extend([7u8; 512]);
    c.write_all(&m).await.unwrap();
    assert_eq!(reply(&mut c).await, (0, 1));
    assert_eq!(flushes.load(Ordering::SeqCst), 0);
    // A FUA write is flushed before its reply.
    let mut m = req(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 2, 512, 512);
    m.extend([8u8; 512]);
    c.write_all(&m).await.unwrap();
    assert_eq!(reply(&mut c).await, (0, 2));
    assert_eq!(flushes.load(Ordering::SeqCst), 1);
    // FLUSH and FUA write-zeroes too.
    c.write_all(&req(proto::CMD_FLUSH, 0, 3, 0, 0))
        .await
        .unwrap();
    assert_eq!(reply(&mut c).await, (0, 3));
    assert_eq!(flushes.load(Ordering::SeqCst), 2);
    c.write_all(&req(
        proto::CMD_WRITE_ZEROES,
        proto::CMD_FLAG_FUA,
        4,
        0,
        512,
    ))
    .await
    .unwrap();
    assert_eq!(reply(&mut c).await, (0, 4));
    assert_eq!(flushes.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_write_gets_eoverflow_and_the_connection_goes_on() {
    let Conn { c, .. } = connect(malloc(2048, 512), None, Limits::default(), 1 << 20, "M").await;
    let (mut rd, mut wr) = tokio::io::split(c);
    let big = proto::MAX_PAYLOAD + 4096;
    let writer = tokio::spawn(async move {
        let mut m = req(proto::CMD_WRITE, 0, 1, 0, big);
        m.extend(std::iter::repeat_n(0xeeu8, big as usize));
        // A valid write follows right behind the refused payload.
        m.extend(req(proto::CMD_WRITE, 0, 2, 0, 512));
        m.extend([5u8; 512]);
        m.extend(req(proto::CMD_READ, 0, 3, 0, 512));
        wr.write_all(&m).await.unwrap();
        wr
    });
    assert_eq!(reply(&mut rd).await, (proto::EOVERFLOW, 1));
    assert_eq!(reply(&mut rd).await, (0, 2));
    assert_eq!(reply(&mut rd).await, (0, 3));
    let mut data = [0u8; 512];
    rd.read_exact(&mut data).await.unwrap();
    assert_eq!(data, [5u8; 512]);
    drop(writer.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_replies_are_bounded_and_the_client_is_dropped() {
    let limits = Limits {
        nbd_conn_mem: 4 << 20,
        nbd_total_mem: 16 << 20,
        stall_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    // 64 MiB.
    let Conn { server, mut c, .. } =
        connect(malloc(64 << 11, 512), None, limits, 64 << 10, "M").await;
    // 64 reads of 1 MiB whose replies are never read.
    let mut m = Vec::new();
    for i in 0..64u64 {
        m.extend(req(proto::CMD_READ, 0, i, i << 20, 1 << 20));
    }
    c.write_all(&m).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fixed = RBUF_LEN + WBUF_LEN;
    let peak = server.budget().peak();
    assert!(peak <= fixed + (4 << 20), "peak {peak}");
    assert!(peak > fixed, "nothing was charged");
    // Dropped after the stall timeout, and every byte is given back.
    let t0 = std::time::Instant::now();
    while server.list()[0]["connections"] != serde_json::json!(0) {
        assert!(t0.elapsed() < Duration::from_secs(10), "not dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.budget().used(), 0);
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_payload_that_never_comes_is_dropped() {
    let limits = Limits {
        stall_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let Conn { server, mut c, .. } =
        connect(malloc(64 << 11, 512), None, limits, 1 << 20, "M").await;
    // A 16 MiB write with 4 KiB of its payload, then silence.
    let mut m = req(proto::CMD_WRITE, 0, 1, 0, 16 << 20);
    m.extend([1u8; 4096]);
    c.write_all(&m).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(server.budget().used() >= 16 << 20, "the payload is charged");
    let t0 = std::time::Instant::now();
    while server.list()[0]["connections"] != serde_json::json!(0) {
        assert!(t0.elapsed() < Duration::from_secs(10), "not dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.budget().used(), 0);
}

#[test]
fn span_covers_unaligned_ranges() {
    assert_eq!(span(0, 4096, 512), (0, 8, 0));
    assert_eq!(span(100, 10, 512), (0, 1, 100));
    assert_eq!(span(510, 4, 512), (0, 2, 510));
    assert_eq!(span(4096, 1, 4096), (1, 1, 0));
}

/// Reads `len` bytes at `offset` (alone on the connection) and returns them.
async fn read_back<S: AsyncRead + AsyncWrite + Unpin>(c: &mut S, offset: u64, len: u32) -> Vec<u8> {
    c.write_all(&req(proto::CMD_READ, 0, u64::MAX, offset, len))
        .await
        .unwrap();
    assert_eq!(reply(c).await, (0, u64::MAX));
    let mut data = vec![0u8; len as usize];
    c.read_exact(&mut data).await.unwrap();
    data
}

/// A session over `dev` (registered and exported as "C").
async fn serve_counting(dev: Counting) -> Conn {
    connect(Arc::new(dev), None, Limits::default(), 1 << 20, "C").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_in_one_packet_completes_out_of_order_with_every_byte_right() {
    // Blocks from 512 on take 200 ms; the rest are immediate.
    let dev = Counting::slow(1024, 512, Duration::from_millis(200), false);
    let Conn { mut c, .. } = serve_counting(dev).await;
    // One packet: a slow write, then 16 fast writes and 16 fast reads of what they wrote.
    let mut m = req(proto::CMD_WRITE, 0, 100, 512 * 512, 512);
    m.extend([0xabu8; 512]);
    for i in 0..16u64 {
        m.extend(req(proto::CMD_WRITE, 0, i, i * 4096, 4096));
        m.extend(std::iter::repeat_n(i as u8 + 1, 4096));
    }
    for i in 0..16u64 {
        m.extend(req(proto::CMD_READ, 0, 200 + i, i * 4096, 4096));
    }
    c.write_all(&m).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..33 {
        let (err, cookie) = reply(&mut c).await;
        assert_eq!(err, 0, "cookie {cookie}");
        if cookie >= 200 {
            let mut data = vec![0u8; 4096];
            c.read_exact(&mut data).await.unwrap();
            // Requests in flight together are unordered (NBD): a read racing the write
            // of its range sees the old bytes or the new ones, never anything else.
            let want = (cookie - 200) as u8 + 1;
            assert!(data.iter().all(|&b| b == want || b == 0), "cookie {cookie}");
        }
        order.push(cookie);
    }
    // The slow write, sent first, is answered last.
    assert_eq!(order.last(), Some(&100), "{order:?}");
    let mut sorted = order.clone();
    sorted.sort_unstable();
    let mut want: Vec<u64> = (0..16).chain(100..101).chain(200..216).collect();
    want.sort_unstable();
    assert_eq!(sorted, want);
    // Everything reads back.
    let data = read_back(&mut c, 0, 16 * 4096).await;
    for (i, chunk) in data.chunks(4096).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8 + 1), "block {i}");
    }
    assert_eq!(read_back(&mut c, 512 * 512, 512).await, [0xabu8; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_unaligned_writes_keep_every_writes_bytes() {
    // Every read and write of the device waits a pseudo-random part of 4 ms, so the
    // read-modify-writes of one block overlap each other and the whole-block writes.
    let dev = Counting::slow(64, u64::MAX, Duration::from_millis(4), true);
    let Conn { mut c, .. } = serve_counting(dev).await;
    // Blocks 0..8: each gets 8 writes of 64 bytes at unaligned offsets (every byte of the
    // block once), all in one burst, interleaved with whole-block writes of blocks 8..16
    // and a write spanning blocks 15..17 unaligned at both ends.
    let mut m = Vec::new();
    let mut expect = vec![0u8; 64 * 512];
    let mut cookie = 0u64;
    for k in 0..8u64 {
        for b in 0..8u64 {
            let off = b * 512 + k * 64;
            let fill = (b * 8 + k + 1) as u8;
            m.extend(req(proto::CMD_WRITE, 0, cookie, off, 64));
            m.extend([fill; 64]);
            expect[off as usize..off as usize + 64].fill(fill);
            cookie += 1;
        }
        let b = 8 + k;
        m.extend(req(proto::CMD_WRITE, 0, cookie, b * 512, 512));
        m.extend([0x80 + k as u8; 512]);
        expect[(b * 512) as usize..(b * 512 + 512) as usize].fill(0x80 + k as u8);
        cookie += 1;
    }
    let (off, len) = (15 * 512 + 100, 2 * 512);
    m.extend(req(proto::CMD_WRITE, 0, cookie, off, len as u32));
    m.extend(std::iter::repeat_n(0xee, len));
    expect[off as usize..off as usize + len].fill(0xee);
    cookie += 1;
    c.write_all(&m).await.unwrap();
    for _ in 0..cookie {
        assert_eq!(reply(&mut c).await.0, 0);
    }
    let data = read_back(&mut c, 0, 64 * 512).await;
    for (i, (a, b)) in data.iter().zip(&expect).enumerate() {
        assert_eq!(a, b, "byte {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_right_behind_slow_writes_answers_them_first() {
    // Every block is slow: the writes are still running when the disconnect is read.
    let dev = Counting::slow(64, 0, Duration::from_millis(100), false);
    let Conn { server, mut c, .. } = serve_counting(dev).await;
    let mut m = Vec::new();
    for i in 0..4u64 {
        m.extend(req(proto::CMD_WRITE, 0, i, i * 512, 512));
        m.extend([i as u8 + 1; 512]);
    }
    m.extend(req(proto::CMD_DISC, 0, 9, 0, 0));
    c.write_all(&m).await.unwrap();
    let mut cookies: Vec<u64> = Vec::new();
    for _ in 0..4 {
        let (err, cookie) = reply(&mut c).await;
        assert_eq!(err, 0);
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, [0, 1, 2, 3]);
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).await.unwrap(), 0, "closed after the replies");
    // The writes are on the device: a new connection reads them back.
    let (mut c2, s) = tokio::io::duplex(1 << 20);
    server.spawn_conn(s);
    client_go(&mut c2, "C").await;
    let data = read_back(&mut c2, 0, 4 * 512).await;
    for (i, chunk) in data.chunks(512).enumerate() {
        assert!(chunk.iter().all(|&x| x == i as u8 + 1), "block {i}");
    }
}
