#!/usr/bin/env bash
# Checks deploy/profiling/config.alloy and parca.yaml against what the agent serves; exits
# non-zero on any problem. Neither Grafana Alloy nor Parca can be installed from the package
# registries this project uses, so this is not their validator: it parses parca.yaml (PyYAML)
# and reads the Alloy blocks with a small brace-matching reader, then checks that
#  - process_cpu is on, in delta mode, at /debug/pprof/profile;
#  - the Go-only profile types (memory, block, goroutine, mutex) are off;
#  - Alloy's targets get a service_name, and the off-CPU profile points at /debug/pprof/offcpu;
#  - Parca's jobs use only the fields Parca's ScrapeConfig knows;
#  - the Kubernetes scrapes (Alloy's, Parca's kubernetes_sd job) speak what
#    deploy/kubernetes/configmap.yaml's agent accepts: HTTPS with basic auth and a CA file,
#    the certificate checked against servicemonitor.yaml's tlsConfig.serverName.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -c 'import yaml' 2>/dev/null || {
    echo "PyYAML missing (apt-get install python3-yaml)" >&2
    exit 1
}
python3 - "$here" <<'PY'
import os, re, sys
import yaml

here = sys.argv[1]
problems = []
def problem(msg):
    problems.append(msg)
    print("FAIL:", msg, file=sys.stderr)

# What the DaemonSet's agents accept (HTTPS + basic auth) and the name their certificate has.
kube = os.path.join(here, "..", "kubernetes")
agent = yaml.safe_load(yaml.safe_load(open(os.path.join(kube, "configmap.yaml")))["data"]["config.yaml"])
if not (agent["http"].get("tls") or {}).get("cert_file") or not agent["http"].get("basic_auth_users"):
    problem("deploy/kubernetes/configmap.yaml: the agent no longer asks for HTTPS and basic auth; update this check")
scrape_user = next(iter(agent["http"].get("basic_auth_users") or {"prometheus": ""}))
monitor = yaml.safe_load(open(os.path.join(kube, "servicemonitor.yaml")))
server_name = monitor["spec"]["endpoints"][0]["tlsConfig"]["serverName"]

# --- Alloy --------------------------------------------------------------------------------
text = open(os.path.join(here, "config.alloy")).read()
code = "\n".join(l.split("//", 1)[0] if not l.lstrip().startswith("//") else "" for l in text.splitlines())
if code.count("{") != code.count("}"):
    problem("config.alloy: unbalanced braces")
def block(src, header):
    """The body of the first block `header {` in src."""
    m = re.search(re.escape(header) + r"\s*\{", src)
    if not m:
        return None
    depth, i = 1, m.end()
    while depth and i < len(src):
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        i += 1
    return src[m.end():i - 1]
scrape = block(code, 'pyroscope.scrape "apisix_agent"')
if scrape is None:
    problem('config.alloy: no pyroscope.scrape "apisix_agent"')
else:
    prof = block(scrape, "profiling_config") or ""
    def enabled(name):
        b = block(prof, name)
        if b is None:
            return None
        m = re.search(r"enabled\s*=\s*(true|false)", b)
        return m and m.group(1)
    if enabled("profile.process_cpu") != "true":
        problem("config.alloy: profile.process_cpu must be enabled")
    for go_only in ("memory", "block", "goroutine", "mutex"):
        if enabled(f"profile.{go_only}") != "false":
            problem(f"config.alloy: profile.{go_only} must be disabled (Go only; the agent has none)")
    off = block(prof, 'profile.custom "offcpu"') or ""
    if '"/debug/pprof/offcpu"' not in off or not re.search(r"delta\s*=\s*true", off):
        problem('config.alloy: profile.custom "offcpu" must scrape /debug/pprof/offcpu in delta mode')
    if "forward_to" not in scrape:
        problem("config.alloy: pyroscope.scrape forwards nowhere")
    # The Kubernetes targets: HTTPS with basic auth, as the DaemonSet's agents require.
    def attr(src, name):
        m = re.search(r"\b" + name + r'\s*=\s*"([^"]*)"', src or "")
        return m and m.group(1)
    if attr(scrape, "scheme") != "https":
        problem('config.alloy: pyroscope.scrape needs scheme = "https" (the DaemonSet\'s agents serve TLS only)')
    auth = block(scrape, "basic_auth")
    if attr(auth, "username") != scrape_user or not attr(auth, "password_file"):
        problem(f"config.alloy: pyroscope.scrape needs basic_auth with username {scrape_user!r} and a password_file")
    tls = block(scrape, "tls_config")
    if not attr(tls, "ca_file") or attr(tls, "server_name") != server_name:
        problem(f"config.alloy: pyroscope.scrape needs tls_config with a ca_file and server_name {server_name!r}")
if not re.search(r'target_label\s*=\s*"service_name"', code):
    problem("config.alloy: no service_name for the targets")
if block(code, 'pyroscope.write "default"') is None:
    problem('config.alloy: no pyroscope.write "default"')
print("ok: config.alloy")

# --- Parca --------------------------------------------------------------------------------
parca = yaml.safe_load(open(os.path.join(here, "parca.yaml")))
known_job = {"job_name", "params", "scrape_interval", "scrape_timeout", "scheme",
             "normalized_addresses", "profiling_config", "relabel_configs", "static_configs",
             "kubernetes_sd_configs", "basic_auth", "authorization", "tls_config",
             "bearer_token", "bearer_token_file", "oauth2", "follow_redirects"}
known_profile = {"enabled", "path", "delta", "keep_sample_type"}
known_basic_auth = {"username", "username_file", "password", "password_file"}
known_tls = {"ca", "ca_file", "cert", "cert_file", "key", "key_file", "server_name",
             "insecure_skip_verify", "min_version", "max_version"}
if set(parca) - {"object_storage", "scrape_configs"}:
    problem(f"parca.yaml: unknown top-level fields {set(parca) - {'object_storage', 'scrape_configs'}}")
if "bucket" not in (parca.get("object_storage") or {}):
    problem("parca.yaml: Parca needs object_storage.bucket")
for job in parca.get("scrape_configs", []):
    name = job.get("job_name", "?")
    if set(job) - known_job:
        problem(f"parca.yaml: {name}: unknown fields {set(job) - known_job}")
    pp = (job.get("profiling_config") or {}).get("pprof_config") or {}
    for pname, pcfg in pp.items():
        if set(pcfg) - known_profile:
            problem(f"parca.yaml: {name}: {pname}: unknown fields {set(pcfg) - known_profile}")
    cpu = pp.get("process_cpu") or {}
    if not (cpu.get("enabled") and cpu.get("delta") and cpu.get("path") == "/debug/pprof/profile"):
        problem(f"parca.yaml: {name}: process_cpu must be enabled, delta, at /debug/pprof/profile")
    for go_only in ("memory", "block", "goroutine", "mutex"):
        if (pp.get(go_only) or {}).get("enabled") is not False:
            problem(f"parca.yaml: {name}: {go_only} must be disabled (Parca enables it by default)")
    off = pp.get("offcpu") or {}
    if off.get("path") != "/debug/pprof/offcpu" or not off.get("delta"):
        problem(f"parca.yaml: {name}: offcpu must point at /debug/pprof/offcpu in delta mode")
    auth = job.get("basic_auth") or {}
    tls = job.get("tls_config") or {}
    if set(auth) - known_basic_auth:
        problem(f"parca.yaml: {name}: basic_auth: unknown fields {set(auth) - known_basic_auth}")
    if set(tls) - known_tls:
        problem(f"parca.yaml: {name}: tls_config: unknown fields {set(tls) - known_tls}")
    if "kubernetes_sd_configs" in job:
        if job.get("scheme") != "https":
            problem(f"parca.yaml: {name}: needs scheme: https (the DaemonSet's agents serve TLS only)")
        if auth.get("username") != scrape_user or not auth.get("password_file"):
            problem(f"parca.yaml: {name}: needs basic_auth with username {scrape_user!r} and a password_file")
        if not tls.get("ca_file") or tls.get("server_name") != server_name:
            problem(f"parca.yaml: {name}: needs tls_config with a ca_file and server_name {server_name!r}")
print("ok: parca.yaml")
sys.exit(1 if problems else 0)
PY
echo "check: OK (a consistency check, not Alloy's or Parca's own validation)"
