//! vbdev-ro over the real backends: malloc, aio with the thread pool, aio with io_uring (when
//! the kernel allows it) and aio with O_DIRECT.

use crate::common::{base_removal_with_reads_in_flight, stamp_base};
use bdev_core::backend::aio::AioEngine;
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{BdevEvent, BlockDevice, IoBuf, Registry};
use futures::executor::block_on;
use futures::stream::StreamExt;
use test_support::prelude::*;
use vbdev_ro::{create, RoOpts};

fn ro_opts(base: &str) -> RoOpts {
    RoOpts {
        base_bdev_name: base.to_string(),
        name: None,
        uuid: None,
    }
}

fn aio_base(engine: AioEngine, direct: bool) -> (tempfile::TempDir, Registry) {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "base.img", 32 << 20);
    let reg = Registry::new();
    let a = aio_dev("AB", &path, |o| {
        o.block_len = Some(if direct { 4096 } else { 512 });
        o.engine = engine;
        o.direct = direct;
    });
    block_on(reg.register(a)).unwrap();
    stamp_base(&reg, "AB");
    (dir, reg)
}

#[test]
fn base_removal_with_64_reads_in_flight_malloc() {
    let reg = Registry::new();
    let m = MallocBdev::create("MB", 65536, 512, None).unwrap();
    block_on(reg.register(m)).unwrap();
    stamp_base(&reg, "MB");
    base_removal_with_reads_in_flight(reg, "MB", 64);
}

#[rstest::rstest]
#[case::thread_pool(AioEngine::ThreadPool, false)]
#[case::auto(AioEngine::Auto, false)]
#[case::direct(AioEngine::Auto, true)]
fn base_removal_with_64_reads_in_flight_aio(#[case] engine: AioEngine, #[case] direct: bool) {
    let (_dir, reg) = aio_base(engine, direct);
    base_removal_with_reads_in_flight(reg, "AB", 64);
}

#[test]
fn ro_over_aio_reports_the_base_alignment_and_reads_it() {
    let (_dir, reg) = aio_base(AioEngine::Auto, true);
    let ro = block_on(create(&reg, ro_opts("AB"))).unwrap();
    let base = reg.get("AB").unwrap();
    assert_eq!(ro.buf_align(), base.buf_align());
    assert_eq!(ro.block_len(), 4096);
    let d = reg.open("AB_ro", false).unwrap();
    let got = block_on(d.read(5, IoBuf::new(4096, ro.buf_align()))).unwrap();
    assert_eq!(got[0], 5u8.wrapping_mul(31) ^ 0x33);
}

#[test]
fn aio_base_resize_propagates_to_ro_openers() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "grow.img", 1 << 20);
    let reg = Registry::new();
    let a = aio_dev("G", &path, |o| {
        o.block_len = Some(512);
        o.engine = AioEngine::ThreadPool;
    });
    block_on(reg.register(a.clone())).unwrap();
    block_on(create(&reg, ro_opts("G"))).unwrap();
    let mut d = reg.open("G_ro", false).unwrap();
    let mut ev = d.take_events().unwrap();
    assert_eq!(d.device().num_blocks(), 2048);

    set_file_len(&path, 4 << 20);
    assert_eq!(a.rescan().unwrap(), 8192);
    reg.notify_resize("G");
    let got = within(10, "resize event", move || block_on(ev.next()));
    assert_eq!(got, Some(BdevEvent::Resize { num_blocks: 8192 }));
    assert_eq!(reg.get("G_ro").unwrap().num_blocks(), 8192);
    let tail = block_on(d.read(8191, IoBuf::new(512, 1))).unwrap();
    assert_eq!(tail[..], [0u8; 512][..]);
}
