#!/usr/bin/env bash
# The long run of the property tests (apisix-agent/tests/properties.rs: label encoding, Lua
# chunk-name decoding, maps lines, ELF inspection): CI runs 256 cases of each, this runs
# CASES (default 50 000) and prints how long it took. Needs no root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
CASES="${CASES:-50000}"
started=$SECONDS
PROPTEST_CASES="$CASES" cargo test --release --test properties -- --test-threads=2
echo "properties: $CASES cases each, $((SECONDS - started)) s"
