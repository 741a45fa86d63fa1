#!/usr/bin/env bash
# Runs the open/read fuzzer for a while on a seed corpus.
#
#   tests/fuzz/run.sh BUILD_DIR SECONDS
#
# BUILD_DIR is a build configured with -DDMCOW_FUZZ=ON under clang, e.g.
#   CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DDMCOW_FUZZ=ON
# The fuzzer is (re)built first. Seeds are the fixture images under 1 MiB
# (fixtures/images/**, if generated) plus small images made on the fly with
# qemu-img (when installed). The growing corpus and any crash reproducers are kept in
# BUILD_DIR/fuzz/{corpus,artifacts}. Exits non-zero if the fuzzer finds a
# crash, leak, timeout or out-of-memory.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 BUILD_DIR SECONDS" >&2
    exit 2
fi
build=$(cd "$1" && pwd)
seconds=$2
src=$(cd "$(dirname "$0")/../.." && pwd)

cmake --build "$build" --target open_read_fuzzer -j 2
fuzzer="$build/tests/fuzz/open_read_fuzzer"

work="$build/fuzz"
seeds="$work/seeds"
corpus="$work/corpus"
artifacts="$work/artifacts"
rm -rf "$seeds"
mkdir -p "$seeds" "$corpus" "$artifacts"

# Fixture images smaller than 1 MiB; names flattened (sub/x -> sub_x).
if [ -d "$src/fixtures/images" ]; then
    while IFS= read -r -d '' f; do
        rel=${f#"$src/fixtures/images/"}
        cp "$f" "$seeds/${rel//\//_}"
    done < <(find "$src/fixtures/images" -type f -size -1024k -print0)
fi

# Small images made with qemu-img: small clusters make short inputs that
# reach deep into the tables, so they are added even when fixtures exist.
nseeds=$(find "$seeds" -type f | wc -l)
if command -v qemu-img >/dev/null && command -v qemu-io >/dev/null; then
    echo "run.sh: $nseeds fixture seeds; adding seeds made with qemu-img" >&2
    gen() {  # gen NAME FORMAT SIZE OPTIONS [qemu-io commands...]
        local name=$1 fmt=$2 size=$3 opts=$4
        shift 4
        qemu-img create -q -f "$fmt" ${opts:+-o "$opts"} "$seeds/$name" "$size"
        local cmds=()
        for c in "$@"; do cmds+=(-c "$c"); done
        if [ ${#cmds[@]} -gt 0 ]; then qemu-io -f "$fmt" "${cmds[@]}" "$seeds/$name" >/dev/null; fi
    }
    gen v3-c512.qcow2 qcow2 256k cluster_size=512 'write -P 0x11 0 4k' 'write -z 8k 4k'
    gen v3-c4k.qcow2 qcow2 1M cluster_size=4096 'write -P 0x22 4k 12k' 'write -z 64k 8k'
    gen v2-c4k.qcow2 qcow2 1M compat=0.10,cluster_size=4096 'write -P 0x33 0 8k'
    gen compressed-zlib.qcow2 qcow2 512k cluster_size=4096 'write -c -P 0x44 0 16k' 'write -P 0x45 32k 4k'
    gen compressed-zstd.qcow2 qcow2 512k cluster_size=4096,compression_type=zstd 'write -c -P 0x55 0 16k'
    gen extl2.qcow2 qcow2 1M cluster_size=16384,extended_l2=on 'write -P 0x66 1k 3k' 'write -z 20k 2k'
    gen refcount1.qcow2 qcow2 256k cluster_size=4096,refcount_bits=1 'write -P 0x77 0 4k'
    gen lazy.qcow2 qcow2 256k cluster_size=4096,lazy_refcounts=on 'write -P 0x78 0 4k'
    gen v1.qcow qcow 256k '' 'write -P 0x88 0 8k'
    gen v1-compressed.qcow qcow 256k '' 'write -c -P 0x99 0 4k'
    qemu-img snapshot -c snap1 "$seeds/v3-c4k.qcow2"
    qemu-img create -q -f qcow2 -b v3-c4k.qcow2 -F qcow2 "$seeds/overlay.qcow2"
elif [ "$nseeds" -eq 0 ]; then
    echo "run.sh: no fixtures and no qemu-img: starting from an empty corpus" >&2
fi
echo "run.sh: $(find "$seeds" -type f | wc -l) seed files, corpus $(find "$corpus" -type f | wc -l) files" >&2

# libFuzzer writes new inputs to the first directory, reads the others.
set +e
"$fuzzer" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=1048576 \
    -dict="$src/tests/fuzz/qcow.dict" -artifact_prefix="$artifacts/" -print_final_stats=1 \
    "$corpus" "$seeds"
rc=$?
set -e
if [ $rc -ne 0 ]; then
    echo "run.sh: fuzzer failed (exit $rc); reproducers in $artifacts" >&2
    exit $rc
fi
echo "run.sh: no crash in ${seconds}s" >&2
