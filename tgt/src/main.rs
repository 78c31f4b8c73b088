//! The `tgt` binary: `tgt [-r SOCKET] [--json CONFIG] [--wait-for-rpc]`.
//!
//! With no arguments at all it runs the embedded default (an aio bdev over
//! `./tgt-data/store.img`, lvol store `lvs0` on it, an NBD server on
//! `./tgt-data/nbd.sock`); with any argument it starts empty like `spdk_tgt`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bdev_core::Registry;
use clap::Parser;
use serde_json::json;
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
    about = "SPDK-compatible RPC target with an NBD export"
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
    /// SPDK's core mask (accepted for script compatibility; the target sizes its own pool).
    #[arg(short = 'm', long = "cpumask")]
    cpumask: Option<String>,
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

fn main() {
    let default_mode = std::env::args_os().len() == 1;
    let args = Args::parse();
    let log = install_logging(&args.logflag);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tgt")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tgt: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(run(args, default_mode, log));
    // Connection tasks still parked on sockets are not waited for.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}

async fn run(args: Args, default_mode: bool, log: Arc<tgt::log::LogControl>) -> i32 {
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
    let (mut wiring, lvol) = modules::wiring_with_lvol(&registry, &nbd);
    let metrics = tgt::metrics::Metrics::new(registry.clone(), Some(lvol), nbd.clone());
    wiring.modules.push(tgt::log::LogRpc::new(log));
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
    let rpc_task = tokio::spawn(server::run_with(target.clone(), listener, limits));

    let mut code = 0;
    if let Some(path) = &args.json {
        if let Err(e) = config::replay_file(&target, path, args.json_ignore_init_errors).await {
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
    rpc_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Some(b) = &bound {
        b.remove();
    }
    target.teardown().await;
    code
}

fn rpc_err(method: &str, e: bdev_core::rpc::RpcError) -> String {
    format!("{method}: {} ({})", e.message, e.code)
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
    let have_store = target
        .call("bdev_get_bdevs", Some(json!({"name": "store0"})))
        .await
        .is_ok();
    if !have_store {
        target
            .call(
                "bdev_aio_create",
                Some(
                    json!({"name": "store0", "filename": store.to_string_lossy(), "block_size": 4096}),
                ),
            )
            .await
            .map_err(|e| rpc_err("bdev_aio_create", e))?;
    }
    if target.has_method("bdev_lvol_get_lvstores") {
        let found = target
            .call("bdev_lvol_get_lvstores", Some(json!({"lvs_name": "lvs0"})))
            .await
            .is_ok();
        if !found {
            target
                .call(
                    "bdev_lvol_create_lvstore",
                    Some(json!({"bdev_name": "store0", "lvs_name": "lvs0"})),
                )
                .await
                .map_err(|e| rpc_err("bdev_lvol_create_lvstore", e))?;
        }
    } else {
        eprintln!("tgt: lvol module not built in; no lvol store on store0");
    }
    let nbd_sock = dir.join("nbd.sock");
    if target.nbd().listen_address().is_none() {
        target
            .call(
                "nbd_server_start",
                Some(json!({"listen": format!("unix:{}", nbd_sock.display())})),
            )
            .await
            .map_err(|e| rpc_err("nbd_server_start", e))?;
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
