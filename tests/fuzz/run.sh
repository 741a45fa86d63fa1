#!/usr/bin/env bash
# Runs the open/read fuzzer for a while on a seed corpus.
#
#   tests/fuzz/run.sh BUILD_DIR SECONDS
#
# BUILD_DIR is a build configured with -DDMCOW_FUZZ=ON under clang, e.g.
#   CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DDMCOW_FUZZ=ON
# The fuzzer is (re)built first. Seeds are the fixture images under 1 MiB
# (fixtures/images/**, if generated) plus small images of every shape that
# make_seeds.sh makes with qemu-img and qemu-io (when installed). The growing corpus and any crash reproducers are kept in
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

# Images of every shape made with qemu-img and qemu-io (make_seeds.sh):
# small clusters make short inputs that reach deep into the tables, so they
# are added even when fixtures exist.
nseeds=$(find "$seeds" -type f | wc -l)
if command -v qemu-img >/dev/null && command -v qemu-io >/dev/null; then
    echo "run.sh: $nseeds fixture seeds; adding seeds made with qemu-img" >&2
    "$src/tests/fuzz/make_seeds.sh" "$seeds"
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
