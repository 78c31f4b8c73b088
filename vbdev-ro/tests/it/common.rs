//! What the vbdev-ro tests add to the shared harness (`test_support`): a malloc bdev with a
//! per-read delay (so reads really are in flight), a base stamped per block, and the
//! base-removal-under-load scenario.

use std::sync::{mpsc, Arc};

use std::time::Duration;

use async_trait::async_trait;
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{BdevEvent, BlockDevice, IoBuf, IoType, Registry, Result};
use futures::executor::block_on;
use futures::stream::{FuturesUnordered, StreamExt};
use test_support::prelude::{assert_errno, within};
use uuid::Uuid;
use vbdev_ro::{create, delete, RoOpts};

/// A malloc bdev whose reads first wait `delay`, so that reads really are in flight. Only
/// the timing is the test's own; every byte goes through the real malloc backend.
pub struct SlowDev {
    inner: Arc<MallocBdev>,
    delay: Duration,
}

impl SlowDev {
    /// A zeroed malloc bdev `name` of `num_blocks` blocks whose reads wait `delay`.
    pub fn new(name: &str, num_blocks: u64, block_len: u32, delay: Duration) -> Arc<Self> {
        let inner = MallocBdev::create(name, num_blocks, block_len, None).expect("malloc");
        Arc::new(SlowDev { inner, delay })
    }
}

#[async_trait]
impl BlockDevice for SlowDev {
    fn name(&self) -> &str {
        MallocBdev::name(&self.inner)
    }
    fn product_name(&self) -> &str {
        "Slow malloc disk"
    }
    fn module_name(&self) -> &str {
        "test_slow"
    }
    fn uuid(&self) -> Uuid {
        MallocBdev::uuid(&self.inner)
    }
    fn block_len(&self) -> u32 {
        MallocBdev::block_len(&self.inner)
    }
    fn num_blocks(&self) -> u64 {
        MallocBdev::num_blocks(&self.inner)
    }
    fn io_type_supported(&self, io_type: IoType) -> bool {
        MallocBdev::io_type_supported(&self.inner, io_type)
    }
    async fn read(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        futures_timer::Delay::new(self.delay).await;
        MallocBdev::read(&self.inner, offset_blocks, buf).await
    }
    async fn write(&self, offset_blocks: u64, buf: IoBuf) -> Result<IoBuf> {
        MallocBdev::write(&self.inner, offset_blocks, buf).await
    }
    async fn flush(&self) -> Result<()> {
        MallocBdev::flush(&self.inner).await
    }
    async fn unmap(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
        MallocBdev::unmap(&self.inner, offset_blocks, num_blocks).await
    }
    async fn write_zeroes(&self, offset_blocks: u64, num_blocks: u64) -> Result<()> {
        MallocBdev::write_zeroes(&self.inner, offset_blocks, num_blocks).await
    }
}

/// Closes a descriptor (releasing its claim and letting a pending unregister finish).
pub fn close(_d: bdev_core::Descriptor) {}

/// Hot-removes the base while a reader keeps `qd` reads in flight on the ro bdev. The reader
/// closes its descriptor when it sees `Remove`, as a well-behaved consumer does.
pub fn base_removal_with_reads_in_flight(reg: Registry, base: &str, qd: usize) {
    let ro = block_on(create(
        &reg,
        RoOpts {
            base_bdev_name: base.to_string(),
            name: Some("ro0".into()),
            uuid: None,
        },
    ))
    .unwrap();
    let bl = ro.block_len() as usize;
    let blocks = ro.num_blocks();
    let align = ro.buf_align();
    drop(ro);
    let mut d = reg.open("ro0", false).unwrap();
    let mut events = d.take_events().unwrap().fuse();
    let (started_tx, started_rx) = mpsc::channel();

    let reader = std::thread::spawn(move || {
        block_on(async move {
            let mut inflight = FuturesUnordered::new();
            let (mut ok, mut failed, mut next) = (0u64, 0u64, 0u64);
            let mut removed = false;
            let mut started = Some(started_tx);
            let per_io = 64u64; // blocks per read
            loop {
                while !removed && inflight.len() < qd {
                    let lba = (next * per_io) % (blocks - per_io);
                    next += 1;
                    let buf = IoBuf::new(per_io as usize * bl, align);
                    let d = &d;
                    inflight.push(async move { (lba, d.read(lba, buf).await) });
                }
                if removed && inflight.is_empty() {
                    break;
                }
                futures::select! {
                    r = inflight.select_next_some() => match r {
                        (lba, Ok(buf)) => {
                            // A completed read returns the base's data, nothing else.
                            let want = (lba as u8).wrapping_mul(31) ^ 0x33;
                            assert_eq!(buf[0], want, "data at lba {lba}");
                            ok += 1;
                            if ok == 256 {
                                if let Some(s) = started.take() {
                                    let _ = s.send(());
                                }
                            }
                        }
                        (_, Err(e)) => {
                            let errno = e.errno();
                            assert!(
                                errno == libc::EIO || errno == libc::ENODEV,
                                "in-flight read failed with {errno}: {e}"
                            );
                            failed += 1;
                        }
                    },
                    ev = events.next() => {
                        if matches!(ev, Some(BdevEvent::Remove) | None) {
                            removed = true;
                        }
                    }
                }
            }
            drop(inflight);
            close(d);
            (ok, failed)
        })
    });

    started_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("reader made progress");
    let r2 = reg.clone();
    let name = base.to_string();
    within(30, "base unregister with reads in flight", move || {
        block_on(r2.unregister(&name)).expect("unregister base")
    });
    let (ok, failed) = within(30, "reader drains", move || reader.join().unwrap());
    assert!(ok >= 256, "ok={ok} failed={failed}");
    assert!(reg.get("ro0").is_none(), "ro bdev must go with its base");
    assert!(reg.get(base).is_none());
    let names: Vec<String> = reg.list().iter().map(|d| d.name().to_string()).collect();
    assert!(names.is_empty(), "{names:?}");
    assert_errno!(block_on(delete(&reg, "ro0")), libc::ENODEV);
}

/// A base whose every 512-byte block starts with `lba * 31 ^ 0x33` (enough to check reads).
pub fn stamp_base(reg: &Registry, name: &str) {
    block_on(async {
        let d = reg.open(name, true).unwrap();
        let dev = d.device().clone();
        let bl = dev.block_len() as usize;
        let n = dev.num_blocks();
        let chunk = 2048u64.min(n);
        let mut lba = 0;
        while lba < n {
            let c = chunk.min(n - lba);
            let mut buf = IoBuf::new(c as usize * bl, dev.buf_align());
            for i in 0..c {
                buf[i as usize * bl] = ((lba + i) as u8).wrapping_mul(31) ^ 0x33;
            }
            d.write(lba, buf).await.unwrap();
            lba += c;
        }
    });
}
