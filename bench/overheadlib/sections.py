"""The measured sections: throughput and p99 with and without the daemon, the BPF
program's cost per sample, the agent's footprint, Lua frame checks and render timing; the
`Bench` class drives nginx, wrk and the agent for them."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time

from .harness import BenchError, BlockedWatch, NGINX, NGINX_COMM, WORKLOAD, workload_prefix, bpf_sample_stats, free_port, http_get, log, machine_info, metric_sum, parse_wrk, proc_cpu_seconds, proc_status_kb, set_group_nice, terminate, uprobe_links
from .report import report
from .stats import median


class Bench:
    def __init__(self, args):
        self.a = args
        self.work = args.workdir
        self.agent_bin = args.agent
        self.pids_file = os.path.join(self.work, "pids")
        self.port = free_port()
        self.agent_port = free_port()
        self.prefix = None
        self.nginx = None
        self.master = None
        self.workers = []
        self.agent = None
        self.agent_runs = 0
        self.learn_s = 0.0
        self.bpf_stats_orig = None
        self.results = {}
        self.wrk_script = os.path.join(self.work, "wrk-routes.lua")
        shutil.copy(os.path.join(WORKLOAD, "wrk-routes.lua"), self.wrk_script)

    # ---- bookkeeping for the shell's cleanup trap
    def track(self, pid, kind):
        with open(self.pids_file, "a") as f:
            f.write(f"{pid} {kind}\n")

    # ---- nginx
    def start_nginx(self, workers):
        self.stop_nginx()
        prefix = os.path.join(self.work, f"nginx-{workers}w")
        if os.path.exists(prefix):
            shutil.rmtree(prefix)
        binary, conf_path = workload_prefix(prefix, self.port, workers, comm=NGINX_COMM)
        log(f"starting nginx ({workers} workers) on 127.0.0.1:{self.port}")
        errlog = open(os.path.join(prefix, "logs", "stderr.log"), "w")
        self.nginx = subprocess.Popen(
            [binary, "-p", prefix, "-c", conf_path, "-e", os.path.join(prefix, "logs/error.log")],
            stdout=errlog,
            stderr=subprocess.STDOUT,
        )
        errlog.close()
        self.master = self.nginx.pid
        self.track(self.master, NGINX_COMM)
        self.prefix = prefix
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.nginx.poll() is not None:
                with open(os.path.join(prefix, "logs", "stderr.log")) as f:
                    raise BenchError(f"nginx exited with {self.nginx.returncode}:\n{f.read()}")
            try:
                with open(f"/proc/{self.master}/task/{self.master}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                kids = []
            kids = [k for k in kids if self._is_worker(k)]
            if len(kids) == workers and http_get(f"http://127.0.0.1:{self.port}/deep", timeout=10)[0] == 200:
                self.workers = sorted(kids)
                break
            time.sleep(0.1)
        else:
            raise BenchError(f"nginx did not start {workers} workers answering on port {self.port}")
        log(f"nginx master {self.master}, workers {self.workers}")

    @staticmethod
    def _is_worker(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().startswith(b"nginx: worker process")
        except OSError:
            return False

    def stop_nginx(self):
        if not self.master:
            return
        terminate(self.nginx, 10, "nginx")
        deadline = time.time() + 10
        while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in self.workers):
            time.sleep(0.1)
        self.master, self.workers, self.nginx = None, [], None

    # ---- load
    def url(self, deep=False):
        """The routes handler, or `/deep` (True: 100 frames, or an int: that many)."""
        base = f"http://127.0.0.1:{self.port}"
        if deep is False:
            return base + "/"
        return base + "/deep" + ("" if deep is True else f"?depth={deep}")

    def wrk_cmd(self, seconds, deep=False, conns=None, threads=None):
        cmd = [
            "wrk",
            f"-t{threads or self.a.wrk_threads}",
            f"-c{conns or self.a.wrk_conns}",
            f"-d{seconds}s",
            "--latency",
        ]
        if deep is False:
            cmd += ["-s", self.wrk_script]
        return cmd + [self.url(deep)]

    def run_wrk(self, seconds, deep=False, conns=None):
        """One wrk run; also the CPU time spent by the workers, wrk and the agent per request."""
        others = list(self.workers) + ([self.agent.pid] if self.agent else [])
        watch = BlockedWatch(self) if self.agent else None
        before = {pid: proc_cpu_seconds(pid) for pid in others}
        p = subprocess.Popen(
            self.wrk_cmd(seconds, deep, conns), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.track(p.pid, "wrk")
        out = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stdout.close()
        after = {pid: proc_cpu_seconds(pid) for pid in others}
        blocked = watch.stop() if watch else (0.0, "")
        if p.returncode != 0:
            raise BenchError(f"wrk failed ({p.returncode}):\n{out}")
        res = parse_wrk(out)
        if res["non2xx"] or res["sock_errors"]:
            log(f"warning: wrk saw {res['non2xx']} non-2xx answers, {res['sock_errors']} socket errors")
        workers = sum(after[w] - before[w] for w in self.workers)
        agent = sum(after[a] - before[a] for a in others if a not in self.workers)
        res["cpu_workers_s"] = workers
        res["cpu_wrk_s"] = ru.ru_utime + ru.ru_stime
        res["cpu_agent_s"] = agent
        res["cpu_per_req_us"] = 1e6 * (workers + res["cpu_wrk_s"] + agent) / max(1, res["requests"])
        res["cpu_share"] = (workers + res["cpu_wrk_s"] + agent) / seconds / (os.cpu_count() or 1)
        res["agent_blocked"], res["agent_blocked_in"] = blocked
        if blocked[0] > 0.2:
            log(f"note: an agent thread was blocked in the kernel {100 * blocked[0]:.0f}% of the run ({blocked[1]})")
        return res

    def wrk_background(self, seconds, deep=False, conns=None):
        p = subprocess.Popen(
            self.wrk_cmd(seconds, deep, conns), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.track(p.pid, "wrk")
        return p

    # ---- agent
    def start_agent(self, frequency=None):
        self.agent_runs += 1
        cfg = os.path.join(self.work, f"agent-{self.agent_runs}.yaml")
        lines = [
            f"http: {{ listen: 127.0.0.1:{self.agent_port} }}",
            "discovery:",
            f"  process_names: [{NGINX_COMM}]",
            "  docker: { enabled: false }",
        ]
        if frequency is not None:
            lines += ["sampling:", f"  frequency_hz: {frequency}"]
        with open(cfg, "w") as f:
            f.write("\n".join(lines) + "\n")
        logf = open(os.path.join(self.work, f"agent-{self.agent_runs}.log"), "w")
        self.agent = subprocess.Popen(
            [self.agent_bin, "run", "--config", cfg],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, NO_COLOR="1"),
        )
        logf.close()
        self.track(self.agent.pid, "apisix-agent")
        base = f"http://127.0.0.1:{self.agent_port}"
        deadline = time.time() + 60
        healthy = False
        while time.time() < deadline:
            if self.agent.poll() is not None:
                raise BenchError(f"agent exited with {self.agent.returncode}:\n{self.agent_log_tail()}")
            if not healthy:
                healthy = http_get(base + "/healthz")[0] == 200
            if healthy:
                status, body = http_get(base + "/targets")
                if status == 200:
                    listed = {t["pid"] for t in json.loads(body)}
                    if set(self.workers) <= listed:
                        return self.agent.pid
            time.sleep(0.2)
        raise BenchError(
            f"agent not healthy or workers {self.workers} not in /targets after 60 s:\n{self.agent_log_tail()}"
        )

    def prime(self):
        """A short light load: JIT warm before either kind of run, and with the agent, what makes
        it take its first samples and learn each worker's Lua VM (its `lua_resume` uprobe fires
        on the first requests)."""
        # Enough connections that reuseport spreads them over every worker.
        self.run_wrk(1, conns=max(16, 8 * len(self.workers)))

    def agent_blocked(self):
        """Threads of the agent in uninterruptible sleep, with their kernel wait channel."""
        out = []
        pid = self.agent.pid
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/stat") as f:
                    st = f.read()
                if st.rsplit(") ", 1)[1].split()[0] == "D":
                    with open(f"/proc/{pid}/task/{t}/wchan") as f:
                        out.append(f"{st[st.index('(') + 1:st.rindex(')')]}:{f.read()}")
            except OSError:
                continue
        return out

    def start_agent_steady(self, frequency=None, timeout=40):
        """Starts the agent and primes the workers with light load until the agent is in steady
        state: samples flow, its VM-learning `lua_resume` uprobes are detached and no thread of it
        waits in the kernel (detaching a uprobe waits for an RCU grace period)."""
        pid = self.start_agent(frequency)
        t0 = time.monotonic()
        while True:
            self.prime()
            samples = self.agent_samples()[0]
            links = uprobe_links(pid)
            blocked = self.agent_blocked()
            if samples > 0 and links == 0 and not blocked:
                break
            if time.monotonic() - t0 > timeout:
                log(f"warning: agent not steady after {timeout}s (samples {samples:.0f}, uprobes {links}, "
                    f"blocked {blocked}); going on")
                break
        self.learn_s = time.monotonic() - t0
        time.sleep(1)
        return pid

    def agent_log_tail(self):
        try:
            with open(os.path.join(self.work, f"agent-{self.agent_runs}.log")) as f:
                return "".join(f.readlines()[-20:])
        except OSError:
            return ""

    def agent_get(self, path, timeout=5.0):
        return http_get(f"http://127.0.0.1:{self.agent_port}{path}", timeout=timeout)

    def agent_samples(self):
        status, body = self.agent_get("/metrics")
        if status != 200:
            raise BenchError(f"/metrics answered {status}")
        text = body.decode()
        return metric_sum(text, "apisix_profiler_samples_total"), metric_sum(
            text, "apisix_profiler_lost_samples_total"
        )

    def stop_agent(self):
        if not self.agent:
            return
        terminate(self.agent, 15, "agent")
        if self.agent.returncode not in (0, -signal.SIGTERM):
            log(f"warning: agent exited with {self.agent.returncode}:\n{self.agent_log_tail()}")
        self.agent = None

    # ---- sysctl
    def set_bpf_stats(self, on):
        path = "/proc/sys/kernel/bpf_stats_enabled"
        if self.bpf_stats_orig is None:
            with open(path) as f:
                self.bpf_stats_orig = f.read().strip()
            with open(os.path.join(self.work, "bpf_stats_orig"), "w") as f:
                f.write(self.bpf_stats_orig)
        with open(path, "w") as f:
            f.write("1" if on else self.bpf_stats_orig)

    def cleanup(self):
        try:
            self.stop_agent()
        finally:
            try:
                self.stop_nginx()
            finally:
                if self.bpf_stats_orig is not None:
                    with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
                        f.write(self.bpf_stats_orig)

    # ------------------------------------------------------------------------ sections

    def warm_up(self):
        log(f"warm-up: {self.a.warmup}s of load (JIT, caches)")
        self.run_wrk(self.a.warmup)
        self.run_wrk(max(1, self.a.warmup // 2), deep=True, conns=4)

    def one_run(self, with_agent, frequency):
        """One wrk run, with the daemon started (and steady) before it and stopped after it, or
        without the daemon; both after the same priming load."""
        d = self.a.duration
        time.sleep(1)
        if not with_agent:
            self.prime()
            time.sleep(1)
            return self.run_wrk(d)
        self.start_agent_steady(frequency)
        s0, l0 = self.agent_samples()
        res = self.run_wrk(d)
        s1, l1 = self.agent_samples()
        res["agent_cpu_pct"] = 100 * res["cpu_agent_s"] / d
        res["samples"] = s1 - s0
        res["lost"] = l1 - l0
        res["learn_s"] = self.learn_s
        res["hz"] = frequency
        res["seconds"] = d
        self.stop_agent()
        return res

    def throughput(self, frequency):
        """A chain off, on, off, on, …, off: each "on" run is compared with the mean of the "off"
        runs just before and after it, which cancels drift that is linear over a few runs (the
        main noise here). Returns (pairs, offs)."""
        n = self.a.pairs
        offs = [self.one_run(False, frequency)]
        pairs = []
        for i in range(n):
            w = self.one_run(True, frequency)
            offs.append(self.one_run(False, frequency))
            before, after = offs[-2], offs[-1]
            wo = {k: (before[k] + after[k]) / 2 for k in ("rps", "p99_ms", "cpu_per_req_us", "cpu_share")}
            pair = {
                "with": w,
                "without": wo,
                "offs": (before, after),
                "tput_ratio": w["rps"] / wo["rps"],
                "p99_ratio": w["p99_ms"] / wo["p99_ms"],
                "capacity_ratio": wo["cpu_per_req_us"] / w["cpu_per_req_us"],
            }
            log(
                f"{frequency} Hz run {i + 1}/{n}: off before/after {before['rps']:.0f}/{after['rps']:.0f} rps,"
                f" on {w['rps']:.0f} rps (agent {w['agent_cpu_pct']:.2f}% CPU, {w['samples']:.0f} samples)"
                f" -> ratio {pair['tput_ratio']:.3f}; p99 {wo['p99_ms']:.2f} -> {w['p99_ms']:.2f} ms;"
                f" CPU/request {wo['cpu_per_req_us']:.1f} -> {w['cpu_per_req_us']:.1f} us;"
                f" bench got {100 * after['cpu_share']:.0f}%/{100 * w['cpu_share']:.0f}% of the CPUs"
            )
            pairs.append(pair)
        return pairs, offs

    BPF_CASES = (("shallow", False), ("deep50", 50), ("deep", True))

    def bpf_cost(self):
        self.set_bpf_stats(True)
        try:
            pid = self.start_agent_steady(99)
            phases = {}

            def snap():
                t, c = bpf_sample_stats(pid)
                s, lost = self.agent_samples()
                return t, c, s + lost

            log(f"BPF cost: idle baseline {self.a.bpf_idle}s")
            a = snap()
            time.sleep(self.a.bpf_idle)
            phases["idle"] = (a, snap())
            for name, deep in self.BPF_CASES:
                log(f"BPF cost: {name} handler under load for {self.a.bpf_seconds}s at 99 Hz")
                a = snap()
                self.run_wrk(self.a.bpf_seconds, deep=deep)
                time.sleep(1.5)  # let the agent drain the ring buffer
                phases[name] = (a, snap())
            frames = self.lua_frames()
            self.stop_agent()
        finally:
            self.set_bpf_stats(False)
        out = {}
        (t0, n0, _), (t1, n1, _) = phases["idle"]
        c0 = (t1 - t0) / (n1 - n0) if n1 > n0 else 0.0
        out["idle"] = {"runs": n1 - n0, "mean_us": c0 / 1e3}
        for name, _ in self.BPF_CASES:
            (t0, n0, s0), (t1, n1, s1) = phases[name]
            dt, dn, ds = t1 - t0, n1 - n0, s1 - s0
            est = (dt - (dn - ds) * c0) / ds if ds else float("nan")
            out[name] = {
                "runs": dn,
                "target_samples": ds,
                "mean_us": dt / dn / 1e3 if dn else float("nan"),
                "per_target_upper_us": dt / ds / 1e3 if ds else float("nan"),
                "per_target_us": est / 1e3,
                "lua_frames": frames.get(name, (0, 0)),
            }
        # Linear fit between the two /deep depths: cost per Lua frame walked.
        d50, d100 = out["deep50"], out["deep"]
        df = d100["lua_frames"][0] - d50["lua_frames"][0]
        out["per_frame_us"] = (d100["per_target_us"] - d50["per_target_us"]) / df if df else float("nan")
        out["fixed_us"] = d100["per_target_us"] - out["per_frame_us"] * d100["lua_frames"][0]
        return out

    def lua_frames(self):
        """(median, max) Lua frames per sample in the retained stacks, per BPF case: stacks
        without `descend` are the routes handler's, the others /deep's at depth 50 or 100."""
        per = {name: [] for name, _ in self.BPF_CASES}
        for w in self.workers:
            status, body = self.agent_get(f"/flamegraph?pid={w}&format=collapsed", timeout=30)
            if status != 200:
                continue
            for line in body.decode(errors="replace").splitlines():
                stack, _, count = line.rpartition(" ")
                if not count.isdigit():
                    continue
                frames = stack.split(";")
                n = sum(1 for fr in frames if LUA_FRAME.match(fr))
                d = stack.count("descend@")
                if n == 0:
                    continue  # samples outside Lua (epoll, kernel, nginx C code)
                name = "shallow" if d == 0 else ("deep50" if d <= 75 else "deep")
                per[name] += [n] * int(count)
        return {k: (median(v), max(v)) for k, v in per.items() if v}

    def footprint(self):
        pid = self.start_agent_steady()  # the defaults: 19 Hz continuous, 99 Hz on demand
        out = {"learn_s": self.learn_s}
        time.sleep(2)

        def window(name, seconds, during):
            cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
            extra = during()
            cpu1, t1 = proc_cpu_seconds(pid), time.monotonic()
            out[name] = {
                "seconds": t1 - t0,
                "cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
                "hwm_mib": proc_status_kb(pid, "VmHWM") / 1024,
                "rss_mib": proc_status_kb(pid, "VmRSS") / 1024,
            }
            out[name].update(extra or {})

        log(f"footprint: idle {self.a.idle}s ({len(self.workers)} workers, no load)")
        window("idle", self.a.idle, lambda: time.sleep(self.a.idle))
        log(f"footprint: continuous sampling under load {self.a.load}s")

        def load():
            s0 = self.agent_samples()[0]
            r = self.run_wrk(self.a.load)
            return {"samples": self.agent_samples()[0] - s0, "blocked": r["agent_blocked"]}

        window("load", self.a.load, load)
        log(f"footprint: serving /flamegraph?pid={self.workers[0]}&seconds={self.a.fg_seconds} under load")

        def flamegraph():
            bg = self.wrk_background(self.a.fg_seconds + 2)
            time.sleep(0.5)
            t0 = time.monotonic()
            status, body = self.agent_get(
                f"/flamegraph?pid={self.workers[0]}&seconds={self.a.fg_seconds}",
                timeout=self.a.fg_seconds + 60,
            )
            took = time.monotonic() - t0
            bg.communicate()
            if status != 200 or not body.lstrip().startswith((b"<?xml", b"<svg")):
                raise BenchError(f"/flamegraph answered {status}: {body[:200]!r}")
            return {"answer_s": took, "svg_kib": len(body) / 1024}

        window("flamegraph", self.a.fg_seconds, flamegraph)
        self.stop_agent()
        return out

    def render(self):
        w = self.workers[0]
        folded = os.path.join(self.work, "capture.folded")
        summary_path = os.path.join(self.work, "capture.summary.json")
        log(f"render: {self.a.record}s collapsed capture of worker {w} at 99 Hz under mixed load")
        bgs = [
            self.wrk_background(self.a.record + 3, deep=False, conns=8),
            self.wrk_background(self.a.record + 3, deep=True, conns=8),
        ]
        time.sleep(1)
        r = subprocess.run(
            [
                self.agent_bin, "record", "--pid", str(w), "--duration", str(self.a.record),
                "--frequency", "99", "--format", "collapsed", "--lines", "-o", folded,
                "--summary", summary_path,
            ],
            capture_output=True,
            text=True,
        )
        for p in bgs:
            p.communicate()
        if r.returncode != 0:
            raise BenchError(f"record failed:\n{r.stderr}")
        with open(summary_path) as f:
            summary = json.load(f)
        rec_taken, rec_lost = summary["samples"], summary["lost"]
        stacks = read_folded(folded)
        if not stacks:
            raise BenchError("the capture has no samples")
        synth = synthesize(stacks, self.a.render_samples, self.a.render_stacks)
        big = os.path.join(self.work, "render-100k.folded")
        with open(big, "w") as f:
            for s, c in sorted(synth.items()):
                f.write(f"{s} {c}\n")
        svg = os.path.join(self.work, "render-100k.svg")
        walls, internal = [], []
        log(f"render: {sum(synth.values())} samples, {len(synth)} stacks, {self.a.render_runs} runs")
        for _ in range(self.a.render_runs):
            t0 = time.perf_counter()
            r = subprocess.run([self.agent_bin, "render", "-i", big, "-o", svg], capture_output=True, text=True)
            walls.append((time.perf_counter() - t0) * 1000)
            if r.returncode != 0:
                raise BenchError(f"render failed:\n{r.stderr}")
            m = re.search(r"rendered (\d+) samples \((\d+) distinct stacks\) in ([\d.]+) ms", r.stderr)
            if not m:
                raise BenchError(f"unexpected render output: {r.stderr}")
            internal.append(float(m.group(3)))
            rendered = (int(m.group(1)), int(m.group(2)))
        return {
            "capture_samples": sum(stacks.values()),
            "capture_lost": rec_lost,
            "capture_stacks": len(stacks),
            "samples": rendered[0],
            "stacks": rendered[1],
            "max_depth": max(s.count(";") + 1 for s in synth),
            "wall_ms": walls,
            "internal_ms": internal,
            "svg_kib": os.path.getsize(svg) / 1024,
        }

    # ------------------------------------------------------------------------ run

    def run(self):
        started = time.time()
        meta = machine_info()
        meta["load_start"] = open("/proc/loadavg").read().split()[:3]
        self.start_nginx(self.a.workers)
        self.warm_up()
        set_group_nice(self.a.nice)
        for hz in (19, 99):
            log(f"== throughput at {hz} Hz: {self.a.pairs} runs with the daemon between "
                f"{self.a.pairs + 1} without, {self.a.duration}s each")
            self.results[f"tput_{hz}"], self.results[f"offs_{hz}"] = self.throughput(hz)
        set_group_nice(0)
        log("== BPF cost per sample (kernel.bpf_stats_enabled=1)")
        self.results["bpf"] = self.bpf_cost()
        log("== SVG render time")
        self.results["render"] = self.render()
        if self.a.rss_workers != self.a.workers:
            self.start_nginx(self.a.rss_workers)
            self.run_wrk(max(2, self.a.warmup // 2))
        log(f"== agent footprint with {len(self.workers)} workers")
        self.results["footprint"] = self.footprint()
        self.results["footprint"]["workers"] = len(self.workers)
        meta["load_end"] = open("/proc/loadavg").read().split()[:3]
        meta["runtime_s"] = time.time() - started
        text = report(self.a, meta, self.results)
        write_report(self.a.output, text)
        print(text)
        log(f"wrote {self.a.output} (total {meta['runtime_s'] / 60:.1f} min)")
        failed = [line for line in text.splitlines() if line.startswith("| ") and "| FAIL" in line]
        return 1 if failed and self.a.strict else 0


# The first heading this bench does not write: sections 5 on come from trace_cost.py,
# alloc_cost.py, pprof_cost.py and soak.sh and are kept as they are.
KEPT_SECTION = re.compile(r"^## ([0-9]+)\.", re.MULTILINE)
FIRST_KEPT = 5


def merge_report(old, new):
    """`new` (the header and sections 1-4) followed by `old` from its section 5 on."""
    for m in KEPT_SECTION.finditer(old):
        if int(m.group(1)) >= FIRST_KEPT:
            return new.rstrip("\n") + "\n\n" + old[m.start():]
    return new


def write_report(path, text):
    """Replaces the header and sections 1-4 of `path`, keeping everything from section 5 on."""
    old = open(path).read() if os.path.exists(path) else ""
    with open(path, "w") as f:
        f.write(merge_report(old, text))


def read_folded(path):
    stacks = {}
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                stacks[stack] = stacks.get(stack, 0) + int(count)
    return stacks


LUA_FRAME = re.compile(r"^(.+@.+:)(\d+)$")


def synthesize(stacks, total, distinct, seed=42):
    """A folded profile of `total` samples over about `distinct` stacks shaped like `stacks`.

    Variants of a captured stack differ in the current line of one of their Lua frames (what a
    `--lines` capture of a busier or more varied workload yields); popular stacks get more
    variants. Counts follow the captured distribution with a long tail, summing to `total`.
    """
    rng = random.Random(seed)
    items = sorted(stacks.items(), key=lambda kv: -kv[1])
    weight_total = sum(c for _, c in items)
    out = {}
    for s, c in items:
        out[s] = float(c)
    variants_needed = max(0, distinct - len(out))
    lua_items = [(s, c) for s, c in items if any(LUA_FRAME.match(fr) for fr in s.split(";"))]
    pool = lua_items or items
    pool_weight = sum(c for _, c in pool)
    attempts = 0
    while variants_needed > 0 and attempts < distinct * 50:
        attempts += 1
        # pick a parent by weight
        x = rng.uniform(0, pool_weight)
        for s, c in pool:
            x -= c
            if x <= 0:
                break
        frames = s.split(";")
        lua_idx = [i for i, fr in enumerate(frames) if LUA_FRAME.match(fr)]
        if lua_idx:
            i = rng.choice(lua_idx[-6:])  # one of the innermost Lua frames
            m = LUA_FRAME.match(frames[i])
            frames[i] = f"{m.group(1)}{int(m.group(2)) + rng.randint(1, 60)}"
        else:
            frames.append(f"synthetic_leaf_{rng.randint(1, 10**6)}")
        v = ";".join(frames)
        if v in out:
            continue
        # a variant takes a share of its parent's weight: long tail
        share = out[s] * rng.uniform(0.05, 0.5)
        out[s] -= share
        out[v] = share
        variants_needed -= 1
    # scale to `total`, at least 1 each, by largest remainder
    scale = (total - len(out)) / sum(out.values())
    raw = {k: 1 + v * scale for k, v in out.items()}
    counts = {k: int(v) for k, v in raw.items()}
    rest = total - sum(counts.values())
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[:rest]:
        counts[k] += 1
    assert sum(counts.values()) == total, (sum(counts.values()), total, weight_total)
    return counts
