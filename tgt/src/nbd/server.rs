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

use bdev_core::rpc::RpcError;
use bdev_core::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::exports::{Export, ExportMap};
use super::session::{serve, ConnMem};
use crate::limits::{Limits, MemBudget};
use crate::sockpath::{self, BoundPath};
pub(super) struct Listener {
    pub(super) listen: String,
    pub(super) allow_remote: bool,
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

/// The NBD server.
pub struct NbdServer {
    pub(super) registry: Registry,
    pub(super) exports: ExportMap,
    pub(super) listener: Mutex<Option<Listener>>,
    pub(super) generation: AtomicU64,
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

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

    /// The listener's task: accepts connections and hands each to its reactor.
    fn accept_loop<L: Accept>(self: &Arc<Self>, l: L) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match l.accept_one().await {
                    Ok(s) => me.to_reactor(s),
                    Err(e) => {
                        tracing::warn!("nbd accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        })
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
        let (task, unix_path) = if let Some(path) = listen.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            // Only a stale socket is replaced; anything else at the path is left alone.
            let (l, bound) =
                sockpath::bind(&path).map_err(|e| RpcError::new(-e.errno(), e.to_string()))?;
            (self.accept_loop(l), bound)
        } else {
            let addrs = resolve(listen).await?;
            if !allow_remote && addrs.iter().any(|a| !a.ip().is_loopback()) {
                return Err(RpcError::from_errno(libc::EPERM));
            }
            let l = tokio::net::TcpListener::bind(&addrs[..])
                .await
                .map_err(|e| RpcError::from_errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
            (self.accept_loop(l), None)
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

    /// The `listen` address of the running listener (`unix:PATH` or `HOST:PORT`).
    pub fn listen_address(&self) -> Option<String> {
        lock(&self.listener).as_ref().map(|l| l.listen.clone())
    }

    /// Runs a connection's session on the current runtime (the reactor's, when called from
    /// `accept_loop`).
    pub(super) fn spawn_conn<S>(self: &Arc<Self>, stream: S)
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

/// A listening socket whose connections the server accepts.
trait Accept: Send + 'static {
    type Stream: ReactorStream;
    /// The next connection, set up for serving.
    fn accept_one(&self)
        -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        Ok(self.accept().await?.0)
    }
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        let (s, _) = self.accept().await?;
        // Replies go out as soon as they are written.
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}
