#!/usr/bin/env bash
# convert: dmcow-img against qemu-img, same run, as ratios: to raw from
# plain and compressed qcow2, raw to qcow2, and compressed output (-c at the
# default level, at level 1, and zstd) against qemu-img's fastest -c (-W -m 16).
#
# The source is a realistic disk: a 1 GiB ext4 file system holding real files
# (this machine's /usr/lib/llvm-14, about 480 MB: binaries, libraries,
# headers), made with mkfs.ext4 -d, then turned into qcow2 by qemu-img
# (plain, and compressed with -c). Each tool runs each case RUNS times
# (CRUNS for compressed output), alternating; we report the median wall
# time, and peak RSS.
# Page cache is warm for both (the images are read once before timing).
#
# Usage: bench/convert_bench.sh [BUILD_DIR]   (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="${1:-build}"
DMCOW_IMG="$BUILD/cli/dmcow-img"
RUNS="${RUNS:-5}"
WORK="${BENCH_WORK:-/tmp/dmcow-bench}"
SRC_TREE="${SRC_TREE:-/usr/lib/llvm-14}"
mkdir -p "$WORK"

if [ ! -f "$WORK/disk.raw" ]; then
  truncate -s 1G "$WORK/disk.raw"
  mkfs.ext4 -q -F -d "$SRC_TREE" "$WORK/disk.raw"
fi
[ -f "$WORK/disk.qcow2" ] || qemu-img convert -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2"
[ -f "$WORK/disk-zlib.qcow2" ] || qemu-img convert -c -O qcow2 "$WORK/disk.raw" "$WORK/disk-zlib.qcow2"
[ -f "$WORK/disk-zstd.qcow2" ] ||
  qemu-img convert -c -O qcow2 -o compression_type=zstd "$WORK/disk.raw" "$WORK/disk-zstd.qcow2"

# median of the numbers on stdin
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# run_one OUT COMMAND... -> runs COMMAND OUT, prints "seconds maxrss_kb"
run_one() {
  local out="$1"
  shift
  rm -f "$out"
  /usr/bin/time -f "%e %M" -o "$WORK/time.txt" "$@" "$out" >/dev/null
  cat "$WORK/time.txt"
}

# bench_case LABEL EXT "QEMU ARGS" "OUR ARGS": RUNS alternating runs of
# `qemu-img convert QEMU_ARGS OUT` and `dmcow-img convert OUR_ARGS OUT`;
# prints a table row: median times, their ratio, peak RSS, the output size
# ratio, and whether qemu-img compare finds both outputs identical.
bench_case() {
  local label="$1" ext="$2" qargs="$3" dargs="$4" runs="${5:-$RUNS}"
  : >"$WORK/q.txt"; : >"$WORK/d.txt"
  for _ in $(seq "$runs"); do
    run_one "$WORK/q.$ext" qemu-img convert $qargs >>"$WORK/q.txt"
    run_one "$WORK/d.$ext" "$DMCOW_IMG" convert $dargs >>"$WORK/d.txt"
  done
  local q d qm dm qs ds same=no
  q=$(cut -d' ' -f1 "$WORK/q.txt" | median); d=$(cut -d' ' -f1 "$WORK/d.txt" | median)
  qm=$(cut -d' ' -f2 "$WORK/q.txt" | median); dm=$(cut -d' ' -f2 "$WORK/d.txt" | median)
  qs=$(stat -c %s "$WORK/q.$ext"); ds=$(stat -c %s "$WORK/d.$ext")
  qemu-img compare -q "$WORK/q.$ext" "$WORK/d.$ext" && same=yes
  printf '| %s | %.2f | %.2f | **%.2f** | %.0f | %.0f | %.3f | %s |\n' "$label" "$q" "$d" \
    "$(echo "$d / $q" | bc -l)" "$(echo "$qm / 1024" | bc -l)" "$(echo "$dm / 1024" | bc -l)" \
    "$(echo "$ds / $qs" | bc -l)" "$same"
  rm -f "$WORK/q.$ext" "$WORK/d.$ext"
}

for f in disk.raw disk.qcow2 disk-zlib.qcow2 disk-zstd.qcow2; do cat "$WORK/$f" >/dev/null; done  # warm cache
printf '| case | qemu-img s | dmcow-img s | time ratio | qemu RSS MB | ours RSS MB | size ratio | identical |\n'
printf '|---|---|---|---|---|---|---|---|\n'
bench_case "qcow2 to raw" raw "-O raw $WORK/disk.qcow2" "-O raw $WORK/disk.qcow2"
bench_case "zlib qcow2 to raw" raw "-O raw $WORK/disk-zlib.qcow2" "-O raw $WORK/disk-zlib.qcow2"
bench_case "zstd qcow2 to raw" raw "-O raw $WORK/disk-zstd.qcow2" "-O raw $WORK/disk-zstd.qcow2"
bench_case "raw to qcow2" qcow2 "-O qcow2 $WORK/disk.raw" "-O qcow2 $WORK/disk.raw"
CRUNS="${CRUNS:-3}"
bench_case "-c (zlib level 6) vs qemu -c -W -m 16" qcow2 "-c -W -m 16 -O qcow2 $WORK/disk.raw" \
  "-c -O qcow2 $WORK/disk.raw" "$CRUNS"
bench_case "-c -o compression_level=1 vs qemu -c -W -m 16" qcow2 "-c -W -m 16 -O qcow2 $WORK/disk.raw" \
  "-c -O qcow2 -o compression_level=1 $WORK/disk.raw" "$CRUNS"
bench_case "-c zstd vs qemu -c zstd (its default)" qcow2 "-c -O qcow2 -o compression_type=zstd $WORK/disk.raw" \
  "-c -O qcow2 -o compression_type=zstd $WORK/disk.raw" "$CRUNS"
bench_case "-c zstd vs qemu -c -W -m 16 zstd" qcow2 "-c -W -m 16 -O qcow2 -o compression_type=zstd $WORK/disk.raw" \
  "-c -O qcow2 -o compression_type=zstd $WORK/disk.raw" "$CRUNS"
rm -f "$WORK/out.raw"
