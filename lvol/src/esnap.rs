//! External snapshots seen from the lvol layer: the device factory the blobstore calls when it
//! opens an esnap clone, the shared per-store map from esnap id to the open base, the degraded
//! device that stands in for a missing base, surprise removal and healing.
//!
//! One base bdev is opened (read-only, claim `read_many_write_none`) at most once per store,
//! however many blobs use it. The map is keyed by the esnap id bytes (the base's UUID string
//! plus NUL) and remembers which blobs currently hold the base as their back device.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bdev_core::{BdevEvent, ClaimType, Registry};
use blobstore::{BlobId, BsDev, BsError, EsnapDevFactory};
use futures::channel::oneshot;
use futures::StreamExt;
use iobuf::IoBuf;
use uuid::Uuid;

use crate::bs_dev::BdevBsDev;
use crate::store::LvolStore;

/// Default number of retries of an I/O that needs a missing external snapshot.
pub const DEFAULT_ESNAP_RETRIES: u32 = 3;
/// Default delay between two such retries, in milliseconds.
pub const DEFAULT_ESNAP_RETRY_DELAY_MS: u64 = 100;

/// How I/O that needs a missing external snapshot is retried before it fails with EIO.
#[derive(Debug)]
pub struct EsnapRetry {
    retries: AtomicU32,
    delay_ms: AtomicU64,
    /// Retries done so far (metrics).
    retried: AtomicU64,
    /// Requests that failed with EIO after their retries (metrics).
    gave_up: AtomicU64,
}

impl Default for EsnapRetry {
    fn default() -> Self {
        EsnapRetry {
            retries: AtomicU32::new(DEFAULT_ESNAP_RETRIES),
            delay_ms: AtomicU64::new(DEFAULT_ESNAP_RETRY_DELAY_MS),
            retried: AtomicU64::new(0),
            gave_up: AtomicU64::new(0),
        }
    }
}

impl EsnapRetry {
    /// Number of retries after the first failure.
    pub fn retries(&self) -> u32 {
        self.retries.load(Ordering::Relaxed)
    }
    /// Delay between retries.
    pub fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::Relaxed))
    }
    /// Counts one retry.
    pub fn note_retry(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }
    /// Counts one request failed with EIO after its retries.
    pub fn note_eio(&self) {
        self.gave_up.fetch_add(1, Ordering::Relaxed);
    }
    /// (retries done, requests failed with EIO) since start.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.retried.load(Ordering::Relaxed),
            self.gave_up.load(Ordering::Relaxed),
        )
    }
    /// Sets both values.
    pub fn set(&self, retries: u32, delay: Duration) {
        self.retries.store(retries, Ordering::Relaxed);
        self.delay_ms.store(
            delay.as_millis().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }
}

/// The device that stands in for a missing external snapshot: every read fails with EIO, it
/// is never zeroes and it reports itself degraded.
pub struct DegradedDev;

fn eio() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EIO)
}

#[async_trait]
impl BsDev for DegradedDev {
    fn block_len(&self) -> u32 {
        512
    }
    fn block_count(&self) -> u64 {
        // Large, so that nothing is ever "past the end" (which would read as zeroes).
        1 << 50
    }
    async fn read(&self, _lba: u64, _buf: IoBuf) -> std::io::Result<IoBuf> {
        Err(eio())
    }
    async fn write(&self, _lba: u64, _buf: IoBuf) -> std::io::Result<IoBuf> {
        Err(std::io::Error::from_raw_os_error(libc::EPERM))
    }
    async fn write_zeroes(&self, _lba: u64, _lba_count: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EPERM))
    }
    async fn unmap(&self, _lba: u64, _lba_count: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EPERM))
    }
    async fn flush(&self) -> std::io::Result<()> {
        // Never written: nothing to make durable.
        Ok(())
    }
    fn is_degraded(&self) -> bool {
        true
    }
}

/// The esnap id SPDK stores for a bdev: its lowercase UUID string plus NUL (37 bytes).
pub fn esnap_id_for(uuid: &Uuid) -> Vec<u8> {
    let mut v = uuid.hyphenated().to_string().into_bytes();
    v.push(0);
    v
}

/// Parses an esnap id written by [`esnap_id_for`] (exactly 37 bytes, NUL last).
pub fn parse_esnap_id(id: &[u8]) -> Option<Uuid> {
    if id.len() != 37 || id[36] != 0 {
        return None;
    }
    let s = std::str::from_utf8(&id[..36]).ok()?;
    Uuid::parse_str(s).ok()
}

/// The printable name of an esnap id: the bytes before the first NUL, if there is a NUL and
/// they are UTF-8 (SPDK prints `external_snapshot_name` only in that case).
pub fn esnap_id_name(id: &[u8]) -> Option<String> {
    let nul = id.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&id[..nul]).ok().map(str::to_string)
}

#[derive(Default)]
pub(crate) struct EsnapEntry {
    /// The open base, `None` while it is missing.
    pub(crate) dev: Option<Arc<BdevBsDev>>,
    /// Blobs whose back device is this external snapshot.
    pub(crate) holders: BTreeSet<BlobId>,
    stop: Option<oneshot::Sender<()>>,
}

/// Per-store esnap state; it is also the store's [`EsnapDevFactory`].
pub(crate) struct EsnapCtx {
    registry: Registry,
    pub(crate) map: Mutex<BTreeMap<Vec<u8>, EsnapEntry>>,
    pub(crate) store: Mutex<Weak<LvolStore>>,
    /// The store's io unit once known (0 before): a base whose block size does not divide it
    /// cannot serve the store and is treated as missing.
    pub(crate) io_unit: AtomicU32,
}

fn bs_errno(errno: i32) -> BsError {
    BsError::Io(std::io::Error::from_raw_os_error(errno))
}

impl EsnapCtx {
    pub(crate) fn new(registry: Registry) -> Arc<Self> {
        Arc::new(EsnapCtx {
            registry,
            map: Mutex::new(BTreeMap::new()),
            store: Mutex::new(Weak::new()),
            io_unit: AtomicU32::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<u8>, EsnapEntry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens the base bdev for `esnap_id` read-only, claims it and starts its remove listener.
    fn open_base(self: &Arc<Self>, esnap_id: &[u8]) -> std::io::Result<Arc<BdevBsDev>> {
        let uuid = parse_esnap_id(esnap_id)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut desc = self.registry.open(&uuid.hyphenated().to_string(), false)?;
        let io_unit = self.io_unit.load(Ordering::Relaxed);
        let bl = desc.device().block_len();
        if io_unit != 0 && io_unit.checked_rem(bl) != Some(0) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        desc.claim(ClaimType::ReadManyWriteNone)?;
        let events = desc.take_events();
        let dev = Arc::new(BdevBsDev::new(desc));
        let (tx, rx) = oneshot::channel::<()>();
        if let Some(events) = events {
            let weak = Arc::downgrade(self);
            let id = esnap_id.to_vec();
            let dev_weak = Arc::downgrade(&dev);
            self.registry.spawn(Box::pin(async move {
                let mut events = events;
                let mut rx = rx;
                loop {
                    let ev = futures::select! {
                        ev = events.next() => ev,
                        _ = &mut rx => None,
                    };
                    match ev {
                        Some(BdevEvent::Remove) => {
                            if let (Some(ctx), Some(dev)) = (weak.upgrade(), dev_weak.upgrade()) {
                                ctx.base_removed(&id, &dev).await;
                            }
                            break;
                        }
                        Some(BdevEvent::Resize { .. }) => continue,
                        None => break,
                    }
                }
            }));
        }
        // Remember the stop handle only if this device becomes the entry's device.
        let mut map = self.lock();
        let entry = map.entry(esnap_id.to_vec()).or_default();
        if entry.dev.is_none() {
            entry.dev = Some(dev.clone());
            entry.stop = Some(tx);
            Ok(dev)
        } else if let Some(existing) = entry.dev.clone() {
            drop(map);
            dev.close();
            Ok(existing)
        } else {
            Ok(dev)
        }
    }

    /// Returns the shared device for `esnap_id`, opening it if needed.
    pub(crate) fn get_or_open(
        self: &Arc<Self>,
        esnap_id: &[u8],
    ) -> std::io::Result<Arc<BdevBsDev>> {
        if let Some(dev) = self.lock().get(esnap_id).and_then(|e| e.dev.clone()) {
            return Ok(dev);
        }
        self.open_base(esnap_id)
    }

    /// Whether the base for `esnap_id` is currently missing.
    pub(crate) fn is_missing(&self, esnap_id: &[u8]) -> bool {
        self.lock()
            .get(esnap_id)
            .map(|e| e.dev.is_none())
            .unwrap_or(true)
    }

    /// Surprise removal of a base: every holder switches to the degraded device, then the
    /// descriptor is closed so the removal can complete.
    async fn base_removed(self: &Arc<Self>, esnap_id: &[u8], dev: &Arc<BdevBsDev>) {
        let holders: Vec<BlobId> = {
            let mut map = self.lock();
            match map.get_mut(esnap_id) {
                Some(e) if e.dev.as_ref().is_some_and(|d| Arc::ptr_eq(d, dev)) => {
                    e.dev = None;
                    e.stop = None;
                    e.holders.iter().copied().collect()
                }
                _ => Vec::new(),
            }
        };
        tracing::info!(target: "lvol", "external snapshot {:?} removed; {} holders degraded",
            esnap_id_name(esnap_id), holders.len());
        let store = self.store.lock().ok().and_then(|s| s.upgrade());
        if let Some(store) = store {
            for id in holders {
                if let Some(lvol) = store.lvol_by_blob(id) {
                    if let Err(e) = lvol.blob().set_esnap_dev(Some(Arc::new(DegradedDev))).await {
                        tracing::warn!(target: "lvol", "degrading blob {id:#x}: {e}");
                    }
                }
            }
        }
        dev.close();
    }

    /// Heals every degraded holder of `esnap_id` whose base is now available. Returns how many
    /// were healed; failures stay degraded and are retried next time.
    pub(crate) async fn heal(self: &Arc<Self>, esnap_id: &[u8]) -> usize {
        let holders: Vec<BlobId> = match self.lock().get(esnap_id) {
            Some(e) => e.holders.iter().copied().collect(),
            None => return 0,
        };
        let store = match self.store.lock().ok().and_then(|s| s.upgrade()) {
            Some(s) => s,
            None => return 0,
        };
        let degraded: Vec<_> = holders
            .into_iter()
            .filter_map(|id| store.lvol_by_blob(id))
            .filter(|l| l.blob().is_degraded())
            .collect();
        if degraded.is_empty() {
            return 0;
        }
        let dev = match self.get_or_open(esnap_id) {
            Ok(d) => d,
            Err(e) => {
                tracing::info!(target: "lvol", "external snapshot {:?} still missing: {e}",
                    esnap_id_name(esnap_id));
                return 0;
            }
        };
        let mut healed = 0;
        for lvol in degraded {
            match lvol.blob().set_esnap_dev(Some(dev.clone())).await {
                Ok(()) => healed += 1,
                Err(e) => tracing::warn!(target: "lvol", "healing {}: {e}", lvol.name()),
            }
        }
        healed
    }

    /// Re-computes holders from the store's blobs (after a snapshot, delete, inflate, ...), and
    /// closes bases nobody holds any more.
    pub(crate) fn refresh_holders(&self, holders: BTreeMap<Vec<u8>, BTreeSet<BlobId>>) {
        let mut to_close = Vec::new();
        {
            let mut map = self.lock();
            for (id, set) in &holders {
                map.entry(id.clone()).or_default().holders = set.clone();
            }
            let gone: Vec<Vec<u8>> = map
                .keys()
                .filter(|k| !holders.contains_key(*k))
                .cloned()
                .collect();
            for k in gone {
                if let Some(e) = map.remove(&k) {
                    if let Some(d) = e.dev {
                        to_close.push(d);
                    }
                }
            }
        }
        for d in to_close {
            d.close();
        }
    }

    /// Closes every base (store unload).
    pub(crate) fn close_all(&self) {
        let entries: Vec<EsnapEntry> = {
            let mut map = self.lock();
            std::mem::take(&mut *map).into_values().collect()
        };
        for e in entries {
            if let Some(d) = e.dev {
                d.close();
            }
        }
    }

    /// Esnap ids whose base is missing.
    pub(crate) fn missing_ids(&self) -> Vec<Vec<u8>> {
        self.lock()
            .iter()
            .filter(|(_, e)| e.dev.is_none())
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// The factory handed to the blobstore.
pub(crate) struct Factory(pub(crate) Arc<EsnapCtx>);

#[async_trait]
impl EsnapDevFactory for Factory {
    async fn create(
        &self,
        blob_id: BlobId,
        esnap_id: &[u8],
    ) -> blobstore::Result<Option<Arc<dyn BsDev>>> {
        if parse_esnap_id(esnap_id).is_none() {
            return Err(bs_errno(libc::EINVAL));
        }
        self.0
            .lock()
            .entry(esnap_id.to_vec())
            .or_default()
            .holders
            .insert(blob_id);
        match self.0.get_or_open(esnap_id) {
            Ok(dev) => Ok(Some(dev as Arc<dyn BsDev>)),
            Err(e) => {
                tracing::info!(target: "lvol", "blob {blob_id:#x}: external snapshot {:?} missing ({e}); degraded",
                    esnap_id_name(esnap_id));
                Ok(Some(Arc::new(DegradedDev)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esnap_id_round_trip() {
        let u = Uuid::parse_str("7E5A0000-E5A0-4E5A-8E5A-000000000001").unwrap();
        let id = esnap_id_for(&u);
        assert_eq!(id.len(), 37);
        assert_eq!(&id[..36], b"7e5a0000-e5a0-4e5a-8e5a-000000000001");
        assert_eq!(parse_esnap_id(&id), Some(u));
        assert_eq!(parse_esnap_id(&id[..36]), None);
        assert_eq!(
            esnap_id_name(&id).as_deref(),
            Some("7e5a0000-e5a0-4e5a-8e5a-000000000001")
        );
        assert_eq!(esnap_id_name(b"abc"), None);
    }

    #[test]
    fn retry_settings() {
        let r = EsnapRetry::default();
        assert_eq!(r.retries(), 3);
        assert_eq!(r.delay(), Duration::from_millis(100));
        r.set(5, Duration::from_millis(7));
        assert_eq!(r.retries(), 5);
        assert_eq!(r.delay(), Duration::from_millis(7));
    }
}
