#!/usr/bin/env bash
# Sparse images: dmcow-img against qemu-img on empty and nearly empty images
# of 64 GiB, 1 TiB and 16 TiB (issue 17: cost in proportion to the data, not
# to the virtual size). Every image is made here by qemu-img/qemu-io;
# nothing is downloaded.
#
#   bench/sparse_bench.sh BUILD_DIR [WORK_DIR]
#   RUNS=N (default 3): runs per tool and case, median reported.
#   SIZES="64G 1T 16T" (default): virtual sizes.
#   ONLY=REGEX: only the cases whose name matches (grep -E).
#
# Prints one markdown table: case, qemu-img s, dmcow-img s, ratio (ours /
# theirs; below 1 is faster). Raw files stop short of 16 TiB on ext4, so raw
# cases at 16T are left out (qemu-img cannot make them either). checksum has
# no qemu-img counterpart in 7.2: its row shows our time alone.
set -euo pipefail
build=${1:?usage: bench/sparse_bench.sh BUILD_DIR [WORK_DIR]}
ours=$(realpath "$build/cli/dmcow-img")
work=${2:-$(mktemp -d "${TMPDIR:-/tmp}/dmcow-sparse.XXXXXX")}
mkdir -p "$work"
cd "$work"
runs=${RUNS:-3}
sizes=${SIZES:-64G 1T 16T}
export LC_ALL=C

# median_seconds CMD...: median wall time of $runs runs (outputs removed
# first, then $PREP run untimed: commit and rebase change their images).
median_seconds() {
	local times=() t0 t1 i
	for ((i = 0; i < runs; i++)); do
		rm -f out.* 2>/dev/null || true
		[ -z "${PREP:-}" ] || sh -c "$PREP" >/dev/null 2>&1 || { echo "bench: failed: $PREP" >&2; exit 1; }
		t0=$(date +%s.%N)
		"$@" >/dev/null 2>&1 || { echo "bench: failed: $*" >&2; exit 1; }
		t1=$(date +%s.%N)
		times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
	done
	printf '%s\n' "${times[@]}" | sort -g | sed -n "$(((runs + 1) / 2))p"
}

row() {  # name, qemu-img args ("" for none), dmcow-img args
	local name=$1 theirs=$2 mine=$3 q="" o
	[ -z "${ONLY:-}" ] || echo "$name" | grep -Eq -- "$ONLY" || return 0
	[ -n "$theirs" ] && q=$(median_seconds sh -c "qemu-img $theirs")
	o=$(median_seconds sh -c "'$ours' $mine")
	if [ -n "$q" ]; then
		printf '| %s | %.3f | %.3f | **%.2f** |\n' "$name" "$q" "$o" "$(awk -v a="$o" -v b="$q" 'BEGIN { print a / b }')"
	else
		printf '| %s | (none) | %.3f | |\n' "$name" "$o"
	fi
}

echo "| case | qemu-img s | dmcow-img s | ratio |"
echo "|---|---|---|---|"
for size in $sizes; do
	rm -f ./*.qcow2 ./*.raw
	qemu-img create -q -f qcow2 empty.qcow2 "$size"
	qemu-img create -q -f qcow2 sparse.qcow2 "$size"
	# 64 KiB near the start, 1 MiB in the middle, 64 KiB at the end.
	bytes=$(qemu-img info --output=json empty.qcow2 | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p')
	qemu-io -c "write -P 0x11 0 64k" -c "write -P 0x22 $((bytes / 2)) 1M" \
		-c "write -P 0x33 $((bytes - 65536)) 64k" sparse.qcow2 >/dev/null
	qemu-img create -q -f qcow2 -b sparse.qcow2 -F qcow2 top.qcow2
	qemu-io -c "write -P 0x44 $((bytes / 4)) 1M" top.qcow2 >/dev/null
	raw=yes
	[ "$size" = 16T ] && raw=no
	if [ $raw = yes ]; then
		truncate -s "$size" sparse.raw
		qemu-io -f raw -c "write -P 0x55 $((bytes / 3)) 64k" sparse.raw >/dev/null
		qemu-img convert -O qcow2 sparse.raw sparse-raw.qcow2
	fi
	s=$size
	if [ $raw = yes ]; then
		row "$s empty qcow2 -> raw" "convert -O raw empty.qcow2 out.raw" "convert -O raw empty.qcow2 out.raw"
		row "$s sparse qcow2 -> raw" "convert -O raw sparse.qcow2 out.raw" "convert -O raw sparse.qcow2 out.raw"
		row "$s sparse raw -> qcow2" "convert -O qcow2 sparse.raw out.qcow2" "convert -O qcow2 sparse.raw out.qcow2"
		row "$s compare raw, qcow2 (equal)" "compare sparse.raw sparse-raw.qcow2" "compare sparse.raw sparse-raw.qcow2"
	fi
	row "$s empty qcow2 -> qcow2" "convert -O qcow2 empty.qcow2 out.qcow2" "convert -O qcow2 empty.qcow2 out.qcow2"
	row "$s sparse qcow2 -> qcow2" "convert -O qcow2 sparse.qcow2 out.qcow2" "convert -O qcow2 sparse.qcow2 out.qcow2"
	row "$s sparse qcow2 -> qcow2 -c" "convert -c -O qcow2 sparse.qcow2 out.qcow2" \
		"convert -c -O qcow2 sparse.qcow2 out.qcow2"
	row "$s chain -> qcow2 -B" "convert -B sparse.qcow2 -F qcow2 -O qcow2 top.qcow2 out.qcow2" \
		"convert -B sparse.qcow2 -F qcow2 -O qcow2 top.qcow2 out.qcow2"
	row "$s compare sparse, chain" "compare sparse.qcow2 top.qcow2; true" "compare sparse.qcow2 top.qcow2; true"
	row "$s map chain" "map --output=json top.qcow2" "map --output=json top.qcow2"
	row "$s check sparse" "check sparse.qcow2" "check sparse.qcow2"
	row "$s checksum chain" "" "checksum top.qcow2"
	row "$s measure chain -> qcow2" "measure -O qcow2 top.qcow2" "measure -O qcow2 top.qcow2"
	# commit and rebase change their images: fresh copies before each run,
	# untimed (a top over its own copy of the base, as made above).
	copies="cp sparse.qcow2 out-base.qcow2 && cp top.qcow2 out-top.qcow2 &&
		qemu-img rebase -u -b out-base.qcow2 -F qcow2 out-top.qcow2"
	PREP=$copies row "$s commit chain" "commit out-top.qcow2" "commit out-top.qcow2"
	PREP=$copies row "$s rebase -u chain" "rebase -u -b sparse.qcow2 -F qcow2 out-top.qcow2" \
		"rebase -u -b sparse.qcow2 -F qcow2 out-top.qcow2"
	# A safe rebase onto the empty image copies what the old base held.
	PREP=$copies row "$s rebase chain onto empty" "rebase -b empty.qcow2 -F qcow2 out-top.qcow2" \
		"rebase -b empty.qcow2 -F qcow2 out-top.qcow2"
	# qemu-img dd writes every byte: the first 256 MiB only.
	row "$s dd chain, 256 MiB -> raw" "dd bs=1M count=256 if=top.qcow2 of=out.raw" \
		"dd bs=1M count=256 if=top.qcow2 of=out.raw"
	# Metadata preallocation: every cluster mapped, none stored (16T would
	# need 2 GiB of L2 tables). QEMU reads the holes under the data runs as
	# zeros; so does dmcow-img since it detects preallocation as QEMU does.
	if [ "$size" != 16T ]; then
		qemu-img create -q -f qcow2 -o preallocation=metadata prealloc.qcow2 "$size"
		row "$s prealloc qcow2 -> raw" "convert -O raw prealloc.qcow2 out.raw" "convert -O raw prealloc.qcow2 out.raw"
		row "$s map prealloc" "map --output=json prealloc.qcow2" "map --output=json prealloc.qcow2"
		row "$s compare prealloc, empty" "compare prealloc.qcow2 empty.qcow2" "compare prealloc.qcow2 empty.qcow2"
		row "$s checksum prealloc" "" "checksum prealloc.qcow2"
		row "$s measure prealloc -> qcow2" "measure -O qcow2 prealloc.qcow2" "measure -O qcow2 prealloc.qcow2"
	fi
done
