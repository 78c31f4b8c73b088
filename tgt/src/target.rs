//! The target: the device registry, the method table, the framework state (STARTUP /
//! RUNTIME as SPDK's `spdk_rpc_set_state`) and shutdown.
//!
//! Every method is one row of one table (name, allowed states, handler): the framework's
//! rows (`framework::METHODS`) first, then each wired module's
//! ([`crate::modules::wiring`]). Listing, state checks and dispatch all read that table.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bdev_core::config::ConfigTarget;
use bdev_core::rpc::{RpcError, RpcModule, INTERNAL_ERROR};
use bdev_core::Registry;
use futures::FutureExt;
use serde_json::Value;
use tokio::sync::{watch, Notify};

use crate::framework::{self, Host, States};
use crate::modules::{ConfigWriter, ShutdownHook, Wiring};
use crate::nbd::server::NbdServer;

/// SPDK's `SPDK_JSONRPC_ERROR_INVALID_STATE`.
pub const INVALID_STATE: i32 = -1;

/// Upper bounds of the timeout and retry parameters of methods served by crates that do not
/// bound them themselves: (method, parameter, largest accepted value). A bigger value is
/// `-22` before the method runs (see `docs/rpc.md`).
pub const PARAM_BOUNDS: &[(&str, &str, u64)] = &[
    ("bdev_nbd_client_create", "io_timeout_ms", 3_600_000),
    ("bdev_nbd_client_create", "reconnect_delay_ms", 3_600_000),
    ("bdev_nbd_client_create", "reconnect_attempts", 1000),
];

/// Checks `params` against [`PARAM_BOUNDS`].
fn check_bounds(method: &str, params: &Option<Value>) -> Result<(), RpcError> {
    for &(m, key, max) in PARAM_BOUNDS {
        if m != method {
            continue;
        }
        let v = params.as_ref().and_then(|p| p.get(key));
        let over = match v {
            Some(Value::Number(n)) => {
                n.as_u64().is_none_or(|x| x > max) && n.as_i64().is_none_or(|x| x >= 0)
            }
            _ => false,
        };
        if over {
            return Err(RpcError::new(
                -libc::EINVAL,
                format!("Invalid argument: {key} must be at most {max}"),
            ));
        }
    }
    Ok(())
}

/// Who answers a method.
enum Handler {
    /// The target itself.
    Framework(framework::Handler),
    /// The module at this index of `Target::modules`.
    Module(usize),
}

/// One row of the method table.
struct Method {
    name: &'static str,
    states: States,
    handler: Handler,
}

/// The running target. Shared as `Arc<Target>` by every connection.
pub struct Target {
    registry: Registry,
    modules: Vec<Arc<dyn RpcModule>>,
    config_writers: Vec<ConfigWriter>,
    shutdown_hooks: Vec<ShutdownHook>,
    /// The method table, in `rpc_get_methods` order.
    methods: Vec<Method>,
    /// Method name to its row.
    index: HashMap<&'static str, usize>,
    nbd: Arc<NbdServer>,
    initialized: AtomicBool,
    init_done: Notify,
    shutdown_tx: watch::Sender<bool>,
    kill_signal: Mutex<Option<i32>>,
    /// Run after a client's method succeeded (the persisted config, `crate::persist`).
    on_success: std::sync::OnceLock<SuccessHook>,
}

/// A hook run with the method name after a client's method succeeded.
pub type SuccessHook = Arc<dyn Fn(String) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// The table: the framework's rows, then each module's methods in wiring order. A module
/// method named like an existing row is ignored (the first wins).
fn method_table(modules: &[Arc<dyn RpcModule>]) -> Vec<Method> {
    let mut methods: Vec<Method> = framework::METHODS
        .iter()
        .map(|m| Method {
            name: m.name,
            states: m.states,
            handler: Handler::Framework(m.handler),
        })
        .collect();
    for (i, m) in modules.iter().enumerate() {
        let startup = m.startup_methods();
        for name in m.methods() {
            if methods.iter().any(|row| row.name == name) {
                tracing::warn!("method {name} is served twice; the second is ignored");
                continue;
            }
            let states = if startup.contains(&name) {
                States::ALWAYS
            } else {
                States::RUNTIME
            };
            methods.push(Method {
                name,
                states,
                handler: Handler::Module(i),
            });
        }
    }
    methods
}

impl Target {
    /// A target over `registry` serving the wired modules (plus the framework methods). It
    /// starts in the STARTUP state when `wait_for_rpc` is set, else it is initialised at once.
    pub fn new(
        registry: Registry,
        nbd: Arc<NbdServer>,
        wiring: Wiring,
        wait_for_rpc: bool,
    ) -> Arc<Self> {
        let Wiring {
            modules,
            config_writers,
            shutdown_hooks,
        } = wiring;
        let methods = method_table(&modules);
        let index = methods
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name, i))
            .collect();
        let (shutdown_tx, _) = watch::channel(false);
        Arc::new(Target {
            registry,
            modules,
            config_writers,
            shutdown_hooks,
            methods,
            index,
            nbd,
            initialized: AtomicBool::new(!wait_for_rpc),
            init_done: Notify::new(),
            shutdown_tx,
            kill_signal: Mutex::new(None),
            on_success: std::sync::OnceLock::new(),
        })
    }

    /// The device registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The NBD server.
    pub fn nbd(&self) -> &Arc<NbdServer> {
        &self.nbd
    }

    /// The `bdev` subsystem config (`framework_get_config {"name": "bdev"}`).
    pub fn bdev_config(&self) -> Vec<Value> {
        let extra: Vec<Value> = self.config_writers.iter().flat_map(|w| w()).collect();
        crate::config::bdev_config(&self.registry.list(), extra)
    }

    /// Every method served, in table order (framework methods first).
    pub fn method_names(&self) -> Vec<&'static str> {
        self.methods.iter().map(|m| m.name).collect()
    }

    /// Whether a method exists.
    pub fn has_method(&self, method: &str) -> bool {
        self.index.contains_key(method)
    }

    /// Whether a method may run in the current state.
    pub fn allowed_now(&self, method: &str) -> bool {
        let Some(&i) = self.index.get(method) else {
            return false;
        };
        let s = self.methods[i].states;
        if self.is_initialized() {
            s.runtime
        } else {
            s.startup
        }
    }

    /// Whether `framework_start_init` has run (RUNTIME state).
    pub fn is_initialized(&self) -> bool {
        self.initialized.load(Ordering::SeqCst)
    }

    /// Moves to the RUNTIME state (idempotent).
    pub fn mark_initialized(&self) {
        self.initialized.store(true, Ordering::SeqCst);
        self.init_done.notify_waiters();
    }

    /// Waits until the RUNTIME state.
    pub async fn wait_initialized(&self) {
        loop {
            let n = self.init_done.notified();
            if self.is_initialized() {
                return;
            }
            n.await;
        }
    }

    /// Installs the hook run after each client method that succeeded (once).
    pub fn set_on_success(&self, hook: SuccessHook) {
        let _ = self.on_success.set(hook);
    }

    /// Runs the success hook, if one is installed (the RPC server calls it before answering).
    pub async fn client_call_succeeded(&self, method: &str) {
        if let Some(h) = self.on_success.get() {
            h(method.to_string()).await;
        }
    }

    /// Runs one method: state check, then the row's handler.
    pub async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let Some(&i) = self.index.get(method) else {
            return Err(RpcError::method_not_found());
        };
        if !self.allowed_now(method) {
            let msg = if self.is_initialized() {
                "Method may only be called before framework is initialized. Use --wait-for-rpc command line parameter and then issue this RPC before the framework_start_init RPC."
            } else {
                "Method may only be called after framework is initialized using framework_start_init RPC."
            };
            return Err(RpcError::new(INVALID_STATE, msg));
        }
        let module = match self.methods[i].handler {
            Handler::Framework(f) => return f(self, params).await,
            Handler::Module(m) => &self.modules[m],
        };
        // SPDK's handlers decode params with spdk_json_decode_object: an array never fits.
        if matches!(params, Some(Value::Array(_))) {
            return Err(RpcError::decode_failed());
        }
        check_bounds(method, &params)?;
        // A bug in one module must not take the target down: a panicking handler becomes an
        // internal error for that request.
        let fut = module.call(method, params);
        match AssertUnwindSafe(fut).catch_unwind().await {
            Ok(r) => r,
            Err(_) => {
                tracing::error!("method {method} panicked");
                Err(RpcError::new(INTERNAL_ERROR, "Internal error"))
            }
        }
    }

    /// [`Target::call`] of a listing asked for its whole list (no params), for a module that
    /// writes it as JSON text into `out` ([`RpcModule::write_listing`], `crate::listing`);
    /// `None` when the method or the request is not one the module writes that way.
    pub fn call_raw(
        self: &Arc<Self>,
        method: &str,
        params: &Option<Value>,
        out: &mut Vec<u8>,
    ) -> Option<Result<(), RpcError>> {
        let &i = self.index.get(method)?;
        let Handler::Module(m) = self.methods[i].handler else {
            return None;
        };
        // A filter (or any other params) goes the Value way.
        if !self.allowed_now(method) || !bdev_core::rpc::no_params(params) {
            return None;
        }
        let module = &self.modules[m];
        match std::panic::catch_unwind(AssertUnwindSafe(|| module.write_listing(method, out))) {
            Ok(true) => Some(Ok(())),
            Ok(false) => None,
            Err(_) => {
                tracing::error!("method {method} panicked");
                Some(Err(RpcError::new(INTERNAL_ERROR, "Internal error")))
            }
        }
    }

    /// Asks the target to stop (SIGINT/SIGTERM, `spdk_kill_instance`).
    pub fn request_shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
    }

    /// Remembers a `spdk_kill_instance` signal; the connection that received it acts on it
    /// after its answer was sent.
    pub fn set_kill(&self, sig: i32) {
        if let Ok(mut k) = self.kill_signal.lock() {
            *k = Some(sig);
        }
    }

    /// Takes a pending kill request.
    pub fn take_kill(&self) -> Option<i32> {
        self.kill_signal.lock().ok().and_then(|mut k| k.take())
    }

    /// Acts on a pending kill: SIGKILL ends the process at once (no clean unload, like
    /// SPDK), any other signal starts the clean shutdown.
    pub fn act_on_kill(&self) {
        if let Some(sig) = self.take_kill() {
            if sig == libc::SIGKILL {
                // SAFETY: kill(2) on our own pid with a valid signal number has no memory effects.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
            self.request_shutdown();
        }
    }

    /// A receiver that turns true when shutdown was requested.
    pub fn shutdown_watch(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    /// Stops the NBD server, then unregisters every device (the newest first, so stacked
    /// devices go before their bases), so that stores unload cleanly.
    pub async fn teardown(&self) {
        self.nbd.stop_all().await;
        loop {
            // Names only: holding the devices would keep stacked devices' base descriptors
            // open and their bases could never go.
            let names: Vec<String> = self
                .registry
                .list()
                .iter()
                .map(|d| d.name().to_string())
                .collect();
            if names.is_empty() {
                break;
            }
            let mut progress = false;
            for name in names.iter().rev() {
                if self.registry.get(name).is_none() {
                    continue;
                }
                match self.registry.unregister(name).await {
                    Ok(()) => progress = true,
                    Err(e) => tracing::warn!("unregister {name} at shutdown: {e}"),
                }
            }
            if !progress {
                break;
            }
        }
        for hook in &self.shutdown_hooks {
            hook().await;
        }
    }
}

#[async_trait]
impl Host for Target {
    fn method_names(&self) -> Vec<&'static str> {
        Target::method_names(self)
    }
    fn allowed_now(&self, method: &str) -> bool {
        Target::allowed_now(self, method)
    }
    fn subsystem_config(&self, name: &str, with_batches: bool) -> Option<Vec<Value>> {
        match name {
            "bdev" => Some(crate::saveconf::bdev(
                &self.registry,
                self.bdev_config(),
                with_batches,
            )),
            "nbd" => Some(self.nbd.config()),
            _ => None,
        }
    }
    fn set_kill(&self, sig: i32) {
        Target::set_kill(self, sig)
    }
    async fn wait_initialized(&self) {
        Target::wait_initialized(self).await
    }
    fn mark_initialized(&self) {
        Target::mark_initialized(self)
    }
}

/// A config replays into the target as SPDK's does: STARTUP methods first, then the rest.
#[async_trait]
impl ConfigTarget for Target {
    fn has_method(&self, method: &str) -> bool {
        Target::has_method(self, method)
    }
    fn in_startup(&self) -> bool {
        !self.is_initialized()
    }
    fn allowed_in_startup(&self, method: &str) -> bool {
        self.index
            .get(method)
            .is_some_and(|&i| self.methods[i].states.startup)
    }
    fn start(&self) {
        self.mark_initialized();
    }
    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        Target::call(self, method, params).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use serde_json::json;

    /// A module with an echo method and one that panics.
    struct Fake;

    #[async_trait]
    impl RpcModule for Fake {
        fn methods(&self) -> Vec<&'static str> {
            vec!["echo", "boom", "rpc_get_methods"]
        }
        async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
            match method {
                "echo" => Ok(params.unwrap_or(Value::Null)),
                "boom" => panic!("boom"),
                _ => Err(RpcError::method_not_found()),
            }
        }
    }

    fn target(wait_for_rpc: bool) -> Arc<Target> {
        let registry = Registry::new();
        let nbd = NbdServer::new(registry.clone());
        let wiring = Wiring {
            modules: vec![Arc::new(Fake)],
            ..Default::default()
        };
        Target::new(registry, nbd, wiring, wait_for_rpc)
    }

    #[tokio::test]
    async fn dispatch_states_and_panics() {
        let t = target(true);
        // STARTUP: module methods are refused, framework ones run.
        let e = t.call("echo", Some(json!({"a": 1}))).await.unwrap_err();
        assert_eq!(e.code, INVALID_STATE);
        let m = t
            .call("rpc_get_methods", Some(json!({"current": true})))
            .await
            .unwrap();
        assert!(m
            .as_array()
            .unwrap()
            .contains(&json!("framework_start_init")));
        assert!(!m.as_array().unwrap().contains(&json!("echo")));
        assert_eq!(
            t.call("framework_start_init", None).await.unwrap(),
            json!(true)
        );
        // RUNTIME.
        assert_eq!(
            t.call("framework_start_init", None).await.unwrap_err().code,
            INVALID_STATE
        );
        assert_eq!(
            t.call("framework_wait_init", None).await.unwrap(),
            json!(true)
        );
        assert_eq!(
            t.call("echo", Some(json!({"a": 1}))).await.unwrap(),
            json!({"a": 1})
        );
        assert_eq!(
            t.call("echo", Some(json!([1]))).await.unwrap_err(),
            RpcError::decode_failed()
        );
        assert_eq!(
            t.call("nope", None).await.unwrap_err(),
            RpcError::method_not_found()
        );
        let e = t.call("boom", None).await.unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (INTERNAL_ERROR, "Internal error")
        );
        // The module's attempt to serve a framework method is ignored.
        let m = t.call("rpc_get_methods", None).await.unwrap();
        let names = m.as_array().unwrap();
        assert_eq!(names.iter().filter(|n| *n == "rpc_get_methods").count(), 1);
        assert!(names.contains(&json!("echo")));
    }

    #[tokio::test]
    async fn framework_methods() {
        let t = target(false);
        assert!(t.call("spdk_get_version", Some(json!({}))).await.unwrap()["version"].is_string());
        assert_eq!(
            t.call("spdk_get_version", Some(json!({"x": 1})))
                .await
                .unwrap_err()
                .code,
            bdev_core::rpc::INVALID_PARAMS
        );
        let e = t
            .call("framework_get_config", Some(json!({"name": "x"})))
            .await
            .unwrap_err();
        assert_eq!(e.message, "Subsystem 'x' not found");
        let cfg = t
            .call(
                "framework_get_config",
                Some(json!({"name": "bdev", "with_batches": false})),
            )
            .await
            .unwrap();
        assert_eq!(cfg[0]["method"], json!("bdev_set_options"));
        assert_eq!(cfg[1], json!({"method": "bdev_wait_for_examine"}));
        let nbd = t
            .call("framework_get_config", Some(json!({"name": "nbd"})))
            .await
            .unwrap();
        assert_eq!(nbd, json!([]));
        let e = t
            .call("spdk_kill_instance", Some(json!({"sig_name": "SIGNOPE"})))
            .await
            .unwrap_err();
        assert_eq!(e.code, bdev_core::rpc::INVALID_PARAMS);
        assert_eq!(t.take_kill(), None);
        assert_eq!(
            t.call("spdk_kill_instance", Some(json!({"sig_name": "SIGTERM"})))
                .await
                .unwrap(),
            json!(true)
        );
        assert_eq!(t.take_kill(), Some(libc::SIGTERM));
    }

    /// The target as the binary wires it (every module, the log methods), in RUNTIME.
    fn wired() -> Arc<Target> {
        let registry = Registry::new();
        let handle = tokio::runtime::Handle::current();
        registry.set_spawner(Arc::new(move |f| {
            handle.spawn(f);
        }));
        let nbd = NbdServer::new(registry.clone());
        let mut wiring = crate::modules::wiring(&registry, &nbd);
        let log = crate::log::LogControl::new(None, Box::new(|_| Ok(())));
        wiring.modules.push(crate::log::LogRpc::new(log));
        Target::new(registry, nbd, wiring, false)
    }

    /// The methods the target must serve (SPDK's names; `docs/rpc.md`). Removing one from
    /// the wiring, or a module that stops answering one, fails `every_method_is_served`.
    const EXPECTED: &[&str] = &[
        "rpc_get_methods",
        "spdk_get_version",
        "spdk_kill_instance",
        "framework_get_subsystems",
        "framework_get_config",
        "framework_wait_init",
        "framework_start_init",
        "bdev_set_options",
        "bdev_wait_for_examine",
        "bdev_malloc_create",
        "bdev_malloc_delete",
        "bdev_aio_create",
        "bdev_aio_delete",
        "bdev_aio_rescan",
        "bdev_error_create",
        "bdev_error_delete",
        "bdev_error_inject_error",
        "bdev_null_create",
        "bdev_null_delete",
        "bdev_null_resize",
        "bdev_get_bdevs",
        "bdev_lvol_create_lvstore",
        "bdev_lvol_delete_lvstore",
        "bdev_lvol_get_lvstores",
        "bdev_lvol_rename_lvstore",
        "bdev_lvol_grow_lvstore",
        "bdev_lvol_create",
        "bdev_lvol_delete",
        "bdev_lvol_get_lvols",
        "bdev_lvol_snapshot",
        "bdev_lvol_clone",
        "bdev_lvol_clone_bdev",
        "bdev_lvol_rename",
        "bdev_lvol_resize",
        "bdev_lvol_set_read_only",
        "bdev_lvol_inflate",
        "bdev_lvol_decouple_parent",
        "bdev_lvol_set_parent",
        "bdev_lvol_set_parent_bdev",
        "bdev_lvol_start_shallow_copy",
        "bdev_lvol_check_shallow_copy",
        "nbd_start_disk",
        "nbd_stop_disk",
        "nbd_get_disks",
        "bdev_ro_create",
        "bdev_ro_delete",
        "bdev_nbd_client_create",
        "bdev_nbd_client_delete",
        "bdev_nbd_client_get",
        "log_set_level",
        "log_get_level",
        "log_set_print_level",
        "log_get_print_level",
        "log_set_flag",
        "log_clear_flag",
        "log_get_flags",
    ];

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rpc_get_methods_lists_exactly_the_table() {
        let t = wired();
        let listed = t.call("rpc_get_methods", None).await.unwrap();
        let listed: Vec<&str> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let table: Vec<&str> = t.methods.iter().map(|m| m.name).collect();
        assert_eq!(listed, table);
        let mut unique = table.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), table.len(), "a method is listed twice");
        // The framework rows come first, in their table's order.
        let fw: Vec<&str> = framework::METHODS.iter().map(|m| m.name).collect();
        assert_eq!(&table[..fw.len()], fw.as_slice());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_method_is_served() {
        let t = wired();
        let table = t.method_names();
        for m in EXPECTED {
            assert!(table.contains(m), "{m} is not served any more");
        }
        // Every row's handler knows its method: a probe with a parameter no method takes
        // is refused for its params or its state, never with "Method not found".
        for m in &table {
            let r = t.call(m, Some(json!({"__probe__": true}))).await;
            if let Err(e) = r {
                assert_ne!(
                    e.code,
                    bdev_core::rpc::METHOD_NOT_FOUND,
                    "{m} is in the table but its handler does not serve it"
                );
            }
        }
        assert_eq!(
            t.call("no_such_method", None).await.unwrap_err(),
            RpcError::method_not_found()
        );
    }
}
