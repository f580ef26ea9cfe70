#!/usr/bin/env python3
"""What timing event-loop iterations costs (stdlib only; run as root).

    sudo python3 bench/loop_cost.py [--rounds N] [--seconds S]

One nginx worker (run as `loopbench`, a link to nginx, so that the daemon targets it and no
other nginx on the machine) serves the APISIX-like routes handler of bench/workload (JIT on)
under `wrk -t1 -c8` on loopback. Each round measures S seconds of load three times, in turn:
without the daemon; with `apisix-agent run` at its defaults (the CPU sampler at 19 Hz and the
event-loop pair where it goes first: fentry/fexit on the kernel's epoll functions, or where
the kernel refuses those, the per-call epoll tracepoints); and with the pair forced onto each
fallback (APISIX_AGENT_LOOP_HOOKS=tracepoints, =raw). A row per attachment, named from the
daemon's log (a fallback the first choice took is measured once). Printed, each a median
over the rounds:
  - the event-loop pair's BPF time per loop iteration (kernel.bpf_stats_enabled: run_time_ns
    of its programs, read from the daemon's program fdinfo, over the iterations the daemon
    counted in apisix_profiler_event_loop_iteration_seconds_count). On the epoll functions or
    tracepoints the programs run at the epoll waits of every process (wrk's among them),
    all charged to the worker's iterations. On the raw tracepoints they run at every system call of
    every process and leave at once unless it is an epoll wait: the figure charges all of
    that to the worker's iterations (an upper bound). The time per program run is beside it;
  - what one loop iteration costs, without bpf_stats' own clock reads: a C loop of 1 000 000
    epoll_wait(timeout 0) calls on an empty epoll set, run by a process the daemon targets
    (`discovery.pids`), so that every call is one iteration, counted; its ns per call with
    the daemon against without (bpf_stats off while it runs; the CPU sampler at 19 Hz
    fires on it too rarely to count). The same loop in a process the daemon does not target gives what
    every other process's epoll wait pays;
  - what the pair costs every system call of the machine, without bpf_stats' own clock
    reads: a C loop of 2 000 000 getppid() calls, its ns per call with the daemon against
    without (the daemon's other hooks do not fire on it);
  - the worker's throughput with the daemon against without, and its CPU time per request.
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
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import alloc_cost  # noqa: E402  (wrk, measured_load)
import trace_cost  # noqa: E402  (start_nginx, build)

REPO = os.path.dirname(HERE)
PROGRAMS = ("loop_wait_enter", "loop_wait_exit", "loop_enter", "loop_exit")
NAME = "loopbench"
# The daemon's cases: its defaults, and the event-loop pair forced onto the raw tracepoints.
CASES = ({}, {"APISIX_AGENT_LOOP_HOOKS": "tracepoints"}, {"APISIX_AGENT_LOOP_HOOKS": "raw"})
# What the daemon's log says of where the pair went, and the row that attachment gets.
ATTACHMENTS = (("attached to the epoll functions", "fentry/fexit on the epoll functions"),
               ("attached to the epoll tracepoints", "per-call epoll tracepoints"),
               ("attached to the raw tracepoints", "raw tracepoints sys_enter/sys_exit"))


def log(msg):
    print(f"[loop_cost] {msg}", file=sys.stderr, flush=True)


def prog_stats(pid):
    """{name: (run_time_ns, run_cnt)} of the event-loop programs process `pid` holds."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = f.read()
        except OSError:
            continue
        m = re.search(r"^prog_id:\s*(\d+)", info, re.M)
        if not m:
            continue
        show = subprocess.run(["bpftool", "-j", "prog", "show", "id", m.group(1)],
                              capture_output=True, text=True)
        if show.returncode != 0:
            continue
        p = json.loads(show.stdout)
        if p.get("name") in PROGRAMS:
            out[p["name"]] = (p.get("run_time_ns", 0), p.get("run_cnt", 0))
    return out


def iterations(port):
    """The daemon's count of the worker's loop iterations (host processes: container="")."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    m = re.search(r'^apisix_profiler_event_loop_iteration_seconds_count\{container="",image=""\} (\d+)',
                  text, re.M)
    return int(m.group(1)) if m else 0


SYSCALL_LOOP = r"""
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(void) {
    struct timespec a, b;
    long n = 2000000;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.2f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
"""


STATS = "/proc/sys/kernel/bpf_stats_enabled"


class Stats:
    """kernel.bpf_stats_enabled set to `value` for a while, then put back: on for the run,
    off while a loop times calls (its clock reads would be counted in a call's time)."""

    def __init__(self, value):
        self.value = value

    def __enter__(self):
        with open(STATS) as f:
            self.was = f.read().strip()
        with open(STATS, "w") as f:
            f.write(self.value)

    def __exit__(self, *exc):
        with open(STATS, "w") as f:
            f.write(self.was)


def epoll_ns(proc):
    """ns per epoll_wait(0) of the loop process `proc`: the best of 3 runs."""
    best = None
    for _ in range(3):
        proc.stdin.write("\n")
        proc.stdin.flush()
        ns = float(proc.stdout.readline())
        best = ns if best is None else min(best, ns)
    return best


def syscall_ns(loop):
    """ns per getppid() call: the best of 3 runs (least disturbed by the shared machine)."""
    return min(float(subprocess.run([loop], capture_output=True, text=True, check=True).stdout)
               for _ in range(3))


def start_daemon(binary, work, port, env, target_pid):
    """The daemon targeting `loopbench` processes, once it counts the iterations of the
    worker serving `port` (light load meanwhile)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mport = s.getsockname()[1]
    config = os.path.join(work, "agent.yaml")
    with open(config, "w") as f:
        f.write(f"http:\n  listen: 127.0.0.1:{mport}\ndiscovery:\n  interval_seconds: 1\n"
                f"  process_names: [{NAME}]\n  pids: [{target_pid}]\n")
    daemon = subprocess.Popen([binary, "run", "--config", config], stdout=subprocess.DEVNULL,
                              stderr=open(os.path.join(work, "agent.log"), "w"),
                              env={**os.environ, **env})
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            targets = urllib.request.urlopen(f"http://127.0.0.1:{mport}/targets",
                                             timeout=10).read().decode()
            if (iterations(mport) > 0 and prog_stats(daemon.pid)
                    and f'"pid":{target_pid},' in targets):
                return daemon, mport
        except OSError:
            pass
        alloc_cost.wrk(port, 1)
    daemon.kill()
    raise SystemExit("the daemon did not count iterations; see " + os.path.join(work, "agent.log"))


def with_daemon(binary, work, worker, port, seconds, loop, env, epolls):
    """The load with the daemon; epolls = (a targeted epoll loop, one not targeted)."""
    daemon, mport = start_daemon(binary, work, port, env, epolls[0].pid)
    try:
        with Stats("0"):
            per_syscall = syscall_ns(loop)
            per_wait = (epoll_ns(epolls[0]), epoll_ns(epolls[1]))
        s0, i0 = prog_stats(daemon.pid), iterations(mport)
        n, rps, cpu = alloc_cost.measured_load(worker, port, seconds)
        time.sleep(1.5)  # the daemon reads the counts once a second
        s1, i1 = prog_stats(daemon.pid), iterations(mport)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    ns = sum(s1.get(p, (0, 0))[0] - s0.get(p, (0, 0))[0] for p in PROGRAMS)
    runs = sum(s1.get(p, (0, 0))[1] - s0.get(p, (0, 0))[1] for p in PROGRAMS)
    with open(os.path.join(work, "agent.log")) as f:
        text = f.read()
    where = next((row for said, row in ATTACHMENTS if said in text), "unknown")
    return n, rps, cpu, ns, runs, i1 - i0, per_syscall, per_wait, where


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=6)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (BPF, kernel.bpf_stats_enabled)")
    for tool in ("wrk", "bpftool", "nginx"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (scripts/setup.sh, scripts/setup-test.sh)")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tempfile.mkdtemp(prefix="apx-loop-cost-")
    os.chmod(work, 0o755)
    link = os.path.join(work, NAME)
    os.symlink(trace_cost.NGINX, link)
    trace_cost.NGINX = link  # the worker's comm is `loopbench`
    nginx = None
    epolls = []
    off, on = [], {}
    with Stats("1"):
        try:
            binary = trace_cost.build(REPO, os.path.join(REPO, "target"))
            src = os.path.join(work, "syscalls.c")
            with open(src, "w") as f:
                f.write(SYSCALL_LOOP)
            loop = os.path.join(work, "syscalls")
            subprocess.run(["gcc", "-O2", "-o", loop, src], check=True)
            subprocess.run(["gcc", "-O2", "-o", loop + "-epoll", os.path.join(HERE, "epoll_loop.c")],
                           check=True)
            epolls += [subprocess.Popen([loop + "-epoll"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True) for _ in range(2)]
            nginx, worker = trace_cost.start_nginx(work, port)
            alloc_cost.wrk(port, 2)  # warm up: traces compiled
            for r in range(args.rounds):
                with Stats("0"):
                    bare = syscall_ns(loop)
                    bare_wait = (epoll_ns(epolls[0]), epoll_ns(epolls[1]))
                n, rps, cpu = alloc_cost.measured_load(worker, port, args.seconds)
                off.append((rps, cpu / n, bare, bare_wait[0], bare_wait[1]))
                log(f"round {r + 1} without: {rps:.0f} req/s, {cpu * 1e6 / n:.0f} µs CPU/request")
                seen = set()
                for env in CASES:
                    n, rps, cpu, ns, runs, its, hooked, wait, name = with_daemon(
                        binary, work, worker, port, args.seconds, loop, env, epolls)
                    if name in seen:  # the first choice fell back to this one: measured already
                        continue
                    seen.add(name)
                    on.setdefault(name, []).append((rps, cpu / n, ns / max(its, 1), ns / max(runs, 1),
                                     runs / max(its, 1), its / n, hooked - bare,
                                     wait[0] - bare_wait[0], wait[1] - bare_wait[1]))
                    log(f"round {r + 1} {name}: {rps:.0f} req/s, {cpu * 1e6 / n:.0f} µs CPU/request, "
                        f"{its} iterations ({its / n:.2f}/request), {ns / max(its, 1):.0f} ns "
                        f"BPF/iteration, {ns / max(runs, 1):.0f} ns/run, {runs / max(its, 1):.1f} "
                        f"runs/iteration, getppid {bare:.0f} → {hooked:.0f} ns, epoll_wait(0) "
                        f"targeted {bare_wait[0]:.0f} → {wait[0]:.0f} ns, other "
                        f"{bare_wait[1]:.0f} → {wait[1]:.0f} ns")
        finally:
            if nginx and nginx.poll() is None:
                nginx.send_signal(signal.SIGTERM)
                nginx.wait(timeout=10)
            for p in epolls:
                p.kill()
            shutil.rmtree(work, ignore_errors=True)

    med = lambda rows, i: statistics.median(x[i] for x in rows)  # noqa: E731
    print(f"Routes handler, JIT on, one worker under wrk -t1 -c8, {args.rounds} rounds of "
          f"{args.seconds} s, daemon at its defaults (19 Hz, event-loop pair):")
    print("| case | throughput (req/s) | ratio to without | worker CPU per request | iterations "
          "per request | BPF per program run (bpf_stats) | program runs per worker iteration "
          "(machine-wide) | BPF time per worker iteration (machine-wide, upper bound) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| without the daemon | {med(off, 0):.0f} | 1.00 | {med(off, 1) * 1e6:.0f} µs "
          "| — | — | — | — |")
    for name, rows in on.items():
        print(f"| {name} | {med(rows, 0):.0f} | {med(rows, 0) / med(off, 0):.3f} "
              f"| {med(rows, 1) * 1e6:.0f} µs | {med(rows, 5):.2f} | {med(rows, 3):.0f} ns "
              f"| {med(rows, 4):.1f} | {med(rows, 2) / 1000:.3f} µs |")
    print()
    print("Added per call, without bpf_stats (medians of the rounds' best of 3): an "
          "epoll_wait(0) of a targeted process is one loop iteration, hooks and BPF included:")
    print("| case | one iteration of a target (epoll_wait(0) added) | target | result "
          "| epoll_wait(0) of another process, added | getppid() added |")
    print("|---|---|---|---|---|---|")
    print(f"| without the daemon | ({med(off, 3):.0f} ns per call) | — | — "
          f"| ({med(off, 4):.0f} ns per call) | ({med(off, 2):.0f} ns per call) |")
    for name, rows in on.items():
        per_it = med(rows, 7)
        print(f"| {name} | {per_it:.0f} ns | ≤ 300 ns | {'PASS' if per_it <= 300 else 'FAIL'} "
              f"| {med(rows, 8):.0f} ns | {med(rows, 6):.0f} ns |")


if __name__ == "__main__":
    main()
