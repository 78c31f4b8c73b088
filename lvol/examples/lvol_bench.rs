//! Quick in-process figures for the lvol layer (run with `--release`):
//! 4 KiB random read and write on a thick lvol vs its base bdev, 4 KiB random read of an esnap
//! clone with no allocated cluster vs its base read directly, and snapshot + clone creation
//! rate on a store holding 1,000 lvols. `LVOL_BENCH_SECS` sets the seconds per I/O run
//! (default 2). With `LVOL_BENCH_DIR=<dir>` the bases are aio bdevs over files in that
//! directory (O_DIRECT when `LVOL_BENCH_DIRECT=1`) instead of malloc bdevs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev_core::backend::aio::{AioBdev, AioOpts};
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{BlockDevice, Descriptor, IoBuf, Registry};
use futures::executor::block_on;
use lvol::{LvolModule, LvsOpts};

const MIB: u64 = 1 << 20;
const QD: usize = 32;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// CPU time used by the process so far, in nanoseconds (the machine may be shared: CPU time
/// per request is steadier than wall-clock IOPS).
fn cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Random 4 KiB I/O over the first `span` bytes for `secs`, `QD` requests in flight; IOPS.
/// Also prints the CPU time per request.
async fn randio(d: &Descriptor, span: u64, write: bool, secs: f64) -> f64 {
    let cpu0 = cpu_ns();
    let bl = u64::from(d.device().block_len());
    let blocks = span / 4096;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let align = d.device().buf_align().max(1);
    let workers = (0..QD).map(|w| async move {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1));
        let mut n = 0u64;
        let mut buf = IoBuf::new(4096, align);
        buf.fill(w as u8);
        while Instant::now() < deadline {
            let lba = (rng.next() % blocks) * 4096 / bl;
            buf = if write {
                d.write(lba, buf).await.expect("write")
            } else {
                d.read(lba, buf).await.expect("read")
            };
            n += 1;
        }
        n
    });
    let total: u64 = futures::future::join_all(workers).await.into_iter().sum();
    println!(
        "  {} {}: {:.0} ns CPU per request",
        d.device().module_name(),
        if write { "write" } else { "read" },
        (cpu_ns() - cpu0) as f64 / total.max(1) as f64
    );
    total as f64 / secs
}

/// A 4 KiB-block base: malloc, or aio over a file when `LVOL_BENCH_DIR` is set.
fn base_dev(name: &str, size: u64) -> Arc<dyn BlockDevice> {
    match std::env::var_os("LVOL_BENCH_DIR") {
        Some(dir) => {
            let path = std::path::Path::new(&dir).join(format!("{name}.img"));
            let f = std::fs::File::create(&path).expect("create bench file");
            f.set_len(size).expect("size bench file");
            let direct = std::env::var("LVOL_BENCH_DIRECT").is_ok_and(|v| v == "1");
            AioBdev::create(AioOpts {
                name: name.to_string(),
                filename: path,
                block_len: Some(4096),
                direct,
                ..AioOpts::default()
            })
            .expect("aio")
        }
        None => MallocBdev::create(name, size / 4096, 4096, None).expect("malloc"),
    }
}

fn main() {
    let secs: f64 = std::env::var("LVOL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    block_on(async {
        let reg = Registry::new();
        let m = LvolModule::new(reg.clone());

        // Thick lvol vs base.
        let base = base_dev("base", 512 * MIB);
        reg.register(base).await.expect("register");
        let s = m
            .create_lvstore("base", LvsOpts::new("lvs"))
            .await
            .expect("lvs");
        let l = m
            .create_lvol(&s, "thick", 256 * MIB, false, Default::default())
            .await
            .expect("lvol");
        let dl = reg.open(l.unique_id(), true).expect("open lvol");
        let span = 256 * MIB;
        // The base descriptor reads the same region the lvol lives on (its data clusters).
        let db = reg.open("base", false).expect("open base");
        for (what, write) in [("randread", false), ("randwrite", true)] {
            let lv = randio(&dl, span, write, secs).await;
            let bv = if write {
                // Writing the claimed base is refused; compare against a separate malloc bdev.
                let other = base_dev("plain", 512 * MIB);
                if reg.get("plain").is_none() {
                    reg.register(other).await.expect("register");
                }
                let dp = reg.open("plain", true).expect("open plain");
                randio(&dp, span, true, secs).await
            } else {
                randio(&db, span, false, secs).await
            };
            println!(
                "{what} 4k qd{QD}: lvol {lv:.0} IOPS, base {bv:.0} IOPS, ratio {:.3}",
                lv / bv
            );
        }
        drop((dl, db));

        // Esnap clone with nothing allocated vs its base.
        let eb = base_dev("ebase", 256 * MIB);
        reg.register(eb).await.expect("register");
        {
            let d = reg.open("ebase", true).expect("open");
            let mut off = 0;
            while off < 256 * MIB / 4096 {
                let mut b = IoBuf::new(MIB as usize, 4096);
                b.fill((off % 251) as u8);
                d.write(off, b).await.expect("fill");
                off += MIB / 4096;
            }
        }
        let ec = m
            .create_esnap_clone("ebase", &s, "ec")
            .await
            .expect("esnap clone");
        let de = reg.open(ec.unique_id(), false).expect("open clone");
        let dbe = reg.open("ebase", false).expect("open ebase");
        let cv = randio(&de, 256 * MIB, false, secs).await;
        let bv = randio(&dbe, 256 * MIB, false, secs).await;
        println!(
            "esnap randread 4k qd{QD}: clone {cv:.0} IOPS, base {bv:.0} IOPS, ratio {:.3}",
            cv / bv
        );
        drop((de, dbe));

        // Snapshot + clone creation with 1,000 lvols in the store.
        let big = MallocBdev::create("big", 4096 * MIB / 4096, 4096, None).expect("malloc");
        reg.register(big).await.expect("register");
        let mut o = LvsOpts::new("many");
        o.cluster_size = MIB as u32;
        let sm = m.create_lvstore("big", o).await.expect("lvs");
        let t0 = Instant::now();
        let mut lvols = Vec::new();
        for i in 0..1000 {
            lvols.push(
                m.create_lvol(&sm, &format!("v{i}"), MIB, true, Default::default())
                    .await
                    .expect("create"),
            );
        }
        let create = t0.elapsed();
        let n = 100;
        let t0 = Instant::now();
        for (i, l) in lvols.iter().take(n).enumerate() {
            let snap = m
                .create_snapshot(l, &format!("s{i}"))
                .await
                .expect("snapshot");
            m.create_clone(&snap, &format!("c{i}"))
                .await
                .expect("clone");
        }
        let el = t0.elapsed();
        println!(
            "1000 thin lvols created in {:.2} s; snapshot+clone: {:.1} pairs/s ({n} pairs in {:.2} s)",
            create.as_secs_f64(),
            n as f64 / el.as_secs_f64(),
            el.as_secs_f64()
        );
        let _keep: Vec<Arc<lvol::Lvol>> = lvols;
    });
}
