#!/usr/bin/env python3
"""Overhead of the always-on daemon on the real Apache APISIX gateway (stdlib; run as root).

    sudo python3 bench/apisix_overhead.py            # full run, about 7 minutes
    sudo python3 bench/apisix_overhead.py --quick    # smoke run, under 2 minutes

Extracts `../shared/apisix/harness.tar.xz` (beside the repository; skipped with one line when
absent) into a temporary directory and starts APISIX 3.18 unmodified on Debian 12's nginx +
ngx_lua (2 workers, JIT on, access log off) with the harness's own route `/hello`: 7 plugins
(ip-restriction, cors, serverless-pre-function, key-auth, limit-count, proxy-rewrite,
response-rewrite) in front of a plain nginx upstream, all on 127.0.0.1.

Per sampling rate (19 Hz, the default, then 99 Hz) a chain of runs without the daemon with
runs with it in between (off, on, off, on, …, off), each `wrk -t2 -cC -dS --latency
-H 'apikey: secret-key' http://127.0.0.1:9080/hello`. The daemon (`target/release/apisix-agent
run`, HTTP on 127.0.0.1, the two workers as `discovery.pids`, name discovery and Docker off)
is started before each "on" run and waited for until it lists the workers, takes samples and
has detached its VM-learning uprobes; it is stopped after the run. Each "on" run is compared
with the mean of the "off" runs just before and after it, as bench/overhead.sh does, which
cancels drift over a few runs. Printed per rate: throughput ratio and p99 ratio on/off,
min / median / max over the rounds, the same estimator on the "off" runs alone (A/A control:
the resolution of the measurement on this machine) and the daemon's CPU. Progress and per-run
figures on stderr, a Markdown table on stdout; `--json FILE` keeps every run.

The machine is shared: other jobs add noise, read the A/A control before the ratios.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from overheadlib.harness import (  # noqa: E402
    REPO,
    BenchError,
    free_port,
    http_get,
    log,
    machine_info,
    metric_sum,
    parse_wrk,
    proc_cpu_seconds,
    terminate,
    uprobe_links,
)
from overheadlib.stats import aa_ratios, median  # noqa: E402

HARNESS = os.path.join(os.path.dirname(REPO), "shared", "apisix", "harness.tar.xz")
URL = "http://127.0.0.1:9080/hello"
AGENT = os.path.join(REPO, "target", "release", "apisix-agent")


def listeners():
    """pids of the processes listening on 127.0.0.1:9080 or :1980 (the harness's fixed ports)."""
    out = subprocess.run(
        ["ss", "-ltnpH", "( sport = :9080 or sport = :1980 )"], capture_output=True, text=True
    ).stdout
    return {int(p) for p in re.findall(r"pid=(\d+)", out)}


def family(master_pid_file):
    with open(master_pid_file) as f:
        master = f.read().strip()
    kids = subprocess.run(["pgrep", "-P", master], capture_output=True, text=True).stdout.split()
    return int(master), sorted(int(p) for p in kids)


class Gateway:
    """A copy of the harness in a temporary directory; stopped by stop()."""

    def __init__(self, work):
        self.top = os.path.join(work, "apisix")
        os.makedirs(self.top)
        subprocess.run(["tar", "-C", self.top, "-xJf", HARNESS], check=True)
        # nginx workers run as nobody and read the Lua files below the copy.
        for d in (work, self.top):
            os.chmod(d, 0o755)
        self.workers, self.ours = [], set()

    def check_alone(self):
        """Another copy listening beside ours (reuseport) would take part of the load."""
        foreign = listeners() - self.ours
        if foreign:
            raise BenchError(f"another process listens on 9080/1980 beside this copy: pids {sorted(foreign)}")

    def start(self):
        busy = listeners()
        if busy:
            raise BenchError(
                f"ports 9080/1980 already in use (pids {sorted(busy)}): only one APISIX copy runs at a time"
            )
        log("starting APISIX (builds home/ first, about 20 s)")
        out = subprocess.run(
            [os.path.join(self.top, "start.sh")],
            env=dict(os.environ, ACCESS_LOG="off"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if out.returncode != 0:
            raise BenchError(f"start.sh failed:\n{out.stdout}{out.stderr}")
        master, self.workers = family(os.path.join(self.top, "home/logs/nginx.pid"))
        up_master, up_workers = family(os.path.join(self.top, "upstream/logs/nginx.pid"))
        self.ours = {master, up_master, *self.workers, *up_workers}
        if len(self.workers) != 2:
            raise BenchError(f"two APISIX workers expected, found {self.workers}:\n{out.stdout}")
        status, body = http_get_key(URL)
        if status != 200:
            raise BenchError(f"GET /hello answered {status}: {body[:200]!r}")
        log(f"APISIX workers {self.workers}")

    def stop(self):
        subprocess.run([os.path.join(self.top, "stop.sh")], capture_output=True, timeout=60)


def http_get_key(url):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"apikey": "secret-key"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


class Bench:
    def __init__(self, args, work, gateway):
        self.args, self.work, self.gw = args, work, gateway
        self.agent_bin = os.path.join(work, "apisix-agent")
        shutil.copy2(AGENT, self.agent_bin)  # a concurrent cargo build cannot swap it mid-run
        self.port = free_port()
        self.agent = None
        self.runs = 0

    def wrk(self, seconds, conns=None):
        self.gw.check_alone()
        cmd = [
            "wrk", f"-t{self.args.threads}", f"-c{conns or self.args.conns}", f"-d{seconds}s", "--latency",
            "-H", "apikey: secret-key", URL,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
        if out.returncode != 0:
            raise BenchError(f"wrk failed: {out.stderr}")
        return parse_wrk(out.stdout)

    def workers_cpu(self):
        return sum(proc_cpu_seconds(p) for p in self.gw.workers)

    def run(self, hz=None):
        """One measured run; with `hz`, the daemon runs at that rate during it."""
        self.wrk(1)  # primes the workers (JIT) before either kind of run
        agent_pid, learn_s = (self.start_agent(hz) if hz else (None, 0.0))
        try:
            a0 = proc_cpu_seconds(agent_pid) if agent_pid else 0.0
            w0, t0 = self.workers_cpu(), time.monotonic()
            res = self.wrk(self.args.duration)
            secs = time.monotonic() - t0
            res["workers_cpu"] = (self.workers_cpu() - w0) / secs
            res["agent_cpu"] = (proc_cpu_seconds(agent_pid) - a0) / secs if agent_pid else 0.0
            res["learn_s"] = learn_s
            if hz:
                res["samples"] = self.samples()
        finally:
            if agent_pid:
                terminate(self.agent, 20, "agent")
        if res["non2xx"] or res["sock_errors"]:
            raise BenchError(f"wrk saw {res['non2xx']} non-2xx answers and {res['sock_errors']} socket errors")
        res["hz"] = hz or 0
        return res

    def start_agent(self, hz):
        self.runs += 1
        cfg = os.path.join(self.work, f"agent-{self.runs}.yaml")
        with open(cfg, "w") as f:
            f.write(
                f"http: {{ listen: 127.0.0.1:{self.port} }}\n"
                "discovery:\n"
                "  process_names: []\n"
                f"  pids: [{', '.join(map(str, self.gw.workers))}]\n"
                "  docker: { enabled: false }\n"
                f"sampling:\n  frequency_hz: {hz}\n"
            )
        logf = open(os.path.join(self.work, f"agent-{self.runs}.log"), "w")
        self.agent = subprocess.Popen(
            [self.agent_bin, "run", "--config", cfg], stdout=logf, stderr=subprocess.STDOUT,
            env=dict(os.environ, NO_COLOR="1"),
        )
        logf.close()
        base = f"http://127.0.0.1:{self.port}"
        t0 = time.monotonic()
        while True:
            if self.agent.poll() is not None:
                raise BenchError(f"agent exited with {self.agent.returncode}: see {logf.name}")
            if time.monotonic() - t0 > 60:
                raise BenchError(f"agent not ready after 60 s: see {logf.name}")
            status, body = http_get(base + "/targets")
            if status == 200 and set(self.gw.workers) <= {t["pid"] for t in json.loads(body)}:
                break
            time.sleep(0.2)
        # Light load until it is steady: samples flow and its `lua_resume` uprobes are detached.
        while True:
            self.wrk(1)
            if self.samples() > 0 and uprobe_links(self.agent.pid) == 0:
                break
            if time.monotonic() - t0 > 40:
                log("warning: agent not steady after 40 s; going on")
                break
        learn = time.monotonic() - t0
        time.sleep(1)
        return self.agent.pid, learn

    def samples(self):
        status, body = http_get(f"http://127.0.0.1:{self.port}/metrics")
        return metric_sum(body.decode(), "apisix_profiler_samples_total") if status == 200 else 0.0


def chain(bench, hz, rounds):
    """off, on, off, …, off: `rounds` "on" runs, each between two "off" runs."""
    offs, ons = [bench.run()], []
    log(f"{hz} Hz off: {offs[-1]['rps']:.0f} req/s, p99 {offs[-1]['p99_ms']:.2f} ms")
    for i in range(rounds):
        ons.append(bench.run(hz))
        offs.append(bench.run())
        on, a, b = ons[-1], offs[-2], offs[-1]
        on["ratio"] = on["rps"] / ((a["rps"] + b["rps"]) / 2)
        on["p99_ratio"] = on["p99_ms"] / ((a["p99_ms"] + b["p99_ms"]) / 2)
        log(
            f"{hz} Hz round {i + 1}/{rounds}: req/s {a['rps']:.0f} / {on['rps']:.0f} / {b['rps']:.0f} "
            f"(ratio {on['ratio']:.3f}), p99 ms {a['p99_ms']:.2f} / {on['p99_ms']:.2f} / {b['p99_ms']:.2f} "
            f"(ratio {on['p99_ratio']:.3f}), agent {100 * on['agent_cpu']:.2f}% of a core, "
            f"{on['samples']:.0f} samples, steady after {on['learn_s']:.1f} s"
        )
    return {"hz": hz, "offs": offs, "ons": ons}


def mmm(xs):
    return f"{median(xs):.3f} ({min(xs):.3f}–{max(xs):.3f})"


def table(results):
    rows = [
        "| Sampling rate | Rounds | req/s off (median) | req/s on (median) | Throughput ratio on/off: median (min–max) "
        "| A/A control (throughput, no agent): median (min–max) | p99 off (ms) | p99 on (ms) | p99 ratio on/off: median (min–max) | Agent CPU (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        offs, ons = r["offs"], r["ons"]
        aa = aa_ratios(offs)
        rows.append(
            f"| {r['hz']} Hz | {len(ons)} | {median([o['rps'] for o in offs]):.0f} | {median([o['rps'] for o in ons]):.0f} "
            f"| {mmm([o['ratio'] for o in ons])} | {mmm(aa) if aa else '—'} "
            f"| {median([o['p99_ms'] for o in offs]):.2f} | {median([o['p99_ms'] for o in ons]):.2f} "
            f"| {mmm([o['p99_ratio'] for o in ons])} | {100 * median([o['agent_cpu'] for o in ons]):.2f}% of a core |"
        )
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help='"on" runs per rate (default 10)')
    ap.add_argument("--duration", type=int, default=6, help="seconds per run (default 6)")
    ap.add_argument("--conns", type=int, default=16, help="wrk connections (default 16)")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    ap.add_argument("--rates", default="19,99", help="sampling rates in Hz (default 19,99)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 3 s (figures indicative only)")
    ap.add_argument("--json", help="write every run to this file")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration = 2, 3
    if not (1 <= args.rounds <= 20 and 1 <= args.duration <= 60):
        ap.error("--rounds 1..20 and --duration 1..60")
    if not os.path.isfile(HARNESS):
        print(f"apisix_overhead: skipped: no real-APISIX harness at {HARNESS}", file=sys.stderr)
        return 0
    if os.geteuid() != 0:
        ap.error("needs root (BPF, perf events)")
    for tool in ("wrk", "nginx", "pgrep", "curl"):
        if not shutil.which(tool):
            ap.error(f"{tool} not found")
    if not os.access(AGENT, os.X_OK):
        ap.error(f"{AGENT} missing: cargo build --release")
    rates = [int(x) for x in args.rates.split(",")]

    info = machine_info()
    load0 = os.getloadavg()
    t_start = time.monotonic()
    work = tempfile.mkdtemp(prefix="apisix-overhead.")
    gw = Gateway(work)
    bench = None
    try:
        gw.start()
        bench = Bench(args, work, gw)
        results = [chain(bench, hz, args.rounds) for hz in rates]
    finally:
        if bench and bench.agent:
            terminate(bench.agent, 20, "agent")
        gw.stop()
        log("APISIX stopped")
        shutil.rmtree(work, ignore_errors=True)
    minutes = (time.monotonic() - t_start) / 60
    load1 = os.getloadavg()
    print(
        f"Date {info['date']}, kernel {info['kernel']}, {info['ncpu']} × {info['cpu']}, agent at {info['rev']}; "
        f"{args.rounds} rounds of {args.duration} s per rate, wrk -t{args.threads} -c{args.conns}; "
        f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end; {minutes:.1f} min in all.\n"
    )
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
