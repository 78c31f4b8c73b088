//! The userspace NBD server: listeners, exports and connections (tokio).
//!
//! The listener runs on the target's control runtime; each accepted connection is handed to
//! one of the target's reactors (`NbdServer::set_reactors`, round-robin), a thread pinned to
//! its core with an event loop of its own, where the whole session runs.
//!
//! Each export holds one open descriptor on its bdev; connections share it. A `Remove` event
//! on that descriptor (hot-removal) removes the export and ends its connections: in-flight
//! requests finish, their replies are sent, then the socket is closed and the descriptor
//! dropped, which lets the unregister complete.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bdev_core::rpc::RpcError;
use bdev_core::{BdevEvent, Descriptor, IoType, Registry};
use futures::future::Either;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use iobuf::IoBuf;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify, RwLock};
use tokio::task::JoinHandle;

use crate::limits::{Held, Limits, MemBudget, StallGuard};
use crate::sockpath::{self, BoundPath};
use nbd_proto::{self as proto, ExportInfo, ExportLookup, Next, Request};

/// Receive buffer of a connection.
const RBUF_LEN: usize = 256 << 10;

/// Requests one connection may have in flight at once.
const MAX_INFLIGHT: usize = 128;

/// One export.
pub struct Export {
    name: String,
    bdev_name: String,
    writable: bool,
    desc: Arc<Descriptor>,
    /// Read-modify-write of partial blocks takes this exclusively, every other write shared,
    /// so that concurrent requests touching different bytes of one block never lose data.
    rmw: RwLock<()>,
    generation: u64,
    connections: AtomicUsize,
    cancel: watch::Sender<bool>,
}

impl Export {
    fn info(&self) -> ExportInfo {
        let dev = self.desc.device();
        let bl = dev.block_len();
        ExportInfo::new(
            dev.num_blocks() * bl as u64,
            proto::transmission_flags(!self.writable, dev.io_type_supported(IoType::Unmap)),
            bl,
        )
    }
}

type ExportMap = Arc<Mutex<BTreeMap<String, Arc<Export>>>>;

struct Listener {
    listen: String,
    allow_remote: bool,
    task: JoinHandle<()>,
    unix_path: Option<BoundPath>,
}

/// Counts live connection tasks so that shutdown can wait for them.
#[derive(Default)]
struct Tracker {
    live: AtomicUsize,
    idle: Notify,
}

struct TrackGuard(Arc<Tracker>);

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tracker {
    fn enter(self: &Arc<Self>) -> TrackGuard {
        self.live.fetch_add(1, Ordering::SeqCst);
        TrackGuard(self.clone())
    }
    async fn wait_idle(&self) {
        loop {
            let n = self.idle.notified();
            if self.live.load(Ordering::SeqCst) == 0 {
                return;
            }
            n.await;
        }
    }
}

/// Whether a device refuses writes: it does not support them, or it is an aio bdev opened
/// read-only (SPDK's aio bdev reports write support even then; the writes fail).
fn read_only_device(dev: &dyn bdev_core::BlockDevice) -> bool {
    !dev.io_type_supported(IoType::Write)
        || dev.driver_specific()["aio"]["readonly"] == Value::Bool(true)
}

/// The NBD server.
pub struct NbdServer {
    registry: Registry,
    exports: ExportMap,
    listener: Mutex<Option<Listener>>,
    generation: AtomicU64,
    stop: watch::Sender<bool>,
    tracker: Arc<Tracker>,
    limits: Limits,
    budget: Arc<MemBudget>,
    /// The target's reactors (see `set_reactors`); empty: connections run on the runtime
    /// that accepted them.
    reactors: Mutex<Vec<tokio::runtime::Handle>>,
    /// Round-robin cursor over `reactors`.
    next_reactor: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Lookup<'a>(&'a ExportMap);

impl ExportLookup for Lookup<'_> {
    fn lookup(&self, name: &str) -> Option<(String, ExportInfo)> {
        let map = lock(self.0);
        let e = if name.is_empty() && map.len() == 1 {
            map.values().next()
        } else {
            map.get(name)
        }?;
        Some((e.name.clone(), e.info()))
    }
    fn names(&self) -> Vec<String> {
        lock(self.0).keys().cloned().collect()
    }
}

/// Whether every address `listen` resolves to is a loopback address.
async fn resolve(listen: &str) -> Result<Vec<SocketAddr>, RpcError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(listen)
        .await
        .map_err(|_| RpcError::from_errno(libc::EINVAL))?
        .collect();
    if addrs.is_empty() {
        return Err(RpcError::from_errno(libc::EINVAL));
    }
    Ok(addrs)
}

impl NbdServer {
    /// A server with no listener and no exports, with the default [`Limits`].
    pub fn new(registry: Registry) -> Arc<Self> {
        Self::with_limits(registry, Limits::default())
    }

    /// A server whose connections share `limits.nbd_total_mem` bytes of buffers.
    pub fn with_limits(registry: Registry, limits: Limits) -> Arc<Self> {
        let (stop, _) = watch::channel(false);
        Arc::new(NbdServer {
            registry,
            exports: Arc::new(Mutex::new(BTreeMap::new())),
            listener: Mutex::new(None),
            generation: AtomicU64::new(0),
            stop,
            tracker: Arc::new(Tracker::default()),
            limits,
            budget: MemBudget::new(limits.nbd_total_mem),
            reactors: Mutex::new(Vec::new()),
            next_reactor: AtomicUsize::new(0),
        })
    }

    /// Gives the server the target's reactors: each new connection is assigned to the next
    /// one, round-robin, and its whole session (requests read, submitted, completed and
    /// answered) runs on that reactor's thread.
    pub fn set_reactors(&self, reactors: Vec<tokio::runtime::Handle>) {
        *lock(&self.reactors) = reactors;
    }

    /// The reactor the next connection goes to, if the target has reactors.
    fn pick_reactor(&self) -> Option<tokio::runtime::Handle> {
        let r = lock(&self.reactors);
        if r.is_empty() {
            return None;
        }
        let i = self.next_reactor.fetch_add(1, Ordering::Relaxed) % r.len();
        Some(r[i].clone())
    }

    /// A connection accepted on a Unix socket, handed to its reactor.
    fn accept_unix(self: &Arc<Self>, s: tokio::net::UnixStream) {
        self.to_reactor(s);
    }

    /// A connection accepted on a TCP socket, handed to its reactor.
    fn accept_tcp(self: &Arc<Self>, s: tokio::net::TcpStream) {
        let _ = s.set_nodelay(true);
        self.to_reactor(s);
    }

    /// Serves `s` on the next reactor (re-registered with that reactor's own event loop), or
    /// here when the server has no reactors.
    fn to_reactor<S: ReactorStream>(self: &Arc<Self>, s: S) {
        let Some(h) = self.pick_reactor() else {
            return self.spawn_conn(s);
        };
        match s.into_std() {
            Ok(std) => {
                let me = self.clone();
                h.spawn(async move {
                    match S::from_std(std) {
                        Ok(s) => me.spawn_conn(s),
                        Err(e) => tracing::warn!("nbd: connection to its reactor: {e}"),
                    }
                });
            }
            Err(e) => tracing::warn!("nbd: connection to its reactor: {e}"),
        }
    }

    /// The server-wide buffer budget (its `used()` and `peak()` show what connections hold).
    pub fn budget(&self) -> &Arc<MemBudget> {
        &self.budget
    }

    /// Starts listening on `unix:PATH` or `HOST:PORT`. A non-loopback address is refused
    /// (EPERM) unless `allow_remote`.
    pub async fn start(self: &Arc<Self>, listen: &str, allow_remote: bool) -> Result<(), RpcError> {
        if lock(&self.listener).is_some() {
            return Err(RpcError::from_errno(libc::EEXIST));
        }
        let _ = self.stop.send(false);
        let me = self.clone();
        let (task, unix_path) = if let Some(path) = listen.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            // Only a stale socket is replaced; anything else at the path is left alone.
            let (l, bound) =
                sockpath::bind(&path).map_err(|e| RpcError::new(-e.errno(), e.to_string()))?;
            let task = tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => me.accept_unix(s),
                        Err(e) => {
                            tracing::warn!("nbd accept: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    }
                }
            });
            (task, bound)
        } else {
            let addrs = resolve(listen).await?;
            if !allow_remote && addrs.iter().any(|a| !a.ip().is_loopback()) {
                return Err(RpcError::from_errno(libc::EPERM));
            }
            let l = tokio::net::TcpListener::bind(&addrs[..])
                .await
                .map_err(|e| RpcError::from_errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
            let task = tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => me.accept_tcp(s),
                        Err(e) => {
                            tracing::warn!("nbd accept: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    }
                }
            });
            (task, None)
        };
        *lock(&self.listener) = Some(Listener {
            listen: listen.to_string(),
            allow_remote,
            task,
            unix_path,
        });
        Ok(())
    }

    /// Stops the listener and ends every connection (exports stay).
    pub async fn stop(&self) -> Result<(), RpcError> {
        let l = lock(&self.listener).take();
        let Some(l) = l else {
            return Err(RpcError::from_errno(libc::ENODEV));
        };
        l.task.abort();
        if let Some(p) = &l.unix_path {
            p.remove();
        }
        let _ = self.stop.send(true);
        self.tracker.wait_idle().await;
        Ok(())
    }

    /// Shutdown: stops the listener, removes every export and waits for the connections.
    pub async fn stop_all(&self) {
        let _ = self.stop().await;
        let all: Vec<Arc<Export>> = std::mem::take(&mut *lock(&self.exports))
            .into_values()
            .collect();
        for e in &all {
            let _ = e.cancel.send(true);
        }
        drop(all);
        let _ = self.stop.send(true);
        self.tracker.wait_idle().await;
    }

    /// Adds an export of `bdev_name` under `name` (default: the bdev name). A bdev that does
    /// not support writes is exported read-only.
    pub fn add_export(
        &self,
        bdev_name: &str,
        name: Option<&str>,
        writable: bool,
    ) -> Result<String, RpcError> {
        let name = name.unwrap_or(bdev_name).to_string();
        if name.is_empty() {
            return Err(RpcError::from_errno(libc::EINVAL));
        }
        if lock(&self.exports).contains_key(&name) {
            return Err(RpcError::from_errno(libc::EEXIST));
        }
        let dev = self
            .registry
            .get(bdev_name)
            .ok_or_else(|| RpcError::from_errno(libc::ENODEV))?;
        let writable = writable && !read_only_device(dev.as_ref());
        let mut desc = self
            .registry
            .open(bdev_name, writable)
            .map_err(|e| RpcError::from_errno(e.errno()))?;
        let events = desc.take_events();
        let (cancel, mut cancel_rx) = watch::channel(false);
        let generation = self.generation.fetch_add(1, Ordering::SeqCst);
        let export = Arc::new(Export {
            name: name.clone(),
            bdev_name: bdev_name.to_string(),
            writable,
            desc: Arc::new(desc),
            rmw: RwLock::new(()),
            generation,
            connections: AtomicUsize::new(0),
            cancel,
        });
        {
            let mut map = lock(&self.exports);
            if map.contains_key(&name) {
                return Err(RpcError::from_errno(libc::EEXIST));
            }
            map.insert(name.clone(), export);
        }
        if let Some(mut events) = events {
            let map = self.exports.clone();
            let ename = name.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        ev = events.next() => match ev {
                            Some(BdevEvent::Remove) | None => {
                                let mut m = lock(&map);
                                if m.get(&ename).is_some_and(|e| e.generation == generation) {
                                    if let Some(e) = m.remove(&ename) {
                                        tracing::info!("nbd export {ename}: bdev removed");
                                        let _ = e.cancel.send(true);
                                    }
                                }
                                return;
                            }
                            Some(BdevEvent::Resize { .. }) => {}
                        },
                        _ = cancel_rx.changed() => return,
                    }
                }
            });
        }
        Ok(name)
    }

    /// Removes an export and ends its connections.
    pub fn remove_export(&self, name: &str) -> Result<(), RpcError> {
        let e = lock(&self.exports)
            .remove(name)
            .ok_or_else(|| RpcError::from_errno(libc::ENODEV))?;
        let _ = e.cancel.send(true);
        Ok(())
    }

    /// The `listen` address of the running listener (`unix:PATH` or `HOST:PORT`).
    pub fn listen_address(&self) -> Option<String> {
        lock(&self.listener).as_ref().map(|l| l.listen.clone())
    }

    /// (export name, bdev name) of every export.
    pub fn export_names(&self) -> Vec<(String, String)> {
        lock(&self.exports)
            .values()
            .map(|e| (e.name.clone(), e.bdev_name.clone()))
            .collect()
    }

    /// `nbd_get_exports`.
    pub fn list(&self) -> Value {
        let map = lock(&self.exports);
        Value::Array(
            map.values()
                .map(|e| {
                    json!({
                        "name": e.name,
                        "bdev_name": e.bdev_name,
                        "writable": e.writable,
                        "connections": e.connections.load(Ordering::SeqCst),
                    })
                })
                .collect(),
        )
    }

    /// The nbd subsystem's config: `nbd_server_start` (if listening), then one
    /// `nbd_export_add` per export.
    pub fn config(&self) -> Vec<Value> {
        let mut out = Vec::new();
        if let Some(l) = lock(&self.listener).as_ref() {
            let mut p = json!({"listen": l.listen});
            if l.allow_remote {
                p["allow_remote"] = json!(true);
            }
            out.push(json!({"method": "nbd_server_start", "params": p}));
        }
        for e in lock(&self.exports).values() {
            out.push(json!({"method": "nbd_export_add", "params": {
                "bdev_name": e.bdev_name, "name": e.name, "writable": e.writable}}));
        }
        out
    }

    /// Runs a connection's session on the current runtime (the reactor's, when called from
    /// `accept_unix`/`accept_tcp`).
    fn spawn_conn<S>(self: &Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let guard = self.tracker.enter();
        let exports = self.exports.clone();
        let stop = self.stop.subscribe();
        let mem = ConnMem {
            conn: MemBudget::new(self.limits.nbd_conn_mem),
            global: self.budget.clone(),
            stall: self.limits.stall_timeout,
        };
        tokio::spawn(async move {
            if let Err(e) = serve(stream, exports, mem, stop).await {
                tracing::debug!("nbd connection: {e}");
            }
            drop(guard);
        });
    }
}

fn proto_err(e: proto::ProtoError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// Decrements the export's connection count when the transmission phase ends.
struct ConnCount(Arc<Export>);

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Longest a client may take over its handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The newstyle fixed handshake: options until one selects an export (returned) or the client
/// aborts (`None`).
async fn handshake<R, W>(
    rd: &mut R,
    wr: &mut W,
    exports: &ExportMap,
) -> std::io::Result<Option<Arc<Export>>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&proto::greeting()).await?;
    let mut flags = [0u8; 4];
    rd.read_exact(&mut flags).await?;
    let no_zeroes = proto::parse_client_flags(&flags).map_err(proto_err)?;
    loop {
        let mut hdr = [0u8; 16];
        rd.read_exact(&mut hdr).await?;
        let h = proto::parse_option_header(&hdr).map_err(proto_err)?;
        let mut data = vec![0u8; h.len as usize];
        rd.read_exact(&mut data).await?;
        let out = proto::handle_option(h.option, &data, no_zeroes, &Lookup(exports));
        wr.write_all(&out.reply).await?;
        match out.next {
            Next::Continue => {}
            Next::Close => {
                wr.shutdown().await.ok();
                return Ok(None);
            }
            Next::Transmit(name) => return Ok(lock(exports).get(&name).cloned()),
        }
    }
}

async fn serve<S>(
    stream: S,
    exports: ExportMap,
    mem: ConnMem,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(stream);
    // Small: it only serves the handshake; larger reads bypass it.
    let mut rd = tokio::io::BufReader::with_capacity(4096, rd);
    // The handshake gives up on shutdown and on clients that stall for a minute.
    let export = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut rd, &mut wr, &exports)) => match r {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        },
        _ = wait_true(&mut stop) => return Ok(()),
    };
    let Some(export) = export else {
        return Ok(());
    };
    export.connections.fetch_add(1, Ordering::SeqCst);
    let _count = ConnCount(export.clone());
    let mut cancel = export.cancel.subscribe();
    let (mut cancel2, mut stop2) = (export.cancel.subscribe(), stop.clone());
    let t = transmission(&mut rd, wr, &export, &mem, &mut cancel, &mut stop);
    // A client that stops reading its replies must not hold the export (and so a bdev
    // removal) forever: once the connection is told to close, it gets a grace period.
    let grace = async {
        tokio::select! {
            _ = wait_true(&mut cancel2) => {},
            _ = wait_true(&mut stop2) => {},
        }
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    tokio::select! {
        r = t => r,
        _ = grace => {
            tracing::warn!("nbd export {}: connection did not drain in time; dropped", export.name);
            Ok(())
        }
    }
}

/// How long a closing connection may take to finish its requests and send the replies.
#[cfg(not(test))]
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
#[cfg(test)]
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

/// Fixed memory charged per connection for its send side (replies are written from their
/// own buffers, see `put_all`; the charge keeps the per-connection budget as it was).
const WBUF_LEN: usize = 256 << 10;

/// The memory a connection may use: its own budget, the server-wide one, and the stall
/// timeout.
#[derive(Clone)]
struct ConnMem {
    conn: Arc<MemBudget>,
    global: Arc<MemBudget>,
    stall: Duration,
}

/// Bytes charged to both budgets until a request's reply was written.
type Charge = (Held, Held);

impl ConnMem {
    /// A request's charge, bounded so that it always fits an empty budget.
    fn bound(&self, n: usize) -> usize {
        n.min(self.conn.limit()).min(self.global.limit())
    }
    fn try_charge(&self, n: usize) -> Option<Charge> {
        let n = self.bound(n);
        let a = Held::try_take(&self.conn, n)?;
        let b = Held::try_take(&self.global, n)?;
        Some((a, b))
    }
    fn charge(&self, n: usize) -> futures::future::BoxFuture<'static, Charge> {
        let (conn, global, n) = (self.conn.clone(), self.global.clone(), self.bound(n));
        Box::pin(async move {
            // Dropped half-way, the first part is given back with `a`.
            let a = Held::take(&conn, n).await;
            let b = Held::take(&global, n).await;
            (a, b)
        })
    }
}

/// The memory a request pins until its reply is written: the payload of a write, the reply
/// buffer of a read (block-aligned), a bounded scratch buffer for write zeroes.
fn request_bytes(req: &Request, bl: u64) -> usize {
    let (_, count, _) = span(req.offset, req.len as u64, bl);
    let bytes = count.saturating_mul(bl);
    match req.cmd {
        proto::CMD_READ | proto::CMD_WRITE => bytes as usize,
        proto::CMD_WRITE_ZEROES => bytes.min((1 << 20) + 2 * bl) as usize,
        _ => 0,
    }
}

/// A request whose payload is still arriving.
struct Pending {
    req: Request,
    buf: IoBuf,
    filled: usize,
    charge: Charge,
}

type ReplyFuture = futures::future::BoxFuture<'static, Reply>;

/// Starts one checked request; the future yields its reply, which keeps the charge of a
/// read until it was written.
fn start_request(
    export: &Arc<Export>,
    req: Request,
    payload: Option<IoBuf>,
    charge: Charge,
) -> ReplyFuture {
    let exp = export.clone();
    Box::pin(async move {
        match execute(&exp.desc, &exp.rmw, &req, payload).await {
            Ok(None) => Reply::Simple(proto::simple_reply(0, req.cookie)),
            Ok(Some((buf, skew, len))) => {
                Reply::Data(proto::simple_reply(0, req.cookie), buf, skew, len, charge)
            }
            Err(errno) => {
                Reply::Simple(proto::simple_reply(proto::errno_to_nbd(errno), req.cookie))
            }
        }
    })
}

/// Starts a checked and charged request: at once, or once its payload arrived (the part
/// already received is taken from `rbuf[*pos..]`).
fn begin(
    export: &Arc<Export>,
    req: Request,
    charge: Charge,
    rbuf: &[u8],
    pos: &mut usize,
    pending: &mut Option<Pending>,
    inflight: &mut FuturesUnordered<ReplyFuture>,
) {
    if !proto::has_payload(&req) {
        inflight.push(start_request(export, req, None, charge));
        return;
    }
    let len = req.len as usize;
    let mut buf = pooled_buf(len, export.desc.device().buf_align());
    let have = (rbuf.len() - *pos).min(len);
    buf[..have].copy_from_slice(&rbuf[*pos..*pos + have]);
    *pos += have;
    if have == len {
        inflight.push(start_request(export, req, Some(buf), charge));
    } else {
        *pending = Some(Pending {
            req,
            buf,
            filled: have,
            charge,
        });
    }
}

/// The transmission phase. One task reads requests, runs up to [`MAX_INFLIGHT`] of them
/// concurrently (a `FuturesUnordered`, no task per request) and writes each reply as soon as
/// it is ready, batching the replies that are ready together into one flush. When the client
/// disconnects, the export goes away or the server stops, no new request is read; the ones in
/// flight complete and their replies are sent before the socket is closed.
///
/// Memory: every payload and read reply is charged to the connection's and the server's
/// budget before it is allocated and given back when the reply was written. Without budget
/// the connection stops reading requests (its replies still go out); a client that reads
/// none of its replies, or announces a payload and does not send it, for the stall timeout
/// is dropped. A write over [`proto::MAX_PAYLOAD`] is answered `EOVERFLOW` and its payload
/// read and thrown away.
async fn transmission<R, W>(
    rd: &mut R,
    wr: W,
    export: &Arc<Export>,
    mem: &ConnMem,
    cancel: &mut watch::Receiver<bool>,
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // The fixed buffers count against the server's budget too.
    let Ok(_fixed) =
        tokio::time::timeout(mem.stall, Held::take(&mem.global, RBUF_LEN + WBUF_LEN)).await
    else {
        tracing::warn!(
            "nbd export {}: no memory for a new connection; closed",
            export.name
        );
        return Ok(());
    };
    // Replies are gathered into `writev` calls straight from their buffers (`put_all`), so
    // no buffered writer (whose buffer they would be copied into).
    let mut w = StallGuard::new(wr, mem.stall);
    let mut ready: Vec<Reply> = Vec::with_capacity(MAX_INFLIGHT);
    let mut inflight: FuturesUnordered<ReplyFuture> = FuturesUnordered::new();
    // Received bytes not yet parsed are rbuf[pos..].
    let mut rbuf: Vec<u8> = Vec::with_capacity(RBUF_LEN);
    let mut pos = 0usize;
    let mut pending: Option<Pending> = None;
    // A checked request waiting for budget.
    let mut waiting: Option<(Request, futures::future::BoxFuture<'static, Charge>)> = None;
    // Payload bytes of a refused write still to be skipped.
    let mut discard: u64 = 0;
    let mut last_payload_byte = tokio::time::Instant::now();
    let bl = export.desc.device().block_len() as u64;
    let mut closing = *cancel.borrow() || *stop.borrow();
    loop {
        // Take every complete request out of the receive buffer.
        while !closing && pending.is_none() && waiting.is_none() && inflight.len() < MAX_INFLIGHT {
            if discard > 0 {
                let k = (discard as usize).min(rbuf.len() - pos);
                pos += k;
                discard -= k as u64;
                if discard > 0 {
                    break;
                }
            }
            if rbuf.len() - pos < proto::REQUEST_LEN {
                break;
            }
            let mut hdr = [0u8; proto::REQUEST_LEN];
            hdr.copy_from_slice(&rbuf[pos..pos + proto::REQUEST_LEN]);
            let Ok(req) = proto::parse_request(&hdr) else {
                closing = true;
                break;
            };
            if req.cmd == proto::CMD_DISC {
                closing = true;
                break;
            }
            pos += proto::REQUEST_LEN;
            let dev = export.desc.device();
            let size = dev.num_blocks() * dev.block_len() as u64;
            if let Err(e) = proto::check_request(&req, size, !export.writable) {
                // Refused: the payload of a write is skipped, not buffered.
                if proto::has_payload(&req) {
                    discard = req.len as u64;
                    last_payload_byte = tokio::time::Instant::now();
                }
                Reply::Simple(proto::simple_reply(e, req.cookie))
                    .put(&mut w)
                    .await?;
                continue;
            }
            let n = request_bytes(&req, bl);
            match mem.try_charge(n) {
                Some(c) => {
                    begin(export, req, c, &rbuf, &mut pos, &mut pending, &mut inflight);
                    if pending.is_some() {
                        last_payload_byte = tokio::time::Instant::now();
                    }
                }
                None => waiting = Some((req, mem.charge(n))),
            }
        }
        // Keep the unparsed tail at the front, with room to read into.
        if pos == rbuf.len() {
            rbuf.clear();
            pos = 0;
        } else if pos > 0 && rbuf.capacity() - rbuf.len() < RBUF_LEN / 4 {
            rbuf.drain(..pos);
            pos = 0;
        }
        if rbuf.capacity() - rbuf.len() < RBUF_LEN / 4 {
            rbuf.reserve(RBUF_LEN / 4);
        }
        if closing && inflight.is_empty() {
            break;
        }
        let want_read = !closing && waiting.is_none() && inflight.len() < MAX_INFLIGHT;
        let payload_due = pending.is_some() || discard > 0;
        tokio::select! {
            biased;
            Some(reply) = inflight.next(), if !inflight.is_empty() => {
                ready.push(reply);
                while let Some(Some(reply)) = inflight.next().now_or_never() {
                    ready.push(reply);
                }
                put_all(&mut w, &mut ready).await?;
                // Nothing was read while the replies went out: that time is ours, not a
                // stall of the client's payload.
                if pending.is_some() || discard > 0 {
                    last_payload_byte = tokio::time::Instant::now();
                }
            }
            c = async { match waiting.as_mut() { Some((_, f)) => f.await, None => futures::future::pending().await } }, if waiting.is_some() && !closing => {
                if let Some((req, _)) = waiting.take() {
                    begin(export, req, c, &rbuf, &mut pos, &mut pending, &mut inflight);
                    last_payload_byte = tokio::time::Instant::now();
                }
            }
            n = read_some(rd, &mut pending, &mut rbuf), if want_read => match n {
                Ok(0) | Err(_) => closing = true,
                Ok(n) => {
                    last_payload_byte = tokio::time::Instant::now();
                    if let Some(p) = pending.as_mut() {
                        p.filled += n;
                        if p.filled == p.buf.len() {
                            if let Some(p) = pending.take() {
                                inflight.push(start_request(export, p.req, Some(p.buf), p.charge));
                            }
                        }
                    }
                }
            },
            _ = tokio::time::sleep_until(last_payload_byte + mem.stall), if payload_due && !closing => {
                tracing::warn!("nbd export {}: client sent no payload byte for {:?}; dropped", export.name, mem.stall);
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "payload stalled"));
            }
            _ = wait_true(cancel), if !closing => closing = true,
            _ = wait_true(stop), if !closing => closing = true,
        }
    }
    w.flush().await?;
    let _ = w.shutdown().await;
    Ok(())
}

/// Reads into the pending payload if there is one (no copy), else appends to `rbuf`.
async fn read_some<R: AsyncRead + Unpin>(
    rd: &mut R,
    pending: &mut Option<Pending>,
    rbuf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    match pending {
        Some(p) => {
            let filled = p.filled;
            rd.read(&mut p.buf[filled..]).await
        }
        None => rd.read_buf(rbuf).await,
    }
}

/// Waits until the watched flag is true (forever if its sender is gone).
async fn wait_true(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            futures::future::pending::<()>().await;
        }
    }
}

/// A reply on its way to the socket.
enum Reply {
    /// A reply header alone.
    Simple([u8; 16]),
    /// A read reply: header, then `len` bytes of the buffer from `skew`; the charge is
    /// given back once written.
    Data([u8; 16], IoBuf, usize, usize, Charge),
}

impl Reply {
    /// Writes this reply alone (see [`put_all`]).
    async fn put<W: AsyncWrite + Unpin>(self, w: &mut W) -> std::io::Result<()> {
        put_all(w, &mut vec![self]).await
    }

    /// The reply's bytes: its header, and for a read reply the data, straight from the
    /// buffer the device read into.
    fn parts(&self) -> [&[u8]; 2] {
        match self {
            Reply::Simple(h) => [h, &[]],
            Reply::Data(h, buf, skew, len, _) => [h, &buf[*skew..*skew + *len]],
        }
    }
}

/// Iovecs of one `writev` of replies (Linux's `IOV_MAX` is 1024).
const REPLY_IOVS: usize = 64;

/// Writes `replies` in order and empties it, giving their buffers back to the pool: every
/// header and read buffer goes to the socket as is, gathered in `writev` calls of up to
/// [`REPLY_IOVS`] pieces (one call for a whole batch of 4 KiB read replies at depth 32), so
/// no reply byte is copied on its way out.
async fn put_all<W: AsyncWrite + Unpin>(
    w: &mut W,
    replies: &mut Vec<Reply>,
) -> std::io::Result<()> {
    // Bytes of the batch already written.
    let mut done = 0usize;
    loop {
        let mut iov = [std::io::IoSlice::new(&[]); REPLY_IOVS];
        let mut n = 0;
        let mut skip = done;
        'fill: for r in replies.iter() {
            for part in r.parts() {
                if part.is_empty() {
                    continue;
                }
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                iov[n] = std::io::IoSlice::new(&part[skip..]);
                skip = 0;
                n += 1;
                if n == REPLY_IOVS {
                    break 'fill;
                }
            }
        }
        if n == 0 {
            break;
        }
        let k = w.write_vectored(&iov[..n]).await?;
        if k == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        done += k;
    }
    for r in replies.drain(..) {
        if let Reply::Data(_, buf, _, _, charge) = r {
            recycle(buf);
            // The reply's memory is back with the connection and the server.
            drop(charge);
        }
    }
    Ok(())
}

/// Largest buffer the per-reactor pool keeps (larger ones are allocated per request).
const POOL_MAX_LEN: usize = 64 << 10;
/// Buffers the pool of one reactor keeps (at most 8 MiB, outside the connections' budgets).
const POOL_KEEP: usize = 128;

thread_local! {
    /// This reactor's free I/O buffers: reused for write payloads and read replies, so a
    /// connection in steady state allocates no data buffer per request.
    static BUF_POOL: std::cell::RefCell<Vec<IoBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of `len` bytes aligned to `align`, from this reactor's pool when one fits. Its
/// bytes are not cleared: every use fills it completely (a payload received in full, a
/// device read of the whole buffer) before anything reads it.
fn pooled_buf(len: usize, align: usize) -> IoBuf {
    let align = align.max(1).next_power_of_two();
    if len > 0 && len <= POOL_MAX_LEN {
        let hit = BUF_POOL.with(|p| {
            let mut p = p.borrow_mut();
            let i = p
                .iter()
                .rposition(|b| b.len() == len && b.align() >= align)?;
            Some(p.swap_remove(i))
        });
        if let Some(b) = hit {
            return b;
        }
    }
    IoBuf::new(len, align)
}

/// Gives a buffer back to this reactor's pool.
fn recycle(buf: IoBuf) {
    if buf.is_empty() || buf.len() > POOL_MAX_LEN {
        return;
    }
    BUF_POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_KEEP {
            p.push(buf);
        }
    });
}

/// Block-aligned span covering a byte range: (first block, block count, byte skew in the
/// first block).
fn span(offset: u64, len: u64, bl: u64) -> (u64, u64, usize) {
    let first = offset / bl;
    let end = (offset + len).div_ceil(bl);
    (first, end - first, (offset - first * bl) as usize)
}

/// Reads a byte range; returns the block-aligned buffer, the skew of the range in it and
/// its length.
async fn read_bytes(
    desc: &Descriptor,
    offset: u64,
    len: u64,
) -> Result<(IoBuf, usize, usize), i32> {
    let dev = desc.device();
    let bl = dev.block_len() as u64;
    let (first, count, skew) = span(offset, len, bl);
    let buf = pooled_buf((count * bl) as usize, dev.buf_align());
    let buf = desc.read_io(first, buf).await.map_err(|e| e.errno())?;
    Ok((buf, skew, len as usize))
}

/// Writes bytes at any offset: aligned spans go straight down, unaligned edges are
/// read-modify-write.
async fn write_bytes(
    desc: &Descriptor,
    rmw: &RwLock<()>,
    offset: u64,
    data: IoBuf,
) -> Result<(), i32> {
    let dev = desc.device();
    let bl = dev.block_len() as u64;
    let len = data.len() as u64;
    let (first, count, skew) = span(offset, len, bl);
    let whole = skew == 0 && len % bl == 0;
    let _guard = if whole {
        Either::Left(rmw.read().await)
    } else {
        Either::Right(rmw.write().await)
    };
    let buf = if whole && data.align() >= dev.buf_align() {
        data
    } else if whole {
        IoBuf::from_slice(&data, dev.buf_align())
    } else {
        let mut buf = IoBuf::new((count * bl) as usize, dev.buf_align());
        buf = desc.read(first, buf).await.map_err(|e| e.errno())?;
        buf[skew..skew + data.len()].copy_from_slice(&data);
        buf
    };
    recycle(desc.write_io(first, buf).await.map_err(|e| e.errno())?);
    Ok(())
}

async fn zero_bytes(desc: &Descriptor, rmw: &RwLock<()>, offset: u64, len: u64) -> Result<(), i32> {
    let dev = desc.device();
    let bl = dev.block_len() as u64;
    let a_start = offset.div_ceil(bl) * bl;
    let a_end = ((offset + len) / bl) * bl;
    if a_start >= a_end {
        return write_bytes(desc, rmw, offset, IoBuf::new(len as usize, 1)).await;
    }
    if a_start > offset {
        write_bytes(
            desc,
            rmw,
            offset,
            IoBuf::new((a_start - offset) as usize, 1),
        )
        .await?;
    }
    let guard = rmw.read().await;
    if dev.io_type_supported(IoType::WriteZeroes) {
        desc.write_zeroes(a_start / bl, (a_end - a_start) / bl)
            .await
            .map_err(|e| e.errno())?;
    } else {
        const CHUNK: u64 = 1 << 20;
        let mut pos = a_start;
        while pos < a_end {
            let n = CHUNK.min(a_end - pos);
            let buf = IoBuf::new(n as usize, dev.buf_align());
            desc.write(pos / bl, buf).await.map_err(|e| e.errno())?;
            pos += n;
        }
    }
    drop(guard);
    if a_end < offset + len {
        write_bytes(
            desc,
            rmw,
            a_end,
            IoBuf::new((offset + len - a_end) as usize, 1),
        )
        .await?;
    }
    Ok(())
}

/// Runs one checked request; `Ok(Some(data))` for reads.
async fn execute(
    desc: &Descriptor,
    rmw: &RwLock<()>,
    req: &Request,
    payload: Option<IoBuf>,
) -> Result<Option<(IoBuf, usize, usize)>, i32> {
    let dev = desc.device();
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    match req.cmd {
        proto::CMD_READ => {
            if req.len == 0 {
                return Ok(Some((IoBuf::new(0, 1), 0, 0)));
            }
            read_bytes(desc, req.offset, req.len as u64).await.map(Some)
        }
        proto::CMD_WRITE => {
            if let Some(p) = payload.filter(|p| !p.is_empty()) {
                write_bytes(desc, rmw, req.offset, p).await?;
            }
            if fua && dev.io_type_supported(IoType::Flush) {
                desc.flush().await.map_err(|e| e.errno())?;
            }
            Ok(None)
        }
        proto::CMD_WRITE_ZEROES => {
            if req.len > 0 {
                zero_bytes(desc, rmw, req.offset, req.len as u64).await?;
            }
            if fua && dev.io_type_supported(IoType::Flush) {
                desc.flush().await.map_err(|e| e.errno())?;
            }
            Ok(None)
        }
        proto::CMD_TRIM => {
            // Trim is advisory: only whole blocks are unmapped.
            let bl = dev.block_len() as u64;
            let a_start = req.offset.div_ceil(bl);
            let a_end = (req.offset + req.len as u64) / bl;
            if a_end > a_start && dev.io_type_supported(IoType::Unmap) {
                let _guard = rmw.read().await;
                desc.unmap(a_start, a_end - a_start)
                    .await
                    .map_err(|e| e.errno())?;
            }
            Ok(None)
        }
        proto::CMD_FLUSH => {
            if dev.io_type_supported(IoType::Flush) {
                desc.flush().await.map_err(|e| e.errno())?;
            }
            Ok(None)
        }
        _ => Err(libc::EINVAL),
    }
}

/// A tokio stream that can leave its event loop and join another's (a connection moving to
/// its reactor).
trait ReactorStream: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// The std stream, detached from this event loop.
    type Std: Send + 'static;
    fn into_std(self) -> std::io::Result<Self::Std>;
    fn from_std(s: Self::Std) -> std::io::Result<Self>;
}

impl ReactorStream for tokio::net::UnixStream {
    type Std = std::os::unix::net::UnixStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        tokio::net::UnixStream::into_std(self)
    }
    fn from_std(s: Self::Std) -> std::io::Result<Self> {
        tokio::net::UnixStream::from_std(s)
    }
}

impl ReactorStream for tokio::net::TcpStream {
    type Std = std::net::TcpStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        tokio::net::TcpStream::into_std(self)
    }
    fn from_std(s: Self::Std) -> std::io::Result<Self> {
        tokio::net::TcpStream::from_std(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdev_core::backend::malloc::MallocBdev;
    use std::collections::HashMap;

    async fn client_go<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, export: &str) -> (u64, u16) {
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.unwrap();
        assert_eq!(g, proto::greeting());
        s.write_all(&3u32.to_be_bytes()).await.unwrap();
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let mut o = proto::IHAVEOPT.to_be_bytes().to_vec();
        o.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        o.extend_from_slice(&(d.len() as u32).to_be_bytes());
        o.extend_from_slice(&d);
        s.write_all(&o).await.unwrap();
        let (mut size, mut flags) = (0, 0);
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).await.unwrap();
            let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut data = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            s.read_exact(&mut data).await.unwrap();
            if ty == proto::REP_INFO && data[..2] == [0, 0] {
                size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                flags = u16::from_be_bytes([data[10], data[11]]);
            }
            if ty == proto::REP_ACK {
                return (size, flags);
            }
            assert_eq!(ty & proto::REP_FLAG_ERROR, 0);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_requests_unaligned_io_and_removal() {
        let registry = Registry::new();
        let dev = MallocBdev::create("M", 2048, 512, None).unwrap();
        registry.register(dev).await.unwrap();
        let server = NbdServer::new(registry.clone());
        assert_eq!(server.add_export("M", Some("m"), true).unwrap(), "m");
        let (mut c, s) = tokio::io::duplex(1 << 20);
        server.spawn_conn(s);
        let (size, flags) = client_go(&mut c, "m").await;
        assert_eq!(size, 1 << 20);
        assert_eq!(flags & proto::TFLAG_READ_ONLY, 0);

        // 64 writes of 1000 bytes at unaligned offsets, all sent before any reply is read.
        let mut msg = Vec::new();
        for i in 0..64u64 {
            let r = proto::Request {
                flags: 0,
                cmd: proto::CMD_WRITE,
                cookie: i,
                offset: i * 1000 + 7,
                len: 1000,
            };
            msg.extend_from_slice(&proto::encode_request(&r));
            msg.extend(std::iter::repeat_n(i as u8 + 1, 1000));
        }
        c.write_all(&msg).await.unwrap();
        let mut seen = HashMap::new();
        for _ in 0..64 {
            let mut h = [0u8; 16];
            c.read_exact(&mut h).await.unwrap();
            let cookie = u64::from_be_bytes(h[8..].try_into().unwrap());
            seen.insert(cookie, u32::from_be_bytes(h[4..8].try_into().unwrap()));
        }
        assert_eq!(seen.len(), 64);
        assert!(seen.values().all(|&e| e == 0));
        // Write zeroes over part of the range, then read everything back in one request.
        let z = proto::Request {
            flags: 0,
            cmd: proto::CMD_WRITE_ZEROES,
            cookie: 100,
            offset: 1500,
            len: 600,
        };
        c.write_all(&proto::encode_request(&z)).await.unwrap();
        let mut h = [0u8; 16];
        c.read_exact(&mut h).await.unwrap();
        assert_eq!(h, proto::simple_reply(0, 100));
        let rd = proto::Request {
            flags: 0,
            cmd: proto::CMD_READ,
            cookie: 101,
            offset: 0,
            len: 65_000,
        };
        c.write_all(&proto::encode_request(&rd)).await.unwrap();
        c.read_exact(&mut h).await.unwrap();
        assert_eq!(h, proto::simple_reply(0, 101));
        let mut data = vec![0u8; 65_000];
        c.read_exact(&mut data).await.unwrap();
        for (off, &b) in data.iter().enumerate() {
            let expect = if !(7..64 * 1000 + 7).contains(&off) || (1500..2100).contains(&off) {
                0
            } else {
                ((off - 7) / 1000) as u8 + 1
            };
            assert_eq!(b, expect, "byte {off}");
        }
        assert_eq!(server.list()[0]["connections"], serde_json::json!(1));
        // Hot removal: the unregister completes and the connection is closed.
        registry.unregister("M").await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).await.unwrap(), 0);
        assert_eq!(server.list(), serde_json::json!([]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn payloads_split_across_reads_and_refused_requests() {
        let registry = Registry::new();
        let dev = MallocBdev::create("M", 1024, 4096, None).unwrap();
        registry.register(dev).await.unwrap();
        let server = NbdServer::new(registry.clone());
        server.add_export("M", None, true).unwrap();
        // A 4 KiB pipe: every large payload arrives in many pieces.
        let (mut c, s) = tokio::io::duplex(4096);
        server.spawn_conn(s);
        let (size, _) = client_go(&mut c, "").await;
        assert_eq!(size, 4 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let w = proto::Request {
            flags: proto::CMD_FLAG_FUA,
            cmd: proto::CMD_WRITE,
            cookie: 1,
            offset: 8192,
            len: data.len() as u32,
        };
        let bad = proto::Request {
            flags: 0,
            cmd: proto::CMD_READ,
            cookie: 2,
            offset: 4 << 20,
            len: 4096,
        };
        let r = proto::Request {
            flags: 0,
            cmd: proto::CMD_READ,
            cookie: 3,
            offset: 8192,
            len: data.len() as u32,
        };
        let mut msg = proto::encode_request(&w).to_vec();
        msg.extend_from_slice(&data);
        msg.extend_from_slice(&proto::encode_request(&bad));
        let (mut rd, mut wr) = tokio::io::split(c);
        let writer = tokio::spawn(async move {
            wr.write_all(&msg).await.unwrap();
            // The read goes out only after the write's reply came back (below).
            wr
        });
        let mut h = [0u8; 16];
        rd.read_exact(&mut h).await.unwrap();
        assert_eq!(h, proto::simple_reply(0, 1));
        rd.read_exact(&mut h).await.unwrap();
        assert_eq!(h, proto::simple_reply(proto::EINVAL, 2));
        let mut wr = writer.await.unwrap();
        wr.write_all(&proto::encode_request(&r)).await.unwrap();
        rd.read_exact(&mut h).await.unwrap();
        assert_eq!(h, proto::simple_reply(0, 3));
        let mut back = vec![0u8; data.len()];
        rd.read_exact(&mut back).await.unwrap();
        assert_eq!(back, data);
        // Disconnect: the server closes its side.
        let d = proto::Request {
            flags: 0,
            cmd: proto::CMD_DISC,
            cookie: 4,
            offset: 0,
            len: 0,
        };
        wr.write_all(&proto::encode_request(&d)).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(rd.read(&mut b).await.unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_reads_cannot_block_removal() {
        let registry = Registry::new();
        let dev = MallocBdev::create("M", 4096, 4096, None).unwrap();
        registry.register(dev).await.unwrap();
        let server = NbdServer::new(registry.clone());
        server.add_export("M", None, true).unwrap();
        let (mut c, s) = tokio::io::duplex(64 << 10);
        server.spawn_conn(s);
        client_go(&mut c, "M").await;
        // 16 MiB of read replies that nobody reads.
        for i in 0..16u64 {
            let r = proto::Request {
                flags: 0,
                cmd: proto::CMD_READ,
                cookie: i,
                offset: i << 20,
                len: 1 << 20,
            };
            c.write_all(&proto::encode_request(&r)).await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let t0 = std::time::Instant::now();
        tokio::time::timeout(std::time::Duration::from_secs(10), registry.unregister("M"))
            .await
            .expect("removal completes")
            .unwrap();
        assert!(t0.elapsed() >= CLOSE_GRACE / 2);
        assert_eq!(server.list(), serde_json::json!([]));
        drop(c);
    }

    /// A malloc device that counts the flushes it receives.
    struct Counting {
        inner: Arc<MallocBdev>,
        flushes: Arc<AtomicUsize>,
    }

    #[async_trait::async_trait]
    impl bdev_core::BlockDevice for Counting {
        fn name(&self) -> &str {
            "C"
        }
        fn product_name(&self) -> &str {
            "counting"
        }
        fn module_name(&self) -> &str {
            "test"
        }
        fn uuid(&self) -> uuid::Uuid {
            self.inner.uuid()
        }
        fn block_len(&self) -> u32 {
            self.inner.block_len()
        }
        fn num_blocks(&self) -> u64 {
            self.inner.num_blocks()
        }
        fn io_type_supported(&self, t: IoType) -> bool {
            self.inner.io_type_supported(t)
        }
        async fn read(&self, o: u64, b: IoBuf) -> bdev_core::Result<IoBuf> {
            self.inner.read(o, b).await
        }
        async fn write(&self, o: u64, b: IoBuf) -> bdev_core::Result<IoBuf> {
            self.inner.write(o, b).await
        }
        async fn flush(&self) -> bdev_core::Result<()> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            self.inner.flush().await
        }
        async fn unmap(&self, o: u64, n: u64) -> bdev_core::Result<()> {
            self.inner.unmap(o, n).await
        }
        async fn write_zeroes(&self, o: u64, n: u64) -> bdev_core::Result<()> {
            self.inner.write_zeroes(o, n).await
        }
    }

    async fn reply<S: AsyncRead + Unpin>(c: &mut S) -> (u32, u64) {
        let mut h = [0u8; 16];
        c.read_exact(&mut h).await.unwrap();
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..].try_into().unwrap()),
        )
    }

    fn req(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        proto::encode_request(&proto::Request {
            flags,
            cmd,
            cookie,
            offset,
            len,
        })
        .to_vec()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fua_writes_and_flushes_reach_the_device() {
        let registry = Registry::new();
        let flushes = Arc::new(AtomicUsize::new(0));
        let dev = Arc::new(Counting {
            inner: MallocBdev::create("M", 1024, 512, None).unwrap(),
            flushes: flushes.clone(),
        });
        registry.register(dev).await.unwrap();
        let server = NbdServer::new(registry.clone());
        server.add_export("C", None, true).unwrap();
        let (mut c, s) = tokio::io::duplex(1 << 20);
        server.spawn_conn(s);
        let (_, flags) = client_go(&mut c, "C").await;
        assert_ne!(flags & proto::TFLAG_SEND_FUA, 0);
        assert_ne!(flags & proto::TFLAG_SEND_FLUSH, 0);
        // A plain write does not flush.
        let mut m = req(proto::CMD_WRITE, 0, 1, 0, 512);
        m.extend([7u8; 512]);
        c.write_all(&m).await.unwrap();
        assert_eq!(reply(&mut c).await, (0, 1));
        assert_eq!(flushes.load(Ordering::SeqCst), 0);
        // A FUA write is flushed before its reply.
        let mut m = req(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 2, 512, 512);
        m.extend([8u8; 512]);
        c.write_all(&m).await.unwrap();
        assert_eq!(reply(&mut c).await, (0, 2));
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
        // FLUSH and FUA write-zeroes too.
        c.write_all(&req(proto::CMD_FLUSH, 0, 3, 0, 0))
            .await
            .unwrap();
        assert_eq!(reply(&mut c).await, (0, 3));
        assert_eq!(flushes.load(Ordering::SeqCst), 2);
        c.write_all(&req(
            proto::CMD_WRITE_ZEROES,
            proto::CMD_FLAG_FUA,
            4,
            0,
            512,
        ))
        .await
        .unwrap();
        assert_eq!(reply(&mut c).await, (0, 4));
        assert_eq!(flushes.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_write_gets_eoverflow_and_the_connection_goes_on() {
        let registry = Registry::new();
        let dev = MallocBdev::create("M", 2048, 512, None).unwrap();
        registry.register(dev).await.unwrap();
        let server = NbdServer::new(registry.clone());
        server.add_export("M", None, true).unwrap();
        let (mut c, s) = tokio::io::duplex(1 << 20);
        server.spawn_conn(s);
        client_go(&mut c, "M").await;
        let (mut rd, mut wr) = tokio::io::split(c);
        let big = proto::MAX_PAYLOAD + 4096;
        let writer = tokio::spawn(async move {
            let mut m = req(proto::CMD_WRITE, 0, 1, 0, big);
            m.extend(std::iter::repeat_n(0xeeu8, big as usize));
            // A valid write follows right behind the refused payload.
            m.extend(req(proto::CMD_WRITE, 0, 2, 0, 512));
            m.extend([5u8; 512]);
            m.extend(req(proto::CMD_READ, 0, 3, 0, 512));
            wr.write_all(&m).await.unwrap();
            wr
        });
        assert_eq!(reply(&mut rd).await, (proto::EOVERFLOW, 1));
        assert_eq!(reply(&mut rd).await, (0, 2));
        assert_eq!(reply(&mut rd).await, (0, 3));
        let mut data = [0u8; 512];
        rd.read_exact(&mut data).await.unwrap();
        assert_eq!(data, [5u8; 512]);
        drop(writer.await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unread_replies_are_bounded_and_the_client_is_dropped() {
        let registry = Registry::new();
        let dev = MallocBdev::create("M", 64 << 11, 512, None).unwrap(); // 64 MiB
        registry.register(dev).await.unwrap();
        let limits = Limits {
            nbd_conn_mem: 4 << 20,
            nbd_total_mem: 16 << 20,
            stall_timeout: Duration::from_millis(500),
            ..Limits::default()
        };
        let server = NbdServer::with_limits(registry.clone(), limits);
        server.add_export("M", None, true).unwrap();
        let (mut c, s) = tokio::io::duplex(64 << 10);
        server.spawn_conn(s);
        client_go(&mut c, "M").await;
        // 64 reads of 1 MiB whose replies are never read.
        let mut m = Vec::new();
        for i in 0..64u64 {
            m.extend(req(proto::CMD_READ, 0, i, i << 20, 1 << 20));
        }
        c.write_all(&m).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let fixed = RBUF_LEN + WBUF_LEN;
        let peak = server.budget().peak();
        assert!(peak <= fixed + (4 << 20), "peak {peak}");
        assert!(peak > fixed, "nothing was charged");
        // Dropped after the stall timeout, and every byte is given back.
        let t0 = std::time::Instant::now();
        while server.list()[0]["connections"] != serde_json::json!(0) {
            assert!(t0.elapsed() < Duration::from_secs(10), "not dropped");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(server.budget().used(), 0);
        drop(c);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_announced_payload_that_never_comes_is_dropped() {
        let registry = Registry::new();
        let dev = MallocBdev::create("M", 64 << 11, 512, None).unwrap();
        registry.register(dev).await.unwrap();
        let limits = Limits {
            stall_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let server = NbdServer::with_limits(registry.clone(), limits);
        server.add_export("M", None, true).unwrap();
        let (mut c, s) = tokio::io::duplex(1 << 20);
        server.spawn_conn(s);
        client_go(&mut c, "M").await;
        // A 16 MiB write with 4 KiB of its payload, then silence.
        let mut m = req(proto::CMD_WRITE, 0, 1, 0, 16 << 20);
        m.extend([1u8; 4096]);
        c.write_all(&m).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(server.budget().used() >= 16 << 20, "the payload is charged");
        let t0 = std::time::Instant::now();
        while server.list()[0]["connections"] != serde_json::json!(0) {
            assert!(t0.elapsed() < Duration::from_secs(10), "not dropped");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(server.budget().used(), 0);
    }

    #[test]
    fn span_covers_unaligned_ranges() {
        assert_eq!(span(0, 4096, 512), (0, 8, 0));
        assert_eq!(span(100, 10, 512), (0, 1, 100));
        assert_eq!(span(510, 4, 512), (0, 2, 510));
        assert_eq!(span(4096, 1, 4096), (1, 1, 0));
    }
}
