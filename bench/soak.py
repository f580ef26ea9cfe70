#!/usr/bin/env python3
"""Soak test of the apisix-agent daemon under churn (not CI; run by bench/soak.sh as root).

For --duration seconds (default 600) it keeps, all at once:
  - continuous sampling (19 Hz) of a 4-worker nginx-lua (bench/workload, binary copy named
    nginx-soak so only its workers are host targets) under throttled loopback load (wrk);
    the container below gets 20 requests a second;
  - an nginx reload (SIGHUP to the master: 4 new workers) every 10 s;
  - a container of the test image (--network host, its nginx named nginx-soak too)
    started, and stopped 10 s later, every 20 s;
  - an on-demand capture (/flamegraph?...&seconds=3) every 15 s, of the container when one
    runs and is listed, else of a host worker;
  - Prometheus scraping the agent every 5 s over HTTPS with basic auth
    (deploy/prometheus/prometheus-tls.yml, the agent with http.tls and basic_auth_users).
Every second it records the agent's RSS and open fds (by kind), every 0.5 s /targets and
the worker processes that exist (with their start times), every 10 s the entries of the
agent's BPF hash maps (bpftool) and the number of /metrics series.

Pass: after the first 2 minutes nothing grows (the Theil-Sen slope below +1% of the mean
per 10 minutes, for RSS, fds and map entries; the agent keeps 60 s of recent stacks so that
window is full by then; the number of /metrics series is reported); no listed, live worker
missing from /targets for longer than one discovery interval, and every new worker listed
within two intervals of its start (watched every 0.5 s); no ERROR line in the agent's log;
every capture and every scrape succeeded. Writes a PNG plot (python3-matplotlib) and
the section between <!-- soak:begin --> and <!-- soak:end --> of BENCHMARKS.md.
"""

import argparse
import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKLOAD = os.path.join(HERE, "workload")
sys.path.insert(0, HERE)

from overheadlib.harness import free_port, machine_info, terminate, workload_prefix  # noqa: E402

COMM = "nginx-soak"
IMAGE = "apisix-profiler-test/nginx-lua:bookworm"
PASSWORD = "soak-scrape-password"
DISCOVERY_INTERVAL = 2
# sampling.retention_seconds of the agent: its window of recent stacks (the memory that
# legitimately grows until it is full) fills during the warm-up.
RETENTION = 60
# BPF map types whose entries are counted (the others are arrays, ring buffers, perf arrays).
HASH_MAPS = {1: "hash", 5: "percpu_hash", 9: "lru_hash", 10: "lru_percpu_hash"}
SLOPE_LIMIT_PCT = 1.0
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class SoakError(Exception):
    pass


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SoakError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def is_worker(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().startswith(b"nginx: worker process")
    except OSError:
        return False


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid):
    """Open fds of `pid` by kind: socket, pipe, anon_inode:…, or the file's directory."""
    kinds = {}
    d = f"/proc/{pid}/fd"
    for fd in os.listdir(d):
        try:
            link = os.readlink(os.path.join(d, fd))
        except OSError:
            continue
        if link.startswith("/"):
            kind = os.path.dirname(link)
        else:
            kind = link.split(":[", 1)[0] if link.startswith(("socket", "pipe")) else link
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def trend_pct_per_10min(ts, vs):
    """Theil-Sen slope of vs over ts (the median of the slopes between samples at least 60 s
    apart: captures, reloads and containers move single samples, not that median), as % of
    the mean per 600 s."""
    n = len(ts)
    mean = sum(vs) / n if n else 0
    slopes = [
        (vs[j] - vs[i]) / (ts[j] - ts[i])
        for i in range(n)
        for j in range(i + 1, n)
        if ts[j] - ts[i] >= 60
    ]
    if not slopes or mean == 0:
        return 0.0
    slopes.sort()
    return slopes[len(slopes) // 2] * 600 / mean * 100


def start_time(pid):
    """When `pid` started, in seconds since the epoch (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
    return BOOT_TIME + ticks / os.sysconf("SC_CLK_TCK")


def boot_time():
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return int(line.split()[1])
    return 0


BOOT_TIME = boot_time()


class Soak:
    def __init__(self, args):
        self.args = args
        self.work = args.workdir
        self.agent_bin = args.agent
        self.procs = {}
        self.containers = set()
        self.lock = threading.Lock()
        self.events = {"reloads": 0, "containers": 0, "captures": {}, "capture_errors": []}
        self.samples = []  # per second
        self.map_samples = []  # every 10 s
        self.series = []  # /metrics series, every 10 s
        self.watch = []  # workers and /targets, every 0.5 s
        self.stop = threading.Event()
        self.container = None  # (name, master pid)
        self.t0 = None
        self.slowest_scrape = 0.0

    # ---- setup ---------------------------------------------------------------------------
    def pki(self):
        d = os.path.join(self.work, "pki")
        os.makedirs(d)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        run(["openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=soak CA"], cwd=d)
        run(["openssl", "req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost"], cwd=d)
        with open(os.path.join(d, "server.ext"), "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                    "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run(["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext"], cwd=d)
        with open(os.path.join(d, "password"), "w") as f:
            f.write(PASSWORD + "\n")
        self.pki_dir = d
        self.ssl = ssl.create_default_context(cafile=os.path.join(d, "ca.crt"))

    def start_nginx(self):
        prefix = os.path.join(self.work, "nginx")
        self.nginx_port = free_port()
        binary, conf_path = workload_prefix(prefix, self.nginx_port, 4, comm=COMM)
        out = open(os.path.join(prefix, "logs", "stderr.log"), "w")
        p = subprocess.Popen([binary, "-p", prefix, "-c", conf_path], stdout=out,
                             stderr=subprocess.STDOUT)
        self.procs["nginx"] = p
        deadline = time.time() + 15
        while time.time() < deadline:
            if len([k for k in children(p.pid) if is_worker(k)]) == 4:
                log(f"nginx master {p.pid} on 127.0.0.1:{self.nginx_port}, 4 workers")
                return
            time.sleep(0.2)
        raise SoakError("nginx did not start 4 workers")

    def start_agent(self):
        hash_ = run([self.agent_bin, "hash-password", "--cost", "10"], input=PASSWORD + "\n").strip()
        self.agent_port = free_port()
        d = self.pki_dir
        config = f"""http:
  listen: 127.0.0.1:{self.agent_port}
  tls:
    cert_file: {d}/server.crt
    key_file: {d}/server.key
  basic_auth_users:
    prometheus: '{hash_}'
sampling:
  # The recent-stacks window fills in 60 s, before the measured part begins.
  retention_seconds: {RETENTION}
discovery:
  interval_seconds: {DISCOVERY_INTERVAL}
  process_names: [{COMM}]
  docker:
    enabled: true
    images: []
    any_luajit: true
"""
        path = os.path.join(self.work, "agent.yaml")
        with open(path, "w") as f:
            f.write(config)
        self.agent_log = os.path.join(self.work, "agent.log")
        env = dict(os.environ, RUST_LOG="info", NO_COLOR="1")
        p = subprocess.Popen([self.agent_bin, "run", "--config", path], env=env,
                             stdout=subprocess.DEVNULL, stderr=open(self.agent_log, "w"))
        self.procs["agent"] = p
        deadline = time.time() + 30
        while time.time() < deadline:
            if p.poll() is not None:
                raise SoakError(f"the agent exited:\n{open(self.agent_log).read()}")
            status, body = self.api("/targets")
            if status == 200 and len(json.loads(body)) >= 4:
                log(f"agent pid {p.pid} on https://127.0.0.1:{self.agent_port}, 4 targets")
                return
            time.sleep(0.5)
        raise SoakError("the agent did not list the 4 workers")

    def start_prometheus(self):
        import yaml  # python3-yaml (bench/soak.sh installs it with python3-matplotlib)

        src = os.path.join(REPO, "deploy/prometheus/prometheus-tls.yml")
        with open(src) as f:
            cfg = yaml.safe_load(f)
        cfg["global"].update(scrape_interval="5s", scrape_timeout="4s", evaluation_interval="5s")
        cfg["rule_files"] = [os.path.join(REPO, "deploy/prometheus", r) for r in cfg["rule_files"]]
        job = cfg["scrape_configs"][0]
        job["scrape_interval"] = "5s"
        job["basic_auth"]["password_file"] = os.path.join(self.pki_dir, "password")
        job["tls_config"]["ca_file"] = os.path.join(self.pki_dir, "ca.crt")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{self.agent_port}"]}]
        path = os.path.join(self.work, "prometheus.yml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        self.prom_port = free_port()
        out = open(os.path.join(self.work, "prometheus.log"), "w")
        p = subprocess.Popen(["prometheus", f"--config.file={path}",
                              f"--storage.tsdb.path={self.work}/prom-data",
                              f"--web.listen-address=127.0.0.1:{self.prom_port}", "--log.level=warn"],
                             stdout=out, stderr=subprocess.STDOUT)
        self.procs["prometheus"] = p
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.prom_port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        log(f"prometheus on 127.0.0.1:{self.prom_port}, scraping every 5 s")
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise SoakError("prometheus did not become ready")

    def start_load(self):
        script = os.path.join(self.work, "wrk-soak.lua")
        with open(os.path.join(WORKLOAD, "wrk-routes.lua")) as f:
            routes = f.read()
        with open(script, "w") as f:
            # At most 200 requests/s per connection: a steady load, not a saturating one.
            f.write(routes + "\nfunction delay() return 5 end\n")
        secs = int(self.args.duration) + 120
        p = subprocess.Popen(["wrk", "-t1", "-c8", f"-d{secs}s", "-s", script,
                              f"http://127.0.0.1:{self.nginx_port}/"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs["wrk"] = p

    # ---- the agent's API ------------------------------------------------------------------
    def api(self, path, timeout=10):
        req = urllib.request.Request(f"https://127.0.0.1:{self.agent_port}{path}")
        token = base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except OSError as e:
            return 0, str(e)

    def prom_query(self, expr):
        url = f"http://127.0.0.1:{self.prom_port}/api/v1/query?query={urllib.parse.quote(expr)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())["data"]["result"]

    # ---- churn ----------------------------------------------------------------------------
    def reload_nginx(self):
        os.kill(self.procs["nginx"].pid, signal.SIGHUP)
        self.events["reloads"] += 1

    def container_conf(self):
        d = os.path.join(self.work, "container")
        if not os.path.isdir(d):
            os.makedirs(d)
            os.chmod(d, 0o755)
            self.container_port = free_port()
            with open(os.path.join(d, "nginx.conf"), "w") as f:
                f.write(f"""load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 1;
error_log stderr warn;
pid /tmp/nginx.pid;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path /tmp; proxy_temp_path /tmp; fastcgi_temp_path /tmp;
  uwsgi_temp_path /tmp; scgi_temp_path /tmp;
  server {{
    listen 127.0.0.1:{self.container_port};
    location / {{ content_by_lua_block {{ local x = 0 for i = 1, 1e5 do x = x + i end ngx.say(x) }} }}
  }}
}}
""")
        return d

    def container_load(self):
        """20 requests a second to whichever container runs (its workers get samples)."""
        while not self.stop.is_set():
            if self.container:
                try:
                    url = f"http://127.0.0.1:{self.container_port}/"
                    with urllib.request.urlopen(url, timeout=2) as r:
                        r.read()
                except OSError:
                    pass
            self.stop.wait(0.05)

    def start_container(self):
        d = self.container_conf()
        name = f"apisix-soak-{os.getpid()}-{self.events['containers']}"
        with self.lock:
            self.containers.add(name)
        cmd = f"cp /usr/sbin/nginx /tmp/{COMM} && exec /tmp/{COMM} -c /app/nginx.conf -g 'daemon off;'"
        run(["docker", "run", "-d", "--network", "host", "--name", name, "-v", f"{d}:/app:ro",
             IMAGE, "sh", "-c", cmd])
        pid = int(run(["docker", "inspect", "-f", "{{.State.Pid}}", name]).strip())
        self.container = (name, pid)
        self.events["containers"] += 1

    def stop_container(self):
        if not self.container:
            return
        name, _ = self.container
        self.container = None
        subprocess.run(["docker", "stop", "-t", "2", name], capture_output=True)
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        with self.lock:
            self.containers.discard(name)

    def capture_query(self):
        """The container when one runs and the agent lists its worker, else the newest listed
        host worker that is alive; None without either."""
        listed = set(self.samples[-1]["targets"] or []) if self.samples else set()
        container = self.container
        if container and any(w in listed for w in children(container[1])):
            return f"container={container[0]}"
        host = [w for w in children(self.procs["nginx"].pid) if is_worker(w) and w in listed]
        return f"pid={max(host)}" if host else None

    def capture(self):
        query = self.capture_query()
        if query is None:
            return
        status, body = self.api(f"/flamegraph?{query}&seconds=3&format=collapsed", timeout=30)
        if status == 404:
            # The worker exited (a reload) between the choice and the request: choose again.
            time.sleep(1)
            query = self.capture_query() or query
            status, body = self.api(f"/flamegraph?{query}&seconds=3&format=collapsed", timeout=30)
            with self.lock:
                self.events["capture_retries"] = self.events.get("capture_retries", 0) + 1
        with self.lock:
            self.events["captures"][status] = self.events["captures"].get(status, 0) + 1
            if status != 200:
                self.events["capture_errors"].append(f"{query}: {status} {body[:200]}")

    def in_thread(self, f, *a):
        t = threading.Thread(target=self.guard, args=(f, *a), daemon=True)
        t.start()
        return t

    def guard(self, f, *a):
        try:
            f(*a)
        except Exception as e:  # noqa: BLE001 - recorded, the soak goes on
            with self.lock:
                self.events["capture_errors"].append(f"{f.__name__}: {e}")

    # ---- sampling -------------------------------------------------------------------------
    def workers(self):
        pids = [w for w in children(self.procs["nginx"].pid) if is_worker(w)]
        if self.container:
            pids += [w for w in children(self.container[1]) if is_worker(w)]
        return pids

    def sample(self, t):
        agent = self.procs["agent"].pid
        expected = self.workers()
        status, body = self.api("/targets")
        targets = [x["pid"] for x in json.loads(body)] if status == 200 else None
        self.samples.append({
            "t": t,
            "rss_kib": rss_kib(agent),
            "fds": fd_count(agent),
            "fd_kinds": fd_kinds(agent),
            "workers": expected,
            "targets": targets,
        })

    def series_count(self, t):
        status, body = self.api("/metrics")
        if status == 200:
            n = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
            self.series.append({"t": t, "series": n})

    def map_entries(self, t):
        agent = self.procs["agent"].pid
        ids = {}
        fd_dir = f"/proc/{agent}/fd"
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink(os.path.join(fd_dir, fd)) != "anon_inode:bpf-map":
                    continue
                with open(f"/proc/{agent}/fdinfo/{fd}") as f:
                    info = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
            except OSError:
                continue
            if int(info.get("map_type", -1)) in HASH_MAPS:
                ids[int(info["map_id"])] = True
        total, by_name = 0, {}
        for map_id in ids:
            r = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)],
                               capture_output=True, text=True)
            show = subprocess.run(["bpftool", "-j", "map", "show", "id", str(map_id)],
                                  capture_output=True, text=True)
            if r.returncode != 0 or show.returncode != 0:
                continue  # a capture's map, gone meanwhile
            n = len(json.loads(r.stdout or "[]"))
            name = json.loads(show.stdout).get("name", str(map_id))
            total += n
            by_name[name] = by_name.get(name, 0) + n
        self.map_samples.append({"t": t, "entries": total, "maps": by_name})

    # ---- the run --------------------------------------------------------------------------
    def run(self):
        self.pki()
        self.start_nginx()
        self.start_agent()
        self.start_prometheus()
        self.start_load()
        log(f"soak for {self.args.duration:.0f} s: reload every 10 s, container every 20 s, "
            f"capture every 15 s, scrape every 5 s")
        self.container_conf()
        self.in_thread(self.container_load)
        self.in_thread(self.watch_targets)
        self.t0 = time.monotonic()
        threads = []
        tick = 0
        while True:
            t = time.monotonic() - self.t0
            if t >= self.args.duration:
                break
            if self.procs["agent"].poll() is not None:
                raise SoakError(f"the agent exited ({self.procs['agent'].returncode})")
            if tick > 0 and tick % 10 == 0:
                self.reload_nginx()
            if tick % 20 == 0:
                threads.append(self.in_thread(self.start_container))
            elif tick % 20 == 10:
                threads.append(self.in_thread(self.stop_container))
            if tick % 15 == 7:
                threads.append(self.in_thread(self.capture))
            self.sample(t)
            if tick % 10 == 5:
                self.map_entries(t)
                self.series_count(t)
            if tick % 60 == 0 and self.samples:
                s = self.samples[-1]
                log(f"t={t:4.0f}s rss={s['rss_kib'] / 1024:.1f} MiB fds={s['fds']} "
                    f"targets={len(s['targets'] or [])} reloads={self.events['reloads']} "
                    f"containers={self.events['containers']}")
            tick += 1
            time.sleep(max(0.0, self.t0 + tick - time.monotonic()))
        for th in threads:
            th.join(timeout=30)
        self.stop.set()
        self.stop_container()
        # What /metrics and /targets hold at the end, for a look at what stayed.
        for path, name in (("/metrics", "metrics-end.txt"), ("/targets", "targets-end.json")):
            with open(os.path.join(self.work, name), "w") as f:
                f.write(self.api(path)[1])
        self.scrapes = self.scrape_counts()

    def scrape_counts(self):
        window = f"{int(self.args.duration)}s"
        try:
            total = self.prom_query(f'count_over_time(up{{job="apisix-agent"}}[{window}])')
            up = self.prom_query(f'sum_over_time(up{{job="apisix-agent"}}[{window}])')
            slowest = self.prom_query(
                f'max_over_time(scrape_duration_seconds{{job="apisix-agent"}}[{window}])'
            )
            self.slowest_scrape = float(slowest[0]["value"][1]) if slowest else 0.0
            return int(float(total[0]["value"][1])), int(float(up[0]["value"][1]))
        except (OSError, KeyError, IndexError, ValueError):
            return 0, 0

    def cleanup(self):
        for name in ("wrk", "prometheus", "agent", "nginx"):
            p = self.procs.get(name)
            if p:
                terminate(p, 15, name)
        with self.lock:
            names = list(self.containers)
        for name in names:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)

    # ---- analysis and report --------------------------------------------------------------
    def analyse(self):
        warm = min(120.0, self.args.duration / 3)
        after = [s for s in self.samples if s["t"] >= warm]
        maps_after = [m for m in self.map_samples if m["t"] >= warm]

        def series(rows, key, scale=1.0):
            return [r["t"] for r in rows], [r[key] * scale for r in rows]

        res = {"warmup_s": warm, "metrics": {}}
        for key, label, rows_all, rows_after, scale in (
            ("rss_kib", "RSS (MiB)", self.samples, after, 1 / 1024),
            ("fds", "open fds", self.samples, after, 1),
            ("entries", "BPF hash map entries", self.map_samples, maps_after, 1),
            ("series", "/metrics series", self.series, [x for x in self.series if x["t"] >= warm], 1),
        ):
            _, v_all = series(rows_all, key, scale)
            ts, vs = series(rows_after, key, scale)
            slope = trend_pct_per_10min(ts, vs)
            res["metrics"][key] = {
                "label": label,
                "all": (min(v_all), max(v_all)) if v_all else (0, 0),
                "after": (min(vs), max(vs)) if vs else (0, 0),
                "slope": slope,
                # Growth fails; a falling trend does not. The series count is bounded by
                # metrics.top_functions per group by design: reported, not judged.
                "pass": slope < SLOPE_LIMIT_PCT if vs else False,
                "judged": key != "series",
            }
        res["targets"] = self.analyse_targets()
        with open(self.agent_log) as f:
            lines = f.read().splitlines()
        res["log"] = {
            "errors": [line for line in lines if " ERROR " in line],
            "warnings": [line for line in lines if " WARN " in line],
            "lines": len(lines),
        }
        res["events"] = self.events
        res["scrapes"] = self.scrapes
        captures_ok = self.events["captures"].get(200, 0)
        captures = sum(self.events["captures"].values())
        total, up = self.scrapes
        res["pass"] = {
            "growth": all(m["pass"] for m in res["metrics"].values() if m["judged"]),
            "targets": res["targets"]["lost"] == 0 and res["targets"]["late"] == 0
            and res["targets"]["api_failures"] == 0,
            "log": not res["log"]["errors"],
            "captures": captures > 0 and captures_ok == captures and not self.events["capture_errors"],
            "scrapes": total > 0 and up == total,
        }
        return res

    def analyse_targets(self):
        """From the 0.5 s watch: each worker's discovery latency (its start to its first
        listing) and any time a listed, live worker was missing from /targets."""
        first_listed, alive_at, missing_since = {}, {}, {}
        dropped = []  # seconds a listed live worker was missing
        for w in self.watch:
            listed = w["targets"]
            for pid, started in w["workers"].items():
                alive_at.setdefault(pid, started)
                if pid in listed:
                    first_listed.setdefault(pid, w["wall"])
                    if pid in missing_since:
                        dropped.append(w["wall"] - missing_since.pop(pid))
                elif pid in first_listed and pid not in missing_since:
                    missing_since[pid] = w["wall"]
            for pid in list(missing_since):
                if pid not in w["workers"]:
                    missing_since.pop(pid)  # it exited: its removal is right
        end = self.watch[-1]["wall"] if self.watch else 0
        dropped += [end - since for since in missing_since.values()]
        latencies, never = [], 0
        last_seen = {}
        for w in self.watch:
            for pid in w["workers"]:
                last_seen[pid] = w["wall"]
        for pid, started in alive_at.items():
            if started is None:
                continue
            if pid in first_listed:
                latencies.append(max(0.0, first_listed[pid] - started))
            elif last_seen[pid] - started > 2 * DISCOVERY_INTERVAL:
                never += 1  # lived through two scans unlisted
        latencies.sort()
        pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0  # noqa: E731
        limit = 2 * DISCOVERY_INTERVAL
        counts = [len(s["targets"]) for s in self.samples if s["targets"] is not None]
        return {
            "range": (min(counts), max(counts)) if counts else (0, 0),
            "workers_seen": len(alive_at),
            "latency_p50": pct(0.5),
            "latency_p95": pct(0.95),
            "latency_max": latencies[-1] if latencies else 0.0,
            "late": sum(1 for x in latencies if x > limit) + never,
            "limit_s": limit,
            "lost": sum(1 for x in dropped if x > DISCOVERY_INTERVAL),
            "longest_drop": max(dropped, default=0.0),
            "api_failures": sum(1 for w in self.watch if w.get("failed")),
        }

    def watch_targets(self):
        """Every 0.5 s: the worker processes (with their start times) and /targets."""
        starts = {}
        while not self.stop.is_set():
            workers = {}
            for pid in self.workers():
                if pid not in starts:
                    starts[pid] = start_time(pid)
                workers[pid] = starts[pid]
            status, body = self.api("/targets")
            entry = {"wall": time.time(), "workers": workers, "targets": set()}
            if status == 200:
                entry["targets"] = {x["pid"] for x in json.loads(body)}
            else:
                entry["failed"] = True
            self.watch.append(entry)
            self.stop.wait(0.5)

    def plot(self, res, path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(5, 1, figsize=(8, 8.4), sharex=True)
        m = lambda rows: [r["t"] / 60 for r in rows]  # noqa: E731
        panels = [
            (m(self.samples), [s["rss_kib"] / 1024 for s in self.samples], "RSS (MiB)"),
            (m(self.samples), [s["fds"] for s in self.samples], "open fds"),
            (m(self.map_samples), [s["entries"] for s in self.map_samples], "BPF hash map entries"),
            (m(self.series), [s["series"] for s in self.series], "/metrics series"),
        ]
        for ax, (x, y, label) in zip(axes, panels):
            ax.plot(x, y, lw=1.2)
            ax.set_ylabel(label, fontsize=8)
            ax.set_ylim(bottom=0, top=max(y + [1]) * 1.25)
        ok = [s for s in self.samples if s["targets"] is not None]
        axes[4].plot(m(ok), [len(s["targets"]) for s in ok], lw=1.0, label="agent /targets")
        axes[4].plot(m(ok), [len(s["workers"]) for s in ok], lw=0.8, ls="--", label="worker processes")
        axes[4].set_ylabel("targets", fontsize=8)
        axes[4].set_ylim(0, 8)
        axes[4].legend(fontsize=7, loc="lower right")
        for ax in axes:
            ax.axvspan(0, res["warmup_s"] / 60, color="0.9")
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        axes[4].set_xlabel("minutes (grey: warm-up, not in the slope)", fontsize=8)
        fig.suptitle("apisix-agent soak: reload every 10 s, container every 20 s, capture every 15 s",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)

    def report(self, res, png_rel):
        info = machine_info()
        ok = all(res["pass"].values())
        ev = res["events"]
        captures = sum(ev["captures"].values())
        total, up = res["scrapes"]
        rows = []
        for key in ("rss_kib", "fds", "entries", "series"):
            r = res["metrics"][key]
            fmt = "{:.1f}" if key == "rss_kib" else "{:.0f}"
            rng = lambda p: f"{fmt.format(p[0])}–{fmt.format(p[1])}"  # noqa: E731
            if r["judged"]:
                target, verdict = f"< +{SLOPE_LIMIT_PCT:.0f}%", "PASS" if r["pass"] else "FAIL"
            else:
                target, verdict = "bounded (`metrics.top_functions` per group)", "—"
            rows.append(f"| {r['label']} | {rng(r['all'])} | {rng(r['after'])} | {r['slope']:+.2f}% | "
                        f"{target} | {verdict} |")
        tg = res["targets"]
        warn = res["log"]["warnings"]
        lines = [
            BEGIN,
            "## 8. Soak under churn (`bench/soak.sh`)",
            "",
            f"- Date: {info['date']}; {res_duration(self.args.duration)}; kernel `{info['kernel']}`; "
            f"{info['ncpu']} CPUs (shared machine); agent at commit {info['rev']}",
            "- Reproduce (as root): `sudo ./bench/soak.sh` (`--duration S` for a shorter run)",
            "",
            "Running together the whole time: continuous sampling (19 Hz) of a 4-worker nginx-lua "
            "(the bench workload) under throttled loopback load (`wrk -c8`, 5 ms between requests "
            "per connection); an nginx reload (4 new workers) every 10 s; a container of the test "
            "image (`--network host`, 20 requests/s) started, and stopped 10 s later, every 20 s; an on-demand "
            "3 s capture every 15 s (of the container when one runs, else of a host worker); "
            "Prometheus scraping every 5 s over HTTPS with basic auth (`deploy/prometheus/prometheus-tls.yml`). Sampled every second "
            "(BPF map entries and the number of /metrics series every 10 s). The agent keeps "
            f"{RETENTION} s of recent stacks (`sampling.retention_seconds`), so that window is "
            "full before the measured part. Trend: the Theil–Sen slope after the warm-up (the median "
            "of the slopes between samples at least a minute apart, so that a capture or a "
            "reload moving single samples does not make one), as a share of the mean.",
            "",
            f"![soak]({png_rel})",
            "",
            f"| Agent | Whole run | After {res['warmup_s']:.0f} s | Trend after warm-up, per 10 min | Target | Result |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"- **Targets** (watched every 0.5 s): /targets listed {tg['range'][0]}–"
            f"{tg['range'][1]} processes; {tg['workers_seen']} distinct workers came and went. "
            f"From a worker's start to its first listing: median {tg['latency_p50']:.1f} s, "
            f"95th percentile {tg['latency_p95']:.1f} s, longest {tg['latency_max']:.1f} s "
            f"(discovery scans every {DISCOVERY_INTERVAL} s after the previous scan ends; a "
            f"Docker start triggers one at once); listed later than two intervals "
            f"({tg['limit_s']:.0f} s, i.e. missed by more than one scan): {tg['late']}. A listed, "
            f"live worker missing from /targets: {tg['lost']} times longer than one interval "
            f"(longest {tg['longest_drop']:.1f} s) — {'PASS' if res['pass']['targets'] else 'FAIL'}.",
            f"- **Churn done:** {ev['reloads']} reloads, {ev['containers']} containers, "
            f"{captures} captures ({ev['captures'].get(200, 0)} answered 200; "
            f"{ev.get('capture_retries', 0)} chosen again after a 404 for a worker a reload had "
            "just ended), "
            f"{up} of {total} scrapes up (slowest {self.slowest_scrape * 1000:.0f} ms; "
            "timeout 4 s) — "
            f"{'PASS' if res['pass']['captures'] and res['pass']['scrapes'] else 'FAIL'}.",
            f"- **Log:** {res['log']['lines']} lines, {len(res['log']['errors'])} ERROR, "
            f"{len(warn)} WARN — {'PASS' if res['pass']['log'] else 'FAIL'}.",
        ]
        if warn:
            lines.append("  Warnings: " + "; ".join(sorted({w.split('  ', 1)[-1][:160] for w in warn})[:5]))
        if ev["capture_errors"]:
            lines.append("  Failed operations: " + "; ".join(ev["capture_errors"][:5]))
        lines += ["", f"Verdict: **{'PASS' if ok else 'FAIL'}**.", END]
        return "\n".join(lines) + "\n", ok


def res_duration(secs):
    return f"{secs / 60:.0f} min" if secs >= 120 else f"{secs:.0f} s"


def write_section(path, section):
    text = open(path).read() if os.path.exists(path) else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--agent", required=True)
    ap.add_argument("--output", default=os.path.join(REPO, "BENCHMARKS.md"))
    ap.add_argument("--plot", default=os.path.join(REPO, "docs", "soak.png"))
    args = ap.parse_args()
    soak = Soak(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        soak.run()
    finally:
        soak.cleanup()
    res = soak.analyse()
    with open(os.path.join(args.workdir, "samples.json"), "w") as f:
        json.dump({"samples": soak.samples, "maps": soak.map_samples, "series": soak.series,
                   "result": res}, f)
    soak.plot(res, args.plot)
    png_rel = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.output)))
    section, ok = soak.report(res, png_rel)
    write_section(args.output, section)
    sys.stdout.write(section)
    log(f"wrote {args.output} and {args.plot}; raw samples in {args.workdir}/samples.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
