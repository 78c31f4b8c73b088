//! The client state machine: connections, retries, reconnects and (re)registration.
//!
//! Each client has a supervisor thread. It makes the first connection, then watches:
//! - a connection that dies (the reader, the writer or the watchdog killed it) starts a
//!   reconnect: the link goes `Reconnecting`, I/O waits, and up to `reconnect_attempts`
//!   attempts are made, `reconnect_delay` apart (the first one at once). Success brings the
//!   link `Up` and the waiting I/O is resubmitted;
//! - when the budget runs out the link goes `Down`: waiting and new I/O fails with EIO and the
//!   bdev is hot-removed from the registry (esnap clones over it go degraded). The supervisor
//!   keeps trying every `reconnect_delay`; when the server is back the same bdev (same name,
//!   same UUID) is registered again, and clones heal;
//! - the watchdog: a request pending longer than `io_timeout` kills its connection, so a
//!   server that stops answering (or a network that drops everything) cannot hang I/O.
//!
//! Registry calls are async and may wait (an unregister waits for every descriptor to be
//! closed), so the supervisor never makes them itself: it sets the wanted state and kicks a
//! registration task running on the registry's executor (`Registry::spawn`), which
//! reconciles the registry with it, one call at a time.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bdev_core::Registry;
use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use iobuf::IoBuf;
use uuid::Uuid;

use crate::addr::Address;
use crate::conn::{Conn, Outcome};
use crate::{NbdError, Result};
use nbd_proto::{self as proto, Cmd, ExportInfo};

/// The settings of one client, validated.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub name: String,
    pub uuid: Uuid,
    pub address: Address,
    pub export: String,
    pub read_only: bool,
    pub reconnect_attempts: u32,
    pub reconnect_delay: Duration,
    pub io_timeout: Duration,
    pub num_connections: u32,
    /// When the first connection fails, start anyway and keep trying in the background.
    pub background_connect: bool,
}

/// The state of the link to the server.
enum Link {
    /// The first connection is being made.
    Connecting,
    /// Connected.
    Up(Arc<Session>),
    /// The connection was lost; the reconnect budget is being spent. I/O waits.
    Reconnecting,
    /// The budget ran out: the bdev is hot-removed, I/O fails, reconnects go on.
    Down,
    /// Deleted (or the first connection failed). Final.
    Closed,
}

/// One or more connections to the export, used round-robin.
struct Session {
    conns: Vec<Arc<Conn>>,
    next: AtomicUsize,
    info: ExportInfo,
}

impl Session {
    fn pick(&self) -> Option<Arc<Conn>> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.conns[(start + i) % n])
            .find(|c| !c.is_dead())
            .cloned()
    }

    fn any_dead(&self) -> bool {
        self.conns.iter().any(|c| c.is_dead())
    }

    fn kill(&self, why: &str) {
        for c in &self.conns {
            c.kill(why);
        }
    }

    fn close(&self) {
        for c in &self.conns {
            c.close();
        }
    }
}

struct Ctl {
    link: Link,
    /// I/O waiting for the link to come up (or go down for good).
    waiters: Vec<oneshot::Sender<()>>,
    stop: bool,
    /// A connection died; the supervisor should look.
    kicked: bool,
    /// Whether the bdev should be in the registry.
    want_registered: bool,
}

/// Messages to the registration task.
enum RegCmd {
    /// Bring the registry in line with `want_registered`.
    Sync,
    /// Unregister (if registered), answer, and end.
    Delete(oneshot::Sender<()>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shared state of one NBD client (every [`crate::NbdClientBdev`] handle points here).
pub(crate) struct Client {
    pub(crate) cfg: Config,
    registry: Registry,
    /// Fixed by the first connection.
    block_len: AtomicU32,
    /// A session was adopted once (the block length is fixed from then on).
    adopted: AtomicBool,
    num_blocks: AtomicU64,
    /// The server's transmission flags of the current (or last) session.
    flags: AtomicU16,
    max_payload: AtomicU32,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    reg_tx: mpsc::UnboundedSender<RegCmd>,
    reg_rx: Mutex<Option<mpsc::UnboundedReceiver<RegCmd>>>,
    /// A `Sync` is queued and not yet taken by the task.
    sync_queued: AtomicBool,
    /// The bdev is in the registry (as far as the registration task knows).
    registered: AtomicBool,
    /// The registration task is unregistering the bdev (so `destruct` is expected).
    self_unregistering: AtomicBool,
    /// The supervisor thread ended.
    exited: Mutex<Option<oneshot::Receiver<()>>>,
}

impl Client {
    /// Starts a client: the supervisor thread makes the first connection; the future resolves
    /// when it succeeded (the client is then `Up`) or failed (the client is `Closed`).
    pub(crate) async fn start(cfg: Config, registry: Registry) -> Result<Arc<Client>> {
        let (reg_tx, reg_rx) = mpsc::unbounded();
        let (exit_tx, exit_rx) = oneshot::channel();
        let client = Arc::new(Client {
            cfg,
            registry,
            block_len: AtomicU32::new(512),
            adopted: AtomicBool::new(false),
            num_blocks: AtomicU64::new(0),
            flags: AtomicU16::new(0),
            max_payload: AtomicU32::new(1 << 25),
            ctl: Mutex::new(Ctl {
                link: Link::Connecting,
                waiters: Vec::new(),
                stop: false,
                kicked: false,
                want_registered: false,
            }),
            cv: Condvar::new(),
            reg_tx,
            reg_rx: Mutex::new(Some(reg_rx)),
            sync_queued: AtomicBool::new(false),
            registered: AtomicBool::new(false),
            self_unregistering: AtomicBool::new(false),
            exited: Mutex::new(Some(exit_rx)),
        });
        let (first_tx, first_rx) = oneshot::channel();
        let c = client.clone();
        std::thread::Builder::new()
            .name(format!("nbd-sup-{}", client.cfg.name))
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| c.clone().supervise(first_tx));
                if std::panic::catch_unwind(run).is_err() {
                    c.abandon();
                }
                let _ = exit_tx.send(());
            })
            .map_err(NbdError::Socket)?;
        match first_rx.await {
            Ok(Ok(())) => Ok(client),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NbdError::Stopped(client.cfg.name.clone())),
        }
    }

    /// Starts the registration task: after the first registration succeeded (`registered`),
    /// or with nothing registered yet (a client still waiting for its server).
    pub(crate) fn start_registration_task(self: &Arc<Self>, registered: bool) {
        // The supervisor decides whether the bdev is wanted (it is while the link is up).
        self.registered.store(registered, Ordering::Release);
        let Some(mut rx) = lock(&self.reg_rx).take() else {
            return;
        };
        let c = self.clone();
        self.registry.spawn(Box::pin(async move {
            while let Some(cmd) = rx.next().await {
                match cmd {
                    RegCmd::Sync => {
                        c.sync_queued.store(false, Ordering::Release);
                        c.reconcile().await;
                    }
                    RegCmd::Delete(done) => {
                        if c.registered.load(Ordering::Acquire) {
                            c.unregister().await;
                        }
                        let _ = done.send(());
                        break;
                    }
                }
            }
        }));
    }

    async fn unregister(self: &Arc<Self>) {
        self.self_unregistering.store(true, Ordering::Release);
        match self.registry.unregister(&self.cfg.name).await {
            Ok(()) => tracing::info!(target: "bdev_nbd", name = %self.cfg.name, "hot-removed"),
            Err(e) => {
                tracing::warn!(target: "bdev_nbd", name = %self.cfg.name, "unregister: {e}")
            }
        }
        self.registered.store(false, Ordering::Release);
        self.self_unregistering.store(false, Ordering::Release);
    }

    async fn reconcile(self: &Arc<Self>) {
        let want = {
            let c = lock(&self.ctl);
            c.want_registered && !c.stop
        };
        let is = self.registered.load(Ordering::Acquire);
        if want && !is {
            let dev = Arc::new(crate::NbdClientBdev::from_client(self.clone()));
            match self.registry.register(dev).await {
                Ok(()) => {
                    self.registered.store(true, Ordering::Release);
                    tracing::info!(target: "bdev_nbd", name = %self.cfg.name,
                        uuid = %self.cfg.uuid, "registered again");
                }
                // The supervisor asks again at its next tick.
                Err(e) => tracing::warn!(target: "bdev_nbd", name = %self.cfg.name,
                    "cannot register again: {e}"),
            }
        } else if !want && is {
            self.unregister().await;
        }
    }

    /// Queues a `Sync` for the registration task, unless one is queued already.
    fn request_sync(&self) {
        if !self.sync_queued.swap(true, Ordering::AcqRel) {
            let _ = self.reg_tx.unbounded_send(RegCmd::Sync);
        }
    }

    /// Whether the registry state differs from the wanted one.
    fn registration_pending(&self) -> bool {
        let c = lock(&self.ctl);
        let want = c.want_registered && !c.stop;
        want != self.registered.load(Ordering::Acquire)
    }

    /// Called by `destruct`: an unregister we did not start means somebody deleted the bdev
    /// through the registry; stop the client then.
    pub(crate) fn destructed(&self) {
        if self.self_unregistering.load(Ordering::Acquire) {
            return;
        }
        self.registered.store(false, Ordering::Release);
        tracing::info!(target: "bdev_nbd", name = %self.cfg.name,
            "unregistered from outside; stopping the client");
        self.signal_stop();
        let (tx, _rx) = oneshot::channel();
        let _ = self.reg_tx.unbounded_send(RegCmd::Delete(tx));
    }

    /// Deletes the client: unregisters the bdev (waiting for its descriptors to close),
    /// stops the supervisor and closes the connections.
    pub(crate) async fn delete(&self) {
        let (tx, rx) = oneshot::channel();
        let task_running = lock(&self.reg_rx).is_none();
        if task_running && self.reg_tx.unbounded_send(RegCmd::Delete(tx)).is_ok() {
            let _ = rx.await;
        } else if self.registered.swap(false, Ordering::AcqRel) {
            self.self_unregistering.store(true, Ordering::Release);
            let _ = self.registry.unregister(&self.cfg.name).await;
        }
        self.signal_stop();
        let exited = lock(&self.exited).take();
        if let Some(rx) = exited {
            let _ = rx.await;
        }
    }

    /// After a bug stopped the supervisor: nothing may wait for it any more. The connections
    /// are killed (pending requests complete as lost) and the client is closed.
    fn abandon(&self) {
        tracing::error!(target: "bdev_nbd", name = %self.cfg.name,
            "supervisor failed; closing the client");
        let (old, waiters) = {
            let mut c = lock(&self.ctl);
            c.stop = true;
            c.want_registered = false;
            (
                std::mem::replace(&mut c.link, Link::Closed),
                std::mem::take(&mut c.waiters),
            )
        };
        if let Link::Up(s) = old {
            s.kill("supervisor failed");
        }
        for w in waiters {
            let _ = w.send(());
        }
    }

    /// Tells the supervisor to stop; pending and new I/O fails with ENODEV.
    pub(crate) fn signal_stop(&self) {
        let waiters = {
            let mut c = lock(&self.ctl);
            c.stop = true;
            c.want_registered = false;
            std::mem::take(&mut c.waiters)
        };
        self.cv.notify_all();
        for w in waiters {
            let _ = w.send(());
        }
    }

    /// Whether the client was stopped (deleted, or its first connection failed).
    pub(crate) fn is_stopped(&self) -> bool {
        let c = lock(&self.ctl);
        c.stop || matches!(c.link, Link::Closed)
    }

    /// Whether a session is up.
    pub(crate) fn is_connected(&self) -> bool {
        matches!(&lock(&self.ctl).link, Link::Up(s) if !s.any_dead())
    }

    /// The link state as `bdev_nbd_client_get` prints it.
    pub(crate) fn state_name(&self) -> &'static str {
        let c = lock(&self.ctl);
        if c.stop {
            return "deleted";
        }
        match &c.link {
            Link::Connecting => "connecting",
            Link::Up(s) if !s.any_dead() => "connected",
            Link::Up(_) | Link::Reconnecting => "reconnecting",
            Link::Down => "disconnected",
            Link::Closed => "deleted",
        }
    }

    /// Whether the bdev is in the registry now.
    pub(crate) fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    /// Number of live connections.
    pub(crate) fn connections(&self) -> usize {
        match &lock(&self.ctl).link {
            Link::Up(s) => s.conns.iter().filter(|c| !c.is_dead()).count(),
            _ => 0,
        }
    }

    pub(crate) fn block_len(&self) -> u32 {
        self.block_len.load(Ordering::Acquire)
    }

    pub(crate) fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }

    /// Whether the bdev refuses writes (asked for, or the server's read-only flag).
    pub(crate) fn read_only(&self) -> bool {
        self.cfg.read_only || self.flags.load(Ordering::Acquire) & proto::TFLAG_READ_ONLY != 0
    }

    /// Whether the server advertised a transmission flag.
    pub(crate) fn server_has(&self, flag: u16) -> bool {
        self.flags.load(Ordering::Acquire) & flag != 0
    }

    /// Largest read or write payload, in bytes, a whole number of blocks.
    pub(crate) fn max_io_bytes(&self) -> usize {
        let bl = self.block_len().max(1);
        let max = self.max_payload.load(Ordering::Acquire).min(1 << 25);
        (max / bl).max(1) as usize * bl as usize
    }

    // ---- I/O path -------------------------------------------------------------------------

    /// Waits for a live connection: at once when the link is up, after the reconnect when it
    /// is being re-established, never when it is down (EIO) or closed (ENODEV).
    async fn conn(&self) -> Result<Arc<Conn>> {
        loop {
            let rx = {
                let mut c = lock(&self.ctl);
                if c.stop {
                    return Err(NbdError::Stopped(self.cfg.name.clone()));
                }
                match &c.link {
                    Link::Up(s) => {
                        if let Some(conn) = s.pick() {
                            return Ok(conn);
                        }
                        // Every connection died and the supervisor has not noticed yet.
                        c.kicked = true;
                        self.cv.notify_all();
                    }
                    Link::Connecting | Link::Reconnecting => {}
                    Link::Down => return Err(NbdError::Disconnected(self.cfg.address.to_string())),
                    Link::Closed => return Err(NbdError::Stopped(self.cfg.name.clone())),
                }
                let (tx, rx) = oneshot::channel();
                c.waiters.push(tx);
                rx
            };
            let _ = rx.await;
        }
    }

    /// Runs one request, resubmitting it on the next connection when the current one dies,
    /// a bounded number of times. `buf` (the read target or write source) comes back.
    pub(crate) async fn io(
        &self,
        cmd: Cmd,
        offset: u64,
        len: u32,
        buf: Option<IoBuf>,
        buf_off: usize,
    ) -> Result<Option<IoBuf>> {
        let mut buf = buf;
        // Each resubmission follows a reconnect, which is itself bounded; this only stops a
        // request that kills every server it is sent to from going round forever.
        let mut tries_left = self.cfg.reconnect_attempts.saturating_add(2);
        loop {
            let conn = self.conn().await?;
            let submitted = conn.submit(cmd, offset, len, buf.take(), buf_off);
            // Not kept while waiting: a connection nobody references any more drops its
            // pending requests, which then complete (as lost) instead of waiting forever.
            drop(conn);
            let outcome = match submitted {
                Ok(rx) => rx.await.unwrap_or(Outcome::Lost(None)),
                Err(o) => o,
            };
            match outcome {
                Outcome::Done(Ok(()), b) => return Ok(b),
                Outcome::Done(Err(errno), _) => {
                    return Err(NbdError::Io {
                        command: cmd.name(),
                        errno,
                    })
                }
                Outcome::Lost(b) => {
                    tries_left = tries_left.saturating_sub(1);
                    let needs_buf = matches!(cmd, Cmd::Read | Cmd::Write);
                    if tries_left == 0 || (needs_buf && b.is_none()) {
                        return Err(NbdError::Disconnected(self.cfg.address.to_string()));
                    }
                    buf = b;
                }
            }
        }
    }

    // ---- supervisor -----------------------------------------------------------------------

    fn label(&self) -> &str {
        &self.cfg.name
    }

    /// Opens a session (one connection, more when the server allows and more were asked for).
    fn open_session(self: &Arc<Self>) -> Result<Arc<Session>> {
        let weak: Weak<Client> = Arc::downgrade(self);
        let on_dead = move || {
            if let Some(c) = weak.upgrade() {
                lock(&c.ctl).kicked = true;
                c.cv.notify_all();
            }
        };
        let first = Conn::open(
            &self.cfg.address,
            &self.cfg.export,
            self.cfg.io_timeout,
            self.label(),
            Box::new(on_dead.clone()),
        )?;
        let info = *first.info();
        let mut conns = vec![first];
        if info.has(proto::TFLAG_CAN_MULTI_CONN) {
            for _ in 1..self.cfg.num_connections {
                match Conn::open(
                    &self.cfg.address,
                    &self.cfg.export,
                    self.cfg.io_timeout,
                    self.label(),
                    Box::new(on_dead.clone()),
                ) {
                    Ok(c) if *c.info() == info => conns.push(c),
                    Ok(c) => {
                        c.close();
                        tracing::warn!(target: "bdev_nbd", name = %self.cfg.name,
                            "extra connection sees a different export; not used");
                    }
                    Err(e) => tracing::warn!(target: "bdev_nbd", name = %self.cfg.name,
                        "extra connection failed: {e}"),
                }
            }
        }
        Ok(Arc::new(Session {
            conns,
            next: AtomicUsize::new(0),
            info,
        }))
    }

    /// The block length the bdev uses for an export: the server's minimum block size, but at
    /// least 512 (a server without size constraints says 1).
    fn block_len_for(info: &ExportInfo) -> u32 {
        info.min_block.max(512)
    }

    /// Takes a new session's export description; `false` when it cannot replace the old one
    /// (the block size changed).
    fn adopt(&self, info: &ExportInfo) -> bool {
        let bl = Self::block_len_for(info);
        let first = !self.adopted.load(Ordering::Acquire);
        if !first && bl != self.block_len() {
            tracing::error!(target: "bdev_nbd", name = %self.cfg.name,
                "server now has {bl}-byte blocks instead of {}; not using it", self.block_len());
            return false;
        }
        let blocks = info.size / u64::from(bl);
        if !info.size.is_multiple_of(u64::from(bl)) {
            tracing::warn!(target: "bdev_nbd", name = %self.cfg.name,
                "export size {} is not a multiple of {bl}; the tail is not used", info.size);
        }
        self.block_len.store(bl, Ordering::Release);
        self.flags.store(info.flags, Ordering::Release);
        self.max_payload.store(info.max_payload, Ordering::Release);
        let old = self.num_blocks.swap(blocks, Ordering::AcqRel);
        self.adopted.store(true, Ordering::Release);
        if !first && old != blocks && self.registered.load(Ordering::Acquire) {
            tracing::info!(target: "bdev_nbd", name = %self.cfg.name,
                "export resized from {old} to {blocks} blocks");
            self.registry.notify_resize(&self.cfg.name);
        }
        true
    }

    /// Sets the link and wakes the waiting I/O.
    fn set_link(&self, link: Link) {
        let waiters = {
            let mut c = lock(&self.ctl);
            c.link = link;
            std::mem::take(&mut c.waiters)
        };
        for w in waiters {
            let _ = w.send(());
        }
    }

    /// Sleeps up to `d`; `false` when asked to stop meanwhile.
    fn pause(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut c = lock(&self.ctl);
        loop {
            if c.stop {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            c = self
                .cv
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn stopping(&self) -> bool {
        lock(&self.ctl).stop
    }

    /// One connection attempt, adopting the session when it fits.
    fn try_connect(self: &Arc<Self>) -> Option<Arc<Session>> {
        match self.open_session() {
            Ok(s) if self.adopt(&s.info) => Some(s),
            Ok(s) => {
                s.close();
                None
            }
            Err(e) => {
                tracing::debug!(target: "bdev_nbd", name = %self.cfg.name,
                    "reconnect failed: {e}");
                None
            }
        }
    }

    /// Re-establishes the link after a loss. Returns the new session, or `None` when stopped.
    fn reconnect(self: &Arc<Self>, old: &Session) -> Option<Arc<Session>> {
        {
            let mut c = lock(&self.ctl);
            c.link = Link::Reconnecting;
        }
        // Requests still pending on a surviving connection are resubmitted too.
        old.kill("session torn down for reconnect");
        for attempt in 0..self.cfg.reconnect_attempts {
            if attempt > 0 && !self.pause(self.cfg.reconnect_delay) {
                return None;
            }
            if self.stopping() {
                return None;
            }
            if let Some(s) = self.try_connect() {
                tracing::info!(target: "bdev_nbd", name = %self.cfg.name,
                    attempt = attempt + 1, "reconnected");
                return Some(s);
            }
        }
        tracing::warn!(target: "bdev_nbd", name = %self.cfg.name,
            attempts = self.cfg.reconnect_attempts,
            "server unreachable; hot-removing the bdev and retrying in the background");
        lock(&self.ctl).want_registered = false;
        self.set_link(Link::Down);
        self.request_sync();
        self.until_server_returns()
    }

    /// With the link down (and the bdev out of the registry): tries every `reconnect_delay`
    /// until a session is up (then the bdev is wanted in the registry again) or the client
    /// is stopped (`None`).
    fn until_server_returns(self: &Arc<Self>) -> Option<Arc<Session>> {
        let delay = self.cfg.reconnect_delay.max(Duration::from_millis(10));
        loop {
            if !self.pause(delay) {
                return None;
            }
            if let Some(s) = self.try_connect() {
                tracing::info!(target: "bdev_nbd", name = %self.cfg.name,
                    "server is back; registering the bdev");
                lock(&self.ctl).want_registered = true;
                return Some(s);
            }
        }
    }

    /// The supervisor thread's body.
    fn supervise(self: Arc<Self>, first: oneshot::Sender<Result<()>>) {
        let mut session = match self.open_session() {
            Ok(s) => {
                self.adopt(&s.info);
                lock(&self.ctl).want_registered = true;
                self.set_link(Link::Up(s.clone()));
                if first.send(Ok(())).is_err() {
                    // Nobody waits for the client any more.
                    s.close();
                    self.set_link(Link::Closed);
                    return;
                }
                s
            }
            Err(e) if self.cfg.background_connect => {
                tracing::warn!(target: "bdev_nbd", name = %self.cfg.name,
                    "cannot connect yet ({e}); retrying in the background");
                self.set_link(Link::Down);
                if first.send(Ok(())).is_err() {
                    self.set_link(Link::Closed);
                    return;
                }
                match self.until_server_returns() {
                    Some(s) => {
                        self.set_link(Link::Up(s.clone()));
                        self.request_sync();
                        s
                    }
                    None => {
                        self.set_link(Link::Closed);
                        return;
                    }
                }
            }
            Err(e) => {
                self.set_link(Link::Closed);
                let _ = first.send(Err(e));
                return;
            }
        };
        let tick =
            (self.cfg.io_timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut last_sync = Instant::now();
        loop {
            {
                let mut c = lock(&self.ctl);
                if !c.stop && !c.kicked {
                    c = self
                        .cv
                        .wait_timeout(c, tick)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                if c.stop {
                    break;
                }
                c.kicked = false;
            }
            // The watchdog: a request stuck past the timeout means the server or the network
            // is gone without the socket noticing.
            let now = Instant::now();
            for conn in &session.conns {
                if conn
                    .oldest()
                    .is_some_and(|t| now.duration_since(t) > self.cfg.io_timeout)
                {
                    conn.kill("request timed out");
                }
            }
            if session.any_dead() {
                match self.reconnect(&session) {
                    Some(s) => {
                        session = s;
                        self.set_link(Link::Up(session.clone()));
                        self.request_sync();
                    }
                    None => break,
                }
            }
            if self.registration_pending()
                && now.duration_since(last_sync) >= self.cfg.reconnect_delay.min(tick * 4)
            {
                last_sync = now;
                self.request_sync();
            }
        }
        session.close();
        self.set_link(Link::Closed);
    }
}
