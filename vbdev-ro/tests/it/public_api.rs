//! vbdev-ro behaviour through the public API: pass-through reads, refused writes, claims,
//! removal and resize of the base, config and info output.

use std::time::Duration;

use crate::common::{base_removal_with_reads_in_flight, close, stamp_base, SlowDev};
use bdev_core::{BdevEvent, BlockDevice, ClaimType, IoBuf, IoType, Registry};
use futures::executor::block_on;
use futures::stream::StreamExt;
use test_support::prelude::*;
use uuid::Uuid;
use vbdev_ro::{create, delete, RoError, RoOpts};

const BLOCK: u32 = 512;
const BLOCKS: u64 = 16384; // 8 MiB

/// Blocks `first..first + blocks` (of `BLOCK` bytes) of a bdev filled with pattern `tag`.
fn pattern_blocks(tag: u8, first: u64, blocks: u64) -> Vec<u8> {
    let bl = u64::from(BLOCK);
    pattern(tag, first * bl, (blocks * bl) as usize)
}

async fn malloc_base(reg: &Registry, name: &str, tag: u8) {
    malloc(reg, name, BLOCKS * u64::from(BLOCK), BLOCK).await;
    fill_pattern(reg, name, tag).await;
}

/// A registry with base `B` (pattern `tag`).
async fn base(tag: u8) -> Registry {
    let reg = Registry::new();
    malloc_base(&reg, "B", tag).await;
    reg
}

/// [`base`] and the base's UUID.
async fn base_with_uuid(tag: u8) -> (Registry, Uuid) {
    let reg = base(tag).await;
    let u = reg.get("B").unwrap().uuid();
    (reg, u)
}

/// Blocks `lba..lba + blocks` of bdev `name` (opened for reading) hold pattern `tag`.
async fn assert_reads(reg: &Registry, name: &str, lba: u64, blocks: u64, tag: u8) {
    let d = reg.open(name, false).unwrap();
    let got = d
        .read(lba, IoBuf::new((blocks * u64::from(BLOCK)) as usize, 1))
        .await
        .unwrap();
    assert_eq!(got[..], pattern_blocks(tag, lba, blocks)[..], "{name}");
}

/// A registry with base `B` (pattern `tag`) and a read-only bdev over it (named `name`, or
/// the default `B_ro`).
async fn base_and_ro(tag: u8, name: Option<&str>) -> Registry {
    let reg = base(tag).await;
    create(&reg, opts("B", name)).await.unwrap();
    reg
}

fn opts(base: &str, name: Option<&str>) -> RoOpts {
    RoOpts {
        base_bdev_name: base.to_string(),
        name: name.map(str::to_string),
        uuid: None,
    }
}

/// [`opts`] with a fixed UUID.
fn opts_uuid(base: &str, name: Option<&str>, uuid: Uuid) -> RoOpts {
    RoOpts {
        uuid: Some(uuid),
        ..opts(base, name)
    }
}

/// A registry with base `B` (pattern `tag`) and ro bdevs `(base, name)` made in order.
fn stack(tag: u8, ros: &[(&str, &str)]) -> Registry {
    let reg = Registry::new();
    block_on(async {
        malloc_base(&reg, "B", tag).await;
        for &(base, name) in ros {
            create(&reg, opts(base, Some(name))).await.unwrap();
        }
    });
    reg
}

#[test]
fn reads_pass_through_and_listing_matches_base() {
    block_on(async {
        let reg = Registry::new();
        malloc_base(&reg, "B", 0x5a).await;
        let ro = create(&reg, opts("B", Some("ro0"))).await.unwrap();
        assert_eq!(ro.name(), "ro0");
        let base = reg.get("B").unwrap();
        let dev = reg.get("ro0").expect("ro0 registered");
        assert_eq!(dev.block_len(), base.block_len());
        assert_eq!(dev.num_blocks(), base.num_blocks());
        assert_eq!(dev.module_name(), "ro");
        assert_ne!(dev.uuid(), base.uuid());

        let d = reg.open("ro0", false).unwrap();
        let all = d
            .read(0, IoBuf::new((BLOCKS * BLOCK as u64) as usize, 1))
            .await
            .unwrap();
        assert!(
            all[..] == pattern_blocks(0x5a, 0, BLOCKS)[..],
            "full read differs"
        );

        let bufs = vec![IoBuf::new(512, 1), IoBuf::new(4096, 1), IoBuf::new(1024, 1)];
        let got = d.readv(100, bufs).await.unwrap();
        let flat: Vec<u8> = got.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(flat, pattern_blocks(0x5a, 100, 11));
    });
}

#[test]
fn io_types_report_read_only() {
    block_on(async {
        let reg = base_and_ro(1, None).await;
        let dev = reg.get("B_ro").expect("default name is <base>_ro");
        let supported: Vec<IoType> = IoType::ALL
            .into_iter()
            .filter(|t| dev.io_type_supported(*t))
            .collect();
        assert_eq!(supported, vec![IoType::Read, IoType::Flush]);
    });
}

#[test]
fn write_class_io_fails_and_base_is_unchanged() {
    block_on(async {
        let reg = base_and_ro(2, Some("ro0")).await;
        let dev = reg.get("ro0").unwrap();

        // Straight to the device (as a module stacked on it without a descriptor check would).
        let e = dev.write(0, IoBuf::new(512, 1)).await.unwrap_err();
        assert_eq!(e.errno(), libc::ENOTSUP, "{e}");
        assert_errno!(dev.writev(0, vec![IoBuf::new(512, 1)]).await, libc::ENOTSUP);
        assert_errno!(dev.unmap(0, 8).await, libc::ENOTSUP);
        assert_errno!(dev.write_zeroes(0, 8).await, libc::ENOTSUP);
        // Flush passes to the base (which has none here: nothing to write back).
        dev.flush().await.unwrap();
        assert_errno!(dev.reset().await, libc::ENOTSUP);
        assert!(dev
            .write(0, IoBuf::new(512, 1))
            .await
            .unwrap_err()
            .to_string()
            .contains("not supported"));

        // Through a (necessarily read-only) descriptor: EBADF, as SPDK's bdev layer answers.
        let d = reg.open("ro0", false).unwrap();
        let e = d
            .write(0, IoBuf::from_slice(&[0xff; 512], 1))
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::EBADF, "{e}");
        assert_errno!(d.unmap(0, 8).await, libc::EBADF);
        assert_errno!(d.write_zeroes(0, 8).await, libc::EBADF);
        assert!(!d.io_type_supported(IoType::Write));
        assert!(!d.io_type_supported(IoType::WriteZeroes));

        assert_reads(&reg, "B", 0, 8, 2).await;
    });
}

#[test]
fn write_open_of_ro_bdev_is_refused() {
    block_on(async {
        let reg = base_and_ro(3, Some("ro0")).await;
        assert_errno!(reg.open("ro0", true), libc::EPERM);
        // Readers, and readers that share a read-only claim (an esnap clone), are fine.
        let r = reg.open("ro0", false).unwrap();
        r.claim(ClaimType::ReadManyWriteNone).unwrap();
    });
}

#[test]
fn base_is_claimed_read_many_write_none_and_still_readable() {
    block_on(async {
        let reg = base(4).await;
        assert_eq!(reg.claim_of("B"), None);
        create(&reg, opts("B", Some("ro0"))).await.unwrap();
        assert_eq!(reg.claim_of("B"), Some(ClaimType::ReadManyWriteNone));
        assert_errno!(reg.open("B", true), libc::EPERM);
        assert_reads(&reg, "B", 7, 1, 4).await;
    });
}

#[test]
fn two_ro_bdevs_share_the_claim_until_the_last_is_gone() {
    block_on(async {
        let reg = base_and_ro(5, Some("ro1")).await;
        create(&reg, opts("B", Some("ro2"))).await.unwrap();
        for n in ["ro1", "ro2"] {
            let d = reg.open(n, false).unwrap();
            let got = d.read(3, IoBuf::new(512, 1)).await.unwrap();
            assert_eq!(got[..], pattern_blocks(5, 3, 1)[..]);
        }
        delete(&reg, "ro1").await.unwrap();
        assert!(reg.get("ro1").is_none());
        assert_eq!(
            reg.open("B", true).err().map(|e| e.errno()),
            Some(libc::EPERM)
        );
        assert_eq!(reg.claim_of("B"), Some(ClaimType::ReadManyWriteNone));
        delete(&reg, "ro2").await.unwrap();
        assert_eq!(reg.claim_of("B"), None);
        let w = reg
            .open("B", true)
            .expect("writable again after the last ro bdev");
        w.write(0, IoBuf::from_slice(&[9u8; 512], 1)).await.unwrap();
    });
}

#[test]
fn create_refuses_a_base_open_for_writing() {
    block_on(async {
        let reg = base(6).await;
        let _w = reg.open("B", true).unwrap();
        let e = create(&reg, opts("B", None)).await.err().unwrap();
        assert_eq!(e.errno(), libc::EPERM, "{e}");
        assert!(reg.get("B_ro").is_none());
    });
}

#[test]
fn names_uuids_and_lookup_by_base_uuid() {
    block_on(async {
        let (reg, base_uuid) = base_with_uuid(7).await;
        let want = Uuid::new_v4();
        let ro = create(&reg, opts_uuid(&base_uuid.to_string(), None, want))
            .await
            .unwrap();
        // The default name comes from the base's real name, not the UUID it was found by.
        assert_eq!(ro.name(), "B_ro");
        assert_eq!(reg.get(&want.to_string()).unwrap().name(), "B_ro");
        assert_eq!(ro.base_bdev_name(), "B");
        assert_eq!(ro.base_bdev_uuid(), base_uuid);

        let dup = create(&reg, opts("B", Some("B_ro"))).await.err().unwrap();
        assert_eq!(dup.errno(), libc::EEXIST);
        let dup_uuid = create(&reg, opts_uuid("B", Some("other"), want))
            .await
            .err()
            .unwrap();
        assert_eq!(dup_uuid.errno(), libc::EEXIST);
        let clash_with_base = create(&reg, opts("B", Some("B"))).await.err().unwrap();
        assert_eq!(clash_with_base.errno(), libc::EEXIST);

        let missing = create(&reg, opts("nope", None)).await.err().unwrap();
        assert!(matches!(missing, RoError::BaseNotFound(_)));
        assert_eq!(missing.errno(), libc::ENODEV);

        // The failed creates left nothing behind: one ro bdev, one claim holder.
        let names: Vec<String> = reg.list().iter().map(|d| d.name().to_string()).collect();
        assert_eq!(names, vec!["B".to_string(), "B_ro".to_string()]);
        delete(&reg, "B_ro").await.unwrap();
        assert_eq!(reg.claim_of("B"), None);
    });
}

#[test]
fn delete_refuses_unknown_and_foreign_bdevs() {
    block_on(async {
        let reg = base(8).await;
        assert_errno!(delete(&reg, "nope").await, libc::ENODEV);
        assert_errno!(delete(&reg, "B").await, libc::ENODEV);
        assert!(
            reg.get("B").is_some(),
            "a malloc bdev must not be deleted as ro"
        );
        create(&reg, opts("B", Some("ro0"))).await.unwrap();
        delete(&reg, "ro0").await.unwrap();
        assert_errno!(delete(&reg, "ro0").await, libc::ENODEV);
    });
}

#[test]
fn delete_sends_remove_to_openers_and_waits_for_them() {
    let reg = stack(9, &[("B", "ro0")]);
    let mut d = reg.open("ro0", false).unwrap();
    let mut ev = d.take_events().unwrap();
    let r2 = reg.clone();
    let deleter = std::thread::spawn(move || block_on(delete(&r2, "ro0")));
    let got = within(10, "remove event", move || block_on(ev.next()));
    assert_eq!(got, Some(BdevEvent::Remove));
    close(d);
    within(10, "delete", move || deleter.join().unwrap()).unwrap();
    assert!(reg.get("ro0").is_none());
    assert_eq!(reg.claim_of("B"), None);
}

#[test]
fn driver_specific_and_config_entry() {
    block_on(async {
        let (reg, base_uuid) = base_with_uuid(10).await;
        let u = Uuid::new_v4();
        create(&reg, opts_uuid("B", Some("ro0"), u)).await.unwrap();
        let dev = reg.get("ro0").unwrap();
        assert_eq!(
            dev.driver_specific(),
            serde_json::json!({"ro": {"base_bdev_name": "B", "base_bdev_uuid": base_uuid.to_string()}})
        );
        assert_eq!(
            dev.write_config(),
            Some(serde_json::json!({
                "method": "bdev_ro_create",
                "params": {"base_bdev_name": "B", "name": "ro0", "uuid": u.to_string()}
            }))
        );
        // Registration order puts the ro bdev's config entry after its base's.
        let order: Vec<String> = reg.list().iter().map(|d| d.name().to_string()).collect();
        assert_eq!(order, vec!["B", "ro0"]);
    });
}

#[test]
fn base_removal_with_64_reads_in_flight() {
    let reg = Registry::new();
    block_on(malloc(&reg, "MB", 65536 * 512, 512));
    stamp_base(&reg, "MB");
    base_removal_with_reads_in_flight(reg, "MB", 64);
}

#[test]
fn base_removal_with_64_slow_reads_in_flight() {
    let reg = Registry::new();
    let slow = SlowDev::new("SB", 65536, 512, Duration::from_millis(2));
    block_on(reg.register(slow)).unwrap();
    stamp_base(&reg, "SB");
    base_removal_with_reads_in_flight(reg, "SB", 64);
}

#[test]
fn base_removal_unregisters_every_ro_bdev_and_notifies_openers() {
    let reg = stack(11, &[("B", "ro1"), ("B", "ro2")]);
    let mut d1 = reg.open("ro1", false).unwrap();
    let mut d2 = reg.open("ro2", false).unwrap();
    let mut e1 = d1.take_events().unwrap();
    let mut e2 = d2.take_events().unwrap();
    let r2 = reg.clone();
    let remover = std::thread::spawn(move || block_on(r2.unregister("B")));
    assert_eq!(
        within(10, "remove on ro1", move || block_on(e1.next())),
        Some(BdevEvent::Remove)
    );
    assert_eq!(
        within(10, "remove on ro2", move || block_on(e2.next())),
        Some(BdevEvent::Remove)
    );
    // A read between the remove notice and the close completes (the removal waits for us)
    // or fails with EIO/ENODEV; it never hangs.
    let r = within(10, "read after remove", move || {
        let res = block_on(d1.read(0, IoBuf::new(512, 1)));
        close(d1);
        res
    });
    match r {
        Ok(buf) => assert_eq!(buf[..], pattern_blocks(11, 0, 1)[..]),
        Err(e) => assert!([libc::EIO, libc::ENODEV].contains(&e.errno()), "{e}"),
    }
    close(d2);
    within(10, "base unregister", move || remover.join().unwrap()).unwrap();
    assert!(reg.get("ro1").is_none() && reg.get("ro2").is_none() && reg.get("B").is_none());
}

#[test]
fn base_resize_propagates_to_ro_openers() {
    let reg = Registry::new();
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "g.img", 2048 * 512);
    let base = aio_dev("G", &path, |o| o.block_len = Some(512));
    block_on(reg.register(base.clone())).unwrap();
    let resize = |blocks: u64| {
        set_file_len(&path, blocks * 512);
        assert_eq!(base.rescan().unwrap(), blocks);
        reg.notify_resize("G");
    };
    block_on(create(&reg, opts("G", None))).unwrap();
    let mut d = reg.open("G_ro", false).unwrap();
    let mut ev = d.take_events().unwrap();
    assert_eq!(d.device().num_blocks(), 2048);
    assert_errno!(block_on(d.read(2048, IoBuf::new(512, 1))), libc::EINVAL);

    resize(8192);
    let got = within(10, "resize event", move || block_on(ev.next()));
    assert_eq!(got, Some(BdevEvent::Resize { num_blocks: 8192 }));
    let dev = reg.get("G_ro").unwrap();
    assert_eq!(dev.num_blocks(), 8192);
    // The new tail is readable through the ro bdev.
    let tail = block_on(d.read(8191, IoBuf::new(512, 1))).unwrap();
    assert_eq!(tail[..], [0u8; 512][..]);

    resize(1024);
    wait_until(10, "ro shrink", || dev.num_blocks() == 1024);
    assert_errno!(block_on(d.read(1024, IoBuf::new(512, 1))), libc::EINVAL);
}

#[test]
fn rpc_create_delete_and_errors() {
    use bdev_core::rpc::RpcModule;
    use serde_json::json;
    let reg = Registry::new();
    block_on(async {
        malloc_base(&reg, "B", 12).await;
        let m = vbdev_ro::RoRpc::new(reg.clone());
        assert_eq!(m.methods(), vec!["bdev_ro_create", "bdev_ro_delete"]);

        assert_eq!(
            rpc!(m, "bdev_ro_create", {"base_bdev_name": "B", "name": "ro0"}),
            json!("ro0")
        );
        assert_eq!(
            rpc!(m, "bdev_ro_create", {"base_bdev_name": "B"}),
            json!("B_ro")
        );
        let u = Uuid::new_v4();
        assert_eq!(
            rpc!(m, "bdev_ro_create", {"base_bdev_name": "B", "name": "ro_u", "uuid": u.to_string()}),
            json!("ro_u")
        );
        assert_eq!(reg.get("ro_u").unwrap().uuid(), u);

        assert_rpc_err!((-19, "No such device"), m, "bdev_ro_create", {"base_bdev_name": "missing"});
        assert_rpc_err!((-17, "File exists"), m, "bdev_ro_create", {"base_bdev_name": "B", "name": "ro0"});
        for bad in [
            None,
            Some(json!({})),
            Some(json!({"name": "x"})),
            Some(json!({"base_bdev_name": 5})),
            Some(json!({"base_bdev_name": "B", "uuid": "not-a-uuid"})),
            Some(json!({"base_bdev_name": "B", "extra": 1})),
        ] {
            let e = m.call("bdev_ro_create", bad.clone()).await.unwrap_err();
            assert_eq!(
                (e.code, e.message.as_str()),
                (-32603, "spdk_json_decode_object failed"),
                "{bad:?}"
            );
        }

        assert_eq!(rpc!(m, "bdev_ro_delete", {"name": "ro0"}), true);
        assert!(reg.get("ro0").is_none());
        assert_rpc_err!((-19, "No such device"), m, "bdev_ro_delete", {"name": "ro0"});
        assert_eq!(rpc_err!(m, "bdev_ro_delete", {"name": "B"}).code, -19);
        assert_eq!(rpc_err!(m, "bdev_ro_delete").code, -32603);
        assert_eq!(rpc_err!(m, "bdev_ro_frobnicate").code, -32601);
    });
}

#[test]
fn ro_bdev_over_ro_bdev_stacks() {
    block_on(async {
        let reg = base_and_ro(13, Some("ro0")).await;
        let top = create(&reg, opts("ro0", None)).await.unwrap();
        assert_eq!(top.name(), "ro0_ro");
        assert_reads(&reg, "ro0_ro", 42, 2, 13).await;
    });
}

#[test]
fn removing_the_bottom_of_a_stack_removes_all_of_it() {
    let reg = stack(14, &[("B", "ro0"), ("ro0", "ro1")]);
    let r2 = reg.clone();
    within(10, "stack removal", move || block_on(r2.unregister("B"))).unwrap();
    wait_until(10, "stack gone", || reg.list().is_empty());
}
