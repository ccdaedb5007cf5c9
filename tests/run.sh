#!/usr/bin/env bash
# Build vOS and run its test suite (end-to-end tests start real programs in namespaces: run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
# Policy first: the workspace lints (Cargo.toml) with every warning an error, and no module of a crate importing
# one that imports it back (ARCHITECTURE.md).
cargo clippy --release --workspace --all-targets --quiet -- -D warnings
for src in common/src shim/src launcher/src restore/src; do python3 tests/modcycles.py "$src"; done
cargo build --release --workspace --quiet
cargo test --release --workspace --quiet --no-fail-fast -- --test-threads=2
