#!/bin/bash
# dm-cow block I/O in Debian's kernel under qemu, same run, as ratios:
#
#   mapped  every chunk written once and folded by dmcowd's periodic reload
#           into dm-linear segments, then sequential (1 MiB) and random
#           (4 KiB, 1 and 4 in flight) O_DIRECT reads and writes, against the
#           raw loop device over the same data (the COW's loop device, at
#           the data area the linear segment points at);
#   store   the same with the reload off: the mappings stay in dm-cow's
#           in-kernel remap store (for comparison, no goal);
#   first   first writes to unmapped chunks (each chunk written exactly
#           once, in order or at random, whole 64 KiB chunks or 4 KiB, then
#           fdatasync), against dm-snapshot of the same base with the same
#           chunk size, persistent (P) and transient (N).
#
# and for qcow2 images attached with `dmcow-qcow attach` (the qcow2 plugin):
#
#   qmapped  an empty MB MiB image (64 KiB clusters), every cluster written
#            once through the device, folded by the daemon's periodic reload
#            into linear segments; then the mapped cases above against the
#            raw loop device over a raw file with the same content (raw), a
#            dm-linear device over that loop device (lin) and the dm-cow
#            device's table copied by hand (tab);
#   qfirst   first writes into a fresh empty image (each cluster once, in
#            order or at random, 64 KiB or 4 KiB per cluster, fdatasync),
#            against `qemu-nbd -c /dev/nbd0` (its defaults: cache=writeback,
#            aio=threads) on the kernel's nbd driver (nbd);
#   qcomp    reads of a compressed image (`qemu-img convert -c` here, of
#            data deflate halves), each run on a fresh attach / connect: the
#            whole device in order, and random 4 KiB reads, against qemu-nbd;
#   qluks    a LUKS image (qemu-img's default aes-256-xts-plain64) attached
#            with --key-file (dm-crypt does the cryptography): sequential
#            1 MiB and random 4 KiB reads and writes over written clusters,
#            and random 4 KiB first writes, each run on a fresh attach,
#            against qemu-nbd -c on the same image with the same key;
#   qattach  attach time (from the call to its return, and to the first read)
#            and table size for a sparse 64 GiB image with SPARSE_WRITES
#            random 4 KiB writes made by qemu-io here, attached read-only
#            from a read-only virtio disk, against `qemu-nbd -r -c`.
#
# Files live in the VM's tmpfs: a 256 MiB base file, loop devices over it.
# The I/O generator is bench/vm/blkio.cc (static, O_DIRECT pread/pwrite,
# queue depth = threads; see there). Each case runs RUNS times, the targets
# in rotating order; the table gives the median throughput of each and their
# ratio (dm-cow / reference: above 1, dm-cow is faster), with the range of
# the per-run ratios. TCG emulation makes absolute figures meaningless; the
# ratios are the result.
#
# One virtual CPU by default: with -smp 2 under TCG a wakeup of the idle
# vCPU waits for a timer tick (~4 ms), so synchronous I/O measured qemu's
# idle handling (per-run ratios from 0.7 to 10) instead of the devices.
#
#   bench/vm_bench.sh [OUTDIR]          (default /tmp/dmcow-vmbench)
#
# Environment: RUNS=7 MB=256 OPS=65536 (random I/Os per run)
#   BENCH_GROUPS=mapped,store,first,qmapped,qfirst,qcomp,qattach,qluks
#   SPARSE_WRITES=100000  VM_MEM=1024 VM_SMP=1  VM_APPEND=
#   (extra kernel arguments)  BENCH_TIMEOUT=1800 (seconds for the VM)
#   KVER, DMCOWD as for tests/vm/run.sh (dmcow-qcow is taken next to DMCOWD).
# The q groups need qemu-img, qemu-io and qemu-nbd here (qemu-utils); their
# images are made in OUTDIR and kept for later runs (the sparse one takes a
# few minutes and about 100,000 x 64 KiB of disk).
# Exits non-zero, printing no table, if any case could not run.
# Not part of the test suite (scripts/test.sh and CTest do not run it).
set -euo pipefail

die() { echo "vm_bench.sh: $*" >&2; exit 1; }

SRC=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/tmp/dmcow-vmbench}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RUNS=${RUNS:-7}
MB=${MB:-256}
OPS=${OPS:-65536}
BENCH_GROUPS=${BENCH_GROUPS:-mapped,store,first,qmapped,qfirst,qcomp,qattach,qluks}
SPARSE_WRITES=${SPARSE_WRITES:-100000}
VM_MEM=${VM_MEM:-1024}
VM_SMP=${VM_SMP:-1}

. "$SRC/tests/vm/lib.sh"
vm_packages vm_bench.sh
vm_kernel
vm_build_kmod "$OUT"

DMCOWD=${DMCOWD:-$SRC/build/daemon/dmcowd}
[ -x "$DMCOWD" ] || die "no dmcowd at $DMCOWD (run scripts/build.sh, or set DMCOWD)"
# blkio is built static by CMake with the VM test programs (tests/vm/CMakeLists.txt).
BLKIO=${DMCOW_VM_BIN:-$(dirname "$DMCOWD")/../tests/vm}/blkio
[ -x "$BLKIO" ] || die "no $BLKIO (run scripts/build.sh)"
cp "$BLKIO" "$OUT/blkio"

DMCOW_QCOW=$(dirname "$DMCOWD")/dmcow-qcow
[ -x "$DMCOW_QCOW" ] || die "no dmcow-qcow next to $DMCOWD"
DMCOW_IMG=$(dirname "$DMCOWD")/../cli/dmcow-img
[ -x "$DMCOW_IMG" ] || die "no dmcow-img at $DMCOW_IMG (scripts/build.sh builds it)"
QEMU_NBD=$(command -v qemu-nbd) || die "qemu-nbd not found (Debian package qemu-utils)"
for t in qemu-img qemu-io; do
	command -v $t >/dev/null || die "$t not found (Debian package qemu-utils)"
done

# Images for the q groups, made by QEMU's own tools, kept in OUT.
mkdir -p "$OUT/images"
EMPTY=$OUT/images/empty-$MB.qcow2
COMP=$OUT/images/comp-$MB.qcow2
SPARSE=$OUT/images/sparse64g-$SPARSE_WRITES.qcow2
rm -f "$EMPTY"
qemu-img create -q -f qcow2 "$EMPTY" "${MB}M"
if [ ! -s "$COMP" ]; then
	"$OUT/blkio" fill-half "$OUT/images/half.raw" "${MB}M"
	qemu-img convert -c -O qcow2 "$OUT/images/half.raw" "$COMP.tmp"
	rm -f "$OUT/images/half.raw"
	mv "$COMP.tmp" "$COMP"
fi
if [ ! -s "$SPARSE" ] && case ",$BENCH_GROUPS," in *,qattach,*) true ;; *) false ;; esac; then
	echo "vm_bench.sh: writing $SPARSE_WRITES random 4 KiB clusters into a 64 GiB image with qemu-io" >&2
	qemu-img create -q -f qcow2 "$SPARSE.tmp" 64G
	# 4 KiB-aligned offsets in 64 GiB (2^24 slots), seeded: the same image
	# every time.
	awk -v n="$SPARSE_WRITES" 'BEGIN { srand(1); for (i = 0; i < n; i++) printf "write -q -P 1 %.0f 4k\n", int(rand() * 16777216) * 4096 }' \
		>"$OUT/images/sparse.cmds"
	# cache=unsafe: no flush per write (minutes less); check below.
	nice -n 10 qemu-io -t unsafe -f qcow2 "$SPARSE.tmp" <"$OUT/images/sparse.cmds" >"$OUT/images/sparse.log" 2>&1 ||
		{ tail "$OUT/images/sparse.log"; die "qemu-io failed"; }
	grep -qi 'error\|fail' "$OUT/images/sparse.log" && { tail "$OUT/images/sparse.log"; die "qemu-io reported errors"; }
	qemu-img check -q "$SPARSE.tmp" || die "qemu-img check $SPARSE.tmp failed"
	mv "$SPARSE.tmp" "$SPARSE"
fi
[ -s "$SPARSE" ] || SPARSE=$EMPTY	# qattach not wanted: any disk will do

vm_initramfs_begin "$OUT/initramfs" "$SRC/bench/vm/init.sh"
cp "$OUT/blkio" "$DMCOWD" "$DMCOW_QCOW" "$QEMU_NBD" "$DMCOW_IMG" "$(command -v qemu-img)" "$R/bin/"
mkdir -p "$R/qcow"
cp "$EMPTY" "$R/qcow/empty.qcow2"
# qattach: a 16 TiB image holding 1 MiB at its start, middle and end (a
# few MiB of file: it travels in the initramfs).
qemu-img create -q -f qcow2 "$R/qcow/sparse16t.qcow2" 16T
qemu-io -t unsafe -c "write -q -P 7 0 1M" -c "write -q -P 8 8T 1M" -c "write -q -P 9 $(((16 << 40) - (1 << 20))) 1M" \
	"$R/qcow/sparse16t.qcow2" >/dev/null
vm_copy_libs "$(command -v dmsetup)" "$DMCOWD" "$DMCOW_QCOW" "$QEMU_NBD" "$DMCOW_IMG" "$(command -v qemu-img)"
vm_modules $VM_MODS_DM dm-bufio:drivers/md/dm-bufio dm-snapshot:drivers/md/dm-snapshot
vm_module_file dm-cow "$OUT/kmod/dm-cow.ko"
vm_modules dm-zero:drivers/md/dm-zero nbd:drivers/block/nbd $VM_MODS_VIRTIO_BLK
# qluks: dm-crypt, XTS, and the AES-NI driver a real machine loads (qemu's
# -cpu max has AES-NI; qemu-nbd's crypto library uses it as well).
vm_modules dm-crypt:drivers/md/dm-crypt ecb:crypto/ecb xts:crypto/xts cryptd:crypto/cryptd \
	crypto_simd:crypto/crypto_simd aesni-intel:arch/x86/crypto/aesni-intel
vm_pack "$OUT/initramfs.gz"

APPEND="console=ttyS0 quiet panic=-1 ${VM_APPEND:-} bench.runs=$RUNS bench.mb=$MB bench.ops=$OPS bench.groups=$BENCH_GROUPS"
echo "vm_bench.sh: booting; the console goes to $OUT/console.log" >&2
T0=$(date +%s)
# /dev/vda: the sparse image, /dev/vdb: the compressed one (both read-only).
vm_boot "$OUT/initramfs.gz" "$APPEND" "${BENCH_TIMEOUT:-1800}" "$OUT/console.log" "$VM_MEM" -smp "$VM_SMP" \
	-drive file="$SPARSE",format=raw,if=virtio,readonly=on -drive file="$COMP",format=raw,if=virtio,readonly=on >/dev/null
T1=$(date +%s)

LOG="$OUT/console.log"
[ "$QEMU_RC" = 0 ] || die "VM exited with $QEMU_RC (124 = timeout); see $LOG"
if grep -m1 '^BENCH-FAIL' "$LOG"; then
	die "a case could not run; see $LOG"
fi
grep -q '^BENCH-END ok' "$LOG" || die "the VM did not finish the benchmarks; see $LOG"
if vm_kernel_problems "$LOG"; then
	die "kernel reported problems (above)"
fi

echo "dm-cow VM benchmarks: kernel $KVER, qemu TCG, -m $VM_MEM -smp $VM_SMP, VM $((T1 - T0)) s"
grep '^BENCH-INFO' "$LOG" | sed 's/^BENCH-INFO /  /'
echo
# ratio_table MARKER KIND: the "MARKER group case target run ..." lines as a
# table of medians per (group, case, target), the ratio and the per-run
# ratios' range (paired by run number). KIND rate (BENCH: MB/s in field 7,
# IOPS in 8): ratio dm-cow / reference. KIND time (BENCH-TIME: seconds in
# field 6): ratio reference / dm-cow. Either way above 1, dm-cow is faster.
# Exits non-zero if a run is missing.
ratio_table() {
	grep "^$1 " "$LOG" | awk -v runs="$RUNS" -v kind="$2" '
	function median(list,   a, n, i, j, t) {
		n = split(list, a, " ")
		for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
		return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
	}
	function faster(cow, ref) { return kind == "time" ? ref / cow : cow / ref }
	{
		key = $2 SUBSEP $3 SUBSEP $4
		v = kind == "time" ? $6 : $7
		vals[key] = vals[key] " " v
		iops[key] = iops[key] " " $8
		run[key, $5] = v
		count[key]++
		if (!(($2 SUBSEP $3) in seen)) { seen[$2 SUBSEP $3] = 1; order[++n] = $2 SUBSEP $3 }
		if (!(($2 SUBSEP $4) in tseen)) { tseen[$2 SUBSEP $4] = 1; targets[$2] = targets[$2] " " $4 }
	}
	END {
		if (kind == "time") {
			printf "| group | case | target | dm-cow s | target s | ratio target/dm-cow | per-run ratios |\n"
			printf "|---|---|---|---|---|---|---|\n"
		} else {
			printf "| group | case | target | dm-cow MB/s | target MB/s | dm-cow IOPS | target IOPS | ratio | per-run ratios |\n"
			printf "|---|---|---|---|---|---|---|---|---|\n"
		}
		bad = 0
		for (i = 1; i <= n; i++) {
			split(order[i], gc, SUBSEP)
			ck = gc[1] SUBSEP gc[2] SUBSEP "cow"
			if (count[ck] != runs) { print "missing runs for " gc[1] " " gc[2] " cow" > "/dev/stderr"; bad = 1; continue }
			nt = split(targets[gc[1]], ts, " ")
			for (k = 1; k <= nt; k++) {
				if (ts[k] == "cow") continue
				tk = gc[1] SUBSEP gc[2] SUBSEP ts[k]
				if (count[tk] != runs) { print "missing runs for " gc[1] " " gc[2] " " ts[k] > "/dev/stderr"; bad = 1; continue }
				lo = 1e18; hi = 0
				for (r = 1; r <= runs; r++) {
					q = faster(run[ck, r], run[tk, r])
					if (q < lo) lo = q
					if (q > hi) hi = q
				}
				cm = median(vals[ck]); tm = median(vals[tk])
				if (kind == "time")
					printf "| %s | %s | %s | %.3f | %.3f | **%.2f** | %.2f-%.2f |\n", gc[1], gc[2], ts[k], cm, tm, faster(cm, tm), lo, hi
				else
					printf "| %s | %s | %s | %.1f | %.1f | %.0f | %.0f | **%.2f** | %.2f-%.2f |\n", gc[1], gc[2], ts[k],
						cm, tm, median(iops[ck]), median(iops[tk]), faster(cm, tm), lo, hi
			}
		}
		exit bad
	}'
}
# Throughput (every group but qattach), then times (qattach).
if grep -q '^BENCH ' "$LOG"; then
	ratio_table BENCH rate
fi
if grep -q '^BENCH-TIME ' "$LOG"; then
	echo
	ratio_table BENCH-TIME time
fi
if grep -q '^BENCH-TABLE ' "$LOG"; then
	echo
	# BENCH-TABLE NAME RUN LINES STORE_CHUNKS: the same every run.
	grep '^BENCH-TABLE ' "$LOG" | awk '{ t[$2] = t[$2] " " $4 "/" $5 } END { for (d in t) print "table of " d " (lines/chunks in the kernel store, per run):" t[d] }'
fi
