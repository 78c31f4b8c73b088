//! Test support: finds the SPDK-written fixtures in the repository (`tests/fixtures/spdk`),
//! decompresses them into temp dirs (never writing in the repository), reads manifests and
//! hashes data.
//! Used only by tests, benches and xtask; no production crate depends on it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(1)
        .expect("crate sits one level below the workspace root")
        .to_path_buf()
}

/// The SPDK-written fixtures: `$SPDK_RS_FIXTURES` if set, else `<workspace>/tests/fixtures/spdk`
/// (see the README there for how each was made).
pub fn spdk_fixtures_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SPDK_RS_FIXTURES") {
        return PathBuf::from(p);
    }
    workspace_root().join("tests").join("fixtures").join("spdk")
}

/// `tests/fixtures/spdk/<rel>`.
pub fn spdk_fixture(rel: &str) -> PathBuf {
    spdk_fixtures_dir().join(rel)
}

/// Reads `tests/fixtures/spdk/<dir>/MANIFEST.json`.
pub fn manifest(dir: &str) -> serde_json::Value {
    let p = spdk_fixture(dir).join("MANIFEST.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", p.display()))
}

/// Decompresses `tests/fixtures/spdk/<rel>` (a `.gz` file) into `dest_dir`, keeping holes
/// sparse, and returns the path of the decompressed file (the name without `.gz`).
pub fn gunzip_fixture(rel: &str, dest_dir: &Path) -> io::Result<PathBuf> {
    let src = spdk_fixture(rel);
    let name = src
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".gz").to_string())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad fixture name"))?;
    let dest = dest_dir.join(name);
    let mut dec = flate2::read::GzDecoder::new(File::open(&src)?);
    let mut out = File::create(&dest)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = dec.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if chunk.iter().all(|&b| b == 0) {
            // Leave a hole: seek instead of writing zeroes.
            use std::io::Seek;
            out.seek(io::SeekFrom::Current(n as i64))?;
        } else {
            out.write_all(chunk)?;
        }
        len += n as u64;
    }
    out.set_len(len)?;
    Ok(dest)
}

/// Decompresses a fixture into a new temp dir; returns the dir (keep it alive) and the path.
pub fn fixture_copy(rel: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = gunzip_fixture(rel, dir.path()).unwrap_or_else(|e| panic!("gunzip {rel}: {e}"));
    (dir, p)
}

/// Lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The deterministic pattern of `tests/fixtures/spdk/gen_pattern.py`: the 4096-byte block that
/// tag `tag` puts at absolute block index `block`.
pub fn pattern_block(tag: &str, block: u64) -> Vec<u8> {
    let mut hdr = format!("TAG={tag} blk={block:010}").into_bytes();
    hdr.resize(63, b'.');
    hdr.push(b'\n');
    let t: u64 = tag.bytes().map(u64::from).sum();
    let mut out = hdr;
    out.extend((0..(4096 - 64) as u64).map(|j| ((block * 31 + j * 7 + t) % 251) as u8));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures_are_found_and_decompress() {
        let m = manifest("esnap");
        let want = m["files"]["esnap.img"]["sha256_uncompressed"]
            .as_str()
            .unwrap()
            .to_string();
        let (_d, p) = fixture_copy("esnap/esnap.img.gz");
        let data = std::fs::read(&p).unwrap();
        assert_eq!(sha256_hex(&data), want);
        // esnap.img is ESNAP blocks 0..4095.
        assert_eq!(&data[..4096], &pattern_block("ESNAP", 0)[..]);
        assert_eq!(&data[4096 * 77..4096 * 78], &pattern_block("ESNAP", 77)[..]);
    }
}
