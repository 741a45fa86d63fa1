#!/usr/bin/env bash
# convert -O raw: dmcow-img against qemu-img, same run, as a ratio.
#
# The source is a realistic disk: a 1 GiB ext4 file system holding real files
# (this machine's /usr/lib/llvm-14, about 480 MB: binaries, libraries,
# headers), made with mkfs.ext4 -d, then turned into qcow2 by qemu-img
# (plain, and compressed with -c). Each tool converts each image to raw
# RUNS times, alternating; we report the median wall time, and peak RSS.
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

# run_one TOOL SRC -> prints "seconds maxrss_kb"
run_one() {
  local out="$WORK/out.raw"
  rm -f "$out"
  /usr/bin/time -f "%e %M" -o "$WORK/time.txt" "$@" "$out" >/dev/null
  cat "$WORK/time.txt"
}

printf '| image | qemu-img s | dmcow-img s | ratio (ours/qemu) | qemu RSS MB | ours RSS MB |\n|---|---|---|---|---|---|\n'
for img in disk.qcow2 disk-zlib.qcow2 disk-zstd.qcow2; do
  src="$WORK/$img"
  cat "$src" >/dev/null  # warm the page cache for both tools
  : >"$WORK/q.txt"; : >"$WORK/d.txt"
  for _ in $(seq "$RUNS"); do
    run_one qemu-img convert -O raw "$src" >>"$WORK/q.txt"
    run_one "$DMCOW_IMG" convert -O raw "$src" >>"$WORK/d.txt"
  done
  q=$(cut -d' ' -f1 "$WORK/q.txt" | median); d=$(cut -d' ' -f1 "$WORK/d.txt" | median)
  qm=$(cut -d' ' -f2 "$WORK/q.txt" | median); dm=$(cut -d' ' -f2 "$WORK/d.txt" | median)
  printf '| %s (%s MB) | %.2f | %.2f | %.2f | %.0f | %.0f |\n' "$img" "$(( $(stat -c %s "$src") / 1048576 ))" \
    "$q" "$d" "$(echo "$d / $q" | bc -l)" "$(echo "$qm / 1024" | bc -l)" "$(echo "$dm / 1024" | bc -l)"
done
# Correctness of what was timed: the last outputs are identical.
qemu-img convert -O raw "$WORK/disk-zlib.qcow2" "$WORK/q.raw"
"$DMCOW_IMG" convert -O raw "$WORK/disk-zlib.qcow2" "$WORK/d.raw"
cmp "$WORK/q.raw" "$WORK/d.raw" && echo "outputs identical (cmp)"
rm -f "$WORK/q.raw" "$WORK/d.raw" "$WORK/out.raw"
