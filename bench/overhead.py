#!/usr/bin/env python3
"""Overhead benchmark of apisix-agent against a real nginx-lua workload (stdlib only).

Started by bench/overhead.sh (which checks root and tools, builds, and cleans up behind us).
Sections:
  1. throughput / p99 latency with and without the daemon, interleaved runs, at 19 and 99 Hz
  2. cost of the `sample` BPF program per sample (kernel.bpf_stats_enabled), shallow vs deep
  3. agent footprint: CPU share and peak RSS idle, under load, serving /flamegraph
  4. `apisix-agent render` time for 100 000 samples
Results go to stdout and replace the header and sections 1-4 of BENCHMARKS.md (sections 5 on,
written by the other benches, are kept); progress to stderr.

This file parses the options and runs the bench; the work is in bench/overheadlib/:
harness.py (processes, /proc, HTTP, wrk), sections.py (the measured sections), stats.py
(the statistics of the runs) and report.py (BENCHMARKS.md). The render time of section 4 is
also a criterion bench: `cargo bench --bench render`.
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from overheadlib.harness import BenchError, REPO, log, own_autogroup, set_group_nice  # noqa: E402
from overheadlib.sections import Bench  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--agent", required=True)
    p.add_argument("--output", default=os.path.join(REPO, "BENCHMARKS.md"))
    p.add_argument("--quick", action="store_true", help="smoke run: fewer and shorter runs")
    p.add_argument("--pairs", type=int,
                   help="runs with the daemon per rate, each between two without (10; quick 2)")
    p.add_argument("--duration", type=int, help="seconds per wrk run (6; quick 3)")
    p.add_argument("--workers", type=int, default=2, help="nginx workers for sections 1-2 (2 = cores)")
    p.add_argument("--rss-workers", type=int, default=4, help="nginx workers for the footprint section")
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--wrk-conns", type=int, default=16)
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--nice", type=int, default=-10,
                   help="nice of the bench's autogroup during the throughput runs, against other work on "
                        "the (shared) machine (-10; 0 for none); the other sections run at 0")
    a = p.parse_args()
    q = a.quick
    a.pairs = a.pairs or (2 if q else 10)
    a.duration = a.duration or (3 if q else 6)
    a.warmup = 3 if q else 8
    a.bpf_idle = 3 if q else 5
    a.bpf_seconds = 4 if q else 15
    a.idle = 5 if q else 20
    a.load = 5 if q else 20
    a.fg_seconds = 3 if q else 10
    a.record = 5 if q else 20
    a.render_samples = 100_000
    a.render_stacks = 3000
    a.render_runs = 3 if q else 7
    own_autogroup()
    set_group_nice(0)
    bench = Bench(a)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return bench.run()
    except BenchError as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'SIGINT'}); stopping what was started")
        return 130
    finally:
        bench.cleanup()


if __name__ == "__main__":
    sys.exit(main())
