#!/usr/bin/env bash
# The long crash and fault replay (issue 14), run before a change to the
# write ordering is called done; CI runs a bounded sample of the same tests.
#   - crash_boundary_test with every refcount width (1-64) and 8 random
#     mixes of pending writes per crash point, every crash point;
#   - rebase_test's, snapshot_test's, amend_test's, bitmap_test's and
#     bitmap_writers_test's crash replays (every point);
#   - crash_test (every state CrashEnv lists), make_empty_crash_test and
#     the qcow2 plugin's crash test at every crash point;
#   - io_error_test (EIO and ENOSPC at every write and sync, a read error at
#     every read).
# DMCOW_CRASH_FULL=1 turns each test's CI sample (CrashPointsToTry in
# tests/crash_env.h) into every point.
# Each prints its counts (crash points, states, distinct states checked by
# qemu-img); the output goes to build/crash-replay.log as well.
# Usage: scripts/crash-replay.sh [build-dir]   (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
build="${1:-build}"
log="$build/crash-replay.log"
ninja -C "$build" crash_boundary_test crash_test make_empty_crash_test rebase_test snapshot_test amend_test \
  bitmap_test bitmap_writers_test io_error_test \
  qcow2_plugin_crash_test >/dev/null
: >"$log"
run() {
  echo "=== $*" | tee -a "$log"
  local start=$SECONDS
  env "$@" 2>&1 | grep -E "warning:|crash points|states|faults|passed|failed|FAILED" -A1 | tee -a "$log"
  echo "    ($((SECONDS - start)) s)" | tee -a "$log"
}
run DMCOW_CRASH_FULL=1 DMCOW_CRASH_RANDOM=8 "$build/tests/crash_boundary_test"
run DMCOW_CRASH_FULL=1 DMCOW_CRASH_STATES=1 "$build/tests/crash_test"
run DMCOW_CRASH_FULL=1 "$build/tests/make_empty_crash_test"
run DMCOW_CRASH_FULL=1 "$build/tests/rebase_test" "rebase: a crash*"
run DMCOW_CRASH_FULL=1 "$build/tests/snapshot_test" "snapshot: a crash*"
run DMCOW_CRASH_FULL=1 "$build/tests/amend_test" "amend: a crash*"
run DMCOW_CRASH_FULL=1 "$build/tests/bitmap_test" "bitmap: a crash*"
run DMCOW_CRASH_FULL=1 "$build/tests/bitmap_writers_test" "maintained bitmaps: a crash*"
run DMCOW_CRASH_FULL=1 "$build/tests/io_error_test"
run DMCOW_CRASH_FULL=1 "$build/daemon/tests/qcow2_plugin_crash_test"
grep -q "FAILED" "$log" && { echo "crash-replay: FAILURES (see $log)"; exit 1; }
echo "crash-replay: all passed ($log)"
