//! Per-reactor and per-thread statistics: SPDK's `framework_get_reactors` and
//! `thread_get_stats` (`lib/event/app_rpc.c`), with its keys and `tick_rate`.
//!
//! Each event loop (a reactor, or a worker of the control runtime) owns a [`LoopTicks`]: the
//! loop calls [`LoopTicks::park`] before it sleeps (`epoll_wait`) and [`LoopTicks::unpark`]
//! when it wakes (tokio's `on_thread_park` / `on_thread_unpark` hooks), so `busy` is the time
//! spent running tasks and polling, `idle` the time asleep, as SPDK's `busy_tsc` /
//! `idle_tsc`. Only the owning thread writes its counters (plain stores under a sequence
//! number, no lock, no read-modify-write, no allocation); a reader adds the time since the
//! last switch to the current state. Ticks are those of `bdev_get_iostat`
//! ([`bdev_core::stats::now`], [`bdev_core::stats::TICK_RATE`] per second).
//!
//! The threads reported: `app_thread` (id 1), the control runtime (RPC server, config replay,
//! background work; not pinned, its busy and idle are the sums over its worker threads, so
//! no reactor lists it), then one thread per reactor, `reactor_<lcore>`, which is the only
//! thread of that reactor. `active_pollers_count` is the number of tasks spawned on the loop
//! that are alive (a reactor's NBD connections; the control runtime's RPC connections and
//! background work); there are no timed or paused pollers.
//! Reactors always sleep in the kernel when idle, so `in_interrupt` is true (SPDK's
//! interrupt mode).

use std::cell::RefCell;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use bdev_core::rpc::{RpcError, RpcModule, INVALID_PARAMS};
use bdev_core::stats::{now, TICK_RATE};
use serde_json::{json, Value};

/// Busy and idle ticks of one event-loop thread. Written by that thread only.
#[repr(align(128))]
#[derive(Debug)]
pub struct LoopTicks {
    /// Odd while the owner updates the fields below (a sequence lock for readers).
    seq: AtomicU64,
    busy: AtomicU64,
    idle: AtomicU64,
    /// Tick of the last switch between busy and idle.
    since: AtomicU64,
    parked: AtomicBool,
}

impl Default for LoopTicks {
    fn default() -> Self {
        Self::new()
    }
}

impl LoopTicks {
    /// Zeroed counters; the loop counts as busy from now.
    pub fn new() -> Self {
        LoopTicks {
            seq: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            idle: AtomicU64::new(0),
            since: AtomicU64::new(now()),
            parked: AtomicBool::new(false),
        }
    }

    /// Ends the current period and starts a busy (`parked == false`) or idle one. Only the
    /// owning thread calls it.
    #[inline]
    fn switch(&self, parked: bool) {
        let t = now();
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        let d = t.saturating_sub(self.since.load(Ordering::Relaxed));
        let into = if self.parked.load(Ordering::Relaxed) {
            &self.idle
        } else {
            &self.busy
        };
        into.store(
            into.load(Ordering::Relaxed).wrapping_add(d),
            Ordering::Relaxed,
        );
        self.since.store(t, Ordering::Relaxed);
        self.parked.store(parked, Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// The loop is about to sleep (its `on_thread_park` hook).
    #[inline]
    pub fn park(&self) {
        self.switch(true);
    }

    /// The loop woke up (its `on_thread_unpark` hook).
    #[inline]
    pub fn unpark(&self) {
        self.switch(false);
    }

    /// `(busy, idle)` up to tick `at`, the current period included.
    pub fn read(&self, at: u64) -> (u64, u64) {
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let (mut busy, mut idle) = (
                self.busy.load(Ordering::Relaxed),
                self.idle.load(Ordering::Relaxed),
            );
            let since = self.since.load(Ordering::Relaxed);
            let parked = self.parked.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) != s1 {
                continue;
            }
            let d = at.saturating_sub(since);
            if parked {
                idle = idle.wrapping_add(d);
            } else {
                busy = busy.wrapping_add(d);
            }
            return (busy, idle);
        }
    }
}

/// `/proc/stat` times of one CPU, in `USER_HZ` ticks, as SPDK's `parse_proc_stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CpuTimes {
    usr: u64,
    sys: u64,
    /// irq + softirq.
    irq: u64,
}

fn cpu_times(cpu: usize) -> Option<CpuTimes> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_times(&text, cpu)
}

fn parse_cpu_times(text: &str, cpu: usize) -> Option<CpuTimes> {
    let want = format!("cpu{cpu}");
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(want.as_str()))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq ...
    Some(CpuTimes {
        usr: *f.first()?,
        sys: *f.get(2)?,
        irq: f.get(5)?.wrapping_add(*f.get(6)?),
    })
}

/// The NUMA node of `cpu` from sysfs; -1 (SPDK's `SPDK_ENV_NUMA_ID_ANY`) when unknown.
fn numa_id(cpu: usize) -> i64 {
    let Ok(dir) = std::fs::read_dir(format!("/sys/devices/system/cpu/cpu{cpu}")) else {
        return -1;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("node"))
                .and_then(|n| n.parse().ok())
        })
        .next()
        .unwrap_or(-1)
}

/// SPDK's `spdk_cpuset_fmt`: the mask in hex, most significant digit first, no `0x`.
pub fn cpumask_hex(cpus: &[usize]) -> String {
    let Some(&max) = cpus.iter().max() else {
        return "0".into();
    };
    let mut nibbles = vec![0u8; max / 4 + 1];
    for &c in cpus {
        nibbles[c / 4] |= 1 << (c % 4);
    }
    let hex = b"0123456789abcdef";
    // The top nibble holds the highest CPU, so there is no leading zero, as in SPDK.
    nibbles
        .iter()
        .rev()
        .map(|&n| hex[n as usize] as char)
        .collect()
}

/// One reactor as the RPCs report it.
struct Reactor {
    lcore: usize,
    tid: i64,
    /// Tick at which the reactor started.
    started: u64,
    ticks: Arc<LoopTicks>,
    handle: tokio::runtime::Handle,
    /// `/proc/stat` of its core at start (SPDK reports the times since).
    cpu0: Option<CpuTimes>,
}

thread_local! {
    /// The counters of this control-runtime worker, made at its first park.
    static CONTROL_TICKS: RefCell<Option<Arc<LoopTicks>>> = const { RefCell::new(None) };
}

/// The reactors and the control runtime's workers of a process.
pub struct Reactors {
    reactors: Mutex<Vec<Reactor>>,
    control: Mutex<Vec<Arc<LoopTicks>>>,
    control_handle: OnceLock<tokio::runtime::Handle>,
}

impl Default for Reactors {
    fn default() -> Self {
        Reactors {
            reactors: Mutex::new(Vec::new()),
            control: Mutex::new(Vec::new()),
            control_handle: OnceLock::new(),
        }
    }
}

impl Reactors {
    /// An empty set.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds the reactor running on the calling thread, on core `lcore`, counting into `ticks`
    /// (which its loop's park hooks bump), its tasks on `handle`.
    pub fn add_current(&self, lcore: usize, ticks: Arc<LoopTicks>, handle: tokio::runtime::Handle) {
        // SAFETY: gettid takes no arguments and cannot fail.
        let tid = i64::from(unsafe { libc::gettid() });
        let r = Reactor {
            lcore,
            tid,
            started: now(),
            ticks,
            handle,
            cpu0: cpu_times(lcore),
        };
        let mut v = self.reactors.lock().unwrap_or_else(|e| e.into_inner());
        v.push(r);
        v.sort_by_key(|r| r.lcore);
    }

    /// The control runtime (its tasks, for `active_pollers_count`).
    pub fn set_control_handle(&self, handle: tokio::runtime::Handle) {
        let _ = self.control_handle.set(handle);
    }

    fn control_ticks(&self) -> Arc<LoopTicks> {
        CONTROL_TICKS.with(|c| {
            c.borrow_mut()
                .get_or_insert_with(|| {
                    // Once per worker thread (its first park), not per request.
                    let t = Arc::new(LoopTicks::new());
                    self.control
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(t.clone());
                    t
                })
                .clone()
        })
    }

    /// The `on_thread_park` hook of the control runtime's workers.
    pub fn control_park(&self) {
        self.with_control_ticks(|t| t.park());
    }

    /// The `on_thread_unpark` hook of the control runtime's workers.
    pub fn control_unpark(&self) {
        self.with_control_ticks(|t| t.unpark());
    }

    /// Runs `f` on this control worker's counters (registered on first use).
    fn with_control_ticks(&self, f: impl FnOnce(&LoopTicks)) {
        CONTROL_TICKS.with(|c| {
            if let Some(t) = c.borrow().as_ref() {
                f(t);
                return;
            }
            f(&self.control_ticks());
        });
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.reactors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether no reactor was added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn control_busy_idle(&self, at: u64) -> (u64, u64) {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|t| t.read(at))
            .fold((0, 0), |(b, i), (b2, i2)| {
                (b.wrapping_add(b2), i.wrapping_add(i2))
            })
    }

    /// `framework_get_reactors`'s result.
    pub fn reactors_json(&self) -> Value {
        let at = now();
        let v = self.reactors.lock().unwrap_or_else(|e| e.into_inner());
        let reactors: Vec<Value> = v
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (busy, idle) = r.ticks.read(at);
                let cpu = match (r.cpu0, cpu_times(r.lcore)) {
                    (Some(a), Some(b)) => CpuTimes {
                        usr: b.usr.saturating_sub(a.usr),
                        sys: b.sys.saturating_sub(a.sys),
                        irq: b.irq.saturating_sub(a.irq),
                    },
                    _ => CpuTimes::default(),
                };
                json!({
                    "lcore": r.lcore,
                    "numa_id": numa_id(r.lcore),
                    "tid": r.tid,
                    "busy": busy,
                    "idle": idle,
                    "in_interrupt": true,
                    "irq": cpu.irq,
                    "sys": cpu.sys,
                    "usr": cpu.usr,
                    "lw_threads": [{
                        "name": format!("reactor_{}", r.lcore),
                        "id": i + 2,
                        "cpumask": cpumask_hex(&[r.lcore]),
                        "elapsed": at.saturating_sub(r.started),
                    }],
                })
            })
            .collect();
        json!({
            "tick_rate": TICK_RATE,
            "pid": std::process::id(),
            "reactors": reactors,
        })
    }

    /// `thread_get_stats`'s result.
    pub fn threads_json(&self) -> Value {
        let at = now();
        let mut threads = Vec::new();
        let (busy, idle) = self.control_busy_idle(at);
        let all = affinity_cpus();
        threads.push(json!({
            "name": "app_thread",
            "id": 1,
            "cpumask": cpumask_hex(&all),
            "busy": busy,
            "idle": idle,
            "active_pollers_count": self
                .control_handle
                .get()
                .map_or(0, |h| h.metrics().num_alive_tasks()),
            "timed_pollers_count": 0,
            "paused_pollers_count": 0,
        }));
        let v = self.reactors.lock().unwrap_or_else(|e| e.into_inner());
        for (i, r) in v.iter().enumerate() {
            let (busy, idle) = r.ticks.read(at);
            threads.push(json!({
                "name": format!("reactor_{}", r.lcore),
                "id": i + 2,
                "cpumask": cpumask_hex(&[r.lcore]),
                "busy": busy,
                "idle": idle,
                "active_pollers_count": r.handle.metrics().num_alive_tasks(),
                "timed_pollers_count": 0,
                "paused_pollers_count": 0,
            }));
        }
        json!({"tick_rate": TICK_RATE, "threads": threads})
    }
}

/// The CPUs of this process's affinity mask.
fn affinity_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is valid; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set`, valid for the call.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE and `set` is initialised.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// The methods `framework_get_reactors` and `thread_get_stats`.
pub struct ReactorRpc {
    reactors: Arc<Reactors>,
}

impl ReactorRpc {
    /// The module over `reactors`.
    pub fn new(reactors: Arc<Reactors>) -> Arc<Self> {
        Arc::new(ReactorRpc { reactors })
    }
}

/// SPDK answers any params with invalid params; the empty object is what clients send for
/// none.
fn no_params(params: &Option<Value>, method: &str) -> Result<(), RpcError> {
    match params {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(o)) if o.is_empty() => Ok(()),
        Some(_) => Err(RpcError::new(
            INVALID_PARAMS,
            format!("`{method}` requires no arguments"),
        )),
    }
}

#[async_trait]
impl RpcModule for ReactorRpc {
    fn methods(&self) -> Vec<&'static str> {
        vec!["framework_get_reactors", "thread_get_stats"]
    }

    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        no_params(&params, method)?;
        match method {
            "framework_get_reactors" => Ok(self.reactors.reactors_json()),
            "thread_get_stats" => Ok(self.reactors.threads_json()),
            _ => Err(RpcError::method_not_found()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_and_idle_follow_park_and_unpark() {
        let t = LoopTicks::new();
        std::thread::sleep(std::time::Duration::from_millis(20));
        t.park();
        let (b0, i0) = t.read(now());
        assert!(b0 >= 20_000_000, "busy {b0}");
        std::thread::sleep(std::time::Duration::from_millis(30));
        let (b1, i1) = t.read(now());
        assert_eq!(b1, b0, "no busy time while parked");
        assert!(i1 >= i0 + 30_000_000, "idle {i0} -> {i1}");
        t.unpark();
        let (b2, i2) = t.read(now());
        assert!(b2 >= b1 && i2 >= i1);
    }

    #[test]
    fn reads_from_another_thread_never_go_backwards() {
        let t = Arc::new(LoopTicks::new());
        let stop = Arc::new(AtomicBool::new(false));
        let w = {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    t.park();
                    t.unpark();
                }
            })
        };
        let mut last = 0;
        for _ in 0..20_000 {
            let (b, i) = t.read(now());
            assert!(b + i >= last, "{b} + {i} < {last}");
            last = b + i;
        }
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap();
    }

    #[test]
    fn proc_stat_lines_parse_as_spdk_reads_them() {
        let text = "cpu  10 0 20 300 0 1 2 0 0 0\ncpu0 5 1 7 100 3 4 6 0 0 0\ncpu1 9 0 9 9 9 9 9\n";
        assert_eq!(
            parse_cpu_times(text, 0),
            Some(CpuTimes {
                usr: 5,
                sys: 7,
                irq: 10
            })
        );
        assert_eq!(parse_cpu_times(text, 1).unwrap().irq, 18);
        assert_eq!(parse_cpu_times(text, 2), None);
    }

    #[test]
    fn cpumasks_print_as_spdk_cpuset_fmt() {
        assert_eq!(cpumask_hex(&[0]), "1");
        assert_eq!(cpumask_hex(&[1]), "2");
        assert_eq!(cpumask_hex(&[0, 1]), "3");
        assert_eq!(cpumask_hex(&[4]), "10");
        assert_eq!(cpumask_hex(&[8]), "100");
        assert_eq!(cpumask_hex(&[0, 9]), "201");
    }
}
