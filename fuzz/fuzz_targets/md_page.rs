//! Fuzzes the md page and mask parsers, and a load of a store whose first md page is the input.
#![no_main]

use blobstore::testing::MemBsDev;
use blobstore::{inspect, BlobOpts, Blobstore, BsOpts};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = inspect::parse_md_page(data);
    let _ = inspect::parse_mask(data);
    if data.len() < 4096 {
        return;
    }
    futures::executor::block_on(async {
        // A small store with one blob whose root page is replaced by the input.
        let d = MemBsDev::new(4096, 64);
        let o = BsOpts {
            cluster_size: 16384,
            ..Default::default()
        };
        let bs = Blobstore::init(d.clone(), o.clone()).await.unwrap();
        let id = bs
            .create_blob(BlobOpts {
                num_clusters: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        drop(bs);
        let mut img = d.snapshot();
        let md_start = inspect::parse_super(&img[..4096]).unwrap().md_start as usize;
        let p = (md_start + (id as u32) as usize) * 4096;
        img[p..p + 4096].copy_from_slice(&data[..4096]);
        if data.len() > 4096 && data[4096] & 1 == 1 {
            let c = crc32c::crc32c(&img[p..p + 4092]);
            img[p + 4092..p + 4096].copy_from_slice(&c.to_le_bytes());
        }
        let d = MemBsDev::from_bytes(4096, img);
        if let Ok(bs) = Blobstore::load(d.clone(), o).await {
            if let Ok(b) = bs.open_blob(id).await {
                let _ = b.close().await;
            }
        }
        let _ = inspect::check(d).await;
    });
});
