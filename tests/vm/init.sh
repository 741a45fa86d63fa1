#!/bin/busybox sh
# /init of the dm-cow test VM: mount, load modules, run the tests, power off.
# Markers on the console (parsed by run.sh):
#   DMCOW-BOOT ok|FAIL <why>     modules loaded
#   DMCOW-TEST <name> PASS|FAIL  one per test (printed by vmtest and
#                                daemontest; the last one, module_unload,
#                                by this script)
#   DMCOW-END <status>           all tests ran
/bin/busybox --install -s /bin
boot_failed() {
	echo "DMCOW-BOOT FAIL $*"
	poweroff -f
}
. /prologue.sh
vm_prologue
# From here on warnings and worse reach the console (quiet hides them), so
# a WARNING or BUG during a test shows up in the log that run.sh scans.
echo 5 > /proc/sys/kernel/printk
echo
echo "DMCOW-BOOT ok"

args=$(cat /proc/cmdline)
tests=""
for a in $args; do
	case "$a" in
	dmcow.tests=*) tests=$(echo "${a#dmcow.tests=}" | tr , ' ') ;;
	esac
done
/bin/vmtest run $tests
rc=$?
# The daemon (dmcowd) on real devices.
/bin/daemontest run $tests || rc=1
# qcow2 images attached with dmcow-qcow; what they wrote goes back to the
# host on the virtio disk, as a tar, for qemu-img to check.
/bin/qcowtest run $tests || rc=1
if [ -d /tmp/qcow-out ] && [ -b /dev/vda ]; then
	tar -cf /dev/vda -C /tmp/qcow-out . || echo "DMCOW-WARN could not write /dev/vda"
	sync
fi
# Unloading must work once every test has removed its device; leaked
# objects show up as a kernel WARNING/BUG (slab cache not empty).
if [ -z "$tests" ]; then
	if rmmod dm-cow; then
		echo "DMCOW-TEST module_unload PASS"
	else
		echo "DMCOW-TEST module_unload FAIL rmmod dm-cow failed"
	fi
fi
echo "DMCOW-END $rc"
poweroff -f
