"""The bench harness: paths and constants, logging, /proc and fdinfo readers, HTTP and
wrk output helpers, process control, machine facts (stdlib only)."""

import datetime
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


# bench/, above this package.
BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


REPO = os.path.dirname(BENCH)


WORKLOAD = os.path.join(BENCH, "workload")


NGINX = "/usr/sbin/nginx"


# The workload's nginx runs from a copy of the binary with this name, so the agent's host
# discovery (`discovery.process_names`) selects our workers and nothing else on the machine.
NGINX_COMM = "nginx-bench"


CLK_TCK = os.sysconf("SC_CLK_TCK")


PERF_EVENT_PROG = 7  # BPF_PROG_TYPE_PERF_EVENT: the `sample` program


def workload_prefix(prefix, port, workers, comm=None, jit=None):
    """Makes `prefix` the nginx prefix of bench/workload: its Lua files (readable by the
    unprivileged workers), logs/ and tmp/, and nginx.conf for 127.0.0.1:`port` with
    `workers` workers; `jit` True or False turns the JIT on or off in `init_by_lua` (None
    leaves LuaJIT's default, on). With `comm`, nginx runs from a copy of the binary with that
    name (the agent's discovery then selects exactly these processes). Returns (binary,
    path of nginx.conf)."""
    for d in ("logs", "tmp", "sbin"):
        os.makedirs(os.path.join(prefix, d), exist_ok=True)
    shutil.copytree(os.path.join(WORKLOAD, "lua"), os.path.join(prefix, "lua"))
    for root, _, files in os.walk(prefix):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    binary = NGINX
    if comm:
        binary = os.path.join(prefix, "sbin", comm)
        shutil.copy2(NGINX, binary)
        os.chmod(binary, 0o755)
    with open(os.path.join(WORKLOAD, "nginx.conf.in")) as f:
        conf = (f.read().replace("@PREFIX@", prefix).replace("@PORT@", str(port))
                .replace("@WORKERS@", str(workers)))
    if jit is not None:
        conf = conf.replace("init_by_lua_block {",
                            f'init_by_lua_block {{ require("jit").{"on" if jit else "off"}();', 1)
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return binary, path


def log(msg):
    print(f"[overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5.0):
    """(status, body bytes); status 0 when the connection fails."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def proc_cpu_seconds(pid):
    """utime + stime of the whole thread group (the kernel scales them to the precise runtime)."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(") ", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {field} in /proc/{pid}/status")


def anon_fdinfo(pid, kind):
    """The fdinfo fields of each open fd of `pid` that is an anonymous inode of `kind`
    (`bpf-prog`, `bpf_link`); fds that close meanwhile are skipped."""
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)) != f"anon_inode:{kind}":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        yield {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}


def bpf_sample_stats(agent_pid):
    """(run_time_ns, run_cnt) summed over the agent's perf_event programs (`sample`)."""
    seen = {}
    for info in anon_fdinfo(agent_pid, "bpf-prog"):
        if int(info.get("prog_type", -1)) != PERF_EVENT_PROG:
            continue
        if "run_time_ns" not in info:
            raise BenchError("fdinfo has no run_time_ns (kernel.bpf_stats_enabled not honoured?)")
        seen[info["prog_id"]] = (int(info["run_time_ns"]), int(info["run_cnt"]))
    if not seen:
        raise BenchError(f"no perf_event BPF program among the fds of agent pid {agent_pid}")
    return sum(v[0] for v in seen.values()), sum(v[1] for v in seen.values())


def uprobe_links(agent_pid):
    """How many uprobe links the agent holds (its `lua_resume` VM-learning probes)."""
    return sum(1 for info in anon_fdinfo(agent_pid, "bpf_link") if info.get("event_type") == "uprobe")


def terminate(p, timeout, what):
    """SIGTERM to a child still running, SIGKILL after `timeout` seconds; waits for it."""
    if p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"warning: {what} ignored SIGTERM for {timeout} s, killing it")
        p.kill()
        p.wait()


def metric_sum(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            try:
                total += float(line.rsplit(None, 1)[1])
            except (IndexError, ValueError):
                pass
    return total


def parse_wrk(out):
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if not rps or not p99:
        raise BenchError("cannot parse wrk output:\n" + out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors:\s+connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    return {
        "rps": float(rps.group(1)),
        "p99_ms": float(p99.group(1)) * scale,
        "requests": int(total.group(1)) if total else 0,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "sock_errors": sum(int(x) for x in sock.groups()) if sock else 0,
    }


class BlockedWatch:
    """Polls, in a thread, whether an agent thread sleeps uninterruptibly (D state)."""

    def __init__(self, bench, period=0.05):
        import collections
        import threading

        self.bench, self.period = bench, period
        self.polls, self.hits, self.where = 0, 0, collections.Counter()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.is_set():
            try:
                blocked = self.bench.agent_blocked()
            except (OSError, AttributeError):
                blocked = []
            self.polls += 1
            if blocked:
                self.hits += 1
                self.where.update(blocked)
            time.sleep(self.period)

    def stop(self):
        """(fraction of the polls with a blocked thread, the commonest wait channel)"""
        self.done.set()
        self.thread.join()
        where = self.where.most_common(1)[0][0] if self.where else ""
        return (self.hits / self.polls if self.polls else 0.0), where


def machine_info():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    nginx_v = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip()
    try:
        rev = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        rev = rev + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        rev = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpu": cpu,
        "ncpu": os.cpu_count(),
        "mem_gib": mem_kb / 1024 / 1024,
        "nginx": nginx_v.replace("nginx version: ", ""),
        "rev": rev,
    }


def own_autogroup():
    """Own session, hence own scheduler autogroup, for the bench's processes: nginx runs in the
    foreground, so the workers, wrk and the agent all share it and compete among themselves as
    on a dedicated machine."""
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader


def set_group_nice(nice):
    """Weight of the bench's autogroup against the rest of the machine (takes effect at once for
    every process in it)."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
        log(f"bench autogroup nice {nice}")
    except OSError as e:
        log(f"warning: cannot set the autogroup nice ({e})")
