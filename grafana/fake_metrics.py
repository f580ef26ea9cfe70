#!/usr/bin/env python3
"""Serves synthetic apisix-agent metrics for testing the dashboard and rules (stdlib only).

    grafana/fake_metrics.py [--listen 127.0.0.1:19464]

GET /metrics returns the agent's metric families (names and labels as the agent documents
them) with counters growing at fixed rates since start: one container target ("gw", image
apache/apisix:3.9, a gc64 LuaJIT) and one host process (container="", gc32), Lua and C
functions including the "[other]" tail, lost samples, unwind errors by reason, the agent's
own CPU and memory, the sampling frequency. Used by grafana/check.sh; not a substitute for
checking against the real agent (grafana/exprs.py --prometheus).
"""

import argparse
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

START = time.monotonic()
FREQ = 19

# (container, image, process, samples/s, lost/s)
TARGETS = [("gw", "apache/apisix:3.9", "nginx", 38.0, 0.0), ("", "", "nginx", 9.5, 0.1)]
# (container, image, function, file, line, self/s, inclusive/s)
LUA = [
    ("gw", "apache/apisix:3.9", "_M.access", "/app/router.lua", "21", 9.5, 19.0),
    ("gw", "apache/apisix:3.9", "util.crc", "/app/util.lua", "5", 7.6, 7.6),
    ("gw", "apache/apisix:3.9", "[main]", "=access_by_lua(nginx.conf:17)", "0", 0.4, 26.0),
    ("gw", "apache/apisix:3.9", "[other]", "", "", 1.9, 3.8),
    ("", "", "burn_a", "/srv/lua/burn.lua", "3", 4.75, 4.75),
]
# (container, image, function, module, self/s, inclusive/s)
C = [
    ("gw", "apache/apisix:3.9", "lj_str_new", "libluajit-5.1.so.2", 3.8, 3.8),
    ("gw", "apache/apisix:3.9", "ngx_http_lua_run_thread", "nginx", 0.2, 30.0),
    ("gw", "apache/apisix:3.9", "[other]", "", 2.0, 2.0),
    ("", "", "memcpy", "libc.so.6", 1.0, 1.0),
]
ERRORS = [("lua_read_failed", 0.2), ("lua_bad_frame", 0.05), ("stack_copy_failed", 0.0)]
TARGET_FLAVOURS = [("gc64", 2), ("gc32", 1), ("native", 0)]


def esc(v):
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels(**kw):
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in kw.items()) + "}"


def render():
    t = time.monotonic() - START
    out = []

    def family(name, kind, help_, rows):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for lbl, value in rows:
            out.append(f"{name}{lbl} {value:.6g}" if isinstance(value, float) else f"{name}{lbl} {value}")

    family("apisix_profiler_samples_total", "counter", "Samples per target.",
           [(labels(container=c, image=i, process=p), float(int(r * t))) for c, i, p, r, _ in TARGETS])
    family("apisix_profiler_lost_samples_total", "counter", "Samples lost per target.",
           [(labels(container=c, image=i, process=p), float(int(lost * t))) for c, i, p, _, lost in TARGETS])
    family("apisix_profiler_lua_function_self_samples_total", "counter", "Lua self samples.",
           [(labels(function=f, file=fl, line=ln, container=c, image=i), float(int(s * t)))
            for c, i, f, fl, ln, s, _ in LUA])
    family("apisix_profiler_lua_function_samples_total", "counter", "Lua inclusive samples.",
           [(labels(function=f, file=fl, line=ln, container=c, image=i), float(int(n * t)))
            for c, i, f, fl, ln, _, n in LUA])
    family("apisix_profiler_c_function_self_samples_total", "counter", "C self samples.",
           [(labels(function=f, module=m, container=c, image=i), float(int(s * t)))
            for c, i, f, m, s, _ in C])
    family("apisix_profiler_c_function_samples_total", "counter", "C inclusive samples.",
           [(labels(function=f, module=m, container=c, image=i), float(int(n * t)))
            for c, i, f, m, _, n in C])
    family("apisix_profiler_unwind_errors_total", "counter", "Unwind errors by reason.",
           [(labels(reason=r), float(int(rate * t))) for r, rate in ERRORS])
    family("apisix_profiler_targets", "gauge", "Profiled processes by flavour.",
           [(labels(flavour=f), n) for f, n in TARGET_FLAVOURS])
    family("apisix_profiler_agent_cpu_seconds_total", "counter", "Agent CPU time.",
           [("", 0.004 * t)])
    family("apisix_profiler_agent_resident_memory_bytes", "gauge", "Agent RSS.",
           [("", 41943040)])
    family("apisix_profiler_sampling_frequency_hertz", "gauge", "Sampling frequency.",
           [("", FREQ)])
    return ("\n".join(out) + "\n").encode()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404)
            return
        body = render()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:19464")
    args = ap.parse_args()
    host, port = args.listen.rsplit(":", 1)
    ThreadingHTTPServer((host, int(port)), Handler).serve_forever()


if __name__ == "__main__":
    main()
