#!/bin/bash
# dm-cow VM test suite.
#
#   tests/vm/run.sh OUTDIR
#
# Builds kmod/ against the installed Debian kernel headers, takes the static
# in-guest test programs CMake built, packs an initramfs, boots Debian's kernel under
# qemu (software emulation) and runs the tests on its serial console.
# Exits 0 only if every expected test printed PASS and the console shows no
# kernel BUG/WARNING/Oops/Call Trace.
#
# Environment:
#   DMCOW_VM_TESTS=a,b     run only these tests (default: all, see vmtest list)
#   DMCOW_VM_TIMEOUT=480   seconds before the VM is killed
#   DMCOW_TEST_TIMEOUT=60  seconds per test inside the VM
#   KVER=<version>         kernel to use (default: newest *-amd64 installed)
#   DMCOW_VM_BIN=<dir>     the static in-guest programs (default: tests/vm
#                          of the build holding DMCOWD, or build/tests/vm)
#   DMCOWD=<path>          the dmcowd binary for the daemon tests (default:
#                          build/daemon/dmcowd, built by scripts/build.sh);
#                          dmcow-qcow, the unit and the nbdkit plugin are
#                          taken from the same build
#   DMCOW_INSTALLED=<root> run the dmcow Debian package's files unpacked
#                          under ROOT instead (CI; lib.sh vm_dmcow_binaries)
#   DMCOW_KO=<path>        the dm-cow.ko to load (default: built here from kmod/;
#                          CI: the one DKMS built from the Debian package)
#
# Needs: linux-image-amd64 linux-headers-amd64 qemu-system-x86 busybox-static
# dmsetup kmod cpio g++ make e2fsprogs fdisk udev; when run as root on Debian/Ubuntu, missing
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

# ---- test programs (static, built by CMake with the rest: tests/vm/CMakeLists.txt)
vm_dmcow_binaries
[ -x "$DMCOW_IMG" ] || die "no dmcow-img at $DMCOW_IMG (run scripts/build.sh, or set DMCOW_IMG)"
[ -f "$DMCOW_UNIT" ] || die "no $DMCOW_UNIT (run scripts/build.sh)"
[ -f "$NBDKIT_PLUGIN" ] || die "no nbdkit plugin at $NBDKIT_PLUGIN (run scripts/build.sh)"
if [ -n "${DMCOW_INSTALLED:-}" ]; then
	VM_BIN=${DMCOW_VM_BIN:-$SRC/build/tests/vm}
else
	VM_BIN=${DMCOW_VM_BIN:-$(dirname "$DMCOWD")/../tests/vm}
fi
for p in responder vmtest daemontest qcowtest; do
	[ -x "$VM_BIN/$p" ] || die "no $VM_BIN/$p (run scripts/build.sh, or set DMCOW_VM_BIN)"
	cp "$VM_BIN/$p" "$OUT/$p"
done
command -v qemu-img >/dev/null || die "qemu-img not found (Debian package qemu-utils)"

# ---- initramfs ----------------------------------------------------------------
vm_initramfs_begin "$OUT/initramfs" "$SRC/tests/vm/init.sh"
cp "$OUT/vmtest" "$OUT/responder" "$OUT/daemontest" "$OUT/qcowtest" "$DMCOWD" "$DMCOW_QCOW" "$R/bin/"
# The boot-time unit as built (qcow_dmcowtab runs its ExecStart/ExecStop),
# its commands' path leading to our dmcow-qcow.
mkdir -p "$R/lib/systemd/system"
cp "$DMCOW_UNIT" "$R/lib/systemd/system/"
UNIT_SBIN=$(sed -n 's|^ExecStart=\(.*\)/dmcow-qcow .*|\1|p' "$DMCOW_UNIT")
mkdir -p "$R$UNIT_SBIN"
ln -sf /bin/dmcow-qcow "$R$UNIT_SBIN/dmcow-qcow"
# Images for qcowtest, made by the real qemu-img here.
mkdir -p "$R/qcow"
"$SRC/tests/vm/qcow_inputs.sh" "$R/qcow/in"

# e2fsprogs for the file system tests.
E2FS=()
for f in mke2fs e2fsck debugfs; do
	p=$(command -v $f || true)
	[ -n "$p" ] || die "$f not found (Debian package e2fsprogs)"
	cp "$p" "$R/sbin/$f"
	E2FS+=("$p")
done
BONNIE=$(command -v bonnie++ || true)
[ -n "$BONNIE" ] || die "bonnie++ not found (Debian package bonnie++)"
cp "$BONNIE" "$R/sbin/bonnie++"
# qemu-io: QEMU itself, for the lock test (QEMU refuses what we attached).
QEMU_IO=$(command -v qemu-io)
cp "$QEMU_IO" "$R/bin/qemu-io"
# nbdkit with our plugin, and the kernel's NBD client (qcow_nbd).
NBDKIT=$(command -v nbdkit || true)
NBD_CLIENT=$(command -v nbd-client || true)
[ -n "$NBDKIT" ] && [ -n "$NBD_CLIENT" ] || die "nbdkit or nbd-client not found (Debian packages nbdkit, nbd-client)"
cp "$NBDKIT" "$R/bin/nbdkit"
cp "$NBD_CLIENT" "$R/sbin/nbd-client"
cp "$NBDKIT_PLUGIN" "$R/lib/nbdkit-dmcow-plugin.so"
# udevd with device-mapper's rules (from dmsetup) for qcow_udev: attach
# returns once udev's rules ran (libdevmapper's udev cookie).
UDEVADM=$(command -v udevadm || true)
[ -n "$UDEVADM" ] || die "udevadm not found (Debian package udev)"
cp "$UDEVADM" "$R/bin/udevadm"
mkdir -p "$R/lib/systemd" "$R/lib/udev/rules.d"
ln -sf /bin/udevadm "$R/lib/systemd/systemd-udevd"
for rules in 55-dm.rules 60-persistent-storage-dm.rules 95-dm-notify.rules; do
	cp "/lib/udev/rules.d/$rules" "$R/lib/udev/rules.d/" || die "no /lib/udev/rules.d/$rules (Debian package dmsetup)"
done
# Shared libraries (and the loader) of these and dmcowd, at their own paths.
vm_copy_libs "$(command -v dmsetup)" "$DMCOWD" "$DMCOW_QCOW" "$BONNIE" "$QEMU_IO" "${E2FS[@]}" "$UDEVADM" \
	"$NBDKIT" "$NBD_CLIENT" "$NBDKIT_PLUGIN"

# A virtio disk carries the images qcowtest wrote back to the host (a tar);
# ext4 for daemon_mount and qcow_filesystem.
vm_modules $VM_MODS_DM dm-delay:drivers/md/dm-delay dm-zero:drivers/md/dm-zero
# dm-crypt and the cipher templates of the LUKS images (qcow_luks; AES, CBC
# and SHA-256 are built into Debian's kernel).
vm_modules dm-crypt:drivers/md/dm-crypt ecb:crypto/ecb xts:crypto/xts authenc:crypto/authenc essiv:crypto/essiv
# The module the tests load: the one built above, or DMCOW_KO (CI: the one
# DKMS built from the dm-cow-dkms package, tests/debian_package_test.sh).
KO=$OUT/kmod/dm-cow.ko
if [ -n "${DMCOW_KO:-}" ]; then
	[ "$(modinfo -F vermagic "$DMCOW_KO" | cut -d' ' -f1)" = "$KVER" ] || die "$DMCOW_KO is not built for $KVER"
	KO=$DMCOW_KO
fi
echo "run.sh: dm-cow module: $KO"
vm_module_file dm-cow "$KO"
vm_modules $VM_MODS_VIRTIO_BLK $VM_MODS_EXT4 nbd:drivers/block/nbd

vm_pack "$OUT/initramfs.gz"

# ---- boot ---------------------------------------------------------------------
EXPECTED="$("$OUT/vmtest" list) $("$OUT/daemontest" list) $("$OUT/qcowtest" list) module_unload"
APPEND="console=ttyS0 quiet panic=-1"
if [ -n "${DMCOW_VM_TESTS:-}" ]; then
	APPEND="$APPEND dmcow.tests=$DMCOW_VM_TESTS"
	EXPECTED=$(echo "$DMCOW_VM_TESTS" | tr , '\n')
fi
TBOOT=$(date +%s)
rm -f "$OUT/qcow-out.tar"
truncate -s 512M "$OUT/qcow-out.tar"
vm_boot "$OUT/initramfs.gz" "$APPEND" "${DMCOW_VM_TIMEOUT:-480}" "$OUT/console.log" 1024 \
	-drive file="$OUT/qcow-out.tar",format=raw,if=virtio
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
# The images qcowtest wrote, checked by the real qemu-img (and e2fsck).
QOUT="$OUT/qcow-out"
rm -rf "$QOUT"
mkdir -p "$QOUT"
tar -xf "$OUT/qcow-out.tar" -C "$QOUT" 2>/dev/null || true
host_check() {	# name, command...: PASS/FAIL line
	local name=$1 out
	shift
	if out=$("$@" 2>&1); then
		echo "PASS  $name"
	else
		echo "FAIL  $name: $(echo "$out" | tail -5 | tr '\n' ' ')"
		fail=1
	fi
}
check_clean() {	# [qemu-img options...] image: qemu-img check with no errors and no leaks
	local out
	out=$(qemu-img check "$@" 2>&1) || { echo "$out"; return 1; }
	echo "$out" | grep -q "No errors were found" && ! echo "$out" | grep -q leaked || { echo "$out"; return 1; }
}
check_killed() {	# image: corruption-free; leaks repaired by dmcow-img check -r leaks
	local rc=0
	qemu-img check "$1" >/dev/null 2>&1 || rc=$?
	[ $rc = 0 ] || [ $rc = 3 ] || { qemu-img check "$1"; return 1; }
	"$DMCOW_IMG" check -r leaks "$1" >/dev/null 2>&1 || [ $? = 3 ] || return 1
	check_clean "$1"
}
check_parts() {	# image N,N...: clean; each partition N e2fsck-clean, with the VM's file in it
	local n start size
	check_clean "$1" || return 1
	qemu-img convert -O raw "$1" "$1.raw" || return 1
	for n in ${2//,/ }; do
		read -r start size < <(sfdisk -d "$1.raw" | sed -n "s|^$1.raw$n : start= *\([0-9]*\), size= *\([0-9]*\).*|\1 \2|p")
		[ -n "$size" ] || { echo "no partition $n in $1"; return 1; }
		dd if="$1.raw" of="$1.p$n" bs=512 skip="$start" count="$size" status=none
		e2fsck -fn "$1.p$n" || return 1
		[ "$(debugfs -R 'cat /from-vm' "$1.p$n" 2>/dev/null)" = "written in the VM to $(basename "$1") partition $n" ] ||
			{ echo "partition $n: /from-vm is not what the VM wrote"; return 1; }
	done
}
check_fs() {	# image: clean, and e2fsck is happy with qemu-img's view of it
	check_clean "$1" || return 1
	qemu-img convert -O raw "$1" "$1.raw" && e2fsck -fn "$1.raw"
}
if grep -q "^DMCOW-TEST qcow_" "$LOG" && [ -z "${DMCOW_VM_TESTS:-}" -o -f "$QOUT/checks" ]; then
	# Written images sit next to copies of their backing files.
	cp -n "$R/qcow/in/"* "$QOUT/" 2>/dev/null || true
	[ -f "$QOUT/checks" ] || { echo "FAIL  host checks: the VM wrote no images back"; fail=1; }
	while read -r kind image ref; do
		case "$kind" in
		write)
			host_check "host_qemu_img_check $image" check_clean "$QOUT/$image"
			host_check "host_qemu_img_compare $image" qemu-img compare -q -F raw "$QOUT/$image" "$QOUT/$ref" ;;
		writev1)	# qemu-img cannot check qcow v1: QEMU reads it whole and equal, our check agrees
			host_check "host_qemu_img_convert $image" qemu-img convert -O raw "$QOUT/$image" "$QOUT/$image.conv.raw"
			host_check "host_qemu_img_compare $image" qemu-img compare -q -F raw "$QOUT/$image" "$QOUT/$ref"
			host_check "host_dmcow_img_check $image" "$DMCOW_IMG" check "$QOUT/$image" ;;
		writeluks)	# "writeluks IMAGE REF KEY [BACKING KEY]": qemu-img with the keys
			set -- $ref
			local_ref=$1 key=$2 bkey=${3:-}
			sec="--object secret,id=s0,file=$QOUT/$key${bkey:+ --object secret,id=s1,file=$QOUT/$bkey}"
			opts="driver=qcow2,file.filename=$QOUT/$image,encrypt.key-secret=s0${bkey:+,backing.encrypt.key-secret=s1}"
			host_check "host_qemu_img_check $image" check_clean $sec --image-opts "$opts"
			host_check "host_qemu_img_compare $image" qemu-img compare -q $sec --image-opts "$opts" \
				"driver=raw,file.filename=$QOUT/$local_ref" ;;
		killed) host_check "host_killed_image_intact $image" check_killed "$QOUT/$image" ;;
		fs) host_check "host_fs_image $image" check_fs "$QOUT/$image" ;;
		parts) host_check "host_partitions $image" check_parts "$QOUT/$image" "$ref" ;;
		esac
	done <"$QOUT/checks" 2>/dev/null || true
fi
if vm_kernel_problems "$LOG"; then
	echo "kernel reported problems (above)"
	fail=1
fi
[ $fail = 0 ] && echo "dm-cow VM suite: all passed" || echo "dm-cow VM suite: FAILED"
exit $fail
