//! SPDK's blobcli script test (test/blobstore: test.bs, btest.out.match, btest.out.ignore),
//! run unchanged against our binary with a 128 MiB malloc bdev of 512-byte blocks.

use crate::common::*;

#[test]
fn spdk_blobcli_script_test_passes() {
    let src = test_support::spdk_fixture("blobcli-test");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(src.join("test.bs"), d.join("test.bs")).unwrap();
    let pattern = random_bytes(1 << 20, 0x5eed_1234_abcd_0001);
    std::fs::write(d.join("test.pattern"), &pattern).unwrap();
    malloc_config(d, 262144, 512);

    let out = blobcli(
        d,
        &["-j", "conf.json", "-b", "Malloc0", "-T", "test.bs"],
        None,
    );
    let text = stdout(&out);
    let matchfile = std::fs::read_to_string(src.join("btest.out.match")).unwrap();
    let ignore = std::fs::read_to_string(src.join("btest.out.ignore")).unwrap();
    if let Err(e) = spdk_match(&text, &matchfile, &ignore) {
        panic!(
            "{e}\n--- output ---\n{text}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(out.status.success(), "exit {:?}", out.status);
    let dumped = std::fs::read(d.join("test.pattern.blob")).unwrap();
    assert_eq!(dumped.len(), pattern.len());
    assert!(
        dumped == pattern,
        "test.pattern.blob differs from test.pattern"
    );
}
