#!/usr/bin/env python3
"""What rebuilding JIT-inlined frames costs (stdlib only; run as root).

    sudo python3 bench/trace_cost.py [--baseline-rev REV] [--rounds N] [--seconds S] [--hz HZ]

On the APISIX-like routes handler of bench/workload (JIT on: most samples land in trace
code), under wrk load on loopback, it alternates `apisix-agent record` of the worker with
this tree's binary and with the binary of REV (default: the commit before trace frames),
built into a temporary worktree, and prints, each a median over the rounds:
  - the `sample` BPF program's time per run (kernel.bpf_stats_enabled, read from the
    recording process's program fdinfo): the trace identity reads are the difference;
  - the recording process's CPU time per sample (getrusage of the child): decoding traces
    is the difference, and the count of traces decoded shows the cache at work;
  - how many samples were in trace code and how many got inlined frames (this tree).
Prints a table on stdout, progress on stderr. Figures are machine-dependent: quote ratios.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKLOAD = os.path.join(HERE, "workload")
NGINX = "/usr/sbin/nginx"
sys.path.insert(0, HERE)
from overheadlib.harness import workload_prefix  # noqa: E402
PERF_EVENT_PROG = 7  # BPF_PROG_TYPE_PERF_EVENT: the `sample` program
DEFAULT_BASELINE = "37a3282"  # the last commit before trace frames


def log(msg):
    print(f"[trace_cost] {msg}", file=sys.stderr, flush=True)


def build(tree, target_dir):
    env = dict(os.environ, CARGO_TARGET_DIR=target_dir)
    env["PATH"] = os.path.expanduser("~/.cargo/bin") + ":" + env.get("PATH", "")
    log(f"cargo build --release in {tree}")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=tree, env=env, check=True)
    return os.path.join(target_dir, "release", "apisix-agent")


def baseline_binary(rev, work):
    """The agent built at `rev`, in a temporary worktree; its build directory is kept under
    target/ so that a second run does not build it again."""
    tree = os.path.join(work, "baseline")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", tree, rev], check=True,
                   stdout=subprocess.DEVNULL)
    return build(tree, os.path.join(REPO, "target", f"baseline-{rev}"))


def sample_prog_stats(pid):
    """(run_time_ns, run_cnt) of the perf_event programs whose fds process `pid` holds."""
    total = [0, 0]
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return None
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(l.split(":", 1) for l in f.read().splitlines() if ":" in l)
        except OSError:
            continue
        if info.get("prog_type", "").strip() == str(PERF_EVENT_PROG) and "run_time_ns" in info:
            total[0] += int(info["run_time_ns"])
            total[1] += int(info["run_cnt"])
    return tuple(total)


def record(binary, pid, seconds, hz, summary):
    """Runs `record`; returns (ns per BPF run, BPF runs, CPU seconds of the process)."""
    cmd = [binary, "record", "--pid", str(pid), "--duration", str(seconds), "--frequency",
           str(hz), "--format", "collapsed", "--output", os.devnull]
    if summary:
        cmd += ["--summary", summary]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = [None]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            s = sample_prog_stats(p.pid)
            if s and s[1] > 0:
                last[0] = s
            time.sleep(0.2)

    t = threading.Thread(target=poll)
    t.start()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    t.join()
    err = p.stderr.read()
    if p.returncode != 0 or last[0] is None:
        raise SystemExit(f"record failed ({p.returncode}): {err}")
    ns, runs = last[0]
    return ns / runs, runs, usage.ru_utime + usage.ru_stime


def start_nginx(work, port, jit=None):
    """The workload's nginx (one worker) under `work`; `jit` True or False turns the JIT on
    or off in `init_by_lua`, None leaves LuaJIT's default (on)."""
    prefix = os.path.join(work, "nginx")
    os.chmod(work, 0o755)  # the worker runs unprivileged and reads its Lua files
    _, path = workload_prefix(prefix, port, 1, jit=jit)
    nginx = subprocess.Popen([NGINX, "-p", prefix, "-c", path, "-e", os.path.join(prefix, "logs/error.log")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with open(f"/proc/{nginx.pid}/task/{nginx.pid}/children") as f:
                kids = [int(x) for x in f.read().split()]
            urllib.request.urlopen(f"http://127.0.0.1:{port}/deep", timeout=5).read()
            if kids:
                return nginx, kids[0]
        except OSError:
            pass
        time.sleep(0.1)
    nginx.kill()
    raise SystemExit("nginx did not start")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-rev", default=DEFAULT_BASELINE)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--hz", type=int, default=499)
    ap.add_argument("--port", type=int, default=18181)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (BPF, perf events, kernel.bpf_stats_enabled)")
    work = tempfile.mkdtemp(prefix="apx-trace-cost-")
    nginx = wrk = None
    stats_path = "/proc/sys/kernel/bpf_stats_enabled"
    with open(stats_path) as f:
        stats_orig = f.read().strip()
    try:
        new = build(REPO, os.path.join(REPO, "target"))
        old = baseline_binary(args.baseline_rev, work)
        nginx, worker = start_nginx(work, args.port)
        wrk = subprocess.Popen(["wrk", "-t1", "-c8", f"-d{args.rounds * args.seconds * 3}s",
                                f"http://127.0.0.1:{args.port}/"], stdout=subprocess.DEVNULL)
        with open(stats_path, "w") as f:
            f.write("1")
        time.sleep(2)
        rows = {"before": [], "after": []}
        summaries = []
        for r in range(args.rounds):
            for label, binary in (("before", old), ("after", new)):
                summary = os.path.join(work, f"summary-{r}.json") if label == "after" else None
                ns, runs, cpu = record(binary, worker, args.seconds, args.hz, summary)
                rows[label].append((ns, runs, cpu))
                if summary:
                    with open(summary) as f:
                        summaries.append(json.load(f))
                log(f"round {r + 1} {label}: {ns / 1000:.2f} µs per BPF run, {runs} runs, "
                    f"{cpu * 1e6 / runs:.1f} µs of agent CPU per sample")
    finally:
        with open(stats_path, "w") as f:
            f.write(stats_orig)
        for p in (wrk, nginx):
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=10)
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force",
                        os.path.join(work, "baseline")], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)

    def med(label, f):
        return statistics.median(f(x) for x in rows[label])

    bpf_before = med("before", lambda x: x[0] / 1000)
    bpf_after = med("after", lambda x: x[0] / 1000)
    cpu_before = med("before", lambda x: x[2] * 1e6 / x[1])
    cpu_after = med("after", lambda x: x[2] * 1e6 / x[1])
    trace = [s["trace"] for s in summaries]
    samples = sum(s["samples"] for s in summaries)
    in_trace = sum(t["samples"] for t in trace)
    inlined = sum(t["inlined"] for t in trace)
    decoded = [t["decoded"] for t in trace]
    fallbacks = {}
    for t in trace:
        for k, v in t["fallbacks"].items():
            fallbacks[k] = fallbacks.get(k, 0) + v
    print(f"Routes handler, JIT on, {args.hz} Hz, {args.rounds} rounds of {args.seconds} s "
          f"(baseline {args.baseline_rev}):")
    print(f"| measure | before | after | after − before |")
    print(f"|---|---|---|---|")
    print(f"| BPF `sample` time per run (median) | {bpf_before:.2f} µs | {bpf_after:.2f} µs | "
          f"{bpf_after - bpf_before:+.2f} µs |")
    print(f"| recording process CPU per sample (median) | {cpu_before:.1f} µs | {cpu_after:.1f} µs"
          f" | {cpu_after - cpu_before:+.1f} µs |")
    print(f"Samples in trace code: {in_trace} of {samples} ({100 * in_trace / max(samples, 1):.1f}%),"
          f" {inlined} with inlined frames; traces decoded per recording: {decoded}")
    print("Trace samples that kept only their physical frames: "
          + (", ".join(f"{k}={v}" for k, v in sorted(fallbacks.items()) if v) or "none"))


if __name__ == "__main__":
    main()
