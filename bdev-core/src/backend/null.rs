//! The null bdev (SPDK `bdev_null`): reads return zeroes, writes are discarded. For
//! benchmarking the layers above a device without one.
//!
//! Product name `"Null disk"`, module `"null"`; `write_config` gives SPDK's
//! `bdev_null_create` entry. The size can change ([`NullBdev::resize`]); the owner then calls
//! [`crate::Registry::notify_resize`] so every opener gets a `Resize` event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use iobuf::IoBuf;
use uuid::Uuid;

use crate::{BdevError, IoFuture, Result};

/// A device that stores nothing.
#[derive(Debug)]
pub struct NullBdev {
    name: String,
    uuid: Uuid,
    block_len: u32,
    num_blocks: AtomicU64,
}

fn check_size(num_blocks: u64, block_len: u32) -> Result<()> {
    if num_blocks == 0 {
        return Err(BdevError::InvalidArgument("num_blocks must be > 0".into()));
    }
    num_blocks
        .checked_mul(block_len as u64)
        .filter(|b| *b <= i64::MAX as u64)
        .map(|_| ())
        .ok_or_else(|| BdevError::InvalidArgument(format!("{num_blocks} blocks are too many")))
}

impl NullBdev {
    /// Creates (does not register) a null bdev. `block_len` must be a power of two of at
    /// least 512 (EINVAL), `num_blocks` > 0. A `None` uuid gets a random one.
    pub fn create(
        name: &str,
        num_blocks: u64,
        block_len: u32,
        uuid: Option<Uuid>,
    ) -> Result<Arc<Self>> {
        if name.is_empty() {
            return Err(BdevError::InvalidArgument("empty bdev name".into()));
        }
        if block_len < 512 || !block_len.is_power_of_two() {
            return Err(BdevError::InvalidArgument(format!(
                "block size {block_len} is not a power of two of at least 512"
            )));
        }
        check_size(num_blocks, block_len)?;
        Ok(Arc::new(NullBdev {
            name: name.to_string(),
            uuid: uuid.unwrap_or_else(Uuid::new_v4),
            block_len,
            num_blocks: AtomicU64::new(num_blocks),
        }))
    }

    /// Changes the size. SPDK refuses to shrink a null bdev (EINVAL) and so do we: an opener
    /// may hold offsets past the new end.
    pub fn resize(&self, num_blocks: u64) -> Result<()> {
        check_size(num_blocks, self.block_len)?;
        let old = self.num_blocks.load(Ordering::SeqCst);
        if num_blocks < old {
            return Err(BdevError::InvalidArgument(format!(
                "cannot shrink a null bdev from {old} to {num_blocks} blocks"
            )));
        }
        self.num_blocks.store(num_blocks, Ordering::SeqCst);
        Ok(())
    }

    /// Every block reads as zeroes.
    fn copy_out(&self, _offset_blocks: u64, out: &mut [u8]) {
        out.fill(0);
    }
    /// Writes are dropped.
    fn copy_in(&self, _offset_blocks: u64, _data: &[u8]) {}
    /// Nothing to free: every block already reads as zeroes.
    fn zero(&self, _offset_blocks: u64, _num_blocks: u64) {}
}

super::malloc::instant_io!(NullBdev {
    crate::device_facts!(product: "Null disk", module: "null", every_block_op);
    fn write_config(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "method": "bdev_null_create",
            "params": {
                "name": self.name,
                "num_blocks": self.num_blocks(),
                "block_size": self.block_len,
                "physical_block_size": self.block_len,
                "uuid": self.uuid.hyphenated().to_string(),
                "md_size": 0,
                "dif_type": 0,
                "dif_is_head_of_md": false,
                "dif_pi_format": 0,
            }
        }))
    }
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlockDevice;
    use futures::executor::block_on;

    #[test]
    fn reads_zeroes_after_writes_and_grows_only() {
        let d = NullBdev::create("N0", 8, 512, None).unwrap();
        block_on(async {
            let mut w = IoBuf::new(512, 512);
            w.fill(0xab);
            d.write(1, w).await.unwrap();
            let mut r = IoBuf::new(512, 512);
            r.fill(0x11);
            let r = d.read(1, r).await.unwrap();
            assert!(r.iter().all(|b| *b == 0));
        });
        assert!(d.resize(4).is_err());
        d.resize(16).unwrap();
        assert_eq!(d.num_blocks(), 16);
        assert_eq!(d.write_config().unwrap()["params"]["num_blocks"], 16);
        assert!(NullBdev::create("N1", 8, 1000, None).is_err());
        assert!(NullBdev::create("N1", 0, 512, None).is_err());
        assert!(NullBdev::create("N1", u64::MAX, 4096, None).is_err());
    }
}
