// Writers that keep persistent bitmaps true (OpenOptions::maintain_bitmaps,
// rules M1-M3 of qcow/src/qcow2/qcow2_bitmap_change.cc): commit into a base,
// convert -n into a target and a safe rebase set the bits of what they write,
// as qemu-img does, so the next incremental backup copies it. Against
// qemu-img: the same command line on copies of the same images, then the
// same bitmaps with the same dirty ranges (as QEMU reads them, qemu-nbd),
// qemu-img check clean and the same guest content. Then a crash at every
// write and sync of a maintained write: every bitmap QEMU then calls
// consistent and enabled has the bit of every granule whose content changed.
#include <catch2/catch.hpp>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "crash_env.h"
#include "dmcow/image.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;
using json = nlohmann::json;

namespace {

// Bitmaps: bb (64 KiB granularity) and fine (4 KiB), enabled, with bits;
// off, disabled.
const char kBitmaps[] =
    " && qemu-img bitmap --add IMG bb && qemu-img bitmap --add -g 4k IMG fine && qemu-img bitmap --add IMG off"
    " && qemu-io -c 'write -P 9 3M 4k' IMG && qemu-img bitmap --disable IMG off";

std::string WithBitmaps(const std::string& image) { return ReplaceAll(kBitmaps, "IMG", image); }

json InfoOf(const std::string& dir, const std::string& image) {
  json info = json::parse(Exec(dir, "qemu-img info --output=json " + image).out, nullptr, false);
  if (info.is_object()) info.erase("actual-size");
  return info;
}

bool Covers(const std::vector<std::pair<uint64_t, uint64_t>>& ranges, uint64_t start, uint64_t len) {
  for (const auto& [s, l] : ranges) {
    if (s <= start && start + len <= s + l) return true;
  }
  return false;
}

}  // namespace

TEST_CASE("commit, convert -n and rebase keep the bitmaps true, as qemu-img", "[bitmap][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  struct Case {
    const char* name;
    std::string make;     // in the source directory
    const char* command;  // run by each tool, as "TOOL command"
    const char* image;    // the image whose bitmaps are compared
    int consistent;       // bitmaps QEMU holds consistent after (disabled ones too)
    // Our bits may cover more than qemu-img's (never less): convert writes
    // whole clusters where qemu-img skips a zero tail of 4 KiB or more.
    bool exact = true;
  };
  const std::string base = "qemu-img create -q -f qcow2 base 16M && qemu-io -c 'write -P 1 0 16M' base >/dev/null";
  const Case kCases[] = {
      {"commit into a base with bitmaps",
       base + WithBitmaps("base") +
           " && qemu-img create -q -f qcow2 -b base -F qcow2 top && qemu-io -c 'write -P 2 1M 100k'"
           " -c 'write -z 5M 64k' -c 'write -P 3 15M 4k' -c 'discard 12M 64k' top",
       "commit top", "base", 3},
      {"commit -b through a middle layer",
       base + WithBitmaps("base") +
           " && qemu-img create -q -f qcow2 -b base -F qcow2 mid && qemu-io -c 'write -P 2 3M 8k' mid"
           " && qemu-img create -q -f qcow2 -b mid -F qcow2 top && qemu-io -c 'write -P 3 9M 1k' top",
       "commit -b base top", "base", 3},
      {"convert -n into a target with bitmaps",
       "qemu-img create -q -f qcow2 src 16M && qemu-io -c 'write -P 4 2M 300k' -c 'write -P 5 14M 64k' src"
       " && qemu-img create -q -f qcow2 tgt 16M && qemu-io -c 'write -P 6 0 16M' tgt >/dev/null" +
           WithBitmaps("tgt"),
       "convert -n -O qcow2 src tgt", "tgt", 3},
      {"convert -n --target-is-zero into a target with bitmaps",
       "qemu-img create -q -f qcow2 src 16M && qemu-io -c 'write -P 4 2M 300k' src"
       " && qemu-img create -q -f qcow2 tgt 16M" +
           WithBitmaps("tgt"),
       "convert -n --target-is-zero -O qcow2 src tgt", "tgt", 3, false},
      {"rebase onto another backing file",
       base +
           " && cp base base2 && qemu-io -c 'write -P 7 4M 1M' -c 'write -z 10M 128k' base2"
           " && qemu-img create -q -f qcow2 -b base -F qcow2 top && qemu-io -c 'write -P 8 4M 64k' top" +
           WithBitmaps("top"),
       "rebase -b base2 -F qcow2 top", "top", 3},
      {"a bitmap left in use stays so",
       base + WithBitmaps("base") +
           " && (ulimit -c 0; qemu-io -c 'write 0 4k' -c abort base; true) 2>/dev/null"
           " && qemu-img bitmap --add base later && qemu-img create -q -f qcow2 -b base -F qcow2 top"
           " && qemu-io -c 'write -P 2 1M 100k' top",
       "commit top", "base", 1},
  };
  for (const Case& c : kCases) {
    INFO(c.name << ": " << c.command);
    MustRun("cd '" + dir.path() + "' && rm -rf src q o && mkdir src && (cd src && " + c.make +
            ") >/dev/null && cp -a src q && cp -a src o");
    CheckSameAsQemu(Exec(dir / "q", dir / "q", std::string("qemu-img ") + c.command),
                    Exec(dir / "o", dir / "o", Ours() + " " + c.command));
    const json ours = InfoOf(dir / "o", c.image);
    CHECK(ours == InfoOf(dir / "q", c.image));
    INFO(ours.dump(1));
    CHECK(ours.dump().find("\"auto\"") != std::string::npos);  // enabled bitmaps, not made inconsistent
    const Result check = Exec(dir / "o", std::string("qemu-img check ") + c.image);
    INFO(check.out);
    CHECK(check.rc == 0);
    const BitmapRanges theirs_bits = QemuConsistentBitmaps(dir / "q", c.image);
    const BitmapRanges ours_bits = QemuConsistentBitmaps(dir / "o", c.image);
    CHECK(theirs_bits.size() == static_cast<size_t>(c.consistent));
    if (c.exact) {
      CHECK(ours_bits == theirs_bits);
    } else {
      REQUIRE(ours_bits.size() == theirs_bits.size());
      for (const auto& [name, ranges] : theirs_bits) {
        INFO("bitmap " << name);
        for (const auto& [start, len] : ranges) CHECK(Covers(ours_bits.at(name), start, len));
      }
    }
    CHECK(Exec(dir.path(), std::string("qemu-img compare q/") + c.image + " o/" + c.image).rc == 0);
  }
}

TEST_CASE("maintained bitmaps: a crash at any point leaves no stale bitmap", "[bitmap][qemu][crash]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const char* cluster : {"512", "64k"}) {
    DYNAMIC_SECTION("cluster_size=" << cluster) {
      MustRun("cd '" + dir.path() + "' && rm -f img && qemu-img create -q -f qcow2 -o cluster_size=" + cluster +
              " img 4M && qemu-io -c 'write -P 1 0 4M' img >/dev/null" + WithBitmaps("img"));
      const std::string img = dir / "img";
      const std::vector<uint8_t> img_bytes = ReadWholeFile(img);
      auto run = [&](CrashEnv* env) {
        std::unique_ptr<Image> image;
        OpenOptions options = CrashTestOptions(env);
        options.maintain_bitmaps = true;
        Status s = OpenImage(img, options, &image);
        std::vector<uint8_t> data(4096, 0x5a);
        if (s.ok()) s = image->Write(100 << 10, data.data(), data.size());
        if (s.ok()) s = image->WriteZeroes(1 << 20, 64 << 10);
        if (s.ok()) s = image->Discard(2 << 20, 64 << 10);
        if (s.ok()) s = image->Write((3 << 20) + 512, data.data(), 1024);
        image.reset();  // M3: the bits are stored as the image closes
        INFO(s.ToString());
        if (!s.ok()) REQUIRE(env->crashed());
        return s.ok() && !env->crashed();
      };
      CrashEnv untouched(UINT64_MAX);
      untouched.PutFile(img, img_bytes);
      const std::vector<uint8_t> before = GuestContent(&untouched, img);
      CrashEnv dry(UINT64_MAX);
      dry.PutFile(img, img_bytes);
      REQUIRE(run(&dry));
      // Judges one state: clean, and no consistent enabled bitmap misses a
      // changed granule. Returns how many bitmaps QEMU held consistent.
      QemuCheckVerdicts verdicts(dir / "crashed");
      auto judge = [&](const std::vector<uint8_t>& bytes) -> size_t {
        CHECK(verdicts.Judge(bytes) == "");
        WriteWholeFile(dir / "state.qcow2", bytes);
        CrashEnv view(UINT64_MAX);
        view.PutFile(img, bytes);
        const std::vector<uint8_t> now = GuestContent(&view, img);
        REQUIRE(now.size() == before.size());
        const json info = InfoOf(dir.path(), "state.qcow2");
        size_t consistent = 0;
        for (const json& b : info["format-specific"]["data"].value("bitmaps", json::array())) {
          const std::string flags = b["flags"].dump();
          if (flags.find("in-use") != std::string::npos || flags.find("auto") == std::string::npos) continue;
          consistent++;
          const uint64_t g = b["granularity"];
          const auto dirty = QemuDirtyRanges(dir.path(), "state.qcow2", b["name"]);
          for (uint64_t at = 0; at < now.size(); at += g) {
            const uint64_t n = std::min<uint64_t>(g, now.size() - at);
            if (std::equal(now.begin() + static_cast<long>(at), now.begin() + static_cast<long>(at + n),
                           before.begin() + static_cast<long>(at))) {
              continue;
            }
            INFO("bitmap " << b["name"] << ": granule at " << at << " changed");
            CHECK(Covers(dirty, at, n));
          }
        }
        return consistent;
      };
      // After a clean close both enabled bitmaps are consistent again.
      CHECK(judge(dry.CrashStates(img, 0, 0).front().bytes) == 2);
      std::map<size_t, bool> judged;  // by the hash of a state's bytes
      uint64_t states = 0;
      const std::vector<uint64_t> points = CrashPointsToTry(0, dry.ops(), 16);
      for (uint64_t k : points) {
        CrashEnv env(k);
        env.PutFile(img, img_bytes);
        run(&env);
        const std::vector<CrashEnv::State> all_states = env.CrashStates(img, k, 4);
        for (const CrashEnv::State* state : Sampled(all_states)) {
          INFO("cluster_size=" << cluster << ": crash after " << k << " of " << dry.ops() << " writes/syncs, "
                               << state->label << "\n"
                               << env.DescribePending(img));
          const size_t key = std::hash<std::string>()(std::string(state->bytes.begin(), state->bytes.end()));
          if (judged.emplace(key, true).second) judge(state->bytes);
          states++;
        }
      }
      CHECK(states > points.size());
      WARN("cluster_size=" << cluster << ": " << points.size() << " of " << dry.ops() << " crash points, " << states
                           << " states, " << judged.size() << " distinct");
    }
  }
}
