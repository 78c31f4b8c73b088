//! blobcli's behaviour as SPDK defines it (acceptance scenarios A-45..A-50): command-line
//! validation, fill/list/show/delete, import and dump edge cases, recovery, shell mode and
//! the clean flag; plus `--image` staying read-only.

use std::path::Path;
use std::sync::Arc;

use crate::common::*;
use bdev_core::Registry;
use blobcli::bsdev::BdevBsDev;
use blobstore::{Blobstore, BsDev, BsOpts};
use futures::executor::block_on;
use test_support::prelude::*;

/// The store on the image file `path` as the library sees it (an aio bdev of 4096-byte blocks).
fn file_dev(path: &Path) -> Arc<dyn BsDev> {
    block_on(async {
        let reg = Registry::new();
        aio(&reg, "lib0", path, 4096, None, false).await;
        Arc::new(BdevBsDev::new(open(&reg, "lib0", true))) as Arc<dyn BsDev>
    })
}

fn script(dir: &Path, lines: &str) -> std::process::Output {
    std::fs::write(dir.join("t.bs"), lines).unwrap();
    blobcli(
        dir,
        &["-j", "conf.json", "-b", "Malloc0", "-T", "t.bs"],
        None,
    )
}

#[test]
fn a45_command_line_validation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // (a) no arguments.
    let o = blobcli(d, &[], None);
    assert_ne!(o.status.code(), Some(0));
    let t = stdout(&o);
    assert!(t.starts_with("ERROR: Invalid option\nVersion "), "{t}");
    assert!(t.contains("Usage: blobcli [-j SPDK josn_config_file] Command\n"));
    assert!(t.contains("\t-T <filename> - automated script mode\n"));
    // (b)..(f)
    let cases: [(&[&str], &str); 5] = [
        (
            &["-b", "Malloc0", "-n", "0"],
            "ERROR: invalid option for new\n",
        ),
        (
            &["-b", "Malloc0", "-l", "foo"],
            "ERROR: invalid option for list\n",
        ),
        (
            &["-b", "Malloc0", "-s", "bs", "-l", "blobs"],
            "Error: Please choose only one command\n",
        ),
        (&["-s", "bs"], "Error: -b option is required.\n"),
        (
            &["-b", "A", "-b", "B", "-s", "bs"],
            "Current setting for -b is: A\nERROR: -b option can only be set once.\n",
        ),
    ];
    for (args, want) in cases {
        let o = blobcli(d, args, None);
        assert!(stdout(&o).contains(want), "{args:?}: {}", stdout(&o));
        assert_ne!(o.status.code(), Some(0), "{args:?}");
    }
    // (g) missing config.
    let o = blobcli(
        d,
        &["-j", "missing.json", "-b", "Malloc0", "-s", "bs"],
        None,
    );
    assert!(stdout(&o).starts_with("Error: No config file found.\n"));
    assert_ne!(o.status.code(), Some(0));
    // (h) a bad script line, aborting and skipping.
    malloc_config(d, 262144, 512);
    std::fs::write(d.join("bad.bs"), "-l bdevs\n-z\n-l bdevs\n").unwrap();
    for ignore in [false, true] {
        let mut args = vec!["-j", "conf.json", "-b", "Malloc0", "-T", "bad.bs"];
        if ignore {
            args.push("ignore");
        }
        let o = blobcli(d, &args, None);
        let t = stdout(&o);
        let what = if ignore { "Skipping" } else { "Aborting" };
        assert!(
            t.contains(&format!(
                "ERROR: Invalid script line starting with: -z\n\n** {what} **\n"
            )),
            "{t}"
        );
        // Aborting stops before the second listing and the final -X; skipping runs both.
        let lists = if ignore { 2 } else { 1 };
        assert_eq!(t.matches("List bdevs:").count(), lists, "{t}");
        if ignore {
            assert!(t.ends_with("SCRIPT NOW PROCESSING: -X\n"), "{t}");
            assert!(o.status.success());
        } else {
            assert!(!t.contains("SCRIPT NOW PROCESSING: -X"));
        }
    }
    // A missing bdev stops the tool.
    let o = blobcli(d, &["-j", "conf.json", "-b", "Nope", "-s", "bs"], None);
    assert!(stdout(&o).contains("Could not create blob bdev, No such device!!\n"));
    assert_eq!(o.status.code(), Some(255));
    // Help.
    let o = blobcli(d, &["-h"], None);
    assert!(stdout(&o).contains("\t-x <blobid> name value - set xattr name/value pair\n"));
}

#[test]
fn a46_fill_list_show_delete() {
    let dir = malloc_dir();
    let d = dir.path();
    let t = ok(script(
        d,
        "-i\n-s bs\n-n 2\n-f $B0 0x5a\n-d $B0 out.bin\n-l blobs\n-w $B0\n-l blobs\n",
    ));
    assert!(t.contains("\tsuper blob ID: none assigned\n"), "{t}");
    let id_line = t.lines().find(|l| l.starts_with("New blob id 0x")).unwrap();
    let id = id_line.trim_start_matches("New blob id ").to_string();
    assert!(t.contains("blob now has USED clusters of 2\n"));
    assert!(t.contains("\nBlob fill complete (with 0x5a).\n"));
    assert!(t.contains(&format!("\nList BLOBS:\nFound blob with ID# {id}\n")));
    assert!(t.contains(&format!("Blob {id} has been deleted.\n")));
    assert_eq!(t.matches("Found blob with ID#").count(), 1, "{t}");
    let out = std::fs::read(d.join("out.bin")).unwrap();
    assert_eq!(out.len(), 2 << 20);
    assert!(out.iter().all(|&b| b == 0x5a));
}

#[test]
fn a47_import_shorter_and_longer_and_empty_dump() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let small = random_bytes(100 << 10, 7);
    let big = random_bytes(3 << 20, 8);
    std::fs::write(d.join("small.bin"), &small).unwrap();
    std::fs::write(d.join("big.bin"), &big).unwrap();
    malloc_config(d, 262144, 512);
    let t = ok(script(
        d,
        "-i\n-n 1\n-m $B0 small.bin\n-d $B0 a.bin\n-m $B0 big.bin\n-d $B0 b.bin\n",
    ));
    assert!(t.contains("\nBlob import complete (from small.bin).\n"));
    let a = std::fs::read(d.join("a.bin")).unwrap();
    assert_eq!(a.len(), 1 << 20);
    assert_eq!(&a[..small.len()], &small[..]);
    assert!(a[small.len()..].iter().all(|&b| b == 0));
    let b = std::fs::read(d.join("b.bin")).unwrap();
    assert_eq!(&b[..], &big[..1 << 20]);

    // A blob of 0 clusters (made with the library) dumps to an empty file, without the
    // completion line.
    let img = sparse_file(d, "z.img", 16 << 20);
    ok(blobcli(d, &["--image", "z.img", "-i"], Some("y\n")));
    let dev = file_dev(&img);
    let id = block_on(async {
        let bs = Blobstore::load(dev, BsOpts::default()).await.unwrap();
        let id = new_blob(&bs, 0, false).await;
        bs.unload().await.unwrap();
        id
    });
    let t = blobcli_ok(
        d,
        &["--image", "z.img", "-d", &format!("0x{id:x}"), "e.bin"],
    );
    assert!(!t.contains("File write complete"), "{t}");
    assert_eq!(std::fs::metadata(d.join("e.bin")).unwrap().len(), 0);
    // -m of a missing file.
    let o = blobcli(
        d,
        &["--image", "z.img", "-m", &format!("{id}"), "nope.bin"],
        None,
    );
    assert_stdout_has(&o, "Error in opening file: errno 2\n");
}

#[test]
fn a48_recover_after_kill() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, t) = scripted_image(d, "r.img", 64 << 20, "-i\n-n 40\n-n 2\n");
    let ids: Vec<&str> = t
        .lines()
        .filter_map(|l| l.strip_prefix("New blob id "))
        .collect();
    assert_eq!(ids.len(), 2, "{t}");
    std::fs::write(d.join("big.bin"), random_bytes(40 << 20, 9)).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_blobcli"))
        .current_dir(d)
        .args(["--image", "r.img", "-m", ids[0], "big.bin"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    let _ = child.kill();
    let _ = child.wait();

    let o = blobcli_ok(d, &["--image", "r.img", "-R"]);
    assert_eq!(o, "");
    let o = blobcli(d, &["--image", "r.img", "-l", "blobs"], None);
    let t = stdout(&o);
    for id in &ids {
        assert!(t.contains(&format!("Found blob with ID# {id}\n")), "{t}");
    }
    let o = blobcli(d, &["--image", "r.img", "-s", "bs"], None);
    assert_stdout_has(&o, "\t# free clusters: 21\n");
    let o = blobcli(d, &["--image", "r.img", "-D"], None);
    assert!(stdout(&o).contains("\nClean: 1\n"), "{}", stdout(&o));
    let o = blobcli(d, &["--image", "r.img", "--check"], None);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    drop(img);
}

#[test]
fn a49_shell_mode() {
    let dir = malloc_dir();
    let d = dir.path();
    let t = ok(blobcli(
        d,
        &["-j", "conf.json", "-b", "Malloc0", "-S"],
        Some("-i\ny\n-s bs\n-n 1\n-l blobs\n-j other.json\n-X\n"),
    ));
    assert!(t.starts_with("blob> Your entire blobstore will be destroyed. Are you sure? (y/n) Init blobstore using bdev Name: Malloc0\n"), "{t}");
    assert!(t.contains("blob> Blobstore Public Info:\n"), "{t}");
    assert!(t.contains("blob> New blob id 0x100000000\nblob now has USED clusters of 1\n"));
    assert!(t.contains("blob> \nList BLOBS:\nFound blob with ID# 0x100000000\n"));
    assert!(
        t.contains("ERROR: -j option not valid during shell mode.\n"),
        "{t}"
    );
    assert!(t.ends_with("blob> "), "{t}");
    // End of input without -X also exits 0.
    let o = ok(blobcli(
        d,
        &["-j", "conf.json", "-b", "Malloc0", "-S"],
        Some("-l bdevs\n"),
    ));
    assert_eq!(
        o,
        "blob> \nList bdevs:\n\tbdev Name: Malloc0\n\tbdev Product Name: Malloc disk\n\nblob> "
    );
}

#[test]
fn a50_clean_flag_follows_load_and_unload() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, _) = scripted_image(d, "c.img", 32 << 20, "-i\n-n 1\n");
    let clean = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        u32::from_le_bytes(b[16..20].try_into().unwrap())
    };
    assert_eq!(clean(&img), 1);
    let dev = file_dev(&img);
    block_on(async {
        let bs = Blobstore::load(dev, BsOpts::default()).await.unwrap();
        let b = bs.open_blob(0x1_0000_0000).await.unwrap();
        b.set_xattr("k", b"v\0").unwrap();
        b.sync_md().await.unwrap();
        assert_eq!(
            clean(&img),
            0,
            "a synced change must mark the store dirty on disk"
        );
        b.close().await.unwrap();
        bs.unload().await.unwrap();
    });
    let o = blobcli(d, &["--image", "c.img", "-D"], None);
    assert!(stdout(&o).contains("\nClean: 1\n"), "{}", stdout(&o));

    // A store left dirty (loaded, changed, never unloaded) is recovered by -R. The "crashed"
    // session runs on an in-memory copy written back to the file, since an aio bdev holds an
    // exclusive lock on its file for as long as it lives.
    let mem = blobstore::testing::MemBsDev::from_bytes(4096, std::fs::read(&img).unwrap());
    let dev: Arc<dyn BsDev> = mem.clone();
    let id = block_on(async {
        let bs = Blobstore::load(dev, BsOpts::default()).await.unwrap();
        let id = new_blob(&bs, 3, false).await;
        std::mem::forget(bs);
        id
    });
    std::fs::write(&img, mem.snapshot()).unwrap();
    assert_eq!(clean(&img), 0);
    blobcli_ok(d, &["--image", "c.img", "-R"]);
    assert_eq!(clean(&img), 1);
    let o = blobcli(d, &["--image", "c.img", "-s", &format!("0x{id:x}")], None);
    assert!(stdout(&o).contains("# of clusters: 3\n"), "{}", stdout(&o));
}

#[test]
fn image_is_never_written_by_looking() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, _) = scripted_image(d, "v.img", 16 << 20, "-i\n-n 2\n-x $B0 name alpha\n");
    let before = sha256_file(&img);
    for args in [
        vec!["-s", "bs"],
        vec!["-s", "0x100000000"],
        vec!["-l", "blobs"],
        vec!["-D"],
        vec!["--check"],
        vec!["-d", "0x100000000", "x.bin"],
        vec!["-s", "bs", "--output", "json"],
    ] {
        let mut a = vec!["--image", "v.img"];
        a.extend(args.iter());
        blobcli_ok(d, &a);
    }
    // Not an lvol store: said so, non-zero exit, nothing written.
    let o = blobcli(d, &["--image", "v.img", "-l", "lvols"], None);
    assert!(!o.status.success());
    assert!(stdout(&o).starts_with("Not an lvol store: blobstore type is \"\""));
    assert_eq!(sha256_file(&img), before);
    let o = blobcli(
        d,
        &["--image", "v.img", "-s", "bs", "--output", "json"],
        None,
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["cluster_size"], 1048576);
    assert_eq!(v["super_blob_id"], serde_json::Value::Null);
    let o = blobcli(
        d,
        &["--image", "v.img", "-s", "0x100000000", "--output", "json"],
        None,
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["num_clusters"], 2);
    assert_eq!(v["xattrs"]["name"]["text"], "alpha");
}

#[test]
fn missing_blobs_and_script_tokens() {
    let dir = malloc_dir();
    let d = dir.path();
    let o = script(
        d,
        "-i\n-s 0x100000005\n-d $B3 x.bin\n# a comment\n-l blobs\n",
    );
    let t = stdout(&o);
    // SPDK prints nothing for a blob it cannot find; the reason goes to stderr.
    assert!(
        t.contains(
            "SCRIPT NOW PROCESSING: -s 0x100000005\n\nSCRIPT NOW PROCESSING: -d $B3 x.bin\n"
        ),
        "{t}"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot open blob 0x100000005"));
    assert!(t.contains("ERROR: There is no blob for $B3\n"), "{t}");
    assert!(t.contains("Error in blob open callback (err -2)\n"), "{t}");
    assert!(!t.contains("a comment"));
    assert!(
        t.ends_with("SCRIPT NOW PROCESSING: -l blobs\n\nSCRIPT NOW PROCESSING: -X\n"),
        "{t}"
    );
    assert_eq!(o.status.code(), Some(1));
}

/// A store cut by a power loss in the middle of a snapshot (an unfinished `SNAPTMP`, pages of
/// a cut metadata write) is reported as needing recovery (exit 3), not as damaged, at every
/// cut point; a load then recovers it. A real corruption of that store is still damaged.
#[test]
fn check_tells_needs_recovery_from_damaged() {
    use blobstore::testing::{Fault, MemBsDev};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // A store with a written blob, unloaded cleanly: the starting image.
    let base = MemBsDev::new(4096, 4096);
    let (base_img, id) = block_on(async {
        let bs = Blobstore::init(base.clone(), BsOpts::default())
            .await
            .unwrap();
        let id = new_blob(&bs, 4, true).await;
        write_blob(&bs, id, 0, &[0x5a; 4096]).await.unwrap();
        bs.unload().await.unwrap();
        (base.snapshot(), id)
    });
    // How many writes a whole snapshot makes.
    let probe = MemBsDev::from_bytes(4096, base_img.clone());
    let total = block_on(async {
        let bs = Blobstore::load(probe.clone(), BsOpts::default())
            .await
            .unwrap();
        probe.set_fault(Fault::None);
        bs.create_snapshot(id, Vec::new()).await.unwrap();
        let n = probe.writes();
        std::mem::forget(bs);
        n
    });
    assert!(total >= 2, "a snapshot writes metadata ({total} writes)");
    let img = d.join("cut.img");
    let mut codes = Vec::new();
    for k in 0..total {
        let dev = MemBsDev::from_bytes(4096, base_img.clone());
        block_on(async {
            let bs = Blobstore::load(dev.clone(), BsOpts::default())
                .await
                .unwrap();
            dev.set_fault(Fault::DropAfter(k));
            let _ = bs.create_snapshot(id, Vec::new()).await;
            std::mem::forget(bs);
        });
        std::fs::write(&img, dev.snapshot()).unwrap();
        let before = std::fs::read(&img).unwrap();
        let o = blobcli(d, &["--image", "cut.img", "--check"], None);
        let code = o.status.code();
        assert!(
            matches!(code, Some(0) | Some(3)),
            "cut after write {k}/{total}: exit {code:?}\n{}",
            stdout(&o)
        );
        if code == Some(3) {
            assert_stdout_has(&o, "Result: needs recovery");
        }
        assert_eq!(std::fs::read(&img).unwrap(), before, "--check wrote");
        codes.push(code);
        // What --check promised: a load recovers it, and it then checks clean.
        let o = blobcli(d, &["--image", "cut.img", "-R", "--check"], None);
        assert_eq!(o.status.code(), Some(0), "k={k}: {}", stdout(&o));
    }
    assert!(
        codes.contains(&Some(3)),
        "no cut point needed recovery: {codes:?}"
    );
    // A damaged store stays damaged: break the blob's root page CRC on a dirty store.
    let dev = MemBsDev::from_bytes(4096, base_img.clone());
    block_on(async {
        let bs = Blobstore::load(dev.clone(), BsOpts::default())
            .await
            .unwrap();
        dev.set_fault(Fault::DropAfter(1));
        let _ = bs.create_snapshot(id, Vec::new()).await;
        std::mem::forget(bs);
    });
    let mut bytes = dev.snapshot();
    let sb = blobstore::inspect::parse_super(&bytes[..4096]).unwrap();
    let root = (sb.md_start as usize + (id as u32) as usize) * 4096;
    bytes[root + 100] ^= 0xff;
    std::fs::write(&img, &bytes).unwrap();
    let o = blobcli(d, &["--image", "cut.img", "--check"], None);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("Result: damaged"), "{}", stdout(&o));
}
