//! Devices under the blobstore: a bdev descriptor seen as a [`BsDev`] (SPDK `blob_bdev.c`,
//! from the lvol crate), a copy-on-write overlay that keeps every write in memory (so
//! read-only sessions never touch the device, even when loading a dirty store runs
//! recovery), a byte counter for progress, and the esnap factory that finds external
//! snapshots among the config's bdevs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bdev_core::Registry;
use blobstore::{BlobId, BsDev, EsnapDevFactory, IoBuf};

/// A bdev descriptor as a blobstore device (the lvol crate's adapter, SPDK `blob_bdev.c`).
pub use lvol::BdevBsDev;

/// Reads go to the device, writes stay in memory: the device is never modified.
pub struct OverlayDev {
    inner: Arc<dyn BsDev>,
    blocks: Mutex<BTreeMap<u64, Box<[u8]>>>,
}

impl OverlayDev {
    /// An overlay over `inner`.
    pub fn new(inner: Arc<dyn BsDev>) -> Self {
        OverlayDev {
            inner,
            blocks: Mutex::new(BTreeMap::new()),
        }
    }

    fn put(&self, lba: u64, data: &[u8]) {
        let bl = self.inner.block_len() as usize;
        let mut map = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        for (i, chunk) in data.chunks(bl).enumerate() {
            map.insert(lba + i as u64, chunk.to_vec().into_boxed_slice());
        }
    }
}

/// The geometry methods of a [`BsDev`] wrapper: those of its `inner` device, unchanged.
macro_rules! inner_geometry {
    () => {
        fn block_len(&self) -> u32 {
            self.inner.block_len()
        }
        fn block_count(&self) -> u64 {
            self.inner.block_count()
        }
        fn buf_align(&self) -> usize {
            self.inner.buf_align()
        }
    };
}

#[async_trait]
impl BsDev for OverlayDev {
    inner_geometry!();
    async fn read(&self, lba: u64, buf: IoBuf) -> std::io::Result<IoBuf> {
        let mut buf = self.inner.read(lba, buf).await?;
        let bl = self.inner.block_len() as u64;
        let n = buf.len() as u64 / bl;
        let map = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in map.range(lba..lba.saturating_add(n)) {
            let off = ((k - lba) * bl) as usize;
            buf[off..off + v.len()].copy_from_slice(v);
        }
        Ok(buf)
    }
    async fn write(&self, lba: u64, buf: IoBuf) -> std::io::Result<IoBuf> {
        let n = buf.len() as u64 / self.inner.block_len().max(1) as u64;
        if lba
            .checked_add(n)
            .is_none_or(|end| end > self.inner.block_count())
        {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.put(lba, &buf);
        Ok(buf)
    }
    async fn write_zeroes(&self, lba: u64, lba_count: u64) -> std::io::Result<()> {
        if lba
            .checked_add(lba_count)
            .is_none_or(|end| end > self.inner.block_count())
        {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let zero = vec![0u8; self.inner.block_len() as usize];
        for i in 0..lba_count {
            self.put(lba + i, &zero);
        }
        Ok(())
    }
    async fn unmap(&self, lba: u64, lba_count: u64) -> std::io::Result<()> {
        self.write_zeroes(lba, lba_count).await
    }
    fn unmap_zeroes(&self) -> bool {
        true
    }
    async fn flush(&self) -> std::io::Result<()> {
        // Writes stay in the in-memory overlay and never reach the device.
        Ok(())
    }
}

/// Counts the bytes read through it (for progress of `--check`).
pub struct CountingDev {
    inner: Arc<dyn BsDev>,
    on_read: Box<dyn Fn(u64) + Send + Sync>,
}

impl CountingDev {
    /// Calls `on_read(bytes)` after each read.
    pub fn new(inner: Arc<dyn BsDev>, on_read: Box<dyn Fn(u64) + Send + Sync>) -> Self {
        CountingDev { inner, on_read }
    }
}

#[async_trait]
impl BsDev for CountingDev {
    inner_geometry!();
    async fn read(&self, lba: u64, buf: IoBuf) -> std::io::Result<IoBuf> {
        let buf = self.inner.read(lba, buf).await?;
        (self.on_read)(buf.len() as u64);
        Ok(buf)
    }
    async fn write(&self, lba: u64, buf: IoBuf) -> std::io::Result<IoBuf> {
        self.inner.write(lba, buf).await
    }
    async fn write_zeroes(&self, lba: u64, lba_count: u64) -> std::io::Result<()> {
        self.inner.write_zeroes(lba, lba_count).await
    }
    async fn unmap(&self, lba: u64, lba_count: u64) -> std::io::Result<()> {
        self.inner.unmap(lba, lba_count).await
    }
    fn unmap_zeroes(&self) -> bool {
        self.inner.unmap_zeroes()
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.inner.flush().await
    }
}

/// The text of an esnap id (SPDK stores the bdev UUID or name plus a NUL).
pub fn esnap_id_text(id: &[u8]) -> String {
    let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    String::from_utf8_lossy(&id[..end]).into_owned()
}

/// Finds external snapshots among the registry's bdevs by UUID or name, and opens them
/// read-only.
pub struct RegistryEsnapFactory {
    registry: Registry,
}

impl RegistryEsnapFactory {
    /// A factory over `registry`.
    pub fn new(registry: Registry) -> Self {
        RegistryEsnapFactory { registry }
    }
}

#[async_trait]
impl EsnapDevFactory for RegistryEsnapFactory {
    async fn create(
        &self,
        _blob_id: BlobId,
        esnap_id: &[u8],
    ) -> blobstore::Result<Option<Arc<dyn BsDev>>> {
        let name = esnap_id_text(esnap_id);
        if self.registry.get(&name).is_none() {
            return Ok(None);
        }
        match self.registry.open(&name, false) {
            Ok(desc) => Ok(Some(Arc::new(BdevBsDev::new(desc)))),
            Err(_) => Ok(None),
        }
    }
}

/// Reads `len` bytes at byte offset `off` of a device, whatever its block size.
pub async fn read_bytes(dev: &dyn BsDev, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let bl = dev.block_len() as u64;
    if bl == 0 {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let first = off / bl;
    let last = (off + len as u64).div_ceil(bl);
    if last > dev.block_count() {
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    let nbytes = ((last - first) * bl) as usize;
    let buf = IoBuf::new(nbytes, dev.buf_align().max(1));
    let buf = dev.read(first, buf).await?;
    let skip = (off - first * bl) as usize;
    Ok(buf[skip..skip + len].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use blobstore::ZeroesDev;
    use futures::executor::block_on;

    #[test]
    fn overlay_keeps_writes_in_memory() {
        // ZeroesDev refuses writes: anything reaching it would fail.
        let dev = OverlayDev::new(Arc::new(ZeroesDev));
        block_on(async {
            let data = IoBuf::from_slice(&[7u8; 1024], 1);
            dev.write(10, data).await.unwrap();
            dev.write_zeroes(11, 1).await.unwrap();
            let buf = dev.read(9, IoBuf::new(2048, 1)).await.unwrap();
            assert!(buf[..512].iter().all(|&b| b == 0));
            assert!(buf[512..1024].iter().all(|&b| b == 7));
            assert!(buf[1024..2048].iter().all(|&b| b == 0));
            // An unaligned byte read through the overlay.
            let v = read_bytes(&dev, 10 * 512 + 100, 10).await.unwrap();
            assert_eq!(v, vec![7u8; 10]);
        });
    }

    #[test]
    fn esnap_id_text_stops_at_nul() {
        assert_eq!(
            esnap_id_text(b"7e5a0000-e5a0-4e5a-8e5a-000000000001\0"),
            "7e5a0000-e5a0-4e5a-8e5a-000000000001"
        );
        assert_eq!(esnap_id_text(b"name"), "name");
    }
}
