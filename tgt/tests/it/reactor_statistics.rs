//! Reactor and thread statistics (issue 16) read with SPDK's own `spdk-rpc`:
//! `framework_get_reactors` lists one reactor per `TGT_CORES`, and the busy time of the
//! reactor that serves an NBD connection grows with the I/O done on it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use nbd_proto as proto;
use serde_json::Value;

/// Starts `tgt -r dir/rpc.sock` with `TGT_CORES=cores` in its environment.
fn start_with_cores(tools: &Tools, dir: &Path, cores: usize) -> Tgt {
    let sock = dir.join("rpc.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tgt"));
    cmd.arg("-r")
        .arg(&sock)
        .current_dir(dir)
        .env("TGT_CORES", cores.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("spawn tgt");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "tgt did not open its socket");
        assert!(matches!(child.try_wait(), Ok(None)), "tgt exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    Tgt {
        child: Some(child),
        sock,
        tools: tools.clone(),
    }
}

/// Cores of this process's affinity mask (the target inherits it).
fn allowed_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `(busy, idle)` of every reactor, by lcore.
fn busy_idle(r: &Value) -> Vec<(u64, u64, u64)> {
    r["reactors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["lcore"].as_u64().unwrap(),
                x["busy"].as_u64().unwrap(),
                x["idle"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn reactors_follow_tgt_cores_and_busy_grows_on_the_one_serving_nbd_io() {
    let Some((tools, _)) = setup() else { return };
    for cores in [1, 2].into_iter().filter(|&n| n <= allowed_cores()) {
        let dir = tempfile::tempdir().unwrap();
        let t = start_with_cores(&tools, dir.path(), cores);
        let r0 = t.ok(&["framework_get_reactors"]);
        assert_eq!(r0["tick_rate"].as_u64(), Some(1_000_000_000), "{r0}");
        assert_eq!(r0["pid"].as_u64(), Some(u64::from(t.pid())));
        let reactors = r0["reactors"].as_array().unwrap();
        assert_eq!(reactors.len(), cores, "{r0}");
        for r in reactors {
            let lcore = r["lcore"].as_u64().unwrap();
            for key in ["tid", "irq", "sys", "usr"] {
                assert!(r[key].is_u64(), "{key} in {r}");
            }
            assert!(r["numa_id"].is_i64(), "{r}");
            assert_eq!(r["in_interrupt"], Value::Bool(true));
            let lw = r["lw_threads"].as_array().unwrap();
            assert_eq!(lw.len(), 1, "{r}");
            assert_eq!(lw[0]["name"], format!("reactor_{lcore}"));
            assert_eq!(lw[0]["cpumask"], format!("{:x}", 1u64 << lcore));
            assert!(lw[0]["elapsed"].as_u64().unwrap() > 0);
        }

        // An idle target: its reactors sleep, so nearly all the time passes as idle.
        let a = busy_idle(&r0);
        std::thread::sleep(Duration::from_millis(300));
        let b = busy_idle(&t.ok(&["framework_get_reactors"]));
        for (&(_, b0, i0), &(_, b1, i1)) in a.iter().zip(&b) {
            assert!(i1 - i0 >= 250_000_000, "idle grew {}: {a:?} {b:?}", i1 - i0);
            assert!(b1 - b0 < 50_000_000, "busy grew {}: {a:?} {b:?}", b1 - b0);
        }

        t.ok(&["bdev_malloc_create", "-b", "M0", "32", "4096"]);
        let nbd = t.nbd_server_start(dir.path());
        t.ok(&["nbd_export_add", "M0", "-n", "m0"]);
        let mut c = NbdClient::connect(&nbd, "m0").unwrap();
        // The connection's task lives on exactly one reactor.
        let th = t.ok(&["thread_get_stats"]);
        let serving: Vec<String> = th["threads"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["name"].as_str().unwrap().starts_with("reactor_"))
            .filter(|x| x["active_pollers_count"].as_u64().unwrap() > 0)
            .map(|x| x["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(serving.len(), 1, "{th}");
        let serving_core: u64 = serving[0]["reactor_".len()..].parse().unwrap();

        let before = busy_idle(&t.ok(&["framework_get_reactors"]));
        let payload = vec![0x5au8; 65536];
        for i in 0..2000u64 {
            let (e, _) = c
                .request(proto::CMD_WRITE, (i % 400) * 65536, 65536, &payload)
                .unwrap();
            assert_eq!(e, 0);
            let (e, d) = c
                .request(proto::CMD_READ, (i % 400) * 65536, 65536, &[])
                .unwrap();
            assert_eq!((e, d.len()), (0, 65536));
        }
        let after = busy_idle(&t.ok(&["framework_get_reactors"]));
        let mut grew = None;
        for (&(l, b0, i0), &(l1, b1, i1)) in before.iter().zip(&after) {
            assert_eq!(l, l1);
            assert!(
                b1 >= b0 && i1 >= i0,
                "counters went back: {before:?} {after:?}"
            );
            if l == serving_core {
                grew = Some(b1 - b0);
            }
        }
        let grew = grew.expect("serving reactor listed");
        // 4000 requests of 64 KiB copied through the reactor: well over a millisecond.
        assert!(
            grew > 1_000_000,
            "busy grew {grew} ns: {before:?} {after:?}"
        );
        for (&(l, b0, _), &(_, b1, _)) in before.iter().zip(&after) {
            if l != serving_core {
                assert!(
                    b1 - b0 < grew,
                    "idle reactor {l} busier: {before:?} {after:?}"
                );
            }
        }
        drop(c);
    }
}

#[test]
fn thread_get_stats_lists_the_app_thread_and_each_reactor_thread() {
    let Some((tools, dir)) = setup() else { return };
    let t = start_with_cores(&tools, dir.path(), 1);
    let th = t.ok(&["thread_get_stats"]);
    assert_eq!(th["tick_rate"].as_u64(), Some(1_000_000_000));
    let threads = th["threads"].as_array().unwrap();
    assert_eq!(threads.len(), 2, "{th}");
    assert_eq!(threads[0]["name"], "app_thread");
    assert_eq!(threads[0]["id"], 1);
    let r = t.ok(&["framework_get_reactors"]);
    let lw = &r["reactors"][0]["lw_threads"][0];
    assert_eq!(threads[1]["name"], lw["name"]);
    assert_eq!(threads[1]["id"], lw["id"]);
    assert_eq!(threads[1]["cpumask"], lw["cpumask"]);
    for x in threads {
        for key in [
            "busy",
            "idle",
            "active_pollers_count",
            "timed_pollers_count",
            "paused_pollers_count",
        ] {
            assert!(x[key].is_u64(), "{key} in {x}");
        }
    }
    // The control runtime answered this RPC: it has been busy.
    assert!(threads[0]["busy"].as_u64().unwrap() > 0, "{th}");
    // SPDK takes no parameters here.
    let (resp, _) = raw_exchange(
        &t.sock,
        br#"{"jsonrpc":"2.0","id":1,"method":"thread_get_stats","params":{"x":1}}"#,
        1,
    );
    assert_eq!(resp[0]["error"]["code"], -32602, "{resp:?}");
}
