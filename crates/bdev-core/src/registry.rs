//! The device registry and descriptors. (Contract only; implemented in the bdev-core issue.)

use std::sync::Arc;

use async_trait::async_trait;
use futures::channel::mpsc::UnboundedReceiver;
use iobuf::IoBuf;
use uuid::Uuid;

use crate::{BdevEvent, BlockDevice, ClaimType, Result};

/// A module callback that sees every newly registered device (SPDK `examine_disk`).
#[async_trait]
pub trait ExamineHook: Send + Sync + 'static {
    /// Called after `name` was registered. Errors are the hook's own business (log them).
    async fn examine(&self, registry: &Registry, name: &str);
}

/// The registry of block devices. Cheap to clone (a shared handle); a process (or a test)
/// creates one and passes it around; there is no global.
#[derive(Clone)]
pub struct Registry {
    _private: Arc<()>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        todo!()
    }
    /// Registers a device, then runs every examine hook on it. A duplicate name, alias or UUID
    /// is refused with `AlreadyExists` (EEXIST).
    pub async fn register(&self, dev: Arc<dyn BlockDevice>) -> Result<()> {
        let _ = dev;
        todo!()
    }
    /// Hot-removes a device: sends `Remove` to every open descriptor, waits until all of them
    /// are closed (in-flight I/O completes or fails), then calls `destruct` and forgets it.
    pub async fn unregister(&self, name_or_alias_or_uuid: &str) -> Result<()> {
        let _ = name_or_alias_or_uuid;
        todo!()
    }
    /// Adds an alias (EEXIST if any name, alias or UUID already uses it).
    pub fn add_alias(&self, name: &str, alias: &str) -> Result<()> {
        let _ = (name, alias);
        todo!()
    }
    /// Removes an alias.
    pub fn remove_alias(&self, name: &str, alias: &str) -> Result<()> {
        let _ = (name, alias);
        todo!()
    }
    /// Aliases of a device, in insertion order.
    pub fn aliases(&self, name: &str) -> Vec<String> {
        let _ = name;
        todo!()
    }
    /// Finds a device by name, alias or UUID string.
    pub fn get(&self, name_or_alias_or_uuid: &str) -> Option<Arc<dyn BlockDevice>> {
        let _ = name_or_alias_or_uuid;
        todo!()
    }
    /// Finds a device by UUID.
    pub fn get_by_uuid(&self, uuid: &Uuid) -> Option<Arc<dyn BlockDevice>> {
        let _ = uuid;
        todo!()
    }
    /// All registered devices, in registration order.
    pub fn list(&self) -> Vec<Arc<dyn BlockDevice>> {
        todo!()
    }
    /// The claim held on a device, if any.
    pub fn claim_of(&self, name: &str) -> Option<ClaimType> {
        let _ = name;
        todo!()
    }
    /// Opens a device by name, alias or UUID. A write open of a device claimed
    /// `ReadManyWriteNone`, or claimed by another descriptor for writing, fails with EPERM.
    pub fn open(&self, name_or_alias_or_uuid: &str, write: bool) -> Result<Descriptor> {
        let _ = (name_or_alias_or_uuid, write);
        todo!()
    }
    /// Adds an examine hook; it sees devices registered from now on.
    pub fn add_examine_hook(&self, hook: Arc<dyn ExamineHook>) {
        let _ = hook;
        todo!()
    }
    /// Waits until every examine started so far has finished.
    pub async fn wait_for_examine(&self) {
        todo!()
    }
    /// Runs a background task (event listeners, deferred work) on the registry's executor: a
    /// small `futures` thread pool by default, or the spawner installed with `set_spawner`.
    pub fn spawn(&self, fut: futures::future::BoxFuture<'static, ()>) {
        let _ = fut;
        todo!()
    }
    /// Installs the application's spawner (e.g. one that calls `tokio::spawn`).
    pub fn set_spawner(
        &self,
        spawner: Arc<dyn Fn(futures::future::BoxFuture<'static, ()>) + Send + Sync>,
    ) {
        let _ = spawner;
        todo!()
    }
    /// Called by a device (or its owner) after its size changed: sends `Resize` to every
    /// descriptor.
    pub fn notify_resize(&self, name: &str) {
        let _ = name;
        todo!()
    }
}

/// An open handle on a device. I/O goes through it: it checks bounds (EINVAL), buffer length
/// and alignment (EINVAL), write permission (EBADF) and removal (ENODEV), and counts in-flight
/// requests. Dropping it closes it (and releases its claim).
pub struct Descriptor {
    _private: (),
}

impl Descriptor {
    /// The device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        todo!()
    }
    /// Whether the descriptor was opened for writing.
    pub fn is_writable(&self) -> bool {
        todo!()
    }
    /// Takes the event receiver (once; `None` afterwards).
    pub fn take_events(&mut self) -> Option<UnboundedReceiver<BdevEvent>> {
        todo!()
    }
    /// Claims the device through this descriptor. A conflicting claim fails with EPERM.
    /// Several `ReadManyWriteNone` claims share; `ReadManyWriteOne` needs a writable descriptor.
    pub fn claim(&self, claim: ClaimType) -> Result<()> {
        let _ = claim;
        todo!()
    }
    /// Releases this descriptor's claim.
    pub fn release_claim(&self) {
        todo!()
    }
    /// Reads into `buf` at `offset_blocks`.
    pub async fn read(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        let _ = (offset_blocks, buf);
        todo!()
    }
    /// Writes `buf` at `offset_blocks`.
    pub async fn write(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        let _ = (offset_blocks, buf);
        todo!()
    }
    /// Vectored read.
    pub async fn readv(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        let _ = (offset_blocks, bufs);
        todo!()
    }
    /// Vectored write.
    pub async fn writev(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        let _ = (offset_blocks, bufs);
        todo!()
    }
    /// Flush.
    pub async fn flush(&self) -> Result<()> {
        todo!()
    }
    /// Unmap a range.
    pub async fn unmap(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
        let _ = (offset_blocks, num_blocks);
        todo!()
    }
    /// Write zeroes over a range.
    pub async fn write_zeroes(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
        let _ = (offset_blocks, num_blocks);
        todo!()
    }
    /// Reset.
    pub async fn reset(&self) -> Result<()> {
        todo!()
    }
}
