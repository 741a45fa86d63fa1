#!/usr/bin/env bash
# Installs every Debian 12 package dmcow needs to build, test and benchmark.
# Runs apt-get as root, through sudo when not root.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(
  build-essential cmake ninja-build pkg-config clang libclang-rt-14-dev
  # the formatting check (scripts/check-format.sh, run by scripts/test.sh)
  clang-format
  zlib1g-dev libzstd-dev libssl-dev libisal-dev libdeflate-dev
  catch2 libcli11-dev nlohmann-json3-dev
  # dmcowd loads and swaps device tables through libdevmapper (pkg-config devmapper)
  libdevmapper-dev
  qemu-utils e2fsprogs
  # sfdisk: partition tables on test images, as a user's tools make them (attach maps partitions)
  fdisk
  # the nbdkit plugin (nbdkit/): its build, and the NBD clients it is tested with
  nbdkit nbdkit-plugin-dev libnbd-bin
  # a file-system workload on an attached image in the VM (tests/vm/qcow_test.cc)
  bonnie++
  # the kernel target's VM suite: Debian's kernel booted under qemu
  linux-image-amd64 linux-headers-amd64 qemu-system-x86 busybox-static dmsetup kmod cpio
  # the kernel's NBD client, against nbdkit with our plugin, in the VM (tests/vm/qcow_test.cc)
  nbd-client
  # the man pages (man/*.scd): rendered by the build, checked by tests/man_test.sh
  scdoc
  # systemd-analyze verify of the boot-time unit (tests/systemd_unit_test.sh); udevd in the VM (qcow_udev)
  systemd udev
  # the Debian packages (debian/, tests/debian_package_test.sh)
  debhelper dh-dkms dkms
)

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
echo "install-deps: ${#PACKAGES[@]} packages present"
