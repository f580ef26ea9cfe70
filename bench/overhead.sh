#!/usr/bin/env bash
# Overhead benchmark of apisix-agent on a real nginx-lua workload: throughput/p99 with the
# daemon on vs off (19 and 99 Hz), BPF cost per sample (shallow vs 100-frame Lua stacks),
# the agent's CPU and peak RSS, and SVG render time of 100 000 samples. Rewrites sections 1-4 of
# BENCHMARKS.md and keeps the rest.
#
#   sudo ./bench/overhead.sh            # full run, ~11 minutes
#   sudo ./bench/overhead.sh --quick    # smoke run, ~2 minutes (figures indicative only)
#
# Other options are passed to bench/overhead.py (--pairs N, --duration S, --workers N,
# --rss-workers N, --nice N, --output FILE, --strict; --no-build/--build here); see
# `python3 bench/overhead.py --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${HOME:-/root}/.cargo/bin:/usr/sbin:/sbin:$PATH"

say() { echo "[overhead.sh] $*" >&2; }
die() { say "error: $*"; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    die "needs root (BPF, perf events, kernel.bpf_stats_enabled): sudo $0 $*"
fi

build=auto
args=()
for a in "$@"; do
    case "$a" in
        --no-build) build=no ;;
        --build) build=yes ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) args+=("$a") ;;
    esac
done

missing=()
for tool in wrk python3 sysctl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -x /usr/sbin/nginx ] || missing+=("nginx (/usr/sbin/nginx)")
[ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] || missing+=("libnginx-mod-http-lua")
[ -f /usr/lib/nginx/modules/ndk_http_module.so ] || missing+=("libnginx-mod-http-ndk")
[ -e /proc/sys/kernel/bpf_stats_enabled ] || missing+=("kernel.bpf_stats_enabled sysctl")
if [ "${#missing[@]}" -gt 0 ]; then
    die "missing: ${missing[*]} (apt-get install nginx libnginx-mod-http-lua wrk python3; or ./scripts/setup.sh)"
fi

agent=target/release/apisix-agent
if [ "$build" = yes ] || { [ "$build" = auto ] && {
    [ ! -x "$agent" ] ||
    [ -n "$(find apisix-agent apisix-ebpf apisix-ebpf-common Cargo.toml Cargo.lock -newer "$agent" -type f 2>/dev/null | head -1)" ]; }; }; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found (run ./scripts/setup.sh)"
    say "cargo build --release"
    cargo build --release >&2
fi
[ -x "$agent" ] || die "$agent missing after the build"

work="$(mktemp -d /tmp/apisix-overhead.XXXXXX)"
chmod 755 "$work"   # nginx workers (unprivileged) read their Lua files below it
# A private copy of the binary: a concurrent cargo build cannot swap it mid-run.
cp "$agent" "$work/apisix-agent"
: > "$work/pids"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # Processes started by the run, by pid, only while they still are what we started.
    if [ -f "$work/pids" ]; then
        while read -r pid comm; do
            [ -n "$pid" ] || continue
            if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]; then
                kill -TERM "$pid" 2>/dev/null || true
            fi
        done < "$work/pids"
        sleep 0.5
        while read -r pid comm; do
            [ -n "$pid" ] || continue
            if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]; then
                kill -KILL "$pid" 2>/dev/null || true
            fi
        done < "$work/pids"
    fi
    if [ -f "$work/bpf_stats_orig" ]; then
        sysctl -q -w "kernel.bpf_stats_enabled=$(cat "$work/bpf_stats_orig")" >/dev/null || true
    fi
    if [ "$rc" -ne 0 ] && [ -n "${KEEP_WORKDIR:-}" ]; then
        say "kept $work"
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
py=""
stop_py() {
    # The helper runs in its own session (own scheduler autogroup), so a terminal's ^C does not
    # reach it: pass the signal on and let it stop what it started.
    if [ -n "$py" ] && kill -0 "$py" 2>/dev/null; then
        kill -TERM "$py" 2>/dev/null || true
        wait "$py" 2>/dev/null || true
    fi
    exit "$1"
}
trap cleanup EXIT
trap 'stop_py 130' INT
trap 'stop_py 143' TERM

say "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs; work dir $work"
python3 bench/overhead.py --workdir "$work" --agent "$work/apisix-agent" ${args[@]+"${args[@]}"} &
py=$!
wait "$py"
