// The Catch2 main of every test binary: a binary that skipped a test case
// (DMCOW_SKIP) and failed none exits 77, so CTest (SKIP_RETURN_CODE, set by
// dmcow_test()) reports it as skipped instead of passed.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <cstdio>

#include "test_util.h"

int main(int argc, char** argv) {
  const int failed = Catch::Session().run(argc, argv);
  if (failed == 0 && dmcow_test::SkippedCount() > 0) {
    std::fprintf(stderr, "%d test case(s) skipped: exit 77 (skipped, not passed)\n", dmcow_test::SkippedCount());
    return 77;
  }
  return failed;
}
