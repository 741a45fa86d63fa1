// Crash replay where metadata grows: the writes that make a new refcount
// block, a larger refcount table, new L2 tables and a larger L1 table, for
// every refcount width, with 512-byte clusters so that each boundary comes
// after a few dozen clusters. Rules (1)-(8) at the top of
// qcow/src/qcow2/qcow2_write.cc, checked at crash points of each workload:
// the power fails after the k-th write, truncation or sync, and
// each state CrashEnv::CrashStates lists (nothing, everything, each pending
// change dropped alone, applied alone or torn, random mixes) is judged by
// the real qemu-img check (no corruption; leaks are allowed) and must hold
// every byte as of the last completed flush.
//
// Bounds: scripts/crash-replay.sh runs the long version (every crash point
// of every workload, more random mixes: DMCOW_CRASH_FULL=1,
// DMCOW_CRASH_RANDOM=N). CI takes every crash point of the L1 growth and an
// even sample (Workload::ci_sample, CrashPointsToTry) of the others, with 2
// random mixes per point; its sanitizer pass samples DMCOW_CRASH_SAMPLE
// points per workload.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <cstring>
#include <random>

#include "crash_env.h"
#include "dmcow/image.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;

namespace {

uint64_t EnvNumber(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : fallback;
}

struct Step {
  enum Kind { kWrite, kFlush, kGrow } kind;
  uint64_t offset = 0, length = 0;  // kGrow: length is the new size
  uint64_t seed = 0;
};

struct Workload {
  std::string name;
  std::string options;  // qemu-img create -o
  uint64_t size;
  std::vector<Step> steps;
  // Crash points CI samples (0: every one); the long run takes every one.
  uint64_t ci_sample = 24;
};

// Sequential writes of `chunk` bytes from `from` until `bytes` are written,
// a flush after every second write and at the end: the file grows cluster
// by cluster across the metadata boundaries.
std::vector<Step> GrowingWrites(uint64_t from, uint64_t bytes, uint64_t chunk, uint64_t seed) {
  std::vector<Step> steps;
  for (uint64_t done = 0, i = 0; done < bytes; done += chunk, i++) {
    steps.push_back(Step{Step::kWrite, from + done, std::min(chunk, bytes - done), seed * 1000 + i});
    if (i % 2 == 1) steps.push_back(Step{Step::kFlush});
  }
  steps.push_back(Step{Step::kFlush});
  return steps;
}

std::vector<Workload> Workloads() {
  std::vector<Workload> w;
  for (unsigned bits : {1u, 2u, 4u, 8u, 16u, 32u, 64u}) {
    // A refcount block of 512 bytes covers 4096 / bits clusters: write past
    // the first block and into a second new one.
    const uint64_t covered = uint64_t{4096} / bits * 512;
    const uint64_t bytes = covered + covered / 2 + 8192;
    w.push_back(Workload{"refcount block, refcount_bits=" + std::to_string(bits),
                         "refcount_bits=" + std::to_string(bits) + ",cluster_size=512", 4 << 20,
                         GrowingWrites(0, bytes, std::max<uint64_t>(4096, bytes / 10), bits),
                         // Narrow refcounts take megabytes of 512-byte clusters to
                         // fill a block (width 1: 358 crash points, two minutes, each
                         // a rerun of the workload): CI samples them more thinly.
                         bits >= 16 ? 24u : 12u});
  }
  // A one-cluster refcount table (64 entries) of 64-bit refcounts covers
  // 4096 clusters (2 MiB): writing past it makes the table grow.
  w.push_back(Workload{"refcount table growth", "refcount_bits=64,cluster_size=512", 4 << 20,
                       GrowingWrites(0, (2 << 20) + (64 << 10), 128 << 10, 7)});
  // L2 tables (64 entries each) begin every 32 KiB of guest space; the L1
  // table grows when the disk does.
  {
    std::vector<Step> steps = GrowingWrites(0, 20 << 10, 6 << 10, 3);
    steps.push_back(Step{Step::kGrow, 0, 8 << 20});
    for (const Step& s : GrowingWrites(6 << 20, 40 << 10, 12 << 10, 4)) steps.push_back(s);
    w.push_back(Workload{"L2 tables and L1 growth", "cluster_size=512", 1 << 20, steps, /*ci_sample=*/0});
  }
  return w;
}

struct Outcome {
  std::vector<uint8_t> flushed;  // guest content as of the last completed flush
  std::vector<bool> touched;     // bytes changed by steps after it
};

Outcome RunUntilCrash(CrashEnv* env, const std::string& path, uint64_t size, const std::vector<Step>& steps) {
  Outcome out{std::vector<uint8_t>(size, 0), std::vector<bool>(size, false)};
  std::vector<uint8_t> current = out.flushed;
  const OpenOptions options = CrashTestOptions(env);
  std::unique_ptr<Image> image;
  Status s = OpenImage(path, options, &image);
  if (!s.ok()) {
    INFO(s.ToString());
    REQUIRE(env->crashed());
    return out;
  }
  for (const Step& step : steps) {
    if (step.kind == Step::kWrite) {
      std::mt19937_64 rng(step.seed);
      std::vector<uint8_t> data(step.length);
      for (auto& b : data) b = static_cast<uint8_t>(rng());
      std::fill(out.touched.begin() + step.offset, out.touched.begin() + step.offset + step.length, true);
      std::memcpy(current.data() + step.offset, data.data(), data.size());
      s = image->Write(step.offset, data.data(), data.size());
    } else if (step.kind == Step::kGrow) {
      current.resize(step.length, 0);
      out.touched.resize(step.length, true);  // the new range: zeros, or not there at all
      s = image->Grow(step.length);
      if (s.ok()) {  // Grow returns with the new size and L1 durable
        out.flushed.resize(step.length, 0);
        std::fill(out.touched.begin() + size, out.touched.end(), false);
      }
    } else {
      s = image->Flush();
      if (s.ok()) {
        out.flushed = current;
        std::fill(out.touched.begin(), out.touched.end(), false);
      }
    }
    if (!s.ok()) {
      INFO(s.ToString());
      REQUIRE(env->crashed());  // the only failure this environment produces
      break;
    }
  }
  image.reset();
  return out;
}

}  // namespace

TEST_CASE("every crash point where metadata grows leaves no corruption and loses no flushed write", "[qemu][crash]") {
  SKIP_WITHOUT_QEMU();
  const uint64_t random_subsets = EnvNumber("DMCOW_CRASH_RANDOM", 2);
  TempDir dir;
  QemuCheckVerdicts verdicts(dir / "crashed.qcow2");
  uint64_t points = 0, states = 0;
  for (const Workload& w : Workloads()) {
    DYNAMIC_SECTION(w.name) {
      const std::string path = dir / "img.qcow2";
      MustRun("rm -f '" + path + "' && qemu-img create -q -f qcow2 -o " + w.options + " '" + path + "' " +
              std::to_string(w.size));
      const std::vector<uint8_t> image_bytes = ReadWholeFile(path);
      CrashEnv dry(UINT64_MAX);
      dry.PutFile(path, image_bytes);
      const Outcome complete = RunUntilCrash(&dry, path, w.size, w.steps);
      const uint64_t total = dry.ops();
      // The workload does cross what it is named after: the finished image is clean.
      WriteWholeFile(dir / "done.qcow2", dry.CrashStates(path, 0, 0).front().bytes);
      MustRun("qemu-img check -q '" + dir / "done.qcow2" + "'");
      for (uint64_t k : CrashPointsToTry(0, total, w.ci_sample)) {
        CrashEnv env(k);
        env.PutFile(path, image_bytes);
        const Outcome outcome = RunUntilCrash(&env, path, w.size, w.steps);
        points++;
        const std::string pending = env.DescribePending(path);
        for (CrashEnv::State& state : env.CrashStates(path, k * 7919 + 1, static_cast<int>(random_subsets))) {
          INFO(w.name << ": crash after " << k << " of " << total << " writes/truncations/syncs; state: " << state.label
                      << "; pending:\n"
                      << pending);
          states++;
          const std::string verdict = verdicts.Judge(state.bytes);
          INFO("qemu-img check:\n" << verdict);
          REQUIRE(verdict.empty());

          WriteWholeFile(dir / "state.qcow2", state.bytes);
          std::unique_ptr<Image> crashed;
          OpenOptions ro;
          REQUIRE(OpenImage(dir / "state.qcow2", ro, &crashed).ok());
          const uint64_t vsize = crashed->virtual_size();
          REQUIRE((vsize == w.size || vsize == complete.flushed.size()));
          std::vector<uint8_t> got(vsize);
          REQUIRE(crashed->Read(0, got.data(), got.size()).ok());
          size_t lost = got.size();
          for (size_t i = 0; i < got.size() && lost == got.size(); i++) {
            const bool known = i < outcome.flushed.size() && !outcome.touched[i];
            if (known ? got[i] != outcome.flushed[i] : (i >= outcome.flushed.size() && got[i] != 0)) lost = i;
          }
          INFO("first flushed byte lost at guest offset " << lost);
          REQUIRE(lost == got.size());
        }
      }
    }
  }
  INFO("crash points " << points << ", states " << states << ", qemu-img checks " << verdicts.checks());
  CHECK(points > 0);
  WARN("crash points " << points << ", states " << states << ", distinct states checked by qemu-img "
                       << verdicts.checks());
}
