#!/usr/bin/env bash
# Builds the `flotilla` image with no registry: the host-built binaries plus the shared libraries and loader
# they link, on an empty (`FROM scratch`) root filesystem. Release binaries by default;
# FLOTILLA_IMAGE_PROFILE=dev uses the debug build the tests already made (no second RocksDB build).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/prereqs.sh
profile="${FLOTILLA_IMAGE_PROFILE:-release}"
case "$profile" in
  release) out=release ;;
  dev) out=debug ;;
  *) echo "FLOTILLA_IMAGE_PROFILE must be release or dev" >&2; exit 2 ;;
esac
if [ "$profile" = dev ]; then
  # The binaries `cargo test` builds (same features as the tests, so no second RocksDB build).
  cargo test --workspace --locked --no-run
else
  cargo build --profile "$profile" --locked --bin flotilla --bin flotilla-broker
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/local/bin" "$root/data"
cp "$CARGO_TARGET_DIR/$out/flotilla" "$CARGO_TARGET_DIR/$out/flotilla-broker" "$root/usr/local/bin/"
libs=$(for bin in "$root"/usr/local/bin/*; do ldd "$bin"; done | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp deploy/Dockerfile "$ctx/Dockerfile"
docker build -q -t flotilla:latest "$ctx"
