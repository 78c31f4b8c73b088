//! Bdevs for tests (feature `bdev`): malloc, aio and error bdevs registered in one line,
//! byte-offset I/O on descriptors, and the one data pattern the tests write and check.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bdev_core::backend::aio::{AioBdev, AioOpts};
use bdev_core::backend::error::{ErrorBdev, ErrorKind, Injection};
use bdev_core::backend::malloc::MallocBdev;
use bdev_core::{reactor, Descriptor, IoBuf, IoFuture, IoType, Registry};
use uuid::Uuid;

/// `assert_rpc_err!((code, "message"), module, "method", {json})`: the call fails with that
/// JSON-RPC error (the arguments after the first are those of [`rpc_err!`](crate::rpc_err)).
#[macro_export]
macro_rules! assert_rpc_err {
    ($want:expr, $($call:tt)+) => {
        assert_eq!($crate::rpc_err!($($call)+), $want)
    };
}

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// Registers a zeroed malloc bdev of `size` bytes in blocks of `bl` bytes.
pub async fn malloc(reg: &Registry, name: &str, size: u64, bl: u32) {
    register_malloc(reg, name, size, bl, None).await;
}

/// [`malloc`] with a fixed UUID.
pub async fn malloc_uuid(reg: &Registry, name: &str, size: u64, bl: u32, uuid: Uuid) {
    register_malloc(reg, name, size, bl, Some(uuid)).await;
}

async fn register_malloc(reg: &Registry, name: &str, size: u64, bl: u32, uuid: Option<Uuid>) {
    let dev = MallocBdev::create(name, size / u64::from(bl), bl, uuid).expect("malloc create");
    reg.register(dev).await.expect("register malloc");
}

/// Registers an aio bdev over `path` (read-only when `ro`) and waits for the examine hooks.
pub async fn aio(reg: &Registry, name: &str, path: &Path, bl: u32, uuid: Option<Uuid>, ro: bool) {
    let dev = aio_dev(name, path, |o| {
        (o.block_len, o.readonly, o.uuid) = (Some(bl), ro, uuid);
    });
    reg.register(dev).await.expect("register aio");
    reg.wait_for_examine().await;
}

/// [`AioOpts`] of aio bdev `name` over `path`, default but for what `tweak` sets:
/// `aio_opts("a", &p, |o| o.readonly = true)`.
pub fn aio_opts(name: &str, path: &Path, tweak: impl FnOnce(&mut AioOpts)) -> AioOpts {
    let mut o = AioOpts {
        name: name.to_string(),
        filename: path.to_path_buf(),
        ..AioOpts::default()
    };
    tweak(&mut o);
    o
}

/// An aio bdev (not registered) with [`aio_opts`]; panics when creation fails.
pub fn aio_dev(name: &str, path: &Path, tweak: impl FnOnce(&mut AioOpts)) -> Arc<AioBdev> {
    AioBdev::create(aio_opts(name, path, tweak))
        .unwrap_or_else(|e| panic!("aio bdev {name} over {}: {e}", path.display()))
}

/// A sparse file `dir/<name>.img` of `size` bytes registered as aio bdev `name` (512-byte
/// blocks); returns the file, to reload or inspect what was written.
pub async fn aio_sparse(reg: &Registry, dir: &Path, name: &str, size: u64) -> PathBuf {
    let f = sparse_file(dir, &format!("{name}.img"), size);
    aio(reg, name, &f, 512, None, false).await;
    f
}

/// Grows or shrinks the file at `path` to `size` bytes (a base whose size changes under a
/// bdev; the test then rescans and notifies the registry).
pub fn set_file_len(path: &Path, size: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("resize {} to {size}: {e}", path.display()));
}

/// A sparse file `dir/name` of `size` bytes.
pub fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create file");
    f.set_len(size).expect("set_len");
    p
}

/// A malloc bdev `base` (512-byte blocks) wrapped in an error bdev `EE_base`, both
/// registered; returns the error bdev (no injection yet).
pub async fn error_over_malloc(reg: &Registry, base: &str, size: u64) -> Arc<ErrorBdev> {
    malloc(reg, base, size, 512).await;
    let d = reg.open(base, true).expect("open base");
    let e = ErrorBdev::create("", d).expect("error bdev");
    reg.register(e.clone()).await.expect("register error bdev");
    e
}

/// An injection failing every I/O of `io` with EIO once `after` of them went through.
pub fn fail_from(io: IoType, after: u64) -> Injection {
    Injection {
        io_type: Some(io),
        kind: ErrorKind::Failure,
        range: None,
        after,
        count: u64::MAX,
    }
}

/// Opens bdev `name` (for writing when `write`).
pub fn open(reg: &Registry, name: &str, write: bool) -> Descriptor {
    reg.open(name, write).expect("open bdev")
}

/// Writes `data` at byte offset `off` (a multiple of the block size).
pub async fn write_at(d: &Descriptor, off: u64, data: &[u8]) -> bdev_core::Result<()> {
    let bl = u64::from(d.device().block_len());
    assert_eq!(
        off % bl,
        0,
        "offset {off} not a multiple of the block size {bl}"
    );
    let buf = IoBuf::from_slice(data, d.device().buf_align().max(1));
    d.write(off / bl, buf).await.map(|_| ())
}

/// Reads `len` bytes at byte offset `off` (a multiple of the block size).
pub async fn read_at(d: &Descriptor, off: u64, len: usize) -> bdev_core::Result<Vec<u8>> {
    let bl = u64::from(d.device().block_len());
    assert_eq!(
        off % bl,
        0,
        "offset {off} not a multiple of the block size {bl}"
    );
    let buf = IoBuf::new(len, d.device().buf_align().max(1));
    d.read(off / bl, buf).await.map(|b| b.to_vec())
}

/// Reads the whole device in 1 MiB pieces.
pub async fn read_all(d: &Descriptor) -> Vec<u8> {
    let total = d.device().num_blocks() * u64::from(d.device().block_len());
    let mut out = Vec::with_capacity(total as usize);
    let mut off = 0;
    while off < total {
        let n = (total - off).min(MIB) as usize;
        out.extend(read_at(d, off, n).await.expect("read"));
        off += n as u64;
    }
    out
}

/// Writes pattern `tag` over the whole of bdev `name` (through a descriptor of its own,
/// closed again), so that every byte reads back as `pattern(tag, offset, _)`.
pub async fn fill_pattern(reg: &Registry, name: &str, tag: u8) {
    let d = open(reg, name, true);
    let size = d.device().num_blocks() * u64::from(d.device().block_len());
    for off in (0..size).step_by(MIB as usize) {
        let n = MIB.min(size - off) as usize;
        write_at(&d, off, &pattern(tag, off, n))
            .await
            .expect("fill write");
    }
}

/// Fails the test unless every byte of bdev `name` (read through a descriptor of its own)
/// is `byte`.
pub async fn assert_filled(reg: &Registry, name: &str, byte: u8) {
    let d = open(reg, name, false);
    let data = read_all(&d).await;
    if let Some(i) = data.iter().position(|&b| b != byte) {
        panic!("{name}: byte {i} is {:#x}, not {byte:#x}", data[i]);
    }
}

/// `len` bytes of `byte`.
pub fn fill(byte: u8, len: usize) -> Vec<u8> {
    vec![byte; len]
}

/// The test pattern: `len` bytes as they stand at byte offset `off` of a device filled with
/// pattern `tag`. Every byte depends on its offset (period 251, prime, so no two blocks of a
/// power-of-two size are alike) and on the tag, so a misplaced or mixed-up block is caught.
pub fn pattern(tag: u8, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((off + i) % 251) as u8 ^ tag)
        .collect()
}

/// One request slot of [`steady_state_allocs`], its future rewritten in place.
type Slot<'a> = std::pin::Pin<Box<Option<IoFuture<'a, bdev_core::Result<IoBuf>>>>>;

/// The allocations this thread made (counted by [`crate::alloc::CountingAlloc`] when it is
/// the binary's global allocator) during the steady state of a run: `total` 4 KiB reads (or
/// writes) spread over `desc`, `qd` in flight on this thread's reactor
/// (`bdev_core::reactor::block_on`), each slot's future rewritten in place as the bench
/// driver does; the first `warmup` requests are not counted.
pub fn steady_state_allocs(
    desc: &Descriptor,
    write: bool,
    qd: usize,
    total: u64,
    warmup: u64,
) -> u64 {
    use std::future::Future;
    use std::task::{Context, Poll};
    let bl = u64::from(desc.block_len());
    let span = desc.num_blocks() / (4096 / bl);
    let align = desc.device().buf_align().max(1);
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
                    counted_from = Some(crate::alloc::allocs());
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
    crate::alloc::allocs() - counted_from.expect("warmed up")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_offset_addressed_and_tagged() {
        let whole = pattern(7, 0, 8192);
        assert_eq!(&whole[4096..], &pattern(7, 4096, 4096)[..]);
        assert_ne!(&whole[..4096], &whole[4096..]);
        assert_ne!(pattern(7, 0, 512), pattern(8, 0, 512));
    }

    #[test]
    fn fill_pattern_covers_the_device() {
        futures::executor::block_on(async {
            let reg = Registry::new();
            malloc(&reg, "M", MIB + 4096, 4096).await;
            fill_pattern(&reg, "M", 9).await;
            let d = open(&reg, "M", false);
            assert_eq!(read_all(&d).await, pattern(9, 0, (MIB + 4096) as usize));
        });
    }

    #[test]
    fn byte_io_round_trips_and_read_all_covers_the_device() {
        futures::executor::block_on(async {
            let reg = Registry::new();
            malloc(&reg, "M", 2 * MIB + 4096, 512).await;
            let d = open(&reg, "M", true);
            write_at(&d, MIB + 512, &pattern(3, 0, 4096)).await.unwrap();
            assert_eq!(
                read_at(&d, MIB + 512, 4096).await.unwrap(),
                pattern(3, 0, 4096)
            );
            let all = read_all(&d).await;
            assert_eq!(all.len() as u64, 2 * MIB + 4096);
            assert_eq!(
                &all[(MIB + 512) as usize..][..4096],
                &pattern(3, 0, 4096)[..]
            );
            assert!(all[..MIB as usize].iter().all(|&b| b == 0));
        });
    }
}
