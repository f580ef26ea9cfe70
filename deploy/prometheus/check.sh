#!/usr/bin/env bash
# Validates the Prometheus files with promtool; exits non-zero on any failure.
#
#   deploy/prometheus/check.sh
#
#   promtool check config prometheus.yml   (also loads and checks the rule_files it names)
#   promtool check config prometheus-tls.yml   (the HTTPS + basic auth variant)
#   promtool check rules  rules.yml
#   promtool test  rules  rules_test.yml   (unit tests of the recording rules and alerts)
#
# Installs Debian's `prometheus` package (2.42, which ships promtool) when promtool is
# missing and we are root. Installing it enables a prometheus.service on :9090; a server the
# install started is stopped again (tests run their own on loopback).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

install_prometheus() {
    [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null \
        || { echo "FAIL: promtool not found (apt-get install prometheus)" >&2; exit 1; }
    local before
    before="$(pgrep -x prometheus || true)"
    echo "promtool missing: apt-get install prometheus" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # Stop what the package started (systemd or sysv init), not servers that ran before.
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        for u in prometheus.service prometheus-node-exporter.service; do
            if systemctl is-active --quiet "$u" 2>/dev/null; then
                systemctl stop "$u" && systemctl disable "$u" 2>/dev/null || true
            fi
        done
    else
        for pid in $(pgrep -x prometheus || true); do
            case " $before " in *" $pid "*) ;; *) kill "$pid" 2>/dev/null || true ;; esac
        done
    fi
}

command -v promtool >/dev/null || install_prometheus
promtool --version 2>&1 | head -n1

fail=0
run() {
    echo "+ $*"
    if ! "$@"; then
        echo "FAIL: $*" >&2
        fail=1
    fi
}
run promtool check config prometheus.yml
run promtool check config prometheus-tls.yml
run promtool check rules rules.yml
run promtool test rules rules_test.yml

if [ "$fail" -ne 0 ]; then
    echo "check: FAILED" >&2
    exit 1
fi
echo "check: OK"
