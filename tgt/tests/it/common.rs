//! Shared helpers of the integration tests: start the `tgt` binary (this crate's own build) on
//! a temp socket and drive it with SPDK's own `spdk-rpc`; the tools, `qemu-io`, raw JSON-RPC
//! exchanges and the minimal NBD client come from `test_support::tgt`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::tgt::{find_tool, spdk_rpc_raw, spdk_rpc_result, wait_for_socket};
pub use test_support::tgt::{raw_exchange, NbdClient, RpcErr};

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

/// A running target.
pub struct Tgt {
    /// The process.
    pub child: Option<Child>,
    /// RPC socket.
    pub sock: PathBuf,
    /// Tools.
    pub tools: Tools,
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
        let t = Tgt::spawn(cmd, sock, tools);
        // With a config the socket answers at once, in the STARTUP state, and refuses
        // runtime methods until the replay is done: a test's first call waits for it.
        let config = extra.iter().any(|a| *a == "--json" || *a == "-c");
        if config && !extra.contains(&"--wait-for-rpc") {
            t.ok(&["framework_wait_init"]);
        }
        t
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
        spdk_rpc_raw(&self.tools.rpc, &self.sock, args)
    }

    /// Runs a command; on success the output parsed as JSON (a bare word becomes a string,
    /// empty output null), on failure the JSON-RPC error printed by the client.
    pub fn rpc(&self, args: &[&str]) -> Result<Value, RpcErr> {
        spdk_rpc_result(&self.rpc_raw(args), args)
    }

    /// `save_config` (with `--with-batches` when `batches`), which must succeed: the document.
    pub fn save_config(&self, batches: bool) -> Value {
        let mut args = vec!["save_config"];
        if batches {
            args.push("--with-batches");
        }
        let out = self.rpc_raw(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("save_config prints JSON")
    }

    /// Starts `tgt -r SOCK --json CONFIG` in `dir`.
    pub fn start_json(tools: &Tools, dir: &Path, sock: &Path, config: &Path) -> Tgt {
        Tgt::start(tools, dir, sock, &["--json", config.to_str().unwrap()])
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
    test_support::tgt::qemu_io(&tools.qemu_io, uri, read_only, cmds)
}

/// `qemu-img convert -f raw -O raw [extra...] FROM TO`, which must succeed.
pub fn qemu_img_convert(tools: &Tools, extra: &[&str], from: &str, to: &str) {
    let out = Command::new(&tools.qemu_img)
        .args(["convert", "-f", "raw", "-O", "raw"])
        .args(extra)
        .args([from, to])
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img convert {from} {to}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// qemu-io on a read-only open (`-r`) that must succeed.
pub fn qemu_io_ro_ok(tools: &Tools, uri: &str, cmds: &[&str]) -> String {
    let (ok, text) = qemu_io(tools, uri, true, cmds);
    assert!(ok, "qemu-io -r {cmds:?} on {uri}: {text}");
    text
}

/// qemu-io that must succeed.
pub fn qemu_io_ok(tools: &Tools, uri: &str, cmds: &[&str]) -> String {
    let (ok, text) = qemu_io(tools, uri, false, cmds);
    assert!(ok, "qemu-io {cmds:?} on {uri}: {text}");
    text
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

/// Starts `tgt` in `dir` on `dir/rpc.sock`; returns it, that socket (for a restart on the
/// same one) and the path its NBD server is meant to listen on, `dir/nbd.sock`.
pub fn start_restartable(tools: &Tools, dir: &Path) -> (Tgt, PathBuf, PathBuf) {
    let sock = dir.join("rpc.sock");
    let t = Tgt::start(tools, dir, &sock, &[]);
    (t, sock, dir.join("nbd.sock"))
}

/// The NBD socket path `dir/nbd.sock` and the address `nbd_server_start` takes for it.
pub fn nbd_listen(dir: &Path) -> (PathBuf, String) {
    let nbd = dir.join("nbd.sock");
    let listen = format!("unix:{}", nbd.display());
    (nbd, listen)
}

/// Starts `tgt` in `dir` on `dir/rpc.sock` with its NBD server on `dir/nbd.sock`; returns
/// the target and that NBD socket.
pub fn start_with_nbd(tools: &Tools, dir: &Path) -> (Tgt, PathBuf) {
    let t = start(tools, dir);
    let nbd = t.nbd_server_start(dir);
    (t, nbd)
}

/// Creates (or truncates) `path` as a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// Creates a sparse file `dir/<name>` of `size` bytes; returns its path.
pub fn sparse_in(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    sparse_file(&p, size);
    p
}

/// An lvol store `lvs` (1 MiB clusters) on aio bdev `aio0` (4 KiB blocks) over a new sparse
/// file `dir/a.img` of `size` bytes; returns the file.
pub fn aio_lvs(t: &Tgt, dir: &Path, size: u64) -> PathBuf {
    let f = sparse_in(dir, "a.img", size);
    t.ok(&["bdev_aio_create", f.to_str().unwrap(), "aio0", "4096"]);
    t.ok(&["bdev_lvol_create_lvstore", "-c", "1048576", "aio0", "lvs"]);
    f
}

/// `bdev_nbd_client_create C1` towards a server that is not there (`dir/away.sock`), in the
/// background and with a long reconnect delay: a client that waits, outside the registry.
pub fn waiting_client(t: &Tgt, dir: &Path) -> Value {
    let away = format!("unix:{}", dir.join("away.sock").display());
    t.ok(&[
        "bdev_nbd_client_create",
        "C1",
        &away,
        "x",
        "-b",
        "--reconnect-delay-ms",
        "100000",
    ])
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

/// The `method` of each entry of a config array (`save_config`'s `subsystems[i].config`).
pub fn methods(config: &Value) -> Vec<String> {
    config
        .as_array()
        .expect("a config array")
        .iter()
        .map(|e| e["method"].as_str().expect("a method").to_string())
        .collect()
}

/// The element of a listing (`bdev_lvol_get_lvols`, ...) whose `name` is `name`.
pub fn named(list: &Value, name: &str) -> Value {
    list.as_array()
        .expect("a list")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list}"))
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
