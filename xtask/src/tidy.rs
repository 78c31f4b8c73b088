//! Repository-wide checks that run as ordinary tests (`cargo test -p xtask`).

use std::path::{Path, PathBuf};

use crate::util::crate_dirs;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Lines of `text` that use any of the attributes, as `path:line: text`.
fn offending_lines(path: &Path, text: &str, attrs: &[String]) -> Vec<String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| attrs.iter().any(|a| l.contains(a.as_str())))
        .map(|(i, l)| format!("{}:{}: {}", path.display(), i + 1, l.trim()))
        .collect()
}

/// The attributes a test must not use: a test that never runs, or passes by panicking.
fn banned() -> Vec<String> {
    // Spelled in pieces so that this file does not trip the check itself.
    ["ignore", "should_panic"]
        .iter()
        .map(|a| format!("#[{a}"))
        .collect()
}

#[test]
fn no_ignored_or_should_panic_tests_in_crates() {
    let mut files = Vec::new();
    for dir in crate_dirs() {
        rust_files(&dir, &mut files);
    }
    assert!(
        !files.is_empty(),
        "no Rust files found in the workspace crates"
    );
    let attrs = banned();
    let mut bad = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        bad.extend(offending_lines(f, &text, &attrs));
    }
    assert!(
        bad.is_empty(),
        "tests must not be ignored or pass by panicking:\n{}",
        bad.join("\n")
    );
}

#[test]
fn every_lib_rs_starts_with_a_crate_doc() {
    let mut bad = Vec::new();
    for dir in crate_dirs() {
        let lib = dir.join("src").join("lib.rs");
        if let Ok(text) = std::fs::read_to_string(&lib) {
            if !text.trim_start().starts_with("//!") {
                bad.push(lib.display().to_string());
            }
        }
    }
    assert!(bad.is_empty(), "lib.rs without a //! crate doc: {bad:?}");
}

#[test]
fn the_check_catches_what_it_should() {
    let attrs = banned();
    let sample = format!(
        "fn a() {{}}\n    {}]\nfn b() {{}}\n{}(expected = \"x\")]\n",
        attrs[0], attrs[1]
    );
    let hits = offending_lines(Path::new("x.rs"), &sample, &attrs);
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert!(hits[0].starts_with("x.rs:2:"));
    assert!(offending_lines(Path::new("y.rs"), "#[test]\nfn ok() {}\n", &attrs).is_empty());
}
