//! Fuzzes the super block parser and a full load (with recovery) of the bytes as a device,
//! then opens and reads every blob and runs the checker.
#![no_main]

use blobstore::testing::MemBsDev;
use blobstore::{inspect, Blobstore, BsOpts, IoBuf};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = inspect::parse_super(data);
    let mut img = data.to_vec();
    img.resize(img.len().max(64 * 4096).div_ceil(4096) * 4096, 0);
    // Half the inputs get every page's CRC fixed, so mutations reach past the CRC checks.
    if data.first().is_some_and(|b| b & 1 == 1) {
        for page in img.chunks_mut(4096) {
            let c = crc32c::crc32c(&page[..4092]);
            page[4092..].copy_from_slice(&c.to_le_bytes());
        }
    }
    futures::executor::block_on(async {
        let d = MemBsDev::from_bytes(4096, img);
        if let Ok(bs) = Blobstore::load(d.clone(), BsOpts::default()).await {
            for id in bs.blob_ids() {
                if let Ok(b) = bs.open_blob(id).await {
                    let _ = b.read(0, IoBuf::new(4096, 4096)).await;
                    let _ = b.close().await;
                }
            }
        }
        let _ = inspect::check(d).await;
    });
});
