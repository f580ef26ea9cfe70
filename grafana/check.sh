#!/usr/bin/env bash
# Checks that every PromQL expression of the Grafana dashboard parses and evaluates without
# error, on a throwaway Prometheus with an empty configuration on loopback; exits non-zero on
# any failure. Needs Debian's `prometheus` package (installed if missing and root).
#
#   grafana/check.sh
#
# Every panel expression (grafana/exprs.py, variables substituted) is evaluated with
# --allow-empty: there is no data, so only errors count. That every expression and every
# recording rule of deploy/prometheus/rules.yml returns data from the real agent is checked by
# the root test `prometheus_scrapes_the_agent` (apisix-agent/tests/observe.rs: real nginx-lua
# workload, real agent, real Prometheus). Against a running agent's Prometheus:
#   grafana/exprs.py --prometheus http://127.0.0.1:9090
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
PROM_ADDR="${PROM_ADDR:-127.0.0.1:19090}"

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
cleanup() {
    if [ -n "$prom_pid" ]; then
        kill "$prom_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$prom_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$prom_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

if curl -fsS -o /dev/null "http://$PROM_ADDR/-/ready" 2>/dev/null; then
    echo "FAIL: something already serves $PROM_ADDR (set PROM_ADDR=)" >&2
    exit 1
fi
printf 'global:\n  scrape_interval: 15s\n' >"$tmp/empty.yml"
prometheus --config.file="$tmp/empty.yml" --storage.tsdb.path="$tmp/data" \
    --web.listen-address="$PROM_ADDR" --log.level=warn >"$tmp/prometheus.log" 2>&1 &
prom_pid=$!
ready=0
for _ in $(seq 100); do
    if curl -fsS "http://$PROM_ADDR/-/ready" >/dev/null 2>&1; then ready=1; break; fi
    kill -0 "$prom_pid" 2>/dev/null || break
    sleep 0.2
done
if [ "$ready" -ne 1 ]; then
    echo "FAIL: prometheus did not start on $PROM_ADDR:" >&2
    cat "$tmp/prometheus.log" >&2
    exit 1
fi

echo "== parse check (empty Prometheus on $PROM_ADDR)"
if ! python3 "$here/exprs.py" --prometheus "http://$PROM_ADDR" --allow-empty; then
    echo "grafana check: FAILED" >&2
    exit 1
fi
echo "grafana check: OK"
