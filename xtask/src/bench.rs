//! `cargo xtask bench`: our figures next to our peers' on the same files, the same pattern
//! and queue depth, the same CPU set, in the same invocation.
//!
//! Method (docs/benchmarks.md gives the why):
//! - Every process of a side (our `bench` binary, our `tgt` and its NBD client, fio, qemu-img,
//!   qemu-nbd, SPDK's bdevperf) runs under `taskset -c CPUS` (`--cpus`, default the last core
//!   of our affinity mask).
//! - An entry runs `--rounds` rounds (default 5); in round `r` the sides run in the order
//!   rotated by `r` ([`round_order`]), so no side always goes first.
//! - The JSON of an entry (`target/bench/<name>.json`) keeps every run of every side, its
//!   median, min and max, the side that goes into the ratio (the best peer by median) and the
//!   ratio of medians; an SPDK bdevperf peer has its own ratio.
//! - Entries that write get their own file (`scratch`) or a fresh store/clone; the pattern
//!   file is only ever opened read-only, and is checked (and rewritten if it changed) before
//!   every entry that reads it.
//!
//! A benchmark is one [`Bench`]: a [`Work`] (what I/O), our [`Ours`] setup, its [`Peer`]s, and
//! whether an SPDK bdevperf run of the same workload exists ([`SpdkJob`]).

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::util;

#[path = "bench_listing.rs"]
mod listing;
#[path = "bench_scale.rs"]
mod scale;

/// Size of the data files of a complete run.
const FULL_FILE_SIZE: u64 = 1 << 30;
/// Size of the data files of a `--quick` run.
const QUICK_FILE_SIZE: u64 = 256 << 20;
/// Seconds of a timed run of a complete run.
const FULL_SECS: f64 = 10.0;
/// Seconds of a timed run in `--quick` mode.
const QUICK_SECS: f64 = 0.5;
/// The uuid of the base bdev of every esnap clone built by RPC (ours over NBD, SPDK).
const BASE_UUID: &str = "7e5a0000-e5a0-4e5a-8e5a-0000000000b0";
/// The environment variable naming SPDK's bdevperf binary.
const SPDK_ENV: &str = "SPDK_BDEVPERF";
/// Extra arguments for bdevperf (e.g. `--no-huge -s 2048`), split on white space.
const SPDK_ARGS_ENV: &str = "SPDK_BDEVPERF_ARGS";

/// What the figure counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    Iops,
    ClustersPerSec,
    OpsPerSec,
    Ms,
    CpuPercent,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Iops => "IOPS",
            Unit::ClustersPerSec => "clusters/s",
            Unit::OpsPerSec => "ops/s",
            Unit::Ms => "ms",
            Unit::CpuPercent => "% of one core",
        }
    }
    fn higher_is_better(self) -> bool {
        !matches!(self, Unit::Ms | Unit::CpuPercent)
    }
}

/// The data file an entry uses (under `target/bench-data/`, or `.../quick/`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum DataFile {
    /// The pattern: distinct non-zero bytes in every MiB. Only opened read-only (our esnap
    /// base, the qcow2 backing file, `qemu-nbd -r`, fio and qemu-img reads); checked before
    /// every entry that reads it, rewritten if it changed.
    Pattern,
    /// Fully written scratch space for entries that write (ours and peers alike); what it
    /// holds is not promised to anyone.
    Scratch,
    /// Read entries through a store (thick lvol, blob): our side creates a fresh store on it
    /// every run and writes the whole lvol or blob once before the workload (the store zeroes
    /// new clusters, with ZERO_RANGE where the file system has it), so both sides read
    /// written blocks.
    Store,
    /// The thin lvol first-write entry's own file: its runs leave most of every cluster
    /// zeroed by the store (a hole or unwritten extent where the file system has them), which
    /// no other entry should write into.
    Thin,
    /// No file: malloc bdevs of the file size, in our process.
    Memory,
}

impl DataFile {
    fn file_name(self, size: u64) -> String {
        let kind = match self {
            DataFile::Pattern => "pattern",
            DataFile::Scratch => "scratch",
            DataFile::Store => "store",
            DataFile::Thin => "thin",
            DataFile::Memory => "memory-not-a-file",
        };
        format!("{kind}-{}m.raw", size >> 20)
    }
}

/// Direct (O_DIRECT, `cache=none`) or buffered (page cache) access by the side that opens the
/// files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Io {
    Direct,
    Buffered,
    /// Malloc bdevs: no file, no cache.
    Memory,
}

impl Io {
    fn name(self) -> &'static str {
        match self {
            Io::Direct => "direct",
            Io::Buffered => "buffered",
            Io::Memory => "malloc",
        }
    }
}

/// The order of the offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    /// Uniform random over the device.
    Rand,
    /// Sequential: each request right after the previous one.
    Seq,
    /// qemu-img bench's pattern: from 0, advance `step` bytes, wrap modulo (size - bs).
    Stride(u64),
}

/// How long a run lasts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Len {
    /// Time based: seconds of a complete run (quick runs use at most [`QUICK_SECS`]).
    Secs(f64),
    /// A fixed request count (complete, quick).
    Count(u64, u64),
    /// One write per cluster over a fraction of the file's clusters.
    PerCluster {
        cluster: u64,
        /// The fraction of the file's clusters written: `num / den`.
        num: u64,
        den: u64,
    },
}

/// The I/O of an entry.
#[derive(Clone, Copy, Debug)]
struct Work {
    write: bool,
    order: Order,
    bs: u64,
    qd: u32,
    len: Len,
}

impl Work {
    /// fio's / our `bench`'s `--rw` name.
    fn rw(&self) -> &'static str {
        match (self.order, self.write) {
            (Order::Rand, false) => "randread",
            (Order::Rand, true) => "randwrite",
            (_, false) => "read",
            (_, true) => "write",
        }
    }
    fn step(&self) -> Option<u64> {
        match self.order {
            Order::Stride(s) => Some(s),
            _ => None,
        }
    }
}

/// Our setups.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ours {
    /// Our aio bdev (io_uring) over the file; `block_len` None = the default (512).
    Aio { io: Io, block_len: Option<u32> },
    /// A lvol over the whole capacity of a fresh lvol store on the file.
    Lvol {
        thin: bool,
        /// Thin only: every cluster written once (untimed) before the workload.
        prefill: bool,
        cluster: u64,
    },
    /// A fresh esnap clone of a read-only aio bdev over the file (base block length
    /// `base_block`), its store (4 KiB blocks) on a new sparse file.
    Esnap { cluster: u64, base_block: u32 },
    /// A thick blob filling a blobstore (1 MiB clusters) initialised on the file every run.
    Blob,
    /// Load time of a blobstore holding `blobs` blobs; `recover` = the dirty-store path.
    BsLoad { blobs: u64, recover: bool },
    /// Snapshot + clone creations per second on a store holding `lvols` thin lvols.
    SnapClone { lvols: u64 },
    /// Our `tgt` serving a fresh esnap clone (1 MiB clusters, 4 KiB base blocks) of the file
    /// over its NBD export on a Unix socket.
    NbdTgtEsnap,
    /// The same `tgt` setup with no client: its CPU use while idle.
    TgtIdle,
    /// A fresh esnap clone (store in memory) whose base is our NBD client bdev connected to
    /// `qemu-nbd -r` serving the file.
    NbdClientEsnap,
    /// A malloc bdev (`block_len`) of the file size.
    Malloc { block_len: u32 },
    /// A thick lvol filling a fresh store (4 MiB clusters) on a malloc bdev (4 KiB blocks).
    MallocLvol,
    /// A fresh esnap clone (4 MiB clusters) of a malloc base (`base_block`), store on a
    /// second malloc bdev.
    MallocEsnap { base_block: u32 },
    /// A listing RPC of `tgt` on one store of 10,000 thin lvols (`bench_listing.rs`).
    Listing { method: &'static str },
    /// Our `tgt` with `reactors` reactors serving two malloc-backed lvols over NBD to two
    /// clients (`bench_scale.rs`).
    NbdScale { reactors: usize },
}

/// Our peers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Peer {
    /// One of our own setups as the reference (e.g. the raw aio bdev under a lvol).
    Ours(Ours),
    /// fio, io_uring engine, the same direct flag, the same file.
    Fio,
    /// `qemu-img bench -f raw` on the file (`-t none` for direct), the same count.
    QemuImgRaw,
    /// `qemu-img bench -w -t none` on a fresh qcow2 clone (raw backing = the file,
    /// `cluster_size`), the same count, depth, size and step.
    QemuImgCow { cluster: u64 },
    /// `qemu-nbd` serving a fresh qcow2 clone (1 MiB clusters) of the file with `--cache` and
    /// optionally `--aio`; the same NBD client as ours.
    QemuNbd {
        cache: &'static str,
        aio: Option<&'static str>,
    },
    /// `qemu-img bench` straight from `qemu-nbd -r` serving the file.
    QemuNbdRaw,
}

/// An SPDK bdevperf run of the entry's workload.
#[derive(Clone, Copy, Debug, PartialEq)]
enum SpdkJob {
    /// SPDK's aio bdev over the same file (`block_size` 512, as ours).
    Aio,
    /// A fresh esnap clone (lvol store on a new sparse file, `cluster` bytes) of SPDK's aio
    /// bdev over the file with `base_block`-byte blocks.
    Esnap { cluster: u64, base_block: u32 },
}

/// One benchmark entry.
#[derive(Clone, Debug)]
struct Bench {
    name: &'static str,
    /// One sentence on what runs.
    what: &'static str,
    unit: Unit,
    work: Work,
    file: DataFile,
    ours: Ours,
    peers: Vec<Peer>,
    spdk: Option<SpdkJob>,
}

/// A side of an entry.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    Ours,
    Peer(usize),
    Spdk,
}

const fn work(write: bool, order: Order, len: Len) -> Work {
    Work {
        write,
        order,
        bs: 4096,
        qd: 32,
        len,
    }
}

/// Requests of an NBD sequential run (complete, quick).
const NBD_SEQ_COUNT: Len = Len::Count(50_000, 5_000);

fn benches() -> Vec<Bench> {
    let aio = Ours::Aio {
        io: Io::Direct,
        block_len: None,
    };
    let rand = |write| work(write, Order::Rand, Len::Secs(FULL_SECS));
    let mut v = vec![
        Bench {
            name: "aio_randread_4k_qd32_direct",
            what: "our aio bdev (io_uring, O_DIRECT, 512-byte blocks) on the pattern file",
            unit: Unit::Iops,
            work: rand(false),
            file: DataFile::Pattern,
            ours: aio,
            peers: vec![Peer::Fio],
            spdk: Some(SpdkJob::Aio),
        },
        Bench {
            name: "aio_randwrite_4k_qd32_direct",
            what: "our aio bdev (io_uring, O_DIRECT) on the scratch file",
            unit: Unit::Iops,
            work: rand(true),
            file: DataFile::Scratch,
            ours: aio,
            peers: vec![Peer::Fio],
            spdk: Some(SpdkJob::Aio),
        },
        Bench {
            name: "aio_strided_read_4k_step64k_qd32_direct",
            what: "our aio bdev, 4 KiB reads every 64 KiB (qemu-img bench's pattern), fixed count",
            unit: Unit::Iops,
            work: work(false, Order::Stride(64 << 10), Len::Count(500_000, 20_000)),
            file: DataFile::Pattern,
            ours: aio,
            peers: vec![Peer::QemuImgRaw],
            spdk: None,
        },
    ];
    for (name, write, file) in [
        (
            "lvol_thick_randread_4k_qd32_direct_4m_clusters",
            false,
            DataFile::Store,
        ),
        (
            "lvol_thick_randwrite_4k_qd32_direct_4m_clusters",
            true,
            DataFile::Scratch,
        ),
    ] {
        v.push(Bench {
            name,
            what: "thick lvol filling a fresh store (4 MiB clusters) on our aio bdev, written once in full before the run (untimed); peer: the raw aio bdev on the same file",
            unit: Unit::Iops,
            work: rand(write),
            file,
            ours: Ours::Lvol {
                thin: false,
                prefill: true,
                cluster: 4 << 20,
            },
            peers: vec![Peer::Ours(aio)],
            spdk: None,
        });
    }
    v.extend([
        Bench {
            name: "lvol_thin_first_write_4k_qd32_direct_1m_clusters",
            what: "thin lvol (no base) on a fresh store (clear_method none, so every cluster is stale and its first write also zeroes the rest of it): one 4 KiB write at the start of each 1 MiB cluster, each allocating it (7/8 of the clusters); peer: the raw aio bdev, 4 KiB writes at the same offsets (IOPS)",
            unit: Unit::ClustersPerSec,
            work: work(
                true,
                Order::Stride(1 << 20),
                Len::PerCluster {
                    cluster: 1 << 20,
                    // The store's metadata takes a few clusters of the file.
                    num: 7,
                    den: 8,
                },
            ),
            file: DataFile::Thin,
            ours: Ours::Lvol {
                thin: true,
                prefill: false,
                cluster: 1 << 20,
            },
            peers: vec![Peer::Ours(aio)],
            spdk: None,
        },
        Bench {
            name: "lvol_thin_allocated_randwrite_4k_qd32_direct_1m_clusters",
            what: "thin lvol on a fresh store with every cluster allocated and written in full first (untimed), then 4 KiB random writes (steady state); peer: the raw aio bdev on the same file",
            unit: Unit::Iops,
            work: rand(true),
            file: DataFile::Scratch,
            ours: Ours::Lvol {
                thin: true,
                prefill: true,
                cluster: 1 << 20,
            },
            peers: vec![Peer::Ours(aio)],
            spdk: None,
        },
    ]);
    let malloc4k = Ours::Malloc { block_len: 4096 };
    for (name, write) in [
        ("lvol_thick_randread_4k_qd32_malloc_4m_clusters", false),
        ("lvol_thick_randwrite_4k_qd32_malloc_4m_clusters", true),
    ] {
        v.push(Bench {
            name,
            what: "thick lvol filling a fresh store (4 MiB clusters) on a malloc bdev (4 KiB blocks) the size of the data files; peer: the malloc bdev itself (issue 15's lvol-over-malloc target)",
            unit: Unit::Iops,
            work: rand(write),
            file: DataFile::Memory,
            ours: Ours::MallocLvol,
            peers: vec![Peer::Ours(malloc4k)],
            spdk: None,
        });
    }
    for (name, base_block) in [
        ("esnap_randread_4k_qd32_malloc_4m_clusters_base512", 512),
        ("esnap_randread_4k_qd32_malloc_4m_clusters_base4096", 4096),
    ] {
        v.push(Bench {
            name,
            what: "fresh esnap clone (nothing allocated, 4 MiB clusters) of a malloc base, store on a second malloc bdev: every read goes to the base; peer: the base malloc bdev read directly (issue 15's esnap-over-malloc target)",
            unit: Unit::Iops,
            work: rand(false),
            file: DataFile::Memory,
            ours: Ours::MallocEsnap { base_block },
            peers: vec![Peer::Ours(Ours::Malloc { block_len: base_block })],
            spdk: None,
        });
    }
    v.extend(esnap_benches());
    v.extend([
        Bench {
            name: "blob_randread_4k_qd32_direct_1m_clusters",
            what: "thick blob filling a blobstore initialised on our aio bdev every run, written once in full (untimed), then the workload through the blob API; peer: the raw aio bdev on the same file",
            unit: Unit::Iops,
            work: rand(false),
            file: DataFile::Store,
            ours: Ours::Blob,
            peers: vec![Peer::Ours(aio)],
            spdk: None,
        },
        Bench {
            name: "blob_randwrite_4k_qd32_direct_1m_clusters",
            what: "thick blob filling a blobstore initialised on our aio bdev every run, written once in full (untimed), then the workload through the blob API; peer: the raw aio bdev on the same file",
            unit: Unit::Iops,
            work: rand(true),
            file: DataFile::Scratch,
            ours: Ours::Blob,
            peers: vec![Peer::Ours(aio)],
            spdk: None,
        },
        Bench {
            name: "blobstore_load_clean_10k_blobs",
            what: "Blobstore::load of a clean store of 10,000 one-cluster blobs (sparse file built on first use; aio io_uring O_DIRECT)",
            unit: Unit::Ms,
            work: work(false, Order::Seq, Len::Count(1, 1)),
            file: DataFile::Pattern,
            ours: Ours::BsLoad {
                blobs: 10_000,
                recover: false,
            },
            peers: vec![],
            spdk: None,
        },
        Bench {
            name: "blobstore_load_recovery_10k_blobs",
            what: "the same store loaded with forced recovery (the path of a store not marked clean); peer: its clean load; ratio = recovery ms / clean ms",
            unit: Unit::Ms,
            work: work(false, Order::Seq, Len::Count(1, 1)),
            file: DataFile::Pattern,
            ours: Ours::BsLoad {
                blobs: 10_000,
                recover: true,
            },
            peers: vec![Peer::Ours(Ours::BsLoad {
                blobs: 10_000,
                recover: false,
            })],
            spdk: None,
        },
        Bench {
            name: "lvol_snapshot_clone_1k_lvols",
            what: "a fresh lvol store (1 MiB clusters, aio io_uring O_DIRECT, sparse file) holding 1,000 thin lvols; 1,000 snapshot + clone pairs timed; one op = one snapshot or one clone",
            unit: Unit::OpsPerSec,
            work: work(false, Order::Seq, Len::Count(1000, 100)),
            file: DataFile::Pattern,
            ours: Ours::SnapClone { lvols: 1000 },
            peers: vec![],
            spdk: None,
        },
    ]);
    v.extend(nbd_benches());
    v.push(Bench {
        name: "tgt_idle_cpu_nbd_export_10s",
        what: "our tgt set up as for the NBD entries (esnap clone exported over NBD) and left idle: CPU time of the process (all threads) over 10 s, in % of one core (issue 15's target: below 1 %)",
        unit: Unit::CpuPercent,
        work: work(false, Order::Seq, Len::Secs(FULL_SECS)),
        file: DataFile::Pattern,
        ours: Ours::TgtIdle,
        peers: vec![],
        spdk: None,
    });
    v.push(Bench {
        name: "nbd_client_esnap_seqread_4k_qd32_buffered_1m_clusters",
        what: "our NBD client bdev connected to `qemu-nbd -r` serving the pattern file is the base of a fresh esnap clone (store in memory); sequential reads through the clone; peer: qemu-img bench straight from the same kind of qemu-nbd",
        unit: Unit::Iops,
        work: work(false, Order::Seq, NBD_SEQ_COUNT),
        file: DataFile::Pattern,
        ours: Ours::NbdClientEsnap,
        peers: vec![Peer::QemuNbdRaw],
        spdk: None,
    });
    v.extend(listing::benches());
    v.extend(scale::benches());
    v
}

/// The side an esnap entry is compared with.
#[derive(Clone, Copy)]
enum EsnapPeer {
    /// The base aio bdev (same block size) read directly.
    RawBase,
    /// qemu-img bench -w on a fresh qcow2 clone with the entry's cluster size.
    QemuImgCow,
    /// Only SPDK bdevperf (when set): qemu-img bench has no random order.
    SpdkOnly,
}

/// Rows of esnap entries: `(stem, what, unit, work, cluster, peer)`; each row makes two
/// entries, `STEM_base512` and `STEM_base4096`, over a base with 512- and 4096-byte blocks.
macro_rules! esnap_rows {
    ($(($stem:literal, $what:literal, $($rest:expr),+)),* $(,)?) => {
        [$(([concat!($stem, "_base512"), concat!($stem, "_base4096")], $what, $($rest),+)),*]
    };
}

/// Esnap entries, each over a base with 512- and with 4096-byte blocks.
fn esnap_benches() -> Vec<Bench> {
    let per_cluster = |cluster: u64, den: u64| Len::PerCluster {
        cluster,
        num: 1,
        den,
    };
    // One 4 KiB write per cluster (a `1/den` share of them), `step` bytes apart.
    let first_writes = |step: u64, cluster: u64, den: u64| {
        work(true, Order::Stride(step), per_cluster(cluster, den))
    };
    let rows = esnap_rows![
        (
            "esnap_randread_4k_qd32_direct_4m_clusters",
            "fresh esnap clone (nothing allocated, 4 MiB clusters) of a read-only aio bdev over the pattern file: every read goes to the base; peer: the base aio bdev read directly",
            Unit::Iops,
            work(false, Order::Rand, Len::Secs(FULL_SECS)),
            4 << 20,
            EsnapPeer::RawBase
        ),
        (
            "esnap_cow_first_write_seq_4k_qd32_direct_1m_clusters",
            "fresh esnap clone: one 4 KiB write at the start of each 1 MiB cluster in order, each copying the cluster from the base; peer: qemu-img bench -w on a fresh qcow2 clone (raw backing, cluster_size=1M)",
            Unit::ClustersPerSec,
            first_writes(1 << 20, 1 << 20, 1),
            1 << 20,
            EsnapPeer::QemuImgCow
        ),
        (
            "esnap_cow_first_write_scattered_4k_qd32_direct_1m_clusters",
            "as the seq entry, but in scattered order (stride of 97 clusters, wrapping as qemu-img bench does: every write still hits a distinct cluster; qemu-img bench has no random order, so both sides use this one)",
            Unit::ClustersPerSec,
            first_writes(97 << 20, 1 << 20, 1),
            1 << 20,
            EsnapPeer::QemuImgCow
        ),
        (
            "esnap_cow_first_write_seq_4k_qd32_direct_64k_clusters",
            "fresh esnap clone, 64 KiB clusters: one 4 KiB write at the start of each cluster of the first quarter of the file; peer: qemu-img bench -w on a fresh qcow2 clone (cluster_size=64K)",
            Unit::ClustersPerSec,
            first_writes(64 << 10, 64 << 10, 4),
            64 << 10,
            EsnapPeer::QemuImgCow
        ),
        (
            "esnap_cow_first_write_scattered_4k_qd32_direct_64k_clusters",
            "as the 64 KiB seq entry in scattered order (stride of 61 clusters, a quarter of the clusters, each hit once)",
            Unit::ClustersPerSec,
            first_writes(61 << 16, 64 << 10, 4),
            64 << 10,
            EsnapPeer::QemuImgCow
        ),
        (
            "esnap_fresh_clone_randwrite_4k_qd32_direct_1m_clusters_2s",
            "fresh esnap clone (1 MiB clusters): uniform random 4 KiB writes for 2 s, the first write to each cluster copying it; peer: SPDK bdevperf when SPDK_BDEVPERF is set (qemu-img bench has no random order: see the scattered_write entry for the qemu-img ratio)",
            Unit::Iops,
            work(true, Order::Rand, Len::Secs(2.0)),
            1 << 20,
            EsnapPeer::SpdkOnly
        ),
        (
            "esnap_fresh_clone_scattered_write_4k_qd32_direct_1m_clusters",
            "fresh esnap clone (1 MiB clusters): 4 KiB writes with a stride of 97 MiB + 4 KiB (the first 1,024 writes copy a cluster each, later ones overwrite copied clusters), fixed count; peer: qemu-img bench -w, the same stride, on a fresh qcow2 clone (cluster_size=1M)",
            Unit::Iops,
            work(true, Order::Stride((97 << 20) + 4096), Len::Count(20_000, 2_000)),
            1 << 20,
            EsnapPeer::QemuImgCow
        ),
    ];
    let mut v = Vec::new();
    for (names, what, unit, work, cluster, peer) in rows {
        for (name, base_block) in names.into_iter().zip([512u32, 4096]) {
            let (peers, spdk) = match peer {
                EsnapPeer::RawBase => (
                    vec![Peer::Ours(Ours::Aio {
                        io: Io::Direct,
                        block_len: Some(base_block),
                    })],
                    None,
                ),
                EsnapPeer::QemuImgCow => (vec![Peer::QemuImgCow { cluster }], None),
                EsnapPeer::SpdkOnly => (
                    vec![],
                    Some(SpdkJob::Esnap {
                        cluster,
                        base_block,
                    }),
                ),
            };
            v.push(Bench {
                name,
                what,
                unit,
                work,
                file: DataFile::Pattern,
                ours: Ours::Esnap {
                    cluster,
                    base_block,
                },
                peers,
                spdk,
            });
        }
    }
    v
}

/// NBD export entries: random and sequential, read and write, direct and buffered.
fn nbd_benches() -> Vec<Bench> {
    let mut v = Vec::new();
    let names = [
        (
            "nbd_esnap_randread_4k_qd32_direct_1m_clusters",
            false,
            Order::Rand,
            Io::Direct,
        ),
        (
            "nbd_esnap_randwrite_4k_qd32_direct_1m_clusters",
            true,
            Order::Rand,
            Io::Direct,
        ),
        (
            "nbd_esnap_seqread_4k_qd32_direct_1m_clusters",
            false,
            Order::Seq,
            Io::Direct,
        ),
        (
            "nbd_esnap_seqwrite_4k_qd32_direct_1m_clusters",
            true,
            Order::Seq,
            Io::Direct,
        ),
        (
            "nbd_esnap_randread_4k_qd32_buffered_1m_clusters",
            false,
            Order::Rand,
            Io::Buffered,
        ),
        (
            "nbd_esnap_randwrite_4k_qd32_buffered_1m_clusters",
            true,
            Order::Rand,
            Io::Buffered,
        ),
        (
            "nbd_esnap_seqread_4k_qd32_buffered_1m_clusters",
            false,
            Order::Seq,
            Io::Buffered,
        ),
        (
            "nbd_esnap_seqwrite_4k_qd32_buffered_1m_clusters",
            true,
            Order::Seq,
            Io::Buffered,
        ),
    ];
    for (name, write, order, io) in names {
        let cache = if io == Io::Direct {
            "none"
        } else {
            "writeback"
        };
        v.push(Bench {
            name,
            what: "our tgt's NBD export (unix socket) of a fresh esnap clone (1 MiB clusters, 4 KiB-block base = the pattern file); client: fio's nbd engine (random, timed) or qemu-img bench (sequential, fixed count); peers: qemu-nbd serving a fresh qcow2 clone (raw backing, cluster_size=1M) with the same cache mode, default aio and --aio=io_uring, the same client; the better peer counts",
            unit: Unit::Iops,
            work: work(
                write,
                order,
                if order == Order::Rand {
                    Len::Secs(FULL_SECS)
                } else {
                    NBD_SEQ_COUNT
                },
            ),
            file: DataFile::Pattern,
            ours: Ours::NbdTgtEsnap,
            peers: vec![
                Peer::QemuNbd { cache, aio: None },
                Peer::QemuNbd {
                    cache,
                    aio: Some("io_uring"),
                },
            ],
            spdk: None,
        });
    }
    v
}

impl Bench {
    /// The access mode the entry asks of the side that opens the files.
    fn io(&self) -> Io {
        match self.ours {
            Ours::Aio { io, .. } => io,
            Ours::NbdTgtEsnap => match self.peers.first() {
                Some(Peer::QemuNbd {
                    cache: "writeback", ..
                }) => Io::Buffered,
                _ => Io::Direct,
            },
            Ours::NbdClientEsnap => Io::Buffered,
            Ours::Malloc { .. } | Ours::MallocLvol | Ours::MallocEsnap { .. } => Io::Memory,
            Ours::Listing { .. } | Ours::NbdScale { .. } => Io::Memory,
            _ => Io::Direct,
        }
    }
    fn cluster(&self) -> Option<u64> {
        match self.ours {
            Ours::Lvol { cluster, .. } | Ours::Esnap { cluster, .. } => Some(cluster),
            Ours::MallocLvol | Ours::MallocEsnap { .. } => Some(4 << 20),
            Ours::NbdScale { .. } => Some(scale::CLUSTER),
            Ours::Blob | Ours::NbdTgtEsnap | Ours::NbdClientEsnap | Ours::SnapClone { .. } => {
                Some(1 << 20)
            }
            _ => None,
        }
    }
    fn base_block(&self) -> Option<u32> {
        match self.ours {
            Ours::Esnap { base_block, .. } | Ours::MallocEsnap { base_block } => Some(base_block),
            Ours::NbdTgtEsnap => Some(4096),
            _ => None,
        }
    }
    /// Whether this is an I/O entry (its name must then say the pattern, size, depth, mode).
    fn is_io(&self) -> bool {
        !matches!(
            self.ours,
            Ours::BsLoad { .. } | Ours::SnapClone { .. } | Ours::TgtIdle | Ours::Listing { .. }
        )
    }
}

/// Median, min and max of a side's runs.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

/// The summary of some figures (the median of an even count is the mean of the middle two);
/// None when there are none or one is not finite.
fn summarize(runs: &[f64]) -> Option<Summary> {
    if runs.is_empty() || runs.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let mut v = runs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

/// Ours / peer, of medians (for `ms` a ratio above 1 means slower).
fn ratio(ours: &Summary, peer: &Summary) -> Option<f64> {
    (peer.median > 0.0).then(|| ours.median / peer.median)
}

/// The best peer by median: the highest for rates, the lowest for times.
fn best_peer(peers: &[(usize, Summary)], higher_is_better: bool) -> Option<(usize, Summary)> {
    peers.iter().copied().reduce(|a, b| {
        let b_better = if higher_is_better {
            b.1.median > a.1.median
        } else {
            b.1.median < a.1.median
        };
        if b_better {
            b
        } else {
            a
        }
    })
}

/// The order the `n` sides of an entry run in, in round `round` (0-based): the list rotated
/// by the round, so with two sides they alternate which goes first and with more each side
/// goes first in turn.
fn round_order(round: u32, n: usize) -> Vec<usize> {
    if n == 0 {
        return vec![];
    }
    let r = round as usize % n;
    (0..n).map(|i| (i + r) % n).collect()
}

/// Parses a CPU list as taskset takes it (`3`, `0-3`, `0,2,4-5`) into CPU numbers.
fn parse_cpu_list(s: &str) -> Result<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let bad = || anyhow!("bad CPU list {s:?} (e.g. 1 or 0-3 or 0,2)");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b || b >= 1024 {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => {
                let c: u32 = part.parse().map_err(|_| bad())?;
                if c >= 1024 {
                    return Err(bad());
                }
                cpus.push(c);
            }
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// SPDK's `-m` core mask for a CPU list (hexadecimal, `0x...`).
fn cpu_mask(cpus: &[u32]) -> String {
    let top = cpus.iter().max().map_or(0, |m| *m as usize / 4);
    let mut nibbles = vec![0u32; top + 1];
    for &c in cpus {
        nibbles[c as usize / 4] |= 1 << (c % 4);
    }
    let hex: String = nibbles
        .iter()
        .rev()
        .map(|d| char::from_digit(*d, 16).unwrap_or('0'))
        .collect();
    let hex = hex.trim_start_matches('0');
    format!("0x{}", if hex.is_empty() { "0" } else { hex })
}

/// Our affinity mask as a CPU list (`Cpus_allowed_list` in /proc/self/status).
pub(super) fn allowed_cpus() -> Option<String> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|l| l.trim().to_string())
}

/// The last CPU of our affinity mask.
fn default_cpu() -> String {
    allowed_cpus()
        .and_then(|l| parse_cpu_list(&l).ok())
        .and_then(|c| c.last().copied())
        .unwrap_or(0)
        .to_string()
}

/// The type of the file system holding `dir` (`stat -f -c %T`: ext2/ext3, xfs, btrfs, ...).
fn fs_type(dir: &Path) -> String {
    command_line_output("stat", &["-f", "-c", "%T", &dir.display().to_string()])
        .map(|s| s.trim().replace('/', "_"))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One run of one side.
#[derive(Clone, Debug)]
struct Run {
    value: f64,
    /// How the side was started (every process, as run).
    commands: Vec<String>,
    /// Anything else worth keeping (our bench's JSON, observed open flags, ...).
    detail: Value,
}

#[derive(Clone)]
struct Ctx {
    data_dir: PathBuf,
    bench_bin: PathBuf,
    tgt_bin: PathBuf,
    out_dir: PathBuf,
    file_size: u64,
    secs_cap: f64,
    quick: bool,
    rounds: u32,
    cpus: String,
    /// Where the NBD entries' clients (fio's `nbd` engine, `qemu-img bench` over NBD) run:
    /// `--client-cpus`, by default the servers' `cpus`.
    client_cpus: String,
    spdk: Option<PathBuf>,
}

impl Ctx {
    fn file(&self, f: DataFile) -> PathBuf {
        self.data_dir.join(f.file_name(self.file_size))
    }
    /// A command pinned to the CPU set.
    fn pinned(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("taskset");
        c.args(["-c", &self.cpus]).arg(program);
        c
    }
    /// An NBD entry's client, pinned to the client CPU set.
    fn client_pinned(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("taskset");
        c.args(["-c", &self.client_cpus]).arg(program);
        c
    }
    /// How the entries' processes are pinned, in words (kept in every JSON).
    fn pinning(&self) -> String {
        if self.client_cpus == self.cpus {
            format!(
                "every process of every side under `taskset -c {}`",
                self.cpus
            )
        } else {
            format!(
                "every server and bench process under `taskset -c {}`; the NBD entries' \
                 clients (the same for every side) under `taskset -c {}`",
                self.cpus, self.client_cpus
            )
        }
    }
    fn secs(&self, full: f64) -> f64 {
        full.min(self.secs_cap)
    }
    /// Requests of a count-based run.
    fn count(&self, len: Len) -> Option<u64> {
        match len {
            Len::Secs(_) => None,
            Len::Count(full, quick) => Some(if self.quick { quick } else { full }),
            Len::PerCluster { cluster, num, den } => Some(self.file_size / cluster * num / den),
        }
    }
    fn secs_of(&self, len: Len) -> Option<f64> {
        match len {
            Len::Secs(s) => Some(self.secs(s)),
            _ => None,
        }
    }
}

const USAGE: &str = "cargo xtask bench [--quick] [--list] [--filter TEXT] [--rounds N] [--cpus LIST] [--client-cpus LIST] [--data-dir DIR]";

/// Entry point: `bench [--quick] [--list] [--filter TEXT] [--rounds N] [--cpus LIST]
/// [--client-cpus LIST] [--data-dir DIR]`. `--data-dir` puts the data files (and so every
/// store and clone) on another file system, e.g. one with reflinks; the results then go to
/// `target/bench/on-<fs type>/`. `--client-cpus` runs the NBD entries' clients on other CPUs
/// than the servers (default: the same CPUs), so the servers' cost is measured without the
/// client's on the same core.
pub fn run(args: &[String]) -> Result<()> {
    crate::check_args(
        args,
        &["--quick", "--list"],
        &[
            "--filter",
            "--rounds",
            "--cpus",
            "--client-cpus",
            "--data-dir",
        ],
    )?;
    let quick = args.iter().any(|a| a == "--quick");
    let rounds: u32 = crate::flag_value(args, "--rounds")?.unwrap_or(if quick { 1 } else { 5 });
    if rounds == 0 {
        bail!("--rounds must be at least 1\n{USAGE}");
    }
    let cpus: String = crate::flag_value(args, "--cpus")?.unwrap_or_else(default_cpu);
    parse_cpu_list(&cpus)?;
    let client_cpus: String =
        crate::flag_value(args, "--client-cpus")?.unwrap_or_else(|| cpus.clone());
    parse_cpu_list(&client_cpus)?;
    let filter: Option<String> = crate::flag_value(args, "--filter")?;
    let all = benches();
    if args.iter().any(|a| a == "--list") {
        for b in &all {
            println!("{:<64} {}", b.name, b.what);
        }
        return Ok(());
    }
    let selected: Vec<Bench> = all
        .into_iter()
        .filter(|b| filter.as_deref().is_none_or(|f| b.name.contains(f)))
        .collect();
    if selected.is_empty() {
        bail!("no benchmark matches {filter:?} (see `cargo xtask bench --list`)");
    }
    if util::which("taskset").is_none() {
        bail!("taskset (util-linux) is needed to pin every side to the same CPUs");
    }
    let target = util::target_dir();
    let sub = if quick { "quick" } else { "" };
    let spdk = std::env::var_os(SPDK_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let data_dir: Option<PathBuf> = crate::flag_value(args, "--data-dir")?;
    let (data_dir, out_dir) = match data_dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            let fs = fs_type(&d);
            (d, target.join("bench").join(format!("on-{fs}")).join(sub))
        }
        None => (
            target.join("bench-data").join(sub),
            target.join("bench").join(sub),
        ),
    };
    let ctx = Ctx {
        data_dir,
        bench_bin: target.join("release").join("bench"),
        tgt_bin: target.join("release").join("tgt"),
        out_dir,
        file_size: if quick {
            QUICK_FILE_SIZE
        } else {
            FULL_FILE_SIZE
        },
        secs_cap: if quick { QUICK_SECS } else { f64::MAX },
        quick,
        rounds,
        cpus,
        client_cpus,
        spdk,
    };
    std::fs::create_dir_all(&ctx.out_dir)?;
    let mut files: Vec<DataFile> = selected.iter().map(|b| b.file).collect();
    files.push(DataFile::Pattern);
    files.retain(|f| *f != DataFile::Memory);
    files.sort_unstable();
    files.dedup();
    for f in files {
        prepare_data_file(&ctx.file(f), ctx.file_size)?;
    }
    // Both binaries in one build, always: building one alone unifies features differently
    // and rebuilds the shared crates each time.
    let mut build = util::cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "bench",
        "--bin",
        "bench",
        "-p",
        "tgt",
        "--bin",
        "tgt",
    ]);
    util::run("build the bench and tgt binaries", &mut build)?;

    let started = Instant::now();
    let run_info = json!({
        "command": format!("cargo xtask bench {}", args.join(" ")),
        "date_utc": command_line_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "machine": machine_info(),
        "data_dir": ctx.data_dir.display().to_string(),
        "data_fs": fs_type(&ctx.data_dir),
        "cpus": ctx.cpus,
        "client_cpus": ctx.client_cpus,
        "rounds": ctx.rounds,
        "quick": ctx.quick,
        "file_size": ctx.file_size,
        "loadavg_start": loadavg(),
        "spdk": spdk_status(&ctx),
        "tools": {
            "fio": util::version_of("fio"),
            "qemu-img": util::version_of("qemu-img"),
            "qemu-nbd": util::version_of("qemu-nbd"),
        },
    });
    let mut records = Vec::new();
    let mut failures = Vec::new();
    for b in &selected {
        eprintln!("\n==> bench {}", b.name);
        match run_entry(&ctx, b) {
            Ok(rec) => {
                println!("{}", summary_line(&rec));
                records.push(rec);
            }
            Err(e) => {
                eprintln!("bench {}: FAILED: {e:#}", b.name);
                failures.push(b.name);
            }
        }
    }
    // The pattern file must still hold the pattern after everything ran.
    let pattern_ok = pattern_intact(&ctx.file(DataFile::Pattern), ctx.file_size)?;
    let mut info = run_info;
    info["loadavg_end"] = json!(loadavg());
    info["seconds"] = json!(started.elapsed().as_secs());
    info["pattern_file_intact_at_end"] = json!(pattern_ok);
    info["failed"] = json!(failures);
    std::fs::write(
        ctx.out_dir.join("_run.json"),
        serde_json::to_string_pretty(&info)? + "\n",
    )?;
    let md = markdown_table(&records) + &server_cpu_table(&records);
    std::fs::write(ctx.out_dir.join("_summary.md"), &md)?;
    println!(
        "\nresults: {} (JSON per entry, _run.json, _summary.md)",
        ctx.out_dir.display()
    );
    print!("{md}");
    if !pattern_ok {
        bail!("the pattern file changed during the run: an entry wrote to it");
    }
    if !failures.is_empty() {
        bail!("benchmarks failed: {}", failures.join(", "));
    }
    Ok(())
}

fn command_line_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn machine_info() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string());
    json!({
        "kernel": command_line_output("uname", &["-sr"]),
        "cpu_model": model,
        "online_cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "mem_total": std::fs::read_to_string("/proc/meminfo").ok()
            .and_then(|m| m.lines().next().map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))),
    })
}

fn spdk_status(ctx: &Ctx) -> Value {
    match &ctx.spdk {
        Some(p) => json!(format!("{} ({SPDK_ENV})", p.display())),
        None => json!(format!("not available ({SPDK_ENV} unset)")),
    }
}

/// The sides of an entry, in their canonical order: ours, the peers, SPDK.
fn sides(ctx: &Ctx, b: &Bench) -> Vec<Side> {
    let mut s = vec![Side::Ours];
    s.extend((0..b.peers.len()).map(Side::Peer));
    if b.spdk.is_some() && ctx.spdk.is_some() {
        s.push(Side::Spdk);
    }
    s
}

fn side_id(b: &Bench, s: Side) -> String {
    match s {
        Side::Ours => "ours".into(),
        Side::Spdk => "spdk".into(),
        Side::Peer(i) => match b.peers[i] {
            Peer::Ours(o) => format!("ours:{}", ours_label(o)),
            Peer::Fio => "fio".into(),
            Peer::QemuImgRaw => "qemu-img bench raw".into(),
            Peer::QemuImgCow { cluster } => {
                format!("qemu-img bench -w qcow2 cluster_size={cluster}")
            }
            Peer::QemuNbd { cache, aio } => format!(
                "qemu-nbd --cache={cache} --aio={}",
                aio.unwrap_or("default")
            ),
            Peer::QemuNbdRaw => "qemu-nbd -r raw + qemu-img bench".into(),
        },
    }
}

fn ours_label(o: Ours) -> String {
    match o {
        Ours::Aio { io, block_len } => format!(
            "aio bdev io_uring {} block_len={}",
            io.name(),
            block_len.unwrap_or(512)
        ),
        Ours::Lvol {
            thin,
            prefill,
            cluster,
        } => format!(
            "{} lvol on aio bdev io_uring direct, cluster_size={cluster}{}",
            if thin { "thin" } else { "thick" },
            if prefill { ", written in full first" } else { "" }
        ),
        Ours::Esnap {
            cluster,
            base_block,
        } => format!(
            "fresh esnap clone, cluster_size={cluster}, base aio (read-only, direct) block_len={base_block}, store aio block_len=4096"
        ),
        Ours::Blob => "thick blob on a fresh blobstore (1 MiB clusters), aio io_uring direct".into(),
        // Counts are in params and details (--quick uses a tenth).
        Ours::BsLoad { recover, .. } => format!(
            "blobstore load, {}",
            if recover { "forced recovery" } else { "clean" }
        ),
        Ours::SnapClone { .. } => "snapshot + clone of thin lvols".into(),
        Ours::NbdTgtEsnap => "tgt NBD export of a fresh esnap clone".into(),
        Ours::TgtIdle => "tgt with an NBD export and no client".into(),
        Ours::NbdClientEsnap => "esnap clone over our NBD client bdev".into(),
        Ours::Malloc { block_len } => format!("malloc bdev block_len={block_len}"),
        Ours::MallocLvol => "thick lvol on a malloc bdev, 4 MiB clusters".into(),
        Ours::MallocEsnap { base_block } => {
            format!("fresh esnap clone of a malloc base block_len={base_block}, 4 MiB clusters")
        }
        Ours::Listing { method } => format!("tgt {method} on thin lvols, one json parse"),
        Ours::NbdScale { reactors } => format!(
            "tgt --cores {reactors}, two malloc-backed lvols over NBD, two fio nbd clients"
        ),
    }
}

/// Runs every round of an entry and writes its JSON; returns the record.
fn run_entry(ctx: &Ctx, b: &Bench) -> Result<Value> {
    // The scaling entries run on two CPUs whatever `--cpus` says.
    let two_cpus;
    let ctx = if let Ours::NbdScale { .. } = b.ours {
        two_cpus = scale::ctx_for(ctx)?;
        &two_cpus
    } else {
        ctx
    };
    let mut data_note = Value::Null;
    let reads_pattern = b.file == DataFile::Pattern || b.ours == Ours::NbdClientEsnap;
    if reads_pattern {
        let path = ctx.file(DataFile::Pattern);
        let intact = pattern_intact(&path, ctx.file_size)?;
        if !intact {
            eprintln!("note: {} changed; rewriting it", path.display());
            std::fs::remove_file(&path)?;
            prepare_data_file(&path, ctx.file_size)?;
        }
        data_note = json!({"pattern_checked_before": true, "restored": !intact});
    }
    let load_before = loadavg();
    let t0 = Instant::now();
    let sides = sides(ctx, b);
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); sides.len()];
    let mut errors: Vec<Option<String>> = vec![None; sides.len()];
    let mut orders = Vec::new();
    for round in 0..ctx.rounds {
        let order = round_order(round, sides.len());
        orders.push(
            order
                .iter()
                .map(|&i| side_id(b, sides[i]))
                .collect::<Vec<_>>(),
        );
        if ctx.rounds > 1 {
            eprintln!("--- round {}/{}", round + 1, ctx.rounds);
        }
        for i in order {
            if errors[i].is_some() {
                continue;
            }
            // Every run starts with none of the data files in the page cache, whichever side
            // ran before it.
            if b.file != DataFile::Memory {
                drop_page_cache(&ctx.file(b.file));
            }
            drop_page_cache(&ctx.file(DataFile::Pattern));
            let cpu0 = children_cpu_seconds();
            match run_side(ctx, b, sides[i]) {
                Ok(mut r) => {
                    if matches!(b.ours, Ours::Aio { .. }) {
                        note_cpu_per_io(ctx, b, &mut r, children_cpu_seconds() - cpu0);
                    }
                    runs[i].push(r)
                }
                Err(e) => {
                    if sides[i] == Side::Ours {
                        return Err(e.context("our side failed"));
                    }
                    eprintln!("note: {} not measured: {e:#}", side_id(b, sides[i]));
                    errors[i] = Some(format!("{e:#}"));
                }
            }
        }
    }
    if reads_pattern {
        // Which entry changed the pattern, if one did.
        let after = pattern_intact(&ctx.file(DataFile::Pattern), ctx.file_size)?;
        data_note["pattern_intact_after"] = json!(after);
        if !after {
            eprintln!("error: {} changed the pattern file", b.name);
        }
    }
    let mut record = build_record(
        ctx,
        b,
        &sides,
        &runs,
        &errors,
        orders,
        load_before,
        data_note,
    );
    record["method"]["wall_seconds"] = json!(round1(t0.elapsed().as_secs_f64()));
    let path = ctx.out_dir.join(format!("{}.json", b.name));
    std::fs::write(&path, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("write {}", path.display()))?;
    Ok(record)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn summary_json(s: &Summary) -> Value {
    json!({"median": round1(s.median), "min": round1(s.min), "max": round1(s.max)})
}

/// The JSON of an entry: params, method, every run of every side, summaries and ratios.
#[allow(clippy::too_many_arguments)]
fn build_record(
    ctx: &Ctx,
    b: &Bench,
    sides: &[Side],
    runs: &[Vec<Run>],
    errors: &[Option<String>],
    orders: Vec<Vec<String>>,
    load_before: String,
    data_note: Value,
) -> Value {
    let unit = b.unit;
    let summaries: Vec<Option<Summary>> = runs
        .iter()
        .map(|r| summarize(&r.iter().map(|x| x.value).collect::<Vec<_>>()))
        .collect();
    let mut side_json = Vec::new();
    for (i, s) in sides.iter().enumerate() {
        let mut v = json!({
            "id": side_id(b, *s),
            "role": match s { Side::Ours => "ours", Side::Peer(_) => "peer", Side::Spdk => "spdk" },
            "runs": runs[i].iter().map(|r| round1(r.value)).collect::<Vec<_>>(),
            "summary": summaries[i].as_ref().map(summary_json),
            "commands": runs[i].first().map(|r| r.commands.clone()).unwrap_or_default(),
            "details": runs[i].iter().map(|r| r.detail.clone()).collect::<Vec<_>>(),
        });
        if let Some(e) = &errors[i] {
            v["error"] = json!(e);
        }
        // Our bench binary counts allocations (all threads) during the timed run.
        let allocs: Option<Vec<f64>> = runs[i]
            .iter()
            .map(|r| r.detail["allocs_per_io"].as_f64())
            .collect();
        if let Some(a) = allocs.filter(|a| !a.is_empty()) {
            v["allocs_per_io"] = json!(a.iter().map(|x| round3(*x)).collect::<Vec<_>>());
        }
        side_json.push(v);
    }
    let ours = summaries[0];
    let peers: Vec<(usize, Summary)> = sides
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, Side::Peer(_)))
        .filter_map(|(i, _)| summaries[i].map(|s| (i, s)))
        .collect();
    let best = best_peer(&peers, unit.higher_is_better());
    let spdk_json = match (b.spdk, &ctx.spdk) {
        (None, _) => Value::Null,
        (Some(_), None) => json!(format!("not available ({SPDK_ENV} unset)")),
        (Some(_), Some(_)) => {
            let i = sides.iter().position(|s| *s == Side::Spdk);
            let sum = i.and_then(|i| summaries[i]);
            json!({
                "summary": sum.as_ref().map(summary_json),
                "ratio": ours.zip(sum).and_then(|(o, s)| ratio(&o, &s)).map(round3),
                "error": i.and_then(|i| errors[i].clone()),
            })
        }
    };
    let w = &b.work;
    json!({
        "name": b.name,
        "what": b.what,
        "unit": unit.name(),
        "higher_is_better": unit.higher_is_better(),
        "params": {
            "rw": if b.is_io() { json!(w.rw()) } else { Value::Null },
            "order": match w.order { Order::Rand => "random", Order::Seq => "sequential", Order::Stride(_) => "strided" },
            "step": w.step(),
            "io": b.io().name(),
            "bs": b.is_io().then_some(w.bs),
            "qd": b.is_io().then_some(w.qd),
            "seconds": ctx.secs_of(w.len),
            "count": ctx.count(w.len),
            "cluster_size": b.cluster(),
            "base_block_size": b.base_block(),
            "file": (b.file != DataFile::Memory).then(|| ctx.file(b.file).display().to_string()),
            "file_kind": format!("{:?}", b.file).to_lowercase(),
            "file_size": ctx.file_size,
        },
        "method": {
            "cpus": ctx.cpus,
            "client_cpus": ctx.client_cpus,
            "pinning": ctx.pinning(),
            "rounds": ctx.rounds,
            "order_per_round": orders,
            "quick": ctx.quick,
            "page_cache": "the entry's file and the pattern file dropped from the page cache before every run (dd iflag=nocache count=0)",
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "data": data_note,
            "data_dir": ctx.data_dir.display().to_string(),
            "data_fs": fs_type(&ctx.data_dir),
        },
        "sides": side_json,
        "ours": ours.as_ref().map(summary_json),
        "best_peer": best.map(|(i, _)| side_id(b, sides[i])),
        "peer_value": best.map(|(_, s)| summary_json(&s)),
        "ratio": ours.zip(best).and_then(|(o, (_, p))| ratio(&o, &p)).map(round3),
        "ratio_of": "median of ours / median of the best peer",
        "spdk": spdk_json,
        // Set when our side did not open its files the way the entry's name says (e.g. the
        // NBD target without O_DIRECT): the ratio then compares different things.
        "mode_mismatch": runs[0].iter().find_map(|r| r.detail.get("mode_mismatch").cloned()),
    })
}

fn fmt_summary(v: &Value) -> String {
    if v.is_null() {
        return "–".into();
    }
    let f = |x: &Value| {
        let x = x.as_f64().unwrap_or(f64::NAN);
        if x >= 100.0 {
            format!("{x:.0}")
        } else {
            format!("{x:.1}")
        }
    };
    format!("{} ({}–{})", f(&v["median"]), f(&v["min"]), f(&v["max"]))
}

fn summary_line(rec: &Value) -> String {
    format!(
        "{:<64} ours {:<28} best peer {:<28} ratio {}  [{}]",
        rec["name"].as_str().unwrap_or(""),
        fmt_summary(&rec["ours"]),
        fmt_summary(&rec["peer_value"]),
        rec["ratio"],
        rec["best_peer"].as_str().unwrap_or("no peer"),
    )
}

/// A markdown table of every entry: median (min–max) of ours and of the best peer, the ratio.
fn markdown_table(records: &[Value]) -> String {
    let mut s = String::from(
        "| benchmark | unit | ours: median (min–max) | best peer | peer: median (min–max) | ratio | SPDK ratio |\n|---|---|---|---|---|---|---|\n",
    );
    for r in records {
        let spdk = match &r["spdk"] {
            Value::Null => "–".to_string(),
            Value::String(t) => t.clone(),
            v if v["ratio"].is_null() && !v["error"].is_null() => "failed (see JSON)".into(),
            v => v["ratio"].to_string(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r["name"].as_str().unwrap_or(""),
            r["unit"].as_str().unwrap_or(""),
            fmt_summary(&r["ours"]),
            r["best_peer"].as_str().unwrap_or("–"),
            fmt_summary(&r["peer_value"]),
            match (&r["ratio"], r["mode_mismatch"].is_null()) {
                (Value::Null, _) => "–".to_string(),
                (x, true) => x.to_string(),
                (x, false) => format!("{x} (mode mismatch, see JSON)"),
            },
            spdk,
        );
    }
    s
}

/// CPU time per request (the NBD servers' `details[].server_cpu`, the scaling entries'
/// `details[].cpu`, the aio entries' `details[].cpu_us_per_io`), per side with its median
/// (min–max) over the rounds, and where measured the NBD clients' CPU per request and how
/// busy the entry's CPUs were; empty when no entry measured it.
fn server_cpu_table(records: &[Value]) -> String {
    let mut rows = String::new();
    let cell = |v: &[f64], digits: usize| match summarize(v) {
        Some(sm) => format!(
            "{:.d$} ({:.d$}–{:.d$})",
            sm.median,
            sm.min,
            sm.max,
            d = digits
        ),
        None => "–".to_string(),
    };
    for r in records {
        for side in r["sides"].as_array().into_iter().flatten() {
            let details: Vec<&Value> = side["details"].as_array().into_iter().flatten().collect();
            let pick = |f: &dyn Fn(&Value) -> Option<f64>| -> Vec<f64> {
                details.iter().filter_map(|d| f(d)).collect()
            };
            let per = pick(&|d| {
                d["server_cpu"]["server_cpu_us_per_request"]
                    .as_f64()
                    .or_else(|| d["cpu"]["server_cpu_us_per_request"].as_f64())
                    .or_else(|| d["cpu_us_per_io"].as_f64())
            });
            if per.is_empty() {
                continue;
            }
            let client = pick(&|d| {
                d["server_cpu"]["client_cpu_us_per_request"]
                    .as_f64()
                    .or_else(|| d["cpu"]["clients_cpu_us_per_request"].as_f64())
            });
            let busy = pick(&|d| {
                d["server_cpu"]["cpus_busy_percent"]
                    .as_f64()
                    .or_else(|| d["cpu"]["cpus_busy_percent"].as_f64())
            });
            let _ = writeln!(
                rows,
                "| {} | {} | {} | {} | {} |",
                r["name"].as_str().unwrap_or(""),
                side["id"].as_str().unwrap_or(""),
                cell(&per, 2),
                cell(&client, 2),
                cell(&busy, 0),
            );
        }
    }
    if rows.is_empty() {
        return rows;
    }
    format!(
        "\nCPU time (user + system, all threads) per request, µs: median (min–max). NBD entries: the server's and the client's, over the client's run, and how busy the CPUs they run on were (everything but idle and iowait in /proc/stat, so the disk's interrupts count); scaling entries: the same from the processes' times; aio entries: every process of the side, over the run\n\n| benchmark | side | µs per request | client µs per request | CPUs busy % |\n|---|---|---|---|---|\n{rows}"
    )
}

/// CPU time (user + system) of every child process reaped so far (`RUSAGE_CHILDREN`).
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass and reads nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN is a valid `who`.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// For the raw aio entries (no untimed setup on any side): the side's CPU time over the run
/// (every process it started, reaped when the run ends) per request, in µs. On a device that
/// bounds the IOPS at the entry's depth this is what tells the sides' efficiency apart.
fn note_cpu_per_io(ctx: &Ctx, b: &Bench, r: &mut Run, cpu_seconds: f64) {
    let Some(secs) = ctx.secs_of(b.work.len) else {
        return;
    };
    if !r.detail.is_object() {
        r.detail = json!({});
    }
    let ios = r.value * secs;
    r.detail["cpu_seconds"] = json!(cpu_seconds);
    r.detail["cpu_us_per_io"] =
        json!((ios > 0.0 && cpu_seconds.is_finite()).then(|| cpu_seconds * 1e6 / ios));
}

/// Runs one side once.
fn run_side(ctx: &Ctx, b: &Bench, side: Side) -> Result<Run> {
    match side {
        Side::Ours => run_ours(ctx, b, b.ours),
        Side::Spdk => {
            let bin = ctx
                .spdk
                .as_ref()
                .ok_or_else(|| anyhow!("{SPDK_ENV} unset"))?;
            let job = b
                .spdk
                .ok_or_else(|| anyhow!("no SPDK job for this entry"))?;
            run_spdk(ctx, b, bin, job)
        }
        Side::Peer(i) => match b.peers[i] {
            Peer::Ours(o) => run_ours(ctx, b, o),
            Peer::Fio => run_fio_file(ctx, b),
            Peer::QemuImgRaw => run_qemu_img_raw(ctx, b),
            Peer::QemuImgCow { cluster } => run_qemu_img_cow(ctx, b, cluster),
            Peer::QemuNbd { cache, aio } => run_qemu_nbd_qcow2(ctx, b, cache, aio),
            Peer::QemuNbdRaw => run_qemu_nbd_raw_peer(ctx, b),
        },
    }
}

/// A scratch directory for one side's run, removed when dropped.
struct TmpDir(PathBuf);

impl TmpDir {
    /// `data_dir/tmp-WHAT`: on the data files' file system, and short, because a Unix
    /// socket's path must fit in 108 bytes (entries run one at a time, so no clash).
    fn new(ctx: &Ctx, what: &str) -> Result<TmpDir> {
        let p = ctx.data_dir.join(format!("tmp-{what}"));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TmpDir(p))
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Our `bench` binary, pinned, on one of our setups.
fn run_ours(ctx: &Ctx, b: &Bench, setup: Ours) -> Result<Run> {
    if matches!(setup, Ours::NbdTgtEsnap | Ours::TgtIdle) {
        return run_tgt_nbd_esnap(ctx, b);
    }
    if let Ours::Listing { method } = setup {
        return listing::run(ctx, b, method);
    }
    if let Ours::NbdScale { reactors } = setup {
        return scale::run(ctx, b, reactors);
    }
    let w = &b.work;
    let mut file = ctx.file(b.file);
    let mut cmd = ctx.pinned(&ctx.bench_bin);
    let mut server = None;
    let mut commands = Vec::new();
    let tmp = TmpDir::new(ctx, "ours")?;
    let (kind, direct) = match setup {
        Ours::Aio { io, block_len } => {
            if let Some(bl) = block_len {
                cmd.args(["--block-len", &bl.to_string()]);
            }
            ("aio", io == Io::Direct)
        }
        Ours::Lvol {
            thin,
            prefill,
            cluster,
        } => {
            cmd.args(["--cluster-size", &cluster.to_string()]);
            if prefill {
                cmd.arg("--prefill");
            }
            (if thin { "thinlvol" } else { "lvol" }, true)
        }
        Ours::Esnap {
            cluster,
            base_block,
        } => {
            cmd.args(["--cluster-size", &cluster.to_string()])
                .args(["--block-len", &base_block.to_string()]);
            ("esnap", true)
        }
        Ours::Blob => {
            cmd.arg("--prefill");
            ("blob", true)
        }
        Ours::Malloc { block_len } => {
            cmd.args(["--block-len", &block_len.to_string()]);
            ("malloc", false)
        }
        Ours::MallocLvol => {
            cmd.args(["--cluster-size", &(4u64 << 20).to_string()]);
            ("mlvol", false)
        }
        Ours::MallocEsnap { base_block } => {
            cmd.args(["--cluster-size", &(4u64 << 20).to_string()])
                .args(["--block-len", &base_block.to_string()]);
            ("mesnap", false)
        }
        Ours::BsLoad { blobs, recover } => {
            let blobs = if ctx.quick { blobs / 10 } else { blobs };
            cmd.args(["--blobs", &blobs.to_string()]);
            if recover {
                cmd.arg("--recover");
            }
            ("bsload", true)
        }
        Ours::SnapClone { lvols } => {
            let lvols = if ctx.quick { lvols / 10 } else { lvols };
            cmd.args(["--lvols", &lvols.to_string()]);
            ("snapclone", true)
        }
        Ours::NbdClientEsnap => {
            let (srv, sock, c) = start_qemu_nbd_raw(ctx, &tmp.0)?;
            server = Some(srv);
            commands.push(c);
            file = sock;
            ("nbdesnap", false)
        }
        Ours::NbdTgtEsnap | Ours::TgtIdle | Ours::Listing { .. } | Ours::NbdScale { .. } => {
            unreachable!("handled above")
        }
    };
    if b.file == DataFile::Memory {
        // Malloc targets take their size in MiB instead of a file.
        file = PathBuf::from((ctx.file_size >> 20).to_string());
    }
    cmd.arg("--target")
        .arg(format!("{kind}:{}", file.display()))
        .args(["--engine", "uring"]);
    if direct {
        cmd.arg("--direct");
    }
    cmd.args(["--rw", w.rw()])
        .args(["--bs", &w.bs.to_string()])
        .args(["--qd", &w.qd.to_string()]);
    match (ctx.count(w.len), ctx.secs_of(w.len)) {
        (Some(n), _) => cmd.args(["--count", &n.to_string()]),
        (None, Some(s)) => cmd.args(["--time", &s.to_string()]),
        (None, None) => unreachable!("a length is a count or a time"),
    };
    if let Some(s) = w.step() {
        cmd.args(["--step", &s.to_string()]);
    }
    commands.push(util::show(&cmd));
    let out = util::output("our bench", &mut cmd);
    drop(server);
    let out = out?;
    let v: Value = serde_json::from_str(out.trim())
        .with_context(|| format!("bench printed no JSON: {out:?}"))?;
    let value = match setup {
        Ours::BsLoad { .. } => v["ms"].as_f64(),
        _ => v["iops"].as_f64(),
    }
    .ok_or_else(|| anyhow!("no figure in {v}"))?;
    Ok(Run {
        value,
        commands,
        detail: v,
    })
}

/// fio on a file: io_uring, the entry's direct flag, time based or with the entry's count.
fn run_fio_file(ctx: &Ctx, b: &Bench) -> Result<Run> {
    let fio = util::find_or_install("fio", "fio").ok_or_else(|| anyhow!("fio missing"))?;
    let mut cmd = ctx.pinned(&fio);
    cmd.arg(format!("--filename={}", ctx.file(b.file).display()))
        .arg(format!("--size={}", ctx.file_size))
        .arg("--ioengine=io_uring")
        .arg(format!("--direct={}", u8::from(b.io() == Io::Direct)));
    fio_common(ctx, b, &mut cmd);
    let out = util::output("fio", &mut cmd)?;
    let m = parse_fio(&out)?;
    Ok(Run {
        value: m.0,
        commands: vec![util::show(&cmd)],
        detail: json!({"version": util::version_of(&fio), "ios": m.1}),
    })
}

/// The workload flags shared by fio on a file and fio over NBD.
fn fio_common(ctx: &Ctx, b: &Bench, cmd: &mut Command) {
    let w = &b.work;
    // fio's rw=read:<skip> skips `skip` bytes after each request.
    let rw = match w.step() {
        Some(s) if s > w.bs => format!("{}:{}", w.rw(), s - w.bs),
        _ => w.rw().to_string(),
    };
    cmd.arg(format!("--name={}", b.name))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", w.bs))
        .arg(format!("--iodepth={}", w.qd))
        .arg("--norandommap=1")
        .arg("--randrepeat=0")
        .arg("--numjobs=1")
        .arg("--output-format=json");
    match (ctx.count(w.len), ctx.secs_of(w.len)) {
        (Some(n), _) => cmd.arg(format!("--number_ios={n}")),
        (None, Some(s)) => cmd
            .arg("--time_based=1")
            .arg(format!("--runtime={}ms", (s * 1000.0) as u64)),
        (None, None) => unreachable!("a length is a count or a time"),
    };
}

/// IOPS (read + write) and requests of fio's first job, from its JSON output.
fn parse_fio(out: &str) -> Result<(f64, u64)> {
    let start = out
        .find('{')
        .ok_or_else(|| anyhow!("no JSON in fio output"))?;
    let v: Value = serde_json::from_str(&out[start..]).context("parse fio JSON")?;
    let job = &v["jobs"][0];
    if job.is_null() {
        bail!("fio reported no job");
    }
    if job["error"].as_i64().unwrap_or(0) != 0 {
        bail!("fio job error {}", job["error"]);
    }
    let iops =
        job["read"]["iops"].as_f64().unwrap_or(0.0) + job["write"]["iops"].as_f64().unwrap_or(0.0);
    let ios = job["read"]["total_ios"].as_u64().unwrap_or(0)
        + job["write"]["total_ios"].as_u64().unwrap_or(0);
    if ios == 0 || iops.is_nan() || iops <= 0.0 {
        bail!("fio completed no request");
    }
    Ok((iops, ios))
}

/// `Run completed in 1.234 seconds.` → requests per second for `count` requests.
fn parse_qemu_img_bench(out: &str, count: u64) -> Result<f64> {
    let secs = out
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Run completed in ")
                .and_then(|r| r.strip_suffix(" seconds."))
                .and_then(|s| s.trim().parse::<f64>().ok())
        })
        .ok_or_else(|| anyhow!("no `Run completed in` line in qemu-img output: {out:?}"))?;
    if secs.is_nan() || secs <= 0.0 {
        bail!("qemu-img reported {secs} seconds");
    }
    Ok(count as f64 / secs)
}

/// IOPS from the `Total` line of SPDK bdevperf's report (`Total : <IOPS> <MiB/s> ...`).
fn parse_bdevperf(out: &str) -> Result<f64> {
    let line = out
        .lines()
        .map(|l| l.trim_start_matches('\r').trim())
        .rfind(|l| l.starts_with("Total"))
        .ok_or_else(|| anyhow!("no Total line in bdevperf output"))?;
    let (_, rest) = line
        .split_once(':')
        .ok_or_else(|| anyhow!("bad bdevperf Total line {line:?}"))?;
    let mut nums = rest.split_whitespace().map(str::parse::<f64>);
    let iops = match nums.next() {
        Some(Ok(x)) if x.is_finite() && x > 0.0 => x,
        _ => bail!("no IOPS in bdevperf Total line {line:?}"),
    };
    if let Some(Ok(fail)) = nums.nth(1) {
        if fail > 0.0 {
            bail!("bdevperf reports {fail} failed I/O per second");
        }
    }
    Ok(iops)
}

/// `qemu-img bench` arguments for the entry's size, depth, step, direction and count.
fn qemu_img_bench_args(b: &Bench, count: u64, cmd: &mut Command) {
    let w = &b.work;
    cmd.args(["-c", &count.to_string()])
        .args(["-d", &w.qd.to_string()])
        .args(["-s", &w.bs.to_string()]);
    if let Some(s) = w.step() {
        cmd.args(["-S", &s.to_string()]);
    }
    if w.write {
        cmd.arg("-w");
    }
}

fn qemu_img() -> Result<PathBuf> {
    util::find_or_install("qemu-img", "qemu-utils").ok_or_else(|| anyhow!("qemu-img missing"))
}

/// `qemu-img bench -f raw` on the entry's file with io_uring (falling back to native AIO).
fn run_qemu_img_raw(ctx: &Ctx, b: &Bench) -> Result<Run> {
    let qemu = qemu_img()?;
    let count = ctx
        .count(b.work.len)
        .ok_or_else(|| anyhow!("qemu-img bench needs a count"))?;
    let cache = if b.io() == Io::Direct {
        "none"
    } else {
        "writeback"
    };
    let mut last = anyhow!("not run");
    for aio in ["io_uring", "native"] {
        let mut cmd = ctx.pinned(&qemu);
        cmd.args(["bench", "-f", "raw", "-t", cache, "-i", aio]);
        qemu_img_bench_args(b, count, &mut cmd);
        cmd.arg(ctx.file(b.file));
        match util::output("qemu-img bench", &mut cmd).and_then(|o| parse_qemu_img_bench(&o, count))
        {
            Ok(v) => {
                return Ok(Run {
                    value: v,
                    commands: vec![util::show(&cmd)],
                    detail: json!({"version": util::version_of(&qemu)}),
                })
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// `qemu-img create -f qcow2 -b PATTERN -F raw -o cluster_size=C CLONE SIZE`.
fn create_qcow2_clone(ctx: &Ctx, clone: &Path, cluster: u64) -> Result<String> {
    let mut cmd = Command::new(qemu_img()?);
    cmd.args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(ctx.file(DataFile::Pattern))
        .args(["-F", "raw", "-o", &format!("cluster_size={cluster}")])
        .arg(clone)
        .arg(ctx.file_size.to_string());
    util::run("qemu-img create", &mut cmd)?;
    Ok(util::show(&cmd))
}

/// `qemu-img bench -w -t none` on a fresh qcow2 clone of the pattern file.
fn run_qemu_img_cow(ctx: &Ctx, b: &Bench, cluster: u64) -> Result<Run> {
    let qemu = qemu_img()?;
    let count = ctx
        .count(b.work.len)
        .ok_or_else(|| anyhow!("qemu-img bench needs a count"))?;
    let tmp = TmpDir::new(ctx, "peer")?;
    let clone = tmp.0.join("clone.qcow2");
    let mut last = anyhow!("not run");
    for aio in ["io_uring", "native"] {
        let _ = std::fs::remove_file(&clone);
        let create = create_qcow2_clone(ctx, &clone, cluster)?;
        let mut cmd = ctx.pinned(&qemu);
        cmd.args(["bench", "-f", "qcow2", "-t", "none", "-i", aio]);
        qemu_img_bench_args(b, count, &mut cmd);
        cmd.arg(&clone);
        match util::output("qemu-img bench", &mut cmd).and_then(|o| parse_qemu_img_bench(&o, count))
        {
            Ok(v) => {
                return Ok(Run {
                    value: v,
                    commands: vec![create, util::show(&cmd)],
                    detail: json!({"version": util::version_of(&qemu)}),
                })
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until a Unix socket accepts connections (or the server exits).
fn wait_socket(p: &Path, child: &mut KillOnDrop) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(p).is_ok() {
            return Ok(());
        }
        if let Ok(Some(st)) = child.0.try_wait() {
            bail!(
                "the server exited ({st}) before listening on {}",
                p.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{} never accepted connections", p.display())
}

/// Starts a server (stdout discarded, stderr to a file outside the data directory, so that
/// [`open_files`] does not list it) and waits until it listens on `sock`; if it exits first,
/// the error quotes its stderr.
fn start_server(mut cmd: Command, sock: &Path) -> Result<KillOnDrop> {
    let err_path = std::env::temp_dir().join(format!("xtask-bench-{}.err", std::process::id()));
    cmd.stdout(Stdio::null()).stderr(File::create(&err_path)?);
    let shown = util::show(&cmd);
    let spawned = cmd.spawn().with_context(|| format!("start {shown}"));
    let started = spawned.and_then(|child| {
        let mut srv = KillOnDrop(child);
        wait_socket(sock, &mut srv).map(|()| srv)
    });
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    // The server keeps its descriptor; the name is not needed any more.
    let _ = std::fs::remove_file(&err_path);
    started.map_err(|e| anyhow!("{e:#}; its stderr: {:?}", stderr.trim()))
}

/// The files a process holds open under `dir_prefixes`, with whether each is O_DIRECT (from
/// /proc/PID/fdinfo): what a server really does, whatever its options say.
fn open_files(pid: u32, prefixes: &[&Path]) -> Value {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return json!("unreadable");
    };
    for e in rd.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !prefixes.iter().any(|p| target.starts_with(p)) {
            continue;
        }
        let fd = e.file_name().to_string_lossy().into_owned();
        let flags = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            });
        out.push(json!({
            "path": target.display().to_string(),
            "o_direct": flags.map(|f| f & libc_o_direct() != 0),
            "flags_octal": flags.map(|f| format!("{f:o}")),
        }));
    }
    json!(out)
}

/// O_DIRECT on the architectures we run on.
fn libc_o_direct() -> u32 {
    if cfg!(any(target_arch = "aarch64", target_arch = "arm")) {
        0o200000
    } else {
        0o40000
    }
}

/// Whether the server opened every observed file with O_DIRECT.
fn all_direct(files: &Value) -> Option<bool> {
    let a = files.as_array()?;
    if a.is_empty() {
        return None;
    }
    a.iter()
        .map(|f| f["o_direct"].as_bool())
        .collect::<Option<Vec<bool>>>()
        .map(|v| v.iter().all(|x| *x))
}

/// The NBD client of an entry: fio's nbd engine for random workloads (timed), qemu-img bench
/// for sequential ones (fixed count); both pinned.
fn nbd_client(ctx: &Ctx, b: &Bench, uri: &str) -> Result<(f64, String)> {
    nbd_client_counted(ctx, b, uri).map(|c| (c.value, c.command))
}

/// What one NBD client run gives: its figure, the requests it completed and its command.
struct ClientRun {
    value: f64,
    requests: u64,
    command: String,
}

/// [`nbd_client`], also counting the requests the client completed.
fn nbd_client_counted(ctx: &Ctx, b: &Bench, uri: &str) -> Result<ClientRun> {
    if b.work.order == Order::Rand {
        let fio =
            util::which("fio").ok_or_else(|| anyhow!("fio missing (needed for random NBD)"))?;
        let mut cmd = ctx.client_pinned(&fio);
        cmd.arg("--ioengine=nbd").arg(format!("--uri={uri}"));
        fio_common(ctx, b, &mut cmd);
        let out = util::output("fio (nbd)", &mut cmd)?;
        let (value, requests) = parse_fio(&out)?;
        Ok(ClientRun {
            value,
            requests,
            command: util::show(&cmd),
        })
    } else {
        let count = ctx
            .count(b.work.len)
            .ok_or_else(|| anyhow!("qemu-img bench needs a count"))?;
        let mut cmd = ctx.client_pinned(qemu_img()?);
        cmd.args(["bench", "-f", "raw"]);
        qemu_img_bench_args(b, count, &mut cmd);
        cmd.arg(uri);
        let out = util::output("qemu-img bench (nbd)", &mut cmd)?;
        Ok(ClientRun {
            value: parse_qemu_img_bench(&out, count)?,
            requests: count,
            command: util::show(&cmd),
        })
    }
}

/// Runs the NBD client against a server process and measures the server's CPU time (user +
/// system, all threads) over the client's run: the figure, the client's command, and
/// `{"server_cpu_seconds", "requests", "server_cpu_us_per_request"}`. With client and server
/// on one CPU the IOPS ratio mixes the client's cost into both sides; this is the server's
/// own cost per request.
fn nbd_client_with_server_cpu(
    ctx: &Ctx,
    b: &Bench,
    uri: &str,
    server_pid: u32,
) -> Result<(f64, String, Value)> {
    let ticks = || {
        std::fs::read_to_string(format!("/proc/{server_pid}/stat"))
            .map_err(anyhow::Error::from)
            .and_then(|s| parse_stat_cpu_ticks(&s))
    };
    let cpus = cpu_union(ctx)?;
    let (t0, c0, s0) = (ticks()?, children_cpu_seconds(), cpu_ticks(&cpus));
    let c = nbd_client_counted(ctx, b, uri)?;
    let (t1, c1, s1) = (ticks()?, children_cpu_seconds(), cpu_ticks(&cpus));
    let secs = t1.saturating_sub(t0) as f64 / clock_ticks_per_second();
    let per =
        |secs: f64| (c.requests > 0 && secs.is_finite()).then(|| secs * 1e6 / c.requests as f64);
    // The client is the only child reaped during its run (the server is still running).
    let client = c1 - c0;
    let busy = s0.zip(s1).and_then(|(a, b)| busy_percent(a, b));
    Ok((
        c.value,
        c.command,
        json!({"server_cpu_seconds": secs, "requests": c.requests,
               "server_cpu_us_per_request": per(secs),
               "client_cpu_seconds": client.is_finite().then_some(client),
               "client_cpu_us_per_request": per(client),
               "cpus": cpus, "cpus_busy_percent": busy}),
    ))
}

/// The CPUs the servers and the clients of an entry run on (sorted, no repeats).
fn cpu_union(ctx: &Ctx) -> Result<Vec<u32>> {
    let mut set = parse_cpu_list(&ctx.cpus)?;
    set.extend(parse_cpu_list(&ctx.client_cpus)?);
    set.sort_unstable();
    set.dedup();
    Ok(set)
}

/// `(busy, total)` clock ticks of `cpus` so far, from `/proc/stat`: busy is everything but
/// idle and iowait, so interrupt and softirq time (the disk's completions) counts as busy.
fn cpu_ticks(cpus: &[u32]) -> Option<(u64, u64)> {
    parse_cpu_ticks(&std::fs::read_to_string("/proc/stat").ok()?, cpus)
}

/// [`cpu_ticks`] from the text of `/proc/stat`; `None` if a CPU is missing.
fn parse_cpu_ticks(stat: &str, cpus: &[u32]) -> Option<(u64, u64)> {
    let (mut busy, mut total) = (0u64, 0u64);
    for cpu in cpus {
        let name = format!("cpu{cpu}");
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let t: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        busy += t - idle.min(t);
        total += t;
    }
    Some((busy, total))
}

/// Share of `a..b` (two [`cpu_ticks`] readings) the CPUs were busy, in percent.
fn busy_percent(a: (u64, u64), b: (u64, u64)) -> Option<f64> {
    let total = b.1.checked_sub(a.1)?;
    (total > 0).then(|| b.0.saturating_sub(a.0) as f64 * 100.0 / total as f64)
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`, 100 if it cannot say).
fn clock_ticks_per_second() -> f64 {
    command_line_output("getconf", &["CLK_TCK"])
        .and_then(|s| s.parse().ok())
        .unwrap_or(100.0)
}

/// One JSON-RPC call over our target's socket.
fn rpc(sock: &Path, method: &str, params: Value) -> Result<Value> {
    use std::io::BufRead;
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connect {}", sock.display()))?;
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    s.write_all(req.to_string().as_bytes())?;
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).with_context(|| format!("{method}: {line:?}"))?;
    match v.get("error") {
        Some(e) => bail!("{method}: {e}"),
        None => Ok(v["result"].clone()),
    }
}

/// Starts our pinned `tgt` with its RPC socket `sock` and `args`, waits until it answers;
/// returns it and its command line.
fn start_tgt(ctx: &Ctx, sock: &Path, args: &[&str]) -> Result<(KillOnDrop, String)> {
    let mut cmd = ctx.pinned(&ctx.tgt_bin);
    cmd.arg("-r").arg(sock).args(args).stdout(Stdio::null());
    let shown = util::show(&cmd);
    let mut guard = KillOnDrop(cmd.spawn().with_context(|| format!("start {shown}"))?);
    wait_socket(sock, &mut guard)?;
    Ok((guard, shown))
}

/// Ours over NBD: a pinned `tgt`, a read-only aio base bdev over the pattern file (4 KiB
/// blocks), a fresh lvol store on a sparse file, an esnap clone exported over NBD.
fn run_tgt_nbd_esnap(ctx: &Ctx, b: &Bench) -> Result<Run> {
    let tmp = TmpDir::new(ctx, "ours")?;
    let store = tmp.0.join("store.img");
    File::create(&store)?.set_len(ctx.file_size + (256 << 20))?;
    let sock = tmp.0.join("rpc.sock");
    let nbd = tmp.0.join("nbd.sock");
    let (guard, shown) = start_tgt(ctx, &sock, &[])?;
    let base = ctx.file(DataFile::Pattern);
    // Buffered entries open both files through the page cache, as qemu-nbd
    // `--cache=writeback` does (`direct_io` is our extension of `bdev_aio_create`).
    let direct_io = b.io() != Io::Buffered;
    let calls = [
        (
            "bdev_aio_create",
            json!({"name": "base", "filename": base, "block_size": 4096,
                   "readonly": true, "uuid": BASE_UUID, "direct_io": direct_io}),
        ),
        (
            "bdev_aio_create",
            json!({"name": "store", "filename": store, "block_size": 4096,
                   "direct_io": direct_io}),
        ),
        (
            "bdev_lvol_create_lvstore",
            json!({"bdev_name": "store", "lvs_name": "lvs", "cluster_sz": 1 << 20,
                   "clear_method": "none"}),
        ),
        (
            "bdev_lvol_clone_bdev",
            json!({"bdev": BASE_UUID, "lvs_name": "lvs", "clone_name": "ec"}),
        ),
        (
            "nbd_server_start",
            json!({"listen": format!("unix:{}", nbd.display())}),
        ),
        (
            "nbd_export_add",
            json!({"bdev_name": "lvs/ec", "name": "ec"}),
        ),
    ];
    let mut commands = vec![shown];
    for (m, p) in calls {
        rpc(&sock, m, p.clone())?;
        commands.push(format!("rpc {m} {p}"));
    }
    if b.ours == Ours::TgtIdle {
        let secs = ctx
            .secs_of(b.work.len)
            .ok_or_else(|| anyhow!("the idle entry is timed"))?;
        // Let the setup's work finish before the window opens.
        std::thread::sleep(Duration::from_millis(500));
        let pct = idle_cpu_percent(guard.0.id(), secs)?;
        let _ = rpc(&sock, "spdk_kill_instance", json!({"sig_name": "SIGTERM"}));
        commands.push(format!(
            "(no client; CPU time of the tgt process over {secs} s)"
        ));
        return Ok(Run {
            value: pct,
            commands,
            detail: json!({"seconds": secs}),
        });
    }
    let (value, client, cpu) = nbd_client_with_server_cpu(
        ctx,
        b,
        &format!("nbd+unix:///ec?socket={}", nbd.display()),
        guard.0.id(),
    )?;
    commands.push(client);
    // After the client's run: by then the server has opened everything it opens.
    let files = open_files(guard.0.id(), &[&ctx.data_dir]);
    let _ = rpc(&sock, "spdk_kill_instance", json!({"sig_name": "SIGTERM"}));
    drop(guard);
    // The kernel may close a dead process's ring-registered files (and so release its lock on
    // the pattern file, which qemu-nbd's locking refuses to share) a while after its exit.
    let lock_wait = wait_unlocked(&base, Duration::from_secs(10));
    let direct = all_direct(&files);
    let mut detail = json!({"open_files": files, "all_o_direct": direct,
                            "pattern_lock_released_after_ms": lock_wait,
                            "server_cpu": cpu});
    if let (Some(d), want) = (direct, b.io() == Io::Direct) {
        if d != want {
            detail["mode_mismatch"] = json!(format!(
                "the entry asks for {} access but tgt opened its files {}",
                b.io().name(),
                if d {
                    "with O_DIRECT"
                } else {
                    "through the page cache"
                }
            ));
        }
    }
    Ok(Run {
        value,
        commands,
        detail,
    })
}

/// Waits until no process holds a lock on `path` (`/proc/locks`, matched by inode), at most
/// `timeout`; returns the milliseconds waited, or None if a lock was still there.
fn wait_unlocked(path: &Path, timeout: Duration) -> Option<u64> {
    let ino = std::fs::metadata(path).ok()?.ino();
    let t0 = Instant::now();
    loop {
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        if !locks_name_inode(&locks, ino) {
            return Some(t0.elapsed().as_millis() as u64);
        }
        if t0.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a `/proc/locks` text has a lock on inode `ino` (field `MAJOR:MINOR:INODE`).
fn locks_name_inode(locks: &str, ino: u64) -> bool {
    locks.lines().any(|l| {
        l.split_whitespace()
            .filter_map(|f| f.rsplit_once(':'))
            .any(|(dev, i)| dev.contains(':') && i.parse() == Ok(ino))
    })
}

/// CPU time (user + system, all threads) a process spends over `secs` seconds, in percent of
/// one core, from /proc/PID/stat.
fn idle_cpu_percent(pid: u32, secs: f64) -> Result<f64> {
    let ticks = |pid: u32| -> Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        parse_stat_cpu_ticks(&stat)
    };
    let hz = clock_ticks_per_second();
    let t0 = ticks(pid)?;
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let t1 = ticks(pid)?;
    let wall = start.elapsed().as_secs_f64();
    Ok((t1.saturating_sub(t0)) as f64 / hz / wall * 100.0)
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line; the command name (field 2, in
/// parentheses) may contain spaces.
fn parse_stat_cpu_ticks(stat: &str) -> Result<u64> {
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad /proc stat line"))?;
    // `rest` starts at field 3 (state): utime is field 14, so index 11 here.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| anyhow!("bad /proc stat field {}", i + 3))
    };
    Ok(num(11)? + num(12)?)
}

/// The qemu-nbd peer: a fresh qcow2 clone (1 MiB clusters) of the pattern file served with
/// `--cache` and `--aio` as given, the same client as ours.
fn run_qemu_nbd_qcow2(ctx: &Ctx, b: &Bench, cache: &str, aio: Option<&str>) -> Result<Run> {
    let qemu_nbd = util::find_or_install("qemu-nbd", "qemu-utils")
        .ok_or_else(|| anyhow!("qemu-nbd missing"))?;
    let tmp = TmpDir::new(ctx, "peer")?;
    let qcow = tmp.0.join("clone.qcow2");
    let create = create_qcow2_clone(ctx, &qcow, 1 << 20)?;
    let qsock = tmp.0.join("q.sock");
    let mut cmd = ctx.pinned(&qemu_nbd);
    cmd.args(["-f", "qcow2", "-x", "q", "-t", "--cache", cache]);
    if let Some(a) = aio {
        cmd.args(["--aio", a]);
    }
    cmd.arg("-k").arg(&qsock).arg(&qcow);
    let shown = util::show(&cmd);
    let srv = start_server(cmd, &qsock)?;
    let (value, client, cpu) = nbd_client_with_server_cpu(
        ctx,
        b,
        &format!("nbd+unix:///q?socket={}", qsock.display()),
        srv.0.id(),
    )?;
    let files = open_files(srv.0.id(), &[&ctx.data_dir]);
    drop(srv);
    Ok(Run {
        value,
        commands: vec![create, shown, client],
        detail: json!({"open_files": files, "all_o_direct": all_direct(&files),
                       "version": util::version_of(&qemu_nbd), "server_cpu": cpu}),
    })
}

/// Starts a pinned `qemu-nbd -r` serving the pattern file as export `base` on `dir/q.sock`;
/// returns the server, the socket and the command line.
fn start_qemu_nbd_raw(ctx: &Ctx, dir: &Path) -> Result<(KillOnDrop, PathBuf, String)> {
    let qemu_nbd =
        util::find_or_install("qemu-nbd", "qemu-utils").ok_or_else(|| anyhow!("no qemu-nbd"))?;
    let sock = dir.join("q.sock");
    let mut cmd = ctx.pinned(qemu_nbd);
    cmd.args(["-r", "-t", "-e", "8", "-x", "base", "-f", "raw", "-k"])
        .arg(&sock)
        .arg(ctx.file(DataFile::Pattern));
    let shown = util::show(&cmd);
    let srv = start_server(cmd, &sock)?;
    Ok((srv, sock, shown))
}

/// The peer of the NBD client: `qemu-img bench` straight from qemu-nbd.
fn run_qemu_nbd_raw_peer(ctx: &Ctx, b: &Bench) -> Result<Run> {
    let tmp = TmpDir::new(ctx, "peer")?;
    let (srv, sock, shown) = start_qemu_nbd_raw(ctx, &tmp.0)?;
    // Here the client is the side measured (against our NBD client bdev): it runs where the
    // sides run, never on the client CPUs.
    let own = Ctx {
        client_cpus: ctx.cpus.clone(),
        ..ctx.clone()
    };
    let r = nbd_client(
        &own,
        b,
        &format!("nbd+unix:///base?socket={}", sock.display()),
    );
    drop(srv);
    let (value, client) = r?;
    Ok(Run {
        value,
        commands: vec![shown, client],
        detail: Value::Null,
    })
}

/// The JSON config bdevperf loads (`-c`) for a job, and the bdev to run on (`-T`).
fn spdk_config(ctx: &Ctx, b: &Bench, job: SpdkJob, store: &Path) -> (Value, String) {
    match job {
        SpdkJob::Aio => (
            json!({"subsystems": [{"subsystem": "bdev", "config": [
                {"method": "bdev_aio_create",
                 "params": {"name": "aio0", "filename": ctx.file(b.file), "block_size": 512}},
                {"method": "bdev_wait_for_examine"}
            ]}]}),
            "aio0".into(),
        ),
        SpdkJob::Esnap {
            cluster,
            base_block,
        } => (
            json!({"subsystems": [{"subsystem": "bdev", "config": [
                {"method": "bdev_aio_create",
                 "params": {"name": "base", "filename": ctx.file(b.file),
                            "block_size": base_block, "uuid": BASE_UUID, "readonly": true}},
                {"method": "bdev_aio_create",
                 "params": {"name": "store", "filename": store, "block_size": 4096}},
                {"method": "bdev_lvol_create_lvstore",
                 "params": {"bdev_name": "store", "lvs_name": "lvs", "cluster_sz": cluster,
                            "clear_method": "none"}},
                {"method": "bdev_lvol_clone_bdev",
                 "params": {"bdev": BASE_UUID, "lvs_name": "lvs", "clone_name": "clone"}},
                {"method": "bdev_wait_for_examine"}
            ]}]}),
            "lvs/clone".into(),
        ),
    }
}

/// SPDK's bdevperf on the same file(s), pinned to the same CPUs (`-m` the same set), a
/// generated JSON config; untested against a live binary here (see docs/benchmarks.md).
fn run_spdk(ctx: &Ctx, b: &Bench, bin: &Path, job: SpdkJob) -> Result<Run> {
    let tmp = TmpDir::new(ctx, "spdk")?;
    let store = tmp.0.join("store.img");
    if let SpdkJob::Esnap { .. } = job {
        File::create(&store)?.set_len(ctx.file_size + (256 << 20))?;
    }
    let (config, bdev) = spdk_config(ctx, b, job, &store);
    let cfg_path = tmp.0.join("bdevperf.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&config)?)?;
    let secs = ctx
        .secs_of(b.work.len)
        .ok_or_else(|| anyhow!("the SPDK peer runs timed workloads only"))?;
    let mut cmd = ctx.pinned(bin);
    cmd.arg("-c")
        .arg(&cfg_path)
        .args(["-q", &b.work.qd.to_string()])
        .args(["-o", &b.work.bs.to_string()])
        .args(["-w", b.work.rw()])
        // bdevperf takes whole seconds.
        .args(["-t", &(secs.ceil() as u64).max(1).to_string()])
        .args(["-m", &cpu_mask(&parse_cpu_list(&ctx.cpus)?)])
        .args(["-T", &bdev]);
    if let Ok(extra) = std::env::var(SPDK_ARGS_ENV) {
        cmd.args(extra.split_whitespace());
    }
    let out = util::output("SPDK bdevperf", &mut cmd)?;
    Ok(Run {
        value: parse_bdevperf(&out)?,
        commands: vec![util::show(&cmd)],
        detail: json!({"config": config, "report": bdevperf_report(&out)}),
    })
}

/// bdevperf's result table (from its `Device Information` header to the `Total` line), one
/// string per line: what the figure was read from.
fn bdevperf_report(out: &str) -> Vec<String> {
    out.lines()
        .map(|l| l.trim_start_matches('\r').trim_end())
        .skip_while(|l| !l.trim_start().starts_with("Device Information"))
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Drops a file's clean pages from the page cache (GNU dd: `iflag=nocache count=0` advises
/// DONTNEED for the whole file); best effort, it only makes runs start alike.
fn drop_page_cache(path: &Path) {
    let ok = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("note: could not drop the page cache of {}", path.display());
    }
}

/// Bytes `start..start + out.len()` of MiB number `tag` of the pattern: distinct per MiB,
/// never zero.
fn pattern_bytes(tag: u32, start: usize, out: &mut [u8]) {
    for (i, x) in out.iter_mut().enumerate() {
        let i = (start + i) as u32;
        *x = (i.wrapping_mul(2_654_435_761) ^ tag.wrapping_mul(40_503)) as u8 | 1;
    }
}

/// Creates a data file holding the pattern (fully written, so reads hit real blocks rather
/// than holes) unless a fully allocated file of the right size is already there.
fn prepare_data_file(path: &Path, size: u64) -> Result<()> {
    if let Ok(m) = std::fs::metadata(path) {
        if m.len() == size && m.blocks() * 512 >= size {
            return Ok(());
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    eprintln!(
        "==> writing the {} MiB data file {}",
        size >> 20,
        path.display()
    );
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        pattern_bytes((off >> 20) as u32, 0, &mut chunk);
        let n = chunk.len().min((size - off) as usize);
        f.write_all(&chunk[..n])?;
        off += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Whether the file still holds the pattern: its size, and 4 KiB of every MiB (at an offset
/// that moves from MiB to MiB) compared byte for byte.
fn pattern_intact(path: &Path, size: u64) -> Result<bool> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
    };
    if f.metadata()?.len() != size {
        return Ok(false);
    }
    let mut want = vec![0u8; 4096];
    let mut got = vec![0u8; 4096];
    for mib in 0..size.div_ceil(1 << 20) {
        let at = (mib * 7 * 4096) % (1 << 20);
        let len = 4096.min(size - (mib << 20) - at.min(size - (mib << 20))) as usize;
        if len == 0 {
            continue;
        }
        // Only the bytes compared are computed: xtask runs unoptimised.
        pattern_bytes(mib as u32, at as usize, &mut want[..len]);
        f.read_exact_at(&mut got[..len], (mib << 20) + at)?;
        if got[..len] != want[..len] {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_take_median_min_max_and_ratio_of_medians() {
        let s = summarize(&[30.0, 10.0, 20.0, 50.0, 40.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (30.0, 10.0, 50.0));
        let e = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((e.median, e.min, e.max), (2.5, 1.0, 4.0));
        assert_eq!(summarize(&[7.0]).unwrap().median, 7.0);
        assert!(summarize(&[]).is_none());
        assert!(summarize(&[1.0, f64::NAN]).is_none());
        let p = summarize(&[10.0, 12.0, 20.0]).unwrap();
        assert_eq!(ratio(&s, &p), Some(2.5));
        let zero = summarize(&[0.0]).unwrap();
        assert_eq!(ratio(&s, &zero), None);
    }

    #[test]
    fn the_best_peer_depends_on_the_unit() {
        let a = summarize(&[100.0]).unwrap();
        let b = summarize(&[200.0]).unwrap();
        let peers = [(1, a), (2, b)];
        assert_eq!(best_peer(&peers, true).unwrap().0, 2);
        assert_eq!(best_peer(&peers, false).unwrap().0, 1);
        assert!(best_peer(&[], true).is_none());
        assert!(Unit::Iops.higher_is_better() && !Unit::Ms.higher_is_better());
    }

    #[test]
    fn sides_alternate_which_goes_first() {
        assert_eq!(round_order(0, 2), [0, 1]);
        assert_eq!(round_order(1, 2), [1, 0]);
        assert_eq!(round_order(2, 2), [0, 1]);
        // Three sides: each goes first once in three rounds, and every round runs all.
        let firsts: Vec<usize> = (0..3).map(|r| round_order(r, 3)[0]).collect();
        assert_eq!(firsts, [0, 1, 2]);
        for r in 0..5 {
            let mut o = round_order(r, 3);
            o.sort_unstable();
            assert_eq!(o, [0, 1, 2]);
        }
        assert_eq!(round_order(3, 1), [0]);
        assert!(round_order(0, 0).is_empty());
    }

    #[test]
    fn nbd_clients_run_on_the_client_cpus_and_the_json_says_so() {
        let same = test_ctx();
        assert_eq!(
            same.pinning(),
            "every process of every side under `taskset -c 1`"
        );
        let ctx = Ctx {
            client_cpus: "0".into(),
            ..test_ctx()
        };
        let args = |c: &Command| -> Vec<String> {
            c.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(args(&ctx.client_pinned("fio")), ["-c", "0", "fio"]);
        assert_eq!(args(&ctx.pinned("tgt")), ["-c", "1", "tgt"]);
        assert!(
            ctx.pinning().contains("`taskset -c 0`"),
            "{}",
            ctx.pinning()
        );
    }

    #[test]
    fn cpu_lists_and_masks() {
        assert_eq!(parse_cpu_list("1").unwrap(), [1]);
        assert_eq!(parse_cpu_list("0-3,6").unwrap(), [0, 1, 2, 3, 6]);
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("").is_err());
        assert_eq!(cpu_mask(&[1]), "0x2");
        assert_eq!(cpu_mask(&[0, 1, 2, 3, 6]), "0x4f");
        assert_eq!(cpu_mask(&[8]), "0x100");
        assert!(parse_cpu_list(&default_cpu()).is_ok());
    }

    #[test]
    fn fio_json_is_parsed_even_after_warnings() {
        let out = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"fio version": "fio-3.33", "jobs": [{"jobname": "x", "error": 0,
 "read": {"iops": 1234.5, "total_ios": 2469}, "write": {"iops": 0.0, "total_ios": 0}}]}"#;
        assert_eq!(parse_fio(out).unwrap(), (1234.5, 2469));
        assert!(parse_fio("garbage").is_err());
        assert!(parse_fio(r#"{"jobs": []}"#).is_err());
        assert!(parse_fio(r#"{"jobs": [{"error": 5, "read": {"iops": 1.0}}]}"#).is_err());
        assert!(
            parse_fio(r#"{"jobs": [{"error": 0, "read": {"iops": 0.0, "total_ios": 0}}]}"#)
                .is_err()
        );
    }

    #[test]
    fn a_server_that_exits_at_start_is_reported_with_its_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo 'Failed to get shared \"write\" lock' >&2; exit 1",
        ]);
        let e = start_server(cmd, Path::new("/nonexistent/q.sock"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("exited (exit status: 1)"), "{e}");
        assert!(e.contains("Failed to get shared"), "{e}");
    }

    #[test]
    fn proc_locks_lines_are_matched_by_inode() {
        let locks = "1: OFDLCK ADVISORY  READ -1 fe:00:5382392 100 100\n\
                     2: POSIX  ADVISORY  WRITE 77 08:01:12 0 EOF\n";
        assert!(locks_name_inode(locks, 5_382_392));
        assert!(locks_name_inode(locks, 12));
        assert!(!locks_name_inode(locks, 538_239));
        assert!(!locks_name_inode(locks, 100), "the range is not an inode");
        assert!(!locks_name_inode("", 12));
    }

    #[test]
    fn proc_stat_cpu_ticks_are_parsed() {
        // Fields 14 and 15 (utime 7, stime 5); the name has a space and a parenthesis.
        let line = "1234 (tgt (x) y) S 1 1234 1234 0 -1 4194304 100 0 0 0 7 5 0 0 20 0 9 0 5 0";
        assert_eq!(parse_stat_cpu_ticks(line).unwrap(), 12);
        assert!(parse_stat_cpu_ticks("1234 (tgt) S 1").is_err());
        assert!(parse_stat_cpu_ticks("garbage").is_err());
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_stat_cpu_ticks(&me).is_ok());
    }

    #[test]
    fn qemu_img_bench_output_is_parsed() {
        let out = "Sending 1000 read requests, 4096 bytes each, 32 in parallel \
                   (starting at offset 0, step size 65536)\nRun completed in 0.500 seconds.\n";
        assert_eq!(parse_qemu_img_bench(out, 1000).unwrap(), 2000.0);
        assert!(parse_qemu_img_bench("nothing", 1000).is_err());
        assert!(parse_qemu_img_bench("Run completed in 0.000 seconds.", 1000).is_err());
    }

    /// The stdout of a live SPDK v24.09 bdevperf (`-q 32 -o 4096 -w randread -t 2 -T aio0`
    /// on an aio bdev), byte for byte: a progress line ending in `\r`, then the table.
    const BDEVPERF_SAMPLE: &str = "\
Running I/O for 2 seconds...
    95276.00 IOPS,   372.17 MiB/s\r
                                                                                                Latency(us)
\r Device Information          : runtime(s)       IOPS      MiB/s     Fail/s     TO/s    Average        min        max
Job: aio0 (Core Mask 0x1, workload: randread, depth: 32, IO size: 4096)
\t aio0                :       2.00   86910.63     339.49       0.00     0.00     368.09      50.81   16333.59
\r ===================================================================================================================
\r Total                       :              86910.63     339.49       0.00     0.00     368.09      50.81   16333.59
";

    #[test]
    fn bdevperf_total_line_is_parsed() {
        assert_eq!(parse_bdevperf(BDEVPERF_SAMPLE).unwrap(), 86_910.63);
        let report = bdevperf_report(BDEVPERF_SAMPLE);
        assert_eq!(report.len(), 5, "{report:?}");
        assert!(report[0].contains("Device Information"));
        assert!(report[4].contains("Total") && report[4].contains("86910.63"));
        assert!(parse_bdevperf("Running I/O for 10 seconds...\n").is_err());
        let failing = BDEVPERF_SAMPLE.replace("339.49       0.00", "339.49      12.00");
        assert!(parse_bdevperf(&failing).is_err(), "failed I/O is an error");
        assert!(parse_bdevperf("\r Total : x").is_err());
    }

    /// The SPDK side end to end with a stand-in for bdevperf: the command line it gets, the
    /// config file it is handed, its report parsed.
    #[test]
    fn spdk_peer_runs_bdevperf_with_a_generated_config() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("xtask-spdk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("sample.txt"), BDEVPERF_SAMPLE).unwrap();
        let script = dir.join("bdevperf");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$@\" > {d}/args\nwhile [ $# -gt 0 ]; do \
                 if [ \"$1\" = -c ]; then cp \"$2\" {d}/config.json; fi; shift; done\n\
                 cat {d}/sample.txt\n",
                d = dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut ctx = test_ctx();
        ctx.data_dir = dir.clone();
        ctx.cpus = default_cpu();
        ctx.spdk = Some(script);
        let b = bench_named("aio_randread_4k_qd32_direct");
        assert_eq!(sides(&ctx, &b).last(), Some(&Side::Spdk));
        let run = run_side(&ctx, &b, Side::Spdk).unwrap();
        assert_eq!(run.value, 86_910.63);
        assert_eq!(run.detail["report"].as_array().unwrap().len(), 5);
        assert!(run.commands[0].starts_with(&format!("taskset -c {} ", ctx.cpus)));
        let args = std::fs::read_to_string(dir.join("args")).unwrap();
        let mask = cpu_mask(&parse_cpu_list(&ctx.cpus).unwrap());
        assert!(
            args.contains(&format!(
                "-q 32 -o 4096 -w randread -t 10 -m {mask} -T aio0"
            )),
            "{args}"
        );
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let create = &cfg["subsystems"][0]["config"][0];
        assert_eq!(create["method"], json!("bdev_aio_create"));
        assert_eq!(
            create["params"]["filename"],
            json!(ctx.file(DataFile::Pattern))
        );
        assert!(
            !dir.join("tmp-spdk").exists(),
            "the run's scratch directory is removed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn spdk_config_names_the_same_files() {
        let ctx = test_ctx();
        let b = bench_named("esnap_fresh_clone_randwrite_4k_qd32_direct_1m_clusters_2s_base512");
        let store = PathBuf::from("/tmp/s.img");
        let (cfg, bdev) = spdk_config(&ctx, &b, b.spdk.unwrap(), &store);
        assert_eq!(bdev, "lvs/clone");
        let calls = cfg["subsystems"][0]["config"].as_array().unwrap();
        assert_eq!(
            calls[0]["params"]["filename"],
            json!(ctx.file(DataFile::Pattern))
        );
        assert_eq!(calls[0]["params"]["block_size"], json!(512));
        assert_eq!(calls[2]["params"]["cluster_sz"], json!(1 << 20));
        assert_eq!(calls[3]["method"], json!("bdev_lvol_clone_bdev"));
    }

    /// The record of runs without errors, round orders or notes.
    fn plain_record(ctx: &Ctx, b: &Bench, sides: &[Side], runs: &[Vec<Run>]) -> Value {
        let none = vec![None; sides.len()];
        build_record(
            ctx,
            b,
            sides,
            runs,
            &none,
            vec![],
            String::new(),
            Value::Null,
        )
    }

    /// The entry of that name.
    fn bench_named(name: &str) -> Bench {
        benches().into_iter().find(|b| b.name == name).unwrap()
    }

    pub(super) fn test_ctx() -> Ctx {
        Ctx {
            data_dir: PathBuf::from("/data"),
            bench_bin: PathBuf::from("/bin/bench"),
            tgt_bin: PathBuf::from("/bin/tgt"),
            out_dir: PathBuf::from("/out"),
            file_size: 1 << 30,
            secs_cap: f64::MAX,
            quick: false,
            rounds: 5,
            cpus: "1".into(),
            client_cpus: "1".into(),
            spdk: None,
        }
    }

    fn fake_run(v: f64) -> Run {
        Run {
            value: v,
            commands: vec!["taskset -c 1 x".into()],
            detail: Value::Null,
        }
    }

    #[test]
    fn record_keeps_every_round_and_the_ratio_of_medians() {
        let ctx = test_ctx();
        let b = bench_named("nbd_esnap_randread_4k_qd32_direct_1m_clusters");
        let sd = sides(&ctx, &b);
        assert_eq!(sd.len(), 3);
        let runs = vec![
            [10.0, 30.0, 20.0, 50.0, 40.0].map(fake_run).to_vec(),
            [5.0, 6.0, 7.0, 8.0, 9.0].map(fake_run).to_vec(),
            [10.0, 11.0, 12.0, 13.0, 14.0].map(fake_run).to_vec(),
        ];
        let orders = (0..5)
            .map(|r| {
                round_order(r, 3)
                    .iter()
                    .map(|&i| side_id(&b, sd[i]))
                    .collect()
            })
            .collect();
        let rec = build_record(
            &ctx,
            &b,
            &sd,
            &runs,
            &[None, None, None],
            orders,
            "0.1".into(),
            Value::Null,
        );
        assert_eq!(
            rec["sides"][0]["runs"],
            json!([10.0, 30.0, 20.0, 50.0, 40.0])
        );
        assert_eq!(rec["sides"][2]["runs"].as_array().unwrap().len(), 5);
        assert_eq!(
            rec["ours"],
            json!({"median": 30.0, "min": 10.0, "max": 50.0})
        );
        assert_eq!(
            rec["best_peer"],
            json!("qemu-nbd --cache=none --aio=io_uring")
        );
        assert_eq!(rec["peer_value"]["median"], json!(12.0));
        assert_eq!(rec["ratio"], json!(2.5));
        assert_eq!(rec["params"]["io"], json!("direct"));
        assert_eq!(rec["params"]["order"], json!("random"));
        assert_eq!(rec["params"]["bs"], json!(4096));
        assert_eq!(rec["params"]["qd"], json!(32));
        assert_eq!(rec["params"]["cluster_size"], json!(1 << 20));
        assert_eq!(rec["params"]["base_block_size"], json!(4096));
        assert_eq!(rec["method"]["rounds"], json!(5));
        assert_eq!(rec["method"]["cpus"], json!("1"));
        assert_eq!(
            rec["method"]["order_per_round"][1][0],
            json!("qemu-nbd --cache=none --aio=default")
        );
        assert_eq!(rec["sides"][1]["commands"][0], json!("taskset -c 1 x"));
        assert!(rec["spdk"].is_null(), "no SPDK job for NBD entries");
        assert!(rec["mode_mismatch"].is_null());
        let mut odd = runs.clone();
        odd[0][2].detail = json!({"mode_mismatch": "page cache"});
        let rec = plain_record(&ctx, &b, &sd, &odd);
        assert_eq!(rec["mode_mismatch"], json!("page cache"));
        assert!(markdown_table(&[rec]).contains("2.5 (mode mismatch, see JSON)"));
        // The NBD servers' CPU per request gets its own table, one row per side.
        let cpu = |us: f64| json!({"server_cpu": {"server_cpu_us_per_request": us}});
        let rec = json!({"name": "n", "sides": [
            {"id": "ours", "details": [cpu(4.0), cpu(5.0), cpu(4.5)]},
            {"id": "qemu", "details": [cpu(9.0)]},
            {"id": "fio", "details": [{"ios": 3}]},
            {"id": "raw", "details": [{"cpu_us_per_io": 2.5}]}]});
        let t = server_cpu_table(&[rec]);
        assert!(t.contains("| n | ours | 4.50 (4.00–5.00) | – | – |"), "{t}");
        assert!(t.contains("| n | qemu | 9.00 (9.00–9.00) | – | – |"), "{t}");
        assert!(!t.contains("| fio |"), "{t}");
        assert!(t.contains("| n | raw | 2.50 (2.50–2.50) | – | – |"), "{t}");
        // The client's CPU and the CPUs' busy share, where measured.
        let full = json!({"server_cpu": {"server_cpu_us_per_request": 3.0,
                                         "client_cpu_us_per_request": 6.0,
                                         "cpus_busy_percent": 51.4}});
        let t = server_cpu_table(&[json!({"name": "m", "sides": [
            {"id": "ours", "details": [full]}]})]);
        assert!(
            t.contains("| m | ours | 3.00 (3.00–3.00) | 6.00 (6.00–6.00) | 51 (51–51) |"),
            "{t}"
        );
        assert_eq!(server_cpu_table(&[json!({"name": "x", "sides": []})]), "");
        // /proc/stat: busy is all but idle and iowait; a missing CPU is no figure.
        let stat =
            "cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 10 0 5 80 5 0 0 0 0 0\ncpu1 20 0 10 50 10 5 5 0 0 0\n";
        assert_eq!(parse_cpu_ticks(stat, &[1]), Some((40, 100)));
        assert_eq!(parse_cpu_ticks(stat, &[0, 1]), Some((55, 200)));
        assert_eq!(parse_cpu_ticks(stat, &[2]), None);
        assert_eq!(busy_percent((40, 100), (90, 200)), Some(50.0));
        assert_eq!(busy_percent((40, 100), (40, 100)), None);
        // An entry with an SPDK job says why there is no SPDK figure.
        let a = bench_named("aio_randread_4k_qd32_direct");
        let s = sides(&ctx, &a);
        assert_eq!(s.len(), 2, "no SPDK side without {SPDK_ENV}");
        let r = plain_record(&ctx, &a, &s, &[vec![fake_run(2.0)], vec![fake_run(1.0)]]);
        assert_eq!(r["spdk"], json!("not available (SPDK_BDEVPERF unset)"));
        assert_eq!(r["ratio"], json!(2.0));
        // With a bdevperf binary the SPDK side joins and gets its own ratio.
        let mut with = test_ctx();
        with.spdk = Some(PathBuf::from("/opt/spdk/bdevperf"));
        let s = sides(&with, &a);
        assert_eq!(s, [Side::Ours, Side::Peer(0), Side::Spdk]);
        let r = plain_record(
            &with,
            &a,
            &s,
            &[
                vec![fake_run(3.0)],
                vec![fake_run(1.0)],
                vec![fake_run(6.0)],
            ],
        );
        assert_eq!(r["spdk"]["ratio"], json!(0.5));
        assert_eq!(
            r["ratio"],
            json!(3.0),
            "SPDK does not count as the best peer"
        );
    }

    #[test]
    fn names_say_what_runs() {
        let all = benches();
        let mut names: Vec<&str> = all.iter().map(|b| b.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len(), "unique names");
        for b in &all {
            let n = b.name;
            assert!(
                n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{n}"
            );
            if !b.is_io() {
                continue;
            }
            let order = match b.work.order {
                Order::Rand => "rand",
                Order::Seq => "seq",
                Order::Stride(_) => "",
            };
            assert!(n.contains(order), "{n}: order");
            if let Order::Stride(s) = b.work.order {
                // A stride is named: strided, scattered, or one write per cluster.
                let per_cluster = n.contains("first_write") && Some(s) == b.cluster();
                assert!(
                    n.contains("strided") || n.contains("scattered") || per_cluster,
                    "{n}: a strided pattern is named"
                );
            }
            assert!(
                n.contains(&format!("_{}k_", b.work.bs / 1024)),
                "{n}: block size"
            );
            assert!(n.contains(&format!("qd{}", b.work.qd)), "{n}: depth");
            assert!(n.contains(b.io().name()), "{n}: direct or buffered");
            if let Some(c) = b.cluster().filter(|_| !matches!(b.ours, Ours::Aio { .. })) {
                let c = if c >= 1 << 20 {
                    format!("{}m_clusters", c >> 20)
                } else {
                    format!("{}k_clusters", c >> 10)
                };
                assert!(n.contains(&c), "{n}: cluster size");
            }
            if let (Some(bb), Ours::Esnap { .. } | Ours::MallocEsnap { .. }) =
                (b.base_block(), b.ours)
            {
                assert!(n.ends_with(&format!("base{bb}")), "{n}: base block size");
            }
            assert!(
                n.contains(if b.work.write { "write" } else { "read" }),
                "{n}: direction"
            );
        }
    }

    #[test]
    fn esnap_entries_cover_both_base_block_sizes_and_nbd_covers_the_matrix() {
        let all = benches();
        let esnap: Vec<&Bench> = all
            .iter()
            .filter(|b| matches!(b.ours, Ours::Esnap { .. }))
            .collect();
        for b in &esnap {
            let other = if b.name.ends_with("base512") {
                b.name.replace("base512", "base4096")
            } else {
                b.name.replace("base4096", "base512")
            };
            assert!(
                all.iter().any(|x| x.name == other),
                "{} has no twin",
                b.name
            );
        }
        let nbd: Vec<&Bench> = all.iter().filter(|b| b.ours == Ours::NbdTgtEsnap).collect();
        assert_eq!(nbd.len(), 8);
        for io in [Io::Direct, Io::Buffered] {
            for write in [false, true] {
                for order in [Order::Rand, Order::Seq] {
                    let hit = nbd
                        .iter()
                        .filter(|b| b.io() == io && b.work.write == write && b.work.order == order)
                        .count();
                    assert_eq!(hit, 1, "{io:?} write={write} {order:?}");
                }
            }
        }
        for b in &nbd {
            assert_eq!(b.peers.len(), 2);
            assert!(b.peers.iter().any(|p| matches!(
                p,
                Peer::QemuNbd {
                    aio: Some("io_uring"),
                    ..
                }
            )));
            assert!(b
                .peers
                .iter()
                .any(|p| matches!(p, Peer::QemuNbd { aio: None, .. })));
        }
    }

    /// qemu-img bench's offsets: from 0, `+ step`, wrapped modulo (size - bs).
    fn qemu_img_offsets(size: u64, bs: u64, step: u64, n: u64) -> Vec<u64> {
        let mut off = 0;
        (0..n)
            .map(|_| {
                let o = off;
                off = (off + step) % (size - bs);
                o
            })
            .collect()
    }

    #[test]
    fn cow_entries_write_each_cluster_once_at_both_file_sizes() {
        for size in [FULL_FILE_SIZE, QUICK_FILE_SIZE] {
            let mut ctx = test_ctx();
            ctx.file_size = size;
            ctx.quick = size == QUICK_FILE_SIZE;
            for b in benches()
                .iter()
                .filter(|b| b.name.contains("cow_first_write"))
            {
                let cluster = b.cluster().unwrap();
                let n = ctx.count(b.work.len).unwrap();
                assert!(n >= 256, "{}: {n}", b.name);
                let offs = qemu_img_offsets(size, b.work.bs, b.work.step().unwrap(), n);
                let mut clusters: Vec<u64> = offs.iter().map(|o| o / cluster).collect();
                assert!(
                    offs.iter().all(|o| (o % cluster) + b.work.bs <= cluster),
                    "{}: a write crosses a cluster",
                    b.name
                );
                clusters.sort_unstable();
                clusters.dedup();
                assert_eq!(
                    clusters.len() as u64,
                    n,
                    "{} at {size}: a cluster written twice",
                    b.name
                );
                assert!(
                    matches!(b.peers[..], [Peer::QemuImgCow { cluster: c }] if c == cluster),
                    "{}",
                    b.name
                );
            }
        }
    }

    #[test]
    fn write_entries_never_write_the_pattern_file() {
        for b in benches() {
            let writes_file =
                b.work.write && matches!(b.ours, Ours::Aio { .. } | Ours::Lvol { .. } | Ours::Blob);
            if writes_file {
                assert!(
                    matches!(b.file, DataFile::Scratch | DataFile::Thin),
                    "{}",
                    b.name
                );
            }
            if b.file == DataFile::Pattern {
                // Every side opens the pattern read-only or only as a qcow2/esnap base.
                for p in &b.peers {
                    assert!(
                        !matches!(p, Peer::Fio | Peer::QemuImgRaw) || !b.work.write,
                        "{}",
                        b.name
                    );
                    if let Peer::Ours(o) = p {
                        assert!(
                            !b.work.write || !matches!(o, Ours::Aio { .. }),
                            "{}",
                            b.name
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn data_file_is_fully_written_checked_and_reused() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        let p = dir.join("d.raw");
        let size = (3 << 20) + 8192;
        prepare_data_file(&p, size).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), size);
        assert!(m.blocks() * 512 >= size, "no holes");
        let data = std::fs::read(&p).unwrap();
        assert!(data.iter().all(|&b| b != 0));
        assert!(pattern_intact(&p, size).unwrap());
        let mtime = m.modified().unwrap();
        prepare_data_file(&p, size).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), mtime);
        // Zeroes written where the check looks (MiB 1 at 7 * 4 KiB) are found.
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0u8; 512], (1 << 20) + 7 * 4096).unwrap();
        assert!(!pattern_intact(&p, size).unwrap());
        assert!(!pattern_intact(&dir.join("missing"), size).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn markdown_quotes_median_with_range() {
        let rec = json!({"name": "x", "unit": "IOPS", "ours": {"median": 1500.0, "min": 1000.0, "max": 2000.0},
                         "best_peer": "fio", "peer_value": {"median": 50.0, "min": 40.0, "max": 60.0},
                         "ratio": 30.0, "spdk": "not available (SPDK_BDEVPERF unset)"});
        let md = markdown_table(&[rec]);
        assert!(md.contains("| x | IOPS | 1500 (1000–2000) | fio | 50.0 (40.0–60.0) | 30.0 | not available (SPDK_BDEVPERF unset) |"), "{md}");
    }
}
