//! What only the NBD client's tests need: qemu-nbd servers started and killed by the tests,
//! pattern files served by them, and a registry with NBD clients to reach them.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bdev_core::{BdevEvent, Descriptor, IoBuf, Registry};
use bdev_nbd::NbdClients;
pub use test_support::prelude::*;

/// Whether qemu-nbd and qemu-img are installed; if not, the test is recorded as skipped (and
/// fails under CI) through `test_support::require_tools`.
pub fn have_qemu(test: &str) -> bool {
    test_support::require_tools(test, &["qemu-nbd", "qemu-img"])
}

/// The tag of the pattern these tests serve (`test_support::bdev::pattern`).
pub const TAG: u8 = 0x4e;

/// Writes a raw file of `len` bytes holding the pattern.
pub fn pattern_file(dir: &Path, name: &str, len: u64) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).expect("create pattern file");
    let chunk = 1 << 20;
    let mut pos = 0;
    while pos < len {
        let n = chunk.min(len - pos);
        f.write_all(&pattern(TAG, pos, n as usize))
            .expect("write pattern");
        pos += n;
    }
    p
}

/// Makes a qcow2 image over a raw backing file.
pub fn qcow2_over(dir: &Path, backing: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(backing)
        .arg(&p)
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img create failed");
    p
}

/// A registry and the NBD clients that register their bdevs in it.
pub fn nbd_clients() -> (Registry, NbdClients) {
    let reg = Registry::new();
    let clients = NbdClients::new(reg.clone());
    (reg, clients)
}

/// Serves a new raw pattern file of `size` bytes (`<dir>/<export>.raw`) as export `export`
/// (qemu-nbd arguments `extra`); returns the temp dir (keep it alive) and the server. `None`
/// when qemu is not installed: the skip of `test` is then recorded (and fails under CI) by
/// [`have_qemu`].
pub fn serve_pattern(
    test: &str,
    size: u64,
    export: &str,
    extra: &[&str],
) -> Option<(tempfile::TempDir, QemuNbd)> {
    if !have_qemu(test) {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = pattern_file(dir.path(), &format!("{export}.raw"), size);
    let srv = QemuNbd::unix(dir.path(), &file, "raw", export, extra);
    Some((dir, srv))
}

/// Where a test server listens.
#[derive(Clone, Debug)]
pub enum Listen {
    /// A Unix socket.
    Unix(PathBuf),
    /// A TCP address, inside a network namespace (`ip netns exec`) when one is given.
    Tcp {
        ip: String,
        port: u16,
        netns: Option<String>,
    },
}

/// A qemu-nbd process, killed on drop.
pub struct QemuNbd {
    child: Option<Child>,
    listen: Listen,
    file: PathBuf,
    format: String,
    export: String,
    extra: Vec<String>,
}

impl QemuNbd {
    /// Serves `file` on a Unix socket in `dir`, persistent (`-t`), with extra arguments
    /// (`-r`, `-e N`, ...).
    pub fn unix(dir: &Path, file: &Path, format: &str, export: &str, extra: &[&str]) -> Self {
        let sock = dir.join(format!("{export}.sock"));
        Self::start(Listen::Unix(sock), file, format, export, extra)
    }

    /// Serves `file` on a listening address.
    pub fn start(listen: Listen, file: &Path, format: &str, export: &str, extra: &[&str]) -> Self {
        let mut s = QemuNbd {
            child: None,
            listen,
            file: file.to_path_buf(),
            format: format.to_string(),
            export: export.to_string(),
            extra: extra.iter().map(|e| e.to_string()).collect(),
        };
        s.spawn();
        s
    }

    /// The file served.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The address to give `bdev_nbd_client_create`.
    pub fn address(&self) -> String {
        match &self.listen {
            Listen::Unix(p) => format!("unix:{}", p.display()),
            Listen::Tcp { ip, port, .. } => format!("{ip}:{port}"),
        }
    }

    fn spawn(&mut self) {
        let mut cmd = match &self.listen {
            Listen::Tcp {
                netns: Some(ns), ..
            } => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-nbd"]);
                c
            }
            _ => Command::new("qemu-nbd"),
        };
        match &self.listen {
            Listen::Unix(p) => {
                let _ = std::fs::remove_file(p);
                cmd.arg("-k").arg(p);
            }
            Listen::Tcp { ip, port, .. } => {
                cmd.args(["-b", ip, "-p", &port.to_string()]);
            }
        }
        cmd.args(["-x", &self.export, "-f", &self.format, "-t"])
            .args(&self.extra)
            .arg(&self.file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("start qemu-nbd");
        self.child = Some(child);
        self.wait_listening();
    }

    /// Waits until a connection succeeds (the probe connection is closed at once).
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = match &self.listen {
                Listen::Unix(p) => UnixStream::connect(p).is_ok(),
                Listen::Tcp { ip, port, .. } => {
                    let sa = format!("{ip}:{port}").parse().expect("test address");
                    std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(200)).is_ok()
                }
            };
            if ok {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("qemu-nbd exited at start: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not start listening"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again with the same arguments.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `blocks` blocks at `lba` through a descriptor and checks them against the pattern.
pub async fn check_pattern(desc: &Descriptor, lba: u64, blocks: u64) -> bdev_core::Result<()> {
    let bl = desc.block_len() as u64;
    let buf = desc
        .read(lba, IoBuf::new((blocks * bl) as usize, 1))
        .await?;
    assert!(
        buf[..] == pattern(TAG, lba * bl, buf.len())[..],
        "pattern mismatch at lba {lba}"
    );
    Ok(())
}

/// Reads 4 KiB at each of `lbas`, all submitted before any is awaited (many requests in
/// flight on the connection); each must hold the pattern.
pub async fn read_all_at_once(desc: &Descriptor, lbas: impl IntoIterator<Item = u64>) {
    let bl = desc.block_len() as u64;
    let reads = lbas.into_iter().map(|lba| async move {
        let b = desc.read(lba, IoBuf::new(4096, 1)).await.unwrap();
        assert!(b[..] == pattern(TAG, lba * bl, 4096)[..], "lba {lba}");
    });
    futures::future::join_all(reads).await;
}

/// Writes 4 KiB filled with `byte` at each `(lba, byte)`, all at once, then reads each back.
pub async fn write_all_at_once(desc: &Descriptor, writes: &[(u64, u8)]) {
    let ws = writes.iter().map(|&(lba, byte)| async move {
        let buf = IoBuf::from_slice(&[byte; 4096], 1);
        desc.write(lba, buf).await.unwrap();
    });
    futures::future::join_all(ws).await;
    for &(lba, byte) in writes {
        let b = desc.read(lba, IoBuf::new(4096, 1)).await.unwrap();
        assert!(b.iter().all(|&x| x == byte), "lba {lba}");
    }
}

/// Whether a `Remove` event arrived on the descriptor's event receiver.
pub fn removed(events: &mut futures::channel::mpsc::UnboundedReceiver<BdevEvent>) -> bool {
    while let Ok(ev) = events.try_recv() {
        if ev == BdevEvent::Remove {
            return true;
        }
    }
    false
}
