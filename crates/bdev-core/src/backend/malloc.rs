//! In-memory bdev (SPDK `bdev_malloc`). (Contract only.)

use std::sync::Arc;

use uuid::Uuid;

use crate::Result;

/// A RAM-backed device. Product name `"Malloc disk"`.
pub struct MallocBdev {
    _private: (),
}

impl MallocBdev {
    /// Creates (does not register) a malloc bdev. `block_len` must be a multiple of 512 (EINVAL),
    /// `num_blocks` > 0. A `None` uuid gets a random one.
    pub fn create(
        name: &str,
        num_blocks: u64,
        block_len: u32,
        uuid: Option<Uuid>,
    ) -> Result<Arc<Self>> {
        let _ = (name, num_blocks, block_len, uuid);
        todo!()
    }
}
