//! The `tgt` binary: `tgt [-r SOCKET] [--json CONFIG] [--wait-for-rpc] [-m MASK | --cores N]`.
//!
//! Threads: the control runtime (RPC server, config replay, examine and other background
//! work of the registry, the NBD listener) and one reactor per core (`-m`, `--cores`,
//! `TGT_CORES`, default every core of the affinity mask), each an OS thread pinned to its
//! core running an event loop of its own with its own io_uring (the aio requests of its
//! connections are submitted and reaped by the loop itself); NBD connections are assigned to
//! reactors round-robin and run entirely on theirs. An idle reactor sleeps in `epoll_wait`.
//!
//! With no arguments, or only arguments that add observability (`--metrics`,
//! `--metrics-allow-remote`, `-L`), it runs the embedded default (an aio bdev over
//! `./tgt-data/store.img`, lvol store `lvs0` on it, an NBD server on
//! `./tgt-data/nbd.sock`); with any other argument it starts empty like `spdk_tgt`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bdev_core::Registry;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use serde_json::{json, Value};
use tgt::nbd::server::NbdServer;
use tgt::target::Target;
use tgt::{config, limits, modules, server};

/// SPDK's default RPC socket.
const DEFAULT_SOCKET: &str = "/var/tmp/spdk.sock";
/// Size of the default store file.
const DEFAULT_STORE_SIZE: u64 = 8 << 30;

#[derive(Parser, Debug)]
#[command(
    name = "tgt",
    version,
    about = "SPDK-compatible RPC target with an NBD export",
    after_help = "With no arguments, or only --metrics, --metrics-allow-remote and -L (which \
                  add observability and nothing else), tgt runs its embedded default: aio \
                  bdev store0 over ./tgt-data/store.img, lvol store lvs0 on it, an NBD \
                  server on ./tgt-data/nbd.sock, RPC on /var/tmp/spdk.sock, and what is \
                  configured at run time is saved and comes back at the next start. Any \
                  other argument starts it empty, like spdk_tgt."
)]
struct Args {
    /// RPC listen socket.
    #[arg(short = 'r', long = "rpc-socket")]
    rpc_socket: Option<PathBuf>,
    /// JSON config to replay at start (as written by `spdk-rpc save_config`).
    #[arg(short = 'c', long = "json")]
    json: Option<PathBuf>,
    /// Start in the STARTUP state and wait for `framework_start_init`.
    #[arg(long = "wait-for-rpc")]
    wait_for_rpc: bool,
    /// Go on when a method of the `--json` config fails (SPDK's option of the same name).
    #[arg(long = "json-ignore-init-errors")]
    json_ignore_init_errors: bool,
    /// SPDK's core mask: one reactor per core in it (`0x3`, `3`, or a list `[0,2-3]`).
    /// Default: every core of the process's affinity mask.
    #[arg(short = 'm', long = "cpumask")]
    cpumask: Option<String>,
    /// Run N reactors, on the first N cores of the affinity mask (instead of `-m`). The
    /// environment variable `TGT_CORES` gives the default when neither is set.
    #[arg(long = "cores")]
    cores: Option<usize>,
    /// SPDK's hugepage memory size (accepted, unused: no hugepages here).
    #[arg(short = 's', long = "mem-size")]
    mem_size: Option<String>,
    /// SPDK's shared memory id (accepted, unused).
    #[arg(short = 'i', long = "shm-id")]
    shm_id: Option<String>,
    /// SPDK's log flags (`-L lvol`: that module's targets at DEBUG; see `log_get_flags`).
    #[arg(short = 'L', long = "logflag")]
    logflag: Vec<String>,
    /// MiB all NBD connections together may hold in payloads and unsent replies.
    #[arg(long = "nbd-mem-mib", default_value_t = limits::NBD_TOTAL_MEM >> 20)]
    nbd_mem_mib: usize,
    /// MiB one NBD connection may hold (at least 32: one maximum-size request).
    #[arg(long = "nbd-conn-mem-mib", default_value_t = limits::NBD_CONN_MEM >> 20)]
    nbd_conn_mem_mib: usize,
    /// MiB all RPC connections together may hold in partial requests (beyond 64 KiB each).
    #[arg(long = "rpc-mem-mib", default_value_t = limits::RPC_TOTAL_MEM >> 20)]
    rpc_mem_mib: usize,
    /// Serve Prometheus metrics over HTTP on ADDR:PORT (default 127.0.0.1:9464).
    #[arg(long = "metrics", value_name = "ADDR:PORT", num_args = 0..=1,
          default_missing_value = tgt::metrics::DEFAULT_ADDR)]
    metrics: Option<String>,
    /// Let `--metrics` listen on a non-loopback address (the endpoint has no authentication).
    #[arg(long = "metrics-allow-remote")]
    metrics_allow_remote: bool,
    /// Milliseconds a client may leave its replies unread (NBD), an announced payload unsent
    /// (NBD) or a partial request waiting for memory (RPC) before it is disconnected.
    #[arg(long = "stall-timeout-ms", default_value_t = limits::STALL_TIMEOUT.as_millis() as u64)]
    stall_timeout_ms: u64,
}

/// Arguments that only add observability: with nothing else on the command line the
/// target still runs its embedded default.
const OBSERVABILITY_ARGS: [&str; 3] = ["metrics", "metrics_allow_remote", "logflag"];

/// Whether the command line selects the embedded default: every argument given is one of
/// [`OBSERVABILITY_ARGS`] (none at all included).
fn selects_default(m: &clap::ArgMatches) -> bool {
    // The arguments, not `m.ids()`: that also holds the derive's group of all of them.
    Args::command().get_arguments().all(|a| {
        let id = a.get_id().as_str();
        OBSERVABILITY_ARGS.contains(&id) || m.value_source(id) != Some(ValueSource::CommandLine)
    })
}

impl Args {
    /// The limits from the options; `Err` names the bad one.
    fn limits(&self) -> Result<limits::Limits, String> {
        let max_payload = nbd_proto::MAX_PAYLOAD as usize >> 20;
        if self.nbd_conn_mem_mib < max_payload {
            return Err(format!(
                "--nbd-conn-mem-mib must be at least {max_payload} (one maximum-size request)"
            ));
        }
        if self.nbd_mem_mib < self.nbd_conn_mem_mib {
            return Err("--nbd-mem-mib must be at least --nbd-conn-mem-mib".into());
        }
        if self.rpc_mem_mib < 32 {
            return Err("--rpc-mem-mib must be at least 32 (one maximum-size request)".into());
        }
        if self.stall_timeout_ms == 0 || self.stall_timeout_ms > 3_600_000 {
            return Err("--stall-timeout-ms must be in 1..=3600000".into());
        }
        let mib = |v: usize| v.checked_mul(1 << 20).ok_or("limit too large");
        Ok(limits::Limits {
            nbd_conn_mem: mib(self.nbd_conn_mem_mib)?,
            nbd_total_mem: mib(self.nbd_mem_mib)?,
            rpc_total_mem: mib(self.rpc_mem_mib)?,
            stall_timeout: std::time::Duration::from_millis(self.stall_timeout_ms),
        })
    }
}

/// Installs the stderr subscriber behind a reloadable filter (the `log_*` methods change it).
fn install_logging(logflags: &[String]) -> Arc<tgt::log::LogControl> {
    use tracing_subscriber::prelude::*;
    let env = std::env::var("RUST_LOG").ok();
    // Replaced below by the control's filter (RUST_LOG's level and targets plus -L flags),
    // so that what log_get_print_level reports is what is installed.
    let initial = tracing_subscriber::EnvFilter::new("warn");
    let (layer, handle) = tracing_subscriber::reload::Layer::new(initial);
    tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let ctl = tgt::log::LogControl::new(
        env.as_deref(),
        Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
    );
    // `-L flag` as SPDK's: unknown flags are reported, not fatal.
    for f in logflags {
        if !ctl.set_flag(f, true) {
            eprintln!("tgt: unknown log flag {f}");
        }
    }
    if let Err(e) = ctl.reapply() {
        eprintln!("tgt: log filter: {e}");
    }
    ctl
}

/// The CPUs of this process's affinity mask, in order.
fn affinity_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is valid; sched_getaffinity fills it for this thread.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set`, valid for the call.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return vec![0];
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE and `set` is initialised.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// Parses SPDK's core mask: hex (`0x3`, `3`) or a list (`[0,2-3]`).
fn parse_cpumask(m: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("bad core mask {m:?}");
    let m = m.trim();
    let mut cpus = Vec::new();
    if let Some(list) = m.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let a: usize = a.parse().map_err(|_| bad())?;
            let b: usize = b.parse().map_err(|_| bad())?;
            if a > b || b >= libc::CPU_SETSIZE as usize {
                return Err(bad());
            }
            cpus.extend(a..=b);
        }
    } else {
        let hex = m
            .strip_prefix("0x")
            .or_else(|| m.strip_prefix("0X"))
            .unwrap_or(m);
        if hex.is_empty() || hex.len() > 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        for (i, c) in hex.chars().rev().enumerate() {
            let v = c.to_digit(16).ok_or_else(bad)? as usize;
            for bit in 0..4 {
                if v & (1 << bit) != 0 {
                    cpus.push(i * 4 + bit);
                }
            }
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Err(format!("core mask {m:?} selects no core"));
    }
    Ok(cpus)
}

/// The cores to run reactors on, from `-m`, `--cores`, `TGT_CORES` or the affinity mask.
fn reactor_cores(args: &Args) -> Result<Vec<usize>, String> {
    let allowed = affinity_cpus();
    if let Some(m) = &args.cpumask {
        let cpus = parse_cpumask(m)?;
        if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
            return Err(format!(
                "core {c} of mask {m} is not in this process's affinity mask"
            ));
        }
        return Ok(cpus);
    }
    let n = match args.cores {
        Some(n) => Some(n),
        None => match std::env::var("TGT_CORES") {
            Ok(v) => Some(
                v.trim()
                    .parse()
                    .map_err(|_| format!("bad TGT_CORES {v:?}"))?,
            ),
            Err(_) => None,
        },
    };
    match n {
        None => Ok(allowed),
        Some(0) => Err("--cores must be at least 1".into()),
        Some(n) if n > allowed.len() => Err(format!(
            "--cores {n}: the affinity mask has {} cores",
            allowed.len()
        )),
        Some(n) => Ok(allowed[..n].to_vec()),
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is valid; CPU_SET writes inside it (cpu < CPU_SETSIZE).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the pointer and size describe `set`, valid for the call.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The ring fd as tokio's `AsyncFd` wants it (the ring owns the fd).
struct RingFd(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for RingFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// A reactor's ring task: submits what its connections queued (woken by the ring when a
/// request is queued) and completes what arrived (woken when the ring's fd is readable).
/// Without io_uring it just keeps the loop alive.
async fn serve_ring(ring: Option<bdev_core::reactor::AttachedRing>) {
    use std::task::Poll;
    let Some(mut ring) = ring else {
        return futures::future::pending().await;
    };
    // SAFETY: the fd is the ring of this thread, owned by the thread's reactor state, which
    // lives until the thread ends; this task (and so the registration) never outlives it.
    let fd = match unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            RingFd(ring.fd()),
            tokio::io::Interest::READABLE,
        )
    } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("reactor: cannot poll its ring ({e}); completions via its backstop");
            return futures::future::pending().await;
        }
    };
    futures::future::poll_fn(|cx| {
        ring.register_submit(cx.waker());
        loop {
            ring.pass();
            match fd.poll_read_ready(cx) {
                Poll::Ready(Ok(mut g)) => g.clear_ready(),
                Poll::Ready(Err(e)) => {
                    tracing::warn!("reactor: ring poll failed: {e}");
                    return Poll::Ready(());
                }
                Poll::Pending => {
                    // Adaptive polling (off by default, `BDEV_REACTOR_ATTACHED_POLL`): while
                    // requests are in flight and within the poll window, come back after
                    // the loop's other ready tasks instead of waiting for the fd.
                    if ring.keep_polling() {
                        cx.waker().wake_by_ref();
                    }
                    return Poll::Pending;
                }
            }
        }
    })
    .await;
    futures::future::pending().await
}

/// Starts one reactor per core: an OS thread pinned to the core running a single-threaded
/// event loop until the process exits. Returns the loops' handles.
fn start_reactors(
    cores: &[usize],
    stats: &Arc<tgt::reactor_stats::Reactors>,
) -> Result<Vec<tokio::runtime::Handle>, String> {
    let mut handles = Vec::new();
    for &cpu in cores {
        let (tx, rx) = std::sync::mpsc::channel();
        let stats = stats.clone();
        std::thread::Builder::new()
            .name(format!("reactor_{cpu}"))
            .spawn(move || {
                if let Err(e) = pin_to(cpu) {
                    tracing::warn!("reactor {cpu}: cannot pin to the core: {e}");
                }
                // Busy/idle counters of this reactor (framework_get_reactors): bumped by the
                // loop when it goes to sleep in epoll_wait and when it wakes.
                let ticks = Arc::new(tgt::reactor_stats::LoopTicks::new());
                let (park, unpark) = (ticks.clone(), ticks.clone());
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_park(move || park.park())
                    .on_thread_unpark(move || unpark.unpark())
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                // This thread's own io_uring serves the aio requests its connections issue,
                // submitted and reaped by this loop (no completion thread in between).
                let ring = bdev_core::reactor::attach();
                stats.add_current(cpu, ticks, rt.handle().clone());
                let _ = tx.send(Ok(rt.handle().clone()));
                // Runs the connections spawned onto it; sleeps in epoll_wait when idle.
                rt.block_on(serve_ring(ring));
            })
            .map_err(|e| format!("reactor {cpu}: {e}"))?;
        let h = rx
            .recv()
            .map_err(|_| format!("reactor {cpu} did not start"))??;
        handles.push(h);
    }
    tracing::info!("{} reactor(s) on cores {cores:?}", handles.len());
    Ok(handles)
}

fn main() {
    let matches = Args::command().get_matches();
    let default_mode = selects_default(&matches);
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let log = install_logging(&args.logflag);
    let cores = match reactor_cores(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tgt: {e}");
            std::process::exit(2);
        }
    };
    let reactor_stats = tgt::reactor_stats::Reactors::new();
    let reactors = match start_reactors(&cores, &reactor_stats) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tgt: cannot start the reactors: {e}");
            std::process::exit(1);
        }
    };
    let (park, unpark) = (reactor_stats.clone(), reactor_stats.clone());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tgt")
        .on_thread_park(move || park.control_park())
        .on_thread_unpark(move || unpark.control_unpark())
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tgt: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    reactor_stats.set_control_handle(rt.handle().clone());
    let code = rt.block_on(run(args, default_mode, log, reactors, reactor_stats));
    // Connection tasks still parked on sockets are not waited for.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}

async fn run(
    args: Args,
    default_mode: bool,
    log: Arc<tgt::log::LogControl>,
    reactors: Vec<tokio::runtime::Handle>,
    reactor_stats: Arc<tgt::reactor_stats::Reactors>,
) -> i32 {
    let limits = match args.limits() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tgt: {e}");
            return 2;
        }
    };
    let registry = Registry::new();
    let handle = tokio::runtime::Handle::current();
    registry.set_spawner(Arc::new(move |f| {
        handle.spawn(f);
    }));
    let nbd = NbdServer::with_limits(registry.clone(), limits);
    nbd.set_reactors(reactors);
    let (mut wiring, lvol) = modules::wiring_with_lvol(&registry, &nbd);
    let metrics = tgt::metrics::Metrics::new(registry.clone(), Some(lvol), nbd.clone());
    wiring.modules.push(tgt::log::LogRpc::new(log));
    wiring
        .modules
        .push(tgt::reactor_stats::ReactorRpc::new(reactor_stats));
    let start_in_startup = args.wait_for_rpc || args.json.is_some();
    let target = Target::new(registry, nbd, wiring, start_in_startup);

    let socket = args
        .rpc_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let (listener, bound) = match server::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tgt: cannot listen on {}: {e}", socket.display());
            return 1;
        }
    };
    let metrics_task = match &args.metrics {
        None => None,
        Some(addr) => match tgt::metrics::bind(addr, args.metrics_allow_remote).await {
            Ok(l) => {
                if let Ok(a) = l.local_addr() {
                    println!("tgt: metrics on http://{a}/metrics");
                }
                Some(tokio::spawn(metrics.serve(l)))
            }
            Err(e) => {
                eprintln!("tgt: {e}");
                if let Some(b) = &bound {
                    b.remove();
                }
                return 1;
            }
        },
    };
    let mut shutdown = target.shutdown_watch();
    // In the embedded default the socket is bound (claimed) now but served only once the
    // default setup is done, so the first client sees the store, its lvols and exports (as
    // SPDK answers only after its subsystems are up). `--json` mode serves at once, in the
    // startup state, as SPDK does with a config.
    let mut pending_listener = Some((listener, limits));
    let mut rpc_task = None;
    if !default_mode {
        let (l, lim) = pending_listener.take().expect("listener");
        rpc_task = Some(tokio::spawn(server::run_with(target.clone(), l, lim)));
    }

    let mut code = 0;
    if let Some(path) = &args.json {
        if let Err(e) =
            config::replay_file(target.as_ref(), path, args.json_ignore_init_errors).await
        {
            eprintln!("tgt: config {}: {e}", path.display());
            code = 1;
            target.request_shutdown();
        }
        if !args.wait_for_rpc {
            target.mark_initialized();
        }
    } else if default_mode {
        match embedded_default(&target, &socket).await {
            Ok(()) => {}
            Err(e) => {
                eprintln!("tgt: default setup failed: {e}");
                code = 1;
                target.request_shutdown();
            }
        }
    }
    if let Some((l, lim)) = pending_listener.take() {
        rpc_task = Some(tokio::spawn(server::run_with(target.clone(), l, lim)));
    }

    let sig = async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return futures::future::pending::<()>().await;
        };
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
    };
    tokio::select! {
        _ = sig => {},
        _ = async { while !*shutdown.borrow_and_update() { if shutdown.changed().await.is_err() { break; } } } => {},
    }
    tracing::info!("shutting down");
    if let Some(t) = rpc_task {
        t.abort();
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Some(b) = &bound {
        b.remove();
    }
    target.teardown().await;
    code
}

/// Calls `method`; a failure is the error text `method: message (code)`.
async fn call(target: &Arc<Target>, method: &str, params: Value) -> Result<Value, String> {
    target
        .call(method, Some(params))
        .await
        .map_err(|e| format!("{method}: {} ({})", e.message, e.code))
}

/// Calls `create` (method, params) unless the lookup `find` succeeds: what a replayed
/// configuration brought back already is kept.
async fn create_unless_found(
    target: &Arc<Target>,
    (find, find_params): (&str, Value),
    (create, create_params): (&str, Value),
) -> Result<(), String> {
    if target.call(find, Some(find_params)).await.is_err() {
        call(target, create, create_params).await?;
    }
    Ok(())
}

async fn embedded_default(target: &Arc<Target>, socket: &Path) -> Result<(), String> {
    let dir = std::env::current_dir()
        .map_err(|e| e.to_string())?
        .join("tgt-data");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let store = dir.join("store.img");
    if !store.exists() {
        let f = std::fs::File::create(&store).map_err(|e| format!("{}: {e}", store.display()))?;
        f.set_len(DEFAULT_STORE_SIZE)
            .map_err(|e| format!("{}: {e}", store.display()))?;
    }
    // What was configured at run time before (saved after each change) comes back first.
    let persist = tgt::persist::Persist::new(&dir);
    if persist.replay(target).await? {
        println!("tgt: replayed {}", persist.path().display());
    }
    let aio = json!({"name": "store0", "filename": store.to_string_lossy(), "block_size": 4096});
    create_unless_found(
        target,
        ("bdev_get_bdevs", json!({"name": "store0"})),
        ("bdev_aio_create", aio),
    )
    .await?;
    if target.has_method("bdev_lvol_get_lvstores") {
        let lvs0 = json!({"bdev_name": "store0", "lvs_name": "lvs0"});
        create_unless_found(
            target,
            ("bdev_lvol_get_lvstores", json!({"lvs_name": "lvs0"})),
            ("bdev_lvol_create_lvstore", lvs0),
        )
        .await?;
    } else {
        eprintln!("tgt: lvol module not built in; no lvol store on store0");
    }
    let nbd_sock = dir.join("nbd.sock");
    if target.nbd().listen_address().is_none() {
        let listen = json!({"listen": format!("unix:{}", nbd_sock.display())});
        call(target, "nbd_server_start", listen).await?;
    }
    persist.save(target).await?;
    persist.install(target);
    println!("tgt: RPC socket {}", socket.display());
    println!("tgt: NBD socket {}", nbd_sock.display());
    println!(
        "tgt: try: spdk-rpc -s {} bdev_lvol_create -l lvs0 -t vol0 1024 && PYTHONPATH=python spdk-rpc -s {} --plugin spdk_rs_plugin nbd_export_add lvs0/vol0 -n vol0",
        socket.display(),
        socket.display()
    );
    println!(
        "tgt: then: qemu-io -f raw 'nbd+unix:///vol0?socket={}' -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'",
        nbd_sock.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_observability_arguments_keep_the_embedded_default() {
        let default = |argv: &[&str]| {
            let m = Args::command().try_get_matches_from(argv).unwrap();
            selects_default(&m)
        };
        assert!(default(&["tgt"]));
        assert!(default(&["tgt", "--metrics"]));
        assert!(default(&["tgt", "--metrics", "127.0.0.1:9999"]));
        assert!(default(&[
            "tgt",
            "--metrics=[::1]:9",
            "--metrics-allow-remote"
        ]));
        assert!(default(&["tgt", "-L", "lvol", "--logflag", "nbd"]));
        for other in [
            &["tgt", "-r", "/tmp/x.sock"][..],
            &["tgt", "--metrics", "--wait-for-rpc"],
            &["tgt", "--cores", "1"],
            &["tgt", "-m", "0x1"],
            &["tgt", "--json", "c.json"],
            &["tgt", "-s", "1024"],
            &["tgt", "--nbd-mem-mib", "512"],
            &["tgt", "--stall-timeout-ms", "30000", "--metrics"],
        ] {
            assert!(!default(other), "{other:?}");
        }
    }

    #[test]
    fn core_masks_parse_as_spdk_writes_them() {
        assert_eq!(parse_cpumask("0x3").unwrap(), [0, 1]);
        assert_eq!(parse_cpumask("3").unwrap(), [0, 1]);
        assert_eq!(parse_cpumask("0x10").unwrap(), [4]);
        assert_eq!(parse_cpumask("[0,2-3]").unwrap(), [0, 2, 3]);
        assert_eq!(parse_cpumask("[1]").unwrap(), [1]);
        for bad in ["", "0x", "0x0", "zz", "[3-1]", "[a]", "[]"] {
            assert!(parse_cpumask(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cores_come_from_the_affinity_mask() {
        let allowed = affinity_cpus();
        let args = Args::parse_from(["tgt", "--cores", "1"]);
        assert_eq!(reactor_cores(&args).unwrap(), allowed[..1]);
        let args = Args::parse_from(["tgt", "--cores", "0"]);
        assert!(reactor_cores(&args).is_err());
        let too_many = (allowed.len() + 1).to_string();
        let args = Args::parse_from(["tgt", "--cores", too_many.as_str()]);
        assert!(reactor_cores(&args).is_err());
        let mask = format!("[{}]", allowed[0]);
        let args = Args::parse_from(["tgt", "-m", mask.as_str()]);
        assert_eq!(reactor_cores(&args).unwrap(), [allowed[0]]);
    }

    #[test]
    fn a_reactor_runs_on_its_core() {
        let cpu = affinity_cpus()[0];
        let h = start_reactors(&[cpu], &tgt::reactor_stats::Reactors::new()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        h[0].spawn(async move {
            // SAFETY: sched_getcpu takes no arguments.
            let _ = tx.send(unsafe { libc::sched_getcpu() });
        });
        let ran_on = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(ran_on as usize, cpu);
    }
}
