#!/usr/bin/env bash
# NBD serving: nbdkit with nbdkit-dmcow-plugin against qemu-nbd, the same
# image over the same transport (a Unix socket), in the same run (issue 21).
# Every image is made here by qemu-img/qemu-io; nothing is downloaded.
#
#   bench/nbd_bench.sh BUILD_DIR [WORK_DIR]
#   RUNS=N (default 3): runs per server and case, median reported.
#
# Cases, each with 1 and 4 client connections where the client can use them:
#   seq read     nbdcopy of the image to null: (block status skips holes)
#   4k randread  fio's nbd engine, 4 KiB random reads, queue depth 16, 10 s
#   first write  nbdcopy of a 1 GiB raw file into an empty qcow2 image
# over a 1 GiB image of real files (/usr) stored compressed (zlib) and
# plain, and a sparse 64 GiB image holding 4 GiB of data in 64 runs.
# qemu-nbd gets -t (it stays up between clients), -e 4 (four clients) and,
# for reads, -r, which makes it
# advertise multi-conn (it does not for writable exports: nbdcopy then uses
# one connection to it). Peak memory: the server's VmHWM at the end.
#
# Prints one markdown table: case, qemu-nbd MiB/s (or IOPS), ours, ratio
# (ours / theirs; above 1 is faster), and both servers' peak RSS in MiB.
set -euo pipefail
build=${1:?usage: bench/nbd_bench.sh BUILD_DIR [WORK_DIR]}
plugin=$(realpath "$build/nbdkit/nbdkit-dmcow-plugin.so")
work=${2:-$(mktemp -d "${TMPDIR:-/tmp}/dmcow-nbd.XXXXXX")}
mkdir -p "$work"
cd "$work"
runs=${RUNS:-3}
export LC_ALL=C
for tool in nbdkit nbdcopy qemu-nbd fio; do
	command -v "$tool" >/dev/null && continue
	[ "$(id -u)" = 0 ] || { echo "bench: $tool missing (apt-get install nbdkit libnbd-bin qemu-utils fio)" >&2; exit 1; }
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nbdkit libnbd-bin qemu-utils fio >/dev/null
done

# ---- images ----
if [ ! -f plain.qcow2 ]; then
	tar -cf - /usr/lib /usr/share 2>/dev/null | head -c 1G >files.raw || true
	truncate -s 1G files.raw
	qemu-img convert -O qcow2 -c files.raw compressed.qcow2
	qemu-img convert -O qcow2 files.raw plain.qcow2
	qemu-img create -q -f qcow2 sparse.qcow2 64G
	cmds=()
	for i in $(seq 0 63); do cmds+=(-c "write -P $((i + 1)) $((i * 1024))M 64M"); done
	qemu-io "${cmds[@]}" sparse.qcow2 >/dev/null
fi

sock=$work/sock
server_pid=""
start_server() {  # ours|qemu, image, ro|rw
	rm -f "$sock" pid
	if [ "$1" = ours ]; then
		local ro=""
		[ "$3" = ro ] && ro="readonly=1"
		nbdkit -U "$sock" -P "$work/pid" "$plugin" "$2" $ro
	else
		local ro=""
		[ "$3" = ro ] && ro="-r"
		qemu-nbd --fork -t -k "$sock" --pid-file="$work/pid" -e 4 -f qcow2 $ro "$2"
	fi
	for _ in $(seq 100); do [ -S "$sock" ] && [ -s pid ] && break; sleep 0.05; done
	server_pid=$(cat pid)
}
stop_server() {  # prints the server's peak RSS in MiB
	local hwm
	hwm=$(awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$server_pid/status")
	kill "$server_pid"
	while kill -0 "$server_pid" 2>/dev/null; do sleep 0.05; done
	echo "$hwm"
}
uri() { echo "nbd+unix:///?socket=$sock"; }

# measure ours|qemu case image connections: one number (MiB/s or IOPS)
# and the peak RSS, from a fresh server.
measure() {
	local who=$1 kind=$2 image=$3 conns=$4 t0 t1 v mode=ro
	[ "$kind" = write ] && { mode=rw; rm -f target.qcow2; qemu-img create -q -f qcow2 target.qcow2 1G; image=target.qcow2; }
	start_server "$who" "$image" "$mode"
	case $kind in
	read)
		local bytes
		bytes=$(qemu-img info --output=json "$image" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p')
		[ "$image" = sparse.qcow2 ] && bytes=$((4 << 30))  # the data nbdcopy reads; holes are skipped
		t0=$(date +%s.%N)
		nbdcopy --connections="$conns" "$(uri)" null:
		t1=$(date +%s.%N)
		v=$(awk -v a="$t0" -v b="$t1" -v n="$bytes" 'BEGIN { printf "%.0f", n / 1048576 / (b - a) }') ;;
	randread)
		v=$(fio --name=r --ioengine=nbd --uri="$(uri)" --rw=randread --bs=4k --iodepth=16 --numjobs="$conns" \
			--time_based --runtime=10 --group_reporting --output-format=terse --terse-version=3 2>/dev/null |
			awk -F';' 'NF > 8 { print $8 }') ;;
	write)
		t0=$(date +%s.%N)
		nbdcopy --connections="$conns" files.raw "$(uri)"
		t1=$(date +%s.%N)
		v=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", 1024 / (b - a) }') ;;
	esac
	echo "$v $(stop_server)"
}

median() { sort -g | sed -n "$(((runs + 1) / 2))p"; }

row() {  # label, kind, image, connections
	local q=() o=() qm=0 om=0 i r
	for ((i = 0; i < runs; i++)); do
		r=$(measure qemu "$2" "$3" "$4"); q+=("${r% *}"); qm=${r#* }
		r=$(measure ours "$2" "$3" "$4"); o+=("${r% *}"); om=${r#* }
	done
	local qv ov
	qv=$(printf '%s\n' "${q[@]}" | median)
	ov=$(printf '%s\n' "${o[@]}" | median)
	printf '| %s | %s | %s | **%.2f** | %s | %s |\n' "$1" "$qv" "$ov" "$(awk -v a="$ov" -v b="$qv" 'BEGIN { print a / b }')" "$qm" "$om"
}

echo "| case | qemu-nbd | nbdkit + dmcow | ratio | qemu-nbd peak MiB | ours peak MiB |"
echo "|---|---|---|---|---|---|"
for c in 1 4; do
	row "seq read, compressed 1 GiB, $c conn (MiB/s)" read compressed.qcow2 "$c"
	row "seq read, plain 1 GiB, $c conn (MiB/s)" read plain.qcow2 "$c"
	row "nbdcopy, sparse 64 GiB with 4 GiB data, $c conn (MiB/s)" read sparse.qcow2 "$c"
	row "4k randread, compressed, $c job (IOPS)" randread compressed.qcow2 "$c"
	row "4k randread, plain, $c job (IOPS)" randread plain.qcow2 "$c"
	row "first writes, 1 GiB into empty qcow2, $c conn (MiB/s)" write "" "$c"
done
