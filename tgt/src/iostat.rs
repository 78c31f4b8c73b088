//! SPDK's statistics methods over bdev-core's per-device counters ([`bdev_core::stats`]):
//! `bdev_get_iostat`, `bdev_reset_iostat`, `bdev_enable_histogram`, `bdev_get_histogram`,
//! `bdev_get_histogram_borders`. Keys, defaults, encodings and error codes are those of
//! SPDK's `lib/bdev/bdev_rpc.c`.

use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine;
use bdev_core::rpc::{decode, RpcError, RpcModule, INTERNAL_ERROR};
use bdev_core::stats::{
    self, Histogram, HistogramConfig, IoKind, IoStat, IoStats, OpCounters, ResetMode,
};
use bdev_core::Registry;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// SPDK's default smallest histogram value (1 µs).
const DEFAULT_MIN_NSEC: u64 = 1000;
/// SPDK's default largest histogram value (120 s).
const DEFAULT_MAX_NSEC: u64 = 120_000_000_000;
/// Most borders one `bdev_get_histogram_borders` may ask for.
const MAX_BORDERS: usize = 4096;

/// The statistics methods.
pub struct IostatRpc {
    registry: Registry,
}

impl IostatRpc {
    /// The module over `registry`.
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(IostatRpc { registry })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetIostat {
    names: Option<Vec<String>>,
    /// Older clients send one name.
    name: Option<String>,
    #[serde(default)]
    per_channel: bool,
    reset_mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetIostat {
    name: Option<String>,
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnableHistogram {
    name: String,
    enable: bool,
    opc: Option<String>,
    granularity: Option<u8>,
    min_nsec: Option<u64>,
    max_nsec: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetHistogram {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBorders {
    name: String,
    borders: Vec<u64>,
}

fn reset_mode(s: Option<&str>, default: ResetMode) -> Result<ResetMode, RpcError> {
    match s {
        None => Ok(default),
        Some(s) => ResetMode::from_spdk_name(s).ok_or_else(RpcError::decode_failed),
    }
}

fn put_ops(m: &mut Map<String, Value>, what: &str, c: &OpCounters) {
    m.insert(format!("{what}_latency_ticks"), json!(c.latency_ticks));
    m.insert(
        format!("max_{what}_latency_ticks"),
        json!(c.max_latency_ticks),
    );
    m.insert(format!("min_{what}_latency_ticks"), json!(c.min_reported()));
}

/// The fields of SPDK's `spdk_bdev_dump_io_stat_json`, in its order.
pub fn stat_fields(m: &mut Map<String, Value>, s: &IoStat) {
    m.insert("bytes_read".into(), json!(s.read.bytes));
    m.insert("num_read_ops".into(), json!(s.read.ops));
    m.insert("bytes_written".into(), json!(s.write.bytes));
    m.insert("num_write_ops".into(), json!(s.write.ops));
    m.insert("bytes_unmapped".into(), json!(s.unmap.bytes));
    m.insert("num_unmap_ops".into(), json!(s.unmap.ops));
    m.insert("bytes_copied".into(), json!(0));
    m.insert("num_copy_ops".into(), json!(0));
    put_ops(m, "read", &s.read);
    put_ops(m, "write", &s.write);
    put_ops(m, "unmap", &s.unmap);
    put_ops(m, "copy", &OpCounters::default());
    let mut err = Map::new();
    if s.failed != 0 {
        err.insert("failed".into(), json!(s.failed));
    }
    m.insert("io_error".into(), Value::Object(err));
}

fn no_device(name: &str) -> RpcError {
    tracing::debug!(target: "tgt::iostat", "bdev {name} not found");
    RpcError::from_errno(libc::ENODEV)
}

impl IostatRpc {
    fn stats_of(&self, name: &str) -> Result<(String, Arc<IoStats>), RpcError> {
        let dev = self.registry.get(name).ok_or_else(|| no_device(name))?;
        let stats = self.registry.stats(name).ok_or_else(|| no_device(name))?;
        Ok((dev.name().to_string(), stats))
    }

    fn get_iostat(&self, p: GetIostat) -> Result<Value, RpcError> {
        let mode = reset_mode(p.reset_mode.as_deref(), ResetMode::None)?;
        let names = match (p.names, p.name) {
            (Some(mut n), Some(one)) => {
                n.push(one);
                Some(n)
            }
            (n, None) => n,
            (None, Some(one)) => Some(vec![one]),
        };
        let mut out = Map::new();
        out.insert("tick_rate".into(), json!(stats::TICK_RATE));
        out.insert("ticks".into(), json!(stats::now()));
        if p.per_channel {
            let one = match names.as_deref() {
                Some([one]) => one,
                _ => return Err(RpcError::from_errno(libc::EINVAL)),
            };
            let (name, st) = self.stats_of(one)?;
            let channels: Vec<Value> = st
                .per_stripe()
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let mut m = Map::new();
                    m.insert("thread_id".into(), json!(i + 1));
                    stat_fields(&mut m, s);
                    Value::Object(m)
                })
                .collect();
            st.reset(mode);
            out.insert("name".into(), json!(name));
            out.insert("channels".into(), Value::Array(channels));
            return Ok(Value::Object(out));
        }
        let list: Vec<(String, Arc<IoStats>)> = match names {
            // Every name is checked before anything is reset or printed, as SPDK fails the
            // whole call for one unknown bdev.
            Some(names) => names
                .iter()
                .map(|n| self.stats_of(n))
                .collect::<Result<_, _>>()?,
            None => self
                .registry
                .list_with_stats()
                .into_iter()
                .map(|(d, s)| (d.name().to_string(), s))
                .collect(),
        };
        let bdevs: Vec<Value> = list
            .iter()
            .map(|(name, st)| {
                let mut m = Map::new();
                m.insert("name".into(), json!(name));
                stat_fields(&mut m, &st.get_and_reset(mode));
                Value::Object(m)
            })
            .collect();
        out.insert("bdevs".into(), Value::Array(bdevs));
        Ok(Value::Object(out))
    }

    fn reset_iostat(&self, p: ResetIostat) -> Result<Value, RpcError> {
        let mode = reset_mode(p.mode.as_deref(), ResetMode::All)?;
        if mode == ResetMode::None {
            return Ok(json!(true));
        }
        match p.name {
            Some(n) => self.stats_of(&n)?.1.reset(mode),
            None => {
                for (_, s) in self.registry.list_with_stats() {
                    s.reset(mode);
                }
            }
        }
        Ok(json!(true))
    }

    fn enable_histogram(&self, p: EnableHistogram) -> Result<Value, RpcError> {
        let (_, st) = self.stats_of(&p.name)?;
        let io_kind = match p.opc.as_deref() {
            None => None,
            Some(o) => Some(
                IoKind::from_spdk_name(o)
                    .ok_or_else(|| RpcError::new(INTERNAL_ERROR, "Invalid Io type"))?,
            ),
        };
        if !p.enable {
            st.set_histogram(None)
                .map_err(|_| RpcError::from_errno(libc::EINVAL))?;
            return Ok(json!(true));
        }
        let cfg = HistogramConfig {
            granularity: u32::from(p.granularity.unwrap_or(stats::DEFAULT_GRANULARITY as u8)),
            min_nsec: p.min_nsec.unwrap_or(DEFAULT_MIN_NSEC),
            max_nsec: p.max_nsec.unwrap_or(DEFAULT_MAX_NSEC),
            io_kind,
        };
        st.set_histogram(Some(cfg))
            .map_err(|e| RpcError::new(-libc::EINVAL, format!("Invalid argument: {e}")))?;
        Ok(json!(true))
    }

    fn histogram_of(&self, name: &str) -> Result<Histogram, RpcError> {
        let (_, st) = self.stats_of(name)?;
        // SPDK answers a histogram that is off with the channel's -EFAULT.
        st.histogram()
            .ok_or_else(|| RpcError::new(INTERNAL_ERROR, bdev_core::rpc::strerror(libc::EFAULT)))
    }
}

/// SPDK's `bdev_get_histogram` answer for `h`.
pub fn encode_histogram(h: &Histogram) -> Value {
    json!({
        "histogram": base64::engine::general_purpose::STANDARD.encode(h.to_bytes()),
        "granularity": h.granularity(),
        "min_range": h.min_range(),
        "max_range": h.max_range(),
        "tsc_rate": stats::TICK_RATE,
    })
}

#[async_trait]
impl RpcModule for IostatRpc {
    fn methods(&self) -> Vec<&'static str> {
        vec![
            "bdev_get_iostat",
            "bdev_reset_iostat",
            "bdev_enable_histogram",
            "bdev_get_histogram",
            "bdev_get_histogram_borders",
        ]
    }

    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        match method {
            "bdev_get_iostat" => self.get_iostat(decode(params)?),
            "bdev_reset_iostat" => self.reset_iostat(decode(params)?),
            "bdev_enable_histogram" => self.enable_histogram(decode(params)?),
            "bdev_get_histogram" => {
                let p: GetHistogram = decode(params)?;
                Ok(encode_histogram(&self.histogram_of(&p.name)?))
            }
            "bdev_get_histogram_borders" => {
                let p: GetBorders = decode(params)?;
                if p.borders.len() > MAX_BORDERS {
                    return Err(RpcError::new(
                        -libc::EINVAL,
                        format!("Invalid argument: at most {MAX_BORDERS} borders"),
                    ));
                }
                let h = self.histogram_of(&p.name)?;
                if p.borders.is_empty() {
                    // SPDK falls back to the encoded histogram.
                    return Ok(encode_histogram(&h));
                }
                // Borders are in microseconds; ticks are nanoseconds.
                let ticks: Vec<u64> = p.borders.iter().map(|b| b.saturating_mul(1000)).collect();
                Ok(json!({"borders_count": h.borders_count(&ticks)}))
            }
            _ => Err(RpcError::method_not_found()),
        }
    }
}
