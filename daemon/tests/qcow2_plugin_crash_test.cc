// The qcow2 plugin's metadata ordering under power loss. A model of the
// kernel (kernel_model.h) drives Qcow2Mapper over a CrashEnv: the kernel's
// data writes, the daemon's own fills and the engine's metadata all go to
// one simulated disk that drops, applies or tears every write not yet
// synced when the power fails, at a sample of points (CI) or every point
// (scripts/crash-replay.sh) of a seeded sequence of writes and flushes, on
// shapes from an empty image to 512-byte clusters growing across refcount
// blocks; at each, every state
// CrashEnv::CrashStates lists (each pending change dropped, applied alone,
// torn; random mixes). Each crashed image must be consistent for the real
// qemu-img check (no errors; leaks allowed) and hold every byte as of the
// last flush the device completed (bytes written since may be old or new).
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstring>
#include <random>

#include "crash_env.h"
#include "kernel_model.h"
#include "test_util.h"

using dmcowd::Qcow2Mapper;
using dmcowd::Status;
using dmcowd_test::KernelModel;
using namespace dmcow_test;

namespace {

struct Op {
  bool flush;
  uint64_t offset, length, seed;
};

// Writes of up to `max_len` bytes, a flush after every third.
std::vector<Op> MakeOps(uint64_t size, uint64_t seed, uint64_t max_len) {
  std::mt19937_64 rng(seed);
  std::vector<Op> ops;
  for (int i = 0; i < 24; i++) {
    if (i % 4 == 3) {
      ops.push_back(Op{true, 0, 0, 0});
      continue;
    }
    uint64_t len = 1 + rng() % max_len;
    uint64_t off = rng() % size;
    if (rng() % 2) off &= ~uint64_t{65535};
    len = std::min(len, size - off);
    ops.push_back(Op{false, off, len, rng()});
  }
  ops.push_back(Op{true, 0, 0, 0});
  return ops;
}

struct Outcome {
  std::vector<uint8_t> flushed;  // content as of the last completed flush
  std::vector<bool> unsure;      // sectors written since that flush
};

// Runs `ops` until the power fails; what the device promised is in *out.
void RunOps(CrashEnv* env, const std::string& path, const std::vector<Op>& ops, std::vector<uint8_t> content,
            Outcome* out) {
  const uint64_t size = content.size();
  out->flushed = content;
  out->unsure.assign((size + 511) / 512, false);
  dmcow::OpenOptions o;
  o.writable = true;
  o.env = env;
  std::unique_ptr<dmcow::Image> image;
  Status s = dmcow::OpenImage(path, o, &image);
  if (!s.ok()) {
    REQUIRE(env->crashed());  // only the power failing may stop an open
    return;
  }
  std::unique_ptr<dmcow::File> file;
  REQUIRE(env->OpenFile(path, dmcow::OpenMode::kReadWrite, &file).ok());
  uint64_t file_size = 0;
  REQUIRE(file->Size(&file_size).ok());
  KernelModel kernel(file.get(), image->backing(), size);
  (void)kernel.EnsureImageBytes(file_size);
  Qcow2Mapper mapper(image.get(), &kernel, true, image->backing() != nullptr);
  REQUIRE(mapper.Init().ok());
  kernel.Attach(&mapper);
  for (const Op& op : ops) {
    if (op.flush) {
      if (!kernel.Flush().ok()) break;
      out->flushed = content;
      std::fill(out->unsure.begin(), out->unsure.end(), false);
      continue;
    }
    std::mt19937_64 rng(op.seed);
    std::vector<uint8_t> data = MixedData(rng, op.length);
    for (uint64_t sec = op.offset / 512; sec * 512 < op.offset + op.length; sec++) out->unsure[sec] = true;
    std::memcpy(content.data() + op.offset, data.data(), op.length);
    // A write that fails (power gone) leaves its range unsure, as marked.
    if (!kernel.Write(op.offset, data.data(), op.length).ok()) break;
  }
  // Closing (the image's destructor) writes too: crash points fall there as
  // well; once the power is gone its writes fail and change nothing.
}

}  // namespace

TEST_CASE("qcow2 plugin: a crash at any point leaves a consistent image with every flushed write") {
  SKIP_WITHOUT_QEMU();
  struct Shape {
    const char* name;
    std::string setup;
    uint64_t ci_sample;  // crash points CI tries (CrashPointsToTry); the long replay: every one
    uint64_t max_write = 150000;
  };
  const std::vector<Shape> shapes = {
      {"empty", "qemu-img create -q -f qcow2 img.qcow2 4M", 12},
      {"compressed, zero clusters",
       "qemu-img create -q -f raw s.raw 4M && qemu-io -f raw -c 'write -P 5 0 3M' s.raw >/dev/null && "
       "qemu-img convert -c -O qcow2 s.raw img.qcow2 && qemu-io -f qcow2 -c 'write -z 1M 128k' img.qcow2 >/dev/null",
       12},
      {"snapshot-shared clusters",
       "qemu-img create -q -f qcow2 img.qcow2 4M && qemu-io -f qcow2 -c 'write -P 1 0 4M' img.qcow2 >/dev/null && "
       "qemu-img snapshot -c s img.qcow2",
       12},
      // 4 KiB chunks of 512-byte clusters: the file grows across refcount
      // blocks (64 clusters each) and the refcount table as the kernel writes.
      // Short writes: the kernel model writes each 512-byte chunk on its own.
      {"512-byte clusters, 64-bit refcounts",
       "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 img.qcow2 4M", 12, 6000},
  };
  uint64_t seed = 11, states = 0;
  for (const Shape& shape : shapes) {
    SECTION(shape.name) {
      TempDir dir;
      MustRun("cd " + dir.path() + " && " + shape.setup);
      MustRun("qemu-img convert -O raw " + dir / "img.qcow2" + " " + dir / "ref.raw");
      const std::vector<uint8_t> image_bytes = ReadWholeFile(dir / "img.qcow2");
      const std::vector<uint8_t> ref = ReadWholeFile(dir / "ref.raw");
      const std::vector<Op> ops = MakeOps(ref.size(), seed++, shape.max_write);
      const std::string path = dir / "img.qcow2";
      uint64_t total;
      {
        CrashEnv env(UINT64_MAX);
        env.PutFile(path, image_bytes);
        Outcome o;
        RunOps(&env, path, ops, ref, &o);
        total = env.ops();  // closing included
      }
      INFO(shape.name << ": " << total << " writes, truncations and syncs");
      REQUIRE(total > 20);
      QemuCheckVerdicts verdicts(dir / "crashed.qcow2");
      for (uint64_t crash_after : CrashPointsToTry(0, total, shape.ci_sample)) {
        CrashEnv env(crash_after);
        env.PutFile(path, image_bytes);
        Outcome o;
        RunOps(&env, path, ops, ref, &o);
        for (CrashEnv::State& state : env.CrashStates(path, seed * 1000 + crash_after, 2)) {
          INFO("crash after " << crash_after << " of " << total << "; state: " << state.label);
          states++;
          const std::string verdict = verdicts.Judge(state.bytes);
          INFO("qemu-img check:\n" << verdict);
          REQUIRE(verdict.empty());
          WriteWholeFile(dir / "crashed.qcow2", state.bytes);
          MustRun("qemu-img convert -O raw " + dir / "crashed.qcow2" + " " + dir / "crashed.raw");
          const std::vector<uint8_t> got = ReadWholeFile(dir / "crashed.raw");
          REQUIRE(got.size() == ref.size());
          uint64_t lost = 0;
          for (uint64_t sec = 0; sec < o.unsure.size(); sec++) {
            if (o.unsure[sec]) continue;
            const uint64_t n = std::min<uint64_t>(512, got.size() - sec * 512);
            if (std::memcmp(got.data() + sec * 512, o.flushed.data() + sec * 512, n) != 0) lost++;
          }
          REQUIRE(lost == 0);
        }
      }
    }
  }
  WARN("crash states judged: " << states);
}
