#!/usr/bin/env bash
# README's second command, and what CI runs (.ci/run): the whole suite.
#  0. the formatting check (clang-format, .clang-format);
#  1. the static programs the kernel VM suite runs inside the VM (tests/vm,
#     label "vm"); the Debian packages built, installed in a clean root,
#     checked and removed (tests/debian_package_test.sh), and the VM suite
#     with the packaged dmcowd, dmcow-qcow, dmcow-img and nbdkit plugin and
#     the module DKMS built there: Debian's kernel under TCG, one core, ~5
#     minutes. (The package's build is the suite's release build: building
#     the same programs a second time took 5 of CI's minutes.);
#  2. beside the VM suite, at lower priority (so the VM's timeouts see a whole
#     core): the libFuzzer target over "open an image and read all of it",
#     bounded, then the ASan + UBSan build (clang) and every other test in it.
# Every test but the VM suite runs once, in the sanitizer build: the same
# sources and tests as release, at -O1 with ASan and UBSan, which catch what a
# release run would and memory errors besides. Running them in both builds
# took 12 of CI's minutes for no finding the sanitizer run missed, and
# building them twice 3 more. gcc builds the packaged programs the VM suite
# and its host checks run; clang the sanitizer build. A release run of them
# all is `scripts/build.sh release && ctest --test-dir build`.
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

echo "=== release build of the in-VM test programs"
scripts/build.sh release responder vmtest daemontest qcowtest blkio

echo "=== Debian packages, then the kernel VM suite on them, in the background; their output follows"
# The VM suite runs the dmcow package's programs and loads the dm-cow.ko
# that DKMS built from the dm-cow-dkms package in a clean root
# (tests/debian_package_test.sh).
vm_log=$(mktemp)
pkg_out=$(mktemp -d)
(tests/debian_package_test.sh "$pkg_out" >"$vm_log" 2>&1 &&
  DMCOW_INSTALLED=$pkg_out/root DMCOW_KO=$pkg_out/dm-cow.ko run_ctest --test-dir build --output-on-failure -L vm >>"$vm_log" 2>&1) &
vm_pid=$!
trap 'kill "$vm_pid" 2>/dev/null || true' EXIT

set +e
(
  set -e
  renice -n 10 "$BASHPID" >/dev/null
  if [ -f tests/fuzz/run.sh ]; then
    echo "=== fuzzing for ${FUZZ_SECONDS}s"
    scripts/build.sh fuzz
    tests/fuzz/run.sh build-fuzz "$FUZZ_SECONDS"
  fi
  echo "=== sanitizer build (ASan + UBSan) and tests"
  scripts/build.sh sanitize
  # The crash and fault replays sample fewer points here (6: two at each
  # end, the rest spread), and the tests that repeat one sequence over many
  # image shapes take 3 of them (the first, the middle and the last): the
  # same code paths, fewer states (CrashPointsToTry in tests/crash_env.h,
  # Sampled in tests/test_util.h). Under ASan their full sets alone would
  # take most of the budget (8 points and 4 shapes kept CI at 35 minutes,
  # above its 30). The release run (header) takes them all.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    DMCOW_CRASH_SAMPLE=6 DMCOW_TEST_SAMPLE=3 run_ctest --test-dir build-sanitize --output-on-failure -j2 -LE vm
)
other_rc=$?
wait "$vm_pid"
vm_rc=$?
set -e
trap - EXIT
echo "=== Debian packages and the kernel VM suite on them"
cat "$vm_log"
rm -f "$vm_log"
[ "$other_rc" = 0 ] || { echo "test.sh: the build, fuzzing or a sanitizer-build test failed (above)" >&2; exit 1; }
[ "$vm_rc" = 0 ] || { echo "test.sh: the Debian package test or the kernel VM suite failed (above)" >&2; exit 1; }
echo "=== all suites passed"
