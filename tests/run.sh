#!/usr/bin/env bash
# Build vOS and run its test suite (end-to-end tests start real programs in namespaces: run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --quiet
cargo test --release --workspace --quiet --no-fail-fast -- --test-threads=2
