// Crash simulation for the write path: the ordering rules at the top of
// qcow/src/qcow2/qcow2_write.cc, checked. For seeded operation sequences, the
// power fails after the k-th write or sync, for every k (or a dense sample),
// and the surviving disk is assembled with unsynced writes applied, dropped
// or torn. The real qemu-img check must then find no corruption (leaks are
// allowed), and every byte not written since the last completed flush must
// hold its flushed value.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <cstring>
#include <random>

#include "crash_env.h"
#include "dmcow/compress.h"
#include "dmcow/image.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;

namespace {

// Crash points CI tries per operation sequence (CrashPointsToTry).
constexpr uint64_t kCiCrashPoints = 16;

// The states judged at each crash point: one seeded random mix of the
// pending writes, or (DMCOW_CRASH_STATES=1, scripts/crash-replay.sh) every
// state CrashEnv::CrashStates lists.
std::vector<CrashEnv::State> StatesToCheck(const CrashEnv& env, const std::string& path, std::mt19937_64& rng) {
  const char* all = std::getenv("DMCOW_CRASH_STATES");
  if (all && *all == '1') return env.CrashStates(path, rng(), 2);
  return {CrashEnv::State{"one random mix of the pending writes", env.CrashedContent(path, rng)}};
}

struct Op {
  int kind;  // 0 write, 1 zero, 2 discard, 3 flush, 4 compressed cluster
  uint64_t offset, length;
  uint64_t seed;
};

std::vector<Op> MakeOps(uint64_t seed, uint64_t size, uint64_t cluster, int count) {
  std::mt19937_64 rng(seed);
  std::vector<Op> ops;
  for (int i = 0; i < count; i++) {
    Op op;
    uint64_t r = rng() % 12;
    op.kind = r < 5 ? 0 : r < 7 ? 1 : r < 8 ? 2 : r < 10 ? 3 : 4;
    // A small hot region, so later operations overwrite, zero and free
    // clusters that earlier ones allocated and flushed.
    const uint64_t hot = std::min(size, 12 * cluster);
    op.length = 1 + rng() % (3 * cluster);
    op.offset = rng() % (hot - op.length);
    if (op.kind == 4 || (op.kind != 0 && rng() % 2)) {  // whole clusters: zero flags and freed clusters
      op.offset -= op.offset % cluster;
      op.length = std::min(hot - op.offset, (1 + rng() % 3) * cluster);
      if (op.kind == 4) op.length = std::min(op.length, cluster);
    }
    op.seed = rng();
    ops.push_back(op);
  }
  ops.push_back(Op{3, 0, 0, 0});
  return ops;
}

struct Outcome {
  std::vector<uint8_t> flushed;  // content as of the last completed flush
  std::vector<bool> touched;     // bytes changed by operations after it
};

// Runs `ops` on the image in `env` until the power fails; returns what the
// guest may rely on.
Outcome RunUntilCrash(CrashEnv* env, const std::string& path, const std::vector<uint8_t>& initial,
                      const std::vector<Op>& ops, uint64_t cluster, bool zero_representable) {
  Outcome out{initial, std::vector<bool>(initial.size(), false)};
  std::vector<uint8_t> current = initial;
  const OpenOptions options = CrashTestOptions(env);
  std::unique_ptr<Image> image;
  Status opened = OpenImage(path, options, &image);
  if (!opened.ok()) {
    INFO(opened.ToString());
    REQUIRE(env->crashed());  // only a power failure may stop the open
    return out;
  }
  for (const Op& op : ops) {
    Status s;
    auto touch = [&](uint64_t from, uint64_t to) {
      std::fill(out.touched.begin() + from, out.touched.begin() + to, true);
    };
    if (op.kind == 0) {
      std::mt19937_64 rng(op.seed);
      std::vector<uint8_t> data(op.length);
      for (auto& b : data) b = static_cast<uint8_t>(rng());
      touch(op.offset, op.offset + op.length);
      s = image->Write(op.offset, data.data(), data.size());
      std::memcpy(current.data() + op.offset, data.data(), data.size());
    } else if (op.kind == 4) {
      // Low-entropy bytes, so the cluster compresses and is packed beside
      // other compressed clusters.
      std::mt19937_64 rng(op.seed);
      std::vector<uint8_t> data(cluster, 0);
      for (uint64_t i = 0; i < op.length; i++) data[i] = static_cast<uint8_t>(rng() % 4);
      touch(op.offset, op.offset + op.length);
      CompressionSettings settings;
      settings.type = image->info().compression_type;
      std::vector<uint8_t> payload;
      if (CompressCluster(settings, data.data(), cluster, &payload)) {
        s = image->WriteCompressedCluster(op.offset, payload.data(), payload.size());
      } else {
        s = image->Write(op.offset, data.data(), op.length);
      }
      std::memcpy(current.data() + op.offset, data.data(), op.length);
    } else if (op.kind == 1) {
      touch(op.offset, op.offset + op.length);
      s = image->WriteZeroes(op.offset, op.length);
      std::memset(current.data() + op.offset, 0, op.length);
    } else if (op.kind == 2) {
      touch(op.offset, op.offset + op.length);
      s = image->Discard(op.offset, op.length);
      uint64_t first = (op.offset + cluster - 1) / cluster * cluster,
               last = (op.offset + op.length) / cluster * cluster;
      if (zero_representable && first < last) std::memset(current.data() + first, 0, last - first);
    } else {
      s = image->Flush();
      if (s.ok()) {
        out.flushed = current;
        std::fill(out.touched.begin(), out.touched.end(), false);
      }
    }
    if (!s.ok()) {
      REQUIRE(env->crashed());  // the only failure this environment produces
      break;
    }
  }
  image.reset();  // its closing flush fails too once the power is gone
  return out;
}

}  // namespace

TEST_CASE("a crash at any point leaves no corruption and loses no flushed write", "[qemu][crash]") {
  SKIP_WITHOUT_QEMU();
  struct Shape {
    const char* name;
    const char* options;
    uint64_t size, cluster;
    bool backing;
  };
  const Shape shapes[] = {
      {"v3-4k", "cluster_size=4k", 4 << 20, 4096, false},
      {"v2-64k-backing", "compat=0.10", 8 << 20, 65536, true},
      {"refcount64-512", "refcount_bits=64,cluster_size=512", 1 << 20, 512, false},
      {"extended-l2", "extended_l2=on,cluster_size=16k", 4 << 20, 16384, true},
      // Refcounts may lag behind the tables while the dirty bit is set:
      // after a crash, a repair (as QEMU runs on open) must make it clean.
      {"lazy-refcounts", "lazy_refcounts=on,cluster_size=4k", 4 << 20, 4096, false},
  };
  TempDir dir;
  int checked = 0, lazy_repairs = 0;
  for (const Shape& shape : shapes) {
    DYNAMIC_SECTION(shape.name) {
      std::string setup = "cd '" + dir.path() + "' && rm -f img.qcow2 base.qcow2 && ";
      if (shape.backing) {
        setup += "qemu-img create -q -f qcow2 base.qcow2 " + std::to_string(shape.size) +
                 " && qemu-io -c 'write -P 5 0 " + std::to_string(shape.size / 2) + "' base.qcow2 >/dev/null && " +
                 "qemu-img create -q -f qcow2 -o " + shape.options + " -b base.qcow2 -F qcow2 img.qcow2";
      } else {
        setup +=
            "qemu-img create -q -f qcow2 -o " + std::string(shape.options) + " img.qcow2 " + std::to_string(shape.size);
      }
      MustRun(setup);
      MustRun("cd '" + dir.path() + "' && qemu-img convert -O raw img.qcow2 initial.raw");
      const std::vector<uint8_t> image_bytes = ReadWholeFile(dir / "img.qcow2");
      const std::vector<uint8_t> base_bytes =
          shape.backing ? ReadWholeFile(dir / "base.qcow2") : std::vector<uint8_t>();
      const std::vector<uint8_t> initial = ReadWholeFile(dir / "initial.raw");
      const std::string path = dir / "img.qcow2";
      const bool zero_representable =
          std::string(shape.options).find("compat=0.10") == std::string::npos || !shape.backing;

      for (uint64_t seed = 1; seed <= 4; seed++) {
        const std::vector<Op> ops = MakeOps(seed * 77 + shape.size, shape.size, shape.cluster, 30);
        CrashEnv dry(UINT64_MAX);
        dry.PutFile(path, image_bytes);
        if (shape.backing) dry.PutFile(dir / "base.qcow2", base_bytes);
        RunUntilCrash(&dry, path, initial, ops, shape.cluster, zero_representable);
        const uint64_t total = dry.ops();
        // CI: an even sample plus the first and last points; the long replay: every one.
        for (uint64_t k : CrashPointsToTry(0, total, kCiCrashPoints)) {
          CrashEnv env(k);
          env.PutFile(path, image_bytes);
          if (shape.backing) env.PutFile(dir / "base.qcow2", base_bytes);
          Outcome outcome = RunUntilCrash(&env, path, initial, ops, shape.cluster, zero_representable);
          std::mt19937_64 rng(seed * 1000003 + k);
          for (CrashEnv::State& state : StatesToCheck(env, path, rng)) {
            WriteWholeFile(dir / "crashed.qcow2", state.bytes);
            INFO(shape.name << " seed " << seed << " crash after " << k << " of " << total
                            << " writes/syncs; state: " << state.label);
            std::string out;
            if (Run("qemu-img info --output=json '" + dir / "crashed.qcow2" + "' | grep -q '\"dirty-flag\": true'") ==
                0) {
              REQUIRE(std::string(shape.options).find("lazy_refcounts=on") != std::string::npos);
              lazy_repairs++;
              // A writable open repairs it, as QEMU's does.
              OpenOptions rw;
              rw.writable = true;
              std::unique_ptr<Image> repaired;
              Status st = OpenImage(dir / "crashed.qcow2", rw, &repaired);
              INFO(st.ToString());
              REQUIRE(st.ok());
              REQUIRE(!repaired->info().dirty);
            }
            int rc = Run("cd '" + dir.path() + "' && qemu-img check crashed.qcow2", &out);
            INFO("qemu-img check:\n" << out);
            REQUIRE((rc == 0 || rc == 3));  // clean, or leaked clusters only
            REQUIRE(out.find("ERROR") == std::string::npos);

            OpenOptions options;
            std::unique_ptr<Image> crashed;
            REQUIRE(OpenImage(dir / "crashed.qcow2", options, &crashed).ok());
            std::vector<uint8_t> got(initial.size());
            REQUIRE(crashed->Read(0, got.data(), got.size()).ok());
            size_t bad = got.size();
            for (size_t i = 0; i < got.size() && bad == got.size(); i++) {
              if (!outcome.touched[i] && got[i] != outcome.flushed[i]) bad = i;
            }
            INFO("first flushed byte lost at guest offset " << bad);
            REQUIRE(bad == got.size());
            checked++;
          }
        }
      }
      // The lazy shape did leave dirty images, and they were repaired.
      if (std::string(shape.options).find("lazy_refcounts=on") != std::string::npos) CHECK(lazy_repairs > 0);
    }
  }
  INFO("crash states checked: " << checked << ", dirty ones repaired: " << lazy_repairs);
  CHECK(checked > 0);
}

// qcow v1 (ordering rules at the top of qcow/src/qcow1/qcow1_write.cc). qemu-img
// check does not support qcow, so QEMU's verdict is that it can open and
// read the whole crashed image (convert -O raw); that read must hold every
// flushed byte, and the engine must read exactly what QEMU reads.
TEST_CASE("qcow v1: a crash at any point loses no flushed write and QEMU still reads the image", "[qemu][crash]") {
  SKIP_WITHOUT_QEMU();
  struct Shape {
    const char* name;
    const char* setup;  // run in the temp dir; makes img.qcow (and base.qcow)
    uint64_t size, cluster;
    bool backing;
  };
  const Shape shapes[] = {
      {"qcow1-4k", "qemu-img create -q -f qcow img.qcow 1M", 1 << 20, 4096, false},
      {"qcow1-512-backing",
       "qemu-img create -q -f qcow base.qcow 1M && qemu-io -t unsafe -f qcow -c 'write -P 5 0 512k' base.qcow "
       ">/dev/null && qemu-img create -q -f qcow -b base.qcow -F qcow img.qcow",
       1 << 20, 512, true},
      // Every cluster of the hot region is compressed: writes replace them.
      // (qemu-img 7.2 exits 1 after convert -c to qcow with the image
      // complete; compare is what counts.)
      {"qcow1-compressed",
       "(yes 'compressible qcow text' | head -c 512k; head -c 512k /dev/urandom) > r.raw && "
       "{ qemu-img convert -c -f raw -O qcow r.raw img.qcow; qemu-img compare -q -f raw -F qcow r.raw img.qcow; }",
       1 << 20, 4096, false},
  };
  TempDir dir;
  int checked = 0;
  for (const Shape& shape : shapes) {
    DYNAMIC_SECTION(shape.name) {
      MustRun("cd '" + dir.path() + "' && rm -f img.qcow base.qcow r.raw && " + shape.setup);
      MustRun("cd '" + dir.path() + "' && qemu-img convert -f qcow -O raw img.qcow initial.raw");
      const std::vector<uint8_t> image_bytes = ReadWholeFile(dir / "img.qcow");
      const std::vector<uint8_t> base_bytes = shape.backing ? ReadWholeFile(dir / "base.qcow") : std::vector<uint8_t>();
      const std::vector<uint8_t> initial = ReadWholeFile(dir / "initial.raw");
      REQUIRE(initial.size() == shape.size);
      const std::string path = dir / "img.qcow";

      for (uint64_t seed = 1; seed <= 4; seed++) {
        const std::vector<Op> ops = MakeOps(seed * 91 + shape.cluster, shape.size, shape.cluster, 30);
        CrashEnv dry(UINT64_MAX);
        dry.PutFile(path, image_bytes);
        if (shape.backing) dry.PutFile(dir / "base.qcow", base_bytes);
        RunUntilCrash(&dry, path, initial, ops, shape.cluster, /*zero_representable=*/false);
        const uint64_t total = dry.ops();
        for (uint64_t k : CrashPointsToTry(0, total, kCiCrashPoints)) {
          CrashEnv env(k);
          env.PutFile(path, image_bytes);
          if (shape.backing) env.PutFile(dir / "base.qcow", base_bytes);
          Outcome outcome = RunUntilCrash(&env, path, initial, ops, shape.cluster, false);
          std::mt19937_64 rng(seed * 1000003 + k);
          WriteWholeFile(dir / "crashed.qcow", env.CrashedContent(path, rng));
          INFO(shape.name << " seed " << seed << " crash after " << k << " of " << total << " writes/syncs");
          std::string out;
          int rc = Run("cd '" + dir.path() +
                           "' && rm -f crashed.raw && qemu-img convert -f qcow -O raw crashed.qcow crashed.raw",
                       &out);
          INFO("qemu-img convert: " << out);
          REQUIRE(rc == 0);
          const std::vector<uint8_t> qemu_read = ReadWholeFile(dir / "crashed.raw");
          REQUIRE(qemu_read.size() == initial.size());
          size_t lost = qemu_read.size();
          for (size_t i = 0; i < qemu_read.size() && lost == qemu_read.size(); i++) {
            if (!outcome.touched[i] && qemu_read[i] != outcome.flushed[i]) lost = i;
          }
          INFO("first flushed byte lost (as QEMU reads it) at guest offset " << lost);
          REQUIRE(lost == qemu_read.size());

          OpenOptions options;
          std::unique_ptr<Image> crashed;
          REQUIRE(OpenImage(dir / "crashed.qcow", options, &crashed).ok());
          std::vector<uint8_t> got(initial.size());
          REQUIRE(crashed->Read(0, got.data(), got.size()).ok());
          const size_t diff = std::mismatch(got.begin(), got.end(), qemu_read.begin()).first - got.begin();
          INFO("the engine and QEMU first read differently at guest offset " << diff);
          REQUIRE(diff == got.size());
          checked++;
        }
      }
    }
  }
  INFO("crash states checked: " << checked);
  CHECK(checked > 0);
}
