//! The steady-state data path allocates nothing: aio (io_uring, O_DIRECT) on an exclusive
//! reactor and malloc, through descriptors, with `qd` requests in flight whose futures are
//! kept in place (as the bench driver does). Allocations are counted per thread, so other
//! test threads do not disturb the count.

use bdev_core::backend::aio::uring_available;
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{reactor, BlockDevice, IoBuf, Registry};
use test_support::alloc::CountingAlloc;
use test_support::bdev::{aio_dev, steady_state_allocs};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[test]
fn aio_on_an_exclusive_reactor_allocates_nothing_per_request() {
    if !uring_available() {
        test_skip("io_uring is not available");
        return;
    }
    // A thread of its own: the reactor setting is per thread.
    std::thread::spawn(|| {
        reactor::set_exclusive();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let a = aio_dev("a", &p, |_| {});
        let reg = Registry::new();
        reactor::block_on(reg.register(a.clone())).unwrap();
        let d = reg.open("a", true).unwrap();
        let w = steady_state_allocs(&d, true, 32, 6000, 1000);
        let r = steady_state_allocs(&d, false, 32, 6000, 1000);
        println!(
            "aio: direct {} single issuer {}: {w} allocations in 5000 writes, {r} in 5000 reads",
            a.is_direct(),
            reactor::is_single_issuer()
        );
        assert_eq!(w, 0, "allocations in 5000 steady-state writes");
        assert_eq!(r, 0, "allocations in 5000 steady-state reads");
        // The data went where it should: a block written with a known pattern reads back.
        let mut b = IoBuf::new(4096, a.buf_align());
        b.fill(0x3c);
        reactor::block_on(d.write(8, b)).unwrap();
        let back = reactor::block_on(d.read(8, IoBuf::new(4096, a.buf_align()))).unwrap();
        assert!(back.iter().all(|&x| x == 0x3c));
    })
    .join()
    .unwrap();
}

#[test]
fn malloc_allocates_nothing_per_request() {
    std::thread::spawn(|| {
        let m = MallocBdev::create("m", 4096, 4096, None).unwrap();
        let reg = Registry::new();
        reactor::block_on(reg.register(m)).unwrap();
        let d = reg.open("m", true).unwrap();
        // Writes first, so every chunk is allocated before counting.
        let w = steady_state_allocs(&d, true, 32, 12000, 6000);
        let r = steady_state_allocs(&d, false, 32, 6000, 1000);
        assert_eq!(w, 0, "allocations in 6000 steady-state writes");
        assert_eq!(r, 0, "allocations in 5000 steady-state reads");
    })
    .join()
    .unwrap();
}

fn test_skip(why: &str) {
    println!("SKIP: {why}");
}
