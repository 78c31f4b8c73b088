//! Shared helpers of the integration tests: start the `tgt` binary on a temp socket, drive
//! it with SPDK's own `spdk-rpc`, move data with `qemu-io` / `qemu-img`, and a minimal raw
//! NBD client for what qemu refuses to send (writes to a read-only export).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nbd_proto as proto;
use serde_json::Value;

/// Finds a program: the env variable first, then PATH, then the helpers' venv.
fn find_tool(env: &str, name: &str, extra: &[&str]) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let c = dir.join(name);
        if c.is_file() {
            return Some(c);
        }
    }
    extra.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// The tools the tests need, or `None` after recording the test as skipped (a failure under
/// CI) through `test_support::skip`.
pub fn tools() -> Option<Tools> {
    let ci_venv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/venv-spdk/bin/spdk-rpc"
    );
    let rpc = find_tool("SPDK_RPC", "spdk-rpc", &[ci_venv]);
    let qemu_io = find_tool("QEMU_IO", "qemu-io", &[]);
    let qemu_img = find_tool("QEMU_IMG", "qemu-img", &[]);
    match (rpc, qemu_io, qemu_img) {
        (Some(rpc), Some(qemu_io), Some(qemu_img)) => Some(Tools {
            rpc,
            qemu_io,
            qemu_img,
        }),
        (rpc, io, img) => {
            // libtest names each test's thread after the test.
            let test = std::thread::current()
                .name()
                .unwrap_or("tgt test")
                .to_string();
            test_support::skip(
                &test,
                &format!(
                    "needs spdk-rpc (env SPDK_RPC or PATH; pip install spdk) {rpc:?}, qemu-io {io:?}, qemu-img {img:?}"
                ),
            );
            None
        }
    }
}

/// Paths of the external tools.
#[derive(Clone, Debug)]
pub struct Tools {
    /// spdk-rpc.
    pub rpc: PathBuf,
    /// qemu-io.
    pub qemu_io: PathBuf,
    /// qemu-img.
    pub qemu_img: PathBuf,
}

/// The repository's python directory (the spdk-rpc plugin).
pub fn plugin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../python")
}

/// A running target.
pub struct Tgt {
    /// The process.
    pub child: Option<Child>,
    /// RPC socket.
    pub sock: PathBuf,
    /// Tools.
    pub tools: Tools,
}

/// An RPC error as spdk-rpc printed it.
#[derive(Debug, PartialEq)]
pub struct RpcErr {
    /// Code.
    pub code: i64,
    /// Message.
    pub message: String,
}

fn wait_for_socket(sock: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if UnixStream::connect(sock).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("tgt exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("tgt did not open {}", sock.display());
}

impl Tgt {
    /// Spawns `cmd` (a `tgt` command line) and waits until it listens on `sock`.
    fn spawn(mut cmd: Command, sock: &Path, tools: &Tools) -> Tgt {
        let mut child = cmd.spawn().expect("spawn tgt");
        wait_for_socket(sock, &mut child);
        Tgt {
            child: Some(child),
            sock: sock.to_path_buf(),
            tools: tools.clone(),
        }
    }

    /// Starts the NBD server on `dir/nbd.sock`; returns that path.
    pub fn nbd_server_start(&self, dir: &Path) -> PathBuf {
        let nbd = dir.join("nbd.sock");
        self.ok(&["nbd_server_start", &format!("unix:{}", nbd.display())]);
        nbd
    }

    /// Starts `tgt -r SOCK extra...` in `dir`.
    pub fn start(tools: &Tools, dir: &Path, sock: &Path, extra: &[&str]) -> Tgt {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tgt"));
        cmd.arg("-r").arg(sock).args(extra).current_dir(dir);
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        Tgt::spawn(cmd, sock, tools)
    }

    /// Starts `tgt -r SOCK` in `dir` with its address space limited to `bytes`
    /// (`RLIMIT_AS`): an allocation sized by a request then kills the target instead of
    /// exhausting the machine.
    pub fn start_limited(tools: &Tools, dir: &Path, sock: &Path, bytes: u64) -> Tgt {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tgt"));
        cmd.arg("-r").arg(sock).current_dir(dir);
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        let lim = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: bytes,
        };
        // SAFETY: setrlimit is async-signal-safe and touches only the child's limits.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Tgt::spawn(cmd, sock, tools)
    }

    /// Starts `tgt` with no arguments at all (the embedded default) in `dir`; it listens on
    /// SPDK's default socket.
    pub fn start_default(tools: &Tools, dir: &Path) -> Tgt {
        let sock = PathBuf::from("/var/tmp/spdk.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tgt"));
        cmd.current_dir(dir);
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        let t = Tgt::spawn(cmd, &sock, tools);
        // The socket is bound before the default setup runs and answers once it is done.
        t.ok(&["framework_wait_init"]);
        t
    }

    /// Runs `spdk-rpc -s SOCK --plugin spdk_rs_plugin ARGS`.
    pub fn rpc_raw(&self, args: &[&str]) -> Output {
        Command::new(&self.tools.rpc)
            .arg("-s")
            .arg(&self.sock)
            .arg("--plugin")
            .arg("spdk_rs_plugin")
            .args(args)
            .env("PYTHONPATH", plugin_dir())
            .output()
            .expect("run spdk-rpc")
    }

    /// Runs a command; on success the output parsed as JSON (a bare word becomes a string,
    /// empty output null), on failure the JSON-RPC error printed by the client.
    pub fn rpc(&self, args: &[&str]) -> Result<Value, RpcErr> {
        let out = self.rpc_raw(args);
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

    /// `rpc` that must succeed.
    pub fn ok(&self, args: &[&str]) -> Value {
        match self.rpc(args) {
            Ok(v) => v,
            Err(e) => panic!("spdk-rpc {args:?}: {e:?}"),
        }
    }

    /// `rpc` that must fail; returns the error.
    pub fn err(&self, args: &[&str]) -> RpcErr {
        match self.rpc(args) {
            Ok(v) => panic!("spdk-rpc {args:?} succeeded: {v}"),
            Err(e) => e,
        }
    }

    /// Stops the target with `spdk_kill_instance SIGINT` and waits; returns the exit code.
    pub fn stop(&mut self) -> i32 {
        let _ = self.rpc_raw(&["spdk_kill_instance", "SIGINT"]);
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("tgt did not stop");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An NBD URI for an export on a unix socket.
pub fn nbd_uri(export: &str, sock: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// Runs qemu-io on an NBD export with the given `-c` commands; returns (success, output).
pub fn qemu_io(tools: &Tools, uri: &str, read_only: bool, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new(&tools.qemu_io);
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
    // qemu-io exits 0 even when a pattern check fails; it prints "Pattern verification failed".
    let ok = out.status.success()
        && !text.contains("Pattern verification failed")
        && !text.contains("failed:")
        && !text.contains("can't open");
    (ok, text)
}

/// qemu-io that must succeed.
pub fn qemu_io_ok(tools: &Tools, uri: &str, cmds: &[&str]) -> String {
    let (ok, text) = qemu_io(tools, uri, false, cmds);
    assert!(ok, "qemu-io {cmds:?} on {uri}: {text}");
    text
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

/// A minimal NBD client (fixed newstyle, NBD_OPT_GO).
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
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&3u32.to_be_bytes())?;
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

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let kb: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .expect("kB value");
            return kb * 1024;
        }
    }
    panic!("no {field} in /proc/{pid}/status");
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fd dir")
        .count()
}

/// The tools and a fresh temp dir, or `None` after recording the test as skipped.
pub fn setup() -> Option<(Tools, tempfile::TempDir)> {
    let tools = tools()?;
    Some((tools, tempfile::tempdir().unwrap()))
}

/// Starts `tgt` in `dir` on `dir/rpc.sock` with no arguments.
pub fn start(tools: &Tools, dir: &Path) -> Tgt {
    Tgt::start(tools, dir, &dir.join("rpc.sock"), &[])
}

/// Creates (or truncates) `path` as a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// The `config` array of the `bdev` subsystem in a `save_config` document.
pub fn bdev_config(doc: &Value) -> Vec<Value> {
    doc["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subsystem"] == "bdev")
        .unwrap()["config"]
        .as_array()
        .unwrap()
        .clone()
}

/// Serialises the tests that use SPDK's default socket, across processes (other test
/// binaries or worktrees may run at the same time) and within this one (`flock` locks an
/// open file description, so two opens in one process exclude each other too).
pub struct DefaultSocketLock {
    /// Held for the lock; closing it releases the flock.
    _file: std::fs::File,
}

impl DefaultSocketLock {
    /// Blocks until the lock is ours.
    pub fn take() -> DefaultSocketLock {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/var/tmp/spdk.sock.tgt-test.lock")
            .unwrap();
        // SAFETY: flock on an open descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0);
        DefaultSocketLock { _file: f }
    }
}
