#!/usr/bin/env bash
# How dmcow-img's parallel commands scale with threads, on whatever cores
# this machine has (issue 17; a proxy where no 16-core machine is lent):
# each case runs with -m 1 and -m 2, median of RUNS, how many cores -m 2
# keeps busy (user + system time over wall time), and the serial fraction that Amdahl's law gives for the -m 1 /
# -m 2 speedup S on two cores: f = 2/S - 1. From f it predicts the speedup
# on 16 cores, 1 / (f + (1 - f)/16), if nothing but cores changed.
#
#   bench/scaling_bench.sh BUILD_DIR [WORK_DIR]
#   RUNS=N (default 3); SRC_TREE (default /usr/lib/llvm-14): the files of the
#   1 GiB ext4 disk the cases convert (made here with mkfs.ext4 -d, then
#   compressed by qemu-img).
set -euo pipefail
build=${1:?usage: bench/scaling_bench.sh BUILD_DIR [WORK_DIR]}
ours=$(realpath "$build/cli/dmcow-img")
work=${2:-/var/tmp/dmcow-scaling}
runs=${RUNS:-3}
src_tree=${SRC_TREE:-/usr/lib/llvm-14}
export LC_ALL=C
mkdir -p "$work"
cd "$work"
if [ ! -f disk.raw ]; then
	truncate -s 1G disk.raw.tmp
	mkfs.ext4 -q -F -d "$src_tree" disk.raw.tmp
	mv disk.raw.tmp disk.raw
fi
[ -f disk-zlib.qcow2 ] || qemu-img convert -c -O qcow2 disk.raw disk-zlib.qcow2
[ -f disk-zstd.qcow2 ] || qemu-img convert -c -O qcow2 -o compression_type=zstd disk.raw disk-zstd.qcow2
cat disk.raw disk-zlib.qcow2 disk-zstd.qcow2 >/dev/null

# median_run COMMAND...: "wall_seconds cores_busy" (user + sys over wall),
# medians of each over $runs runs.
median_run() {
	local i
	: >runs.txt
	for ((i = 0; i < runs; i++)); do
		rm -f out.img runs.txt
		sync
		/usr/bin/time -f "%e %U %S" -a -o runs.txt "$@" >/dev/null
	done
	awk '{ w[NR] = $1; c[NR] = ($2 + $3) / ($1 > 0 ? $1 : 1) }
	function med(a, n,   i, j, t) {
		for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
		return a[int((n + 1) / 2)]
	}
	END { print med(w, NR), med(c, NR) }' runs.txt
}

echo "cores: $(nproc)"
echo
echo "| case | -m 1 s | -m 2 s | speedup | cores busy at -m 2 | serial fraction | predicted 16-core speedup |"
echo "|---|---|---|---|---|---|---|"
row() {  # label, convert arguments before the output
	local label=$1 args=$2 one two
	# shellcheck disable=SC2086  # a word list
	one=$(median_run "$ours" convert -m 1 $args out.img)
	# shellcheck disable=SC2086
	two=$(median_run "$ours" convert -m 2 $args out.img)
	awk -v l="$label" -v a="${one% *}" -v b="${two% *}" -v busy="${two#* }" 'BEGIN {
		s = a / b; f = 2 / s - 1; if (f < 0) f = 0
		printf "| %s | %.2f | %.2f | %.2f | %.2f | %.3f | %.1f |\n", l, a, b, s, busy, f, 1 / (f + (1 - f) / 16)
	}'
}
row "raw -> qcow2 -c (zlib, level 6)" "-c -O qcow2 disk.raw"
row "raw -> qcow2 -c -o compression_level=1" "-c -O qcow2 -o compression_level=1 disk.raw"
row "raw -> qcow2 -c -o compression_type=zstd" "-c -O qcow2 -o compression_type=zstd disk.raw"
row "zlib qcow2 -> raw" "-O raw disk-zlib.qcow2"
row "zstd qcow2 -> raw" "-O raw disk-zstd.qcow2"
rm -f out.img runs.txt
