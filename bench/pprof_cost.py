#!/usr/bin/env python3
"""What serving `/debug/pprof/profile` costs (stdlib only; run as root).

    sudo python3 bench/pprof_cost.py [--hz 19,249,499] [--workers 4] [--period 30] [--no-build]

On the APISIX-like routes handler of bench/workload with 4 nginx workers under wrk load on
loopback, for each continuous sampling rate it runs the daemon until its 60 s window is full,
then, with the load still on:
  - scrapes `/debug/pprof/profile?seconds=60` 10 times, 1 s apart: the agent's own time to
    cut the window, encode and gzip it (its debug log line), the client's latency, and the
    gzip-compressed and raw sizes;
  - after 20 scrapes to warm up, measures the agent's RSS over alternating periods (30 s
    each) without scrapes and of back-to-back scrapes: repeated scrapes must not grow it
    beyond what the sliding window does anyway.
The targets (issue 14) are for a 60 s window of 4 busy workers: encode ≤ 50 ms, ≤ 2 MiB
gzipped. On this 2-vCPU machine 4 busy workers share 2 CPUs (with wrk), so a 60 s window
holds at most the samples of 2 CPUs: at 19 Hz (the default) fewer than 4 busy workers give
(4 × 19 × 60 = 4 560); 249 Hz about as many as 4 fully busy workers sampled at 99 Hz
(4 × 99 × 60 = 23 760), the target's heavy case; 499 Hz about twice that. "Agent CPU" is the CPU time the agent's
threads spent on the scrape (the encoding cost); its wall time adds the wait for a CPU on a
saturated machine. Prints a Markdown table on stdout, progress on stderr. Figures are
machine-dependent.
"""

import argparse
import gzip
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from overheadlib.harness import NGINX, NGINX_COMM, free_port, proc_status_kb, workload_prefix  # noqa: E402

WORKLOAD = os.path.join(HERE, "workload")
WINDOW = 60
MIB = 1024 * 1024


def log(msg):
    print(f"[pprof_cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build():
    env = dict(os.environ)
    env["PATH"] = os.path.expanduser("~/.cargo/bin") + ":" + env.get("PATH", "")
    log("cargo build --release")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=REPO, env=env, check=True)


def start_nginx(work, port, workers):
    prefix = os.path.join(work, "nginx")
    os.chmod(work, 0o755)  # the workers run unprivileged and read their Lua files
    binary, path = workload_prefix(prefix, port, workers, comm=NGINX_COMM)
    nginx = subprocess.Popen([binary, "-p", prefix, "-c", path, "-e",
                              os.path.join(prefix, "logs/error.log")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with open(f"/proc/{nginx.pid}/task/{nginx.pid}/children") as f:
                kids = [int(x) for x in f.read().split()]
            urllib.request.urlopen(f"http://127.0.0.1:{port}/deep", timeout=5).read()
            if len(kids) >= workers:
                return nginx
        except OSError:
            pass
        time.sleep(0.1)
    nginx.kill()
    raise SystemExit("nginx did not start")


def start_agent(work, binary, hz, port):
    cfg = os.path.join(work, f"agent-{hz}.yaml")
    with open(cfg, "w") as f:
        f.write("\n".join([
            "http:",
            f"  listen: 127.0.0.1:{port}",
            "discovery:",
            "  interval_seconds: 1",
            f"  process_names: [{NGINX_COMM}]",
            "  docker: { enabled: false }",
            "sampling:",
            f"  frequency_hz: {hz}",
            f"  retention_seconds: {WINDOW}",
            "",
        ]))
    logfile = os.path.join(work, f"agent-{hz}.log")
    env = dict(os.environ, RUST_LOG="info,apisix_agent::daemon::http=debug", NO_COLOR="1")
    agent = subprocess.Popen([binary, "run", "--config", cfg], env=env,
                             stdout=subprocess.DEVNULL, stderr=open(logfile, "w"))
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
            return agent, logfile
        except OSError:
            time.sleep(0.2)
    agent.kill()
    raise SystemExit(f"the agent did not become healthy: {open(logfile).read()}")


def served(logfile):
    """The fields of each `pprof profile served` debug line of the agent: samples, stacks,
    bytes, millis (wall time from the request's start to the gzip-compressed profile) and
    the CPU time of each step, cut_cpu_ms (the window, cut from a snapshot of its chunks),
    build_cpu_ms (the pprof messages) and gzip_cpu_ms (protobuf + gzip)."""
    out = []
    with open(logfile) as f:
        for line in f:
            if "pprof profile served" in line:
                out.append({k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)})
    return out


def scrape(port):
    t0 = time.perf_counter()
    with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/debug/pprof/profile?seconds={WINDOW}", timeout=30) as r:
        body = r.read()
    return body, (time.perf_counter() - t0) * 1e3


def rss_mib(pid):
    return proc_status_kb(pid, "VmRSS") / 1024


def run_case(work, binary, hz, agent_port, nginx_port, scrapes, period):
    agent, logfile = start_agent(work, binary, hz, agent_port)
    wrk = subprocess.Popen(
        ["wrk", "-t2", "-c16", f"-d{WINDOW + 40 + 4 * period}s", "-s",
         os.path.join(WORKLOAD, "wrk-routes.lua"), f"http://127.0.0.1:{nginx_port}"],
        stdout=subprocess.DEVNULL)
    try:
        log(f"{hz} Hz: filling the {WINDOW} s window under load")
        time.sleep(WINDOW + 3)
        first_rss = rss_mib(agent.pid)
        latencies, sizes, raws = [], [], []
        for _ in range(10):
            body, ms = scrape(agent_port)
            latencies.append(ms)
            sizes.append(len(body))
            raws.append(len(gzip.decompress(body)))
            time.sleep(1)
        lines = served(logfile)[-10:]
        cpu = [x["cut_cpu_ms"] + x["build_cpu_ms"] + x["gzip_cpu_ms"] for x in lines]
        log(f"{hz} Hz: {lines[-1]['samples']:.0f} samples, {lines[-1]['stacks']:.0f} stacks, "
            f"{statistics.median(cpu):.1f} ms of agent CPU, "
            f"{statistics.median(x['millis'] for x in lines):.1f} ms wall")
        # Memory: periods without scrapes and of back-to-back scrapes, alternating, each
        # `period` s long; the window keeps sliding through all of them. Scrapes that kept
        # memory would show as growth in the scrape periods beyond the periods without.
        for _ in range(20):
            scrape(agent_port)
        phases = [("first", first_rss, rss_mib(agent.pid), 30)]
        for kind in ("without", "scrapes", "without", "scrapes"):
            before = rss_mib(agent.pid)
            t0 = time.time()
            n = 0
            while time.time() - t0 < period:
                if kind == "scrapes" and n < scrapes:
                    scrape(agent_port)
                    n += 1
                else:
                    time.sleep(0.2)
            phases.append((kind, before, rss_mib(agent.pid), n))
        hwm = proc_status_kb(agent.pid, "VmHWM") / 1024
        log(f"{hz} Hz: RSS " + ", ".join(
            f"{k} {a:.1f} → {b:.1f} MiB" + (f" ({n} scrapes)" if n else "")
            for k, a, b, n in phases))
        return {
            "hz": hz,
            "samples": statistics.median(x["samples"] for x in lines),
            "stacks": statistics.median(x["stacks"] for x in lines),
            "cpu_ms": cpu,
            "steps": {k: statistics.median(x[k] for x in lines)
                      for k in ("cut_cpu_ms", "build_cpu_ms", "gzip_cpu_ms")},
            "agent_ms": [x["millis"] for x in lines],
            "latency_ms": latencies,
            "gz": statistics.median(sizes),
            "raw": statistics.median(raws),
            "phases": phases,
            "hwm": hwm,
            "period": period,
        }
    finally:
        for p in (wrk, agent):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=15)


def table(results):
    def mm(v):
        return f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})"

    rows = ["| Rate | Samples in the 60 s window | Distinct stacks | Agent CPU per scrape, "
            "median (min–max) ms | of which cut / build / gzip (median ms) | Agent wall time, "
            "median (min–max) ms | Client latency, median (min–max) ms | gzipped | raw "
            "protobuf | Target | Result |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ok = statistics.median(r["cpu_ms"]) <= 50 and r["gz"] <= 2 * MIB
        st = r["steps"]
        rows.append(
            f"| {r['hz']} Hz | {r['samples']:.0f} | {r['stacks']:.0f} | {mm(r['cpu_ms'])} | "
            f"{st['cut_cpu_ms']:.1f} / {st['build_cpu_ms']:.1f} / {st['gzip_cpu_ms']:.1f} | "
            f"{mm(r['agent_ms'])} | {mm(r['latency_ms'])} | {r['gz'] / 1024:.0f} KiB | "
            f"{r['raw'] / 1024:.0f} KiB | encode ≤ 50 ms, ≤ 2 MiB | {'PASS' if ok else 'FAIL'} |")
    rows.append("")
    rows.append("| Rate | Period | RSS at its start → end (MiB) | Change (MiB) | Scrapes in it |")
    rows.append("|---|---|---|---|---|")
    for r in results:
        for i, (kind, a, b, n) in enumerate(r["phases"]):
            what = {"first": "the first scrapes (10 timed, 20 to warm up)",
                    "without": f"{r['period']} s without scrapes",
                    "scrapes": f"{r['period']} s of back-to-back scrapes"}[kind]
            rows.append(f"| {r['hz']} Hz | {i}: {what} | {a:.1f} → {b:.1f} | {b - a:+.1f} | "
                        f"{n} |")
        rows.append(f"| {r['hz']} Hz | peak RSS (VmHWM) at the end | {r['hwm']:.1f} | | |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hz", default="19,249,499", help="continuous rates, comma-separated")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--scrapes", type=int, default=300,
                    help="most scrapes in each scrape period")
    ap.add_argument("--period", type=int, default=30,
                    help="seconds of each memory period (without scrapes, with scrapes)")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (BPF, perf events)")
    for tool in ("wrk", NGINX):
        if not shutil.which(tool) and not os.path.exists(tool):
            raise SystemExit(f"missing {tool} (apt-get install wrk nginx libnginx-mod-http-lua)")
    if not args.no_build:
        build()
    work = tempfile.mkdtemp(prefix="apx-pprof-cost-")
    binary = os.path.join(work, "apisix-agent")
    # A private copy: a concurrent cargo build cannot swap it mid-run.
    shutil.copy2(os.path.join(REPO, "target", "release", "apisix-agent"), binary)
    nginx = None
    results = []
    try:
        nginx_port = free_port()
        nginx = start_nginx(work, nginx_port, args.workers)
        for hz in [int(h) for h in args.hz.split(",")]:
            results.append(run_case(work, binary, hz, free_port(), nginx_port, args.scrapes,
                                    args.period))
    finally:
        if nginx and nginx.poll() is None:
            nginx.send_signal(signal.SIGTERM)
            nginx.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))


if __name__ == "__main__":
    main()
