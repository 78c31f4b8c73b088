//! aio bdev: unmap as a hole punch and write_zeroes where the file system supports them (and
//! `unmap_zeroes` only then), and exclusive open of the file, within one process and across
//! processes (the second process is this test binary run again as a child).

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use bdev_core::backend::aio::{uring_available, AioBdev, AioEngine, AioOpts};
use bdev_core::{BlockDevice, IoBuf, IoType, Registry};
use futures::executor::block_on;
use test_support::bdev::{aio_dev, aio_opts, sparse_file};

const MIB: u64 = 1 << 20;

fn opts(name: &str, path: &Path) -> AioOpts {
    aio_opts(name, path, |o| o.block_len = Some(4096))
}

/// Whether the file system of `dir` punches holes, found independently of the bdev: punch a
/// written block of a scratch file and see it read zeroes and free its space.
fn fs_punches(dir: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let p = dir.join("probe");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all_at(&[0xab; 65536], 0).unwrap();
    f.sync_all().unwrap();
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain integer arguments on an open descriptor.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, 0, 65536) };
    let mut b = [1u8; 65536];
    f.read_exact_at(&mut b, 0).unwrap();
    let _ = std::fs::remove_file(&p);
    r == 0 && b.iter().all(|&x| x == 0)
}

fn engines() -> Vec<AioEngine> {
    if uring_available() {
        vec![AioEngine::Uring, AioEngine::ThreadPool]
    } else {
        vec![AioEngine::ThreadPool]
    }
}

#[test]
fn unmap_punches_holes_that_read_zeroes_without_the_fallocate_option() {
    let dir = tempfile::tempdir().unwrap();
    let punches = fs_punches(dir.path());
    println!("file system punches holes: {punches}");
    for engine in engines() {
        let p = sparse_file(dir.path(), "f.img", 4 * MIB);
        let reg = Registry::new();
        let a = aio_dev("a", &p, |o| (o.block_len, o.engine) = (Some(4096), engine));
        assert_eq!(a.io_type_supported(IoType::Unmap), punches, "{engine:?}");
        assert_eq!(a.io_type_supported(IoType::WriteZeroes), punches);
        assert_eq!(a.unmap_zeroes(), punches);
        // The probe changed nothing: same size, nothing allocated, config unchanged.
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4 * MIB);
        assert_eq!(a.write_config().unwrap()["params"]["fallocate"], false);
        block_on(reg.register(a)).unwrap();
        let d = reg.open("a", true).unwrap();
        block_on(async {
            d.write(0, IoBuf::from_slice(&vec![0x5c; 2 * MIB as usize], 1))
                .await
                .unwrap();
            d.flush().await.unwrap();
            let blocks_before = std::fs::metadata(&p).unwrap().blocks();
            if !punches {
                assert_eq!(d.unmap(0, 16).await.unwrap_err().errno(), libc::ENOTSUP);
                return;
            }
            d.unmap(16, 128).await.unwrap(); // 512 KiB at 64 KiB
            d.write_zeroes(256, 16).await.unwrap(); // 64 KiB at 1 MiB
            let r = d.read(0, IoBuf::new(2 * MIB as usize, 1)).await.unwrap();
            for (blk, got) in r.chunks(4096).enumerate() {
                let zero = (16..144).contains(&blk) || (256..272).contains(&blk);
                let want = if zero { 0 } else { 0x5c };
                assert!(got.iter().all(|&b| b == want), "{engine:?} block {blk}");
            }
            let md = std::fs::metadata(&p).unwrap();
            assert_eq!(md.len(), 4 * MIB, "keeps the size");
            assert!(
                md.blocks() < blocks_before,
                "the unmap freed no space ({} -> {} sectors)",
                blocks_before,
                md.blocks()
            );
        });
        drop(d);
        block_on(reg.unregister("a")).unwrap();
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn read_only_files_have_no_unmap_and_no_zeroing_promise() {
    let dir = tempfile::tempdir().unwrap();
    let p = sparse_file(dir.path(), "f.img", MIB);
    let a = aio_dev("r", &p, |o| (o.block_len, o.readonly) = (Some(4096), true));
    assert!(!a.io_type_supported(IoType::Unmap));
    assert!(!a.io_type_supported(IoType::WriteZeroes));
    assert!(!a.unmap_zeroes());
    assert_eq!(block_on(a.unmap(0, 1)).unwrap_err().errno(), libc::ENOTSUP);
}

#[test]
fn a_file_is_opened_by_one_bdev_per_process() {
    let dir = tempfile::tempdir().unwrap();
    let p = sparse_file(dir.path(), "f.img", MIB);
    let reg = Registry::new();
    let a = AioBdev::create(opts("first", &p)).unwrap();
    block_on(reg.register(a)).unwrap();
    // The same file, by another path (a hard link: same device and inode).
    let link = dir.path().join("link.img");
    std::fs::hard_link(&p, &link).unwrap();
    for (name, path, ro) in [
        ("second", &p, false),
        ("third", &link, false),
        ("ro", &p, true),
    ] {
        let e = AioBdev::create(aio_opts(name, path, |o| {
            (o.block_len, o.readonly) = (Some(4096), ro)
        }))
        .unwrap_err();
        assert_eq!(e.errno(), libc::EBUSY, "{name}: {e}");
        let msg = e.to_string();
        assert!(msg.contains("first"), "{name}: holder not named: {msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
    // Another file is fine.
    let other = sparse_file(dir.path(), "g.img", MIB);
    drop(AioBdev::create(opts("other", &other)).unwrap());
    // Once the first bdev is gone, the file can be opened again.
    block_on(reg.unregister("first")).unwrap();
    let again = AioBdev::create(opts("again", &p)).unwrap();
    drop(again);
    // Read-only opens share the file, and keep writers out while any of them is open.
    let r1 = aio_dev("r1", &p, |o| (o.block_len, o.readonly) = (Some(4096), true));
    let r2 = aio_dev("r2", &p, |o| (o.block_len, o.readonly) = (Some(4096), true));
    drop(r1);
    let e = AioBdev::create(opts("w", &p)).unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    drop(r2);
    drop(AioBdev::create(opts("w", &p)).unwrap());
}

/// Set in the child: the file the child tries to open as an aio bdev.
const CHILD_ENV: &str = "AIO_EXCLUSIVE_CHILD_FILE";

/// Runs this test binary again as a child that tries to open `path`; returns its output.
fn child_open(path: &Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "aio_unmap_and_exclusive_open::a_second_process_cannot_open_a_file_in_use",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, path)
        .output()
        .expect("spawn the child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed: {text}");
    text
}

#[test]
fn a_second_process_cannot_open_a_file_in_use() {
    if let Some(path) = std::env::var_os(CHILD_ENV) {
        // The child: report what opening the file gave.
        match AioBdev::create(opts("child", Path::new(&path))) {
            Ok(_) => println!("CHILD opened"),
            Err(e) => println!("CHILD errno {} message {e}", e.errno()),
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = sparse_file(dir.path(), "f.img", MIB);
    let a = AioBdev::create(opts("parent", &p)).unwrap();
    let out = child_open(&p);
    assert!(
        out.contains(&format!("CHILD errno {}", libc::EBUSY)),
        "child was not refused with EBUSY: {out}"
    );
    assert!(out.contains("another process"), "no clear message: {out}");
    drop(a);
    let out = child_open(&p);
    assert!(
        out.contains("CHILD opened"),
        "child could not open a free file: {out}"
    );
}
