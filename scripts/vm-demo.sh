#!/usr/bin/env bash
# The built-in default job's second half: a qcow2 image as a Linux block
# device, end to end, in the bundled VM (Debian's kernel under qemu's
# software emulation: no root and no kernel module needed on this host).
#
# On the host, qemu-img makes a compressed base image holding an ext4 file
# system and an empty overlay on it. In the VM, dmcow-qcow attaches the
# overlay (its backing is served read-only), the kernel mounts it, reads the
# base's files and writes new ones; detach. Back on the host, the real
# qemu-img checks the overlay and QEMU's own view of it shows the new files.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "vm-demo: $*" >&2; exit 1; }
. "$SRC/tests/vm/lib.sh"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
vm_packages vm-demo
vm_kernel
vm_dmcow_binaries  # the build's, or DMCOW_INSTALLED's (tests/vm/lib.sh)
echo "vm-demo: building dm-cow.ko for $KVER"
vm_build_kmod "$OUT"

# The images, by qemu-img.
mkdir -p "$OUT/files"
echo "hello from a file system inside a compressed qcow2 base image" >"$OUT/files/hello.txt"
cp "$SRC/README.md" "$OUT/files/"
truncate -s 64M "$OUT/base.raw"
mke2fs -q -F -t ext4 -d "$OUT/files" "$OUT/base.raw"
qemu-img convert -q -c -O qcow2 "$OUT/base.raw" "$OUT/base.qcow2"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$OUT/demo.qcow2"
echo "vm-demo: (host) \$ qemu-img create -f qcow2 -b base.qcow2 -F qcow2 demo.qcow2   # base: ext4, zlib-compressed"

vm_initramfs_begin "$OUT/initramfs" "$SRC/scripts/vm-demo/init.sh"
cp "$DMCOWD" "$DMCOW_QCOW" "$R/bin/"
vm_copy_libs "$(command -v dmsetup)" "$DMCOWD" "$DMCOW_QCOW"
mkdir -p "$R/demo"
cp "$OUT/base.qcow2" "$OUT/demo.qcow2" "$R/demo/"
vm_modules $VM_MODS_DM dm-zero:drivers/md/dm-zero
vm_module_file dm-cow "$OUT/kmod/dm-cow.ko"
vm_modules $VM_MODS_EXT4 $VM_MODS_VIRTIO_BLK
vm_pack "$OUT/initramfs.gz"

echo "vm-demo: booting Debian's $KVER under qemu (software emulation)"
truncate -s 256M "$OUT/back.tar"
vm_boot "$OUT/initramfs.gz" "console=ttyS0 quiet panic=-1" 300 "$OUT/console.log" 512 \
	-drive file="$OUT/back.tar",format=raw,if=virtio >/dev/null
sed -n '/(vm)/,/DEMO-/p' "$OUT/console.log" | grep -v "^DEMO-" | grep -v "reboot: Power down"
grep -q DEMO-OK "$OUT/console.log" || { tail -20 "$OUT/console.log"; die "the VM part failed"; }

# Back on the host: QEMU's tools are the judges.
mkdir -p "$OUT/back"
tar -xf "$OUT/back.tar" -C "$OUT/back"
cp "$OUT/base.qcow2" "$OUT/back/"
cd "$OUT/back"
echo
echo "vm-demo: (host) \$ qemu-img check demo.qcow2"
qemu-img check demo.qcow2
echo "vm-demo: (host) \$ qemu-img info demo.qcow2"
qemu-img info demo.qcow2
qemu-img convert -O raw demo.qcow2 demo.raw
echo "vm-demo: (host) \$ e2fsck -fn <qemu-img convert of demo.qcow2>"
e2fsck -fn demo.raw
echo "vm-demo: (host) files as QEMU sees them:"
debugfs -R "ls -l /" demo.raw 2>/dev/null
debugfs -R "cat /written-in-the-vm.txt" demo.raw 2>/dev/null
debugfs -R "dump /random.bin random.bin" demo.raw 2>/dev/null
want=$(debugfs -R "cat /random.sha256" demo.raw 2>/dev/null)
got=$(sha256sum random.bin | cut -d' ' -f1)
[ "$want" = "$got" ] || die "random.bin differs from what the VM wrote"
echo "vm-demo: random.bin sha256 $got: as written in the VM"
echo "vm-demo: done: the image dmcow-qcow wrote is clean for qemu-img and reads back in QEMU's view"
