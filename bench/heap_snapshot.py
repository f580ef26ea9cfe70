#!/usr/bin/env python3
"""What a Lua heap snapshot costs, and how much of the heap it finds (stdlib only; root).

    sudo python3 bench/heap_snapshot.py [--mib 100] [--rounds 3] [--seconds 8]

For each LuaJIT layout (GC64, and non-GC64 from scripts/build-luajit-nogc64.sh), one nginx
worker (JIT on) fills a module-level cache until `collectgarbage("count")` reaches --mib MiB
(records of a table, a 100-byte string and a 3-slot array, as a real cache holds), then
serves a CPU-bound Lua handler under `wrk -t1 -c8` on loopback. Each round measures
--seconds of load twice, in turn: without the agent, and while `apisix-agent record --pid W
--mode heap` runs back to back (each run learns the VM, then snapshots). Printed per layout
(medians over the rounds):
  - the snapshot's walk time (the agent's own `elapsed_ms`) and the agent's CPU seconds per
    run (user + system, learning the VM included);
  - the agent's peak RSS (`ru_maxrss` of the `record` process);
  - reached bytes / gc.total at the snapshot (after a full collection before the load);
  - the worker's throughput during snapshots / without (requests per second).
Figures are machine-dependent: quote ratios. Progress on stderr, the table on stdout.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NGINX = "/usr/sbin/nginx"
NOGC64 = os.environ.get("LUAJIT_NOGC64_DIR", "/var/cache/apisix-profiler/luajit-nogc64")

FILL_LUA = r"""
local _M = { cache = {} }
local n = 0
-- Grows the cache by `count` records.
function _M.fill(count)
    local c = _M.cache
    for _ = 1, count do
        n = n + 1
        c[n] = { id = n, name = string.rep("r", 90) .. n, tags = { n, n + 1, n + 2 } }
    end
    return n
end
-- CPU-bound work with short-lived garbage: what the worker serves during the bench.
function _M.work()
    local t = {}
    for i = 1, 200 do t[i] = { i, tostring(i) } end
    local s = 0
    for i = 1, #t do s = s + t[i][1] end
    return s
end
return _M
"""

CONF = """
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 1;
master_process on;
daemon off;
error_log {p}/logs/error.log warn;
pid {p}/logs/nginx.pid;
events {{ worker_connections 512; }}
http {{
  access_log off;
  lua_package_path "{p}/lua/?.lua;;";
  client_body_temp_path {p}/tmp; proxy_temp_path {p}/tmp; fastcgi_temp_path {p}/tmp;
  uwsgi_temp_path {p}/tmp; scgi_temp_path {p}/tmp;
  server {{
    listen 127.0.0.1:{port};
    location /fill {{ content_by_lua_block {{
        require("heapfill").fill(tonumber(ngx.var.arg_n))
        collectgarbage() collectgarbage()
        ngx.say(string.format("%.0f", collectgarbage("count") * 1024))
    }} }}
    location /work {{ content_by_lua_block {{ ngx.say(require("heapfill").work()) }} }}
  }}
}}
"""


def log(msg):
    print(f"[heap_snapshot] {msg}", file=sys.stderr, flush=True)


def get(port, path):
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=120).read().decode()


def start_nginx(work, port, gc64):
    p = os.path.join(work, "gc64" if gc64 else "gc32")
    for d in ("logs", "tmp", "lua", "conf"):
        os.makedirs(os.path.join(p, d), exist_ok=True)
    os.chmod(work, 0o755)
    os.chmod(p, 0o755)
    with open(os.path.join(p, "lua", "heapfill.lua"), "w") as f:
        f.write(FILL_LUA)
    with open(os.path.join(p, "conf", "nginx.conf"), "w") as f:
        f.write(CONF.format(p=p, port=port))
    env = dict(os.environ)
    if not gc64:
        env["LD_LIBRARY_PATH"] = os.path.join(NOGC64, "lib")
    nginx = subprocess.Popen([NGINX, "-p", p, "-c", "conf/nginx.conf"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with open(f"/proc/{nginx.pid}/task/{nginx.pid}/children") as f:
                kids = [int(x) for x in f.read().split()]
            get(port, "/work")
            if kids:
                return nginx, kids[0]
        except OSError:
            pass
        time.sleep(0.1)
    nginx.kill()
    raise SystemExit("nginx did not start")


def wrk(port, seconds):
    out = subprocess.run(["wrk", "-t1", "-c8", f"-d{seconds}s", f"http://127.0.0.1:{port}/work"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise SystemExit(f"unexpected wrk output:\n{out}")
    return int(m.group(1)) / seconds


def snapshot(agent, pid, summary, poke=None):
    """One `record --mode heap`; returns (walk ms, CPU s, peak RSS KiB, reached, gc.total,
    truncated). `poke`: a port to send requests to until it ends (the VM is learned when
    the worker next enters Lua)."""
    proc = subprocess.Popen([agent, "record", "--pid", str(pid), "--mode", "heap", "--format",
                             "collapsed", "--output", os.devnull, "--summary", summary],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while poke and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        get(poke, "/work")
        time.sleep(0.05)
    _, status, ru = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()
    if status != 0:
        raise SystemExit(f"record failed:\n{err}")
    with open(summary) as f:
        s = json.load(f)["snapshots"][0]
    return (s["elapsed_ms"], ru.ru_utime + ru.ru_stime, ru.ru_maxrss, s["reached_bytes"],
            s["gc_total_before"], s["truncated"])


def during_snapshots(agent, pid, port, seconds, summary):
    """Throughput under load while snapshots run back to back; the snapshots' figures."""
    runs = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            runs.append(snapshot(agent, pid, summary, poke=port))

    t = threading.Thread(target=loop)
    t.start()
    time.sleep(0.5)
    rps = wrk(port, seconds)
    stop.set()
    t.join()
    return rps, runs


def bench_layout(agent, work, port, gc64, args):
    name = "GC64" if gc64 else "non-GC64"
    nginx, pid = start_nginx(work, port, gc64)
    try:
        total = 0
        while total < args.mib << 20:
            total = int(get(port, "/fill?n=50000"))
        log(f"{name}: gc.total {total / 2**20:.0f} MiB")
        summary = os.path.join(work, "summary.json")
        # The first, right after the fill's full collection: the accuracy reading.
        first = snapshot(agent, pid, summary, poke=port)
        base, during, runs = [], [], []
        for r in range(args.rounds):
            base.append(wrk(port, args.seconds))
            rps, rr = during_snapshots(agent, pid, port, args.seconds, summary)
            during.append(rps)
            runs += rr
            log(f"{name} round {r + 1}: {base[-1]:.0f} rps alone, {rps:.0f} during "
                f"{len(rr)} snapshots")
        med = statistics.median
        return {
            "layout": name,
            "gc_total_mib": total / 2**20,
            "walk_s": med([x[0] for x in runs + [first]]) / 1000,
            "walk_max_s": max(x[0] for x in runs + [first]) / 1000,
            "cpu_s": med([x[1] for x in runs + [first]]),
            "rss_mib": max(x[2] for x in runs + [first]) / 1024,
            "reached_ratio": first[3] / first[4],
            "truncated": first[5],
            "throughput_ratio": med(during) / med(base),
            "snapshots": len(runs) + 1,
        }
    finally:
        nginx.terminate()
        nginx.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--port", type=int, default=18291)
    ap.add_argument("--agent", default=os.path.join(REPO, "target", "release", "apisix-agent"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (the VM learner is a uprobe)")
    work = tempfile.mkdtemp(prefix="apx-heap-")
    try:
        rows = [bench_layout(args.agent, work, args.port, True, args)]
        if os.path.exists(os.path.join(NOGC64, "lib", "libluajit-5.1.so.2")):
            rows.append(bench_layout(args.agent, work, args.port + 1, False, args))
        print("| layout | gc.total | walk (median / max) | agent CPU per snapshot | agent peak RSS "
              "| reached / gc.total | throughput during / without | snapshots |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['layout']} | {r['gc_total_mib']:.0f} MiB | {r['walk_s']:.2f} s / "
                  f"{r['walk_max_s']:.2f} s | {r['cpu_s']:.2f} s | {r['rss_mib']:.0f} MiB | "
                  f"{r['reached_ratio']:.3f} | {r['throughput_ratio']:.2f}x | {r['snapshots']} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
