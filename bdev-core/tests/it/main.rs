//! bdev-core integration tests, one binary; each module is one behaviour. The shared
//! harness is `test_support`. `zero_allocation_io` installs this binary's global allocator:
//! it counts per thread, so the other tests' allocations do not disturb its counts.

mod aio_backend;
mod aio_unmap_and_exclusive_open;
mod device_conformance;
mod reactor;
mod registry_and_examine;
mod zero_allocation_io;
