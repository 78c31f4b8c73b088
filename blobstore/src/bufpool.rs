//! A pool of cluster-sized I/O buffers for copy-on-write through memory: a buffer is reused
//! as it comes back (its old bytes are overwritten by the read of the back device or by the
//! caller's data and zeroes), so a copy allocates and zeroes nothing once the pool is warm.

use std::sync::Mutex;

use iobuf::IoBuf;

/// Buffers kept at most (one per copy in flight at a typical queue depth).
const KEEP: usize = 64;

/// Cluster-sized, aligned buffers.
pub(crate) struct BufPool {
    len: usize,
    align: usize,
    free: Mutex<Vec<IoBuf>>,
}

impl BufPool {
    /// A pool of `len`-byte buffers aligned to `align`.
    pub(crate) fn new(len: usize, align: usize) -> BufPool {
        BufPool {
            len,
            align,
            free: Mutex::new(Vec::new()),
        }
    }

    /// A buffer of the pool's size; its bytes are whatever it last held.
    pub(crate) fn take(&self) -> IoBuf {
        let b = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        b.unwrap_or_else(|| IoBuf::new(self.len, self.align))
    }

    /// Gives a buffer back (dropped when the pool is full or it is not one of ours).
    pub(crate) fn give(&self, b: IoBuf) {
        if b.len() != self.len || b.align() < self.align {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < KEEP {
            free.push(b);
        }
    }
}
