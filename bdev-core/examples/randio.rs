//! QD-N 4 KiB random read / write against an aio bdev, driven by one thread through futures.
//! Used to tune the io_uring engine against `fio` on the same file.
//!
//! ```text
//! cargo run --release -p bdev-core --example randio -- FILE [randread|randwrite] [SECONDS]
//!     [QD] [uring|pool] [direct|buffered] [reactor|futures]
//! ```
//! The file is created (1 GiB, fully written) when missing.

use std::cell::Cell;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bdev_core::backend::aio::{AioBdev, AioEngine, AioOpts};
use bdev_core::{IoBuf, Registry};

const SIZE: u64 = 1 << 30;
const BS: usize = 4096;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = PathBuf::from(args.get(1).map(String::as_str).unwrap_or("/tmp/randio.dat"));
    let mode = args
        .get(2)
        .map(String::as_str)
        .unwrap_or("randread")
        .to_string();
    let secs: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let qd: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(32);
    let engine = match args.get(5).map(String::as_str) {
        Some("pool") => AioEngine::ThreadPool,
        _ => AioEngine::Uring,
    };
    let direct = args.get(6).map(String::as_str) != Some("buffered");
    let reactor = args.get(7).map(String::as_str) != Some("futures");

    if std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) < SIZE {
        eprintln!("writing {}", path.display());
        let mut f = std::fs::File::create(&path).expect("create");
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..(SIZE >> 20) {
            f.write_all(&chunk).expect("write");
        }
        f.sync_all().expect("sync");
    }

    let reg = Registry::new();
    let dev = AioBdev::create(AioOpts {
        name: "aio0".into(),
        filename: path.clone(),
        block_len: Some(512),
        direct,
        engine,
        ..Default::default()
    })
    .expect("create aio bdev");
    eprintln!("engine {:?} direct {direct}", dev.engine());
    futures::executor::block_on(reg.register(dev)).expect("register");
    let desc = reg.open("aio0", true).expect("open");
    let blocks_per_io = (BS / 512) as u64;
    let slots = SIZE / BS as u64;
    let write = mode == "randwrite";
    let done = Cell::new(0u64);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let workers = (0..qd).map(|i| {
        let desc = &desc;
        let done = &done;
        async move {
            let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ ((i as u64 + 1) * 0x1000_0001);
            let mut buf = IoBuf::new(BS, 4096);
            buf.fill(i as u8);
            let mut n = 0u64;
            loop {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let off = (seed % slots) * blocks_per_io;
                buf = if write {
                    desc.write(off, buf).await.expect("write")
                } else {
                    desc.read(off, buf).await.expect("read")
                };
                n += 1;
                if n.is_multiple_of(64) && Instant::now() >= deadline {
                    break;
                }
            }
            done.set(done.get() + n);
        }
    });
    if reactor {
        bdev_core::reactor::block_on(futures::future::join_all(workers));
    } else {
        futures::executor::block_on(futures::future::join_all(workers));
    }
    let el = start.elapsed().as_secs_f64();
    let iops = done.get() as f64 / el;
    println!(
        "{mode} qd={qd} bs=4k engine={:?} executor={}: {:.0} IOPS ({} I/Os in {el:.2}s)",
        engine,
        if reactor { "reactor" } else { "futures" },
        iops,
        done.get()
    );
}
