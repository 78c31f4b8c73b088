//! The `tgt` binary as a test's JSON-RPC peer: built once per test process (same profile and
//! target dir as the test), started on a Unix socket in a temp dir, killed on drop. Also what
//! every test that drives a target from outside needs: the external tools (SPDK's `spdk-rpc`
//! with the repository's plugin, `qemu-io`), raw JSON-RPC exchanges and a minimal NBD client.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nbd_proto as proto;
use serde_json::{json, Value};

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
        let child = self.child.insert(child);
        wait_for_socket(&self.sock, child);
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

/// Waits (up to 20 s) until `sock` accepts connections; panics if `child` exits first.
pub fn wait_for_socket(sock: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if UnixStream::connect(sock).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("tgt exited at start: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("tgt did not open {}", sock.display());
}

/// Finds a program: the environment variable `env` first, then `PATH`, then `extra` paths.
pub fn find_tool(env: &str, name: &str, extra: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .chain(extra.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

/// The repository's `python` directory (the `spdk_rs_plugin` of `spdk-rpc`).
pub fn plugin_dir() -> PathBuf {
    crate::workspace_root().join("python")
}

/// Runs `spdk-rpc -s SOCK --plugin spdk_rs_plugin ARGS` (`rpc` is the client's path).
pub fn spdk_rpc_raw(rpc: &Path, sock: &Path, args: &[&str]) -> Output {
    Command::new(rpc)
        .arg("-s")
        .arg(sock)
        .arg("--plugin")
        .arg("spdk_rs_plugin")
        .args(args)
        .env("PYTHONPATH", plugin_dir())
        .output()
        .expect("run spdk-rpc")
}

/// An RPC error as `spdk-rpc` printed it.
#[derive(Debug, PartialEq)]
pub struct RpcErr {
    /// Code.
    pub code: i64,
    /// Message.
    pub message: String,
}

/// What an `spdk-rpc ARGS` run answered: on success its output parsed as JSON (a bare word
/// becomes a string, empty output null), on failure the JSON-RPC error the client printed.
/// Panics when it failed without printing one.
pub fn spdk_rpc_result(out: &Output, args: &[&str]) -> Result<Value, RpcErr> {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if out.status.success() {
        let t = stdout.trim();
        if t.is_empty() {
            return Ok(Value::Null);
        }
        return Ok(serde_json::from_str(t).unwrap_or(Value::String(t.to_string())));
    }
    let all = format!("{stdout}{stderr}");
    if let Some(i) = all.find("response:") {
        let rest = &all[i + "response:".len()..];
        let mut it = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        if let Some(Ok(v)) = it.next() {
            return Err(RpcErr {
                code: v["code"].as_i64().unwrap_or(0),
                message: v["message"].as_str().unwrap_or("").to_string(),
            });
        }
    }
    panic!("spdk-rpc {args:?} failed without a JSON-RPC error: {all}");
}

/// Runs `qemu-io` (path `qemu_io`) on an image or NBD URI with the given `-c` commands;
/// returns (success, output). qemu-io exits 0 even when a pattern check fails, so its
/// messages count too.
pub fn qemu_io(qemu_io: &Path, uri: &str, read_only: bool, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new(qemu_io);
    c.arg("-f").arg("raw");
    if read_only {
        c.arg("-r");
    }
    c.arg(uri);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.output().expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success()
        && !text.contains("Pattern verification failed")
        && !text.contains("failed:")
        && !text.contains("can't open");
    (ok, text)
}

/// JSON-RPC over a raw socket: sends bytes, reads until `n` newline-terminated responses
/// arrived or the peer closed; returns the responses and whether the peer closed.
pub fn raw_exchange(sock: &Path, data: &[u8], n: usize) -> (Vec<Value>, bool) {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Writing may fail once the server closed on a parse error; that is expected.
    let _ = s.write_all(data);
    let mut buf = Vec::new();
    let mut closed = false;
    let mut chunk = [0u8; 65536];
    while buf.iter().filter(|&&b| b == b'\n').count() < n {
        match s.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                closed = true;
                break;
            }
            Err(e) => panic!("read: {e}"),
        }
    }
    if !closed {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        closed = matches!(s.read(&mut chunk), Ok(0));
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let values = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("response is one JSON line"))
        .collect();
    (values, closed)
}

/// A minimal NBD client (fixed newstyle, `NBD_OPT_GO`) for what qemu refuses to send.
pub struct NbdClient {
    s: UnixStream,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    cookie: u64,
}

impl NbdClient {
    /// Connects and selects `export`.
    pub fn connect(sock: &Path, export: &str) -> std::io::Result<NbdClient> {
        let mut s = UnixStream::connect(sock)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        assert_eq!(g, proto::greeting());
        s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())?;
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = proto::IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let (mut size, mut flags) = (0, 0);
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut d = vec![0u8; len];
            s.read_exact(&mut d)?;
            if ty & proto::REP_FLAG_ERROR != 0 {
                return Err(std::io::Error::other(format!("option error {ty:#x}")));
            }
            if ty == proto::REP_INFO && u16::from_be_bytes([d[0], d[1]]) == proto::INFO_EXPORT {
                size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                flags = u16::from_be_bytes([d[10], d[11]]);
            }
            if ty == proto::REP_ACK {
                break;
            }
        }
        Ok(NbdClient {
            s,
            size,
            flags,
            cookie: 1,
        })
    }

    /// Sends one request (with payload for writes) and reads the reply: (error, data).
    pub fn request(
        &mut self,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<(u32, Vec<u8>)> {
        self.request_flags(cmd, 0, offset, len, payload)
    }

    /// [`NbdClient::request`] with command flags (e.g. `CMD_FLAG_FUA`).
    pub fn request_flags(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<(u32, Vec<u8>)> {
        self.cookie += 1;
        let r = proto::Request {
            flags,
            cmd,
            cookie: self.cookie,
            offset,
            len,
        };
        let mut msg = proto::encode_request(&r).to_vec();
        msg.extend_from_slice(payload);
        self.s.write_all(&msg)?;
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            proto::SIMPLE_REPLY_MAGIC
        );
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        assert_eq!(
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            self.cookie
        );
        let mut data = Vec::new();
        if cmd == proto::CMD_READ && err == 0 {
            data = vec![0u8; len as usize];
            self.s.read_exact(&mut data)?;
        }
        Ok((err, data))
    }

    /// The socket, for raw use.
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.s
    }

    /// Reads until EOF (the server closed); true if it closed within the timeout.
    pub fn wait_closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}
