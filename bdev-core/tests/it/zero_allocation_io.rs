//! The steady-state data path allocates nothing: aio (io_uring, O_DIRECT) on an exclusive
//! reactor and malloc, through descriptors, with `qd` requests in flight whose futures are
//! kept in place (as the bench driver does). Allocations are counted per thread, so other
//! test threads do not disturb the count.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bdev_core::backend::aio::uring_available;
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{reactor, BlockDevice, Descriptor, IoBuf, IoFuture, Registry};
use test_support::alloc::{allocs, CountingAlloc};
use test_support::bdev::aio_dev;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// One request slot, its future rewritten in place.
type Slot<'a> = Pin<Box<Option<IoFuture<'a, bdev_core::Result<IoBuf>>>>>;

/// Runs `total` reads (or writes) of 4 KiB with `qd` in flight, each slot's future rewritten
/// in place; returns the allocations of the last `total - warmup` requests.
fn run(desc: &Descriptor, write: bool, qd: usize, total: u64, warmup: u64) -> u64 {
    let bl = desc.block_len() as u64;
    let span = desc.num_blocks() / (4096 / bl);
    let align = desc.device().buf_align();
    let mut slots: Vec<Slot<'_>> = (0..qd).map(|_| Box::pin(None)).collect();
    let mut next = 0u64;
    let mut done = 0u64;
    let mut counted_from = None;
    let start = |i: u64, buf: IoBuf| {
        let lba = (i * 7919 % span) * (4096 / bl);
        if write {
            desc.write_io(lba, buf)
        } else {
            desc.read_io(lba, buf)
        }
    };
    for s in slots.iter_mut() {
        s.as_mut().set(Some(start(next, IoBuf::new(4096, align))));
        next += 1;
    }
    reactor::block_on(futures::future::poll_fn(|cx: &mut Context<'_>| loop {
        let mut progressed = false;
        for s in slots.iter_mut() {
            let Some(f) = s.as_mut().as_pin_mut() else {
                continue;
            };
            if let Poll::Ready(r) = f.poll(cx) {
                let buf = r.expect("i/o");
                done += 1;
                progressed = true;
                if done == warmup {
                    counted_from = Some(allocs());
                }
                if next < total {
                    s.as_mut().set(Some(start(next, buf)));
                    next += 1;
                } else {
                    s.as_mut().set(None);
                }
            }
        }
        if done == total {
            return Poll::Ready(());
        }
        if !progressed {
            return Poll::Pending;
        }
    }));
    allocs() - counted_from.expect("warmed up")
}

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
        let w = run(&d, true, 32, 6000, 1000);
        let r = run(&d, false, 32, 6000, 1000);
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
        let w = run(&d, true, 32, 12000, 6000);
        let r = run(&d, false, 32, 6000, 1000);
        assert_eq!(w, 0, "allocations in 6000 steady-state writes");
        assert_eq!(r, 0, "allocations in 5000 steady-state reads");
    })
    .join()
    .unwrap();
}

fn test_skip(why: &str) {
    println!("SKIP: {why}");
}
