#!/bin/bash
# dm-cow VM test suite.
#
#   tests/vm/run.sh OUTDIR
#
# Builds kmod/ against the installed Debian kernel headers, builds the static
# in-guest test programs, packs an initramfs, boots Debian's kernel under
# qemu (software emulation) and runs the tests on its serial console.
# Exits 0 only if every expected test printed PASS and the console shows no
# kernel BUG/WARNING/Oops/Call Trace.
#
# Environment:
#   DMCOW_VM_TESTS=a,b     run only these tests (default: all, see vmtest list)
#   DMCOW_VM_TIMEOUT=270   seconds before the VM is killed
#   DMCOW_TEST_TIMEOUT=60  seconds per test inside the VM
#   KVER=<version>         kernel to use (default: newest *-amd64 installed)
#   DMCOWD=<path>          the dmcowd binary for the daemon tests (default:
#                          build/daemon/dmcowd, built by scripts/build.sh)
#
# Needs: linux-image-amd64 linux-headers-amd64 qemu-system-x86 busybox-static
# dmsetup kmod cpio g++ make e2fsprogs; when run as root on Debian/Ubuntu, missing
# packages are installed with apt-get.
set -euo pipefail

die() { echo "run.sh: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
SRC=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
T0=$(date +%s)

# Shared with bench/vm_bench.sh: packages, kernel, module build, initramfs, boot.
. "$SRC/tests/vm/lib.sh"

vm_packages run.sh
vm_kernel

# ---- module -------------------------------------------------------------------
vm_build_kmod "$OUT"

# ---- test programs ------------------------------------------------------------
CXXFLAGS=(-std=c++20 -O2 -Wall -Wextra -Werror -static -pthread -I"$SRC/kmod")
g++ "${CXXFLAGS[@]}" -o "$OUT/responder" "$SRC/tests/vm/responder.cc"
g++ "${CXXFLAGS[@]}" -DDMCOW_RESPONDER_NO_MAIN -o "$OUT/vmtest" \
	"$SRC/tests/vm/vmtest.cc" "$SRC/tests/vm/responder.cc"
g++ "${CXXFLAGS[@]}" -o "$OUT/daemontest" "$SRC/tests/vm/daemon_test.cc"
DMCOWD=${DMCOWD:-$SRC/build/daemon/dmcowd}
[ -x "$DMCOWD" ] || die "no dmcowd at $DMCOWD (run scripts/build.sh, or set DMCOWD)"

# ---- initramfs ----------------------------------------------------------------
vm_initramfs_begin "$OUT/initramfs"
cp "$OUT/vmtest" "$OUT/responder" "$OUT/daemontest" "$DMCOWD" "$R/bin/"
cp "$SRC/tests/vm/init.sh" "$R/init"
chmod 755 "$R/init"

# e2fsprogs for the file system tests.
E2FS=()
for f in mke2fs e2fsck debugfs; do
	p=$(command -v $f || true)
	[ -n "$p" ] || die "$f not found (Debian package e2fsprogs)"
	cp "$p" "$R/sbin/$f"
	E2FS+=("$p")
done
# Shared libraries (and the loader) of these and dmcowd, at their own paths.
vm_copy_libs "$(command -v dmsetup)" "$DMCOWD" "${E2FS[@]}"

copy_module dm-mod drivers/md/dm-mod
copy_module loop drivers/block/loop
copy_module dm-delay drivers/md/dm-delay
# ext4 and what it needs (modinfo -F depends: jbd2, mbcache, crc16; and the
# crc32c checksum it asks the crypto API for) for daemon_mount.
copy_module crc16 lib/crc16
copy_module crc32c_generic crypto/crc32c_generic
copy_module mbcache fs/mbcache
copy_module jbd2 fs/jbd2/jbd2
copy_module ext4 fs/ext4/ext4
cp "$OUT/kmod/dm-cow.ko" "$R/lib/modules/dm-cow.ko"

vm_pack "$OUT/initramfs.gz"

# ---- boot ---------------------------------------------------------------------
EXPECTED="$("$OUT/vmtest" list) $("$OUT/daemontest" list) module_unload"
APPEND="console=ttyS0 quiet panic=-1"
if [ -n "${DMCOW_VM_TESTS:-}" ]; then
	APPEND="$APPEND dmcow.tests=$DMCOW_VM_TESTS"
	EXPECTED=$(echo "$DMCOW_VM_TESTS" | tr , '\n')
fi
TBOOT=$(date +%s)
vm_boot "$OUT/initramfs.gz" "$APPEND" "${DMCOW_VM_TIMEOUT:-270}" "$OUT/console.log" 512
TEND=$(date +%s)

# ---- verdict ------------------------------------------------------------------
LOG="$OUT/console.log"
fail=0
echo
echo "==== dm-cow VM suite ($KVER): build $((TBOOT - T0)) s, VM $((TEND - TBOOT)) s ===="
[ "$QEMU_RC" = 0 ] || { echo "VM exited with $QEMU_RC (124 = timeout)"; fail=1; }
grep -q 'DMCOW-BOOT ok' "$LOG" || { echo "VM did not boot to the tests"; fail=1; }
for t in $EXPECTED; do
	line=$(grep -o -m1 "DMCOW-TEST $t .*" "$LOG" || true)
	case "$line" in
	"DMCOW-TEST $t PASS"*) echo "PASS  $t" ;;
	"") echo "FAIL  $t (no result)"; fail=1 ;;
	*) echo "FAIL  $t: ${line#DMCOW-TEST $t FAIL }"; fail=1 ;;
	esac
done
if vm_kernel_problems "$LOG"; then
	echo "kernel reported problems (above)"
	fail=1
fi
[ $fail = 0 ] && echo "dm-cow VM suite: all passed" || echo "dm-cow VM suite: FAILED"
exit $fail
