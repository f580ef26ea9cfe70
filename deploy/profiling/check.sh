#!/usr/bin/env bash
# Checks deploy/profiling/config.alloy and parca.yaml against what the agent serves; exits
# non-zero on any problem. Neither Grafana Alloy nor Parca can be installed from the package
# registries this project uses, so this is not their validator: it parses parca.yaml (PyYAML)
# and reads the Alloy blocks with a small brace-matching reader, then checks that
#  - process_cpu is on, in delta mode, at /debug/pprof/profile;
#  - the Go-only profile types (memory, block, goroutine, mutex) are off;
#  - Alloy's targets get a service_name, and the off-CPU profile points at /debug/pprof/offcpu;
#  - Parca's jobs use only the fields Parca's ScrapeConfig knows.
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
print("ok: parca.yaml")
sys.exit(1 if problems else 0)
PY
echo "check: OK (a consistency check, not Alloy's or Parca's own validation)"
