//! Blobstore helpers (feature `blob`): a blob made, written or read back whole in one line.

use blobstore::{BlobId, BlobOpts, Blobstore, IoBuf};

/// Creates a blob of `clusters` clusters (thin or thick, other options default).
pub async fn new_blob(bs: &Blobstore, clusters: u64, thin: bool) -> BlobId {
    let opts = BlobOpts {
        num_clusters: clusters,
        thin,
        ..Default::default()
    };
    bs.create_blob(opts).await.expect("create blob")
}

/// Opens blob `id`, writes `data` at io unit `off`, closes it; the write's result.
pub async fn write_blob(
    bs: &Blobstore,
    id: BlobId,
    off: u64,
    data: &[u8],
) -> blobstore::Result<()> {
    let b = bs.open_blob(id).await?;
    let align = bs.io_unit_size() as usize;
    let r = b
        .write(off, IoBuf::from_slice(data, align))
        .await
        .map(|_| ());
    b.close().await?;
    r
}

/// Every byte of blob `id` (opened and closed again).
pub async fn read_blob(bs: &Blobstore, id: BlobId) -> Vec<u8> {
    let b = bs.open_blob(id).await.expect("open blob");
    let unit = bs.io_unit_size() as usize;
    let n = b.num_io_units() as usize * unit;
    let d = b
        .read(0, IoBuf::new(n, unit))
        .await
        .expect("read blob")
        .to_vec();
    b.close().await.expect("close blob");
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use blobstore::testing::MemBsDev;
    use blobstore::BsOpts;

    #[test]
    fn a_blob_written_reads_back_and_the_rest_is_zeroes() {
        futures::executor::block_on(async {
            let dev = MemBsDev::new(4096, 256);
            let o = BsOpts {
                cluster_size: 16384,
                ..Default::default()
            };
            let bs = Blobstore::init(dev, o).await.unwrap();
            let id = new_blob(&bs, 2, true).await;
            write_blob(&bs, id, 5, &[7; 4096]).await.unwrap();
            let d = read_blob(&bs, id).await;
            assert_eq!(d.len(), 2 * 16384);
            assert!(d[5 * 4096..6 * 4096].iter().all(|&x| x == 7));
            assert!(d[..5 * 4096].iter().chain(&d[6 * 4096..]).all(|&x| x == 0));
            assert!(write_blob(&bs, id, 8, &[1; 4096]).await.is_err());
        });
    }
}
