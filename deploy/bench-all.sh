#!/usr/bin/env bash
# Runs every shape of BENCH.md (B1-B8, B6 at 5k and 20k msgs/s, B7 on 3 partitions and with a quarter of
# its window, B7 and B2 with batching producers, and B10) RUNS times (default 3), each shape on a fresh
# local 3-node cluster of release brokers, and writes the ranges to docs/BENCHMARKS.md.
#   deploy/bench-all.sh              # about 30 minutes
#   RUNS=1 SHAPES="B1 B2" deploy/bench-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/prereqs.sh
cargo build --release --locked --bins
bin="$CARGO_TARGET_DIR/release"
mport=19651
export FLOTILLA_BOOTSTRAP=127.0.0.1:19601,127.0.0.1:19602,127.0.0.1:19603
dev=""
data=""

# Each shape gets a cluster of its own: on one cluster for all of them, a shape ran beside the flushes,
# compactions and blob garbage collection of the gigabytes the shapes before it wrote (B2 with a
# batching producer, after B7's: 74-84 MB/s; on a fresh cluster in the same sitting: 107-111 MB/s).
start_cluster() {
  data=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-bench.XXXXXX")
  "$bin/flotilla" dev --nodes 3 --data-dir "$data" --base-port 19601 --metrics-base-port "$mport" >"$data/dev.out" 2>&1 &
  dev=$!
  local ready=""
  for _ in $(seq 150); do
    if "$bin/flotilla" cluster status >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.2
  done
  [ -n "$ready" ] || { echo "the cluster did not come up; see $data" >&2; cat "$data/dev.out" >&2; exit 1; }
}

stop_cluster() {
  if [ -n "$dev" ]; then kill -TERM "$dev" 2>/dev/null || true; wait "$dev" 2>/dev/null || true; fi
  if [ -n "$data" ]; then rm -rf "$data"; fi
  dev=""
  data=""
}
trap stop_cluster EXIT

# From the brokers' metrics, summed over the three: the brokers' own side of a latency tail, fsyncs over
# 20 ms (storage) and produce requests answered after more than 50 ms (anything at the leader); and how
# much each Raft entry and each fsync carried, since per-entry costs set the one-record-per-request
# shapes' CPU: records per entry (every entry is appended by all three replicas) and appends (one
# group's entries at one node) per group-commit fsync.
broker_counts() {
  if ! command -v curl >/dev/null; then echo "- - - -"; return; fi
  for i in 0 1 2; do curl -s "http://127.0.0.1:$((mport + i))/metrics" || true; done | awk '
    /^flotilla_storage_fsync_latency_seconds_bucket\{le="0.02"\}/ { fast_syncs += $2 }
    /^flotilla_storage_fsync_latency_seconds_count/ { syncs += $2 }
    /^flotilla_produce_latency_seconds_bucket\{.*le="0.05"\}/ { fast_produces += $2 }
    /^flotilla_produce_latency_seconds_count/ { produces += $2 }
    /^flotilla_produce_records_total[ {]/ { records += $NF }
    /^flotilla_storage_fsync_entries_total[ {]/ { entries += $NF }
    /^flotilla_storage_fsync_jobs_total[ {]/ { jobs += $NF }
    /^flotilla_storage_fsyncs_total[ {]/ { fsyncs += $NF }
    END {
      per_entry = entries > 0 ? sprintf("%.1f", 3 * records / entries) : "-"
      per_fsync = fsyncs > 0 ? sprintf("%.2f", jobs / fsyncs) : "-"
      printf "%d %d %s %s\n", syncs - fast_syncs, produces - fast_produces, per_entry, per_fsync
    }'
}

rows=()
tails=()
for id in ${SHAPES:-B1 B2 B3 B4 B5 B6-5k B6 B6-20k B7-3 B7 B7-64 B7-batch B2-batch B8 B10}; do
  echo "== $id" >&2
  if [ "$id" = B10 ]; then
    # B10 starts (and kills) a private cluster of its own, under this directory.
    data=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-bench.XXXXXX")
  else
    start_cluster
  fi
  out=$("$bin/flotilla" bench scenario "$id" --runs "${RUNS:-3}" --dev-data-dir "$data")
  echo "$out" >&2
  rows+=("$(echo "$out" | tail -n 1)")
  read -r slow_syncs slow_produces per_entry per_fsync < <(if [ "$id" = B10 ]; then echo "- - - -"; else broker_counts; fi)
  tails+=("| $id | $slow_syncs | $slow_produces | $per_entry | $per_fsync |")
  stop_cluster
done

{
  echo "# Flotilla benchmarks"
  echo
  echo "Written by \`deploy/bench-all.sh\` on $(date -u +%Y-%m-%d) at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown):"
  echo "$(nproc) cores, 3 release brokers on 127.0.0.1 started by \`flotilla dev\`, replication factor 3, fsync"
  echo "before every acknowledgement, 1024-byte values (half random bytes, as OpenMessaging Benchmark's"
  echo "randomBytesRatio 0.5 makes them), load generator on the same machine, ${RUNS:-3} runs of"
  echo "15 s (after 2 s of warm-up) per shape, each shape on a fresh cluster (its runs on fresh topics); each"
  echo "cell is the range over the runs. Shapes and targets: ../shared/BENCH.md section 6. Broker CPU is summed"
  echo "over the three brokers per acknowledged message, over the measured 15 s only; peak RSS is the largest"
  echo "broker's. B8's figures are the read. B10 runs on a private 3-node cluster it starts itself (so it may"
  echo "kill its leader), hence no broker CPU or RSS there."
  echo "B9 needs consumer groups, which are not built yet."
  echo
  echo "| id | shape | msgs/s | MB/s | p50 ms | p99 ms | p99.9 ms | errors | broker CPU us/msg | broker peak RSS MB |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "From the brokers' metrics, over all runs of each shape (warm-up included; B10's cluster is its own):"
  echo "their side of the tail, fsyncs that took over 20 ms and produce requests answered after more than"
  echo "50 ms; and what each Raft entry and each group-commit fsync carried, records per entry (the produced"
  echo "records over the entries each replica appended; B8 counts its fill) and appends (one partition's"
  echo "entries at one node) per fsync. Per-entry costs set the CPU of the one-record-per-request shapes."
  echo
  echo "| id | fsyncs > 20 ms | produce requests > 50 ms | records per Raft entry | appends per fsync |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${tails[@]}"
} >docs/BENCHMARKS.md
echo "wrote docs/BENCHMARKS.md" >&2
