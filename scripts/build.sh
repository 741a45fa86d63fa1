#!/usr/bin/env bash
# Builds dmcow. Usage: scripts/build.sh [release|sanitize|fuzz [TARGET...]]
# (default release, every target)
#   release   build/           RelWithDebInfo, what users run and benchmarks measure
#   sanitize  build-sanitize/  clang, ASan + UBSan, the whole test suite runs here
#                              too (clang: it builds this tree in 60% of gcc's
#                              time, and checks the lock annotations in all of it)
#   fuzz      build-fuzz/      clang + libFuzzer targets
set -euo pipefail
cd "$(dirname "$0")/.."

kind="${1:-release}"
shift || true
case "$kind" in
  release)  dir=build;          args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo) ;;
  sanitize) dir=build-sanitize; args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DDMCOW_SANITIZE=ON
                                      -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++) ;;
  fuzz)     dir=build-fuzz;     args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DDMCOW_FUZZ=ON
                                      -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++) ;;
  *) echo "usage: $0 [release|sanitize|fuzz [TARGET...]]" >&2; exit 2 ;;
esac

cmake -S . -B "$dir" -G Ninja "${args[@]}" >/dev/null
ninja -C "$dir" -j2 "$@"
