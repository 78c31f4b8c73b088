//! The framework methods (SPDK `lib/rpc/rpc.c`, `lib/init/subsystem_rpc.c`,
//! `lib/event/app_rpc.c`): method listing, version, kill, init state and config dump.
//!
//! [`METHODS`] is their one table (name, allowed states, handler). The handlers run over a
//! [`Host`] (the target, as they see it), so this file does not know the target's type.

use async_trait::async_trait;
use bdev_core::rpc::{RpcError, INVALID_PARAMS};
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Value};

/// In which states a method may run (SPDK's `SPDK_RPC_STARTUP` / `SPDK_RPC_RUNTIME`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct States {
    /// Before `framework_start_init`.
    pub startup: bool,
    /// After it.
    pub runtime: bool,
}

impl States {
    /// Only after `framework_start_init` (every module method unless it says otherwise).
    pub const RUNTIME: States = States {
        startup: false,
        runtime: true,
    };
    /// Only before it.
    pub const STARTUP: States = States {
        startup: true,
        runtime: false,
    };
    /// Before and after it.
    pub const ALWAYS: States = States {
        startup: true,
        runtime: true,
    };
}

/// What the framework methods need from the target.
#[async_trait]
pub trait Host: Send + Sync {
    /// Every method served, in table order.
    fn method_names(&self) -> Vec<&'static str>;
    /// Whether a method may run in the current state.
    fn allowed_now(&self, method: &str) -> bool;
    /// A subsystem's config array (`None`: no such subsystem).
    fn subsystem_config(&self, name: &str, with_batches: bool) -> Option<Vec<Value>>;
    /// Remembers a `spdk_kill_instance` signal.
    fn set_kill(&self, sig: i32);
    /// Waits for the RUNTIME state.
    async fn wait_initialized(&self);
    /// Moves to the RUNTIME state.
    fn mark_initialized(&self);
}

/// What a handler answers, later.
pub type Reply<'a> = BoxFuture<'a, Result<Value, RpcError>>;

/// A framework method's handler.
pub type Handler = for<'a> fn(&'a dyn Host, Option<Value>) -> Reply<'a>;

/// One row of the framework's table.
pub struct Method {
    /// Method name.
    pub name: &'static str,
    /// Allowed states.
    pub states: States,
    /// Handler.
    pub handler: Handler,
}

/// The methods answered by the target itself, in the order `rpc_get_methods` lists them.
pub const METHODS: [Method; 7] = [
    Method {
        name: "rpc_get_methods",
        states: States::ALWAYS,
        handler: rpc_get_methods,
    },
    Method {
        name: "spdk_get_version",
        states: States::ALWAYS,
        handler: spdk_get_version,
    },
    Method {
        name: "spdk_kill_instance",
        states: States::ALWAYS,
        handler: spdk_kill_instance,
    },
    Method {
        name: "framework_get_subsystems",
        states: States::ALWAYS,
        handler: framework_get_subsystems,
    },
    Method {
        name: "framework_get_config",
        states: States::ALWAYS,
        handler: framework_get_config,
    },
    Method {
        name: "framework_wait_init",
        states: States::ALWAYS,
        handler: framework_wait_init,
    },
    Method {
        name: "framework_start_init",
        states: States::STARTUP,
        handler: framework_start_init,
    },
];

/// The version we report (the SPDK release whose RPC surface and formats we follow).
pub const VERSION_MAJOR: u32 = 24;
/// Minor version.
pub const VERSION_MINOR: u32 = 9;

fn invalid(msg: &str) -> RpcError {
    RpcError::new(INVALID_PARAMS, msg)
}

fn decode_or<T: serde::de::DeserializeOwned>(
    params: Option<Value>,
    msg: &str,
) -> Result<T, RpcError> {
    if matches!(params, Some(Value::Array(_))) {
        return Err(invalid(msg));
    }
    bdev_core::rpc::decode(params).map_err(|_| invalid(msg))
}

/// Rejects params on methods that take none (an empty object is what the client sends).
fn no_params(params: &Option<Value>, method: &str) -> Result<(), RpcError> {
    match params {
        None => Ok(()),
        Some(Value::Object(o)) if o.is_empty() => Ok(()),
        Some(_) => Err(invalid(&format!("{method} requires no parameters"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetMethods {
    #[serde(default)]
    current: bool,
    #[serde(default)]
    include_aliases: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Kill {
    sig_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetConfig {
    name: String,
    #[serde(default)]
    with_batches: bool,
}

/// The subsystems we have, in dependency order: (name, depends on).
pub const SUBSYSTEMS: [(&str, &[&str]); 2] = [("bdev", &[]), ("nbd", &["bdev"])];

/// `framework_get_subsystems`.
pub fn subsystems() -> Value {
    SUBSYSTEMS
        .iter()
        .map(|(name, deps)| json!({"subsystem": name, "depends_on": deps}))
        .collect()
}

fn signal_by_name(name: &str) -> Option<i32> {
    Some(match name {
        "SIGINT" | "INT" => libc::SIGINT,
        "SIGTERM" | "TERM" => libc::SIGTERM,
        "SIGQUIT" | "QUIT" => libc::SIGQUIT,
        "SIGHUP" | "HUP" => libc::SIGHUP,
        "SIGKILL" | "KILL" => libc::SIGKILL,
        "SIGUSR1" | "USR1" => libc::SIGUSR1,
        _ => return None,
    })
}

fn rpc_get_methods(h: &dyn Host, params: Option<Value>) -> Reply<'_> {
    Box::pin(async move {
        let p: GetMethods = decode_or(params, "Invalid parameters")?;
        // We register no deprecated aliases, so include_aliases changes nothing.
        let _ = p.include_aliases;
        let names: Vec<Value> = h
            .method_names()
            .into_iter()
            .filter(|m| !p.current || h.allowed_now(m))
            .map(|m| Value::String(m.to_string()))
            .collect();
        Ok(Value::Array(names))
    })
}

fn spdk_get_version(_: &dyn Host, params: Option<Value>) -> Reply<'_> {
    Box::pin(async move {
        no_params(&params, "spdk_get_version")?;
        Ok(json!({
            "version": format!(
                "SPDK v{VERSION_MAJOR}.{VERSION_MINOR:02} compatible (tgt {})",
                env!("CARGO_PKG_VERSION")
            ),
            "fields": {
                "major": VERSION_MAJOR,
                "minor": VERSION_MINOR,
                "patch": 0,
                "suffix": "",
            },
        }))
    })
}

fn spdk_kill_instance(h: &dyn Host, params: Option<Value>) -> Reply<'_> {
    Box::pin(async move {
        let p: Kill = decode_or(params, "Invalid parameters")?;
        let sig = signal_by_name(&p.sig_name).ok_or_else(|| invalid("Invalid parameters"))?;
        h.set_kill(sig);
        Ok(Value::Bool(true))
    })
}

fn framework_get_subsystems(_: &dyn Host, params: Option<Value>) -> Reply<'_> {
    Box::pin(async move {
        no_params(&params, "framework_get_subsystems")?;
        Ok(subsystems())
    })
}

fn framework_get_config(h: &dyn Host, params: Option<Value>) -> Reply<'_> {
    Box::pin(async move {
        let p: GetConfig = decode_or(params, "Invalid arguments")?;
        h.subsystem_config(&p.name, p.with_batches)
            .map(Value::Array)
            .ok_or_else(|| invalid(&format!("Subsystem '{}' not found", p.name)))
    })
}

fn framework_wait_init(h: &dyn Host, params: Option<Value>) -> Reply<'_> {
    Box::pin(async move {
        no_params(&params, "framework_wait_init")?;
        h.wait_initialized().await;
        Ok(Value::Bool(true))
    })
}

fn framework_start_init(h: &dyn Host, params: Option<Value>) -> Reply<'_> {
    Box::pin(async move {
        no_params(&params, "framework_start_init")?;
        h.mark_initialized();
        Ok(Value::Bool(true))
    })
}
