#!/usr/bin/env bash
# Soak test of the apisix-agent daemon under churn, 10 minutes: continuous sampling of a
# 4-worker nginx-lua under loopback load, an nginx reload every 10 s, a container started and
# stopped every 20 s, an on-demand capture every 15 s, Prometheus scraping over HTTPS with
# basic auth every 5 s. Records the agent's RSS, fds, BPF map entries and targets; writes
# docs/soak.png and section 8 of BENCHMARKS.md (see bench/soak.py for the pass criteria).
#
#   sudo ./bench/soak.sh                   # ~11 minutes
#   sudo ./bench/soak.sh --duration 120    # a shorter run (the slope is then less telling)
#
# Needs what the tests need (scripts/setup.sh, scripts/setup-test.sh, a Docker daemon from
# scripts/docker-up.sh and the image of scripts/test-image.sh) plus, installed here when
# missing: Debian's python3-matplotlib and python3-yaml (the plot and the Prometheus config,
# run with /usr/bin/python3) and bpftool (BPF map entries). --no-build skips the release
# build; other options go to bench/soak.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${HOME:-/root}/.cargo/bin:/usr/sbin:/sbin:$PATH"

say() { echo "[soak.sh] $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (BPF, Docker): sudo $0 $*"

build=yes
args=()
for a in "$@"; do
    case "$a" in
        --no-build) build=no ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) args+=("$a") ;;
    esac
done

# The bench's own setup step: Debian packages only it needs.
py=/usr/bin/python3
need=()
"$py" -c 'import matplotlib' 2>/dev/null || need+=(python3-matplotlib)
"$py" -c 'import yaml' 2>/dev/null || need+=(python3-yaml)
command -v bpftool >/dev/null 2>&1 || need+=(bpftool)
if [ "${#need[@]}" -gt 0 ]; then
    say "apt-get install ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

missing=()
for tool in wrk docker prometheus openssl bpftool; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -x /usr/sbin/nginx ] || missing+=("nginx")
[ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] || missing+=("libnginx-mod-http-lua")
[ "${#missing[@]}" -eq 0 ] || die "missing: ${missing[*]} (scripts/setup.sh, scripts/setup-test.sh)"
docker info >/dev/null 2>&1 || die "no Docker daemon (scripts/docker-up.sh)"
[ -n "$(docker images -q apisix-profiler-test/nginx-lua:bookworm)" ] \
    || die "test image missing (scripts/test-image.sh)"

agent=target/release/apisix-agent
if [ "$build" = yes ]; then
    say "cargo build --release"
    cargo build --release >&2
fi
[ -x "$agent" ] || die "$agent missing"

work="$(mktemp -d /tmp/apisix-soak.XXXXXX)"
chmod 755 "$work"
# A private copy of the binary: a concurrent cargo build cannot swap it mid-run.
cp "$agent" "$work/apisix-agent"
cleanup() {
    local rc=$?
    if [ "$rc" -ne 0 ] || [ -n "${KEEP_WORKDIR:-}" ]; then say "kept $work"; else rm -rf "$work"; fi
    exit "$rc"
}
trap cleanup EXIT
say "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs; work dir $work"
"$py" bench/soak.py --workdir "$work" --agent "$work/apisix-agent" ${args[@]+"${args[@]}"}
