//! Two hosts made of network namespaces: a qemu-nbd server in one, the NBD client bdev in
//! the other, joined by a veth pair with addresses of the test's own (10.200.x.1 and
//! 10.200.x.2, only inside the namespaces it creates). Needs root and `ip`; otherwise the
//! skip is recorded (`test_support::skip`, a failure under CI). Everything is removed
//! afterwards.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::common::*;
use bdev_core::{BlockDevice, IoBuf, Registry};
use bdev_nbd::{NbdClientBdev, NbdClientOpts, NbdClients};

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn add(name: String) -> Result<Netns, String> {
        ip(&["netns", "add", &name])?;
        Ok(Netns(name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

/// Two namespaces ("hosts") joined by a veth pair.
struct Hosts {
    server: Netns,
    client: Netns,
    server_if: String,
    server_ip: String,
}

fn make_hosts(tag: u32) -> Result<Hosts, String> {
    let pid = std::process::id();
    let server = Netns::add(format!("nbdc-srv-{pid}-{tag}"))?;
    let client = Netns::add(format!("nbdc-cli-{pid}-{tag}"))?;
    // Interface names live inside the namespaces, but must fit in 15 bytes.
    let server_if = format!("ns{}x{tag}", pid % 1_000_000);
    let client_if = format!("nc{}x{tag}", pid % 1_000_000);
    ip(&[
        "link", "add", &server_if, "netns", &server.0, "type", "veth", "peer", "name", &client_if,
        "netns", &client.0,
    ])?;
    let net = 1 + (pid % 250) as u8;
    let server_ip = format!("10.200.{net}.1");
    let client_ip = format!("10.200.{net}.2");
    for (ns, dev, addr) in [
        (&server.0, &server_if, &server_ip),
        (&client.0, &client_if, &client_ip),
    ] {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    Ok(Hosts {
        server,
        client,
        server_if,
        server_ip,
    })
}

impl Hosts {
    /// The server host as code running in the client's namespace sees it.
    fn server(&self) -> Server {
        Server {
            ns: self.server.0.clone(),
            ip: self.server_ip.clone(),
            ifname: self.server_if.clone(),
        }
    }
}

/// The server host: its namespace, address and the server end of the wire.
#[derive(Clone)]
struct Server {
    ns: String,
    ip: String,
    ifname: String,
}

impl Server {
    /// qemu-nbd on the server host serving `file` read-only as export `golden` (port 10809,
    /// up to 4 clients).
    fn serve(&self, file: &Path) -> QemuNbd {
        let listen = Listen::Tcp {
            ip: self.ip.clone(),
            port: 10809,
            netns: Some(self.ns.clone()),
        };
        QemuNbd::start(listen, file, "raw", "golden", &["-r", "-e", "4"])
    }

    /// Mends (`up`) or cuts the wire at the server's end.
    fn link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.ns, "link", "set", &self.ifname, state]).unwrap();
    }
}

/// Client bdev `name` of `srv` over TCP: `attempts` reconnects 200 ms apart, I/O timeout 1 s.
fn connect(clients: &NbdClients, srv: &QemuNbd, name: &str, attempts: u32) -> Arc<NbdClientBdev> {
    let mut o = NbdClientOpts::new(name, &srv.address(), "golden");
    o.reconnect_attempts = attempts;
    o.reconnect_delay_ms = 200;
    o.io_timeout_ms = 1000;
    block_within(10, clients.create(o)).unwrap()
}

/// Why the test cannot run here, if it cannot.
fn unsupported() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    if Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_or(true, |s| !s.success())
    {
        return Some("the ip command is not available".into());
    }
    None
}

/// Runs `f` on a new thread inside the namespace `ns`; threads it starts (the client's
/// supervisor and connection threads) inherit the namespace, and so do their sockets.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    let h = std::thread::spawn(move || {
        let file = File::open(&path).expect("open the namespace");
        // SAFETY: setns on a valid namespace fd changes only the calling thread's network
        // namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    });
    match h.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Runs `body` for test `name` in the client's namespace of two new hosts (`tag`): the server
/// host serves a pattern file of `size` bytes, and the registry holds client bdev `bdev` of
/// it (`attempts` reconnects). `body` gets the server host, its qemu-nbd, the registry, the
/// clients and the bdev. Where the hosts cannot be made the skip is recorded.
fn across_hosts(
    name: &str,
    tag: u32,
    size: u64,
    bdev: &'static str,
    attempts: u32,
    body: impl FnOnce(&Server, &QemuNbd, &Registry, &NbdClients, Arc<NbdClientBdev>) + Send + 'static,
) {
    let Some(hosts) = hosts_or_skip(name, tag) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let raw = pattern_file(dir.path(), "golden.raw", size);
    let server = hosts.server();
    in_netns(&hosts.client.0.clone(), move || {
        let srv = server.serve(&raw);
        let (reg, clients) = nbd_clients();
        let dev = connect(&clients, &srv, bdev, attempts);
        body(&server, &srv, &reg, &clients, dev);
        drop(srv);
    });
    drop(hosts);
}

/// Two hosts for test `name`, or `None` when they cannot be made here (not root, no `ip`, no
/// qemu, namespaces refused): the skip is then recorded (and fails under CI).
fn hosts_or_skip(name: &str, tag: u32) -> Option<Hosts> {
    if let Some(why) = unsupported() {
        test_support::skip(name, &why);
        return None;
    }
    if !have_qemu(name) {
        return None;
    }
    match make_hosts(tag) {
        Ok(h) => Some(h),
        Err(e) => {
            test_support::skip(name, &format!("cannot create network namespaces: {e}"));
            None
        }
    }
}

#[test]
fn remote_base_survives_a_network_partition_between_hosts() {
    let name = "remote_base_survives_a_network_partition_between_hosts";
    across_hosts(
        name,
        1,
        2 * MIB,
        "remote0",
        2,
        move |server, srv, reg, clients, dev| {
            let uuid = dev.uuid();
            assert_eq!(
                dev.driver_specific()["nbd_client"]["address"],
                srv.address()
            );
            drop(dev);
            let mut desc = reg.open("remote0", false).unwrap();
            let mut events = desc.take_events().unwrap();
            block_within(10, check_pattern(&desc, 0, 4096)).unwrap();

            // Cut the wire: nothing comes back, and nothing says so. The watchdog drops the
            // connection, the reconnects time out, the read fails, the bdev is hot-removed.
            server.link(false);
            let t0 = std::time::Instant::now();
            let err = block_within(15, desc.read(100, IoBuf::new(4096, 1))).unwrap_err();
            assert_eq!(err.errno(), libc::EIO);
            eprintln!("{name}: read failed after {:?}", t0.elapsed());
            wait_until(5, "Remove event", || removed(&mut events));
            drop(desc);
            wait_until(5, "hot-removal", || reg.get("remote0").is_none());

            // Mend it: the client finds the server again and registers the same bdev.
            server.link(true);
            wait_until(15, "re-registration", || reg.get_by_uuid(&uuid).is_some());
            assert_eq!(reg.get_by_uuid(&uuid).unwrap().name(), "remote0");
            let desc = reg.open("remote0", false).unwrap();
            block_within(10, check_pattern(&desc, 0, 4096)).unwrap();
            drop(desc);
            block_within(10, clients.delete("remote0")).unwrap();
        },
    );
}

#[test]
fn an_idle_connection_to_a_vanished_host_is_noticed() {
    let name = "an_idle_connection_to_a_vanished_host_is_noticed";
    across_hosts(
        name,
        2,
        MIB,
        "idle0",
        1,
        move |server, _, reg, clients, dev| {
            let uuid = dev.uuid();
            drop(dev);
            {
                let desc = reg.open("idle0", false).unwrap();
                block_within(10, check_pattern(&desc, 0, 8)).unwrap();
            }
            // No I/O at all while the wire is cut: TCP keepalive finds the peer gone.
            server.link(false);
            let t0 = std::time::Instant::now();
            wait_until(20, "hot-removal of an idle bdev", || {
                reg.get("idle0").is_none()
            });
            eprintln!("{name}: noticed after {:?}", t0.elapsed());
            server.link(true);
            wait_until(15, "re-registration", || reg.get_by_uuid(&uuid).is_some());
            let desc = reg.open("idle0", false).unwrap();
            block_within(10, check_pattern(&desc, 0, 2048)).unwrap();
            drop(desc);
            block_within(10, clients.delete("idle0")).unwrap();
        },
    );
}
