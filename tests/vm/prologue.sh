# The first steps of every VM's /init (tests/vm/init.sh, bench/vm/init.sh,
# scripts/vm-demo/init.sh), which source it as /prologue.sh right after
# `busybox --install`. Each /init defines boot_failed WHY first, printing
# its own console marker (its host script looks for that) and powering off.
#
# vm_prologue [TMPFS_OPTIONS]: the file systems (/tmp a tmpfs with the given
# mount options), a root user (bonnie++ -u root looks it up), the modules in
# the order the host script wrote to /etc/modules (lib.sh vm_modules), and
# device-mapper's control node.
vm_prologue() {
	export PATH=/bin:/sbin
	mount -t proc proc /proc
	mount -t sysfs sysfs /sys
	mount -t devtmpfs devtmpfs /dev
	mkdir -p /tmp /run /var/lock
	mount -t tmpfs ${1:+-o "$1"} tmpfs /tmp
	mount -t tmpfs tmpfs /run
	echo "root:x:0:0:root:/:/bin/sh" >/etc/passwd
	echo "root:x:0:" >/etc/group
	for m in $(cat /etc/modules); do
		insmod /lib/modules/$m.ko || boot_failed "insmod $m"
	done
	[ -e /dev/mapper/control ] || boot_failed "no /dev/mapper/control"
}
