#!/bin/busybox sh
# /init of the demo VM (scripts/vm-demo.sh): attach a qcow2 image made by
# qemu-img on the host, use it as a disk, detach, send it back.
/bin/busybox --install -s /bin
fail() { echo "DEMO-FAIL $*"; poweroff -f; }
boot_failed() { fail "$@"; }
. /prologue.sh
vm_prologue
echo 1 > /proc/sys/kernel/printk
cd /demo
step() { echo; echo "(vm) \$ $*"; "$@"; }
dev=$(dmcow-qcow attach --name demo demo.qcow2) || fail "attach"
echo "(vm) \$ dmcow-qcow attach --name demo demo.qcow2"
echo "$dev"
step dmcow-qcow list
step dmsetup ls
mkdir -p /mnt
step mount -t ext4 "$dev" /mnt || fail "mount"
step ls -l /mnt
step cat /mnt/hello.txt
date >/mnt/written-in-the-vm.txt
echo "this file was written through /dev/mapper/demo" >>/mnt/written-in-the-vm.txt
dd if=/dev/urandom of=/mnt/random.bin bs=64k count=64 2>/dev/null
sha256sum /mnt/random.bin | cut -d' ' -f1 >/mnt/random.sha256
step ls -l /mnt
step umount /mnt
step dmcow-qcow detach demo || fail "detach"
tar -cf /dev/vda demo.qcow2 && sync
echo "DEMO-OK"
poweroff -f
