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

# ---- packages -----------------------------------------------------------------
need_pkgs() {
	local missing=0
	ls /lib/modules 2>/dev/null | grep -q amd64 || missing=1
	for f in qemu-system-x86_64 dmsetup cpio g++ make insmod; do
		command -v "$f" >/dev/null 2>&1 || missing=1
	done
	[ -x /bin/busybox ] || missing=1
	return $missing
}
if ! need_pkgs; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
		echo "run.sh: installing packages" >&2
		apt-get update -q >/dev/null
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-image-amd64 \
			linux-headers-amd64 qemu-system-x86 busybox-static dmsetup \
			kmod cpio g++ make >/dev/null
	fi
	need_pkgs || die "missing packages (see the header of $0)"
fi

KVER=${KVER:-$(ls /lib/modules | grep amd64 | sort -V | tail -1)}
KDIR=/lib/modules/$KVER/build
VMLINUZ=/boot/vmlinuz-$KVER
[ -d "$KDIR" ] || die "no kernel headers at $KDIR"
[ -r "$VMLINUZ" ] || die "no kernel image $VMLINUZ"

# ---- module -------------------------------------------------------------------
rm -rf "$OUT/kmod"
mkdir -p "$OUT/kmod"
cp "$SRC"/kmod/Makefile "$SRC"/kmod/Kbuild "$SRC"/kmod/*.c "$SRC"/kmod/*.h "$OUT/kmod/"
make -C "$OUT/kmod" KDIR="$KDIR" >"$OUT/kmod-build.log" 2>&1 ||
	{ cat "$OUT/kmod-build.log"; die "module build failed"; }
if grep -qi "warning:" "$OUT/kmod-build.log"; then
	cat "$OUT/kmod-build.log"
	die "module build has warnings"
fi

# ---- test programs ------------------------------------------------------------
CXXFLAGS=(-std=c++20 -O2 -Wall -Wextra -Werror -static -pthread -I"$SRC/kmod")
g++ "${CXXFLAGS[@]}" -o "$OUT/responder" "$SRC/tests/vm/responder.cc"
g++ "${CXXFLAGS[@]}" -DDMCOW_RESPONDER_NO_MAIN -o "$OUT/vmtest" \
	"$SRC/tests/vm/vmtest.cc" "$SRC/tests/vm/responder.cc"
g++ "${CXXFLAGS[@]}" -o "$OUT/daemontest" "$SRC/tests/vm/daemon_test.cc"
DMCOWD=${DMCOWD:-$SRC/build/daemon/dmcowd}
[ -x "$DMCOWD" ] || die "no dmcowd at $DMCOWD (run scripts/build.sh, or set DMCOWD)"

# ---- initramfs ----------------------------------------------------------------
R="$OUT/initramfs"
rm -rf "$R"
mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/modules}
cp /bin/busybox "$R/bin/busybox"
cp "$OUT/vmtest" "$OUT/responder" "$OUT/daemontest" "$DMCOWD" "$R/bin/"
cp "$SRC/tests/vm/init.sh" "$R/init"
chmod 755 "$R/init"

DMSETUP=$(command -v dmsetup)
cp "$DMSETUP" "$R/sbin/dmsetup"
# e2fsprogs for the file system test (userspace only: no ext4 module needed).
E2FS=()
for f in mke2fs e2fsck debugfs; do
	p=$(command -v $f || true)
	[ -n "$p" ] || die "$f not found (Debian package e2fsprogs)"
	cp "$p" "$R/sbin/$f"
	E2FS+=("$p")
done
# Shared libraries (and the loader) of these and dmcowd, at their own paths.
for lib in $( (for b in "$DMSETUP" "$DMCOWD" "${E2FS[@]}"; do ldd "$b"; done) |
		grep -o '/[^ ]*' | grep -v ':$' | sort -u); do
	mkdir -p "$R$(dirname "$lib")"
	cp -L "$lib" "$R$lib"
done

copy_module() {	# name, path under kernel/
	local base=/lib/modules/$KVER/kernel/$2
	if [ -f "$base.ko" ]; then
		cp "$base.ko" "$R/lib/modules/$1.ko"
	elif [ -f "$base.ko.xz" ]; then
		xz -dc "$base.ko.xz" >"$R/lib/modules/$1.ko"
	elif [ -f "$base.ko.zst" ]; then
		zstd -dcq "$base.ko.zst" >"$R/lib/modules/$1.ko"
	else
		die "module $2 not found for $KVER"
	fi
}
copy_module dm-mod drivers/md/dm-mod
copy_module loop drivers/block/loop
copy_module dm-delay drivers/md/dm-delay
cp "$OUT/kmod/dm-cow.ko" "$R/lib/modules/dm-cow.ko"

(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) >"$OUT/initramfs.gz"

# ---- boot ---------------------------------------------------------------------
EXPECTED="$("$OUT/vmtest" list) $("$OUT/daemontest" list) module_unload"
APPEND="console=ttyS0 quiet panic=-1"
if [ -n "${DMCOW_VM_TESTS:-}" ]; then
	APPEND="$APPEND dmcow.tests=$DMCOW_VM_TESTS"
	EXPECTED=$(echo "$DMCOW_VM_TESTS" | tr , '\n')
fi
TBOOT=$(date +%s)
set +e
timeout "${DMCOW_VM_TIMEOUT:-270}" qemu-system-x86_64 -accel tcg -cpu max \
	-m 512 -nographic -no-reboot -kernel "$VMLINUZ" \
	-initrd "$OUT/initramfs.gz" -append "$APPEND" </dev/null |
	tr -d '\r' | tee "$OUT/console.log"
QEMU_RC=${PIPESTATUS[0]}
set -e
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
if grep -nE 'BUG:|WARNING:|Oops|Call Trace' "$LOG"; then
	echo "kernel reported problems (above)"
	fail=1
fi
[ $fail = 0 ] && echo "dm-cow VM suite: all passed" || echo "dm-cow VM suite: FAILED"
exit $fail
