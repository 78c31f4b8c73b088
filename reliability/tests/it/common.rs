//! Shared helpers: a registry with the lvol module, malloc and error bdevs, byte-level I/O
//! through descriptors, and a timeout guard so no test can hang.

use std::sync::Arc;
use std::time::Duration;

use bdev_core::backend::error::ErrorBdev;
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{Descriptor, IoBuf, Registry};
use lvol::{LvolModule, LvsOpts};
use uuid::Uuid;

pub const MIB: u64 = 1 << 20;
pub const CLUSTER: u32 = 64 * 1024;

pub fn setup() -> (Registry, LvolModule) {
    let reg = Registry::new();
    let m = LvolModule::new(reg.clone());
    m.set_esnap_retry(1, Duration::from_millis(2));
    (reg, m)
}

pub async fn malloc(reg: &Registry, name: &str, size: u64, bl: u32, uuid: Option<Uuid>) {
    let dev = MallocBdev::create(name, size / u64::from(bl), bl, uuid).expect("malloc create");
    reg.register(dev).await.expect("register malloc");
}

/// A malloc bdev `base` wrapped in an error bdev `EE_base`, registered; returns the error bdev.
pub async fn error_over_malloc(reg: &Registry, base: &str, size: u64) -> Arc<ErrorBdev> {
    malloc(reg, base, size, 512, None).await;
    let d = reg.open(base, true).expect("open base");
    let e = ErrorBdev::create("", d).expect("error bdev");
    reg.register(e.clone()).await.expect("register error bdev");
    e
}

pub async fn lvs(m: &LvolModule, bdev: &str, name: &str) -> Arc<lvol::LvolStore> {
    let mut o = LvsOpts::new(name);
    o.cluster_size = CLUSTER;
    m.create_lvstore(bdev, o).await.expect("create lvstore")
}

pub async fn write_at(d: &Descriptor, off: u64, data: &[u8]) -> bdev_core::Result<()> {
    let bl = u64::from(d.device().block_len());
    let buf = IoBuf::from_slice(data, d.device().buf_align().max(1));
    d.write(off / bl, buf).await.map(|_| ())
}

pub async fn read_at(d: &Descriptor, off: u64, len: usize) -> bdev_core::Result<Vec<u8>> {
    let bl = u64::from(d.device().block_len());
    let buf = IoBuf::new(len, d.device().buf_align().max(1));
    d.read(off / bl, buf).await.map(|b| b.to_vec())
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i / 512) as u8 ^ seed ^ (i as u8).rotate_left(3))
        .collect()
}

/// Runs `f` on its own thread and fails the test if it does not finish within `secs`.
pub fn with_timeout<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // The closure panicked: re-raise its panic.
            match h.join() {
                Err(p) => std::panic::resume_unwind(p),
                Ok(()) => unreachable!("sender dropped without a value"),
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("hang: not done after {secs} s"),
    }
}
