// Crash simulation for Image::MakeEmpty, Image::Grow and Image::Shrink on
// qcow2 (the engine steps of dmcow-img commit and resize), as tests/crash_test.cc does for writes:
// the power fails after the k-th write or sync, for every k, and the disk
// is assembled with unsynced writes applied, dropped or torn. Then:
//   - qemu-img check finds no corruption (leaks are allowed);
//   - MakeEmpty: every byte reads either as before or as the backing file
//     (all of them as the backing file once MakeEmpty returned), and the
//     internal snapshot keeps its content;
//   - Grow (and the preallocation of the new range, in each of qemu's
//     modes): the size is the old or the new one, the old range is
//     unchanged and the new range reads as zeros.
#include <catch2/catch.hpp>
#include <random>

#include "crash_env.h"
#include "dmcow/image.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;

namespace {

std::vector<uint8_t> ReadAll(const std::string& path, const std::string& snapshot = "") {
  OpenOptions options;
  options.snapshot = snapshot;
  std::unique_ptr<Image> image;
  Status s = OpenImage(path, options, &image);
  INFO(path << ": " << s.ToString());
  REQUIRE(s.ok());
  std::vector<uint8_t> bytes(image->virtual_size());
  REQUIRE(image->Read(0, bytes.data(), bytes.size()).ok());
  return bytes;
}

void ExpectNoCorruption(const TempDir& dir) {
  std::string out;
  int rc = Run("cd '" + dir.path() + "' && qemu-img check crashed.qcow2", &out);
  INFO("qemu-img check:\n" << out);
  REQUIRE((rc == 0 || rc == 3));  // clean, or leaked clusters only
  REQUIRE(out.find("ERROR") == std::string::npos);
}

}  // namespace

TEST_CASE("MakeEmpty: a crash at any point leaves no corruption and only old or emptied content", "[qemu][crash]") {
  SKIP_WITHOUT_QEMU();
  struct Shape {
    const char* name;
    const char* options;
    bool snapshot;
  };
  const Shape shapes[] = {
      {"v3-4k", "cluster_size=4k", false},
      {"v3-512-snapshot", "cluster_size=512", true},
      {"v2-64k-snapshot", "compat=0.10", true},
      {"extended-l2", "extended_l2=on,cluster_size=16k", false},
  };
  TempDir dir;
  int checked = 0;
  for (const Shape& shape : shapes) {
    DYNAMIC_SECTION(shape.name) {
      std::string setup = "cd '" + dir.path() + "' && rm -f img.qcow2 base.qcow2 crashed.qcow2 && " +
                          "qemu-img create -q -f qcow2 base.qcow2 2M && " +
                          "qemu-io -c 'write -P 5 0 2M' base.qcow2 >/dev/null && " + "qemu-img create -q -f qcow2 -o " +
                          shape.options + " -b base.qcow2 -F qcow2 img.qcow2 && " +
                          "qemu-io -c 'write -P 6 0 300k' -c 'write -z 400k 64k' -c 'write -c -P 7 1M 64k'" +
                          " -c 'write -P 8 1536k 100k' img.qcow2 >/dev/null";
      if (shape.snapshot) {
        setup +=
            " && qemu-img snapshot -c s1 img.qcow2 && qemu-io -c 'write -P 9 100k 200k' -c 'write -z 1M 8k'"
            " img.qcow2 >/dev/null";
      }
      MustRun(setup);
      const std::string path = dir / "img.qcow2";
      const std::vector<uint8_t> image_bytes = ReadWholeFile(path);
      const std::vector<uint8_t> base_bytes = ReadWholeFile(dir / "base.qcow2");
      const std::vector<uint8_t> before = ReadAll(path);
      const std::vector<uint8_t> after = ReadAll(dir / "base.qcow2");
      const std::vector<uint8_t> snap = shape.snapshot ? ReadAll(path, "s1") : std::vector<uint8_t>();

      auto run = [&](CrashEnv* env) {
        const OpenOptions options = CrashTestOptions(env);
        std::unique_ptr<Image> image;
        Status s = OpenImage(path, options, &image);
        if (s.ok()) s = image->MakeEmpty();
        if (!s.ok()) REQUIRE(env->crashed());  // the only failure this environment produces
        return s.ok();
      };
      CrashEnv dry(UINT64_MAX);
      dry.PutFile(path, image_bytes);
      dry.PutFile(dir / "base.qcow2", base_bytes);
      REQUIRE(run(&dry));
      const uint64_t total = dry.ops();
      for (uint64_t k = 0; k <= total; k++) {
        CrashEnv env(k);
        env.PutFile(path, image_bytes);
        env.PutFile(dir / "base.qcow2", base_bytes);
        const bool done = run(&env);
        std::mt19937_64 rng(k * 7919 + 1);
        WriteWholeFile(dir / "crashed.qcow2", env.CrashedContent(path, rng));
        INFO(shape.name << ": crash after " << k << " of " << total << " writes/syncs");
        ExpectNoCorruption(dir);
        const std::vector<uint8_t> got = ReadAll(dir / "crashed.qcow2");
        REQUIRE(got.size() == before.size());
        size_t bad = got.size();
        for (size_t i = 0; i < got.size() && bad == got.size(); i++) {
          if (got[i] != after[i] && (done || got[i] != before[i])) bad = i;
        }
        INFO("first byte neither as before nor as the backing file at " << bad);
        REQUIRE(bad == got.size());
        if (shape.snapshot) CHECK(ReadAll(dir / "crashed.qcow2", "s1") == snap);
        checked++;
      }
    }
  }
  CHECK(checked > 0);
}

TEST_CASE("Grow: a crash at any point leaves the old or the new size, no corruption", "[qemu][crash]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  struct Mode {
    const char* name;
    bool preallocate;
    Image::Preallocation mode;
  };
  const Mode kModes[] = {{"off", false, Image::Preallocation::kMetadata},
                         {"metadata", true, Image::Preallocation::kMetadata},
                         {"falloc", true, Image::Preallocation::kFalloc},
                         {"full", true, Image::Preallocation::kFull}};
  for (const char* options : {"cluster_size=512", "compat=0.10,cluster_size=4k"})
    for (const Mode& m : kModes) {
      DYNAMIC_SECTION(options << ", preallocation=" << m.name) {
        MustRun("cd '" + dir.path() + "' && rm -f img.qcow2 && qemu-img create -q -f qcow2 -o " + options +
                " img.qcow2 100k && qemu-io -c 'write -P 6 0 60k' -c 'write -P 7 80k 20k' img.qcow2 >/dev/null");
        const std::string path = dir / "img.qcow2";
        const std::vector<uint8_t> image_bytes = ReadWholeFile(path);
        const std::vector<uint8_t> before = ReadAll(path);
        const uint64_t new_size = 3 << 20;  // with 512 B clusters, the L1 table moves

        auto run = [&](CrashEnv* env) {
          std::unique_ptr<Image> image;
          Status s = OpenImage(path, CrashTestOptions(env), &image);
          if (s.ok()) s = image->Grow(new_size);
          if (s.ok()) CHECK(image->virtual_size() == new_size);
          if (s.ok() && m.preallocate) s = image->Preallocate(before.size(), new_size - before.size(), m.mode);
          if (!s.ok()) REQUIRE(env->crashed());
          return s.ok();
        };
        CrashEnv dry(UINT64_MAX);
        dry.PutFile(path, image_bytes);
        REQUIRE(run(&dry));
        // CI: a sample of the points; scripts/crash-replay.sh: every one.
        for (uint64_t k : CrashPointsToTry(0, dry.ops(), 24)) {
          CrashEnv env(k);
          env.PutFile(path, image_bytes);
          const bool done = run(&env);
          std::mt19937_64 rng(k * 104729 + 3);
          WriteWholeFile(dir / "crashed.qcow2", env.CrashedContent(path, rng));
          INFO(options << ", preallocation=" << m.name << ": crash after " << k << " of " << dry.ops()
                       << " writes/syncs");
          ExpectNoCorruption(dir);
          const std::vector<uint8_t> got = ReadAll(dir / "crashed.qcow2");
          if (done) REQUIRE(got.size() == new_size);
          REQUIRE((got.size() == before.size() || got.size() == new_size));
          REQUIRE(std::equal(before.begin(), before.end(), got.begin()));
          CHECK(std::all_of(got.begin() + before.size(), got.end(), [](uint8_t b) { return b == 0; }));
        }
      }
    }
}

// Shrink writes the new size first, then unlinks and frees what lies past it,
// then cuts the file: a crash leaves the old size with every byte as before,
// or the new size with the kept range as before; the snapshot keeps its own.
TEST_CASE("Shrink: a crash at any point leaves the old or the new size, no corruption", "[qemu][crash]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const char* options : {"cluster_size=512", "cluster_size=4k"}) {
    for (const bool snapshot : {false, true}) {
      DYNAMIC_SECTION(options << (snapshot ? ", with a snapshot" : "")) {
        MustRun("cd '" + dir.path() + "' && rm -f img.qcow2 && qemu-img create -q -f qcow2 -o " + options +
                " img.qcow2 3M && qemu-io -c 'write -P 6 0 60k' -c 'write -P 7 90k 40k' -c 'write -P 8 1M 100k'"
                " -c 'write -c -P 9 2M 64k' img.qcow2 >/dev/null" +
                (snapshot ? " && qemu-img snapshot -c s1 img.qcow2 && qemu-io -c 'write -P 5 1M 8k' img.qcow2"
                            " >/dev/null"
                          : ""));
        const std::string path = dir / "img.qcow2";
        const std::vector<uint8_t> image_bytes = ReadWholeFile(path);
        const std::vector<uint8_t> before = ReadAll(path);
        const std::vector<uint8_t> snap_before = snapshot ? ReadAll(path, "s1") : std::vector<uint8_t>();
        const uint64_t new_size = 100 << 10;  // inside the second write: a partial L2 table

        auto run = [&](CrashEnv* env) {
          std::unique_ptr<Image> image;
          Status s = OpenImage(path, CrashTestOptions(env), &image);
          if (s.ok()) s = image->Shrink(new_size);
          if (s.ok()) CHECK(image->virtual_size() == new_size);
          if (!s.ok()) REQUIRE(env->crashed());
          return s.ok();
        };
        CrashEnv dry(UINT64_MAX);
        dry.PutFile(path, image_bytes);
        REQUIRE(run(&dry));
        // The uninterrupted shrink is clean (no leak) and, without a snapshot
        // holding on to the clusters, smaller.
        std::mt19937_64 unused(1);  // nothing is unsynced after a finished shrink
        WriteWholeFile(dir / "crashed.qcow2", dry.CrashedContent(path, unused));
        CHECK(Exec(dir.path(), "qemu-img check crashed.qcow2").rc == 0);
        if (!snapshot) CHECK(ReadWholeFile(dir / "crashed.qcow2").size() < image_bytes.size());
        for (uint64_t k = 0; k <= dry.ops(); k++) {
          CrashEnv env(k);
          env.PutFile(path, image_bytes);
          const bool done = run(&env);
          std::mt19937_64 rng(k * 7919 + 11);
          WriteWholeFile(dir / "crashed.qcow2", env.CrashedContent(path, rng));
          INFO(options << ": crash after " << k << " of " << dry.ops() << " writes/syncs");
          ExpectNoCorruption(dir);
          const std::vector<uint8_t> got = ReadAll(dir / "crashed.qcow2");
          if (done) REQUIRE(got.size() == new_size);
          // (bools: Catch would print megabytes of bytes on a failure)
          if (got.size() == before.size()) {
            const bool unchanged = got == before;
            CHECK(unchanged);
          } else {
            REQUIRE(got.size() == new_size);
            CHECK(std::equal(got.begin(), got.end(), before.begin()));
          }
          if (snapshot) {
            const bool snapshot_unchanged = ReadAll(dir / "crashed.qcow2", "s1") == snap_before;
            CHECK(snapshot_unchanged);
          }
        }
      }
    }
  }
}
