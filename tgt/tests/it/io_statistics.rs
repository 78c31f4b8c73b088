//! I/O statistics and latency histograms (issue 16) read with SPDK's own `spdk-rpc`: the
//! counts and bytes match the I/O the test did through an NBD export of a lvol.

use crate::common::*;
use base64::Engine;
use nbd_proto as proto;
use serde_json::{json, Value};

const READS: u64 = 37;
const WRITES: u64 = 23;
const TRIMS: u64 = 3;

/// The histogram's buckets decoded from SPDK's encoding (base64 of the u64 array).
fn decode_buckets(h: &Value) -> Vec<u64> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(h["histogram"].as_str().expect("histogram string"))
        .expect("base64");
    assert_eq!(bytes.len() % 8, 0);
    let buckets: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let g = h["granularity"].as_u64().unwrap();
    let ranges = h["max_range"].as_u64().unwrap() - h["min_range"].as_u64().unwrap() + 1;
    assert_eq!(buckets.len() as u64, ranges << g, "{h}");
    buckets
}

#[test]
fn iostat_and_histogram_count_exactly_the_io_done_on_a_lvol() {
    let Some(tools) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let t = start(&tools, dir.path());
    t.ok(&["bdev_malloc_create", "-b", "M0", "64", "4096"]);
    t.ok(&["bdev_lvol_create_lvstore", "-c", "1048576", "M0", "lvs"]);
    t.ok(&["bdev_lvol_create", "-l", "lvs", "-t", "v", "16"]);
    let nbd = t.nbd_server_start(dir.path());
    t.ok(&["nbd_export_add", "lvs/v", "-n", "v"]);
    let name = t.ok(&["bdev_get_bdevs", "-b", "lvs/v"])[0]["name"]
        .as_str()
        .unwrap()
        .to_string();

    // Histogram on before any I/O, all types.
    assert_eq!(t.err(&["bdev_get_histogram", "lvs/v"]).code, -32603);
    t.ok(&["bdev_enable_histogram", "--histogram", "lvs/v"]);

    let mut c = NbdClient::connect(&nbd, "v").unwrap();
    let mut bytes_written = 0u64;
    let mut bytes_read = 0u64;
    for i in 0..WRITES {
        let len = 4096 * (1 + (i as u32 % 4));
        let payload = vec![i as u8; len as usize];
        let (e, _) = c
            .request(proto::CMD_WRITE, i * 65536, len, &payload)
            .unwrap();
        assert_eq!(e, 0);
        bytes_written += u64::from(len);
    }
    for i in 0..READS {
        let len = 4096 * (1 + (i as u32 % 3));
        let (e, d) = c.request(proto::CMD_READ, i * 8192, len, &[]).unwrap();
        assert_eq!((e, d.len()), (0, len as usize));
        bytes_read += u64::from(len);
    }
    for i in 0..TRIMS {
        let (e, _) = c
            .request(proto::CMD_TRIM, (8 + i) << 20, 1 << 20, &[])
            .unwrap();
        assert_eq!(e, 0);
    }

    let st = t.ok(&["bdev_get_iostat", "--names", "lvs/v"]);
    assert_eq!(st["tick_rate"], json!(1_000_000_000u64), "{st}");
    assert!(st["ticks"].as_u64().unwrap() > 0);
    let b = &st["bdevs"][0];
    assert_eq!(st["bdevs"].as_array().unwrap().len(), 1);
    assert_eq!(b["name"], json!(name));
    assert_eq!(b["num_read_ops"], json!(READS), "{b}");
    assert_eq!(b["bytes_read"], json!(bytes_read));
    assert_eq!(b["num_write_ops"], json!(WRITES));
    assert_eq!(b["bytes_written"], json!(bytes_written));
    assert_eq!(b["num_unmap_ops"], json!(TRIMS));
    assert_eq!(b["bytes_unmapped"], json!(TRIMS << 20));
    assert_eq!(b["io_error"], json!({}));
    for k in ["read", "write", "unmap"] {
        let sum = b[format!("{k}_latency_ticks")].as_u64().unwrap();
        let max = b[format!("max_{k}_latency_ticks")].as_u64().unwrap();
        let min = b[format!("min_{k}_latency_ticks")].as_u64().unwrap();
        assert!(min > 0 && min <= max && max <= sum, "{k}: {b}");
    }
    // The malloc base under it saw at least the lvol's writes (plus metadata).
    let all = t.ok(&["bdev_get_iostat"]);
    let names: Vec<&str> = all["bdevs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["M0", name.as_str()]);
    assert!(all["bdevs"][0]["bytes_written"].as_u64().unwrap() >= bytes_written);

    // The histogram holds every I/O, and the borders count them too.
    let h = t.ok(&["bdev_get_histogram", "lvs/v"]);
    assert_eq!(h["tsc_rate"], json!(1_000_000_000u64));
    let total: u64 = decode_buckets(&h).iter().sum();
    assert_eq!(total, READS + WRITES + TRIMS);
    let bc = t.ok(&[
        "bdev_get_histogram_borders",
        "lvs/v",
        "--borders",
        "1,100000000",
    ]);
    let bc = bc["borders_count"].as_array().unwrap().clone();
    assert_eq!(bc.len(), 3);
    assert_eq!(bc[2], json!(READS + WRITES + TRIMS));

    // Per channel: the stripes add up to the device's counts.
    let pc = t.ok(&["bdev_get_iostat", "--names", "lvs/v", "-c"]);
    assert_eq!(pc["name"], json!(name));
    let sum: u64 = pc["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["num_read_ops"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, READS);

    // Reset modes: maxmin keeps the counts, all clears them.
    t.ok(&["bdev_reset_iostat", "-b", "lvs/v", "-m", "maxmin"]);
    let b = t.ok(&["bdev_get_iostat", "--names", "lvs/v"])["bdevs"][0].clone();
    assert_eq!(b["num_read_ops"], json!(READS));
    assert_eq!(b["max_read_latency_ticks"], json!(0));
    assert_eq!(b["min_read_latency_ticks"], json!(0));
    let b =
        t.ok(&["bdev_get_iostat", "--names", "lvs/v", "--reset-mode", "all"])["bdevs"][0].clone();
    assert_eq!(b["num_write_ops"], json!(WRITES));
    let b = t.ok(&["bdev_get_iostat", "--names", "lvs/v"])["bdevs"][0].clone();
    assert_eq!(
        (b["num_write_ops"].clone(), b["bytes_read"].clone()),
        (json!(0), json!(0))
    );

    // Counting starts again from zero.
    let (e, _) = c.request(proto::CMD_READ, 0, 4096, &[]).unwrap();
    assert_eq!(e, 0);
    let b = t.ok(&["bdev_get_iostat", "--names", "lvs/v"])["bdevs"][0].clone();
    assert_eq!(b["num_read_ops"], json!(1));

    // An older client's {"name": ...} and errors as SPDK's.
    let (r, _) = raw_exchange(
        &t.sock,
        br#"{"jsonrpc":"2.0","id":1,"method":"bdev_get_iostat","params":{"name":"lvs/v"}}"#,
        1,
    );
    assert_eq!(
        r[0]["result"]["bdevs"][0]["num_read_ops"],
        json!(1),
        "{r:?}"
    );
    assert_eq!(t.err(&["bdev_get_iostat", "--names", "nope"]).code, -19);
    assert_eq!(
        t.err(&["bdev_get_iostat", "--names", "lvs/v,M0", "-c"])
            .code,
        -22
    );
    assert_eq!(t.err(&["bdev_reset_iostat", "-b", "nope"]).code, -19);
    assert_eq!(
        t.err(&[
            "bdev_enable_histogram",
            "--histogram",
            "lvs/v",
            "-o",
            "bogus"
        ])
        .code,
        -32603
    );
    assert_eq!(
        t.err(&[
            "bdev_enable_histogram",
            "--histogram",
            "lvs/v",
            "--granularity",
            "40"
        ])
        .code,
        -22
    );
    t.ok(&["bdev_enable_histogram", "--no-histogram", "lvs/v"]);
    assert_eq!(t.err(&["bdev_get_histogram", "lvs/v"]).code, -32603);

    // Only writes, with SPDK's bounds.
    t.ok(&[
        "bdev_enable_histogram",
        "--histogram",
        "lvs/v",
        "-o",
        "write",
    ]);
    for i in 0..5u64 {
        let (e, _) = c
            .request(proto::CMD_WRITE, i * 4096, 4096, &[7; 4096])
            .unwrap();
        assert_eq!(e, 0);
        let (e, _) = c.request(proto::CMD_READ, i * 4096, 4096, &[]).unwrap();
        assert_eq!(e, 0);
    }
    let h = t.ok(&["bdev_get_histogram", "lvs/v"]);
    assert_eq!(decode_buckets(&h).iter().sum::<u64>(), 5);
    assert_eq!(h["granularity"], json!(7));
    // 1000 ns is range 3 at granularity 7 (SPDK's min_nsec default).
    assert_eq!(h["min_range"], json!(3));
}
