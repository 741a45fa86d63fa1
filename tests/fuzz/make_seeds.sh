#!/usr/bin/env bash
# Makes the fuzzer's seed corpus: small images of every shape, made by the
# real qemu-img and qemu-io, so that bounded fuzzing starts from valid images
# and mutates fields that a valid image really holds.
#
#   tests/fuzz/make_seeds.sh OUT_DIR
#
# Shapes: qcow2 v2 and v3; cluster sizes 512 B to 64 KiB; zero clusters
# (plain and preallocated); compressed clusters (zlib, zstd); extended L2
# (subclusters, with zeros and compression); refcount widths 1, 8, 64 bits;
# internal snapshots (v2, v3, several); persistent bitmaps (dirty, several,
# disabled, left in use by a killed QEMU); lazy refcounts left dirty by a
# killed QEMU; external data files (plain and data_file_raw); backing files
# (qcow2 and raw); preallocated metadata; legacy qcow v1
# (plain, compressed, with a backing file). Each file is a few KiB to under
# 1 MiB (run.sh's -max_len; a LUKS header alone takes 2 MiB, so there is no
# encrypted seed); none is committed to the repository.
#
# The fuzz target puts a file named fuzz.data beside each input, so the
# images with an external data file name that file and open.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
if ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null; then
    echo "make_seeds.sh: qemu-img/qemu-io not installed: no seeds made" >&2
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# img NAME FORMAT SIZE OPTIONS [qemu-io commands...]: made in $work, copied
# out by keep (some images need a companion file while they are written).
img() {
    local name=$1 fmt=$2 size=$3 opts=$4
    shift 4
    (cd "$work" && qemu-img create -q -f "$fmt" ${opts:+-o "$opts"} "$name" "$size")
    io "$name" "$fmt" "$@"
}
io() {  # io NAME FORMAT [commands...]
    local name=$1 fmt=$2
    shift 2
    local cmds=()
    for c in "$@"; do cmds+=(-c "$c"); done
    if [ ${#cmds[@]} -gt 0 ]; then (cd "$work" && qemu-io -f "$fmt" "${cmds[@]}" "$name" >/dev/null); fi
}
# Runs qemu-io and kills it (SIGKILL) after the commands: what a crashed QEMU leaves.
killed() {
    local name=$1
    shift
    local cmds=()
    for c in "$@"; do cmds+=(-c "$c"); done
    { (cd "$work" && ulimit -c 0 && exec qemu-io "${cmds[@]}" -c 'sigraise 9' "$name" >/dev/null 2>&1) || true; } 2>/dev/null
}

# qcow2 v3, cluster sizes and zero clusters.
img v3-c512.qcow2 qcow2 256k cluster_size=512 'write -P 0x11 0 4k' 'write -z 8k 4k' 'write -P 0x12 100k 1536'
img v3-c4k.qcow2 qcow2 1M cluster_size=4096 'write -P 0x22 4k 12k' 'write -z 64k 8k' 'discard 8k 4k'
img v3-c64k.qcow2 qcow2 1M '' 'write -P 0x23 0 64k' 'write -z 128k 64k' 'write -P 0x24 960k 64k'
img v3-zero-alloc.qcow2 qcow2 256k cluster_size=4096 'write -P 0x25 0 16k' 'write -z 4k 8k'
img prealloc-metadata.qcow2 qcow2 128k cluster_size=4096,preallocation=metadata 'write -P 0x26 8k 4k'
# qcow2 v2.
img v2-c4k.qcow2 qcow2 1M compat=0.10,cluster_size=4096 'write -P 0x33 0 8k' 'write -P 0x34 512k 4k'
img v2-compressed.qcow2 qcow2 256k compat=0.10,cluster_size=4096 'write -c -P 0x35 0 8k' 'write -P 0x36 64k 4k'
# Compression.
img compressed-zlib.qcow2 qcow2 512k cluster_size=4096 'write -c -P 0x44 0 16k' 'write -P 0x45 32k 4k'
img compressed-zstd.qcow2 qcow2 512k cluster_size=4096,compression_type=zstd 'write -c -P 0x55 0 16k' 'write -z 64k 4k'
img compressed-c512.qcow2 qcow2 64k cluster_size=512 'write -c -P 0x46 0 4k'
# Extended L2.
img extl2.qcow2 qcow2 1M cluster_size=16384,extended_l2=on 'write -P 0x66 1k 3k' 'write -z 20k 2k'
img extl2-mixed.qcow2 qcow2 512k cluster_size=32768,extended_l2=on 'write -c -P 0x67 0 32k' \
    'write -P 0x68 33k 2k' 'write -z 70k 10k' 'discard 96k 32k'
# Refcount widths; lazy refcounts, clean and left dirty.
img refcount1.qcow2 qcow2 256k cluster_size=4096,refcount_bits=1 'write -P 0x77 0 4k'
img refcount8.qcow2 qcow2 256k cluster_size=4096,refcount_bits=8 'write -P 0x79 0 8k'
img refcount64.qcow2 qcow2 256k cluster_size=4096,refcount_bits=64 'write -P 0x7a 4k 4k'
img lazy.qcow2 qcow2 256k cluster_size=4096,lazy_refcounts=on 'write -P 0x78 0 4k'
img lazy-dirty.qcow2 qcow2 256k cluster_size=4096,lazy_refcounts=on
killed lazy-dirty.qcow2 'write -P 0x7b 0 16k'
# Internal snapshots.
img snapshots.qcow2 qcow2 512k cluster_size=4096 'write -P 0x81 0 8k'
qemu-img snapshot -c snap1 "$work/snapshots.qcow2"
io snapshots.qcow2 qcow2 'write -P 0x82 4k 8k' 'write -z 0 4k'
qemu-img snapshot -c snap2 "$work/snapshots.qcow2"
io snapshots.qcow2 qcow2 'write -P 0x83 64k 4k'
img v2-snapshot.qcow2 qcow2 256k compat=0.10,cluster_size=4096 'write -P 0x84 0 4k'
qemu-img snapshot -c s "$work/v2-snapshot.qcow2"
io v2-snapshot.qcow2 qcow2 'write -P 0x85 0 4k'
# Persistent bitmaps.
img bitmap.qcow2 qcow2 1M cluster_size=4096
qemu-img bitmap --add "$work/bitmap.qcow2" bm0
io bitmap.qcow2 qcow2 'write -P 0x91 0 64k' 'write -P 0x92 512k 4k'
img bitmaps.qcow2 qcow2 1M cluster_size=4096
qemu-img bitmap --add -g 512 "$work/bitmaps.qcow2" fine
qemu-img bitmap --add -g 65536 "$work/bitmaps.qcow2" coarse
qemu-img bitmap --add --disable "$work/bitmaps.qcow2" off
io bitmaps.qcow2 qcow2 'write -P 0x93 4k 8k'
img bitmap-in-use.qcow2 qcow2 256k cluster_size=4096
qemu-img bitmap --add "$work/bitmap-in-use.qcow2" live
killed bitmap-in-use.qcow2 'write -P 0x94 0 4k'
# External data files, named fuzz.data (the fuzz target provides one).
img data-file.qcow2 qcow2 64k cluster_size=4096,data_file=fuzz.data 'write -P 0xa1 0 8k' 'write -z 16k 4k'
img data-file-raw.qcow2 qcow2 64k cluster_size=4096,data_file=fuzz.data,data_file_raw=on 'write -P 0xa2 4k 4k'
# Backing files.
img backing.qcow2 qcow2 256k cluster_size=4096 'write -P 0xb1 0 64k'
img overlay.qcow2 qcow2 256k cluster_size=4096,backing_file=backing.qcow2,backing_fmt=qcow2 'write -P 0xb2 4k 4k' \
    'write -z 16k 4k'
img raw-base.raw raw 64k ''
img overlay-raw.qcow2 qcow2 64k cluster_size=512,backing_file=raw-base.raw,backing_fmt=raw 'write -P 0xb3 0 1k'
# Legacy qcow v1.
img v1.qcow qcow 256k '' 'write -P 0x88 0 8k'
img v1-compressed.qcow qcow 256k '' 'write -c -P 0x99 0 4k' 'write -P 0x9a 8k 4k'
img v1-overlay.qcow qcow 256k backing_file=v1.qcow,backing_fmt=qcow 'write -P 0x9b 4k 1k'

# Keep what fits the fuzzer's -max_len (1 MiB); the rest would be cut short.
kept=0
for f in "$work"/*; do
    name=$(basename "$f")
    [ "$name" = fuzz.data ] && continue
    if [ "$(stat -c %s "$f")" -le 1048576 ]; then
        cp "$f" "$out/$name"
        kept=$((kept + 1))
    else
        echo "make_seeds.sh: $name is over 1 MiB, left out" >&2
    fi
done
echo "make_seeds.sh: $kept seeds in $out" >&2
