#!/usr/bin/env python3
"""What Lua allocation captures cost the target (stdlib only; run as root).

    sudo python3 bench/alloc_cost.py [--rounds N] [--seconds S] [--sample-bytes B]

One nginx worker runs the APISIX-like routes handler of bench/workload (JIT on) under
`wrk -t1 -c8` on loopback, CPU-bound. Each round measures S seconds of load three times, in
turn: without any capture, during `apisix-agent record --mode alloc`, and during
`record --mode live` (the load starts once the capture has attached its probes). Printed,
each a median over the rounds:
  - the worker's throughput during the capture against without (requests per second), and
    its CPU time per request (on a machine where the worker does not get a whole core, the
    requests per CPU second are the steadier ratio: what a CPU-bound worker would keep);
  - allocator calls per request (the capture's `alloc.events`);
  - the cost per allocator call seen by the target: the worker's extra CPU time per request
    during the capture divided by the calls per request (the uprobe trap, the kernel's
    emulation of the probed instruction, the BPF programs, and the sampled stacks);
  - of that, the BPF programs' own time per call (kernel.bpf_stats_enabled: run_time_ns
    over run_cnt of alloc_entry, plus alloc_return in live mode), via bpftool.
Prints a table on stdout, progress on stderr. Figures are machine-dependent: quote ratios.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import trace_cost  # noqa: E402  (start_nginx, build)

REPO = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROGRAMS = ("alloc_entry", "alloc_return")


def log(msg):
    print(f"[alloc_cost] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid):
    """User + system CPU time of process `pid`, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wrk(port, seconds):
    """Runs wrk on the routes handler; returns requests completed."""
    out = subprocess.run(
        ["wrk", "-t1", "-c8", f"-d{seconds}s", "-s", os.path.join(HERE, "workload", "wrk-routes.lua"),
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise SystemExit(f"unexpected wrk output:\n{out}")
    return int(m.group(1))


def prog_stats(pid):
    """{name: (run_time_ns, run_cnt)} of the allocator programs process `pid` holds."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                m = re.search(r"^prog_id:\s*(\d+)", f.read(), re.M)
        except OSError:
            continue
        if m:
            held.add(int(m.group(1)))
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    out = {}
    for p in progs:
        if p.get("id") in held and p.get("name") in PROGRAMS:
            out[p["name"]] = (p.get("run_time_ns", 0), p.get("run_cnt", 0))
    return out


def measured_load(worker, port, seconds):
    cpu0 = cpu_seconds(worker)
    t0 = time.monotonic()
    n = wrk(port, seconds)
    return n, n / (time.monotonic() - t0), cpu_seconds(worker) - cpu0


def during_capture(binary, worker, port, seconds, mode, sample_bytes, work):
    """Load measured while `record --mode MODE` runs; the capture's counts and BPF times."""
    summary = os.path.join(work, f"summary-{mode}.json")
    rec = subprocess.Popen([binary, "record", "--pid", str(worker), "--mode", mode,
                            "--duration", str(seconds + 30), "--sample-bytes", str(sample_bytes),
                            "--format", "collapsed", "--output", os.devnull, "--summary", summary],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # The capture has attached its probes once it prints the heap size at the start; the
    # load (and the requests that teach it the Lua VM) must already be running for that.
    warm = subprocess.Popen(["wrk", "-t1", "-c1", "-d60s", f"http://127.0.0.1:{port}/deep?depth=2"],
                            stdout=subprocess.DEVNULL)
    err = []
    for line in rec.stderr:
        err.append(line)
        if "at start" in line:
            break
    warm.send_signal(signal.SIGTERM)
    warm.wait()
    if rec.poll() is not None:
        raise SystemExit("record ended early:\n" + "".join(err))
    n, rps, cpu = measured_load(worker, port, seconds)
    stats = prog_stats(rec.pid)
    rec.send_signal(signal.SIGINT)  # ends the capture early; the summary is written
    rest = rec.stderr.read()
    if rec.wait(timeout=60) != 0:
        raise SystemExit(f"record failed:\n{''.join(err)}{rest}")
    with open(summary) as f:
        s = json.load(f)
    bpf_ns = sum(t for t, _ in stats.values())
    return n, rps, cpu, s["alloc"]["events"], bpf_ns, s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--sample-bytes", type=int, default=512 * 1024)
    ap.add_argument("--port", type=int, default=0, help="loopback port (default: a free one)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (BPF, uprobes, kernel.bpf_stats_enabled)")
    for tool in ("wrk", "bpftool", "nginx"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (scripts/setup.sh, scripts/setup-test.sh)")
    port = args.port
    if not port:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    work = tempfile.mkdtemp(prefix="apx-alloc-cost-")
    nginx = None
    stats_path = "/proc/sys/kernel/bpf_stats_enabled"
    with open(stats_path) as f:
        stats_orig = f.read().strip()
    rows = {"none": [], "alloc": [], "live": []}
    try:
        binary = trace_cost.build(REPO, os.path.join(REPO, "target"))
        nginx, worker = trace_cost.start_nginx(work, port)
        with open(stats_path, "w") as f:
            f.write("1")
        wrk(port, 2)  # warm up: traces compiled
        for r in range(args.rounds):
            n, rps, cpu = measured_load(worker, port, args.seconds)
            rows["none"].append((rps, cpu / n))
            log(f"round {r + 1} without: {rps:.0f} req/s, {cpu * 1e6 / n:.0f} µs CPU/request")
            for mode in ("alloc", "live"):
                n, rps, cpu, events, bpf_ns, s = during_capture(
                    binary, worker, port, args.seconds, mode, args.sample_bytes, work)
                rows[mode].append((rps, cpu / n, events / n, bpf_ns / max(events, 1), s))
                log(f"round {r + 1} {mode}: {rps:.0f} req/s, {cpu * 1e6 / n:.0f} µs CPU/request, "
                    f"{events / n:.0f} allocator calls/request, {bpf_ns / max(events, 1):.0f} ns "
                    f"BPF/call, {s['alloc']['sampled']} sampled")
    finally:
        with open(stats_path, "w") as f:
            f.write(stats_orig)
        if nginx and nginx.poll() is None:
            nginx.send_signal(signal.SIGTERM)
            nginx.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    base_rps = statistics.median(x[0] for x in rows["none"])
    base_cpu = statistics.median(x[1] for x in rows["none"])
    print(f"Routes handler, JIT on, one worker under wrk -t1 -c8, {args.rounds} rounds of "
          f"{args.seconds} s, --sample-bytes {args.sample_bytes}:")
    print("| mode | throughput (req/s) | ratio to no capture | worker CPU per request "
          "| allocator calls per request | cost per call (worker CPU) | of which BPF "
          "| stacks sampled per s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| no capture | {base_rps:.0f} | 1.00 | {base_cpu * 1e6:.0f} µs | — | — | — | — |")
    for mode in ("alloc", "live"):
        rps = statistics.median(x[0] for x in rows[mode])
        cpu = statistics.median(x[1] for x in rows[mode])
        calls = statistics.median(x[2] for x in rows[mode])
        bpf = statistics.median(x[3] for x in rows[mode])
        per_call = (cpu - base_cpu) / calls if calls else float("nan")
        sampled = statistics.median(x[4]["alloc"]["sampled"] / x[4]["duration_seconds"]
                                    for x in rows[mode])
        print(f"| {mode} | {rps:.0f} | {rps / base_rps:.2f} | {cpu * 1e6:.0f} µs "
              f"({base_cpu / cpu:.2f}× the requests per CPU second) | {calls:.0f} | "
              f"{per_call * 1e6:.2f} µs | {bpf / 1000:.2f} µs | {sampled:.0f} |")


if __name__ == "__main__":
    main()
