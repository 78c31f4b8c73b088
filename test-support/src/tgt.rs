//! The `tgt` binary as a test's JSON-RPC peer: built once per test process (same profile and
//! target dir as the test), started on a Unix socket in a temp dir, killed on drop.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

use crate::timeout::wait_until;

/// Builds the `tgt` binary once (`cargo build -p tgt`, in the profile of the running test)
/// and returns its path, so a test never depends on an earlier `cargo build`.
pub fn tgt_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test> -> target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary under target/<profile>/deps")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "tgt", "--bin", "tgt"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build -p tgt");
        assert!(st.success(), "cargo build -p tgt failed");
        let p = dir.join("tgt");
        assert!(p.is_file(), "{} missing after the build", p.display());
        p
    })
    .clone()
}

/// A `tgt` process serving JSON-RPC on `<dir>/<name>.rpc.sock`, killed on drop.
pub struct Tgt {
    sock: PathBuf,
    child: Option<Child>,
}

impl Tgt {
    /// Starts `tgt` (built by [`tgt_binary`]) and waits until its RPC socket accepts.
    pub fn start(dir: &Path, name: &str) -> Tgt {
        let mut t = Tgt {
            sock: dir.join(format!("{name}.rpc.sock")),
            child: None,
        };
        t.spawn();
        t
    }

    /// The RPC socket.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// Starts the process (again, after [`Tgt::kill`]) on the same socket.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
        let child = Command::new(tgt_binary())
            .arg("-r")
            .arg(&self.sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tgt");
        self.child = Some(child);
        let sock = self.sock.clone();
        wait_until(20, "tgt rpc socket", || {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!("tgt exited at start: {st}");
            }
            UnixStream::connect(&sock).is_ok()
        });
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process has exited (or was killed).
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// One JSON-RPC call on a new connection; `Err((code, message))` for an error answer.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        let mut s = UnixStream::connect(&self.sock).expect("connect to tgt");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("set read timeout");
        let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        s.write_all(req.to_string().as_bytes())
            .expect("send request");
        let mut it = serde_json::Deserializer::from_reader(&mut s).into_iter::<Value>();
        let resp = it
            .next()
            .unwrap_or_else(|| panic!("{method}: no answer"))
            .unwrap_or_else(|e| panic!("{method}: bad answer: {e}"));
        if let Some(e) = resp.get("error") {
            return Err((
                e["code"].as_i64().unwrap_or(0),
                e["message"].as_str().unwrap_or("").to_string(),
            ));
        }
        Ok(resp["result"].clone())
    }

    /// [`Tgt::call`] that must succeed.
    pub fn ok(&self, method: &str, params: Value) -> Value {
        self.call(method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {e:?}"))
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        self.kill();
    }
}
