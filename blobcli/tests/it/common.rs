//! Shared test helpers: SPDK's `test/app/match` rules in Rust, running the binary, fixture
//! copies and hashes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

/// The tokens of a `.match` line.
#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Lit(char),
    /// `$(N)`
    N,
    /// `$(NC)`
    Nc,
    /// `$(FP)`
    Fp,
    /// `$(S)`
    S,
    /// `$(X)`
    X,
    /// `$(XX)`
    Xx,
    /// `$(W)`
    W,
    /// `$(nW)`
    NW,
    /// `$(*)`
    Any,
    /// `$(UUID)`
    Uuid,
}

fn tokenize(pat: &str) -> (Vec<Tok>, bool) {
    let names: [(&str, Option<Tok>); 12] = [
        ("$(OPT)", None),
        ("$(OPX)", None),
        ("$(UUID)", Some(Tok::Uuid)),
        ("$(NC)", Some(Tok::Nc)),
        ("$(FP)", Some(Tok::Fp)),
        ("$(XX)", Some(Tok::Xx)),
        ("$(nW)", Some(Tok::NW)),
        ("$(N)", Some(Tok::N)),
        ("$(S)", Some(Tok::S)),
        ("$(X)", Some(Tok::X)),
        ("$(W)", Some(Tok::W)),
        ("$(*)", Some(Tok::Any)),
    ];
    let mut toks = Vec::new();
    let mut opt = false;
    let mut rest = pat;
    'outer: while !rest.is_empty() {
        for (name, tok) in &names {
            if let Some(r) = rest.strip_prefix(name) {
                match tok {
                    Some(t) => toks.push(t.clone()),
                    None => opt = true,
                }
                rest = r;
                continue 'outer;
            }
        }
        let c = rest.chars().next().unwrap_or(' ');
        toks.push(Tok::Lit(c));
        rest = &rest[c.len_utf8()..];
    }
    (toks, opt)
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}
fn is_graph(c: char) -> bool {
    !c.is_control() && !c.is_whitespace()
}
fn is_print(c: char) -> bool {
    !c.is_control()
}

/// All the lengths (in chars) a token can match at the start of `s`.
fn candidates(t: &Tok, s: &[char]) -> Vec<usize> {
    let run = |start: usize, f: &dyn Fn(char) -> bool| {
        let mut n = start;
        while n < s.len() && f(s[n]) {
            n += 1;
        }
        n
    };
    let sign = usize::from(!s.is_empty() && (s[0] == '-' || s[0] == '+'));
    match t {
        Tok::Lit(c) => {
            if s.first() == Some(c) {
                vec![1]
            } else {
                vec![]
            }
        }
        Tok::N => {
            let e = run(sign, &|c| c.is_ascii_digit());
            (sign + 1..=e).rev().collect()
        }
        Tok::Nc => {
            let e = run(sign, &|c| c.is_ascii_digit() || c == ',');
            (sign + 1..=e)
                .rev()
                .filter(|&k| s[sign].is_ascii_digit() && s[k - 1].is_ascii_digit())
                .collect()
        }
        Tok::Fp => {
            let e = run(sign, &|c| {
                c.is_ascii_digit() || c == '.' || c == 'e' || c == 'E'
            });
            (sign + 1..=e)
                .rev()
                .filter(|&k| {
                    let t: String = s[sign..k].iter().collect();
                    t.parse::<f64>().is_ok() && t.chars().last().is_some_and(|c| c.is_ascii_digit())
                })
                .collect()
        }
        Tok::S => {
            let e = run(0, &|c| !c.is_control());
            (1..=e).rev().collect()
        }
        Tok::X => {
            let e = run(0, &|c| c.is_ascii_hexdigit());
            (1..=e).rev().collect()
        }
        Tok::Xx => {
            if s.len() >= 3 && s[0] == '0' && s[1] == 'x' {
                let e = run(2, &|c| c.is_ascii_hexdigit());
                (3..=e).rev().collect()
            } else {
                vec![]
            }
        }
        Tok::W => (0..=run(0, &is_blank)).rev().collect(),
        Tok::NW => (0..=run(0, &is_graph)).rev().collect(),
        Tok::Any => (0..=run(0, &is_print)).rev().collect(),
        Tok::Uuid => {
            let groups = [8usize, 4, 4, 4, 12];
            let mut i = 0;
            for (g, n) in groups.iter().enumerate() {
                for _ in 0..*n {
                    if i >= s.len() || !s[i].is_ascii_hexdigit() {
                        return vec![];
                    }
                    i += 1;
                }
                if g < 4 {
                    if s.get(i) != Some(&'-') {
                        return vec![];
                    }
                    i += 1;
                }
            }
            vec![i]
        }
    }
}

fn match_toks(toks: &[Tok], s: &[char]) -> bool {
    match toks.first() {
        None => s.is_empty(),
        Some(t) => candidates(t, s)
            .into_iter()
            .any(|n| match_toks(&toks[1..], &s[n..])),
    }
}

/// Whether one output line matches one `.match` line (both without the newline).
pub fn line_matches(pattern: &str, line: &str) -> bool {
    let (toks, _) = tokenize(pattern);
    let chars: Vec<char> = line.chars().collect();
    match_toks(&toks, &chars)
}

/// SPDK's ignore filter: drops lines holding a non-empty ignore line as a substring, and
/// empty lines when the ignore file has an empty line.
pub fn strip_ignored(text: &str, ignore: &str) -> Vec<String> {
    let ign: Vec<&str> = ignore.lines().collect();
    let drop_empty = ign.iter().any(|l| l.is_empty());
    text.replace("\r\n", "\n")
        .lines()
        .filter(|l| {
            if l.is_empty() {
                return !drop_empty;
            }
            !ign.iter().any(|i| !i.is_empty() && l.contains(i))
        })
        .map(String::from)
        .collect()
}

/// SPDK `test/app/match`: every .match line matched in order (`$(OPT)` lines may be
/// missing), nothing left over. The error names the first failing line.
pub fn spdk_match(output: &str, matchfile: &str, ignore: &str) -> Result<(), String> {
    let out = strip_ignored(output, ignore);
    let pats = strip_ignored(matchfile, ignore);
    let mut o = 0usize;
    for (pi, p) in pats.iter().enumerate() {
        let (_, opt) = tokenize(p);
        if o < out.len() && line_matches(p, &out[o]) {
            o += 1;
        } else if !opt {
            return Err(format!(
                "match line {} {:?} did not match output line {} {:?}",
                pi + 1,
                p,
                o + 1,
                out.get(o)
            ));
        }
    }
    if o < out.len() {
        return Err(format!("unexpected output: {:?}", &out[o..]));
    }
    Ok(())
}

/// Runs blobcli in `dir` with `args` and `stdin`.
pub fn blobcli(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_blobcli"));
    cmd.current_dir(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn blobcli");
    {
        use std::io::Write;
        let mut sin = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            let _ = sin.write_all(s.as_bytes());
        }
    }
    child.wait_with_output().expect("wait blobcli")
}

/// The stdout of a run that must have exited 0; otherwise fails the test with both outputs.
pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "blobcli exited {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

/// [`blobcli`] without input, which must exit 0; its stdout.
pub fn blobcli_ok(dir: &Path, args: &[&str]) -> String {
    ok(blobcli(dir, args, None))
}

/// Stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A new temp dir holding `conf.json` for a malloc bdev `Malloc0` of 262144 blocks of 512
/// bytes (see [`malloc_config`]).
pub fn malloc_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    malloc_config(dir.path(), 262144, 512);
    dir
}

/// A new sparse image `dir/<name>` of `size` bytes on which blobcli ran `script`
/// (`--image NAME -T s.bs`, which must succeed): the image and blobcli's output.
pub fn scripted_image(dir: &Path, name: &str, size: u64, script: &str) -> (PathBuf, String) {
    let img = test_support::bdev::sparse_file(dir, name, size);
    std::fs::write(dir.join("s.bs"), script).unwrap();
    let out = blobcli_ok(dir, &["--image", name, "-T", "s.bs"]);
    (img, out)
}

/// Fails the test, showing the output, unless stdout holds `text`.
#[track_caller]
pub fn assert_stdout_has(o: &Output, text: &str) {
    let out = stdout(o);
    assert!(out.contains(text), "{text:?} not in: {out}");
}

/// Hex sha256 of a file (coreutils' `sha256sum` when present: the debug-build sha2 is slow
/// on 64 MiB images).
pub fn sha256_file(p: &Path) -> String {
    if let Ok(o) = Command::new("sha256sum").arg(p).output() {
        if o.status.success() {
            let text = String::from_utf8_lossy(&o.stdout);
            if let Some(h) = text.split_whitespace().next() {
                if h.len() == 64 {
                    return h.to_string();
                }
            }
        }
    }
    hex::encode(Sha256::digest(std::fs::read(p).expect("read file")))
}

/// A malloc config: Malloc0 of `num_blocks` x `block_size`.
pub fn malloc_config(dir: &Path, num_blocks: u64, block_size: u32) -> PathBuf {
    let p = dir.join("conf.json");
    let text = format!(
        r#"{{"subsystems":[{{"subsystem":"bdev","config":[{{"method":"bdev_malloc_create","params":{{"name":"Malloc0","num_blocks":{num_blocks},"block_size":{block_size}}}}}]}}]}}"#
    );
    std::fs::write(&p, text).expect("write config");
    p
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[cfg(test)]
mod matcher_tests {
    use super::*;

    #[test]
    fn tokens_follow_spdk_match() {
        assert!(line_matches("New blob id $(XX)", "New blob id 0x100000000"));
        assert!(!line_matches("New blob id $(XX)", "New blob id 100000000"));
        assert!(line_matches("\tAPI Version: $(N)", "\tAPI Version: 3"));
        assert!(!line_matches("\tAPI Version: $(N)", "\tAPI Version: 3x"));
        assert!(line_matches("Blobstore Type: $(W)", "Blobstore Type: "));
        assert!(line_matches("Blobstore Type: $(W)", "Blobstore Type:    "));
        assert!(!line_matches(
            "Blobstore Type: $(W)",
            "Blobstore Type: LVOL"
        ));
        assert!(line_matches(
            "a $(UUID) b",
            "a 7e5a0000-e5a0-4e5a-8e5a-000000000001 b"
        ));
        assert!(line_matches("$(S) end", "any thing end"));
        assert!(line_matches("x $(FP)", "x -1.5e3"));
        assert!(line_matches("x $(NC)", "x 1,024"));
        assert!(line_matches("$(*)", ""));
        assert!(line_matches(
            "blobstore init'd: ($(XX))",
            "blobstore init'd: (0x7ffd1234)"
        ));
    }

    #[test]
    fn ignore_and_optional_lines() {
        let ign = "Working\n\nEAL\n";
        let out = "a\n\nWorking....\nb\n";
        assert_eq!(strip_ignored(out, ign), vec!["a", "b"]);
        assert!(spdk_match(out, "a\nWorking\n\nb\n", ign).is_ok());
        assert!(spdk_match(out, "a\nmaybe $(OPT)\nb\n", ign).is_ok());
        assert!(spdk_match(out, "a\n", ign).is_err());
        assert!(spdk_match(out, "a\nb\nc\n", ign).is_err());
    }
}
