#!/usr/bin/env python3
"""Times the big listings of a running tgt (or spdk_tgt): bdev_get_bdevs,
bdev_lvol_get_lvols and framework_get_config, with a client that reads each answer to
its final newline and parses it once.

    python3 python/bench_listing.py SOCKET [N] [--setup] [--json]

--setup first creates a 1 GiB malloc bdev M0, an lvol store `lvs` on it (1 MiB clusters,
md pages for 15 x the clusters) and N (default 10000) thin 1 MiB lvols in one batch.
With TGT_PID set, the target's CPU time per call (from /proc) is printed too, a figure
that does not depend on what else the machine runs. --json prints one JSON object instead
(per method: entries, bytes, parsed_s, last_byte_s, cpu_s, parse_cpu_s), which `cargo xtask
bench` reads. Wall times depend on the machine's load; the CPU figures much less.
"""
import json
import os
import socket
import sys
import time


def read_one(s):
    chunks = []
    while True:
        chunk = s.recv(1 << 22)
        if not chunk:
            raise SystemExit("connection closed")
        chunks.append(chunk)
        # The answer is one line: it ends where a chunk ends with the newline.
        if chunk.endswith(b"\n"):
            return b"".join(chunks), time.perf_counter()


def call(s, method, params=None):
    req = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        req["params"] = params
    s.sendall(json.dumps(req).encode())
    buf, t_recv = read_one(s)
    c = time.process_time()
    v = json.loads(buf)
    call.parse_cpu = time.process_time() - c
    return v, len(buf), t_recv


def cpu(pid):
    if not pid:
        return 0.0
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main():
    sock = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 10000
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    if "--setup" in sys.argv:
        call(s, "bdev_malloc_create", {"name": "M0", "num_blocks": 262144, "block_size": 4096})
        call(s, "bdev_lvol_create_lvstore", {"bdev_name": "M0", "lvs_name": "lvs",
                                             "cluster_sz": 1048576,
                                             "num_md_pages_per_cluster_ratio": 1500})
        t = time.time()
        batch = [{"jsonrpc": "2.0", "id": i, "method": "bdev_lvol_create",
                  "params": {"lvs_name": "lvs", "lvol_name": "v%d" % i, "size_in_mib": 1,
                             "thin_provision": True}} for i in range(n)]
        s.sendall(json.dumps(batch).encode())
        buf, _ = read_one(s)
        errs = [x for x in json.loads(buf) if "error" in x]
        if errs:
            raise SystemExit("%d of %d lvol creations failed: %s" % (len(errs), n, errs[0]))
        if "--json" not in sys.argv:
            print("created %d lvols in %.1f s" % (n, time.time() - t))
    pid = int(os.environ.get("TGT_PID", "0"))
    as_json = "--json" in sys.argv
    results = {}
    for method, params in [("bdev_get_bdevs", None), ("bdev_lvol_get_lvols", None),
                           ("framework_get_config", {"name": "bdev"})]:
        best = (1e9, 0.0)
        parse_cpu = 1e9
        c0 = cpu(pid)
        for _ in range(5):
            t = time.perf_counter()
            r, size, t_recv = call(s, method, params)
            best = min(best, (time.perf_counter() - t, t_recv - t))
            parse_cpu = min(parse_cpu, call.parse_cpu)
        if "result" not in r:
            raise SystemExit("%s failed: %s" % (method, r.get("error")))
        cpu_s = (cpu(pid) - c0) / 5 if pid else None
        results[method] = {"entries": len(r["result"]), "bytes": size, "parsed_s": best[0],
                           "last_byte_s": best[1], "cpu_s": cpu_s, "parse_cpu_s": parse_cpu}
        line = ("%s: %d entries, %d bytes, best of 5: %.4f s with one parse, %.4f s to the last "
                "byte; the parse alone %.4f s of client CPU") % (
            method, len(r["result"]), size, best[0], best[1], parse_cpu)
        if pid:
            line += "; target CPU %.3f s per call" % cpu_s
        if not as_json:
            print(line)
    if as_json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
