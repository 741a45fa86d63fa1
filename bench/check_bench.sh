#!/usr/bin/env bash
# check: dmcow-img against qemu-img, same run, as a ratio.
#
# The image has 16,777,216 allocated clusters: a sparse 1 TiB qcow2 with
# 64 KiB clusters made by `qemu-img create -o preallocation=metadata`, which
# writes every L2 table (2048 of them, 128 MiB) and points every entry at a
# data cluster of the (sparse) file, refcounted 1. A second image adds one
# internal snapshot: every cluster then has refcount 2 and every L2 table is
# walked twice (once per L1 table). Each tool checks each image RUNS times,
# alternating; we report the median wall time and the median peak RSS.
# Page cache is warm for both (the metadata is read once before timing).
#
# Usage: bench/check_bench.sh [BUILD_DIR]   (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="${1:-build}"
DMCOW_IMG="$(realpath "$BUILD/cli/dmcow-img")"
RUNS="${RUNS:-5}"
WORK="${BENCH_WORK:-/tmp/dmcow-bench}"
mkdir -p "$WORK"

if [ ! -f "$WORK/meta1t.qcow2" ]; then
  qemu-img create -q -f qcow2 -o preallocation=metadata "$WORK/meta1t.qcow2" 1T
fi
if [ ! -f "$WORK/meta1t-snap.qcow2" ]; then
  cp --sparse=always "$WORK/meta1t.qcow2" "$WORK/meta1t-snap.qcow2"
  qemu-img snapshot -c s1 "$WORK/meta1t-snap.qcow2"
fi

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# run_one TOOL... -> prints "seconds maxrss_kb"
run_one() {
  /usr/bin/time -f "%e %M" -o "$WORK/time.txt" "$@" >/dev/null 2>&1 || true
  cat "$WORK/time.txt"
}

printf '| image | allocated clusters | qemu-img s | dmcow-img s | ratio (ours/qemu) | qemu RSS MB | ours RSS MB | ratio RSS |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for img in meta1t.qcow2 meta1t-snap.qcow2; do
  src="$WORK/$img"
  # The tools must agree before their times mean anything.
  q_json=$(qemu-img check --output=json "$src" 2>/dev/null || true)
  d_json=$("$DMCOW_IMG" check --output=json "$src" 2>/dev/null || true)
  if [ "$q_json" != "$d_json" ]; then
    echo "outputs differ for $img" >&2; echo "$q_json" >&2; echo "$d_json" >&2; exit 1
  fi
  allocated=$(echo "$q_json" | sed -n 's/.*"allocated-clusters": \([0-9]*\).*/\1/p')
  : >"$WORK/q.txt"; : >"$WORK/d.txt"
  for _ in $(seq "$RUNS"); do
    run_one qemu-img check "$src" >>"$WORK/q.txt"
    run_one "$DMCOW_IMG" check "$src" >>"$WORK/d.txt"
  done
  q=$(cut -d' ' -f1 "$WORK/q.txt" | median); d=$(cut -d' ' -f1 "$WORK/d.txt" | median)
  qm=$(cut -d' ' -f2 "$WORK/q.txt" | median); dm=$(cut -d' ' -f2 "$WORK/d.txt" | median)
  printf '| %s | %s | %.2f | %.2f | %.2f | %.0f | %.0f | %.2f |\n' "$img" "$allocated" "$q" "$d" \
    "$(echo "$d / $q" | bc -l)" "$(echo "$qm / 1024" | bc -l)" "$(echo "$dm / 1024" | bc -l)" \
    "$(echo "$dm / $qm" | bc -l)"
done
echo "JSON output identical for every image"
