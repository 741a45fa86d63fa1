#!/usr/bin/env bash
# The boot-time unit against systemd and against dmcow-qcow:
#   tests/systemd_unit_test.sh UNIT DMCOW_QCOW
# UNIT is the configured dmcow-qcow@.service; its commands point at the
# install prefix, so a copy here points them at the built dmcow-qcow (as
# the install would). systemd-analyze verify must find nothing wrong (and
# must object to a copy whose command does not exist: the check bites);
# ExecStart/ExecStop must be "attach --tab %i" / "detach %i", which
# dmcow-qcow must accept as commands (the VM test qcow_dmcowtab runs them).
set -uo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 UNIT DMCOW_QCOW" >&2; exit 2; }
unit=$1
qcow=$2
fail=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/sbin"
ln -s "$qcow" "$tmp/sbin/dmcow-qcow"
sbin=$(sed -n 's|^ExecStart=\(.*\)/dmcow-qcow .*|\1|p' "$unit")
[[ -n $sbin ]] || { echo "FAIL $unit: no ExecStart=.../dmcow-qcow"; exit 1; }
sed "s|$sbin/|$tmp/sbin/|" "$unit" >"$tmp/dmcow-qcow@vm0.service"
if ! out=$(systemd-analyze verify --man=no "$tmp/dmcow-qcow@vm0.service" 2>&1) || [[ -n $out ]]; then
  echo "FAIL systemd-analyze verify: $out"
  fail=1
fi
sed "s|$sbin/|$tmp/nowhere/|" "$unit" >"$tmp/dmcow-qcow@vm1.service"
if systemd-analyze verify --man=no "$tmp/dmcow-qcow@vm1.service" >/dev/null 2>&1; then
  echo "FAIL systemd-analyze verify accepted a unit whose command does not exist"
  fail=1
fi
grep -qx "ExecStart=$sbin/dmcow-qcow attach --tab %i" "$unit" || { echo "FAIL ExecStart is not attach --tab %i"; fail=1; }
grep -qx "ExecStop=$sbin/dmcow-qcow detach %i" "$unit" || { echo "FAIL ExecStop is not detach %i"; fail=1; }
grep -qx "RemainAfterExit=yes" "$unit" || { echo "FAIL the unit does not stay active after attach returns"; fail=1; }
# The commands exist: usage errors (exit 2) only for what is missing.
DMCOWTAB=/nonexistent "$qcow" attach --tab vm0 >/dev/null 2>&1
[[ $? == 1 ]] || { echo "FAIL dmcow-qcow attach --tab is not a command"; fail=1; }
[[ $fail == 0 ]] && echo "systemd_unit_test: all passed"
exit $fail
