#!/usr/bin/env bash
# The whole test suite: installs what is missing (scripts/setup.sh for building and running,
# scripts/setup-test.sh for the test tools), starts a Docker daemon
# without bridge networking and builds the nginx-lua test image from Debian packages
# (scripts/docker-up.sh, scripts/test-image.sh), checks formatting and lints, then runs unit
# tests and the root tests that load the real BPF programs against real processes (a C
# program, nginx + ngx_lua on GC64 and non-GC64 LuaJIT, in containers too, a real
# Prometheus, headless Chromium), then the kernel matrix (scripts/kernel-matrix.sh: Debian's
# 5.10, 6.1 and 6.12 kernels under QEMU) and the check that two clean builds give the same
# BPF object (scripts/bpf-reproducible.sh).
# Must run as root: the tests load BPF programs and attach perf events.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if [ "$(id -u)" -ne 0 ]; then
    echo "the test suite loads BPF programs: run it as root (sudo $0)" >&2
    exit 1
fi
./scripts/setup.sh
./scripts/setup-test.sh
./scripts/docker-up.sh
./scripts/test-image.sh
echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy" >&2
cargo clippy --release --all-targets -- -D warnings
echo "==> cargo clippy (BPF programs)" >&2
# The BPF crate only builds for its own target, with a core library built from source.
# (apisix-ebpf/rust-toolchain.toml picks the pinned nightly.)
(cd apisix-ebpf && cargo clippy --target bpfel-unknown-none -Z build-std=core --release -- -D warnings)
echo "==> cargo test" >&2
# One test at a time: the root tests measure CPU shares on a small machine. The root tests
# are `#[ignore = "needs root"]` (a normal user's `cargo test` reports them ignored): run
# them too.
cargo test --release -- --include-ignored --test-threads=1
echo "==> kernel matrix (5.10, 6.1, 6.12 under QEMU)" >&2
./scripts/kernel-matrix.sh
echo "==> reproducible BPF object" >&2
./scripts/bpf-reproducible.sh
