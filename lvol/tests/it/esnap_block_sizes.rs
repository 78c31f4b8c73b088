//! Esnap clones whose base has a different block size from the store (512 vs 4096).

use futures::executor::block_on;
use test_support::prelude::*;

fn run(store_bl: u32, base_bl: u32) {
    block_on(async {
        let (reg, m) = setup();
        let dir = tempfile::tempdir().unwrap();
        let base = sparse_file(dir.path(), "base.img", 8 * MIB);
        let data = pattern(0x5a, 0, 8 * MIB as usize);
        std::fs::write(&base, &data).unwrap();
        aio(&reg, "base", &base, base_bl, None, true).await;
        malloc(&reg, "store", 64 * MIB, store_bl).await;
        let s = lvs(&m, "store", "lvs", MIB as u32).await;
        let clone = m.create_esnap_clone("base", &s, "ec").await.unwrap();
        let d = open(&reg, clone.unique_id(), true);
        // Unallocated: read through to the base.
        assert_eq!(read_at(&d, 0, 8192).await.unwrap(), data[..8192].to_vec());
        assert_eq!(
            read_at(&d, 3 * MIB + 4096, 4096).await.unwrap(),
            data[(3 * MIB + 4096) as usize..(3 * MIB + 8192) as usize].to_vec()
        );
        // Partial write: copy-on-write from the base keeps the rest of the cluster.
        write_at(&d, MIB + 4096, &fill(0xee, 4096)).await.unwrap();
        let got = read_at(&d, MIB, MIB as usize).await.unwrap();
        let mut want = data[MIB as usize..2 * MIB as usize].to_vec();
        want[4096..8192].copy_from_slice(&fill(0xee, 4096));
        assert_eq!(got, want);
    });
}

#[test]
fn base_512_store_4096() {
    run(4096, 512);
}

#[test]
fn base_4096_store_4096() {
    run(4096, 4096);
}

#[test]
fn base_512_store_512() {
    run(512, 512);
}
