//! [`BdevBsDev`]: a bdev-core [`Descriptor`] seen as a blobstore [`BsDev`] (SPDK
//! `module/blob/bdev/blob_bdev.c`). Used for an lvol store's base device (read-write) and for
//! the external snapshots of esnap clones (read-only).

use std::sync::Arc;

use async_trait::async_trait;
use bdev_core::{BlockDevice, DescGuard, DescSlot, Descriptor};
use blobstore::BsDev;
use iobuf::IoBuf;

/// A blobstore device over an open bdev descriptor. The descriptor can be closed early with
/// [`BdevBsDev::close`] (hot-remove): in-flight requests keep using it and finish, later
/// requests fail with ENODEV. A request takes the descriptor without a lock or a reference
/// count ([`DescSlot`]).
pub struct BdevBsDev {
    desc: DescSlot,
    dev: Arc<dyn BlockDevice>,
    block_len: u32,
}

fn enodev() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::ENODEV)
}

impl BdevBsDev {
    /// Wraps an open descriptor.
    pub fn new(desc: Descriptor) -> Self {
        let dev = desc.device().clone();
        let block_len = dev.block_len();
        BdevBsDev {
            desc: DescSlot::new(desc),
            dev,
            block_len,
        }
    }

    /// The bdev under the device.
    pub fn bdev(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// The descriptor, unless closed (held open while the guard lives).
    pub fn descriptor(&self) -> Option<DescGuard<'_>> {
        self.desc.get()
    }

    /// Closes the descriptor: its claim is released at once, the descriptor itself once
    /// in-flight requests are done.
    pub fn close(&self) {
        self.desc.close_with(|d| d.release_claim());
    }

    /// Whether [`BdevBsDev::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.desc.is_closed()
    }

    fn desc_or_enodev(&self) -> std::io::Result<DescGuard<'_>> {
        self.descriptor().ok_or_else(enodev)
    }
}

#[async_trait]
impl BsDev for BdevBsDev {
    fn block_len(&self) -> u32 {
        self.block_len
    }
    fn block_count(&self) -> u64 {
        self.dev.num_blocks()
    }
    fn buf_align(&self) -> usize {
        self.dev.buf_align()
    }
    async fn read(&self, lba: u64, buf: IoBuf) -> std::io::Result<IoBuf> {
        let d = self.desc_or_enodev()?;
        Ok(d.read_io(lba, buf).await?)
    }
    async fn write(&self, lba: u64, buf: IoBuf) -> std::io::Result<IoBuf> {
        let d = self.desc_or_enodev()?;
        Ok(d.write_io(lba, buf).await?)
    }
    async fn write_zeroes(&self, lba: u64, lba_count: u64) -> std::io::Result<()> {
        let d = self.desc_or_enodev()?;
        if d.device().io_type_supported(bdev_core::IoType::WriteZeroes) {
            return Ok(d.write_zeroes(lba, lba_count).await?);
        }
        // Fall back to writing zero buffers, one MiB at a time.
        let bl = u64::from(self.block_len);
        let chunk = ((1u64 << 20) / bl).max(1);
        let mut off = lba;
        let end = lba + lba_count;
        while off < end {
            let n = chunk.min(end - off);
            let buf = IoBuf::new((n * bl) as usize, self.dev.buf_align().max(1));
            d.write(off, buf).await?;
            off += n;
        }
        Ok(())
    }
    async fn unmap(&self, lba: u64, lba_count: u64) -> std::io::Result<()> {
        let d = self.desc_or_enodev()?;
        if d.device().io_type_supported(bdev_core::IoType::Unmap) {
            return Ok(d.unmap(lba, lba_count).await?);
        }
        // Unmap is advisory: a device without it keeps its data (and `unmap_zeroes` says
        // false, so the blobstore does not count the range as cleared).
        Ok(())
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn unmap_zeroes(&self) -> bool {
        self.dev.io_type_supported(bdev_core::IoType::Unmap) && self.dev.unmap_zeroes()
    }
    fn copy_source(&self) -> Option<blobstore::CopySrc> {
        let src = self.dev.copy_source()?;
        Some(Arc::new(src))
    }
    fn can_copy_from(&self, src: &blobstore::CopySrc) -> bool {
        let src = src.downcast_ref::<bdev_core::CopySource>();
        let writable = self.descriptor().is_some_and(|d| d.is_writable());
        writable && src.is_some_and(|s| self.dev.can_copy_from(s))
    }
    async fn copy_from(
        &self,
        src: &blobstore::CopySrc,
        src_offset: u64,
        lba: u64,
        lba_count: u64,
    ) -> std::io::Result<()> {
        let d = self.desc_or_enodev()?;
        let err = std::io::Error::from_raw_os_error;
        let src = src
            .downcast_ref::<bdev_core::CopySource>()
            .ok_or_else(|| err(libc::ENOTSUP))?;
        if !d.is_writable() {
            return Err(err(libc::EPERM));
        }
        if lba
            .checked_add(lba_count)
            .is_none_or(|e| e > self.dev.num_blocks())
        {
            return Err(err(libc::EINVAL));
        }
        Ok(self.dev.copy_from(src, src_offset, lba, lba_count).await?)
    }
    async fn flush(&self) -> std::io::Result<()> {
        let d = self.desc_or_enodev()?;
        // A device that keeps nothing volatile (RAM), or that has no flush at all, has
        // nothing to write back.
        if !self.dev.has_volatile_cache() || !self.dev.io_type_supported(bdev_core::IoType::Flush) {
            return Ok(());
        }
        Ok(d.flush().await?)
    }
}

/// Follows a base bdev's events until it is removed (true) or until `stop` fires or the
/// event stream ends (false); resizes are not this listener's business.
pub(crate) async fn until_removed(
    mut events: futures::channel::mpsc::UnboundedReceiver<bdev_core::BdevEvent>,
    mut stop: futures::channel::oneshot::Receiver<()>,
) -> bool {
    use futures::StreamExt;
    loop {
        let ev = futures::select! {
            ev = events.next() => ev,
            _ = &mut stop => None,
        };
        match ev {
            Some(bdev_core::BdevEvent::Remove) => return true,
            Some(bdev_core::BdevEvent::Resize { .. }) => continue,
            None => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdev_core::backend::aio::{AioBdev, AioOpts};
    use bdev_core::backend::malloc::MallocBdev;
    use bdev_core::Registry;

    /// The copy capability passes through the adapter: an aio file copies from another aio
    /// file of the same file system (bytes read back), a RAM bdev offers no copy source, and
    /// a read-only descriptor cannot be copied into.
    #[test]
    fn copy_capability_passes_through() {
        futures::executor::block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i / 512 * 3 + 1) as u8).collect();
            std::fs::write(dir.path().join("base"), &pattern).unwrap();
            std::fs::write(dir.path().join("store"), vec![0u8; 1 << 20]).unwrap();
            let reg = Registry::new();
            for (name, ro) in [("base", true), ("store", false)] {
                let d = AioBdev::create(AioOpts {
                    name: name.into(),
                    filename: dir.path().join(name),
                    readonly: ro,
                    // Buffered: with O_DIRECT (the default) only a reflink is taken.
                    direct: false,
                    ..Default::default()
                })
                .unwrap();
                reg.register(d).await.unwrap();
            }
            let m = MallocBdev::create("m0", 2048, 512, None).unwrap();
            reg.register(m).await.unwrap();
            let base = BdevBsDev::new(reg.open("base", false).unwrap());
            let store = BdevBsDev::new(reg.open("store", true).unwrap());
            let ram = BdevBsDev::new(reg.open("m0", true).unwrap());
            let src = base.copy_source().expect("an aio file is a copy source");
            assert!(store.can_copy_from(&src));
            assert!(ram.copy_source().is_none());
            assert!(!ram.can_copy_from(&src));
            store.copy_from(&src, 4096, 16, 64).await.unwrap();
            let got = store.read(16, IoBuf::new(64 * 512, 4096)).await.unwrap();
            assert_eq!(&got[..], &pattern[4096..4096 + 64 * 512]);
            // Past the end of the store: refused before reaching the file.
            let e = store.copy_from(&src, 0, 2040, 16).await.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
            // Read-only: no copy into it.
            let ro = BdevBsDev::new(reg.open("store", false).unwrap());
            assert!(!ro.can_copy_from(&src));
            assert_eq!(
                ro.copy_from(&src, 0, 0, 8)
                    .await
                    .unwrap_err()
                    .raw_os_error(),
                Some(libc::EPERM)
            );
        });
    }
}
