#!/usr/bin/env python3
"""Which Lua functions stay visible when the JIT is on (stdlib only; run as root).

    sudo python3 bench/trace_visibility.py [--baseline-rev REV] [--seconds S] [--hz HZ]

On the APISIX-like routes handler of bench/workload (its own router, plugins and JSON code,
and lua-resty-core's FFI wrappers of the ngx API), under wrk load on loopback with the
routes script, it records the worker with the JIT off and with it on, and compares the
Lua functions each recording sees: a function is *visible* when at least --min-share of
the Lua samples have it on their stack (inclusive). Recordings with the JIT on are taken
with this tree's binary (frames inlined into traces rebuilt from their snapshots) and with
REV's (default: the commit before trace frames, which charged a trace's samples to the
frames below `G->jit_base`). Prints, for each, how many of the functions visible with the
JIT off it still sees, and lists the ones it loses. Progress on stderr.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trace_cost  # noqa: E402  (build, baseline_binary, start_nginx, the workload paths)

log = trace_cost.log


def record(binary, pid, seconds, hz, out):
    """`record` in collapsed form; returns {stack: samples}."""
    cmd = [binary, "record", "--pid", str(pid), "--duration", str(seconds), "--frequency",
           str(hz), "--format", "collapsed", "--output", out]
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"record failed ({p.returncode}): {p.stderr}")
    stacks = {}
    with open(out) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if stack and n.isdigit():
                stacks[stack] = stacks.get(stack, 0) + int(n)
    return stacks


def lua_shares(stacks, prefix):
    """Inclusive share of the Lua samples of each Lua function (`NAME@FILE:LINE`), keyed by
    FILE:LINE (a function's call sites may name it differently), FILE without `prefix` (the
    run's own nginx directory, so that runs compare)."""
    per_fn = {}
    total = 0
    for stack, n in stacks.items():
        frames = {f.split("@", 1)[1].removeprefix(prefix) for f in stack.split(";")
                  if "@" in f and not f.startswith("[main]@")}
        if not frames:
            continue
        total += n
        for f in frames:
            per_fn[f] = per_fn.get(f, 0) + n
    return {f: n / total for f, n in per_fn.items()} if total else {}


def run(jit, binaries, args, work, port):
    """Starts the workload with the JIT on or off, loads it with the routes script and
    records it with each of `binaries` ((label, path) pairs); {label: shares}."""
    mode = "on" if jit else "off"
    nginx = wrk = None
    try:
        run_dir = os.path.join(work, f"run-{mode}")
        nginx, worker = trace_cost.start_nginx(run_dir, port, jit)
        wrk = subprocess.Popen(
            ["wrk", "-t1", "-c8", f"-d{args.seconds * 4}s", "-s",
             os.path.join(trace_cost.WORKLOAD, "wrk-routes.lua"), f"http://127.0.0.1:{port}/"],
            stdout=subprocess.DEVNULL)
        time.sleep(3)  # warm up: the JIT compiles the hot paths
        out = {}
        for i, (label, binary) in enumerate(binaries):
            log(f"JIT {mode}: recording {args.seconds} s with the binary of {label}")
            out[label] = lua_shares(record(binary, worker, args.seconds, args.hz,
                                           os.path.join(work, f"{mode}-{i}.folded")),
                                    run_dir + "/")
        return out
    finally:
        for p in (wrk, nginx):
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=10)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-rev", default=trace_cost.DEFAULT_BASELINE)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--hz", type=int, default=499)
    ap.add_argument("--min-share", type=float, default=0.005,
                    help="inclusive share of Lua samples that makes a function visible")
    ap.add_argument("--port", type=int, default=18182)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (BPF, perf events)")
    work = tempfile.mkdtemp(prefix="apx-trace-vis-")
    try:
        new = trace_cost.build(trace_cost.REPO, os.path.join(trace_cost.REPO, "target"))
        old = trace_cost.baseline_binary(args.baseline_rev, work)
        off = run(False, [("this tree", new)], args, work, args.port)["this tree"]
        on = run(True, [("this tree", new), (args.baseline_rev, old)], args, work,
                 args.port + 1)
    finally:
        subprocess.run(["git", "-C", trace_cost.REPO, "worktree", "remove", "--force",
                        os.path.join(work, "baseline")], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)

    visible = sorted(f for f, s in off.items() if s >= args.min_share)
    print(f"Routes handler, {args.hz} Hz, {args.seconds} s per recording: {len(visible)} Lua "
          f"functions have at least {100 * args.min_share:.1f}% of the Lua samples with the "
          f"JIT off.")
    print("| JIT on, recorded with | still visible | lost |")
    print("|---|---|---|")
    for label, shares in on.items():
        # Visible with the JIT on: at least a fifth of the threshold, so that a share that
        # merely moved a little is not counted as lost.
        lost = [f for f in visible if shares.get(f, 0.0) < args.min_share / 5]
        print(f"| {label} | {len(visible) - len(lost)} of {len(visible)} | "
              f"{len(lost)} ({100 * len(lost) / max(len(visible), 1):.0f}%) |")
    for label, shares in on.items():
        lost = [f for f in visible if shares.get(f, 0.0) < args.min_share / 5]
        if lost:
            print(f"\nLost with the binary of {label} (share JIT off → on):")
            for f in lost:
                print(f"  {f}: {100 * off[f]:.1f}% → {100 * shares.get(f, 0.0):.2f}%")


if __name__ == "__main__":
    main()
