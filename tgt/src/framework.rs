//! The framework methods (SPDK `lib/rpc/rpc.c`, `lib/init/subsystem_rpc.c`,
//! `lib/event/app_rpc.c`): method listing, version, kill, init state and config dump.

use std::sync::Arc;

use bdev_core::rpc::{RpcError, INVALID_PARAMS};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::target::Target;

/// The methods answered by the target itself.
pub const METHODS: [&str; 7] = [
    "rpc_get_methods",
    "spdk_get_version",
    "spdk_kill_instance",
    "framework_get_subsystems",
    "framework_get_config",
    "framework_wait_init",
    "framework_start_init",
];

/// The version we report (the SPDK release whose RPC surface and formats we follow).
pub const VERSION_MAJOR: u32 = 24;
/// Minor version.
pub const VERSION_MINOR: u32 = 9;

/// In which states a method may run: (STARTUP, RUNTIME). Every module method is RUNTIME only;
/// `bdev_set_options` is allowed in both so that `spdk-rpc load_config` against a running
/// target replays a saved config without skipping it.
pub fn allowed_states(method: &str) -> (bool, bool) {
    match method {
        "framework_start_init" => (true, false),
        "rpc_get_methods"
        | "spdk_get_version"
        | "spdk_kill_instance"
        | "framework_get_subsystems"
        | "framework_get_config"
        | "framework_wait_init"
        | "bdev_set_options" => (true, true),
        m if crate::log::METHODS.contains(&m) => (true, true),
        _ => (false, true),
    }
}

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

/// Runs one framework method.
pub async fn call(t: &Arc<Target>, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    match method {
        "rpc_get_methods" => {
            let p: GetMethods = decode_or(params, "Invalid parameters")?;
            // We register no deprecated aliases, so include_aliases changes nothing.
            let _ = p.include_aliases;
            let names: Vec<Value> = t
                .method_names()
                .into_iter()
                .filter(|m| !p.current || t.allowed_now(m))
                .map(|m| Value::String(m.to_string()))
                .collect();
            Ok(Value::Array(names))
        }
        "spdk_get_version" => {
            no_params(&params, method)?;
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
        }
        "spdk_kill_instance" => {
            let p: Kill = decode_or(params, "Invalid parameters")?;
            let sig = signal_by_name(&p.sig_name).ok_or_else(|| invalid("Invalid parameters"))?;
            t.set_kill(sig);
            Ok(Value::Bool(true))
        }
        "framework_get_subsystems" => {
            no_params(&params, method)?;
            Ok(subsystems())
        }
        "framework_get_config" => {
            let p: GetConfig = decode_or(params, "Invalid arguments")?;
            match p.name.as_str() {
                "bdev" => Ok(Value::Array(crate::saveconf::bdev(
                    t.registry(),
                    t.bdev_config(),
                    p.with_batches,
                ))),
                "nbd" => Ok(Value::Array(t.nbd().config())),
                other => Err(invalid(&format!("Subsystem '{other}' not found"))),
            }
        }
        "framework_wait_init" => {
            no_params(&params, method)?;
            t.wait_initialized().await;
            Ok(Value::Bool(true))
        }
        "framework_start_init" => {
            no_params(&params, method)?;
            t.mark_initialized();
            Ok(Value::Bool(true))
        }
        _ => Err(RpcError::method_not_found()),
    }
}
