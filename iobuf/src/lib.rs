//! Owned, aligned I/O buffers.
//!
//! This leaf crate owns [`IoBuf`], the buffer type every I/O call in the workspace takes and
//! returns. I/O calls take the buffer by value and hand it back on completion, so a backend
//! such as io_uring can own the memory until the kernel is done with it, even if the future
//! that issued the request is dropped. It also has [`div_rem`], the block arithmetic the
//! I/O paths of the layers above share. It knows nothing about devices or blobstores.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// `(x / d, x % d)` for `d > 0`, by shift and mask when `d` is a power of two (block
/// lengths, io_units and clusters always are in practice): a request's fast path would
/// otherwise pay a 64-bit division per split.
#[inline]
pub fn div_rem(x: u64, d: u64) -> (u64, u64) {
    if d.is_power_of_two() {
        (x >> d.trailing_zeros(), x & (d - 1))
    } else {
        (x / d, x % d)
    }
}

/// A zero-initialised heap buffer whose start is aligned to `align` bytes.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    align: usize,
}

// SAFETY: IoBuf owns its allocation exclusively, like a Box<[u8]>; moving it across threads
// moves that ownership, and shared references only give out `&[u8]`.
unsafe impl Send for IoBuf {}
// SAFETY: as above; `&IoBuf` only allows reads of the bytes.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// Allocates `len` zeroed bytes aligned to `align` (rounded up to a power of two, at least 1).
    pub fn new(len: usize, align: usize) -> Self {
        let align = align.max(1).next_power_of_two();
        if len == 0 {
            // A dangling but aligned pointer is valid for zero-length slices.
            let ptr = NonNull::new(align as *mut u8).expect("align is non-zero");
            return IoBuf { ptr, len, align };
        }
        let layout = Layout::from_size_align(len, align).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        IoBuf { ptr, len, align }
    }

    /// Allocates a buffer aligned to `align` holding a copy of `data`.
    pub fn from_slice(data: &[u8], align: usize) -> Self {
        let mut b = IoBuf::new(data.len(), align);
        b.copy_from_slice(data);
        b
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The alignment of the start of the buffer.
    pub fn align(&self) -> usize {
        self.align
    }

    /// Raw pointer to the first byte, for backends that hand the memory to the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw mutable pointer to the first byte.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Fills the whole buffer with `byte`.
    pub fn fill(&mut self, byte: u8) {
        self.deref_mut().fill(byte);
    }

    /// Copies the bytes into a plain `Vec<u8>`.
    pub fn to_vec(&self) -> Vec<u8> {
        self.deref().to_vec()
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (or len is 0 and ptr is aligned and non-null),
        // and the memory was zero-initialised at allocation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        IoBuf::from_slice(self, self.align)
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        let layout = Layout::from_size_align(self.len, self.align).expect("valid layout");
        // SAFETY: ptr was allocated in `new` with exactly this layout and is freed only here.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("align", &self.align)
            .finish()
    }
}

impl PartialEq for IoBuf {
    fn eq(&self, other: &Self) -> bool {
        self.deref() == other.deref()
    }
}

impl Eq for IoBuf {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn div_rem_is_division_and_remainder_for_any_divisor() {
        for d in [1u64, 2, 8, 512, 520, 4096, 3 << 20, 1 << 20, 1 << 40] {
            for x in [0u64, 1, 511, 512, 4095, 4097, 123_456_789, u64::MAX] {
                assert_eq!(div_rem(x, d), (x / d, x % d), "{x} / {d}");
            }
        }
    }

    #[test]
    fn new_is_zeroed_and_aligned() {
        let b = IoBuf::new(8192, 4096);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(b.len(), 8192);
    }

    #[test]
    fn from_slice_copies() {
        let b = IoBuf::from_slice(b"hello", 512);
        assert_eq!(&b[..], b"hello");
        assert_eq!(b.clone(), b);
    }

    #[test]
    fn empty_buffer_is_usable() {
        let b = IoBuf::new(0, 4096);
        assert!(b.is_empty());
        assert_eq!(&b[..], b"");
    }
}
