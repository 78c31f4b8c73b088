//! The client against a small NBD server written here, for what qemu-nbd will not do on
//! demand: replies in reverse order, a server that stops answering, error replies,
//! `NBD_ESHUTDOWN`, and a 4096-byte minimum block size.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use bdev_core::{BlockDevice, Descriptor, IoBuf, Registry};
use bdev_nbd::{NbdClientBdev, NbdClientOpts};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Collect this many requests (or whatever came within 50 ms), answer them last first.
    Reverse(usize),
    /// Complete the handshake, then never answer.
    Hang,
    /// Answer writes with this NBD error value.
    WriteError(u32),
    /// Answer the first request of the first connection with NBD_ESHUTDOWN and close it.
    ShutdownFirst,
}

struct Fake {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// Connections accepted.
    conns: Arc<AtomicUsize>,
    /// Most requests held at once before answering.
    max_batch: Arc<AtomicUsize>,
    /// NBD_CMD_FLUSH requests received.
    flushes: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = UnixStream::connect(&self.path);
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// The server side of the fixed-newstyle handshake, answering NBD_OPT_GO.
fn handshake(s: &mut UnixStream, size: u64, flags: u16, min_block: u32) -> std::io::Result<()> {
    s.write_all(&0x4e42_444d_4147_4943u64.to_be_bytes())?;
    s.write_all(&0x4948_4156_454f_5054u64.to_be_bytes())?;
    s.write_all(&3u16.to_be_bytes())?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let mut h = [0u8; 16];
    s.read_exact(&mut h)?;
    assert_eq!(be32(&h[8..]), 7, "NBD_OPT_GO expected");
    let mut data = vec![0u8; be32(&h[12..]) as usize];
    s.read_exact(&mut data)?;
    let reply = |s: &mut UnixStream, typ: u32, payload: &[u8]| -> std::io::Result<()> {
        s.write_all(&0x0003_e889_0455_65a9u64.to_be_bytes())?;
        s.write_all(&7u32.to_be_bytes())?;
        s.write_all(&typ.to_be_bytes())?;
        s.write_all(&(payload.len() as u32).to_be_bytes())?;
        s.write_all(payload)
    };
    let mut p = 0u16.to_be_bytes().to_vec();
    p.extend_from_slice(&size.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    reply(s, 3, &p)?;
    let mut p = 3u16.to_be_bytes().to_vec();
    for v in [min_block, min_block.max(4096), 1 << 20] {
        p.extend_from_slice(&v.to_be_bytes());
    }
    reply(s, 3, &p)?;
    reply(s, 1, &[])
}

fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut r = 0x6744_6698u32.to_be_bytes().to_vec();
    r.extend_from_slice(&error.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r
}

fn serve(mut s: UnixStream, mode: Mode, data: Arc<Mutex<Vec<u8>>>, first: bool, fake: &FakeCtl) {
    let size = data.lock().unwrap().len() as u64;
    if handshake(&mut s, size, fake.flags, fake.min_block).is_err() {
        return;
    }
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let mut held: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut buf = Vec::new();
    loop {
        if fake.stop.load(Ordering::Acquire) {
            return;
        }
        let mut h = [0u8; 28];
        let got = read_full(&mut s, &mut h, &fake.stop);
        match got {
            Some(true) => {}
            Some(false) => {
                // Timed out between requests: answer what is held.
                if let Mode::Reverse(_) = mode {
                    flush_held(&mut s, &mut held, &fake.max_batch);
                }
                continue;
            }
            None => return,
        }
        let typ = u16::from_be_bytes([h[6], h[7]]);
        let cookie = be64(&h[8..]);
        let off = be64(&h[16..]) as usize;
        let len = be32(&h[24..]) as usize;
        if typ == 2 {
            return;
        }
        if typ == 3 {
            fake.flushes.fetch_add(1, Ordering::AcqRel);
        }
        if typ == 1 {
            buf.resize(len, 0);
            if read_full(&mut s, &mut buf, &fake.stop) != Some(true) {
                return;
            }
        }
        let reply = match mode {
            Mode::Hang => continue,
            Mode::ShutdownFirst if first => {
                let _ = s.write_all(&simple_reply(108, cookie));
                return;
            }
            Mode::WriteError(e) if typ == 1 => simple_reply(e, cookie),
            _ => {
                let mut d = data.lock().unwrap();
                let mut r = simple_reply(0, cookie);
                match typ {
                    0 => r.extend_from_slice(&d[off..off + len]),
                    1 => d[off..off + len].copy_from_slice(&buf),
                    _ => {}
                }
                r
            }
        };
        match mode {
            Mode::Reverse(n) => {
                held.push((cookie, reply));
                if held.len() >= n {
                    flush_held(&mut s, &mut held, &fake.max_batch);
                }
            }
            _ => {
                if s.write_all(&reply).is_err() {
                    return;
                }
            }
        }
    }
}

fn flush_held(s: &mut UnixStream, held: &mut Vec<(u64, Vec<u8>)>, max: &AtomicUsize) {
    max.fetch_max(held.len(), Ordering::AcqRel);
    while let Some((_, r)) = held.pop() {
        let _ = s.write_all(&r);
    }
}

/// Reads all of `b`: `Some(true)` done, `Some(false)` timed out before the first byte, `None`
/// closed or stopped.
fn read_full(s: &mut UnixStream, b: &mut [u8], stop: &AtomicBool) -> Option<bool> {
    let mut n = 0;
    while n < b.len() {
        match s.read(&mut b[n..]) {
            Ok(0) => return None,
            Ok(k) => n += k,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                if stop.load(Ordering::Acquire) {
                    return None;
                }
                if n == 0 {
                    return Some(false);
                }
            }
            Err(_) => return None,
        }
    }
    Some(true)
}

struct FakeCtl {
    stop: Arc<AtomicBool>,
    max_batch: Arc<AtomicUsize>,
    flushes: Arc<AtomicUsize>,
    min_block: u32,
    /// Transmission flags offered.
    flags: u16,
}

/// Has flags, flush, trim.
const FLAGS: u16 = 1 | 4 | 32;

fn start(mode: Mode, size: usize, min_block: u32) -> (Fake, Arc<Mutex<Vec<u8>>>) {
    start_with(mode, size, min_block, FLAGS)
}

fn start_with(mode: Mode, size: usize, min_block: u32, flags: u16) -> (Fake, Arc<Mutex<Vec<u8>>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let data = Arc::new(Mutex::new(pattern(TAG, 0, size)));
    let fake = Fake {
        path,
        stop: Arc::new(AtomicBool::new(false)),
        conns: Arc::new(AtomicUsize::new(0)),
        max_batch: Arc::new(AtomicUsize::new(0)),
        flushes: Arc::new(AtomicUsize::new(0)),
        _dir: dir,
    };
    let ctl = Arc::new(FakeCtl {
        stop: fake.stop.clone(),
        max_batch: fake.max_batch.clone(),
        flushes: fake.flushes.clone(),
        min_block,
        flags,
    });
    let (conns, d) = (fake.conns.clone(), data.clone());
    std::thread::spawn(move || {
        for s in listener.incoming() {
            if ctl.stop.load(Ordering::Acquire) {
                return;
            }
            let Ok(s) = s else { return };
            let first = conns.fetch_add(1, Ordering::AcqRel) == 0;
            let (ctl, d) = (ctl.clone(), d.clone());
            std::thread::spawn(move || serve(s, mode, d, first, &ctl));
        }
    });
    (fake, data)
}

fn opts(name: &str, fake: &Fake) -> NbdClientOpts {
    let mut o = NbdClientOpts::new(name, &format!("unix:{}", fake.path.display()), "");
    o.reconnect_attempts = 2;
    o.reconnect_delay_ms = 50;
    o.io_timeout_ms = 400;
    o
}

/// Runs `body` within 20 s on a client bdev `name` over `fake`, a descriptor of it (writable
/// when `write`) and the registry; then closes the descriptor and deletes the bdev.
fn on_client<F, Fut>(fake: &Fake, name: &str, write: bool, body: F)
where
    F: FnOnce(Arc<NbdClientBdev>, Descriptor, Registry) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (reg, clients) = nbd_clients();
    block_within(20, async {
        let dev = clients.create(opts(name, fake)).await.unwrap();
        let desc = reg.open(name, write).unwrap();
        body(dev, desc, reg.clone()).await;
        clients.delete(name).await.unwrap();
    });
}

#[test]
fn replies_out_of_order_are_matched_by_cookie() {
    let (fake, _data) = start(Mode::Reverse(16), 1 << 20, 4096);
    on_client(&fake, "ooo", true, |dev, desc, _| async move {
        // The server's minimum block size is the bdev's block size.
        assert_eq!(dev.block_len(), 4096);
        assert_eq!(dev.num_blocks(), 256);
        read_all_at_once(&desc, (0..64u64).map(|i| (i * 7) % 256)).await;
        let writes: Vec<(u64, u8)> = (0..32u64).map(|i| (i, i as u8 + 1)).collect();
        write_all_at_once(&desc, &writes).await;
    });
    // The server held 16 requests before answering any: they were all in flight together.
    assert_eq!(fake.max_batch.load(Ordering::Acquire), 16);
}

#[test]
fn a_server_that_stops_answering_cannot_hang_io() {
    let (fake, _data) = start(Mode::Hang, 1 << 20, 512);
    let conns = &fake.conns;
    on_client(&fake, "hang", false, |_, desc, _| async move {
        let t0 = Instant::now();
        let e = desc.read(0, IoBuf::new(512, 1)).await.unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        // Timeout, reconnect, resubmit, a few times over; bounded well below the test limit.
        assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
        assert!(conns.load(Ordering::Acquire) >= 2, "no reconnect");
    });
}

#[test]
fn error_replies_map_to_errno_and_keep_the_connection() {
    let (fake, data) = start(Mode::WriteError(28), 1 << 20, 512);
    let conns = &fake.conns;
    on_client(&fake, "err", true, |dev, desc, _| async move {
        let e = desc.write(0, IoBuf::new(512, 1)).await.unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        check_pattern(&desc, 0, 8).await.unwrap();
        desc.flush().await.unwrap();
        assert!(dev.is_connected());
        assert_eq!(conns.load(Ordering::Acquire), 1);
    });
    assert!(data.lock().unwrap()[..512] == pattern(TAG, 0, 512)[..]);
}

#[test]
fn eshutdown_reconnects_and_resubmits() {
    let (fake, _data) = start(Mode::ShutdownFirst, 1 << 20, 512);
    let conns = &fake.conns;
    on_client(&fake, "shut", false, |_, desc, reg| async move {
        check_pattern(&desc, 5, 3).await.unwrap();
        assert_eq!(conns.load(Ordering::Acquire), 2);
        assert!(reg.get("shut").is_some());
    });
}

#[test]
fn flush_is_sent_when_offered_and_not_advertised_otherwise() {
    // Offered: the bdev advertises flush and a volatile cache, and each flush is one
    // NBD_CMD_FLUSH on the wire.
    let (fake, _data) = start(Mode::Reverse(1), 1 << 20, 512);
    on_client(&fake, "fl", true, |dev, desc, _| async move {
        assert!(dev.io_type_supported(bdev_core::IoType::Flush));
        assert!(dev.has_volatile_cache());
        desc.write(0, IoBuf::from_slice(&[7; 512], 1))
            .await
            .unwrap();
        desc.flush().await.unwrap();
        desc.flush().await.unwrap();
    });
    assert_eq!(fake.flushes.load(Ordering::Acquire), 2);

    // Not offered: no flush support, no volatile cache, and nothing goes on the wire.
    let (fake, _data) = start_with(Mode::Reverse(1), 1 << 20, 512, 1 | 32);
    on_client(&fake, "nf", true, |dev, desc, _| async move {
        assert!(!dev.io_type_supported(bdev_core::IoType::Flush));
        assert!(!dev.has_volatile_cache());
        desc.write(0, IoBuf::from_slice(&[7; 512], 1))
            .await
            .unwrap();
        assert_eq!(desc.flush().await.unwrap_err().errno(), libc::ENOTSUP);
    });
    assert_eq!(fake.flushes.load(Ordering::Acquire), 0);
}
