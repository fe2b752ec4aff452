#!/usr/bin/env bash
# End-to-end test of the docker-compose deployment: build the image, start the 3-node stack, produce and
# consume through it from the host, restart one container, check the data, tear everything down.
# Skips (and says so) when no Docker engine or compose tool is available.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
  echo "compose test: SKIPPED (no Docker engine reachable)"
  exit 0
fi
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose=(docker-compose)
else
  echo "compose test: SKIPPED (neither 'docker compose' nor docker-compose is installed)"
  exit 0
fi

source deploy/prereqs.sh
fail() { echo "compose test: FAILED: $*" >&2; exit 1; }
# The debug build the tests already made: no release build of RocksDB just for this test.
FLOTILLA_IMAGE_PROFILE=dev deploy/build-image.sh >/dev/null 2>&1 || fail "image build"
project="flotilla-test-$$"
dc() { "${compose[@]}" -f deploy/docker-compose.yml -p "$project" "$@"; }
trap 'dc down -v >/dev/null 2>&1 || true' EXIT
flotilla() { "$CARGO_TARGET_DIR/debug/flotilla" --bootstrap 127.0.0.1:19401,127.0.0.1:19402,127.0.0.1:19403 "$@"; }
fail() { echo "compose test: FAILED: $*" >&2; dc ps >&2 || true; dc logs --tail 30 >&2 || true; exit 1; }

wait_healthy() {
  for _ in $(seq 1 90); do
    [ "$(dc ps | grep -c '(healthy)')" = 3 ] && return 0
    sleep 1
  done
  fail "the nodes did not all become healthy"
}

# Healthy means serving; the controller elects its leader after. Capture, then match: `| grep -q` would
# close the pipe on the first match while the CLI still writes.
wait_controller_leader() {
  local status=""
  for _ in $(seq 1 60); do
    status=$(flotilla cluster status 2>&1 || true)
    [[ "$status" =~ "controller leader: "[1-3] ]] && return 0
    sleep 1
  done
  fail "no controller leader: $status"
}

dc up -d >/dev/null 2>&1 || fail "docker compose up"
wait_healthy
wait_controller_leader
flotilla topic create compose --partitions 3 --replication-factor 3 >/dev/null || fail "topic create"
printf 'one\ntwo\nthree\n' | flotilla produce compose --partition 1 >/dev/null || fail "produce"
[ "$(flotilla consume compose --partition 1 --max 3 | cut -f5 | paste -sd,)" = "one,two,three" ] || fail "consume"
dc restart node2 >/dev/null 2>&1 || fail "restart"
wait_healthy
[ "$(flotilla consume compose --partition 1 --max 3 | cut -f5 | paste -sd,)" = "one,two,three" ] || fail "data after a restart"

# Metrics are published on 127.0.0.1:19501-19503; a real Prometheus (Debian's package), where installed,
# scrapes them with deploy/prometheus.yml.
if command -v curl >/dev/null; then
  metrics=$(curl -fsS http://127.0.0.1:19501/metrics) || fail "metrics endpoint unreachable"
  grep -q '^flotilla_storage_fsyncs_total' <<<"$metrics" || fail "metrics endpoint has no flotilla_storage_fsyncs_total"
fi
if command -v prometheus >/dev/null && command -v curl >/dev/null; then
  promtool check config deploy/prometheus.yml >/dev/null || fail "prometheus config"
  tsdb=$(mktemp -d)
  prometheus --config.file=deploy/prometheus.yml --storage.tsdb.path="$tsdb" \
    --web.listen-address=127.0.0.1:19090 >"$tsdb/prometheus.log" 2>&1 &
  prom=$!
  trap 'kill "$prom" 2>/dev/null; wait "$prom" 2>/dev/null; rm -rf "$tsdb"; dc down -v >/dev/null 2>&1 || true' EXIT
  scraped=""
  for _ in $(seq 1 60); do
    up=$(curl -fsS 'http://127.0.0.1:19090/api/v1/query?query=sum(up%7Bcluster%3D%22compose-3%22%7D)' 2>/dev/null || true)
    if echo "$up" | grep -q '"value":\[[0-9.]*,"3"\]'; then scraped=1; break; fi
    sleep 1
  done
  [ -n "$scraped" ] || fail "Prometheus did not scrape all three nodes: $up"
  echo "compose test: Prometheus scrapes all three nodes"
else
  echo "compose test: Prometheus scrape check skipped (prometheus or curl not installed)"
fi
echo "compose test: 1 passed, 0 failed"
