#!/usr/bin/env bash
# The built-in default job. First (host): take a golden fixture made by qemu-img, make a
# copy of it, and show what dmcow-img says about it: info, map and the
# checksums of its guest content (the block digest of docs/checksum.md, and
# -a sha256, equal to the raw conversion's sha256sum).
# Then (scripts/vm-demo.sh): a qcow2 image attached as a block device with
# dmcow-qcow in the bundled VM, mounted, written, detached, checked by qemu-img.
set -euo pipefail
cd "$(dirname "$0")/.."
img=build/dmcow-img
[ -x "$img" ] || img=build/cli/dmcow-img

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp fixtures/images/qcow2-zlib-compressed.qcow2 "$work/demo.qcow2"

set -x
"$img" info "$work/demo.qcow2"
"$img" map --output=json "$work/demo.qcow2"
"$img" checksum "$work/demo.qcow2"
"$img" checksum -a sha256 "$work/demo.qcow2"
"$img" convert -O raw "$work/demo.qcow2" "$work/demo.raw"
sha256sum "$work/demo.raw"
scripts/vm-demo.sh
