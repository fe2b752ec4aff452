#!/usr/bin/env bash
# The failover sweep: every scenario against the docker-compose stack, one after another, each report kept,
# then one Markdown table of them all. The image is built first: debug brokers (the build the tests made),
# except for S19, whose 1,002 partitions need release brokers on two cores; it runs last, on a release image.
#   deploy/sweep.sh                                   # S1-S9, S14, S16-S20, 300 s each: about 95 minutes
#   DURATION=60s SCENARIOS="S1 S6" deploy/sweep.sh    # a subset, shorter
# Reports and the table go to OUT (default: a fresh directory under /tmp). Exit status: non-zero if any
# run failed.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/prereqs.sh
scenarios="${SCENARIOS:-S1 S2 S3 S4 S5 S6 S7 S8 S9 S14 S16 S17 S18 S20 S19}"
duration="${DURATION:-300s}"
seed="${SEED:-20261203}"
out="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/flotilla-sweep.XXXXXX")}"
mkdir -p "$out"
# The harness the tests built (and the broker it finds beside it), copied: a rebuild while the sweep
# runs does not change them mid-sweep.
cargo test --workspace --locked --no-run >&2
cp "$CARGO_TARGET_DIR/debug/flotilla-harness" "$CARGO_TARGET_DIR/debug/flotilla-broker" "$out/"
harness="$out/flotilla-harness"

image=""
reports=()
failed=0
for s in $scenarios; do
  want=dev
  [ "$s" = S19 ] && want=release
  if [ "$image" != "$want" ]; then
    FLOTILLA_IMAGE_PROFILE="$want" deploy/build-image.sh >&2
    image="$want"
  fi
  echo "== $s ($duration, seed $seed, $want image)" >&2
  if "$harness" run --scenario "$s" --target compose --nodes 3 --duration "$duration" --seed "$seed" \
    --report "$out/$s.json" >"$out/$s.log" 2>&1; then
    echo "   PASS" >&2
  else
    failed=1
    echo "   FAIL (see $out/$s.log)" >&2
  fi
  [ -f "$out/$s.json" ] && reports+=("$out/$s.json")
done
if [ "${#reports[@]}" -gt 0 ]; then
  "$harness" table "${reports[@]}" | tee "$out/table.md" || true
fi
echo "reports, logs and table.md: $out" >&2
exit "$failed"
