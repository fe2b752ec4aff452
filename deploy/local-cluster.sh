#!/usr/bin/env bash
# Starts a local Flotilla cluster in the foreground: installs what is missing, builds, then runs
# `flotilla dev` (3 brokers on 127.0.0.1:9401-9403, data in ./flotilla-data). Ctrl-C stops it; the data
# stays for the next start. Extra arguments go to `flotilla dev` (e.g. --nodes 5).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/prereqs.sh
# Build what the tests build (binaries included): Cargo unifies features over test targets too, so building
# only the binaries would compile RocksDB a second time when the tests run.
cargo test --workspace --locked --no-run
exec "$CARGO_TARGET_DIR/debug/flotilla" dev "$@"
