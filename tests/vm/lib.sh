# Shared pieces of the scripts that boot Debian's kernel under qemu with the
# dm-cow module: tests/vm/run.sh (the VM test suite), scripts/vm-demo.sh and
# bench/vm_bench.sh (benchmarks). Sourced, not run; the caller sets
# `set -euo pipefail`, SRC (the source tree) and defines die().
#
# After vm_kernel: KVER, KDIR, VMLINUZ. vm_initramfs_begin sets R, the
# initramfs directory that copy_module and vm_copy_libs fill.

# ---- packages -----------------------------------------------------------------
vm_need_pkgs() {
	local missing=0
	ls /lib/modules 2>/dev/null | grep -q amd64 || missing=1
	for f in qemu-system-x86_64 dmsetup cpio g++ make insmod; do
		command -v "$f" >/dev/null 2>&1 || missing=1
	done
	[ -x /bin/busybox ] || missing=1
	return $missing
}

# vm_packages WHO: installs what is missing when root on Debian/Ubuntu.
vm_packages() {
	if ! vm_need_pkgs; then
		if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
			echo "$1: installing packages" >&2
			apt-get update -q >/dev/null
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-image-amd64 \
				linux-headers-amd64 qemu-system-x86 busybox-static dmsetup \
				kmod cpio g++ make >/dev/null
		fi
		vm_need_pkgs || die "missing packages (see the header of $0)"
	fi
}

# ---- kernel and module --------------------------------------------------------
vm_kernel() {
	KVER=${KVER:-$(ls /lib/modules | grep amd64 | sort -V | tail -1)}
	KDIR=/lib/modules/$KVER/build
	VMLINUZ=/boot/vmlinuz-$KVER
	[ -d "$KDIR" ] || die "no kernel headers at $KDIR"
	[ -r "$VMLINUZ" ] || die "no kernel image $VMLINUZ"
}

# vm_build_kmod OUT: builds dm-cow.ko in OUT/kmod, warnings are errors.
vm_build_kmod() {
	local out=$1
	rm -rf "$out/kmod"
	mkdir -p "$out/kmod"
	cp "$SRC"/kmod/Makefile "$SRC"/kmod/Kbuild "$SRC"/kmod/*.c "$SRC"/kmod/*.h "$out/kmod/"
	make -C "$out/kmod" KDIR="$KDIR" >"$out/kmod-build.log" 2>&1 ||
		{ cat "$out/kmod-build.log"; die "module build failed"; }
	if grep -qi "warning:" "$out/kmod-build.log"; then
		cat "$out/kmod-build.log"
		die "module build has warnings"
	fi
}

# vm_dmcow_binaries: the dmcow programs a VM runs, either the build's
# (DMCOWD, default build/daemon/dmcowd, and what that build made beside it)
# or, with DMCOW_INSTALLED=ROOT, the files of the dmcow Debian package
# unpacked under ROOT (CI: the package tests/debian_package_test.sh built),
# which are what users install. Sets DMCOWD DMCOW_QCOW DMCOW_IMG DMCOW_UNIT
# NBDKIT_PLUGIN; requires dmcowd and dmcow-qcow (callers check what else they
# use).
vm_dmcow_binaries() {
	if [ -n "${DMCOW_INSTALLED:-}" ]; then
		DMCOWD=$DMCOW_INSTALLED/usr/sbin/dmcowd
		DMCOW_QCOW=$DMCOW_INSTALLED/usr/sbin/dmcow-qcow
		DMCOW_IMG=$DMCOW_INSTALLED/usr/bin/dmcow-img
		DMCOW_UNIT=$DMCOW_INSTALLED/usr/lib/systemd/system/dmcow-qcow@.service
		NBDKIT_PLUGIN=$(echo "$DMCOW_INSTALLED"/usr/lib/*/nbdkit/plugins/nbdkit-dmcow-plugin.so)
	else
		DMCOWD=${DMCOWD:-$SRC/build/daemon/dmcowd}
		local build
		build=$(dirname "$DMCOWD")/..
		DMCOW_QCOW=$(dirname "$DMCOWD")/dmcow-qcow
		DMCOW_IMG=${DMCOW_IMG:-$build/cli/dmcow-img}
		DMCOW_UNIT=$build/systemd/dmcow-qcow@.service
		NBDKIT_PLUGIN=${NBDKIT_PLUGIN:-$build/nbdkit/nbdkit-dmcow-plugin.so}
	fi
	local f
	for f in "$DMCOWD" "$DMCOW_QCOW"; do
		[ -x "$f" ] || die "no $f (run scripts/build.sh, or set DMCOWD or DMCOW_INSTALLED)"
	done
}

# ---- initramfs ----------------------------------------------------------------
# vm_initramfs_begin DIR INIT: a fresh tree with busybox, dmsetup, the
# shared first steps of every /init (prologue.sh) and INIT as /init; sets R.
vm_initramfs_begin() {
	R=$1
	rm -rf "$R"
	mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/modules}
	cp /bin/busybox "$R/bin/busybox"
	cp "$(command -v dmsetup)" "$R/sbin/dmsetup"
	cp "$SRC/tests/vm/prologue.sh" "$R/prologue.sh"
	cp "$2" "$R/init"
	chmod 755 "$R/init"
}

# vm_copy_libs BINARY...: their shared libraries (and the loader), at their
# own paths.
vm_copy_libs() {
	local lib
	for lib in $( (for b in "$@"; do ldd "$b"; done) |
			grep -o '/[^ ]*' | grep -v ':$' | sort -u); do
		mkdir -p "$R$(dirname "$lib")"
		cp -L "$lib" "$R$lib"
	done
}

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

# Kernel modules, "name:path under kernel/", in load order (dependencies
# first, as modinfo -F depends says).
VM_MODS_DM="dm-mod:drivers/md/dm-mod loop:drivers/block/loop"
# A virtio disk: how images travel between the host and the VM.
VM_MODS_VIRTIO_BLK="virtio_ring:drivers/virtio/virtio_ring virtio:drivers/virtio/virtio
	virtio_pci_legacy_dev:drivers/virtio/virtio_pci_legacy_dev
	virtio_pci_modern_dev:drivers/virtio/virtio_pci_modern_dev
	virtio_pci:drivers/virtio/virtio_pci virtio_blk:drivers/block/virtio_blk"
# ext4 and what it needs (jbd2, mbcache, crc16; and the crc32c checksum it
# asks the crypto API for).
VM_MODS_EXT4="crc16:lib/crc16 crc32c_generic:crypto/crc32c_generic mbcache:fs/mbcache
	jbd2:fs/jbd2/jbd2 ext4:fs/ext4/ext4"

# vm_modules NAME:PATH...: copies the modules and appends them to
# /etc/modules, the load order every init script insmods.
vm_modules() {
	local m
	for m in "$@"; do
		copy_module "${m%%:*}" "${m#*:}"
		echo "${m%%:*}" >>"$R/etc/modules"
	done
}

# vm_module_file NAME FILE: a module we built (dm-cow.ko), next in the order.
vm_module_file() {
	cp "$2" "$R/lib/modules/$1.ko"
	echo "$1" >>"$R/etc/modules"
}

# vm_pack OUT.gz
vm_pack() {
	(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) >"$1"
}

# ---- boot ---------------------------------------------------------------------
# vm_boot INITRD APPEND TIMEOUT LOG MEMORY_MB [QEMU ARGS...]: boots, console
# to stdout and LOG; sets QEMU_RC (124: timed out).
vm_boot() {
	local initrd=$1 append=$2 timeout_s=$3 log=$4 mem=$5
	shift 5
	set +e
	timeout "$timeout_s" qemu-system-x86_64 -accel tcg -cpu max \
		-m "$mem" "$@" -nographic -no-reboot -kernel "$VMLINUZ" \
		-initrd "$initrd" -append "$append" </dev/null |
		tr -d '\r' | tee "$log"
	QEMU_RC=${PIPESTATUS[0]}
	set -e
}

# vm_kernel_problems LOG: prints and succeeds if the kernel reported a BUG,
# WARNING, Oops or Call Trace.
vm_kernel_problems() {
	grep -nE 'BUG:|WARNING:|Oops|Call Trace' "$1"
}
