//! Esnap clones in our store whose base is served by qemu-nbd (a raw file, and a qcow2 file
//! over a raw backing file): the clone reads the base's data through the NBD client bdev,
//! goes degraded when the server stays away past the reconnect budget, and heals by itself
//! when the server is back.

use std::time::Duration;

use crate::common::*;
use bdev_core::{BlockDevice, IoBuf};
use bdev_nbd::NbdClientOpts;
use lvol::{LvolModule, LvsOpts};

fn clone_over_remote_base(format: &str) {
    let dir = tempfile::tempdir().unwrap();
    let raw = pattern_file(dir.path(), "golden.raw", 4 * MIB);
    let image = match format {
        "raw" => raw.clone(),
        _ => qcow2_over(dir.path(), &raw, "golden.qcow2"),
    };
    let mut srv = QemuNbd::unix(dir.path(), &image, format, "golden", &["-r"]);
    let (reg, clients) = nbd_clients();
    let lvm = LvolModule::new(reg.clone());
    lvm.set_esnap_retry(2, Duration::from_millis(10));
    block_within(25, async {
        malloc(&reg, "store0", 64 * MIB, 512).await;
        let mut lo = LvsOpts::new("lvs");
        lo.cluster_size = MIB as u32;
        let store = lvm.create_lvstore("store0", lo).await.unwrap();

        let mut o = NbdClientOpts::new("golden0", &srv.address(), "golden");
        o.reconnect_attempts = 2;
        o.reconnect_delay_ms = 50;
        let base = clients.create(o).await.unwrap();
        let uuid = base.uuid();
        reg.wait_for_examine().await;
        // The clone names its base by UUID, so it finds it again after a re-registration.
        let ec = lvm
            .create_esnap_clone(&uuid.to_string(), &store, "ec")
            .await
            .unwrap();
        assert!(ec.is_esnap_clone());
        assert_eq!(ec.external_snapshot_name(), Some(uuid.to_string()));
        let d = reg.open("lvs/ec", true).unwrap();
        check_pattern(&d, 0, 8192).await.unwrap();
        // A write copies its cluster from the remote base first.
        d.write(2048 + 8, IoBuf::from_slice(&[0xee; 4096], 1))
            .await
            .unwrap();
        check_pattern(&d, 2048, 8).await.unwrap();
        check_pattern(&d, 2048 + 16, 2048 - 16).await.unwrap();
        assert_eq!(ec.num_allocated_clusters(), 1);

        // The server goes away for longer than the budget: the base is hot-removed and the
        // clone goes degraded. Its own cluster still reads; the rest fails with EIO.
        srv.kill();
        let mut gone = false;
        for _ in 0..100 {
            // Reads of the base notice the loss; each one completes, never hangs.
            let _ = d.read(0, IoBuf::new(4096, 1)).await;
            if reg.get_by_uuid(&uuid).is_none() {
                gone = true;
                break;
            }
            futures_timer::Delay::new(Duration::from_millis(20)).await;
        }
        assert!(gone, "the base was not hot-removed");
        assert!(ec.is_degraded());
        let own = d.read(2048 + 8, IoBuf::new(4096, 1)).await.unwrap();
        assert!(own.iter().all(|&b| b == 0xee));
        let e = d.read(0, IoBuf::new(4096, 1)).await.unwrap_err();
        assert_eq!(e.errno(), libc::EIO);

        // The server is back: the NBD bdev comes back with the same UUID and the clone heals
        // in place, through the same descriptor.
        srv.restart();
        let mut healed = false;
        for _ in 0..250 {
            if reg.get_by_uuid(&uuid).is_some() {
                reg.wait_for_examine().await;
                if !ec.is_degraded() {
                    healed = true;
                    break;
                }
            }
            futures_timer::Delay::new(Duration::from_millis(20)).await;
        }
        assert!(healed, "the clone did not heal");
        check_pattern(&d, 0, 2048).await.unwrap();
        check_pattern(&d, 4096, 4096).await.unwrap();
        let own = d.read(2048 + 8, IoBuf::new(4096, 1)).await.unwrap();
        assert!(own.iter().all(|&b| b == 0xee));
        drop(d);
        lvm.delete_lvol(&ec).await.unwrap();
        clients.delete("golden0").await.unwrap();
    });
}

#[test]
fn esnap_clone_of_a_raw_export_degrades_and_heals() {
    if have_qemu("esnap_clone_of_a_raw_export") {
        clone_over_remote_base("raw");
    }
}

#[test]
fn esnap_clone_of_a_qcow2_export_degrades_and_heals() {
    if have_qemu("esnap_clone_of_a_qcow2_export") {
        clone_over_remote_base("qcow2");
    }
}
