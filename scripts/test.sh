#!/usr/bin/env bash
# README's second command, and what CI runs (.ci/run): the whole suite.
#  0. the formatting check (clang-format, .clang-format);
#  1. release build, every CTest test (qemu-img comparisons included);
#  2. ASan + UBSan build, the same tests;
#  3. the libFuzzer target over "open an image and read all of it", bounded.
# The kernel VM suite (tests/vm, label "vm") runs once, in the release pass.
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"

# ctest, then a failure if any test was skipped: install-deps.sh installs
# every tool the tests need, so a skip here means a test did not run.
run_ctest() {
  local log
  log=$(mktemp)
  ctest "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  if grep -q -- "\*\*\*Skipped\|(Skipped)\|Not Run" "$log"; then
    echo "test.sh: tests were skipped (listed above); every test must run here" >&2
    rc=1
  fi
  rm -f "$log"
  return "$rc"
}

scripts/install-deps.sh

echo "=== formatting"
scripts/check-format.sh

echo "=== release build and tests"
scripts/build.sh release
run_ctest --test-dir build --output-on-failure -j2

echo "=== sanitizer build (ASan + UBSan) and tests"
scripts/build.sh sanitize
# The crash and fault replays sample fewer points here (the same code paths,
# fewer states; CrashPointsToTry in tests/crash_env.h): under ASan their
# release samples alone would take most of the budget.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  DMCOW_CRASH_SAMPLE=8 run_ctest --test-dir build-sanitize --output-on-failure -j2 -LE vm

if [ -f tests/fuzz/run.sh ]; then
  echo "=== fuzzing for ${FUZZ_SECONDS}s"
  scripts/build.sh fuzz
  tests/fuzz/run.sh build-fuzz "$FUZZ_SECONDS"
fi
echo "=== all suites passed"
