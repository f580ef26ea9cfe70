#!/usr/bin/env bash
# One command from a fresh Debian machine to a flame graph and a running daemon: installs
# what building and running needs (scripts/setup.sh; not the test tools), builds
# apisix-agent, starts the demo workload of examples/demo on 127.0.0.1 under a bounded local
# load and profiles its worker for 10 seconds into ./flamegraph.svg (PID= profiles another
# process instead, and no demo starts), then runs the daemon (`apisix-agent run`) on
# 127.0.0.1:9464 and prints the commands to try against it. A recording with no samples (an
# idle PID=) fails with a sentence saying so and how to pick another. Everything it started
# stops on Ctrl-C or after QUICKSTART_SECONDS.
# Environment: PID=<worker pid> to choose the target, DURATION=<seconds>, OUT=<file>,
# QUICKSTART_SECONDS=<seconds the daemon runs, default 120>.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if [ "$(id -u)" -ne 0 ]; then
    echo "profiling needs root (BPF and perf events): run it as root, or with sudo $0" >&2
    exit 1
fi
./scripts/setup.sh
echo "==> cargo build --release" >&2
cargo build --release
AGENT=target/release/apisix-agent
DURATION="${DURATION:-10}"
OUT="${OUT:-flamegraph.svg}"
QUICKSTART_SECONDS="${QUICKSTART_SECONDS:-120}"

pid="${PID:-}"
demo=""
daemon=""
load=""
cleanup() {
    if [ -n "$daemon" ]; then kill "$daemon" 2>/dev/null; wait "$daemon" 2>/dev/null; fi
    if [ -n "$load" ]; then kill "$load" 2>/dev/null; fi
    if [ -n "$demo" ]; then
        [ -f "$demo/logs/nginx.pid" ] && kill "$(cat "$demo/logs/nginx.pid")" 2>/dev/null
        rm -rf "$demo"
    fi
    return 0
}
trap cleanup EXIT
trap 'echo "==> stopping" >&2; exit 0' INT TERM
if [ -z "$pid" ]; then
    demo="$(mktemp -d)"
    chmod 755 "$demo"  # the workers run unprivileged and read the Lua files
    port=18090
    mkdir -p "$demo/logs" "$demo/tmp"
    cp -r examples/demo/lua "$demo/lua"
    sed -e "s#@PREFIX@#$demo#g" -e "s#@PORT@#$port#g" examples/demo/nginx.conf.in > "$demo/nginx.conf"
    echo "==> starting the demo workload on 127.0.0.1:$port (PID=<pid> profiles another process)" >&2
    nginx -p "$demo" -c "$demo/nginx.conf"
    for _ in $(seq 50); do [ -f "$demo/logs/nginx.pid" ] && break; sleep 0.1; done
    master="$(cat "$demo/logs/nginx.pid")"
    for _ in $(seq 50); do
        pid="$(cat "/proc/$master/task/$master/children" 2>/dev/null | awk '{print $1}')"
        [ -n "$pid" ] && break
        sleep 0.1
    done
    # Bounded loopback load for the recording and the daemon's window.
    wrk -t1 -c4 -d"$((DURATION + QUICKSTART_SECONDS + 5))s" \
        "http://127.0.0.1:$port/api/v3/svc17/items" >/dev/null 2>&1 &
    load=$!
fi
echo "==> recording pid $pid for ${DURATION}s" >&2
if ! "$AGENT" record --pid "$pid" --duration "$DURATION" --output "$OUT"; then
    if [ -n "${PID:-}" ]; then
        echo "==> no flame graph: pid $pid gave no samples. Run again with PID=<a busy worker> (the highest %CPU in 'ps -o pid,pcpu,args -C nginx'), or without PID= for the demo" >&2
    else
        echo "==> no flame graph: the demo worker $pid gave no samples (see the error above)" >&2
    fi
    exit 1
fi
echo "==> flame graph written to $OUT" >&2

echo "==> starting the daemon (apisix-agent run) on 127.0.0.1:9464" >&2
"$AGENT" run &
daemon=$!
for _ in $(seq 100); do
    curl -sf 127.0.0.1:9464/healthz >/dev/null 2>&1 && break
    kill -0 "$daemon" 2>/dev/null || { echo "the daemon did not start" >&2; exit 1; }
    sleep 0.2
done
cat >&2 <<EOF

The daemon profiles every nginx-lua worker it finds. Try, in another shell:

    curl -s 127.0.0.1:9464/metrics | grep lua_function
    curl -o fg.svg '127.0.0.1:9464/flamegraph?pid=$pid&seconds=5'
    curl -s 127.0.0.1:9464/targets

Everything this script started stops on Ctrl-C or after ${QUICKSTART_SECONDS}s.
EOF
sleep "$QUICKSTART_SECONDS" &
wait $! || true
