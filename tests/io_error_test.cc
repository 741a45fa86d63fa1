// I/O errors while writing (rule 8 at the top of qcow/src/qcow2/qcow2_write.cc):
// EIO and ENOSPC injected at each write, truncation and sync of a workload
// in turn, through CrashEnv. A failed sync also loses the file's pending
// writes while the next sync reports success, as Linux does. Then:
//  - from the first failure on, no write and no flush reports success;
//  - after a crash that follows (each state CrashEnv::CrashStates lists),
//    the real qemu-img check finds no corruption (leaks are allowed) and
//    every byte of the last flush that did report success reads back.
// And the command line: a convert that runs out of file size fails with
// exit 1 and the error, leaving an image qemu-img check accepts.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstring>
#include <random>

#include "crash_env.h"
#include "dmcow/image.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;

namespace {

struct Step {
  bool flush;
  uint64_t offset, length, seed;
};

// Writes over a 1 MiB disk of 512-byte clusters (new clusters, refcount
// blocks and L2 tables; overwrites in place), a flush after every third.
std::vector<Step> MakeSteps(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Step> steps;
  for (int i = 0; i < 24; i++) {
    if (i % 3 == 2) {
      steps.push_back(Step{true, 0, 0, 0});
      continue;
    }
    const uint64_t length = 512 + rng() % (24 << 10);
    const uint64_t offset = rng() % ((1 << 20) - length);
    steps.push_back(Step{false, offset, length, rng()});
  }
  steps.push_back(Step{true, 0, 0, 0});
  return steps;
}

struct Outcome {
  std::vector<uint8_t> acked;   // content as of the last flush that reported success
  std::vector<bool> touched;    // bytes written after it
  bool failed = false;          // some call failed
  int acked_after_failure = 0;  // writes and flushes that reported success after a failure
};

// `fill`: every byte of the disk before the steps.
Outcome RunSteps(CrashEnv* env, const std::string& path, const std::vector<Step>& steps, uint8_t fill = 0) {
  const uint64_t size = 1 << 20;
  Outcome out{std::vector<uint8_t>(size, fill), std::vector<bool>(size, false)};
  std::vector<uint8_t> current = out.acked;
  const OpenOptions options = CrashTestOptions(env);
  std::unique_ptr<Image> image;
  if (!OpenImage(path, options, &image).ok()) {
    out.failed = true;
    return out;
  }
  for (const Step& step : steps) {
    Status s;
    if (step.flush) {
      s = image->Flush();
      if (s.ok()) {  // acknowledged, failure or not: the guest relies on it
        out.acked = current;
        std::fill(out.touched.begin(), out.touched.end(), false);
      }
    } else {
      std::mt19937_64 rng(step.seed);
      std::vector<uint8_t> data(step.length);
      for (auto& b : data) b = static_cast<uint8_t>(rng());
      std::memcpy(current.data() + step.offset, data.data(), data.size());
      std::fill(out.touched.begin() + step.offset, out.touched.begin() + step.offset + step.length, true);
      s = image->Write(step.offset, data.data(), data.size());
    }
    if (s.ok() && out.failed) out.acked_after_failure++;
    if (!s.ok()) out.failed = true;
  }
  if (!out.failed && !image->Flush().ok()) out.failed = true;
  image.reset();
  return out;
}

// Then a crash: every state CrashEnv lists must be clean for qemu-img check
// (leaks allowed) and hold every acknowledged byte. Returns the states checked.
uint64_t CheckAfterCrash(const CrashEnv& env, const std::string& path, const Outcome& outcome, const TempDir& dir,
                         uint64_t seed) {
  uint64_t states = 0;
  for (CrashEnv::State& state : env.CrashStates(path, seed, 2)) {
    INFO("then a crash; state: " << state.label);
    states++;
    WriteWholeFile(dir / "after.qcow2", state.bytes);
    std::string out;
    const int rc = Run("qemu-img check '" + dir / "after.qcow2" + "'", &out);
    INFO("qemu-img check:\n" << out);
    REQUIRE((rc == 0 || rc == 3));
    REQUIRE(out.find("ERROR") == std::string::npos);
    std::unique_ptr<Image> image;
    OpenOptions ro;
    REQUIRE(OpenImage(dir / "after.qcow2", ro, &image).ok());
    std::vector<uint8_t> got(1 << 20);
    REQUIRE(image->Read(0, got.data(), got.size()).ok());
    size_t lost = got.size();
    for (size_t i = 0; i < got.size() && lost == got.size(); i++) {
      if (!outcome.touched[i] && got[i] != outcome.acked[i]) lost = i;
    }
    INFO("first byte of an acknowledged flush lost at guest offset " << lost);
    REQUIRE(lost == got.size());
  }
  return states;
}

}  // namespace

TEST_CASE("after an I/O error nothing more is acknowledged and the image stays consistent", "[qemu][ioerror]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  const std::string path = dir / "img.qcow2";
  MustRun("qemu-img create -q -f qcow2 -o refcount_bits=64,cluster_size=512 '" + path + "' 1M");
  const std::vector<uint8_t> image_bytes = ReadWholeFile(path);
  const std::vector<Step> steps = MakeSteps(5);
  CrashEnv dry(UINT64_MAX);
  dry.PutFile(path, image_bytes);
  REQUIRE(!RunSteps(&dry, path, steps).failed);
  const uint64_t total = dry.ops();
  REQUIRE(total > 40);

  uint64_t faults = 0, states = 0;
  for (CrashEnv::Fault fault : {CrashEnv::Fault::kEio, CrashEnv::Fault::kEnospc}) {
    // The last call is the closing flush's sync in the destructor, whose
    // failure nobody is told of: the calls before it (CI: a sample; the
    // long replay, scripts/crash-replay.sh: every one).
    for (uint64_t at : CrashPointsToTry(1, total - 1, 30)) {
      CrashEnv env(UINT64_MAX);
      env.PutFile(path, image_bytes);
      env.InjectFault(at, fault);
      const Outcome outcome = RunSteps(&env, path, steps);
      const char* kind = fault == CrashEnv::Fault::kEio ? "EIO" : "ENOSPC";
      INFO(kind << " injected at call " << at << " of " << total);
      REQUIRE(outcome.failed);
      CHECK(outcome.acked_after_failure == 0);
      faults++;
      states += CheckAfterCrash(env, path, outcome, dir, at);
    }
  }
  WARN("faults injected " << faults << ", states after them " << states);
}

// A read that fails in the middle of a change (a refcount block read while
// new blocks are being placed, an L2 slice while a cluster is relinked)
// leaves the caches half made: rule 9 of qcow/src/qcow2/qcow2_write.cc,
// nothing of them may reach the disk, not at a later flush nor at close.
TEST_CASE("after a read error half way through a change nothing more is written", "[qemu][ioerror]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  const std::string path = dir / "img.qcow2";
  // Every cluster allocated and shared with a snapshot: each write copies
  // an L2 table and allocates, reading tables, refcount blocks and data.
  MustRun("qemu-img create -q -f qcow2 -o refcount_bits=64,cluster_size=512 '" + path + "' 1M && qemu-io -c " +
          "'write -P 3 0 1M' '" + path + "' >/dev/null && qemu-img snapshot -c s '" + path + "'");
  const std::vector<uint8_t> image_bytes = ReadWholeFile(path);
  const std::vector<Step> steps = MakeSteps(9);
  CrashEnv dry(UINT64_MAX);
  dry.PutFile(path, image_bytes);
  REQUIRE(!RunSteps(&dry, path, steps, 3).failed);
  const uint64_t total = dry.reads();
  REQUIRE(total > 40);
  // CI: an even sample of the reads; the long replay: every one.
  uint64_t faults = 0, states = 0;
  for (uint64_t at : CrashPointsToTry(1, total, 100)) {
    CrashEnv env(UINT64_MAX);
    env.PutFile(path, image_bytes);
    env.InjectReadFault(at);
    const Outcome outcome = RunSteps(&env, path, steps, 3);
    INFO("read " << at << " of " << total << " failed");
    if (!outcome.failed) continue;  // a read whose failure nobody saw (the closing flush's)
    CHECK(outcome.acked_after_failure == 0);
    faults++;
    states += CheckAfterCrash(env, path, outcome, dir, at);
  }
  CHECK(faults > 0);
  WARN("read faults that failed a call " << faults << " (of " << total << " reads), states after them " << states);
}

TEST_CASE("a convert that runs out of space fails with the error and leaves a consistent image", "[qemu][ioerror]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("head -c 4M /dev/urandom > '" + dir / "src.raw" + "'");
  MustRun("qemu-img create -q -f qcow2 '" + dir / "dst.qcow2" + "' 4M");
  // A file-size limit stands in for a full file system: writes past it fail
  // (EFBIG) as they would with ENOSPC, and the engine must not go on.
  std::string out;
  const int rc =
      Run("cd '" + dir.path() +
              "' && trap '' XFSZ && ulimit -f 2048 && '" DMCOW_IMG_PATH "' convert -n -O qcow2 src.raw dst.qcow2",
          &out);
  INFO(out);
  CHECK(rc == 1);
  CHECK(out.find("dst.qcow2") != std::string::npos);
  CHECK(out.find("File too large") != std::string::npos);
  std::string check;
  const int check_rc = Run("qemu-img check '" + dir / "dst.qcow2" + "'", &check);
  INFO(check);
  CHECK((check_rc == 0 || check_rc == 3));
  CHECK(check.find("ERROR") == std::string::npos);
}
