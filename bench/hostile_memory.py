#!/usr/bin/env python3
"""The agent's resident memory against a workload that generates names (stdlib only; root).

    sudo python3 bench/hostile_memory.py [--seconds S] [--hz HZ] [--clients N] [--binary PATH]

An nginx + ngx_lua worker (Debian's packages) compiles a new Lua chunk for every request,
under a unique 400-byte chunk name, with functions of unique names, and runs it long enough
to be sampled: every sample brings new prototypes, labels and stacks, which is what a hostile
tenant does to the caches fed by target memory (issue 21). The agent runs with its default
`limits:` section at --hz (default 1000, the highest continuous rate, to fill the caches
fast). Every second the bench reads the agent's VmRSS and its `apisix_profiler_cache_bytes`
gauges; it prints the peak and the last values, and whether the peak stayed within 200 MiB.
Progress on stderr.
"""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_MIB = 200

LUA = r"""
local M = {}
local n = 0
-- One new chunk per request: DEPTH nested functions, each with a unique name, in a chunk
-- with a unique 400-byte name; the innermost one loops, interpreted (the JIT is off).
local DEPTH = 40
function M.run()
  n = n + 1
  local tag = ngx.worker.pid() .. "_" .. n .. "_" .. string.rep(string.char(97 + n % 26), 380)
  local parts = {"local x = 0\n"}
  for d = DEPTH, 1, -1 do
    local body = d == DEPTH and "local s = 0 for i = 1, 2e5 do s = s + i % 7 end return s"
      or ("return f_" .. n .. "_" .. (d + 1) .. "_" .. tag:sub(1, 40) .. "() + 1")
    parts[#parts + 1] = "local function f_" .. n .. "_" .. d .. "_" .. tag:sub(1, 40) ..
      "() " .. body .. " end\n"
  end
  parts[#parts + 1] = "return f_" .. n .. "_1_" .. tag:sub(1, 40) .. "()\n"
  local f = assert(load(table.concat(parts), "@/gen/" .. tag .. ".lua"))
  return f()
end
return M
"""


def log(msg):
    sys.stderr.write(f"[hostile_memory] {msg}\n")
    sys.stderr.flush()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(prefix, port):
    for d in ("logs", "tmp", "lua", "conf"):
        os.makedirs(os.path.join(prefix, d), exist_ok=True)
    os.chmod(prefix, 0o755)
    with open(os.path.join(prefix, "lua", "gen.lua"), "w") as f:
        f.write(LUA)
    conf = f"""
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 1;
daemon off;
error_log {prefix}/logs/error.log warn;
pid {prefix}/logs/nginx.pid;
events {{ worker_connections 256; }}
http {{
  access_log off;
  lua_package_path "{prefix}/lua/?.lua;;";
  init_by_lua_block {{ jit.off() }}
  client_body_temp_path {prefix}/tmp; proxy_temp_path {prefix}/tmp;
  fastcgi_temp_path {prefix}/tmp; uwsgi_temp_path {prefix}/tmp; scgi_temp_path {prefix}/tmp;
  server {{
    listen 127.0.0.1:{port};
    location / {{ content_by_lua_block {{ ngx.say(require("gen").run()) }} }}
  }}
}}
"""
    path = os.path.join(prefix, "conf", "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return subprocess.Popen(["nginx", "-p", prefix, "-c", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def load(port, stop):
    url = f"http://127.0.0.1:{port}/"
    while not stop.is_set():
        try:
            urllib.request.urlopen(url, timeout=5).read()
        except OSError:
            time.sleep(0.05)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def caches(port):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return {}
    out = {}
    for m in re.finditer(rb'apisix_profiler_cache_bytes\{cache="(\w+)"\} (\d+)', text):
        out[m.group(1).decode()] = int(m.group(2)) / (1 << 20)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=120)
    ap.add_argument("--hz", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/apisix-agent"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (the agent loads BPF programs)")
    if not shutil.which("nginx"):
        raise SystemExit("nginx missing: apt-get install nginx libnginx-mod-http-lua")
    work = tempfile.mkdtemp(prefix="hostile-memory-")
    os.chmod(work, 0o755)  # the worker (nobody) reads the Lua module
    nginx_port, agent_port = free_port(), free_port()
    nginx = start_nginx(os.path.join(work, "nginx"), nginx_port)
    cfg = os.path.join(work, "agent.yaml")
    with open(cfg, "w") as f:
        f.write(f"http:\n  listen: 127.0.0.1:{agent_port}\ndiscovery:\n  interval_seconds: 1\n"
                f"  docker:\n    enabled: false\nsampling:\n  frequency_hz: {args.hz}\n")
    agent_log = open(os.path.join(work, "agent.log"), "w")
    agent = subprocess.Popen([args.binary, "run", "--config", cfg], stdout=subprocess.DEVNULL,
                             stderr=agent_log)
    stop = threading.Event()
    threads = [threading.Thread(target=load, args=(nginx_port, stop), daemon=True)
               for _ in range(args.clients)]
    peak, rss, last, seen = 0.0, 0.0, {}, {}
    try:
        time.sleep(2)
        for t in threads:
            t.start()
        log(f"{args.seconds}s of generated names at {args.hz} Hz; agent pid {agent.pid}")
        for i in range(args.seconds):
            time.sleep(1)
            if agent.poll() is not None:
                raise SystemExit(f"the agent exited ({agent.returncode}); log in {work}")
            rss = rss_mib(agent.pid)
            peak = max(peak, rss)
            last = caches(agent_port) or last
            for k, v in last.items():
                seen[k] = max(seen.get(k, 0.0), v)
            if i % 10 == 9:
                log(f"{i + 1:4d}s  RSS {rss:6.1f} MiB (peak {peak:6.1f})  caches " +
                    " ".join(f"{k}={v:.1f}" for k, v in sorted(last.items())))
    finally:
        stop.set()
        agent.terminate()
        nginx.terminate()
        agent.wait(timeout=15)
        nginx.wait(timeout=15)
    print(f"seconds {args.seconds}  frequency_hz {args.hz}  clients {args.clients}")
    print(f"agent RSS: peak {peak:.1f} MiB, last {rss:.1f} MiB")
    for k in sorted(seen):
        print(f"  cache {k:14s} peak {seen[k]:7.1f} MiB")
    verdict = "within" if peak <= LIMIT_MIB else "ABOVE"
    print(f"peak RSS {verdict} {LIMIT_MIB} MiB")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if peak <= LIMIT_MIB else 1


if __name__ == "__main__":
    sys.exit(main())
