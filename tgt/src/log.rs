//! SPDK's log methods mapped onto the tracing filter: `log_set_level`, `log_get_level`,
//! `log_set_print_level`, `log_get_print_level`, `log_set_flag`, `log_clear_flag`,
//! `log_get_flags`.
//!
//! SPDK has two levels: the print level (what goes to stderr) and the log level (what goes
//! to syslog). We only write to stderr, so the print level is the default level of the
//! tracing filter; the log level is kept and reported (there is no syslog sink). A flag is a
//! group of tracing targets (`lvol`, `blob`, `nbd`, ...); setting it turns those targets on
//! at DEBUG whatever the print level (SPDK's `-L flag` also raises the print level), clearing
//! it returns them to the print level. Directives for specific targets given in `RUST_LOG`
//! are kept under every filter the methods install.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bdev_core::rpc::{decode, RpcError, RpcModule, INTERNAL_ERROR, INVALID_PARAMS};
use serde::Deserialize;
use serde_json::{Map, Value};
use tracing_subscriber::EnvFilter;

/// SPDK's level names, least verbose first, with the tracing level each maps to (tracing
/// has no NOTICE: it shares `info` with INFO).
const LEVELS: [(&str, &str); 5] = [
    ("ERROR", "error"),
    ("WARNING", "warn"),
    ("NOTICE", "info"),
    ("INFO", "info"),
    ("DEBUG", "debug"),
];

/// The log flags and the tracing targets each one covers, in `log_get_flags` order.
pub const FLAGS: &[(&str, &[&str])] = &[
    ("aio", &["uring", "bdev_core::backend::aio"]),
    ("bdev", &["bdev", "bdev_core"]),
    ("blob", &["blob", "blobstore"]),
    ("log_rpc", &["tgt::log"]),
    ("lvol", &["lvol"]),
    ("nbd", &["tgt::nbd", "bdev_nbd"]),
    ("rpc", &["tgt::server", "tgt::jsonrpc", "tgt::config"]),
    ("vbdev_ro", &["vbdev_ro"]),
];

/// Installs a new filter; `Err` says why it could not be.
pub type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

struct State {
    level: usize,
    print_level: usize,
    flags: Vec<bool>,
    /// Target directives of `RUST_LOG` (those with a `=`), kept under every filter.
    extra: Vec<String>,
}

/// The log settings and the handle that applies them to the running subscriber.
pub struct LogControl {
    state: Mutex<State>,
    reload: Reload,
}

fn level_index(name: &str) -> Option<usize> {
    LEVELS
        .iter()
        .position(|(n, _)| n.eq_ignore_ascii_case(name))
}

fn level_of_tracing(t: &str) -> Option<usize> {
    match t.to_ascii_lowercase().as_str() {
        "error" => Some(0),
        "warn" | "warning" => Some(1),
        "info" => Some(3),
        "debug" | "trace" => Some(4),
        _ => None,
    }
}

impl LogControl {
    /// A control starting from `env` (the `RUST_LOG` value, if any; a bare level in it is
    /// the initial print level, WARNING by default) whose filters go through `reload`.
    pub fn new(env: Option<&str>, reload: Reload) -> Arc<Self> {
        let mut print_level = 1;
        let mut extra = Vec::new();
        for d in env.unwrap_or("").split(',').map(str::trim) {
            if d.is_empty() {
                continue;
            }
            match level_of_tracing(d) {
                Some(l) if !d.contains('=') => print_level = l,
                _ => extra.push(d.to_string()),
            }
        }
        Arc::new(LogControl {
            state: Mutex::new(State {
                level: print_level,
                print_level,
                flags: vec![false; FLAGS.len()],
                extra,
            }),
            reload,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The filter directives of the current settings.
    pub fn directives(&self) -> String {
        let s = self.lock();
        let mut d = vec![LEVELS[s.print_level].1.to_string()];
        d.extend(s.extra.iter().cloned());
        for (i, (_, targets)) in FLAGS.iter().enumerate() {
            if s.flags[i] {
                d.extend(targets.iter().map(|t| format!("{t}=debug")));
            }
        }
        d.join(",")
    }

    /// The filter of the current settings.
    pub fn filter(&self) -> EnvFilter {
        EnvFilter::try_new(self.directives()).unwrap_or_else(|_| EnvFilter::new("warn"))
    }

    /// Installs the filter of the current settings.
    pub fn reapply(&self) -> Result<(), String> {
        (self.reload)(self.filter())
    }

    fn apply(&self) -> Result<(), RpcError> {
        self.reapply().map_err(|e| RpcError::new(INTERNAL_ERROR, e))
    }

    /// Sets (or clears) a flag by SPDK name, or every flag for `"all"`; `false` if unknown.
    pub fn set_flag(&self, name: &str, on: bool) -> bool {
        let mut s = self.lock();
        if name == "all" {
            s.flags.iter_mut().for_each(|f| *f = on);
            return true;
        }
        match FLAGS.iter().position(|(n, _)| *n == name) {
            Some(i) => {
                s.flags[i] = on;
                true
            }
            None => false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Level {
    level: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Flag {
    flag: String,
}

/// The log RPC module.
pub struct LogRpc {
    ctl: Arc<LogControl>,
}

impl LogRpc {
    /// A module driving `ctl`.
    pub fn new(ctl: Arc<LogControl>) -> Arc<Self> {
        Arc::new(LogRpc { ctl })
    }
}

/// SPDK's getters refuse any params (even `{}`) with this message.
fn no_params(method: &str, params: &Option<Value>) -> Result<(), RpcError> {
    match params {
        None => Ok(()),
        Some(_) => Err(RpcError::new(
            INVALID_PARAMS,
            format!("{method} requires no parameters"),
        )),
    }
}

fn decode_level(params: Option<Value>) -> Result<usize, RpcError> {
    let p: Level = decode(params)?;
    // An unknown level name is a decode failure in SPDK (its level decoder fails).
    level_index(&p.level).ok_or_else(RpcError::decode_failed)
}

#[async_trait]
impl RpcModule for LogRpc {
    fn methods(&self) -> Vec<&'static str> {
        METHODS.to_vec()
    }

    fn startup_methods(&self) -> Vec<&'static str> {
        METHODS.to_vec()
    }

    async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        match method {
            "log_set_level" => {
                let l = decode_level(params)?;
                self.ctl.lock().level = l;
                Ok(Value::Bool(true))
            }
            "log_set_print_level" => {
                let l = decode_level(params)?;
                self.ctl.lock().print_level = l;
                self.ctl.apply()?;
                tracing::debug!("print level set to {}", LEVELS[l].0);
                Ok(Value::Bool(true))
            }
            "log_get_level" | "log_get_print_level" => {
                no_params(method, &params)?;
                let s = self.ctl.lock();
                let l = if method == "log_get_level" {
                    s.level
                } else {
                    s.print_level
                };
                Ok(Value::String(LEVELS[l].0.to_string()))
            }
            "log_set_flag" | "log_clear_flag" => {
                let p: Flag = decode(params)?;
                if !self.ctl.set_flag(&p.flag, method == "log_set_flag") {
                    return Err(RpcError::new(INVALID_PARAMS, "invalid log flag"));
                }
                self.ctl.apply()?;
                Ok(Value::Bool(true))
            }
            "log_get_flags" => {
                no_params(method, &params)?;
                let s = self.ctl.lock();
                let m: Map<String, Value> = FLAGS
                    .iter()
                    .zip(&s.flags)
                    .map(|((n, _), on)| (n.to_string(), Value::Bool(*on)))
                    .collect();
                Ok(Value::Object(m))
            }
            _ => Err(RpcError::method_not_found()),
        }
    }
}

/// The methods, all allowed before and after `framework_start_init` as in SPDK.
pub const METHODS: [&str; 7] = [
    "log_set_level",
    "log_get_level",
    "log_set_print_level",
    "log_get_print_level",
    "log_set_flag",
    "log_clear_flag",
    "log_get_flags",
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctl(env: Option<&str>) -> (Arc<LogControl>, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let c = LogControl::new(
            env,
            Box::new(move |f| {
                s.lock().unwrap().push(f.to_string());
                Ok(())
            }),
        );
        (c, seen)
    }

    #[tokio::test]
    async fn levels_and_flags_become_directives() {
        let (c, seen) = ctl(Some("info,hyper=off"));
        let m = LogRpc::new(c.clone());
        assert_eq!(
            m.call("log_get_print_level", None).await.unwrap(),
            json!("INFO")
        );
        m.call("log_set_print_level", Some(json!({"level": "ERROR"})))
            .await
            .unwrap();
        m.call("log_set_flag", Some(json!({"flag": "lvol"})))
            .await
            .unwrap();
        assert_eq!(c.directives(), "error,hyper=off,lvol=debug");
        assert!(seen.lock().unwrap().last().unwrap().contains("lvol=debug"));
        let e = m
            .call("log_set_flag", Some(json!({"flag": "nope"})))
            .await
            .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32602, "invalid log flag"));
        let e = m
            .call("log_set_level", Some(json!({"level": "LOUD"})))
            .await
            .unwrap_err();
        assert_eq!(e, RpcError::decode_failed());
        let e = m.call("log_get_flags", Some(json!({}))).await.unwrap_err();
        assert_eq!(e.message, "log_get_flags requires no parameters");
        m.call("log_clear_flag", Some(json!({"flag": "all"})))
            .await
            .unwrap();
        assert_eq!(c.directives(), "error,hyper=off");
    }
}
