//! Every store SPDK wrote (tests/fixtures/spdk), inspected with blobcli alone on temp
//! copies: listed, shown, dumped (`-D`), checked clean, and every lvol or blob dumped to a
//! file whose sha256 matches the manifest. None of this may change the image.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::common::*;
use serde_json::Value;

const ESNAP_UUID: &str = "7e5a0000-e5a0-4e5a-8e5a-000000000001";

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    image: PathBuf,
    manifest: Value,
    name: &'static str,
}

/// Decompresses a fixture file once per test process (debug-build gunzip is slow) and
/// returns the pristine copy.
fn pristine(rel: &str) -> PathBuf {
    static CACHE: OnceLock<Mutex<(tempfile::TempDir, HashMap<String, PathBuf>)>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new((tempfile::tempdir().unwrap(), HashMap::new())));
    let mut g = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = g.1.get(rel) {
        return p.clone();
    }
    let sub = g.0.path().join(rel.replace('/', "_"));
    std::fs::create_dir_all(&sub).unwrap();
    let p = test_support::gunzip_fixture(rel, &sub).unwrap();
    g.1.insert(rel.to_string(), p.clone());
    p
}

fn fixture(name: &'static str) -> Fixture {
    let img = if name == "blobcli" {
        "bs.img.gz"
    } else {
        "store.img.gz"
    };
    let dir = tempfile::tempdir().unwrap();
    let src = pristine(&format!("{name}/{img}"));
    let image = dir.path().join(src.file_name().unwrap());
    std::fs::copy(&src, &image).unwrap();
    let manifest = test_support::manifest(name);
    let file = image.file_name().unwrap().to_str().unwrap().to_string();
    assert_eq!(
        sha256_file(&image),
        manifest["files"][&file]["sha256_uncompressed"]
            .as_str()
            .unwrap(),
        "fixture copy differs from the manifest"
    );
    if name == "esnap" {
        std::fs::copy(pristine("esnap/esnap.img.gz"), dir.path().join("esnap.img")).unwrap();
    }
    Fixture {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        image,
        manifest,
        name,
    }
}

/// Arguments naming the image as bdev `aio0` (as SPDK's dumps did), plus the esnap base for
/// the esnap fixture.
fn base_args(f: &Fixture) -> Vec<String> {
    let mut v = vec![
        "--image".to_string(),
        f.image.display().to_string(),
        "-b".into(),
        "aio0".into(),
    ];
    if f.name == "esnap" {
        let extra = format!(
            r#",{{"method":"bdev_aio_create","params":{{"name":"esnap","filename":"{}","block_size":4096,"readonly":true,"uuid":"{ESNAP_UUID}"}}}}"#,
            f.dir.join("esnap.img").display()
        );
        // The config holds only the esnap base; the store comes from --image.
        let p = f.dir.join("esnap.json");
        let text = format!(
            r#"{{"subsystems":[{{"subsystem":"bdev","config":[{}]}}]}}"#,
            extra.trim_start_matches(',')
        );
        std::fs::write(&p, text).unwrap();
        v.push("-j".into());
        v.push(p.display().to_string());
    }
    v
}

fn run(f: &Fixture, extra: &[&str]) -> std::process::Output {
    let mut args = base_args(f);
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    blobcli(&f.dir, &a, None)
}

fn rpc_text(name: &str, file: &str) -> String {
    std::fs::read_to_string(test_support::spdk_fixture(name).join("rpc").join(file)).unwrap()
}

/// SPDK v24.09's `-D` printed one slot too many for every extent page (it read the 4 bytes
/// after the descriptor: SPDK commit eda006d048 "lib/blob: fix cluster_idx loop bound when
/// dump mdpage"). Drops that last line of each extent page, giving current SPDK's output.
fn dump_to_current(text: &str) -> String {
    let mut out = String::new();
    for (i, sec) in text.split("=========\n").enumerate() {
        if i > 0 {
            out.push_str("=========\n");
        }
        let lines: Vec<&str> = sec.lines().collect();
        let is_extent_page = !sec.contains("Flags:")
            && lines.last().is_some_and(|l| {
                l.starts_with("Unallocated Extent") || l.starts_with("Allocated Extent")
            });
        let keep = if is_extent_page && i > 0 {
            lines.len() - 1
        } else {
            lines.len()
        };
        for l in &lines[..keep] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// SPDK v24.09 printed `page size` and `# of pages`; current blobcli prints `md page size`
/// and `# of io units` (equal values on these 4096-byte-block stores).
fn to_current(text: &str) -> String {
    text.replace("\tpage size:", "\tmd page size:")
        .replace("# of pages:", "# of io units:")
}

fn check_fixture(name: &'static str) {
    let f = fixture(name);
    let before = sha256_file(&f.image);

    // -D: SPDK's own dump, line for line.
    let o = ok(run(&f, &["-D"]));
    assert_eq!(
        o,
        dump_to_current(&rpc_text(name, "blobcli_dump_md.txt")),
        "-D of {name}"
    );

    // -s bs.
    let o = ok(run(&f, &["-s", "bs"]));
    assert_eq!(
        o,
        to_current(&rpc_text(name, "blobcli_bs.txt")),
        "-s bs of {name}"
    );

    // -l blobs. SPDK's own listing of the esnap store stops at the first esnap clone (it
    // cannot open it); ours lists every blob.
    let o = ok(run(&f, &["-l", "blobs"]));
    let mut ids: Vec<String> = f.manifest["blobs_from_md_dump"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    ids.sort();
    let want: String = ids
        .iter()
        .map(|id| format!("\nList BLOBS:\nFound blob with ID# {id}\n"))
        .collect();
    assert_eq!(o, want, "-l blobs of {name}");
    if name != "esnap" {
        assert_eq!(o, rpc_text(name, "blobcli_list.txt"));
    }

    // -s <blob> for each blob, concatenated as SPDK's blobcli_blobs.txt.
    if name != "esnap" {
        let mut all = String::new();
        for id in &ids {
            let o = ok(run(&f, &["-s", id]));
            all.push_str(&o);
        }
        assert_eq!(
            all,
            to_current(&rpc_text(name, "blobcli_blobs.txt")),
            "-s of {name}"
        );
    }

    // --check: clean.
    let o = run(&f, &["--check"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "--check of {name}: {}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("Result: clean"));

    // Contents.
    if name == "blobcli" {
        for b in f.manifest["blobs"].as_array().unwrap() {
            let id = b["blob_id"].as_str().unwrap();
            let out = f.dir.join(format!("{id}.bin"));
            ok(run(&f, &["-d", id, out.to_str().unwrap()]));
            assert_eq!(
                sha256_file(&out),
                b["sha256"].as_str().unwrap(),
                "blob {id}"
            );
        }
    } else {
        let lvs = f.manifest["lvstores"][0]["name"]
            .as_str()
            .unwrap()
            .to_string();
        let listing = ok(run(&f, &["-l", "lvols"]));
        assert!(
            listing.starts_with(&format!("Lvol store: {lvs} uuid ")),
            "{listing}"
        );
        for l in f.manifest["lvols"].as_array().unwrap() {
            let alias = l["alias"].as_str().unwrap();
            let line = listing
                .lines()
                .find(|x| x.starts_with(&format!("{alias} ")))
                .unwrap_or_else(|| panic!("{alias} not listed:\n{listing}"));
            assert!(line.contains(l["uuid"].as_str().unwrap()));
            assert!(line.contains(&format!("blob_id {}", l["blob_id"].as_str().unwrap())));
            assert!(line.contains(&format!("size {}", l["size_bytes"])));
            assert!(line.contains(if l["thin"].as_bool().unwrap() {
                " thin "
            } else {
                " thick "
            }));
            assert!(line.contains(&format!(
                "allocated_clusters {}",
                l["num_allocated_clusters"]
            )));
            match l["base_snapshot"].as_str() {
                Some(p) => assert!(line.contains(&format!("parent {p} ")), "{line}"),
                None => assert!(line.contains("parent - "), "{line}"),
            }
            match l["external_snapshot_name"].as_str() {
                Some(e) => assert!(line.contains(&format!("esnap {e} (present)")), "{line}"),
                None => assert!(line.ends_with("esnap -"), "{line}"),
            }

            let out = f.dir.join(format!("{}.bin", l["name"].as_str().unwrap()));
            let o = ok(run(&f, &["-d", alias, out.to_str().unwrap()]));
            assert!(o.contains(&format!("File write complete (to {}).", out.display())));
            assert_eq!(
                sha256_file(&out),
                l["sha256"].as_str().unwrap(),
                "content of {alias}"
            );
        }
        // JSON listing.
        let o = run(&f, &["-l", "lvols", "--output", "json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["lvstore"]["name"], f.manifest["lvstores"][0]["name"]);
        assert_eq!(v["lvstore"]["uuid"], f.manifest["lvstores"][0]["uuid"]);
        assert_eq!(
            v["lvols"].as_array().unwrap().len(),
            f.manifest["lvols"].as_array().unwrap().len()
        );
        // The flags mean what bdev_lvol_get_lvols says they mean.
        for l in f.manifest["lvols"].as_array().unwrap() {
            let got = v["lvols"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["alias"] == l["alias"])
                .unwrap_or_else(|| panic!("{} missing from JSON", l["alias"]));
            for key in [
                "uuid",
                "blob_id",
                "size_bytes",
                "thin",
                "is_snapshot",
                "is_clone",
                "is_esnap_clone",
                "is_degraded",
                "num_allocated_clusters",
                "base_snapshot",
                "external_snapshot_name",
            ] {
                assert_eq!(got[key], l[key], "{} of {}", key, l["alias"]);
            }
        }
    }
    assert_eq!(sha256_file(&f.image), before, "{name} image was modified");
}

#[test]
fn basic_fixture_lists_checks_and_dumps() {
    check_fixture("basic");
}

#[test]
fn esnap_fixture_lists_checks_and_dumps() {
    check_fixture("esnap");
}

#[test]
fn dirty_fixture_lists_checks_and_dumps() {
    check_fixture("dirty");
}

#[test]
fn blobcli_fixture_lists_checks_and_dumps() {
    check_fixture("blobcli");
}

#[test]
fn esnap_base_missing_is_reported() {
    let f = fixture("esnap");
    let img = f.image.display().to_string();
    let text = blobcli_ok(&f.dir, &["--image", &img, "-l", "lvols"]);
    let line = text
        .lines()
        .find(|l| l.starts_with("lvs_esnap/eclone2 "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains(&format!("esnap {ESNAP_UUID} (missing)")),
        "{line}"
    );
}

fn md_page_offset(img: &Path, page: u64) -> u64 {
    let sb = std::fs::read(img).unwrap();
    let md_start = u32::from_le_bytes(sb[48..52].try_into().unwrap()) as u64;
    (md_start + page) * 4096
}

fn flip(img: &Path, off: u64, mask: u8) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(off)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= mask;
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(&b).unwrap();
}

#[test]
fn check_reports_flipped_md_byte() {
    let f = fixture("basic");
    // md page 1 is the first page of `thick` (0x100000001); flip a byte in its descriptors.
    flip(&f.image, md_page_offset(&f.image, 1) + 200, 0x10);
    let before = sha256_file(&f.image);
    let o = run(&f, &["--check"]);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("PROBLEM: "))
        .collect();
    assert!(!problems.is_empty(), "{text}");
    assert!(
        problems
            .iter()
            .any(|p| p.to_lowercase().contains("crc") && p.contains("page 1")),
        "no crc problem naming page 1: {text}"
    );
    assert!(text.contains("Result: damaged"));
    assert_eq!(sha256_file(&f.image), before, "--check wrote to the image");
}

#[test]
fn check_reports_cleared_cluster_mask_bit() {
    let f = fixture("basic");
    let sb = std::fs::read(&f.image).unwrap();
    let start = u32::from_le_bytes(sb[40..44].try_into().unwrap()) as u64;
    // Cluster 3 belongs to `thick`; clear its bit in the used-cluster mask.
    let cluster = 3u64;
    flip(&f.image, start * 4096 + 5 + cluster / 8, 1 << (cluster % 8));
    let before = sha256_file(&f.image);
    let o = run(&f, &["--check"]);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("PROBLEM: ") && l.contains("cluster 3")),
        "no problem naming cluster 3: {text}"
    );
    assert_eq!(sha256_file(&f.image), before, "--check wrote to the image");
    // The JSON form says the same.
    let o = run(&f, &["--check", "--output", "json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["clean"], Value::Bool(false));
    assert!(!v["problems"].as_array().unwrap().is_empty());
}

#[test]
fn check_of_unreadable_device_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("zero.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let o = blobcli(
        dir.path(),
        &["--image", img.to_str().unwrap(), "--check"],
        None,
    );
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    let o = blobcli(
        dir.path(),
        &[
            "--image",
            dir.path().join("missing.img").to_str().unwrap(),
            "--check",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
}

#[test]
fn esnap_base_through_read_only_bdev() {
    let f = fixture("esnap");
    let cfg = f.dir.join("ro.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"subsystems":[{{"subsystem":"bdev","config":[
              {{"method":"bdev_aio_create","params":{{"name":"esnap_file","filename":"{}","block_size":4096}}}},
              {{"method":"bdev_ro_create","params":{{"name":"golden","base_bdev_name":"esnap_file","uuid":"{ESNAP_UUID}"}}}}
            ]}}]}}"#,
            f.dir.join("esnap.img").display()
        ),
    )
    .unwrap();
    let img = f.image.display().to_string();
    let c = cfg.display().to_string();
    let o = blobcli(&f.dir, &["--image", &img, "-j", &c, "-l", "bdevs"], None);
    assert_stdout_has(&o, "\tbdev Name: golden\n");
    let o = blobcli(&f.dir, &["--image", &img, "-j", &c, "-l", "lvols"], None);
    let text = stdout(&o);
    assert!(
        text.contains(&format!("esnap {ESNAP_UUID} (present)")),
        "{text}"
    );
    let lvol = f.manifest["lvols"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "eclone2")
        .unwrap()
        .clone();
    let out = f.dir.join("eclone2.bin");
    blobcli_ok(
        &f.dir,
        &[
            "--image",
            &img,
            "-j",
            &c,
            "-d",
            "lvs_esnap/eclone2",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(sha256_file(&out), lvol["sha256"].as_str().unwrap());
}

#[test]
fn dump_of_esnap_clone_without_base_fails() {
    let f = fixture("esnap");
    let img = f.image.display().to_string();
    let out = f.dir.join("e2.bin");
    let o = blobcli(
        &f.dir,
        &[
            "--image",
            &img,
            "-d",
            "lvs_esnap/eclone2",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(!o.status.success());
    assert_stdout_has(&o, "Error in read completion (err ");
}

#[test]
fn recover_then_check_repairs_dirty_store() {
    let f = fixture("dirty");
    let before = sha256_file(&f.image);
    // Looking recovers in memory only.
    let o = run(&f, &["-s", "bs"]);
    assert_stdout_has(&o, "\t# free clusters: 23\n");
    assert_eq!(sha256_file(&f.image), before);
    // -R writes the recovered state; the store is then clean and still checks clean.
    let o = run(&f, &["-R", "--check"]);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(text.contains("Result: clean"), "{text}");
    assert_ne!(sha256_file(&f.image), before);
    let o = run(&f, &["-D"]);
    assert!(stdout(&o).contains("\nClean: 1\n"));
    for l in f.manifest["lvols"].as_array().unwrap() {
        let alias = l["alias"].as_str().unwrap();
        let out = f.dir.join("x.bin");
        ok(run(&f, &["-d", alias, out.to_str().unwrap()]));
        assert_eq!(sha256_file(&out), l["sha256"].as_str().unwrap(), "{alias}");
    }
}

#[test]
fn json_listings() {
    let f = fixture("blobcli");
    let o = run(&f, &["-l", "blobs", "--output", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["blobs"],
        serde_json::json!(["0x100000000", "0x100000002", "0x100000004"])
    );
    let o = run(&f, &["-l", "bdevs", "--output", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["bdevs"][0]["name"], "aio0");
    assert_eq!(v["bdevs"][0]["block_size"], 4096);
    let o = run(&f, &["-s", "bs", "--output", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["super_blob_id"], "0x100000004");
    assert_eq!(v["free_clusters"], 24);
    assert_eq!(v["bstype"], "");
    let o = run(&f, &["-s", "0x100000000", "--output", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["num_clusters"], 4);
    assert_eq!(v["xattrs"]["color"]["text"], "blue");
    assert_eq!(v["xattrs"]["color"]["len"], 5);
}
