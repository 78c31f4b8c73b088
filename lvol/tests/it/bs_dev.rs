//! `BdevBsDev`: a bdev descriptor as a blobstore device.

use blobstore::BsDev;
use futures::executor::block_on;
use iobuf::IoBuf;
use lvol::BdevBsDev;
use test_support::prelude::*;

#[test]
fn bdev_bs_dev_forwards_io_and_refuses_after_close() {
    block_on(async {
        let (reg, _m) = setup();
        malloc(&reg, "M", 4 * MIB, 512).await;
        let dev = BdevBsDev::new(reg.open("M", true).unwrap());
        assert_eq!(dev.block_len(), 512);
        assert_eq!(dev.block_count(), 8192);
        assert_eq!(dev.bdev().name(), "M");
        dev.write(8, IoBuf::from_slice(&fill(0x5e, 1024), 1))
            .await
            .unwrap();
        let b = dev.read(8, IoBuf::new(1024, 1)).await.unwrap();
        assert_eq!(b.to_vec(), fill(0x5e, 1024));
        dev.write_zeroes(8, 1).await.unwrap();
        let b = dev.read(8, IoBuf::new(1024, 1)).await.unwrap();
        assert_eq!(&b.to_vec()[..512], &fill(0, 512)[..]);
        assert_eq!(&b.to_vec()[512..], &fill(0x5e, 512)[..]);
        dev.flush().await.unwrap();
        // Out of range is refused by the descriptor.
        assert!(dev.read(8192, IoBuf::new(512, 1)).await.is_err());
        assert!(!dev.is_degraded());
        dev.close();
        assert!(dev.is_closed());
        let e = dev.read(0, IoBuf::new(512, 1)).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
        // The descriptor is gone: the bdev can be removed without waiting.
        reg.unregister("M").await.unwrap();
    });
}

#[test]
fn read_only_descriptor_refuses_writes() {
    block_on(async {
        let (reg, _m) = setup();
        malloc(&reg, "M", MIB, 512).await;
        let dev = BdevBsDev::new(reg.open("M", false).unwrap());
        let e = dev.write(0, IoBuf::new(512, 1)).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        assert!(dev.read(0, IoBuf::new(512, 1)).await.is_ok());
    });
}
