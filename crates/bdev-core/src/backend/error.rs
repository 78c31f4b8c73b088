//! Error-injection bdev (SPDK `bdev_error`), plus power-loss simulation. (Contract only.)

use std::sync::Arc;

use crate::{Descriptor, IoType, Result};

/// What an injected error does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The I/O fails with EIO.
    Failure,
    /// Writes are acknowledged but not written (power loss: everything after the trigger is lost).
    DropWrites,
}

/// One injection rule.
#[derive(Clone, Debug)]
pub struct Injection {
    /// I/O type it applies to (`None` = all).
    pub io_type: Option<IoType>,
    /// What happens.
    pub kind: ErrorKind,
    /// Only I/O touching this block range (start, count) is affected (`None` = all).
    pub range: Option<(u64, u64)>,
    /// Start after this many matching I/Os went through unharmed.
    pub after: u64,
    /// Affect this many I/Os (`u64::MAX` = forever).
    pub count: u64,
}

/// A bdev that forwards to a base descriptor and injects errors. Name `EE_<base>` by default.
pub struct ErrorBdev {
    _private: (),
}

impl ErrorBdev {
    /// Wraps an open (writable) descriptor of the base.
    pub fn create(name: &str, base: Descriptor) -> Result<Arc<Self>> {
        let _ = (name, base);
        todo!()
    }
    /// Adds an injection rule.
    pub fn inject(&self, injection: Injection) {
        let _ = injection;
        todo!()
    }
    /// Removes every rule.
    pub fn clear(&self) {
        todo!()
    }
    /// Number of writes that reached the base so far.
    pub fn writes_seen(&self) -> u64 {
        todo!()
    }
}
