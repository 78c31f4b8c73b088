//! The metrics endpoint (`tgt --metrics ADDR:PORT`): Prometheus text format (version 0.0.4)
//! over a minimal HTTP/1.0 responder.
//!
//! Families (all prefixed `tgt_`):
//! * `bdev_ops_total`, `bdev_bytes_total`, `bdev_latency_seconds_total` `{bdev, type}` with
//!   `type` read, write or unmap; `bdev_io_errors_total{bdev}`; the counters of
//!   `bdev_get_iostat`.
//! * `bdev_latency_seconds{bdev}`: a histogram for every bdev whose histogram is on
//!   (`bdev_enable_histogram`), its buckets read from SPDK's histogram at bucket resolution.
//! * `lvol_store_clusters{lvs}`, `lvol_store_free_clusters{lvs}`, `lvol_store_cluster_size_bytes{lvs}`.
//! * `lvol_degraded`: lvols missing their external snapshot.
//! * `lvol_esnap_retries_total`, `lvol_esnap_eio_total`: retried I/O of degraded esnap clones
//!   and I/O that failed with EIO after its retries.
//! * `nbd_connections{export}`: open NBD connections.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bdev_core::stats::{self, OpCounters};
use bdev_core::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::nbd::server::NbdServer;

/// Default address of `--metrics` given without a value.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9464";
/// Largest request head read from a scraper.
const MAX_HEAD: usize = 8192;
/// Scrapes served at once; more wait for a slot.
const MAX_CONNS: usize = 16;
/// A scraper that sends no complete request head within this time is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Latency histogram bucket bounds in seconds (`le`).
const LE_SECONDS: [f64; 19] = [
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// What the endpoint reads.
pub struct Metrics {
    registry: Registry,
    lvol: Option<lvol::LvolModule>,
    nbd: Arc<NbdServer>,
}

/// A label value escaped as the text format asks (backslash, quote, newline).
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

fn ticks_to_secs(t: u64) -> f64 {
    t as f64 / stats::TICK_RATE as f64
}

/// A per-store gauge family: name, help text and the sample's value.
type StoreGauge = (&'static str, &'static str, fn(&lvol::LvolStore) -> u64);

/// A per-bdev, per-I/O-type counter family: name, help text and the sample's value.
type CounterFamily = (&'static str, &'static str, fn(&OpCounters) -> String);

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

impl Metrics {
    /// The endpoint's view of the target.
    pub fn new(
        registry: Registry,
        lvol: Option<lvol::LvolModule>,
        nbd: Arc<NbdServer>,
    ) -> Arc<Self> {
        Arc::new(Metrics {
            registry,
            lvol,
            nbd,
        })
    }

    /// The current metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let devs: Vec<_> = self
            .registry
            .list_with_stats()
            .into_iter()
            .map(|(d, s)| (esc(d.name()), s.get(), s.histogram()))
            .collect();
        let by_type = |st: &bdev_core::stats::IoStat| -> [(&'static str, OpCounters); 3] {
            [("read", st.read), ("write", st.write), ("unmap", st.unmap)]
        };
        // One counter family per (name, help, value) with a sample per bdev and I/O type.
        let families: [CounterFamily; 3] = [
            ("tgt_bdev_ops", "Completed I/O by type.", |c| {
                c.ops.to_string()
            }),
            ("tgt_bdev_bytes", "Bytes moved by completed I/O.", |c| {
                c.bytes.to_string()
            }),
            (
                "tgt_bdev_latency_seconds",
                "Sum of the latencies of completed I/O.",
                |c| ticks_to_secs(c.latency_ticks).to_string(),
            ),
        ];
        for (name, help, value) in families {
            header(&mut out, name, "counter", help);
            for (n, st, _) in &devs {
                for (t, c) in by_type(st) {
                    let _ = writeln!(
                        out,
                        "{name}_total{{bdev=\"{n}\",type=\"{t}\"}} {}",
                        value(&c)
                    );
                }
            }
        }
        header(&mut out, "tgt_bdev_io_errors", "counter", "Failed I/O.");
        for (n, st, _) in &devs {
            let _ = writeln!(
                out,
                "tgt_bdev_io_errors_total{{bdev=\"{n}\"}} {}",
                st.failed
            );
        }
        header(
            &mut out,
            "tgt_bdev_io_latency_seconds",
            "histogram",
            "I/O latency of bdevs with bdev_enable_histogram on (bucket resolution).",
        );
        for (n, _, h) in &devs {
            let Some(h) = h else { continue };
            let borders: Vec<u64> = LE_SECONDS
                .iter()
                .map(|s| (s * stats::TICK_RATE as f64) as u64)
                .collect();
            let counts = h.borders_count(&borders);
            for (le, c) in LE_SECONDS.iter().zip(&counts) {
                let _ = writeln!(
                    out,
                    "tgt_bdev_io_latency_seconds_bucket{{bdev=\"{n}\",le=\"{le}\"}} {c}"
                );
            }
            let total = h.total();
            let _ = writeln!(
                out,
                "tgt_bdev_io_latency_seconds_bucket{{bdev=\"{n}\",le=\"+Inf\"}} {total}"
            );
            let _ = writeln!(
                out,
                "tgt_bdev_io_latency_seconds_sum{{bdev=\"{n}\"}} {}",
                ticks_to_secs(h.sum())
            );
            let _ = writeln!(
                out,
                "tgt_bdev_io_latency_seconds_count{{bdev=\"{n}\"}} {total}"
            );
        }
        if let Some(lvol) = &self.lvol {
            let stores = lvol.lvstores();
            // One gauge family per (name, help, value) with a sample per store.
            let gauges: [StoreGauge; 3] = [
                (
                    "tgt_lvol_store_clusters",
                    "Data clusters of the lvol store.",
                    |s| s.total_data_clusters(),
                ),
                (
                    "tgt_lvol_store_free_clusters",
                    "Free clusters of the lvol store.",
                    |s| s.free_clusters(),
                ),
                (
                    "tgt_lvol_store_cluster_size_bytes",
                    "Cluster size of the lvol store.",
                    |s| u64::from(s.cluster_size()),
                ),
            ];
            for (name, help, value) in gauges {
                header(&mut out, name, "gauge", help);
                for s in &stores {
                    let _ = writeln!(out, "{name}{{lvs=\"{}\"}} {}", esc(&s.name()), value(s));
                }
            }
            let degraded = lvol.lvols().iter().filter(|l| l.is_degraded()).count();
            header(
                &mut out,
                "tgt_lvol_degraded",
                "gauge",
                "Lvols whose external snapshot is missing.",
            );
            let _ = writeln!(out, "tgt_lvol_degraded {degraded}");
            let (retries, eio) = lvol.esnap_counts();
            header(
                &mut out,
                "tgt_lvol_esnap_retries",
                "counter",
                "Retries of I/O that needed a missing external snapshot.",
            );
            let _ = writeln!(out, "tgt_lvol_esnap_retries_total {retries}");
            header(
                &mut out,
                "tgt_lvol_esnap_eio",
                "counter",
                "I/O failed with EIO after its esnap retries.",
            );
            let _ = writeln!(out, "tgt_lvol_esnap_eio_total {eio}");
        }
        header(
            &mut out,
            "tgt_nbd_connections",
            "gauge",
            "Open NBD connections by export.",
        );
        if let Some(list) = self.nbd.list().as_array() {
            for e in list {
                let _ = writeln!(
                    out,
                    "tgt_nbd_connections{{export=\"{}\"}} {}",
                    esc(e["name"].as_str().unwrap_or("")),
                    e["connections"].as_u64().unwrap_or(0)
                );
            }
        }
        out
    }

    /// Serves scrapes on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(MAX_CONNS));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(target: "tgt::metrics", "accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.answer(stream).await {
                    tracing::debug!(target: "tgt::metrics", "scrape from {peer}: {e}");
                }
                drop(permit);
            });
        }
    }

    async fn answer(&self, mut s: TcpStream) -> std::io::Result<()> {
        let mut head = Vec::with_capacity(512);
        let mut buf = [0u8; 1024];
        let read = async {
            loop {
                if head.windows(4).any(|w| w == b"\r\n\r\n")
                    || head.windows(2).any(|w| w == b"\n\n")
                {
                    return Ok::<bool, std::io::Error>(true);
                }
                if head.len() > MAX_HEAD {
                    return Ok(false);
                }
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok(false);
                }
                head.extend_from_slice(&buf[..n]);
            }
        };
        let complete = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        let line = String::from_utf8_lossy(head.split(|&b| b == b'\n').next().unwrap_or(b""))
            .trim_end()
            .to_string();
        let mut parts = line.split(' ');
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (status, ctype, body) = if !complete {
            ("400 Bad Request", "text/plain", "bad request\n".to_string())
        } else if method != "GET" && method != "HEAD" {
            (
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n".to_string(),
            )
        } else if path == "/metrics" || path.starts_with("/metrics?") || path == "/" {
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                self.render(),
            )
        } else {
            ("404 Not Found", "text/plain", "try /metrics\n".to_string())
        };
        let mut resp = format!(
            "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if method != "HEAD" {
            resp.extend_from_slice(body.as_bytes());
        }
        s.write_all(&resp).await?;
        s.shutdown().await
    }
}

/// Resolves `addr` and binds it. Unless `allow_remote`, every address it names must be a
/// loopback address (the endpoint has no authentication).
pub async fn bind(addr: &str, allow_remote: bool) -> Result<TcpListener, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("--metrics {addr}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("--metrics {addr}: no address"));
    }
    if !allow_remote {
        if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "--metrics {addr}: {} is not a loopback address; add --metrics-allow-remote to serve it",
                a.ip()
            ));
        }
    }
    let mut last = String::new();
    for a in addrs {
        match TcpListener::bind(a).await {
            Ok(l) => return Ok(l),
            Err(e) => last = format!("--metrics {a}: {e}"),
        }
    }
    Err(last)
}
