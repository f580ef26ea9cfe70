#!/usr/bin/env bash
# Installs what only the test suite needs, on top of scripts/setup.sh, idempotently: a real
# Prometheus + promtool, headless Chromium, systemd-analyze, capsh, python3 (bench), bpftool
# (the kernel's BPF link listing, for the allocator probes' detach checks), Go (its `go tool
# pprof` reads the daemon's pprof endpoints), openssl (certificates for the network tests),
# and the non-GC64 LuaJIT the Lua tests run against. (Docker and debootstrap for the
# container tests are installed by scripts/docker-up.sh and scripts/test-image.sh.)
# Installed without recommends and without starting their services: the tests start their
# own instances on loopback.
set -euo pipefail

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-test.sh installs packages and must run as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
export PATH="$HOME/.cargo/bin:$PATH"

apt_ensure --quiet-services prometheus chromium systemd libcap2-bin python3 bpftool golang-go \
    openssl

log "non-GC64 LuaJIT for the tests"
"$(dirname "$0")/build-luajit-nogc64.sh" >/dev/null
log "test setup done"
