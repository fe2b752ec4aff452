#!/usr/bin/env bash
# Starts a local Flotilla cluster in the foreground: installs what is missing, builds, then runs
# `flotilla dev` (3 brokers on 127.0.0.1:9401-9403, data in ./flotilla-data). Ctrl-C stops it; the data
# stays for the next start. Extra arguments go to `flotilla dev` (e.g. --nodes 5).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/prereqs.sh
cargo build --locked --bin flotilla --bin flotilla-broker
exec "$CARGO_TARGET_DIR/debug/flotilla" dev "$@"
