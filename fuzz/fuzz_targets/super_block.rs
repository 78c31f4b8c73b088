//! Fuzzes the super block parser and a full load (with recovery) of the bytes as a device.
#![no_main]

use blobstore::testing::MemBsDev;
use blobstore::{inspect, Blobstore, BsOpts, IoBuf};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = inspect::parse_super(data);
    let mut img = data.to_vec();
    img.resize(img.len().max(64 * 4096).div_ceil(4096) * 4096, 0);
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
