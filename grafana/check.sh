#!/usr/bin/env bash
# Checks the dashboard's PromQL against a throwaway Prometheus on loopback; exits non-zero on
# any failure. Needs Debian's `prometheus` package (installed if missing and root).
#
#   grafana/check.sh
#
# 1. parse: Prometheus with an empty configuration on 127.0.0.1:19090; every panel
#    expression (grafana/exprs.py, variables substituted) must evaluate without error
#    (empty results are expected: --allow-empty).
# 2. data: grafana/fake_metrics.py serves synthetic agent metrics on 127.0.0.1:19464,
#    scraped every 5 s with deploy/prometheus/rules.yml loaded; after ~25 s every panel
#    expression must return at least one series, and so must every recording rule.
# Against a real agent: grafana/exprs.py --prometheus http://127.0.0.1:9090
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
PROM_ADDR="${PROM_ADDR:-127.0.0.1:19090}"
FAKE_ADDR="${FAKE_ADDR:-127.0.0.1:19464}"
WAIT_SECS="${WAIT_SECS:-25}"

if ! command -v prometheus >/dev/null; then
    [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null \
        || { echo "FAIL: prometheus not found (apt-get install prometheus)" >&2; exit 1; }
    before="$(pgrep -x prometheus || true)"
    echo "prometheus missing: apt-get install prometheus" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package enables a server on :9090; stop what it started (tests run their own).
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        systemctl stop prometheus.service 2>/dev/null || true
        systemctl disable prometheus.service 2>/dev/null || true
    else
        for pid in $(pgrep -x prometheus || true); do
            case " $before " in *" $pid "*) ;; *) kill "$pid" 2>/dev/null || true ;; esac
        done
    fi
fi

tmp="$(mktemp -d)"
prom_pid=""
fake_pid=""
stop() {
    local pid="$1"
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}
cleanup() {
    stop "$prom_pid"
    stop "$fake_pid"
    rm -rf "$tmp"
}
trap cleanup EXIT

start_prometheus() { # CONFIG
    if curl -fsS -o /dev/null "http://$PROM_ADDR/-/ready" 2>/dev/null; then
        echo "FAIL: something already serves $PROM_ADDR (set PROM_ADDR=)" >&2
        exit 1
    fi
    rm -rf "$tmp/data"
    prometheus --config.file="$1" --storage.tsdb.path="$tmp/data" \
        --web.listen-address="$PROM_ADDR" --log.level=warn >"$tmp/prometheus.log" 2>&1 &
    prom_pid=$!
    for _ in $(seq 100); do
        if curl -fsS "http://$PROM_ADDR/-/ready" >/dev/null 2>&1; then return 0; fi
        kill -0 "$prom_pid" 2>/dev/null || break
        sleep 0.2
    done
    echo "FAIL: prometheus did not start on $PROM_ADDR:" >&2
    cat "$tmp/prometheus.log" >&2
    exit 1
}

fail=0

# --- 1. the expressions parse --------------------------------------------------------------
printf 'global:\n  scrape_interval: 15s\n' >"$tmp/empty.yml"
start_prometheus "$tmp/empty.yml"
echo "== parse check (empty Prometheus on $PROM_ADDR)"
python3 "$here/exprs.py" --prometheus "http://$PROM_ADDR" --allow-empty || fail=1
stop "$prom_pid"
prom_pid=""

# --- 2. the expressions return data --------------------------------------------------------
if curl -fsS -o /dev/null "http://$FAKE_ADDR/metrics" 2>/dev/null; then
    echo "FAIL: something already serves $FAKE_ADDR (set FAKE_ADDR=)" >&2
    exit 1
fi
python3 "$here/fake_metrics.py" --listen "$FAKE_ADDR" &
fake_pid=$!
for _ in $(seq 50); do
    curl -fsS -o /dev/null "http://$FAKE_ADDR/metrics" 2>/dev/null && break
    kill -0 "$fake_pid" 2>/dev/null || { echo "FAIL: fake_metrics.py did not start" >&2; exit 1; }
    sleep 0.1
done
cat >"$tmp/fake.yml" <<EOF
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files:
  - $root/deploy/prometheus/rules.yml
scrape_configs:
  - job_name: apisix-agent
    static_configs:
      - targets: ["$FAKE_ADDR"]
EOF
start_prometheus "$tmp/fake.yml"
echo "== data check (synthetic metrics from $FAKE_ADDR, waiting ${WAIT_SECS}s)"
sleep "$WAIT_SECS"
python3 "$here/exprs.py" --prometheus "http://$PROM_ADDR" || fail=1

echo "== recording rules of deploy/prometheus/rules.yml"
rules=0
missing=0
for r in $(sed -n 's/^ *- record: *//p' "$root/deploy/prometheus/rules.yml"); do
    rules=$((rules + 1))
    n="$(curl -fsS --data-urlencode "query=$r" "http://$PROM_ADDR/api/v1/query" \
        | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]["result"]))' || echo 0)"
    if [ "$n" -gt 0 ]; then
        echo "ok   $r: $n series"
    else
        echo "FAIL $r: no series"
        missing=$((missing + 1))
    fi
done
echo "$((rules - missing)) passed, $missing failed"
[ "$missing" -eq 0 ] || fail=1

if [ "$fail" -ne 0 ]; then
    echo "grafana check: FAILED" >&2
    exit 1
fi
echo "grafana check: OK"
