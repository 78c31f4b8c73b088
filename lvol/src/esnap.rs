//! External snapshots seen from the lvol layer: the device factory the blobstore calls when it
//! opens an esnap clone, the shared per-store map from esnap id to the open base, the degraded
//! device that stands in for a missing base, surprise removal and healing.
//!
//! One base bdev is opened (read-only, claim `read_many_write_none`) at most once per store,
//! however many blobs use it. The map is keyed by the esnap id bytes (the base's UUID string
//! plus NUL) and remembers which blobs currently hold the base as their back device: each
//! holder is kept as a weak [`EsnapHolder`] (an lvol), which is all a removal or a heal
//! needs, so this file knows neither the store nor the lvol type.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use bdev_core::{ClaimType, Registry};
use blobstore::{Blob, BlobId, BsDev, BsError, EsnapDevFactory};
use futures::channel::oneshot;
use uuid::Uuid;

use crate::bs_dev::BdevBsDev;

/// The device that stands in for a missing external snapshot: every read fails with EIO, it
/// is never zeroes and it reports itself degraded (the blobstore's [`blobstore::MissingDev`]).
pub use blobstore::MissingDev as DegradedDev;

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

/// What the esnap state needs of a blob whose back device is an external snapshot: the open
/// blob (to swap its back device) and a name for logs. An lvol is one.
pub(crate) trait EsnapHolder: Send + Sync {
    /// The open blob.
    fn holder_blob(&self) -> &Blob;
    /// Name for logs.
    fn holder_name(&self) -> String;
}

/// The holders of one external snapshot: blob id to the holder, `None` between the blob's
/// open (the factory call) and the store's next [`EsnapCtx::refresh_holders`].
pub(crate) type Holders = BTreeMap<BlobId, Option<Weak<dyn EsnapHolder>>>;

#[derive(Default)]
pub(crate) struct EsnapEntry {
    /// The open base, `None` while it is missing.
    pub(crate) dev: Option<Arc<BdevBsDev>>,
    /// Blobs whose back device is this external snapshot.
    pub(crate) holders: Holders,
    stop: Option<oneshot::Sender<()>>,
}

/// Per-store esnap state; it is also the store's [`EsnapDevFactory`].
pub(crate) struct EsnapCtx {
    registry: Registry,
    pub(crate) map: Mutex<BTreeMap<Vec<u8>, EsnapEntry>>,
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
                if !crate::bs_dev::until_removed(events, rx).await {
                    return;
                }
                if let (Some(ctx), Some(dev)) = (weak.upgrade(), dev_weak.upgrade()) {
                    ctx.base_removed(&id, &dev).await;
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

    /// The live holders of `esnap_id`.
    fn live_holders(&self, esnap_id: &[u8]) -> Vec<Arc<dyn EsnapHolder>> {
        self.lock()
            .get(esnap_id)
            .map(|e| {
                e.holders
                    .values()
                    .filter_map(|h| h.as_ref().and_then(Weak::upgrade))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Surprise removal of a base: every holder switches to the degraded device, then the
    /// descriptor is closed so the removal can complete.
    async fn base_removed(self: &Arc<Self>, esnap_id: &[u8], dev: &Arc<BdevBsDev>) {
        let ours = {
            let mut map = self.lock();
            match map.get_mut(esnap_id) {
                Some(e) if e.dev.as_ref().is_some_and(|d| Arc::ptr_eq(d, dev)) => {
                    e.dev = None;
                    e.stop = None;
                    true
                }
                _ => false,
            }
        };
        let holders = if ours {
            self.live_holders(esnap_id)
        } else {
            Vec::new()
        };
        tracing::info!(target: "lvol", "external snapshot {:?} removed; {} holders degraded",
            esnap_id_name(esnap_id), holders.len());
        for h in holders {
            if let Err(e) = h
                .holder_blob()
                .set_esnap_dev(Some(Arc::new(DegradedDev)))
                .await
            {
                tracing::warn!(target: "lvol", "degrading {}: {e}", h.holder_name());
            }
        }
        dev.close();
    }

    /// Heals every degraded holder of `esnap_id` whose base is now available. Returns how many
    /// were healed; failures stay degraded and are retried next time.
    pub(crate) async fn heal(self: &Arc<Self>, esnap_id: &[u8]) -> usize {
        let degraded: Vec<_> = self
            .live_holders(esnap_id)
            .into_iter()
            .filter(|h| h.holder_blob().is_degraded())
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
        for h in degraded {
            match h.holder_blob().set_esnap_dev(Some(dev.clone())).await {
                Ok(()) => healed += 1,
                Err(e) => tracing::warn!(target: "lvol", "healing {}: {e}", h.holder_name()),
            }
        }
        healed
    }

    /// Re-computes holders from the store's blobs (after a snapshot, delete, inflate, ...), and
    /// closes bases nobody holds any more.
    pub(crate) fn refresh_holders(
        &self,
        holders: BTreeMap<Vec<u8>, BTreeMap<BlobId, Weak<dyn EsnapHolder>>>,
    ) {
        let mut to_close = Vec::new();
        {
            let mut map = self.lock();
            for (id, set) in &holders {
                map.entry(id.clone()).or_default().holders =
                    set.iter().map(|(b, h)| (*b, Some(h.clone()))).collect();
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
            .entry(blob_id)
            .or_insert(None);
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
}
