# Sourced by deploy/local-cluster.sh and .ci/run: installs what a build needs and picks the build cache.

# rocksdb's build runs bindgen, which needs libclang.
# (libclang-cpp alone, which other packages pull in, does not count.)
# The failover harness's clock faults (S8) preload libfaketime into the brokers.
missing=()
compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null || missing+=(libclang-dev)
compgen -G "/usr/lib/*/faketime/libfaketimeMT.so.1" >/dev/null || missing+=(libfaketime)
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install the Rust toolchain (https://rustup.rs) and run this again" >&2
  exit 1
fi

# RocksDB's C++ takes about 30 minutes to build on two cores: keep build artefacts outside the clone so
# every clone and every run reuses them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}"
