#!/bin/busybox sh
# /init of the benchmark VM (bench/vm_bench.sh): dm-cow against the raw loop
# device and against dm-snapshot, all on files in this VM's tmpfs; qcow2
# images attached with dmcow-qcow against the raw loop device and against
# qemu-nbd on the kernel's nbd driver.
# Console lines (parsed by vm_bench.sh):
#   BENCH-BOOT ok
#   BENCH <group> <case> <target> <run> <seconds> <MB/s> <IOPS>
#   BENCH-TIME <group> <case> <target> <run> <seconds>
#   BENCH-INFO <text>
#   BENCH-FAIL <why>      and nothing more: the run is void
#   BENCH-END ok
# Kernel command line: bench.runs=N bench.mb=N bench.ops=N
# bench.groups=mapped,store,first,qmapped,qfirst,qcomp,qattach,qluks (default all).
# The q groups find their images where vm_bench.sh puts them: /qcow/empty.qcow2
# (MB MiB, nothing allocated) in the initramfs, the compressed image on
# /dev/vdb and the sparse 64 GiB image on /dev/vda (read-only virtio disks).
/bin/busybox --install -s /bin

fail() {
	echo "BENCH-FAIL $*"
	[ -f /tmp/dmcowd.log ] && tail -n 20 /tmp/dmcowd.log
	poweroff -f
	exit 1
}
boot_failed() { fail "$@"; }
info() { echo "BENCH-INFO $*"; }

. /prologue.sh
vm_prologue size=85%
echo 5 > /proc/sys/kernel/printk
echo
echo "BENCH-BOOT ok"

RUNS=7
MB=256
OPS=65536
GROUPS_=mapped,store,first,qmapped,qfirst,qcomp,qattach,qluks
DEV_LIN=
DEV_TAB=
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
	until [ -e "/dev/mapper/$1" ] && dmsetup status "$1" 2>/dev/null | grep -qE ' ready( |$)'; do
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
# set, on a plain dm-linear device over that same region (and, if DEV_TAB is
# set, on a hand-made copy of the dm-cow device's table); the order rotates
# from run to run.
pair() {
	local g=$1 c=$2 r=1 t
	shift 2
	while [ $r -le "$RUNS" ]; do
		if [ -z "$DEV_TAB" ]; then
			case $((r % 3)) in
			1) order="cow raw lin" ;;
			2) order="raw lin cow" ;;
			0) order="lin cow raw" ;;
			esac
		else
			case $((r % 4)) in
			1) order="cow raw lin tab" ;;
			2) order="raw lin tab cow" ;;
			3) order="lin tab cow raw" ;;
			0) order="tab cow raw lin" ;;
			esac
		fi
		for t in $order; do
			case $t in
			cow) bench "$g" "$c" cow $r "$DEV_COW" "$@" ;;
			raw) bench "$g" "$c" raw $r "$DEV_RAW" "$@" --offset "$RAW_OFF" --size "$BYTES" ;;
			lin) [ -z "$DEV_LIN" ] || bench "$g" "$c" lin $r "$DEV_LIN" "$@" ;;
			tab) [ -z "$DEV_TAB" ] || bench "$g" "$c" tab $r "$DEV_TAB" "$@" ;;
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

if want mapped || want store || want first; then
	/bin/blkio fill "$BASE" "$BYTES" || fail "cannot write $BASE"
fi

# ---- mapped chunks folded into linear segments ------------------------------------
if want mapped; then
	rm -f "$COW"
	daemon_start bmap 1
	fill_device bmap
	# The periodic reload (every second) folds the mapped chunks: wait until
	# the table is one linear segment and the one-chunk cow target the daemon
	# always keeps at the end (its channel lives with a cow target).
	i=0
	until [ "$(dmsetup table bmap | awk '{ print $3 }' | tr '\n' ' ')" = "linear cow " ]; do
		i=$((i + 1))
		[ $i -lt 600 ] || fail "no linear table after 60 s: $(dmsetup table bmap | head -3)"
		usleep 100000
	done
	table=$(dmsetup table bmap)
	info "table after the periodic reload: $table"
	set -- $(echo "$table" | head -1)
	# The segment: all but the last chunk, onto the COW's loop device; the
	# fill wrote in order, so the last chunk follows it there.
	[ "$1" = 0 ] && [ "$2" = $((SECTORS - CS)) ] || fail "table is not one linear segment: $table"
	DEV_RAW=/dev/$(grep '^DEVNAME=' "/sys/dev/block/$4/uevent" | cut -d= -f2)
	RAW_OFF=$(($5 * 512))
	[ "$DEV_RAW" = "$(cow_loop)" ] || fail "linear segment on $DEV_RAW, not the COW's loop device"
	DEV_COW=/dev/mapper/bmap
	info "raw: $DEV_RAW from byte $RAW_OFF (the COW's data area, where the segment points)"
	# The whole region as one table made by hand: what any device-mapper
	# device over it costs.
	dmsetup create blin --noudevsync --verifyudev --table "0 $SECTORS linear $4 $5" || fail "dmsetup create blin"
	DEV_LIN=/dev/mapper/blin
	for d in "$DEV_RAW" "$DEV_COW" "$DEV_LIN"; do
		set -- $(stat -L -c '%t %T' "$d")
		q=/sys/dev/block/$((0x$1)):$((0x$2))/queue
		info "$d: max_sectors_kb $(cat $q/max_sectors_kb), logical block $(cat $q/logical_block_size)"
	done
	mapped_cases mapped
	dmsetup remove --noudevsync --verifyudev blin || fail "dmsetup remove blin"
	DEV_LIN=
	[ "$(dmsetup table bmap)" = "$table" ] || fail "table changed during the runs: $(dmsetup table bmap)"
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

# ---- qcow2 images attached with dmcow-qcow ---------------------------------------
QEMPTY=/qcow/empty.qcow2
# qattach NAME IMAGE [attach options]: dmcow-qcow attach, or the run is void.
qattach() {
	local n=$1 img=$2 out
	shift 2
	out=$(/bin/dmcow-qcow attach --name "$n" "$@" "$img" 2>&1) || fail "dmcow-qcow attach $n $img: $out"
	[ "$out" = "/dev/mapper/$n" ] || fail "dmcow-qcow attach $n printed '$out'"
}
# bench_time GROUP CASE TARGET RUN CMD...: CMD timed by `blkio time` (its
# stdout dropped), as a BENCH-TIME line; the bench fails if CMD fails or no
# time comes back.
bench_time() {
	local g=$1 c=$2 t=$3 r=$4 out secs
	shift 4
	out=$(/bin/blkio time "$@" 2>&1 >/dev/null) || fail "$g $c $t: $*: $out"
	secs=$(echo "$out" | sed -n 's/^TIME //p')
	[ -n "$secs" ] || fail "$g $c $t: no time: $out"
	echo "BENCH-TIME $g $c $t $r $secs"
}
qdetach() {	# name
	local out
	out=$(/bin/dmcow-qcow detach "$1" 2>&1) || fail "dmcow-qcow detach $1: $out"
	[ ! -e "/dev/mapper/$1" ] || fail "/dev/mapper/$1 still there after detach"
}
# qemu-nbd -c with its defaults (cache=writeback, aio=threads, no
# detect-zeroes), the format named as users do. With -c it daemonizes and
# returns once it has handed the socket to the kernel; the nbd driver sets
# the device's size when qemu-nbd's NBD_DO_IT starts, a moment later: ready
# means a non-zero size.
NBD_PIDF=/tmp/qemu-nbd.pid
# With Q_KEY set (a key file), the image is a LUKS image opened with it.
nbd_cmd() {	# image [qemu-nbd options]: the shell command that connects /dev/nbd0
	local img=$1 what
	shift
	what="-f qcow2 $* $img"
	[ -z "${Q_KEY:-}" ] ||
		what="--object secret,id=s0,file=$Q_KEY $* --image-opts driver=qcow2,file.filename=$img,encrypt.key-secret=s0"
	echo "/bin/qemu-nbd --pid-file $NBD_PIDF $what -c /dev/nbd0 && i=0 &&
		while [ \"\$(cat /sys/block/nbd0/size)\" = 0 ]; do i=\$((i + 1)); [ \$i -lt 30000 ] || exit 1; usleep 1000; done"
}
nbd_connect() {	# image [qemu-nbd options]
	local out
	rm -f "$NBD_PIDF"
	out=$(/bin/sh -c "$(nbd_cmd "$@")" 2>&1) || fail "qemu-nbd -c $1: $out"
}
alive() {	# pid: running (a zombie is not)
	[ -d "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}
nbd_disconnect() {
	local pid out i=0
	pid=$(cat "$NBD_PIDF" 2>/dev/null) || fail "no qemu-nbd pid file"
	out=$(/bin/qemu-nbd -d /dev/nbd0 2>&1) || fail "qemu-nbd -d /dev/nbd0: $out"
	while alive "$pid"; do
		i=$((i + 1))
		[ $i -lt 1500 ] || fail "qemu-nbd $pid still running 30 s after -d"
		usleep 20000
	done
	[ "$(cat /sys/block/nbd0/size)" = 0 ] || fail "/dev/nbd0 still connected after -d"
}
# qtable NAME: one line, the table's size: lines, linear lines, cow lines,
# and the chunks dm-cow's in-kernel store holds (one store per device: every
# cow target's status shows the same count).
qtable() {
	dmsetup table "$1" | awk '{ n++; k[$3]++ } END { printf "%d lines (%d linear, %d cow)", n, k["linear"], k["cow"] }'
	dmsetup status "$1" | awk '$3 == "cow" { s = $4; exit } END { printf ", %d chunks in the kernel store\n", s }'
}

# Allocated clusters, folded into linear segments: the attached image against
# a raw file with the same content on a loop device, a dm-linear device over
# that loop device, and the dm-cow device's own table copied by hand.
if want qmapped; then
	QM=/tmp/qm.qcow2
	cp "$QEMPTY" "$QM" || fail "cp $QEMPTY"
	qattach qm "$QM"
	[ "$(blockdev --getsize64 /dev/mapper/qm)" = "$BYTES" ] || fail "qm is not $BYTES bytes"
	out=$(/bin/blkio /dev/mapper/qm write seq --bs 64K --fsync 2>&1) || fail "fill qm: $out"
	info "qcow2 fill (every cluster's first write, whole clusters in order, fdatasync): $out"
	# The daemon's periodic reload (every 10 s) folds the clusters: wait for
	# a table of linear segments and at most one cow target of one cluster
	# (the daemon keeps one chunk under dm-cow).
	i=0
	until dmsetup table qm | awk '$3 == "cow" { c++; if ($2 > 128) bad = 1 } $3 != "cow" && $3 != "linear" { bad = 1 }
			END { exit (bad || c > 1) }'; do
		i=$((i + 1))
		[ $i -lt 600 ] || fail "qm not folded after 60 s: $(dmsetup table qm | head -3)"
		usleep 100000
	done
	info "qm table after the periodic reload: $(qtable qm)"
	dmsetup table qm | head -4 | while read -r l; do info "  qm: $l"; done
	dmsetup table qm-store | while read -r l; do info "  qm-store: $l"; done
	dd if=/dev/mapper/qm of=/tmp/qm.raw bs=1M 2>/dev/null || fail "copy qm to a raw file"
	[ "$(stat -c %s /tmp/qm.raw)" = "$BYTES" ] || fail "raw copy is not $BYTES bytes"
	DEV_RAW=$(losetup -f) && losetup "$DEV_RAW" /tmp/qm.raw || fail "losetup /tmp/qm.raw"
	RAW_OFF=0
	DEV_COW=/dev/mapper/qm
	dmsetup create qlin --noudevsync --verifyudev --table "0 $SECTORS linear $DEV_RAW 0" || fail "dmsetup create qlin"
	DEV_LIN=/dev/mapper/qlin
	dmsetup table qm | awk -v raw="$DEV_RAW" '$3 == "cow" { print $1, $2, "linear", raw, $1; next } { print }' |
		dmsetup create qtab --noudevsync --verifyudev ||
		fail "dmsetup create qtab"
	DEV_TAB=/dev/mapper/qtab
	info "raw: $DEV_RAW over /tmp/qm.raw (the device's content); lin: dm-linear over it; tab: qm's table by hand (its cow target as linear onto the raw loop device)"
	mapped_cases qmapped
	dmsetup remove --noudevsync --verifyudev qtab || fail "dmsetup remove qtab"
	dmsetup remove --noudevsync --verifyudev qlin || fail "dmsetup remove qlin"
	DEV_LIN=
	DEV_TAB=
	losetup -d "$DEV_RAW" || fail "losetup -d"
	dmsetup table qm | grep -q ' linear ' || fail "qm's table changed during the runs: $(qtable qm)"
	qdetach qm
	rm -f "$QM" /tmp/qm.raw
fi

# fresh_pair GROUP CASE SOURCE ATTACH-OPTS -- BLKIO-ARGS...: RUNS runs, each
# on a fresh attach of SOURCE (a fresh copy of it if it is the empty image)
# with dmcow-qcow and with qemu-nbd, alternating which goes first.
fresh_one() {	# target group case run source blkio-args...
	local t=$1 g=$2 c=$3 r=$4 src=$5 img dev
	shift 5
	img=$src
	if is_empty_source "$src"; then
		img=/tmp/qf.qcow2
		cp "$src" "$img" || fail "cp $src"
	fi
	case $t in
	cow) qattach qf "$img" ${Q_KEY:+--key-file "$Q_KEY"}; dev=/dev/mapper/qf ;;
	nbd) nbd_connect "$img"; dev=/dev/nbd0 ;;
	esac
	bench "$g" "$c" "$t" "$r" "$dev" "$@"
	case $t in
	cow) qdetach qf ;;
	nbd) nbd_disconnect ;;
	esac
	if is_empty_source "$src"; then
		# Every cluster allocated: the image holds at least the data.
		[ "$(stat -c %s "$img")" -ge "$BYTES" ] || fail "$g $c $t: image has $(stat -c %s "$img") bytes after the writes"
		rm -f "$img"
	fi
}
is_empty_source() { [ "$1" = "$QEMPTY" ] || [ "$1" = "${QLE:-}" ]; }
fresh_pair() {	# group case source blkio-args...
	local g=$1 c=$2 src=$3 r=1
	shift 3
	while [ $r -le "$RUNS" ]; do
		if [ $((r % 2)) = 1 ]; then
			fresh_one cow "$g" "$c" $r "$src" "$@"
			fresh_one nbd "$g" "$c" $r "$src" "$@"
		else
			fresh_one nbd "$g" "$c" $r "$src" "$@"
			fresh_one cow "$g" "$c" $r "$src" "$@"
		fi
		r=$((r + 1))
	done
}

# First writes into an empty image: each cluster written once, then fdatasync.
if want qfirst; then
	fresh_pair qfirst seq-64K "$QEMPTY" write chunks-seq --bs 64K --chunk 64K --fsync
	fresh_pair qfirst rand-64K "$QEMPTY" write chunks-rand --bs 64K --chunk 64K --fsync
	fresh_pair qfirst seq-4K "$QEMPTY" write chunks-seq --bs 4K --chunk 64K --fsync
	fresh_pair qfirst rand-4K "$QEMPTY" write chunks-rand --bs 4K --chunk 64K --fsync
fi

# Reads of a compressed image (qemu-img convert -c on the host, on /dev/vdb):
# the whole device in order, and random 4 KiB reads (as many as clusters),
# each run on a fresh attach (nothing decompressed yet).
if want qcomp; then
	QC=/tmp/qc.qcow2
	[ -b /dev/vdb ] || fail "no /dev/vdb (the compressed image)"
	cat /dev/vdb >"$QC" || fail "copy /dev/vdb"
	info "compressed image: $(stat -c %s "$QC") bytes for $MB MiB"
	# What an assembled chunk's 64 KiB cost the page cache here (the
	# daemon's scratch file is on this tmpfs too), in us.
	out=$(/bin/blkio scratch-cost /tmp) || fail "blkio scratch-cost"
	info "scratch writes, us per 64 KiB: $(echo "$out" | sed -n 's/^SCRATCH-COST //p' | tr '\n' ' ')"
	fresh_pair qcomp seq-read-1M "$QC" read seq --bs 1M
	fresh_pair qcomp seq-read-64K "$QC" read seq --bs 64K
	fresh_pair qcomp rand-read-4K "$QC" read rand --bs 4K --ops $((BYTES / 65536))
	# What the decompressors alone cost here: the same image converted to raw
	# by each engine (dmcow-img: libdeflate, ISA-L for what it refuses; qemu-img: zlib), no device.
	r=1
	while [ $r -le "$RUNS" ]; do
		for t in cow qemu-img; do
			case $t in
			cow) cmd="/bin/dmcow-img convert -O raw $QC /tmp/qc.raw" ;;
			qemu-img) cmd="/bin/qemu-img convert -O raw $QC /tmp/qc.raw" ;;
			esac
			bench_time qconvert to-raw $t $r /bin/sh -c "$cmd"
			rm -f /tmp/qc.raw
		done
		r=$((r + 1))
	done
	rm -f "$QC"
fi

# LUKS images (qemu-img's default cipher, aes-256-xts-plain64) made here by
# qemu-img, against qemu-nbd -c with the same image and key: dm-cow maps the
# clusters onto a dm-crypt device and the kernel does the cryptography;
# qemu-nbd decrypts in userspace. An MB MiB image, every cluster written
# once (through dmcow-qcow), then per run on a fresh attach / connect:
# sequential 1 MiB and random 4 KiB reads and writes (overwrites); and
# first writes (random 4 KiB into each cluster of a fresh empty LUKS image,
# which the daemon fills, encrypted, around each write).
if want qluks; then
	Q_KEY=/tmp/luks.key
	QLE=/tmp/qle.qcow2
	QL=/tmp/ql.qcow2
	printf 'bench passphrase' >"$Q_KEY"
	for try in 1 2 3 4 5; do	# qemu-img's key derivation timing sometimes gives up
		out=$(/bin/qemu-img create -q -f qcow2 --object secret,id=s0,file=$Q_KEY \
			-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 "$QLE" "$BYTES" 2>&1) && break
	done
	[ -f "$QLE" ] && [ -z "$out" ] || fail "qemu-img create (LUKS): $out"
	cp "$QLE" "$QL" || fail "cp $QLE"
	qattach ql "$QL" --key-file "$Q_KEY"
	out=$(/bin/blkio /dev/mapper/ql write seq --bs 1M --fsync 2>&1) || fail "fill ql: $out"
	info "LUKS fill (whole image, 1 MiB in order, fdatasync): $out"
	info "ql-crypt: $(dmsetup table ql-crypt | awk '{ print $3, $4, $5 }')"
	qdetach ql
	L_OPS=$((BYTES / 65536))
	fresh_pair qluks seq-read-1M "$QL" read seq --bs 1M
	fresh_pair qluks seq-write-1M "$QL" write seq --bs 1M --fsync
	fresh_pair qluks rand-read-4K "$QL" read rand --bs 4K --ops $L_OPS
	fresh_pair qluks rand-write-4K "$QL" write rand --bs 4K --ops $L_OPS --fsync
	fresh_pair qluks first-rand-4K "$QLE" write chunks-rand --bs 4K --chunk 64K --fsync
	info "crypto drivers: $(awk '/^driver/ { print $3 }' /proc/crypto | grep -E 'aes|xts' | sort -u | tr '\n' ' ')"
	Q_KEY=
	rm -f "$QL" "$QLE"
fi

# Attach time and table size: a sparse 64 GiB image with scattered clusters
# (/dev/vda, read-only), attached read-only from the block device; from the
# call to its return, and to the first 4 KiB read from the device.
if want qattach; then
	[ -b /dev/vda ] || fail "no /dev/vda (the sparse image)"
	info "sparse image on /dev/vda: $(blockdev --getsize64 /dev/vda) bytes"
	r=1
	while [ $r -le "$RUNS" ]; do
		for t in cow nbd; do
			case $t in
			cow) cmd="/bin/dmcow-qcow attach --read-only --name qs /dev/vda"; dev=/dev/mapper/qs ;;
			nbd) rm -f "$NBD_PIDF"; cmd=$(nbd_cmd /dev/vda -r); dev=/dev/nbd0 ;;
			esac
			bench_time qattach attach $t $r /bin/sh -c "$cmd"
			bench_time qattach first-read $t $r /bin/blkio "$dev" read seq --bs 4K --size 4K
			[ "$(blockdev --getsize64 "$dev")" = $((64 << 30)) ] || fail "$dev is not 64 GiB"
			case $t in
			cow)
				[ $r = 1 ] && for d in qs qs-store qs-base; do info "table $d: $(qtable $d)"; done
				echo "BENCH-TABLE qs $r $(dmsetup table qs | wc -l) $(dmsetup status qs | awk '$3 == "cow" { s = $4; exit } END { print s + 0 }')"
				qdetach qs ;;
			nbd) nbd_disconnect ;;
			esac
		done
		r=$((r + 1))
	done
	# The rest of the image is scanned in the background and folded by a
	# reload when the scan ends: time until the table holds the folded runs.
	/bin/dmcow-qcow attach --read-only --name qs /dev/vda >/dev/null || fail "attach qs"
	t=0
	while [ "$(dmsetup table qs | wc -l)" -lt 1000 ]; do
		[ $t -lt 1200 ] || fail "qs not folded after 120 s: $(qtable qs)"
		usleep 100000
		t=$((t + 1))
	done
	info "qs folded after the background scan: $(qtable qs), about $((t / 10)).$((t % 10)) s after attach returned"
	qdetach qs
	# A 16 TiB image with 3 MiB of data, from a file.
	S16=/qcow/sparse16t.qcow2
	r=1
	while [ $r -le "$RUNS" ]; do
		for t in cow nbd; do
			case $t in
			cow) cmd="/bin/dmcow-qcow attach --read-only --name q16 $S16"; dev=/dev/mapper/q16 ;;
			nbd) rm -f "$NBD_PIDF"; cmd=$(nbd_cmd $S16 -r); dev=/dev/nbd0 ;;
			esac
			bench_time qattach attach-16t $t $r /bin/sh -c "$cmd"
			bench_time qattach first-read-16t $t $r /bin/blkio "$dev" read seq --bs 4K --size 4K
			[ "$(blockdev --getsize64 "$dev")" = $((16 << 40)) ] || fail "$dev is not 16 TiB"
			case $t in
			cow) qdetach q16 ;;
			nbd) nbd_disconnect ;;
			esac
		done
		r=$((r + 1))
	done
fi

info "free memory at the end: $(grep MemAvailable /proc/meminfo | tr -s ' ')"
echo "BENCH-END ok"
poweroff -f
