#!/bin/busybox sh
# /init of the benchmark VM (bench/vm_bench.sh): dm-cow against the raw loop
# device and against dm-snapshot, all on files in this VM's tmpfs.
# Console lines (parsed by vm_bench.sh):
#   BENCH-BOOT ok
#   BENCH <group> <case> <target> <run> <seconds> <MB/s> <IOPS>
#   BENCH-INFO <text>
#   BENCH-FAIL <why>      and nothing more: the run is void
#   BENCH-END ok
# Kernel command line: bench.runs=N bench.mb=N bench.ops=N
# bench.groups=mapped,store,first (default all).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run
mount -t tmpfs -o size=85% tmpfs /tmp
mount -t tmpfs tmpfs /run

fail() {
	echo "BENCH-FAIL $*"
	[ -f /tmp/dmcowd.log ] && tail -n 20 /tmp/dmcowd.log
	poweroff -f
	exit 1
}
info() { echo "BENCH-INFO $*"; }

for m in dm-mod loop dm-bufio dm-snapshot dm-cow; do
	insmod /lib/modules/$m.ko || fail "insmod $m"
done
[ -e /dev/mapper/control ] || fail "no /dev/mapper/control"
echo 5 > /proc/sys/kernel/printk
echo
echo "BENCH-BOOT ok"

RUNS=7
MB=256
OPS=65536
GROUPS_=mapped,store,first
DEV_LIN=
for a in $(cat /proc/cmdline); do
	case "$a" in
	bench.runs=*) RUNS=${a#*=} ;;
	bench.mb=*) MB=${a#*=} ;;
	bench.ops=*) OPS=${a#*=} ;;
	bench.groups=*) GROUPS_=${a#*=} ;;
	esac
done
BYTES=$((MB * 1048576))
PASSES=$(((1024 + MB - 1) / MB))	# sequential runs move at least 1 GiB
CHUNK=65536
CS=$((CHUNK / 512))
SECTORS=$((BYTES / 512))
NCHUNKS=$((BYTES / CHUNK))
BASE=/tmp/base.img
COW=/tmp/cow.img
info "cpus $(nproc), $(grep MemTotal /proc/meminfo | tr -s ' '), device $MB MiB, chunk 64 KiB, $RUNS runs, $OPS random I/Os per run"

want() { case ",$GROUPS_," in *,$1,*) return 0 ;; esac; return 1; }

# ---- dmcowd -------------------------------------------------------------------
DPID=
daemon_start() {	# name reload-interval
	local i
	/bin/dmcowd --name "$1" --chunk-size 64K --reload-interval "$2" "$BASE" "$COW" >/tmp/dmcowd.log 2>&1 &
	DPID=$!
	i=0
	until [ -e "/dev/mapper/$1" ] && dmsetup status "$1" 2>/dev/null | grep -q ' ready$'; do
		kill -0 "$DPID" 2>/dev/null || fail "dmcowd exited at start"
		i=$((i + 1))
		[ $i -lt 1500 ] || fail "dmcowd not ready after 30 s"
		usleep 20000
	done
}
daemon_stop() {
	kill -TERM "$DPID"
	wait "$DPID" || fail "dmcowd exited with $?"
	DPID=
}
# cow_status NAME FIELD: a field of the cow target's status (1 = mapped_chunks).
cow_status() {
	dmsetup status "$1" | awk -v f="$2" '$3 == "cow" { print $(3 + f); exit }'
}

# ---- measuring ----------------------------------------------------------------
# bench GROUP CASE TARGET RUN DEV ARGS...: one blkio run, one BENCH line.
bench() {
	local g=$1 c=$2 t=$3 r=$4 dev=$5 out
	shift 5
	out=$(/bin/blkio "$dev" "$@" --seed "$r" 2>&1) || fail "$g $c $t run $r: blkio $dev $*: $out"
	set -- $out
	[ "$1" = RESULT ] || fail "$g $c $t: blkio printed $out"
	echo "BENCH $g $c $t $r $2 $3 $4"
}

# pair GROUP CASE ARGS...: RUNS runs of the same I/O on the dm-cow device
# (DEV_COW), on the raw loop device (DEV_RAW at RAW_OFF) and, if DEV_LIN is
# set, on a plain dm-linear device over that same region; the order rotates
# from run to run.
pair() {
	local g=$1 c=$2 r=1 t
	shift 2
	while [ $r -le "$RUNS" ]; do
		case $((r % 3)) in
		1) order="cow raw lin" ;;
		2) order="raw lin cow" ;;
		0) order="lin cow raw" ;;
		esac
		for t in $order; do
			case $t in
			cow) bench "$g" "$c" cow $r "$DEV_COW" "$@" ;;
			raw) bench "$g" "$c" raw $r "$DEV_RAW" "$@" --offset "$RAW_OFF" --size "$BYTES" ;;
			lin) [ -z "$DEV_LIN" ] || bench "$g" "$c" lin $r "$DEV_LIN" "$@" ;;
			esac
		done
		r=$((r + 1))
	done
}

# The loop device dmcowd set up for the COW file.
cow_loop() {
	for d in /sys/block/loop*; do
		[ "$(cat "$d/loop/backing_file" 2>/dev/null)" = "$COW" ] && { echo "/dev/${d##*/}"; return 0; }
	done
	fail "no loop device on $COW"
}

# Every chunk written once, whole, in order (one thread: the chunks land in
# the COW in device order), and flushed.
fill_device() {	# name
	local out
	out=$(/bin/blkio "/dev/mapper/$1" write seq --bs 64K --fsync 2>&1) || fail "fill: $out"
	info "fill $1 (every chunk's first write, whole chunks in order): $out"
}

mapped_cases() {	# group
	pair "$1" seq-read-1M read seq --bs 1M --passes "$PASSES"
	pair "$1" seq-write-1M write seq --bs 1M --passes "$PASSES"
	pair "$1" rand-read-4K read rand --bs 4K --ops "$OPS"
	pair "$1" rand-write-4K write rand --bs 4K --ops "$OPS"
	pair "$1" rand-read-4K-qd4 read rand --bs 4K --ops "$OPS" --threads 4
	pair "$1" rand-write-4K-qd4 write rand --bs 4K --ops "$OPS" --threads 4
}

/bin/blkio fill "$BASE" "$BYTES" || fail "cannot write $BASE"

# ---- mapped chunks folded into linear segments ------------------------------------
if want mapped; then
	rm -f "$COW"
	daemon_start bmap 1
	fill_device bmap
	# The periodic reload (every second) folds the mapped chunks: wait until
	# the table is linear segments only.
	i=0
	while dmsetup table bmap | grep -qv ' linear '; do
		i=$((i + 1))
		[ $i -lt 600 ] || fail "no linear table after 60 s: $(dmsetup table bmap | head -3)"
		usleep 100000
	done
	table=$(dmsetup table bmap)
	info "table after the periodic reload: $table"
	set -- $table
	# One segment: the whole device, onto the COW's loop device.
	[ "$(echo "$table" | wc -l)" = 1 ] && [ "$1" = 0 ] && [ "$2" = "$SECTORS" ] ||
		fail "table is not one linear segment: $table"
	DEV_RAW=/dev/$(grep '^DEVNAME=' "/sys/dev/block/$4/uevent" | cut -d= -f2)
	RAW_OFF=$(($5 * 512))
	[ "$DEV_RAW" = "$(cow_loop)" ] || fail "linear segment on $DEV_RAW, not the COW's loop device"
	DEV_COW=/dev/mapper/bmap
	info "raw: $DEV_RAW from byte $RAW_OFF (the COW's data area, where the segment points)"
	# The same table, made by hand: what any device-mapper device over that
	# region costs.
	dmsetup create blin --noudevsync --verifyudev --table "$table" || fail "dmsetup create blin"
	DEV_LIN=/dev/mapper/blin
	for d in "$DEV_RAW" "$DEV_COW" "$DEV_LIN"; do
		set -- $(stat -L -c '%t %T' "$d")
		q=/sys/dev/block/$((0x$1)):$((0x$2))/queue
		info "$d: max_sectors_kb $(cat $q/max_sectors_kb), logical block $(cat $q/logical_block_size)"
	done
	mapped_cases mapped
	dmsetup remove --noudevsync --verifyudev blin || fail "dmsetup remove blin"
	DEV_LIN=
	dmsetup table bmap | grep -qv ' linear ' && fail "table changed during the runs: $(dmsetup table bmap)"
	daemon_stop
	rm -f "$COW"
fi

# ---- mapped chunks held in the kernel's remap store (no reload) ---------------------
if want store; then
	rm -f "$COW"
	daemon_start bstore 0
	fill_device bstore
	[ "$(dmsetup table bstore | wc -l)" = 1 ] && dmsetup table bstore | grep -q ' cow ' ||
		fail "unexpected table: $(dmsetup table bstore)"
	DEV_COW=/dev/mapper/bstore
	DEV_RAW=$(cow_loop)
	RAW_OFF=$(od -An -t u8 -j 48 -N 8 "$COW" | tr -d ' ')	# header: data_offset
	[ -n "$RAW_OFF" ] && [ $((RAW_OFF % CHUNK)) = 0 ] || fail "bad data_offset '$RAW_OFF'"
	info "raw: $DEV_RAW from byte $RAW_OFF; table: $(dmsetup table bstore)"
	mapped_cases store
	n=$(cow_status bstore 1)
	[ "$n" = "$NCHUNKS" ] || fail "$n chunks in the store, not $NCHUNKS"
	daemon_stop
	rm -f "$COW"
fi

# ---- first writes: dm-cow against dm-snapshot -----------------------------------
SNAP=/tmp/snap.img
first_cow() {	# case run args...
	local c=$1 r=$2 n
	shift 2
	rm -f "$COW"
	daemon_start bfirst 0
	bench first "$c" cow "$r" /dev/mapper/bfirst "$@" --chunk 64K --fsync
	n=$(cow_status bfirst 1)
	[ "$n" = "$NCHUNKS" ] || fail "first $c: $n chunks mapped, not $NCHUNKS"
	daemon_stop
	rm -f "$COW"
}
first_snap() {	# P|N case run args...
	local p=$1 c=$2 r=$3 st alloc
	shift 3
	rm -f "$SNAP"
	truncate -s $((BYTES + 16 * 1048576)) "$SNAP"
	OL=$(losetup -f) && losetup -r "$OL" "$BASE" || fail "losetup $BASE"
	CL=$(losetup -f) && losetup "$CL" "$SNAP" || fail "losetup $SNAP"
	dmsetup create bsnap --noudevsync --verifyudev --table "0 $SECTORS snapshot $OL $CL $p $CS" ||
		fail "dmsetup create snapshot"
	bench first "$c" "snap$p" "$r" /dev/mapper/bsnap "$@" --chunk 64K --fsync
	st=$(dmsetup status bsnap)
	set -- $st	# 0 SECTORS snapshot ALLOCATED/TOTAL METADATA
	alloc=${4%/*}
	[ $((alloc - $5)) = "$SECTORS" ] || fail "first $c snap$p: status $st: not every chunk copied"
	dmsetup remove --noudevsync --verifyudev bsnap || fail "dmsetup remove bsnap"
	losetup -d "$CL" && losetup -d "$OL" || fail "losetup -d"
	rm -f "$SNAP"
}
first_case() {	# case args...
	local c=$1 r=1
	shift
	while [ $r -le "$RUNS" ]; do
		case $((r % 3)) in
		1) first_cow "$c" $r "$@"; first_snap P "$c" $r "$@"; first_snap N "$c" $r "$@" ;;
		2) first_snap P "$c" $r "$@"; first_snap N "$c" $r "$@"; first_cow "$c" $r "$@" ;;
		0) first_snap N "$c" $r "$@"; first_cow "$c" $r "$@"; first_snap P "$c" $r "$@" ;;
		esac
		r=$((r + 1))
	done
}
if want first; then
	first_case seq-64K write chunks-seq --bs 64K
	first_case rand-64K write chunks-rand --bs 64K
	first_case seq-4K write chunks-seq --bs 4K
	first_case rand-4K write chunks-rand --bs 4K
	first_case rand-4K-qd4 write chunks-rand --bs 4K --threads 4
fi

info "free memory at the end: $(grep MemAvailable /proc/meminfo | tr -s ' ')"
echo "BENCH-END ok"
poweroff -f
