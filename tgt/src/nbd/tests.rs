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

async fn client_go<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, export: &str) -> (u64, u16) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(g, proto::greeting());
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    let mut o = proto::IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    o.extend_from_slice(&(d.len() as u32).to_be_bytes());
    o.extend_from_slice(&d);
    s.write_all(&o).await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_unaligned_io_and_removal() {
    let registry = Registry::new();
    let dev = MallocBdev::create("M", 2048, 512, None).unwrap();
    registry.register(dev).await.unwrap();
    let server = NbdServer::new(registry.clone());
    assert_eq!(server.add_export("M", Some("m"), true).unwrap(), "m");
    let (mut c, s) = tokio::io::duplex(1 << 20);
    server.spawn_conn(s);
    let (size, flags) = client_go(&mut c, "m").await;
    assert_eq!(size, 1 << 20);
    assert_eq!(flags & proto::TFLAG_READ_ONLY, 0);

    // 64 writes of 1000 bytes at unaligned offsets, all sent before any reply is read.
    let mut msg = Vec::new();
    for i in 0..64u64 {
        let r = proto::Request {
            flags: 0,
            cmd: proto::CMD_WRITE,
            cookie: i,
            offset: i * 1000 + 7,
            len: 1000,
        };
        msg.extend_from_slice(&proto::encode_request(&r));
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
    let z = proto::Request {
        flags: 0,
        cmd: proto::CMD_WRITE_ZEROES,
        cookie: 100,
        offset: 1500,
        len: 600,
    };
    c.write_all(&proto::encode_request(&z)).await.unwrap();
    let mut h = [0u8; 16];
    c.read_exact(&mut h).await.unwrap();
    assert_eq!(h, proto::simple_reply(0, 100));
    let rd = proto::Request {
        flags: 0,
        cmd: proto::CMD_READ,
        cookie: 101,
        offset: 0,
        len: 65_000,
    };
    c.write_all(&proto::encode_request(&rd)).await.unwrap();
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
    let registry = Registry::new();
    let dev = MallocBdev::create("M", 1024, 4096, None).unwrap();
    registry.register(dev).await.unwrap();
    let server = NbdServer::new(registry.clone());
    server.add_export("M", None, true).unwrap();
    // A 4 KiB pipe: every large payload arrives in many pieces.
    let (mut c, s) = tokio::io::duplex(4096);
    server.spawn_conn(s);
    let (size, _) = client_go(&mut c, "").await;
    assert_eq!(size, 4 << 20);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let w = proto::Request {
        flags: proto::CMD_FLAG_FUA,
        cmd: proto::CMD_WRITE,
        cookie: 1,
        offset: 8192,
        len: data.len() as u32,
    };
    let bad = proto::Request {
        flags: 0,
        cmd: proto::CMD_READ,
        cookie: 2,
        offset: 4 << 20,
        len: 4096,
    };
    let r = proto::Request {
        flags: 0,
        cmd: proto::CMD_READ,
        cookie: 3,
        offset: 8192,
        len: data.len() as u32,
    };
    let mut msg = proto::encode_request(&w).to_vec();
    msg.extend_from_slice(&data);
    msg.extend_from_slice(&proto::encode_request(&bad));
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
    wr.write_all(&proto::encode_request(&r)).await.unwrap();
    rd.read_exact(&mut h).await.unwrap();
    assert_eq!(h, proto::simple_reply(0, 3));
    let mut back = vec![0u8; data.len()];
    rd.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);
    // Disconnect: the server closes its side.
    let d = proto::Request {
        flags: 0,
        cmd: proto::CMD_DISC,
        cookie: 4,
        offset: 0,
        len: 0,
    };
    wr.write_all(&proto::encode_request(&d)).await.unwrap();
    let mut b = [0u8; 1];
    assert_eq!(rd.read(&mut b).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_cannot_block_removal() {
    let registry = Registry::new();
    let dev = MallocBdev::create("M", 4096, 4096, None).unwrap();
    registry.register(dev).await.unwrap();
    let server = NbdServer::new(registry.clone());
    server.add_export("M", None, true).unwrap();
    let (mut c, s) = tokio::io::duplex(64 << 10);
    server.spawn_conn(s);
    client_go(&mut c, "M").await;
    // 16 MiB of read replies that nobody reads.
    for i in 0..16u64 {
        let r = proto::Request {
            flags: 0,
            cmd: proto::CMD_READ,
            cookie: i,
            offset: i << 20,
            len: 1 << 20,
        };
        c.write_all(&proto::encode_request(&r)).await.unwrap();
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
        self.inner.read(o, b).await
    }
    async fn write(&self, o: u64, b: IoBuf) -> bdev_core::Result<IoBuf> {
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
    let registry = Registry::new();
    let flushes = Arc::new(AtomicUsize::new(0));
    let dev = Arc::new(Counting {
        inner: MallocBdev::create("M", 1024, 512, None).unwrap(),
        flushes: flushes.clone(),
    });
    registry.register(dev).await.unwrap();
    let server = NbdServer::new(registry.clone());
    server.add_export("C", None, true).unwrap();
    let (mut c, s) = tokio::io::duplex(1 << 20);
    server.spawn_conn(s);
    let (_, flags) = client_go(&mut c, "C").await;
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
    let registry = Registry::new();
    let dev = MallocBdev::create("M", 2048, 512, None).unwrap();
    registry.register(dev).await.unwrap();
    let server = NbdServer::new(registry.clone());
    server.add_export("M", None, true).unwrap();
    let (mut c, s) = tokio::io::duplex(1 << 20);
    server.spawn_conn(s);
    client_go(&mut c, "M").await;
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
    let registry = Registry::new();
    let dev = MallocBdev::create("M", 64 << 11, 512, None).unwrap(); // 64 MiB
    registry.register(dev).await.unwrap();
    let limits = Limits {
        nbd_conn_mem: 4 << 20,
        nbd_total_mem: 16 << 20,
        stall_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let server = NbdServer::with_limits(registry.clone(), limits);
    server.add_export("M", None, true).unwrap();
    let (mut c, s) = tokio::io::duplex(64 << 10);
    server.spawn_conn(s);
    client_go(&mut c, "M").await;
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
    let registry = Registry::new();
    let dev = MallocBdev::create("M", 64 << 11, 512, None).unwrap();
    registry.register(dev).await.unwrap();
    let limits = Limits {
        stall_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = NbdServer::with_limits(registry.clone(), limits);
    server.add_export("M", None, true).unwrap();
    let (mut c, s) = tokio::io::duplex(1 << 20);
    server.spawn_conn(s);
    client_go(&mut c, "M").await;
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
