#!/usr/bin/env bash
# Validates the Kubernetes manifests; exits non-zero on any problem.
#
#   deploy/kubernetes/validate.sh            # YAML + consistency checks (python3 + PyYAML)
#   SCHEMA=1 deploy/kubernetes/validate.sh   # + Kubernetes API schemas (kubernetes-validate
#                                            #   from PyPI, in a venv under /tmp)
#
# Checks: every *.yaml parses (yaml.safe_load_all) and each document has apiVersion, kind
# and metadata.name; the ConfigMap's config.yaml parses and only uses fields that
# config.example.yaml has (the agent rejects unknown fields) and listens on 0.0.0.0:9464
# with TLS and basic auth, the TLS files coming from a mounted Secret (not subPath, so
# updates reach the agent), probes over HTTPS (tcpSocket with mutual TLS), and a
# ServiceMonitor scraping with scheme https, tlsConfig and basicAuth;
# the DaemonSet is privileged with hostPID, probes /healthz, mounts the ConfigMap where
# --config points, /sys/kernel/debug, /sys/fs/bpf and the directory of the Docker socket the
# config names, and sets memory requests/limits; its profiles.grafana.com annotations turn on
# the CPU profile on an existing port and the Go-only ones off; Service, ServiceMonitor and
# pods agree on labels and the port name.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py=python3

if ! "$py" -c 'import yaml' 2>/dev/null; then
    echo "PyYAML missing: installing it" >&2
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-yaml >/dev/null 2>&1 || true
    fi
    "$py" -c 'import yaml' 2>/dev/null || "$py" -m pip install -q pyyaml
fi

"$py" - "$here" "$root/config.example.yaml" <<'EOF'
import glob, os, sys
import yaml

here, example_path = sys.argv[1], sys.argv[2]
problems = []
def problem(msg):
    problems.append(msg)
    print("FAIL:", msg, file=sys.stderr)

docs = {}
for path in sorted(glob.glob(os.path.join(here, "*.yaml"))):
    name = os.path.basename(path)
    try:
        loaded = [d for d in yaml.safe_load_all(open(path)) if d is not None]
    except yaml.YAMLError as e:
        problem(f"{name}: {e}")
        continue
    if not loaded:
        problem(f"{name}: no documents")
    for d in loaded:
        if not isinstance(d, dict) or not all(k in d for k in ("apiVersion", "kind", "metadata")) \
                or "name" not in (d.get("metadata") or {}):
            problem(f"{name}: document without apiVersion/kind/metadata.name")
            continue
        docs[d["kind"]] = d
    print(f"ok: {name} parses ({', '.join(d['kind'] for d in loaded if isinstance(d, dict))})")

for kind in ("ConfigMap", "DaemonSet", "Service", "ServiceMonitor"):
    if kind not in docs:
        problem(f"no {kind}")
if problems:
    sys.exit(1)

# --- the agent configuration ---------------------------------------------------------------
cm = docs["ConfigMap"]
config = yaml.safe_load(cm["data"]["config.yaml"])
def unknown_fields(value, reference, prefix=""):
    if not isinstance(value, dict) or not isinstance(reference, dict):
        return []
    out = []
    for k, v in value.items():
        if k not in reference:
            out.append(prefix + k)
        # labels and basic_auth_users are free-form maps
        elif prefix + k not in ("discovery.docker.labels", "http.basic_auth_users"):
            out += unknown_fields(v, reference[k], prefix + k + ".")
    return out
if os.path.exists(example_path):
    example = yaml.safe_load(open(example_path))
    for f in unknown_fields(config, example):
        problem(f"configmap.yaml: config.yaml field {f} is not in config.example.yaml")
else:
    print(f"note: {example_path} missing, config fields not checked")
http_cfg = config.get("http", {})
if http_cfg.get("listen") != "0.0.0.0:9464":
    problem("configmap.yaml: http.listen must be 0.0.0.0:9464")
tls_cfg = http_cfg.get("tls") or {}
tls_on = bool(tls_cfg.get("cert_file"))
mutual = bool(tls_cfg.get("client_ca_file"))
auth_on = bool(http_cfg.get("basic_auth_users")) or bool(http_cfg.get("bearer_token_file"))
if not tls_on or not (auth_on or mutual):
    problem("configmap.yaml: an agent on 0.0.0.0 must have http.tls and http.basic_auth_users "
            "(or a bearer token or client certificates)")

# --- DaemonSet -----------------------------------------------------------------------------
ds = docs["DaemonSet"]
pod = ds["spec"]["template"]["spec"]
pod_labels = ds["spec"]["template"]["metadata"]["labels"]
sel = ds["spec"]["selector"]["matchLabels"]
if any(pod_labels.get(k) != v for k, v in sel.items()):
    problem("daemonset.yaml: selector does not match the pod labels")
if not pod.get("hostPID"):
    problem("daemonset.yaml: hostPID must be true")
(c,) = [c for c in pod["containers"] if c["name"] == "apisix-agent"]
if not c.get("securityContext", {}).get("privileged"):
    problem("daemonset.yaml: container must be privileged")
ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
if ports.get("http-metrics") != 9464:
    problem("daemonset.yaml: port http-metrics must be 9464")
for probe in ("livenessProbe", "readinessProbe"):
    p = c.get(probe, {})
    if mutual:
        # The kubelet has no client certificate.
        if p.get("tcpSocket", {}).get("port") not in ("http-metrics", 9464):
            problem(f"daemonset.yaml: with client certificates {probe} must be tcpSocket on http-metrics")
        continue
    g = p.get("httpGet", {})
    if g.get("path") != "/healthz" or g.get("port") not in ("http-metrics", 9464):
        problem(f"daemonset.yaml: {probe} must GET /healthz on http-metrics")
    if g.get("scheme", "HTTP") != ("HTTPS" if tls_on else "HTTP"):
        problem(f"daemonset.yaml: {probe} scheme must be {'HTTPS' if tls_on else 'HTTP'} (http.tls)")
    if auth_on and http_cfg.get("healthz_without_auth") is False:
        problem(f"daemonset.yaml: {probe} has no credentials but http.healthz_without_auth is false")
res = c.get("resources", {})
for k in ("requests", "limits"):
    if "memory" not in res.get(k, {}):
        problem(f"daemonset.yaml: resources.{k}.memory missing")
vols = {v["name"]: v for v in pod.get("volumes", [])}
mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
args = c.get("command", []) + c.get("args", [])
cfg_path = args[args.index("--config") + 1] if "--config" in args else None
if not cfg_path:
    problem("daemonset.yaml: no --config argument")
else:
    m = mounts.get(os.path.dirname(cfg_path))
    if not m or vols.get(m["name"], {}).get("configMap", {}).get("name") != cm["metadata"]["name"]:
        problem(f"daemonset.yaml: ConfigMap {cm['metadata']['name']} not mounted at {os.path.dirname(cfg_path)}")
def host_path_for(container_path):
    # the hostPath volume whose mount contains container_path, mapped to the host path
    best = None
    for mp, m in mounts.items():
        hp = vols.get(m["name"], {}).get("hostPath")
        if hp and (container_path == mp or container_path.startswith(mp.rstrip("/") + "/")):
            if best is None or len(mp) > len(best[0]):
                best = (mp, hp["path"] + container_path[len(mp):])
    return best and best[1]
for want in ("/sys/kernel/debug", "/sys/fs/bpf"):
    if host_path_for(want) != want:
        problem(f"daemonset.yaml: host {want} not mounted at {want}")
for field in ("cert_file", "key_file", "client_ca_file"):
    f = tls_cfg.get(field)
    if not f:
        continue
    m = mounts.get(os.path.dirname(f))
    if not m or "secret" not in vols.get(m["name"], {}):
        problem(f"daemonset.yaml: http.tls.{field} {f}: its directory is not a mounted Secret")
    elif m.get("subPath"):
        problem(f"daemonset.yaml: the Secret of http.tls.{field} is mounted with subPath (no updates)")
sock = config.get("discovery", {}).get("docker", {}).get("socket", "/var/run/docker.sock")
hp = host_path_for(sock)
if hp not in ("/run/docker.sock", "/var/run/docker.sock"):
    problem(f"daemonset.yaml: docker socket {sock} (config) is not the host's docker.sock (got {hp})")

# Profile scraping (deploy/profiling/config.alloy): the annotated port exists.
ann = ds["spec"]["template"]["metadata"].get("annotations", {})
if ann.get("profiles.grafana.com/cpu.scrape") != "true":
    problem("daemonset.yaml: annotation profiles.grafana.com/cpu.scrape must be \"true\"")
if ann.get("profiles.grafana.com/cpu.port_name") not in ports:
    problem("daemonset.yaml: profiles.grafana.com/cpu.port_name names no container port")
for go_only in ("memory", "goroutine", "block", "mutex"):
    if ann.get(f"profiles.grafana.com/{go_only}.scrape") != "false":
        problem(f"daemonset.yaml: profiles.grafana.com/{go_only}.scrape must be \"false\"")

# --- Service / ServiceMonitor --------------------------------------------------------------
svc = docs["Service"]
if svc["spec"].get("clusterIP") != "None":
    problem("service.yaml: must be headless (clusterIP: None)")
if any(pod_labels.get(k) != v for k, v in svc["spec"]["selector"].items()):
    problem("service.yaml: selector does not match the pod labels")
svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
if "http-metrics" not in svc_ports:
    problem("service.yaml: no port http-metrics")
sm = docs["ServiceMonitor"]
if sm["apiVersion"] != "monitoring.coreos.com/v1":
    problem("servicemonitor.yaml: apiVersion must be monitoring.coreos.com/v1")
svc_labels = svc["metadata"].get("labels", {})
if any(svc_labels.get(k) != v for k, v in sm["spec"]["selector"]["matchLabels"].items()):
    problem("servicemonitor.yaml: selector does not match the Service labels")
for ep in sm["spec"]["endpoints"]:
    if ep.get("port") not in svc_ports:
        problem(f"servicemonitor.yaml: endpoint port {ep.get('port')} not in the Service")
    if ep.get("path", "/metrics") != "/metrics":
        problem("servicemonitor.yaml: path must be /metrics")
    if ep.get("scheme", "http") != ("https" if tls_on else "http"):
        problem(f"servicemonitor.yaml: scheme must be {'https' if tls_on else 'http'} (http.tls)")
    if tls_on and not ep.get("tlsConfig", {}).get("ca"):
        problem("servicemonitor.yaml: tlsConfig.ca missing (the agents' CA)")
    if mutual and not (ep.get("tlsConfig", {}).get("cert") and ep.get("tlsConfig", {}).get("keySecret")):
        problem("servicemonitor.yaml: tlsConfig.cert and keySecret needed (http.tls.client_ca_file)")
    if http_cfg.get("basic_auth_users"):
        ba = ep.get("basicAuth", {})
        if not (ba.get("username") and ba.get("password")):
            problem("servicemonitor.yaml: basicAuth username and password needed (http.basic_auth_users)")

if problems:
    sys.exit(1)
print("ok: consistency checks")
EOF

# The agent's own parser, when a binary is at hand (target/release or PATH).
agent="${AGENT_BIN:-$root/target/release/apisix-agent}"
[ -x "$agent" ] || agent="$(command -v apisix-agent || true)"
if [ -n "$agent" ]; then
    cfg="$(mktemp)"
    python3 -c 'import sys, yaml; sys.stdout.write(yaml.safe_load(open(sys.argv[1]))["data"]["config.yaml"])' \
        "$here/configmap.yaml" >"$cfg"
    if "$agent" check-config "$cfg" >/dev/null; then
        echo "ok: $agent check-config accepts the ConfigMap's config.yaml"
    else
        rm -f "$cfg"
        echo "FAIL: apisix-agent check-config rejects the ConfigMap's config.yaml" >&2
        exit 1
    fi
    rm -f "$cfg"
else
    echo "note: no apisix-agent binary (target/release or PATH): check-config skipped"
fi

if [ "${SCHEMA:-0}" = 1 ]; then
    venv="${KV_VENV:-/tmp/apisix-agent-kubernetes-validate}"
    if [ ! -x "$venv/bin/kubernetes-validate" ]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q kubernetes-validate
    fi
    # ServiceMonitor is a CRD: kubernetes-validate has no schema for it and only warns.
    "$venv/bin/kubernetes-validate" --strict "$here"/*.yaml
    echo "ok: Kubernetes API schemas (strict)"
fi
echo "validate: OK"
