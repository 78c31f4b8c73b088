//! The read-only bdev itself, its creation and its base-event listener.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bdev_core::{
    BdevError, BdevEvent, BlockDevice, ClaimType, DescGuard, DescSlot, Descriptor, IoBuf, IoFuture,
    IoType, Registry,
};
use futures::channel::oneshot;
use futures::stream::{BoxStream, StreamExt};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{Result, RoError};

/// The module name every read-only bdev reports (`BlockDevice::module_name`).
pub const MODULE_NAME: &str = "ro";

/// The product name every read-only bdev reports.
pub const PRODUCT_NAME: &str = "Read-only disk";

/// What to create: the `bdev_ro_create` parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoOpts {
    /// The base bdev: name, alias or UUID.
    pub base_bdev_name: String,
    /// Name of the new bdev; `<base name>_ro` when absent.
    pub name: Option<String>,
    /// UUID of the new bdev; random when absent.
    pub uuid: Option<Uuid>,
}

/// What the bdev and its listener task share.
struct Shared {
    /// Current size in blocks (follows the base's resize events).
    num_blocks: AtomicU64,
    /// The read-only, `read_many_write_none`-claimed descriptor on the base. A read in
    /// flight keeps the descriptor open until it completes even after the slot was closed
    /// (without a lock or a reference count per read, see [`DescSlot`]); the base's
    /// unregister waits for exactly that.
    base: DescSlot,
    /// Set while the listener handles the base's removal: it then closes the base descriptor
    /// itself, after our unregister has fully finished, so that by the time the base is gone
    /// the read-only bdev is gone from the registry too.
    base_removing: AtomicBool,
}

/// A read-only view of a base bdev. Reads pass through; every write-class I/O type is
/// unsupported and fails with ENOTSUP. See the crate documentation for the life cycle.
pub struct RoBdev {
    name: String,
    uuid: Uuid,
    base_name: String,
    base_uuid: Uuid,
    block_len: u32,
    buf_align: usize,
    optimal_io_boundary: u32,
    shared: Arc<Shared>,
    /// Tells the listener task to stop (sent by `destruct`).
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl RoBdev {
    /// Name of the base bdev, as it was when the read-only bdev was created.
    pub fn base_bdev_name(&self) -> &str {
        &self.base_name
    }

    /// UUID of the base bdev.
    pub fn base_bdev_uuid(&self) -> Uuid {
        self.base_uuid
    }

    /// Whether the base descriptor is still held (false once the base was removed or the
    /// read-only bdev was destructed).
    pub fn has_base(&self) -> bool {
        !self.shared.base.is_closed()
    }

    fn base(&self) -> bdev_core::Result<DescGuard<'_>> {
        self.shared.base.get().ok_or_else(|| self.base_gone())
    }

    fn base_gone(&self) -> BdevError {
        BdevError::Io(std::io::Error::other(format!(
            "base bdev {} of read-only bdev {} was removed",
            self.base_name, self.name
        )))
    }

    /// A base that reports itself removed (ENODEV) turns into EIO for our openers: to them the
    /// read-only bdev still exists until its own remove event arrives.
    fn map_base_err(&self, e: BdevError) -> BdevError {
        match e {
            BdevError::NoDevice(_) => self.base_gone(),
            other => other,
        }
    }

    fn unsupported(&self, io_type: IoType) -> BdevError {
        tracing::debug!(target: "bdev", bdev = %self.name, ?io_type, "write-class i/o to a read-only bdev");
        BdevError::NotSupported(io_type)
    }
}

#[async_trait]
impl BlockDevice for RoBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        PRODUCT_NAME
    }
    fn module_name(&self) -> &str {
        MODULE_NAME
    }
    fn uuid(&self) -> Uuid {
        self.uuid
    }
    fn block_len(&self) -> u32 {
        self.block_len
    }
    fn num_blocks(&self) -> u64 {
        self.shared.num_blocks.load(Ordering::Acquire)
    }
    fn buf_align(&self) -> usize {
        self.buf_align
    }
    fn optimal_io_boundary(&self) -> u32 {
        self.optimal_io_boundary
    }
    fn io_type_supported(&self, io_type: IoType) -> bool {
        match io_type {
            // A flush goes to the base (a writer elsewhere may want it through us too; with
            // nothing to write back it completes at once).
            IoType::Read | IoType::Flush => true,
            // No seek operations exist in the device trait, and a reset could disturb the
            // base's other users.
            IoType::Write
            | IoType::Unmap
            | IoType::Reset
            | IoType::WriteZeroes
            | IoType::SeekHole
            | IoType::SeekData => false,
        }
    }
    async fn read(&self, offset_blocks: u64, buf: IoBuf) -> bdev_core::Result<IoBuf> {
        self.read_io(offset_blocks, buf).await
    }
    fn read_io(&self, offset_blocks: u64, buf: IoBuf) -> IoFuture<'_, bdev_core::Result<IoBuf>> {
        // The base's request future sits inside ours, in a pooled block: no allocation.
        IoFuture::new(async move {
            let base = self.base()?;
            base.read_io(offset_blocks, buf)
                .await
                .map_err(|e| self.map_base_err(e))
        })
    }
    async fn readv(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> bdev_core::Result<Vec<IoBuf>> {
        let base = self.base()?;
        base.readv(offset_blocks, bufs)
            .await
            .map_err(|e| self.map_base_err(e))
    }
    async fn write(&self, _offset_blocks: u64, _buf: IoBuf) -> bdev_core::Result<IoBuf> {
        Err(self.unsupported(IoType::Write))
    }
    async fn writev(
        &self,
        _offset_blocks: u64,
        _bufs: Vec<IoBuf>,
    ) -> bdev_core::Result<Vec<IoBuf>> {
        Err(self.unsupported(IoType::Write))
    }
    async fn flush(&self) -> bdev_core::Result<()> {
        let base = self.base()?;
        if !base.io_type_supported(IoType::Flush) {
            return Ok(());
        }
        base.flush().await.map_err(|e| self.map_base_err(e))
    }
    fn has_volatile_cache(&self) -> bool {
        self.base()
            .map(|b| b.device().has_volatile_cache())
            .unwrap_or(false)
    }
    async fn unmap(&self, _offset_blocks: u64, _num_blocks: u64) -> bdev_core::Result<()> {
        Err(self.unsupported(IoType::Unmap))
    }
    async fn write_zeroes(&self, _offset_blocks: u64, _num_blocks: u64) -> bdev_core::Result<()> {
        Err(self.unsupported(IoType::WriteZeroes))
    }
    async fn reset(&self) -> bdev_core::Result<()> {
        Err(self.unsupported(IoType::Reset))
    }
    fn driver_specific(&self) -> Value {
        json!({
            "ro": {
                "base_bdev_name": self.base_name,
                "base_bdev_uuid": self.base_uuid.to_string(),
            }
        })
    }
    fn write_config(&self) -> Option<Value> {
        Some(json!({
            "method": "bdev_ro_create",
            "params": {
                "base_bdev_name": self.base_name,
                "name": self.name,
                "uuid": self.uuid.to_string(),
            }
        }))
    }
    async fn destruct(&self) {
        if !self.shared.base_removing.load(Ordering::Acquire) {
            // Releases the claim on the base once the last in-flight read is done.
            self.shared.base.close();
        }
        if let Some(stop) = self.stop.lock().ok().and_then(|mut s| s.take()) {
            let _ = stop.send(());
        }
    }
}

/// Creates a read-only bdev over `opts.base_bdev_name` and registers it.
///
/// The base is opened read-only and claimed `read_many_write_none`, so nobody can open it for
/// writing while the read-only bdev exists (several read-only bdevs share that claim). The
/// read-only bdev also claims itself `read_many_write_none` so that a write open of it fails
/// with EPERM. Errors: unknown base → [`RoError::BaseNotFound`] (ENODEV); a base open for
/// writing → EPERM; duplicate name or UUID → EEXIST.
pub async fn create(registry: &Registry, opts: RoOpts) -> Result<Arc<RoBdev>> {
    if registry.get(&opts.base_bdev_name).is_none() {
        return Err(RoError::BaseNotFound(opts.base_bdev_name));
    }
    let mut base = registry
        .open(&opts.base_bdev_name, false)
        .map_err(|e| match e {
            BdevError::NoDevice(_) => RoError::BaseNotFound(opts.base_bdev_name.clone()),
            other => RoError::Bdev(other),
        })?;
    base.claim(ClaimType::ReadManyWriteNone)?;
    let base_events = base.take_events();
    let dev = base.device().clone();
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| format!("{}_ro", dev.name()));
    let (stop_tx, stop_rx) = oneshot::channel();
    let shared = Arc::new(Shared {
        num_blocks: AtomicU64::new(dev.num_blocks()),
        base: DescSlot::new(base),
        base_removing: AtomicBool::new(false),
    });
    let ro = Arc::new(RoBdev {
        name: name.clone(),
        uuid: opts.uuid.unwrap_or_else(Uuid::new_v4),
        base_name: dev.name().to_string(),
        base_uuid: dev.uuid(),
        block_len: dev.block_len(),
        buf_align: dev.buf_align(),
        optimal_io_boundary: dev.optimal_io_boundary(),
        shared: shared.clone(),
        stop: Mutex::new(Some(stop_tx)),
    });
    // On failure `ro` (and with it the base descriptor and its claim) is dropped here.
    registry.register(ro.clone()).await?;

    let (guard, guard_events) = match self_guard(registry, &name) {
        Ok(mut g) => {
            let ev = g.take_events();
            (Some(g), ev)
        }
        Err(e) => {
            tracing::warn!(target: "bdev", bdev = %name, error = %e,
                "cannot claim read-only bdev; write opens of it will not be refused");
            (None, None)
        }
    };
    let listener = Listener {
        registry: registry.clone(),
        name,
        shared,
        guard,
    };
    registry.spawn(Box::pin(listener.run(
        base_events.map(|r| r.boxed()),
        guard_events.map(|r| r.boxed()),
        stop_rx,
    )));
    tracing::info!(target: "bdev", bdev = %ro.name, base = %ro.base_name, "read-only bdev created");
    Ok(ro)
}

/// A read-only descriptor on the new bdev, claimed `read_many_write_none`, so that the
/// registry refuses write opens of it with EPERM while esnap clones can still share the claim.
fn self_guard(registry: &Registry, name: &str) -> bdev_core::Result<Descriptor> {
    let d = registry.open(name, false)?;
    d.claim(ClaimType::ReadManyWriteNone)?;
    Ok(d)
}

/// Deletes a read-only bdev: unregisters it (its openers get a remove event and the call waits
/// until they closed), which releases the claim on the base. A bdev of another module, or no
/// bdev at all, is [`RoError::NotFound`] (ENODEV).
pub async fn delete(registry: &Registry, name: &str) -> Result<()> {
    match registry.get(name) {
        Some(dev) if dev.module_name() == MODULE_NAME => {
            let real = dev.name().to_string();
            drop(dev);
            registry.unregister(&real).await.map_err(|e| match e {
                BdevError::NoDevice(_) => RoError::NotFound(name.to_string()),
                other => RoError::Bdev(other),
            })
        }
        _ => Err(RoError::NotFound(name.to_string())),
    }
}

/// The background task of one read-only bdev: follows the base's events and closes the
/// self-claim guard when the read-only bdev itself is being unregistered.
struct Listener {
    registry: Registry,
    name: String,
    shared: Arc<Shared>,
    guard: Option<Descriptor>,
}

impl Listener {
    async fn run(
        mut self,
        base_events: Option<BoxStream<'static, BdevEvent>>,
        guard_events: Option<BoxStream<'static, BdevEvent>>,
        stop: oneshot::Receiver<()>,
    ) {
        let mut base_events = base_events
            .unwrap_or_else(|| futures::stream::pending().boxed())
            .fuse();
        let mut guard_events = guard_events
            .unwrap_or_else(|| futures::stream::pending().boxed())
            .fuse();
        let mut stop = stop;
        loop {
            futures::select! {
                ev = base_events.next() => match ev {
                    Some(BdevEvent::Remove) => {
                        self.base_removed().await;
                        return;
                    }
                    Some(BdevEvent::Resize { num_blocks }) => {
                        self.shared.num_blocks.store(num_blocks, Ordering::Release);
                        tracing::info!(target: "bdev", bdev = %self.name, num_blocks,
                            "base resized");
                        self.registry.notify_resize(&self.name);
                    }
                    // The base descriptor was closed: we were destructed.
                    None => return,
                },
                ev = guard_events.next() => match ev {
                    Some(BdevEvent::Resize { .. }) => {}
                    // We are being unregistered; the registry waits for this descriptor too.
                    Some(BdevEvent::Remove) | None => {
                        self.guard = None;
                        guard_events = futures::stream::pending().boxed().fuse();
                    }
                },
                _ = stop => return,
            }
        }
    }

    /// Surprise removal of the base: unregister ourselves first (our openers get `Remove` and
    /// the call waits for them), then let go of the base so that its removal can complete.
    async fn base_removed(&mut self) {
        tracing::info!(target: "bdev", bdev = %self.name, "base bdev removed; unregistering");
        self.shared.base_removing.store(true, Ordering::Release);
        // Our own guard descriptor would otherwise keep our unregister waiting forever.
        self.guard = None;
        if let Err(e) = self.registry.unregister(&self.name).await {
            tracing::debug!(target: "bdev", bdev = %self.name, error = %e,
                "unregister after base removal");
        }
        self.shared.base.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdev_core::Registry;
    use futures::executor::block_on;
    use iobuf::IoBuf;
    use std::sync::atomic::AtomicUsize;

    /// A base (`C`, 8 blocks of 512 bytes) that counts flushes and says whether it has a
    /// volatile cache.
    struct Counting {
        name: String,
        uuid: Uuid,
        block_len: u32,
        num_blocks: AtomicU64,
        flushes: AtomicUsize,
        volatile: bool,
    }

    impl Counting {
        fn new(volatile: bool) -> Self {
            Counting {
                name: "C".into(),
                uuid: Uuid::from_u128(7),
                block_len: 512,
                num_blocks: AtomicU64::new(8),
                flushes: AtomicUsize::new(0),
                volatile,
            }
        }
    }

    #[async_trait]
    impl BlockDevice for Counting {
        bdev_core::device_facts!(product: "counting", module: "test");
        fn io_type_supported(&self, t: IoType) -> bool {
            matches!(t, IoType::Read | IoType::Write | IoType::Flush)
        }
        async fn read(&self, _o: u64, buf: IoBuf) -> bdev_core::Result<IoBuf> {
            Ok(buf)
        }
        async fn write(&self, _o: u64, buf: IoBuf) -> bdev_core::Result<IoBuf> {
            Ok(buf)
        }
        async fn flush(&self) -> bdev_core::Result<()> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn has_volatile_cache(&self) -> bool {
            self.volatile
        }
        async fn unmap(&self, _o: u64, _n: u64) -> bdev_core::Result<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _o: u64, _n: u64) -> bdev_core::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn flush_reaches_the_base_and_the_cache_capability_follows_it() {
        for volatile in [true, false] {
            let reg = Registry::new();
            let base = Arc::new(Counting::new(volatile));
            block_on(reg.register(base.clone())).unwrap();
            let opts = crate::RoOpts {
                base_bdev_name: "C".into(),
                name: Some("r".into()),
                uuid: None,
            };
            block_on(crate::create(&reg, opts)).unwrap();
            let d = reg.open("r", false).unwrap();
            assert!(d.io_type_supported(IoType::Flush));
            assert_eq!(d.device().has_volatile_cache(), volatile);
            block_on(d.flush()).unwrap();
            block_on(d.flush()).unwrap();
            assert_eq!(base.flushes.load(Ordering::SeqCst), 2);
        }
    }
}
