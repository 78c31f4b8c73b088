//! The device registry and descriptors.
//!
//! The [`Registry`] is a cheap-clone handle over shared state: ordered maps from name, alias
//! and UUID to a device, the registration order (a sequence number per device), the examine hooks and the background spawner.
//! Each registered device has a `DevState` shared with its [`Descriptor`]s: the open
//! descriptors (with their write flag, claim and event sender), the claim held on the device,
//! the removal state and the in-flight I/O count.
//!
//! Locks are `std::sync::Mutex`es held only for map updates, never across an `.await`, so an
//! examine hook may register devices, and a descriptor may be dropped from any thread.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use async_trait::async_trait;
use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use futures::channel::oneshot;
use futures::future::BoxFuture;
use iobuf::IoBuf;
use slab::Slab;
use uuid::Uuid;

use crate::stats::{self, IoKind, IoStats};
use crate::{BdevError, BdevEvent, BlockDevice, ClaimType, IoFuture, IoType, Result};

/// A module callback that sees every newly registered device (SPDK `examine_disk`).
#[async_trait]
pub trait ExamineHook: Send + Sync + 'static {
    /// Called after `name` was registered. Errors are the hook's own business (log them).
    async fn examine(&self, registry: &Registry, name: &str);
}

/// The spawner type installed with [`Registry::set_spawner`].
type Spawner = Arc<dyn Fn(BoxFuture<'static, ()>) + Send + Sync>;

/// Locks a mutex, ignoring poisoning: every critical section leaves the data consistent
/// before anything in it can panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One open descriptor, as the device sees it.
struct DescEntry {
    write: bool,
    claim: Option<ClaimType>,
    events: UnboundedSender<BdevEvent>,
}

/// Mutable per-device state: descriptors, claim, removal.
#[derive(Default)]
struct DevCtl {
    descs: Slab<DescEntry>,
    /// The claim type held on the device (by one or more descriptors).
    claim: Option<ClaimType>,
    /// Number of descriptors holding `claim`.
    claimers: usize,
    /// An unregister has started: no new opens, `Remove` was sent.
    removing: bool,
    /// Woken when the last descriptor closes during removal.
    closed_waiters: Vec<oneshot::Sender<()>>,
}

/// Per-device state shared between the registry and the device's descriptors.
struct DevState {
    dev: Arc<dyn BlockDevice>,
    ctl: Mutex<DevCtl>,
    /// `destruct` has been called: every I/O fails with ENODEV.
    gone: AtomicBool,
    /// I/O statistics (`bdev_get_iostat`).
    stats: Arc<IoStats>,
}

/// A registered device and its aliases (in insertion order).
struct Entry {
    state: Arc<DevState>,
    aliases: Vec<String>,
    /// Registration sequence number (listings sort by it).
    seq: u64,
}

#[derive(Default)]
struct RegInner {
    by_name: BTreeMap<String, Entry>,
    /// alias -> device name.
    by_alias: BTreeMap<String, String>,
    /// uuid -> device name.
    by_uuid: BTreeMap<Uuid, String>,
    /// The next registration sequence number.
    next_seq: u64,
    hooks: Vec<Arc<dyn ExamineHook>>,
}

impl RegInner {
    /// Every entry in registration order: one pass over the map and a sort by sequence
    /// number, no lookup per entry.
    fn ordered(&self) -> Vec<&Entry> {
        let mut v: Vec<&Entry> = self.by_name.values().collect();
        v.sort_unstable_by_key(|e| e.seq);
        v
    }

    fn resolve(&self, key: &str) -> Option<&Entry> {
        if let Some(e) = self.by_name.get(key) {
            return Some(e);
        }
        if let Some(n) = self.by_alias.get(key) {
            return self.by_name.get(n);
        }
        let u = Uuid::parse_str(key).ok()?;
        self.by_uuid.get(&u).and_then(|n| self.by_name.get(n))
    }

    /// Whether `s` is taken as a name, an alias or the text of a registered UUID.
    fn name_taken(&self, s: &str) -> bool {
        self.by_name.contains_key(s)
            || self.by_alias.contains_key(s)
            || Uuid::parse_str(s).is_ok_and(|u| self.by_uuid.contains_key(&u))
    }
}

#[derive(Default)]
struct ExamineState {
    running: usize,
    waiters: Vec<oneshot::Sender<()>>,
}

struct Shared {
    inner: Mutex<RegInner>,
    examine: Mutex<ExamineState>,
    spawner: Mutex<Option<Spawner>>,
    pool: OnceLock<Option<futures::executor::ThreadPool>>,
}

/// The registry of block devices. Cheap to clone (a shared handle); a process (or a test)
/// creates one and passes it around; there is no global.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// Decrements the running-examine count when an examine pass ends (or its future is dropped).
struct ExamineGuard<'a>(&'a Shared);

impl Drop for ExamineGuard<'_> {
    fn drop(&mut self) {
        let waiters = {
            let mut ex = lock(&self.0.examine);
            ex.running -= 1;
            if ex.running == 0 {
                std::mem::take(&mut ex.waiters)
            } else {
                Vec::new()
            }
        };
        for w in waiters {
            let _ = w.send(());
        }
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry {
            shared: Arc::new(Shared {
                inner: Mutex::new(RegInner::default()),
                examine: Mutex::new(ExamineState::default()),
                spawner: Mutex::new(None),
                pool: OnceLock::new(),
            }),
        }
    }

    fn state_of(&self, key: &str) -> Option<Arc<DevState>> {
        lock(&self.shared.inner)
            .resolve(key)
            .map(|e| e.state.clone())
    }

    /// Registers a device, then runs every examine hook on it. A duplicate name, alias or UUID
    /// is refused with `AlreadyExists` (EEXIST).
    pub async fn register(&self, dev: Arc<dyn BlockDevice>) -> Result<()> {
        let name = dev.name().to_string();
        if name.is_empty() {
            return Err(BdevError::InvalidArgument("empty bdev name".into()));
        }
        if dev.block_len() == 0 {
            return Err(BdevError::InvalidArgument(format!(
                "bdev {name} has a zero block length"
            )));
        }
        let uuid = dev.uuid();
        let hooks = {
            let mut inner = lock(&self.shared.inner);
            if inner.name_taken(&name) {
                return Err(BdevError::AlreadyExists { what: name });
            }
            let uuid_text = uuid.hyphenated().to_string();
            if inner.by_uuid.contains_key(&uuid)
                || inner.by_name.contains_key(&uuid_text)
                || inner.by_alias.contains_key(&uuid_text)
            {
                return Err(BdevError::AlreadyExists { what: uuid_text });
            }
            let state = Arc::new(DevState {
                dev,
                ctl: Mutex::new(DevCtl::default()),
                gone: AtomicBool::new(false),
                stats: Arc::new(IoStats::new()),
            });
            inner.by_uuid.insert(uuid, name.clone());
            let seq = inner.next_seq;
            inner.next_seq += 1;
            inner.by_name.insert(
                name.clone(),
                Entry {
                    state,
                    aliases: Vec::new(),
                    seq,
                },
            );
            lock(&self.shared.examine).running += 1;
            inner.hooks.clone()
        };
        tracing::debug!(target: "bdev", name = %name, "registered");
        let _guard = ExamineGuard(&self.shared);
        for hook in hooks {
            hook.examine(self, &name).await;
        }
        Ok(())
    }

    /// Hot-removes a device: sends `Remove` to every open descriptor, waits until all of them
    /// are closed (in-flight I/O completes or fails), then calls `destruct` and forgets it.
    ///
    /// While waiting, I/O through the still-open descriptors keeps working (an lvol store can
    /// write its clean super block). A second unregister of the same device while the first
    /// one waits fails with EBUSY.
    pub async fn unregister(&self, name_or_alias_or_uuid: &str) -> Result<()> {
        let state = self
            .state_of(name_or_alias_or_uuid)
            .ok_or_else(|| BdevError::NoDevice(name_or_alias_or_uuid.to_string()))?;
        let name = state.dev.name().to_string();
        let wait = {
            let mut ctl = lock(&state.ctl);
            if ctl.removing {
                return Err(BdevError::Busy(name));
            }
            ctl.removing = true;
            for (_, d) in ctl.descs.iter() {
                let _ = d.events.unbounded_send(BdevEvent::Remove);
            }
            if ctl.descs.is_empty() {
                None
            } else {
                let (tx, rx) = oneshot::channel();
                ctl.closed_waiters.push(tx);
                Some(rx)
            }
        };
        if let Some(rx) = wait {
            tracing::debug!(target: "bdev", name = %name, "unregister waits for descriptors");
            let _ = rx.await;
        }
        state.dev.destruct().await;
        state.gone.store(true, Ordering::Release);
        let mut inner = lock(&self.shared.inner);
        if let Some(entry) = inner.by_name.remove(&name) {
            for a in entry.aliases {
                inner.by_alias.remove(&a);
            }
        }
        let uuid = state.dev.uuid();
        if inner.by_uuid.get(&uuid) == Some(&name) {
            inner.by_uuid.remove(&uuid);
        }
        tracing::debug!(target: "bdev", name = %name, "unregistered");
        Ok(())
    }

    /// Adds an alias (EEXIST if any name, alias or UUID already uses it).
    pub fn add_alias(&self, name: &str, alias: &str) -> Result<()> {
        if alias.is_empty() {
            return Err(BdevError::InvalidArgument("empty alias".into()));
        }
        let mut inner = lock(&self.shared.inner);
        let real = inner
            .resolve(name)
            .map(|e| e.state.dev.name().to_string())
            .ok_or_else(|| BdevError::NoDevice(name.to_string()))?;
        if inner.name_taken(alias) {
            return Err(BdevError::AlreadyExists {
                what: alias.to_string(),
            });
        }
        inner.by_alias.insert(alias.to_string(), real.clone());
        if let Some(e) = inner.by_name.get_mut(&real) {
            e.aliases.push(alias.to_string());
        }
        Ok(())
    }

    /// Removes an alias (ENODEV if the device is unknown, ENOENT-like `NoDevice` if the alias
    /// does not belong to it).
    pub fn remove_alias(&self, name: &str, alias: &str) -> Result<()> {
        let mut inner = lock(&self.shared.inner);
        let real = inner
            .resolve(name)
            .map(|e| e.state.dev.name().to_string())
            .ok_or_else(|| BdevError::NoDevice(name.to_string()))?;
        if inner.by_alias.get(alias) != Some(&real) {
            return Err(BdevError::NoDevice(alias.to_string()));
        }
        inner.by_alias.remove(alias);
        if let Some(e) = inner.by_name.get_mut(&real) {
            e.aliases.retain(|a| a != alias);
        }
        Ok(())
    }

    /// Aliases of a device, in insertion order.
    pub fn aliases(&self, name: &str) -> Vec<String> {
        lock(&self.shared.inner)
            .resolve(name)
            .map(|e| e.aliases.clone())
            .unwrap_or_default()
    }

    /// Finds a device by name, alias or UUID string.
    pub fn get(&self, name_or_alias_or_uuid: &str) -> Option<Arc<dyn BlockDevice>> {
        self.state_of(name_or_alias_or_uuid).map(|s| s.dev.clone())
    }

    /// Finds a device by UUID.
    pub fn get_by_uuid(&self, uuid: &Uuid) -> Option<Arc<dyn BlockDevice>> {
        let inner = lock(&self.shared.inner);
        let name = inner.by_uuid.get(uuid)?;
        inner.by_name.get(name).map(|e| e.state.dev.clone())
    }

    /// All registered devices, in registration order.
    pub fn list(&self) -> Vec<Arc<dyn BlockDevice>> {
        let inner = lock(&self.shared.inner);
        inner
            .ordered()
            .into_iter()
            .map(|e| e.state.dev.clone())
            .collect()
    }

    /// Calls `f(device, aliases, claim)` for every device in registration order, under the
    /// registry's lock: listings read each device's facts in one pass, without looking each
    /// one up or cloning its aliases. `f` must not call the registry.
    pub fn for_each_listed(
        &self,
        mut f: impl FnMut(&Arc<dyn BlockDevice>, &[String], Option<ClaimType>),
    ) {
        let inner = lock(&self.shared.inner);
        for e in inner.ordered() {
            let claim = lock(&e.state.ctl).claim;
            f(&e.state.dev, &e.aliases, claim);
        }
    }

    /// The claim held on a device, if any.
    pub fn claim_of(&self, name: &str) -> Option<ClaimType> {
        let state = self.state_of(name)?;
        let claim = lock(&state.ctl).claim;
        claim
    }

    /// Number of open descriptors of a device (0 if unknown).
    pub fn open_count(&self, name: &str) -> usize {
        self.state_of(name)
            .map(|s| lock(&s.ctl).descs.len())
            .unwrap_or(0)
    }

    /// The I/O statistics of a device (by name, alias or UUID).
    pub fn stats(&self, name_or_alias_or_uuid: &str) -> Option<Arc<IoStats>> {
        self.state_of(name_or_alias_or_uuid)
            .map(|s| s.stats.clone())
    }

    /// Every registered device with its statistics, in registration order.
    pub fn list_with_stats(&self) -> Vec<(Arc<dyn BlockDevice>, Arc<IoStats>)> {
        let inner = lock(&self.shared.inner);
        inner
            .ordered()
            .into_iter()
            .map(|e| (e.state.dev.clone(), e.state.stats.clone()))
            .collect()
    }

    /// Opens a device by name, alias or UUID. A write open of a device claimed
    /// `ReadManyWriteNone`, or claimed by another descriptor for writing, fails with EPERM.
    ///
    /// As in SPDK, any claim on the device refuses a new write open (the claim holder writes
    /// through its own descriptor). A device being unregistered refuses opens with ENODEV.
    pub fn open(&self, name_or_alias_or_uuid: &str, write: bool) -> Result<Descriptor> {
        let state = self
            .state_of(name_or_alias_or_uuid)
            .ok_or_else(|| BdevError::NoDevice(name_or_alias_or_uuid.to_string()))?;
        let (tx, rx) = unbounded();
        let id = {
            let mut ctl = lock(&state.ctl);
            if ctl.removing || state.gone.load(Ordering::Acquire) {
                return Err(BdevError::NoDevice(state.dev.name().to_string()));
            }
            if let (true, Some(held)) = (write, ctl.claim) {
                return Err(BdevError::ClaimConflict {
                    name: state.dev.name().to_string(),
                    held,
                });
            }
            ctl.descs.insert(DescEntry {
                write,
                claim: None,
                events: tx,
            })
        };
        Ok(Descriptor {
            dev: state.dev.clone(),
            state,
            id,
            write,
            events: Some(rx),
        })
    }

    /// Adds an examine hook; it sees devices registered from now on.
    pub fn add_examine_hook(&self, hook: Arc<dyn ExamineHook>) {
        lock(&self.shared.inner).hooks.push(hook);
    }

    /// Waits until every examine started so far has finished. Do not call it from inside an
    /// examine hook (it would wait for itself).
    pub async fn wait_for_examine(&self) {
        let rx = {
            let mut ex = lock(&self.shared.examine);
            if ex.running == 0 {
                return;
            }
            let (tx, rx) = oneshot::channel();
            ex.waiters.push(tx);
            rx
        };
        let _ = rx.await;
    }

    /// Runs a background task (event listeners, deferred work) on the registry's executor: a
    /// small `futures` thread pool by default, or the spawner installed with `set_spawner`.
    pub fn spawn(&self, fut: BoxFuture<'static, ()>) {
        let spawner = lock(&self.shared.spawner).clone();
        if let Some(s) = spawner {
            s(fut);
            return;
        }
        let pool = self.shared.pool.get_or_init(|| {
            futures::executor::ThreadPool::builder()
                .pool_size(2)
                .name_prefix("bdev-bg-")
                .create()
                .map_err(|e| tracing::error!(target: "bdev", "cannot start thread pool: {e}"))
                .ok()
        });
        match pool {
            Some(p) => p.spawn_ok(fut),
            // No pool could be started: run the task on a thread of its own.
            None => {
                std::thread::spawn(move || futures::executor::block_on(fut));
            }
        }
    }

    /// Installs the application's spawner (e.g. one that calls `tokio::spawn`).
    pub fn set_spawner(&self, spawner: Spawner) {
        *lock(&self.shared.spawner) = Some(spawner);
    }

    /// Called by a device (or its owner) after its size changed: sends `Resize` to every
    /// descriptor.
    pub fn notify_resize(&self, name: &str) {
        let Some(state) = self.state_of(name) else {
            return;
        };
        let num_blocks = state.dev.num_blocks();
        let ctl = lock(&state.ctl);
        for (_, d) in ctl.descs.iter() {
            let _ = d.events.unbounded_send(BdevEvent::Resize { num_blocks });
        }
    }
}

/// Largest buffer used when write_zeroes is emulated with writes.
const ZERO_CHUNK: usize = 1 << 20;

/// An open handle on a device. I/O goes through it: it checks bounds (EINVAL), buffer length
/// (EINVAL), write permission (EBADF) and removal (ENODEV), and counts in-flight
/// requests. Dropping it closes it (and releases its claim).
pub struct Descriptor {
    dev: Arc<dyn BlockDevice>,
    state: Arc<DevState>,
    id: usize,
    write: bool,
    events: Option<UnboundedReceiver<BdevEvent>>,
}

impl std::fmt::Debug for Descriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Descriptor")
            .field("bdev", &self.dev.name())
            .field("write", &self.write)
            .finish()
    }
}

impl Drop for Descriptor {
    fn drop(&mut self) {
        let waiters = {
            let mut ctl = lock(&self.state.ctl);
            if let Some(d) = ctl.descs.try_remove(self.id) {
                if d.claim.is_some() {
                    release(&mut ctl);
                }
            }
            if ctl.removing && ctl.descs.is_empty() {
                std::mem::take(&mut ctl.closed_waiters)
            } else {
                Vec::new()
            }
        };
        for w in waiters {
            let _ = w.send(());
        }
    }
}

fn release(ctl: &mut DevCtl) {
    ctl.claimers = ctl.claimers.saturating_sub(1);
    if ctl.claimers == 0 {
        ctl.claim = None;
    }
}

impl Descriptor {
    /// The device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        self.dev.name()
    }

    /// The device's block length in bytes.
    pub fn block_len(&self) -> u32 {
        self.dev.block_len()
    }

    /// The device's current size in blocks.
    pub fn num_blocks(&self) -> u64 {
        self.dev.num_blocks()
    }

    /// Whether the descriptor was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.write
    }

    /// The claim this descriptor holds, if any.
    pub fn claim_type(&self) -> Option<ClaimType> {
        lock(&self.state.ctl)
            .descs
            .get(self.id)
            .and_then(|d| d.claim)
    }

    /// Takes the event receiver (once; `None` afterwards).
    pub fn take_events(&mut self) -> Option<UnboundedReceiver<BdevEvent>> {
        self.events.take()
    }

    /// Claims the device through this descriptor. A conflicting claim fails with EPERM.
    /// Several `ReadManyWriteNone` claims share; `ReadManyWriteOne` needs a writable descriptor.
    ///
    /// The rules are SPDK's claims v2: a claim of another type, a second claim through the
    /// same descriptor, a second `ExclusiveWrite` or `ReadManyWriteOne`, and a
    /// `ReadManyWriteOne`/`ReadManyWriteNone` claim while another descriptor is open for
    /// writing all fail with EPERM. `ExclusiveWrite` and `ReadManyWriteOne` need a writable
    /// descriptor and `ReadManyWriteNone` a read-only one (EINVAL otherwise; SPDK promotes a
    /// read-only descriptor to writable instead, we ask the caller to say so at open).
    pub fn claim(&self, claim: ClaimType) -> Result<()> {
        let name = || self.dev.name().to_string();
        let mut ctl = lock(&self.state.ctl);
        if ctl.removing {
            return Err(BdevError::NoDevice(name()));
        }
        if let Some(held) = ctl.claim {
            if held != claim {
                return Err(BdevError::ClaimConflict { name: name(), held });
            }
        }
        let me = ctl
            .descs
            .get(self.id)
            .ok_or_else(|| BdevError::NoDevice(name()))?;
        if let Some(held) = me.claim {
            return Err(BdevError::ClaimConflict { name: name(), held });
        }
        let other_writer = ctl.descs.iter().any(|(id, d)| id != self.id && d.write);
        match claim {
            ClaimType::ExclusiveWrite | ClaimType::ReadManyWriteOne => {
                if let Some(held) = ctl.claim {
                    return Err(BdevError::ClaimConflict { name: name(), held });
                }
                if !self.write {
                    return Err(BdevError::InvalidArgument(format!(
                        "{} claim needs a writable descriptor",
                        claim.spdk_name()
                    )));
                }
                if claim == ClaimType::ReadManyWriteOne && other_writer {
                    return Err(BdevError::WriterConflict { name: name() });
                }
            }
            ClaimType::ReadManyWriteNone => {
                if self.write {
                    return Err(BdevError::InvalidArgument(
                        "read_many_write_none claim needs a read-only descriptor".into(),
                    ));
                }
                if ctl.claim.is_none() && other_writer {
                    return Err(BdevError::WriterConflict { name: name() });
                }
            }
        }
        ctl.claim = Some(claim);
        ctl.claimers += 1;
        if let Some(me) = ctl.descs.get_mut(self.id) {
            me.claim = Some(claim);
        }
        Ok(())
    }

    /// Releases this descriptor's claim.
    pub fn release_claim(&self) {
        let mut ctl = lock(&self.state.ctl);
        let had = ctl
            .descs
            .get_mut(self.id)
            .and_then(|d| d.claim.take())
            .is_some();
        if had {
            release(&mut ctl);
        }
    }

    /// Whether the device supports an I/O type through this descriptor. Write zeroes is
    /// reported supported when the device can write, since [`Descriptor::write_zeroes`]
    /// emulates it.
    pub fn io_type_supported(&self, io_type: IoType) -> bool {
        self.dev.io_type_supported(io_type)
            || (io_type == IoType::WriteZeroes && self.dev.io_type_supported(IoType::Write))
    }

    /// Runs `op` and records it in the statistics as `kind` of `blocks` blocks, with its
    /// latency and outcome.
    async fn tracked<T>(
        &self,
        kind: IoKind,
        blocks: u64,
        op: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let t0 = stats::now();
        let r = op.await;
        let bytes = blocks.saturating_mul(u64::from(self.dev.block_len()));
        self.state.stats.record(kind, bytes, t0, r.is_ok());
        r
    }

    fn check_alive(&self) -> Result<()> {
        if self.state.gone.load(Ordering::Acquire) {
            return Err(BdevError::NoDevice(self.dev.name().to_string()));
        }
        Ok(())
    }

    fn check_write(&self) -> Result<()> {
        if !self.write {
            return Err(BdevError::ReadOnlyDescriptor);
        }
        Ok(())
    }

    fn check_supported(&self, io_type: IoType) -> Result<()> {
        if !self.dev.io_type_supported(io_type) {
            return Err(BdevError::NotSupported(io_type));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, num_blocks: u64) -> Result<()> {
        let device_blocks = self.dev.num_blocks();
        match offset.checked_add(num_blocks) {
            Some(end) if end <= device_blocks => Ok(()),
            _ => Err(BdevError::OutOfRange {
                offset,
                num_blocks,
                device_blocks,
            }),
        }
    }

    /// Checks one buffer's length; returns its length in blocks. (Its alignment is the
    /// device's business: `buf_align` is what it prefers, and a device that needs aligned
    /// memory copies through a bounce buffer.)
    fn check_buf(&self, buf: &IoBuf) -> Result<u64> {
        let bl = self.dev.block_len();
        let (n, rest) = iobuf::div_rem(buf.len() as u64, u64::from(bl));
        if rest != 0 {
            return Err(BdevError::InvalidArgument(format!(
                "buffer length {} is not a multiple of the block length {bl}",
                buf.len()
            )));
        }
        Ok(n)
    }

    fn check_bufs(&self, offset: u64, bufs: &[IoBuf]) -> Result<u64> {
        let mut total: u64 = 0;
        for b in bufs {
            total = total.saturating_add(self.check_buf(b)?);
        }
        self.check_range(offset, total)?;
        Ok(total)
    }

    /// Reads into `buf` at `offset_blocks`.
    pub async fn read(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        self.read_io(offset_blocks, buf).await
    }

    /// Writes `buf` at `offset_blocks`.
    pub async fn write(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        self.write_io(offset_blocks, buf).await
    }

    /// [`Descriptor::read`] as an [`IoFuture`]: the checks run now, the device's request
    /// future is returned as is (no allocation when the device serves it inline). A stacked
    /// device returns this as its own request's future.
    pub fn read_io(&self, offset_blocks: u64, buf: IoBuf) -> IoFuture<'_, Result<IoBuf>> {
        self.start_io(offset_blocks, buf, IoType::Read, |d, o, b| d.read_io(o, b))
    }

    /// [`Descriptor::write`] as an [`IoFuture`] (see [`Descriptor::read_io`]).
    pub fn write_io(&self, offset_blocks: u64, buf: IoBuf) -> IoFuture<'_, Result<IoBuf>> {
        self.start_io(offset_blocks, buf, IoType::Write, |d, o, b| {
            d.write_io(o, b)
        })
    }

    /// One read or write: the checks, then the device's request, recorded in the statistics
    /// when it ends.
    fn start_io<'a>(
        &'a self,
        offset_blocks: u64,
        buf: IoBuf,
        io_type: IoType,
        submit: impl FnOnce(&'a dyn BlockDevice, u64, IoBuf) -> IoFuture<'a, Result<IoBuf>>,
    ) -> IoFuture<'a, Result<IoBuf>> {
        let n = match self.check_io(offset_blocks, &buf, io_type) {
            Ok(n) => n,
            Err(e) => return IoFuture::ready(Err(e)),
        };
        if n == 0 {
            return IoFuture::ready(Ok(buf));
        }
        // `check_io` found the buffer a whole number of blocks.
        let bytes = buf.len() as u64;
        let kind = if io_type == IoType::Write {
            IoKind::Write
        } else {
            IoKind::Read
        };
        let mut fut = submit(self.dev.as_ref(), offset_blocks, buf);
        fut.add_layer(&self.state.stats, kind, bytes);
        fut
    }

    /// The checks of one read or write, each done once: alive, writable (writes),
    /// supported, buffer length, range. Returns the length in blocks.
    fn check_io(&self, offset_blocks: u64, buf: &IoBuf, io_type: IoType) -> Result<u64> {
        self.check_alive()?;
        if io_type == IoType::Write {
            self.check_write()?;
        }
        self.check_supported(io_type)?;
        let n = self.check_buf(buf)?;
        self.check_range(offset_blocks, n)?;
        Ok(n)
    }

    /// Vectored read. Each buffer's length must be a multiple of the block length.
    pub async fn readv(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        self.vectored(false, offset_blocks, bufs).await
    }

    /// Vectored write. Each buffer's length must be a multiple of the block length.
    pub async fn writev(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        self.vectored(true, offset_blocks, bufs).await
    }

    /// [`Descriptor::readv`] or [`Descriptor::writev`]: the checks (alive, writable for a
    /// write, supported, buffers, range), then the device's call, recorded.
    async fn vectored(
        &self,
        write: bool,
        offset_blocks: u64,
        bufs: Vec<IoBuf>,
    ) -> Result<Vec<IoBuf>> {
        self.check_alive()?;
        if write {
            self.check_write()?;
        }
        let (io_type, kind) = if write {
            (IoType::Write, IoKind::Write)
        } else {
            (IoType::Read, IoKind::Read)
        };
        self.check_supported(io_type)?;
        let n = self.check_bufs(offset_blocks, &bufs)?;
        if n == 0 {
            return Ok(bufs);
        }
        if write {
            self.tracked(kind, n, self.dev.writev(offset_blocks, bufs))
                .await
        } else {
            self.tracked(kind, n, self.dev.readv(offset_blocks, bufs))
                .await
        }
    }

    /// Flush.
    pub async fn flush(&self) -> Result<()> {
        self.check_alive()?;
        self.check_supported(IoType::Flush)?;
        self.tracked(IoKind::Flush, 0, self.dev.flush()).await
    }

    /// Unmap a range (EINVAL for zero blocks, as SPDK).
    pub async fn unmap(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
        self.check_alive()?;
        self.check_write()?;
        self.check_supported(IoType::Unmap)?;
        if num_blocks == 0 {
            return Err(BdevError::InvalidArgument("cannot unmap 0 blocks".into()));
        }
        self.check_range(offset_blocks, num_blocks)?;
        self.tracked(
            IoKind::Unmap,
            num_blocks,
            self.dev.unmap(offset_blocks, num_blocks),
        )
        .await
    }

    /// Write zeroes over a range. When the device lacks write_zeroes but can write, it is
    /// emulated with writes of a zeroed buffer (as SPDK's bdev layer does).
    pub async fn write_zeroes(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
        self.check_alive()?;
        self.check_write()?;
        let native = self.dev.io_type_supported(IoType::WriteZeroes);
        if !native && !self.dev.io_type_supported(IoType::Write) {
            return Err(BdevError::NotSupported(IoType::WriteZeroes));
        }
        self.check_range(offset_blocks, num_blocks)?;
        if num_blocks == 0 {
            return Ok(());
        }
        self.tracked(
            IoKind::WriteZeroes,
            0,
            self.write_zeroes_inner(native, offset_blocks, num_blocks),
        )
        .await
    }

    async fn write_zeroes_inner(
        &self,
        native: bool,
        offset_blocks: u64,
        num_blocks: u64,
    ) -> Result<()> {
        if native {
            return self.dev.write_zeroes(offset_blocks, num_blocks).await;
        }
        let bl = self.dev.block_len() as u64;
        let chunk_blocks = (ZERO_CHUNK as u64 / bl).max(1);
        let mut buf: Option<IoBuf> = None;
        let mut off = offset_blocks;
        let end = offset_blocks + num_blocks;
        while off < end {
            let n = chunk_blocks.min(end - off);
            let len = (n * bl) as usize;
            let b = match buf.take() {
                Some(b) if b.len() == len => b,
                _ => IoBuf::new(len, self.dev.buf_align()),
            };
            buf = Some(self.dev.write(off, b).await?);
            off += n;
        }
        Ok(())
    }

    /// Reset.
    pub async fn reset(&self) -> Result<()> {
        self.check_alive()?;
        self.check_supported(IoType::Reset)?;
        self.tracked(IoKind::Reset, 0, self.dev.reset()).await
    }
}
