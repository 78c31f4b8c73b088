//! 4 KiB reads from a qemu-nbd export over a Unix socket: `qemu-img bench` straight from
//! qemu-nbd, the NBD client bdev, and an esnap clone (all clusters unallocated) over it.
//!
//! `cargo run --release -p bdev-nbd --example nbd_read_bench -- [COUNT] [DEPTH]`
//! (defaults 200000 and 32). Reads are sequential 4 KiB steps wrapping at the end of a 64 MiB
//! image, as `qemu-img bench -s 4096` does, with DEPTH requests in flight.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{BlockDevice, Descriptor, IoBuf, Registry};
use bdev_nbd::{NbdClientOpts, NbdClients};
use lvol::{LvolModule, LvsOpts};

const SIZE: u64 = 64 << 20;
const IO: u64 = 4096;

fn main() {
    let mut args = std::env::args().skip(1);
    let count: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let depth: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("golden.raw");
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8 + 1).collect();
    std::fs::write(&file, &data).expect("write image");
    let sock = dir.path().join("golden.sock");
    let mut srv = Command::new("qemu-nbd")
        .args(["-r", "-t", "-e", "8", "-x", "golden", "-f", "raw", "-k"])
        .arg(&sock)
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-nbd (is it installed?)");
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "qemu-nbd did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let qemu = qemu_img_bench(&sock, count, depth);
    println!("qemu-img bench (qemu-nbd, unix socket): {:>9.0} IOPS", qemu);

    let reg = Registry::new();
    let clients = NbdClients::new(reg.clone());
    let lvm = LvolModule::new(reg.clone());
    let (nbd, clone) = futures::executor::block_on(async {
        let addr = format!("unix:{}", sock.display());
        let dev = clients
            .create(NbdClientOpts::new("golden", &addr, "golden"))
            .await
            .expect("nbd client");
        let store = MallocBdev::create("store", (256 << 20) / 512, 512, None).expect("malloc");
        reg.register(store).await.expect("register");
        let mut lo = LvsOpts::new("lvs");
        lo.cluster_size = 1 << 20;
        let s = lvm.create_lvstore("store", lo).await.expect("lvstore");
        lvm.create_esnap_clone(&dev.uuid().to_string(), &s, "ec")
            .await
            .expect("esnap clone");
        let nbd = run_reads(&reg.open("golden", false).expect("open"), count, depth).await;
        let clone = run_reads(&reg.open("lvs/ec", false).expect("open"), count, depth).await;
        (nbd, clone)
    });
    println!("NBD client bdev:                        {:>9.0} IOPS", nbd);
    println!(
        "esnap clone over the NBD client bdev:   {:>9.0} IOPS",
        clone
    );
    println!(
        "ratios to qemu-img bench: bdev {:.2}, esnap clone {:.2}",
        nbd / qemu,
        clone / qemu
    );
    let _ = srv.kill();
    let _ = srv.wait();
}

/// IOPS of `qemu-img bench` reading COUNT x 4 KiB at DEPTH from the export.
fn qemu_img_bench(sock: &Path, count: u64, depth: u64) -> f64 {
    let url = format!("nbd+unix:///golden?socket={}", sock.display());
    let t0 = Instant::now();
    let out = Command::new("qemu-img")
        .args(["bench", "-f", "raw", "-s", "4096"])
        .args(["-c", &count.to_string(), "-d", &depth.to_string()])
        .arg(&url)
        .output()
        .expect("run qemu-img bench");
    let wall = t0.elapsed().as_secs_f64();
    assert!(out.status.success(), "qemu-img bench failed");
    // "Run completed in 1.234 seconds."
    let text = String::from_utf8_lossy(&out.stdout);
    let secs = text
        .split("Run completed in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(wall);
    count as f64 / secs
}

/// IOPS of COUNT x 4 KiB sequential reads through a descriptor, DEPTH in flight.
async fn run_reads(desc: &Descriptor, count: u64, depth: u64) -> f64 {
    let next = Arc::new(AtomicU64::new(0));
    let blocks_per_io = IO / u64::from(desc.block_len());
    let wrap = SIZE / IO;
    let t0 = Instant::now();
    let workers = (0..depth).map(|_| {
        let next = next.clone();
        async move {
            let mut buf = IoBuf::new(IO as usize, 4096);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let lba = (i % wrap) * blocks_per_io;
                buf = desc.read(lba, buf).await.expect("read");
            }
        }
    });
    futures::future::join_all(workers).await;
    count as f64 / t0.elapsed().as_secs_f64()
}
