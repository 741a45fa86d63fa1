#!/usr/bin/env bash
# A realistic VM disk (issue 17): dmcow-img against qemu-img, same run, as
# ratios (ours / theirs: below 1 is faster).
#
# The disk: 64 GiB with a GPT table and one partition from 1 MiB to the end,
# holding an ext4 file system made by mkfs.ext4 -d from SRC_TREE (default
# /usr/lib: about 4-5 GiB of real binaries, libraries and data). Made once as
# raw by this script (sfdisk, mkfs.ext4 -E offset), then by qemu-img as plain
# and zlib-compressed qcow2; nothing is downloaded.
#
#   bench/realistic_bench.sh BUILD_DIR [WORK_DIR]
#   RUNS=N (default 3) alternating runs per tool and case, median reported;
#   CRUNS=N (default 1) for the compressed-output cases (minutes each; 0
#   leaves them out).
#   ONLY=REGEX: only the cases whose label matches (grep -E), e.g.
#   ONLY=compare.
#   SETTLE=S (default 3): seconds to wait after removing the last output and
#   syncing, before each run. This VM returns freed guest pages to its host
#   at once (virtio-balloon free page reporting, min_free_ms 0), so a run that
#   starts while the last 5 GiB of page cache is being reported pays for it at
#   random; with the wait every run starts from the same state.
#   IMAGE_CACHE=DIR (default /var/tmp/dmcow-realistic): where the images are
#   made and kept between runs. WORK_DIR (default IMAGE_CACHE) is where the
#   cases read and write: the images are copied there (holes kept) when it
#   differs, so WORK_DIR=/dev/shm/x measures tmpfs.
#
# Prints a markdown table: case, qemu-img s, dmcow-img s, ratio, both peak
# RSS. Outputs of each convert are checked equal with qemu-img compare.
set -euo pipefail
build=${1:?usage: bench/realistic_bench.sh BUILD_DIR [WORK_DIR]}
ours=$(realpath "$build/cli/dmcow-img")
cache=${IMAGE_CACHE:-/var/tmp/dmcow-realistic}
work=${2:-$cache}
runs=${RUNS:-3}
cruns=${CRUNS:-1}
settle=${SETTLE:-3}
src_tree=${SRC_TREE:-/usr/lib}
export LC_ALL=C
mkdir -p "$cache" "$work"

disk_bytes=$((64 << 30))
part_start=$((1 << 20))
if [ ! -f "$cache/disk.raw" ]; then
	rm -f "$cache/disk.raw.tmp"
	truncate -s "$disk_bytes" "$cache/disk.raw.tmp"
	echo 'label: gpt
start=2048, type=linux' | sfdisk -q "$cache/disk.raw.tmp"
	# The partition ends 33 sectors before the disk's end (the backup GPT).
	part_blocks=$(((disk_bytes - part_start - 33 * 512) / 4096))
	mkfs.ext4 -q -F -b 4096 -E offset=$part_start -d "$src_tree" "$cache/disk.raw.tmp" "$part_blocks"
	mv "$cache/disk.raw.tmp" "$cache/disk.raw"
fi
[ -f "$cache/disk.qcow2" ] || qemu-img convert -O qcow2 "$cache/disk.raw" "$cache/disk.qcow2"
[ -f "$cache/disk-zlib.qcow2" ] || qemu-img convert -c -W -m 16 -O qcow2 "$cache/disk.raw" "$cache/disk-zlib.qcow2"
if [ "$(realpath "$work")" != "$(realpath "$cache")" ]; then
	for f in disk.raw disk.qcow2 disk-zlib.qcow2; do
		[ -f "$work/$f" ] || cp --sparse=always "$cache/$f" "$work/$f"
	done
fi
cd "$work"
for f in disk.raw disk.qcow2 disk-zlib.qcow2; do cat "$f" >/dev/null; done  # warm cache

# run_one TOOL ARGS...: prints "seconds peak_rss_kb"; fails the bench on a
# status other than 0 (1 is allowed for compare, which says "differ" so).
run_one() {
	/usr/bin/time -f "%e %M" -o time.txt "$@" >/dev/null 2>run.err || {
		echo "bench: failed: $* ($(head -c 300 run.err))" >&2
		exit 1
	}
	cat time.txt
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# bench_case LABEL RUNS OUTPUT "QEMU-IMG ARGS" "DMCOW-IMG ARGS": alternating
# runs (OUTPUT, "" for none, removed before each); outputs compared at the end.
# DMCOW-IMG ARGS starting with "sh:" is a shell command run in place of
# dmcow-img (the write-floor rows); its output is not compared.
bench_case() {
	local label=$1 n=$2 out=$3 qargs=$4 dargs=$5 i q d qm dm same=""
	[ "$n" -gt 0 ] || return 0
	[ -z "${ONLY:-}" ] || grep -qE -- "$ONLY" <<<"$label" || return 0
	: >q.txt
	: >d.txt
	# Each run starts with no dirty pages: neither tool's run pays for the
	# writeback of the other's output (both write with cache=unsafe).
	for ((i = 0; i < n; i++)); do
		if [ -n "$qargs" ]; then
			rm -f "q.$out"
			sync
			sleep "$settle"
			# shellcheck disable=SC2086  # the argument strings are word lists
			run_one qemu-img ${qargs//OUT/q.$out} >>q.txt
		fi
		rm -f "d.$out"
		sync
		sleep "$settle"
		if [[ $dargs == sh:* ]]; then
			run_one bash -c "${dargs#sh:}" >>d.txt
		else
			# shellcheck disable=SC2086
			run_one "$ours" ${dargs//OUT/d.$out} >>d.txt
		fi
	done
	sync
	if [[ $dargs == sh:* ]]; then
		rm -f "q.$out" "d.$out"
		out=""
	fi
	if [ -n "$out" ]; then
		same=no
		qemu-img compare -q "q.$out" "d.$out" && same=yes
		rm -f "q.$out" "d.$out"
	fi
	d=$(cut -d' ' -f1 d.txt | median)
	dm=$(cut -d' ' -f2 d.txt | median)
	if [ -z "$qargs" ]; then
		printf '| %s | (none) | %.2f | | | %.0f | |\n' "$label" "$d" "$(awk -v k="$dm" 'BEGIN { print k / 1024 }')"
		return
	fi
	q=$(cut -d' ' -f1 q.txt | median)
	qm=$(cut -d' ' -f2 q.txt | median)
	printf '| %s | %.2f | %.2f | **%.2f** | %.0f | %.0f | %s |\n' "$label" "$q" "$d" \
		"$(awk -v a="$d" -v b="$q" 'BEGIN { print a / b }')" "$(awk -v k="$qm" 'BEGIN { print k / 1024 }')" \
		"$(awk -v k="$dm" 'BEGIN { print k / 1024 }')" "${same:-n/a}"
}

echo "file system of $work: $(stat -f -c %T .); data: $(du -m disk.raw | cut -f1) MiB raw," \
	"$(du -m disk.qcow2 | cut -f1) MiB qcow2, $(du -m disk-zlib.qcow2 | cut -f1) MiB compressed"
echo
echo "| case | qemu-img s | dmcow-img s | ratio | qemu-img RSS MiB | dmcow-img RSS MiB | outputs equal |"
echo "|---|---|---|---|---|---|---|"
bench_case "raw -> qcow2" "$runs" qcow2 "convert -O qcow2 disk.raw OUT" "convert -O qcow2 disk.raw OUT"
bench_case "qcow2 -> raw" "$runs" raw "convert -O raw disk.qcow2 OUT" "convert -O raw disk.qcow2 OUT"
bench_case "qcow2 -> qcow2" "$runs" qcow2 "convert -O qcow2 disk.qcow2 OUT" "convert -O qcow2 disk.qcow2 OUT"
# What the writes alone cost, under every uncompressed conversion: as many
# bytes as the qcow2 output holds (its allocated size) written into a new
# file with no read and no format, by one writer and by two writers on
# halves of the file, each against qemu-img's qcow2 -> qcow2 in the same
# run. When these take as long as the conversions, the page cache, not
# either tool, sets the time.
data_mib=$(du -m disk.qcow2 | cut -f1)
half_blocks=$((data_mib / 4)) # 2 MiB blocks in half the data
bench_case "write floor: dd, 1 writer, same bytes" "$runs" w \
	"convert -O qcow2 disk.qcow2 OUT" "sh:dd if=/dev/zero of=d.w bs=2M count=$((half_blocks * 2)) status=none"
bench_case "write floor: dd, 2 writers, same bytes" "$runs" w \
	"convert -O qcow2 disk.qcow2 OUT" "sh:dd if=/dev/zero of=d.w bs=2M count=$half_blocks status=none conv=notrunc &
dd if=/dev/zero of=d.w bs=2M seek=$half_blocks count=$half_blocks status=none conv=notrunc; wait"
bench_case "compressed -> raw" "$runs" raw "convert -O raw disk-zlib.qcow2 OUT" "convert -O raw disk-zlib.qcow2 OUT"
bench_case "compressed -> qcow2" "$runs" qcow2 "convert -O qcow2 disk-zlib.qcow2 OUT" \
	"convert -O qcow2 disk-zlib.qcow2 OUT"
bench_case "compare raw, qcow2" "$runs" "" "compare disk.raw disk.qcow2" "compare disk.raw disk.qcow2"
bench_case "compare qcow2, compressed" "$runs" "" "compare disk.qcow2 disk-zlib.qcow2" \
	"compare disk.qcow2 disk-zlib.qcow2"
bench_case "check qcow2" "$runs" "" "check disk.qcow2" "check disk.qcow2"
bench_case "check compressed" "$runs" "" "check disk-zlib.qcow2" "check disk-zlib.qcow2"
# qemu-img 7.2 has no checksum: our time alone.
bench_case "checksum qcow2" "$runs" "" "" "checksum disk.qcow2"
bench_case "checksum compressed" "$runs" "" "" "checksum disk-zlib.qcow2"
bench_case "raw -> compressed (-c) vs qemu-img -c -W -m 16" "$cruns" qcow2 "convert -c -W -m 16 -O qcow2 disk.raw OUT" \
	"convert -c -O qcow2 disk.raw OUT"
bench_case "qcow2 -> compressed zstd vs qemu-img -c -W -m 16 zstd" "$cruns" qcow2 \
	"convert -c -W -m 16 -O qcow2 -o compression_type=zstd disk.qcow2 OUT" \
	"convert -c -O qcow2 -o compression_type=zstd disk.qcow2 OUT"
rm -f time.txt run.err q.txt d.txt
