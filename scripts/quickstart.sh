#!/usr/bin/env bash
# One command from a fresh Debian machine to a flame graph: installs every dependency
# (scripts/setup.sh), builds apisix-agent, and profiles a local OpenResty / nginx-lua worker
# for 10 seconds into ./flamegraph.svg. Without one running, it starts the demo workload of
# examples/demo on 127.0.0.1 under a bounded local load, and stops it afterwards.
# Environment: PID=<worker pid> to choose the target, DURATION=<seconds>, OUT=<file>.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if [ "$(id -u)" -ne 0 ]; then
    echo "profiling needs root (BPF and perf events): sudo $0" >&2
    exit 1
fi
./scripts/setup.sh
echo "==> cargo build --release" >&2
cargo build --release
AGENT=target/release/apisix-agent
DURATION="${DURATION:-10}"
OUT="${OUT:-flamegraph.svg}"

pid="${PID:-}"
if [ -z "$pid" ]; then
    for p in $(pgrep -f 'nginx: worker process|openresty' || true); do
        if grep -q luajit "/proc/$p/maps" 2>/dev/null; then pid="$p"; break; fi
    done
fi
demo=""
cleanup() {
    [ -n "$demo" ] && [ -f "$demo/logs/nginx.pid" ] && kill "$(cat "$demo/logs/nginx.pid")" 2>/dev/null || true
    [ -n "$demo" ] && rm -rf "$demo"
}
trap cleanup EXIT
if [ -z "$pid" ]; then
    demo="$(mktemp -d)"
    chmod 755 "$demo"  # the workers run unprivileged and read the Lua files
    port=18090
    mkdir -p "$demo/logs" "$demo/tmp"
    cp -r examples/demo/lua "$demo/lua"
    sed -e "s#@PREFIX@#$demo#g" -e "s#@PORT@#$port#g" examples/demo/nginx.conf.in > "$demo/nginx.conf"
    echo "==> no nginx-lua worker running: starting the demo on 127.0.0.1:$port" >&2
    nginx -p "$demo" -c "$demo/nginx.conf"
    for _ in $(seq 50); do [ -f "$demo/logs/nginx.pid" ] && break; sleep 0.1; done
    master="$(cat "$demo/logs/nginx.pid")"
    for _ in $(seq 50); do
        pid="$(cat "/proc/$master/task/$master/children" 2>/dev/null | awk '{print $1}')"
        [ -n "$pid" ] && break
        sleep 0.1
    done
    # Bounded loopback load for the recording window.
    wrk -t1 -c4 -d"$((DURATION + 2))s" "http://127.0.0.1:$port/api/v3/svc17/items" >/dev/null 2>&1 &
fi
echo "==> recording pid $pid for ${DURATION}s" >&2
"$AGENT" record --pid "$pid" --duration "$DURATION" --output "$OUT"
wait || true
echo "==> flame graph written to $OUT" >&2
