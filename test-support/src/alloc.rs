//! A counting global allocator for tests that measure the heap a thread holds or how often
//! it allocates: install [`CountingAlloc`] as the test binary's `#[global_allocator]`, then
//! [`peak_during`] says how far a closure raised this thread's heap and [`allocs`] how many
//! allocations (alloc, alloc_zeroed, realloc) this thread made. Counts are per thread, so
//! tests running in parallel do not disturb each other's figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Forwards to the system allocator and counts the bytes each thread holds.
pub struct CountingAlloc;

thread_local! {
    static NOW: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

/// One allocation call that changes this thread's heap by `d` bytes.
fn counted(d: isize) {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    track(d);
}

fn track(d: isize) {
    // try_with: the thread-locals may be gone while a thread exits.
    let _ = NOW.try_with(|n| {
        let v = n.get() + d;
        n.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        counted(l.size() as isize);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        track(-(l.size() as isize));
        // SAFETY: `p` came from `alloc` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        counted(n as isize - l.size() as isize);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

/// The allocation calls (alloc, alloc_zeroed, realloc) this thread made so far (0 unless
/// [`CountingAlloc`] is the global allocator).
pub fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

/// Runs `f` and returns the peak heap growth of this thread during it, in bytes (0 unless
/// [`CountingAlloc`] is the global allocator).
pub fn peak_during(f: impl FnOnce()) -> isize {
    let base = NOW.with(|n| n.get());
    PEAK.with(|p| p.set(base));
    f();
    PEAK.with(|p| p.get()) - base
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_the_closure_holds_at_its_peak() {
        // Not the global allocator here: drive the counter directly.
        let peak = peak_during(|| {
            track(1000);
            track(-600);
            track(100);
            track(-500);
        });
        assert_eq!(peak, 1000);
    }
}
