// dmcow-img check and CheckImage against qemu-img check 7.2.
//
// Images made by qemu-img/qemu-io are damaged by editing bytes at offsets
// read from their own tables (one kind of damage per case). Then:
//  - check: exit code and stdout (JSON and human) equal qemu-img's, byte
//    for byte, so the corruption and leak counts agree;
//  - check -r leaks: the same, against qemu-img check -r leaks;
//  - check -r all: afterwards qemu-img check finds the image clean. Where
//    qemu-img's own -r all leaves a clean image, our output, exit code and
//    guest content equal its; where it cannot, every guest byte outside the
//    ranges the damage made unreadable equals the undamaged image's, and
//    those ranges read as zeros (unallocated).
// A repair interrupted at every write and sync (tests/crash_env.h), then
// repaired again, must end clean with the content of an uninterrupted one.
// Skipped with a warning when qemu-img is not installed.
#include <sys/wait.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <string>
#include <vector>

#include "crash_env.h"
#include "dmcow/check.h"
#include "dmcow/image.h"
#include "dmcow/mem_env.h"
#include "qcow2/check/reference_counts.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;

namespace {

constexpr uint64_t kCopied = 1ULL << 63;
constexpr uint64_t kCompressed = 1ULL << 62;
constexpr uint64_t kMB = 1 << 20;

uint64_t Get64(const std::vector<uint8_t>& b, uint64_t off) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = (v << 8) | b.at(off + i);
  return v;
}
void Put64(std::vector<uint8_t>* b, uint64_t off, uint64_t v) {
  for (int i = 7; i >= 0; i--, v >>= 8) b->at(off + i) = static_cast<uint8_t>(v);
}
void Put32(std::vector<uint8_t>* b, uint64_t off, uint32_t v) {
  for (int i = 3; i >= 0; i--, v >>= 8) b->at(off + i) = static_cast<uint8_t>(v);
}

// Where things are in a qcow2 image, read from its own header and tables.
struct Layout {
  explicit Layout(const std::vector<uint8_t>& b) : bytes(b) {}
  uint64_t l1() const { return Get64(bytes, 40); }
  uint64_t reftable() const { return Get64(bytes, 48); }
  uint64_t snapshots() const { return Get64(bytes, 64); }
  uint64_t l1_entry(uint64_t i) const { return l1() + 8 * i; }
  uint64_t l2(uint64_t i = 0) const { return Get64(bytes, l1_entry(i)) & 0x00fffffffffffe00ULL; }
  uint64_t l2_entry(uint64_t guest_cluster, uint32_t entry_bytes = 8) const {
    return l2() + entry_bytes * guest_cluster;
  }
  uint64_t data(uint64_t guest_cluster) const { return Get64(bytes, l2_entry(guest_cluster)) & 0x00fffffffffffe00ULL; }
  uint64_t refblock() const { return Get64(bytes, reftable()); }
  uint32_t cluster_bits() const { return static_cast<uint32_t>(Get64(bytes, 16)); }  // low half: bytes 20-23
  // 16-bit refcount entry of a host cluster (first refcount block).
  uint64_t refcount_entry(uint64_t host) const { return refblock() + 2 * (host >> cluster_bits()); }
  const std::vector<uint8_t>& bytes;
};

using Edit = std::function<void(std::vector<uint8_t>*)>;

struct Damage {
  const char* name;
  const char* base;  // image it is applied to
  Edit edit;
  // Guest ranges the damage makes unreadable, for the cases qemu-img
  // cannot repair (our repair makes them read as zeros).
  std::vector<std::pair<uint64_t, uint64_t>> lost;
  bool ours_repairs = true;  // false: neither tool can (e.g. refcount overflow)
};

// The base images, made once.
class Images {
 public:
  static Images& Get() {
    static Images images;
    return images;
  }
  const std::string& dir() const { return tmp_.path(); }
  std::string operator/(const std::string& name) const { return tmp_ / name; }

 private:
  Images() {
    const char* script[] = {
        // 16 MiB, 64 KiB clusters: data, compressed, zero clusters.
        "qemu-img create -f qcow2 plain.qcow2 16M",
        ("qemu-io -c 'write -P 1 0 1M' -c 'write -c -P 3 4M 128k' -c 'write -P 2 8M 128k' -c 'write -z 12M 64k' "
         "plain.qcow2"),  // one line (parentheses: a wrapped string, not a missing comma)
        // With an internal snapshot, and a cluster rewritten after it.
        "cp plain.qcow2 snap.qcow2 && qemu-img snapshot -c s1 snap.qcow2",
        "qemu-io -c 'write -P 9 0 64k' snap.qcow2",
        // Lazy refcounts left unflushed: the dirty bit set, refcounts stale.
        "qemu-img create -f qcow2 -o lazy_refcounts=on dirty.qcow2 16M",
        "ulimit -c 0; qemu-io -c 'write -P 8 0 512k' -c 'write -P 7 8M 64k' -c abort dirty.qcow2; true",
        // One-bit refcounts (overflow), version 2, extended L2, bitmaps.
        "qemu-img create -f qcow2 -o refcount_bits=1 rc1.qcow2 16M",
        "qemu-io -c 'write -P 1 0 256k' rc1.qcow2",
        "qemu-img create -f qcow2 -o compat=0.10 v2.qcow2 16M",
        "qemu-io -c 'write -P 1 0 256k' v2.qcow2",
        "qemu-img create -f qcow2 -o extended_l2=on el2.qcow2 16M",
        "qemu-io -c 'write -P 1 0 4k' -c 'write -P 2 1M 64k' -c 'write -z 2M 8k' el2.qcow2",
        "cp plain.qcow2 bitmap.qcow2 && qemu-img bitmap --add bitmap.qcow2 b0",
        "qemu-img bitmap --add -g 65536 bitmap.qcow2 b1 && qemu-io -c 'write -P 4 2M 64k' bitmap.qcow2",
        // Also an enabled bitmap with no bit set (its table entry reads as
        // all zeros, no cluster) and a disabled one.
        "cp bitmap.qcow2 bitmaps.qcow2 && qemu-img bitmap --add bitmaps.qcow2 b2",
        "qemu-img bitmap --add --disable -g 1M bitmaps.qcow2 b3",
        // Legacy qcow and raw (qemu-img cannot check them).
        "qemu-img convert -O qcow plain.qcow2 v1.qcow",
        "qemu-img create -f raw raw.img 1M",
    };
    for (const char* step : script) MustRun("cd '" + tmp_.path() + "' && " + step + " >/dev/null 2>&1");
  }
  TempDir tmp_;
};

std::vector<Damage> Damages() {
  // Guest cluster indexes in plain.qcow2: 0-15 data (pattern 1), 64-65
  // compressed, 128-129 data (pattern 2), 192 zero.
  const uint64_t all = 16 * kMB;
  return {
      {"leaked cluster", "plain.qcow2", [](auto* b) { Put64(b, Layout(*b).l2_entry(1), 0); }, {{64 << 10, 64 << 10}}},
      {"cluster referenced twice", "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l2_entry(1), Get64(*b, Layout(*b).l2_entry(0))); }},
      {"COPIED missing on a data cluster", "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l2_entry(1), Get64(*b, Layout(*b).l2_entry(1)) & ~kCopied); }},
      {"COPIED missing on an L2 table", "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l1_entry(0), Get64(*b, Layout(*b).l1_entry(0)) & ~kCopied); }},
      {"COPIED set on a compressed cluster", "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l2_entry(64), Get64(*b, Layout(*b).l2_entry(64)) | kCopied); }},
      {"data cluster not aligned",
       "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l2_entry(1), Get64(*b, Layout(*b).l2_entry(1)) + 0x200); },
       {{64 << 10, 64 << 10}}},
      {"L2 table not aligned",
       "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l1_entry(0), Get64(*b, Layout(*b).l1_entry(0)) + 0x200); },
       {{0, all}}},
      {"preallocated zero cluster not aligned", "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l2_entry(192), (Layout(*b).data(2) + 0x200) | 1); }},
      {"data cluster past the end of the file",
       "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l2_entry(1), kCopied | 0x10000000); },
       {{64 << 10, 64 << 10}}},
      {"L2 table past the end of the file",
       "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l1_entry(0), kCopied | 0x10000000); },
       {{0, all}}},
      {"compressed data past the end of the file",
       "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l2_entry(65), kCompressed | 0x10000000); },
       {{(4 * kMB) + (64 << 10), 64 << 10}}},
      {"L1 entry with only flags",
       "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l1_entry(0), kCopied); },
       {{0, all}}},
      {"reserved bits in an L1 entry", "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l1_entry(0), Get64(*b, Layout(*b).l1_entry(0)) | (1ULL << 56)); }},
      {"reserved bits in an L2 entry", "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l2_entry(1), Get64(*b, Layout(*b).l2_entry(1)) | 2); }},
      {"data cluster over the L1 table", "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l2_entry(1), kCopied | Layout(*b).l1()); }},
      {"data cluster over a refcount block", "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l2_entry(1), kCopied | Layout(*b).refblock()); }},
      {"refcount table entry zeroed", "plain.qcow2", [](auto* b) { Put64(b, Layout(*b).reftable(), 0); }},
      {"refcount block not aligned", "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).reftable(), Layout(*b).refblock() + 0x200); }},
      {"reserved bits in a refcount table entry", "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).reftable(), Layout(*b).refblock() | 1); }},
      {"refcount block past the end of the file", "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).reftable(), 0x1000000); }},
      {"refcount of a data cluster zeroed", "plain.qcow2",
       [](auto* b) {
         const uint64_t e = Layout(*b).refcount_entry(Layout(*b).data(3));
         (*b)[e] = (*b)[e + 1] = 0;
       }},
      {"refcount too high", "plain.qcow2",
       [](auto* b) { (*b)[Layout(*b).refcount_entry(Layout(*b).data(3)) + 1] = 5; }},
      {"refcount overflow (1-bit refcounts)",
       "rc1.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l2_entry(1), Get64(*b, Layout(*b).l2_entry(0))); },
       {},
       false},
      {"snapshot entry incomplete (v3)", "snap.qcow2", [](auto* b) { Put32(b, Layout(*b).snapshots() + 36, 8); }},
      {"snapshot entry with too much extra data", "snap.qcow2",
       [](auto* b) { Put32(b, Layout(*b).snapshots() + 36, 2000); }},
      {"snapshot table past the end of the file", "snap.qcow2", [](auto* b) { Put64(b, 64, 0x10000000); }},
      {"snapshot table offset not aligned", "snap.qcow2", [](auto* b) { Put64(b, 64, Get64(*b, 64) + 8); }, {}, false},
      {"snapshot L1 table not aligned", "snap.qcow2",
       [](auto* b) { Put64(b, Layout(*b).snapshots(), Get64(*b, Layout(*b).snapshots()) + 0x200); }},
      {"L2 table over the refcount table", "plain.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l1_entry(0), kCopied | Layout(*b).reftable()); }},
      {"dirty image with stale refcounts", "dirty.qcow2", [](auto*) {}},
      {"leaked cluster in a version 2 image", "v2.qcow2", [](auto* b) { Put64(b, Layout(*b).l2_entry(1), 0); }},
      {"subclusters allocated and zero at once", "el2.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l2_entry(16, 16) + 8, 0xffffffffffffffffULL); }},
      {"subclusters allocated without a cluster", "el2.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l2_entry(40, 16) + 8, 0xf); }},
      {"bitmap image, leaked cluster", "bitmap.qcow2", [](auto* b) { Put64(b, Layout(*b).l2_entry(1), 0); }},
      {"bitmap image, data cluster past the end of the file",
       "bitmaps.qcow2",
       [](auto* b) { Put64(b, Layout(*b).l2_entry(1), kCopied | 0x10000000); },
       {{64 << 10, 64 << 10}}},
  };
}

// A fresh copy of `base` with `damage` applied, as dir/name.
void MakeDamaged(const Damage& d, const std::string& dir, const std::string& name) {
  Images& img = Images::Get();
  std::vector<uint8_t> bytes = ReadWholeFile(img / d.base);
  d.edit(&bytes);
  MustRun("mkdir -p '" + dir + "'");
  WriteWholeFile(dir + "/" + name, bytes);
}

std::vector<uint8_t> GuestContent(const std::string& dir, const std::string& name) {
  MustRun("cd '" + dir + "' && qemu-img convert -O raw " + name + " content.raw");
  std::vector<uint8_t> raw = ReadWholeFile(dir + "/content.raw");
  std::remove((dir + "/content.raw").c_str());
  return raw;
}

}  // namespace

TEST_CASE("reference counts: packed counters agree with exact ones", "[check][unit]") {
  for (uint32_t bits : {1u, 2u, 4u, 8u, 16u, 64u}) {
    ReferenceCounts counts(bits);
    counts.Resize(1000);
    std::map<uint64_t, uint64_t> exact;
    std::mt19937_64 rng(bits);
    const uint64_t max = bits == 64 ? UINT64_MAX : (uint64_t{1} << bits) - 1;
    for (int i = 0; i < 20000; i++) {
      const uint64_t c = rng() % 300;  // dense: many clusters get large counts
      const bool ok = counts.Increment(c);
      CHECK(ok == (exact[c] < max));
      if (ok) exact[c]++;
    }
    counts.Set(7, 0);
    exact[7] = 0;
    for (uint64_t c = 0; c < 1000; c++) REQUIRE(counts.Get(c) == (exact.count(c) ? exact[c] : 0));
    CHECK(counts.AllZero(300, 700));
    CHECK_FALSE(counts.AllZero(0, 300));
  }
  // 16 million clusters of 16-bit refcounts fit in 8 MiB, not 32.
  ReferenceCounts big(16);
  big.Resize(16 << 20);
  CHECK(big.MemoryBytes() <= (8u << 20) + 64);
}

TEST_CASE("check agrees with qemu-img check on undamaged images", "[check][qemu]") {
  SKIP_WITHOUT_QEMU();
  Images& img = Images::Get();
  TempDir tmp;
  for (const char* name :
       {"plain.qcow2", "snap.qcow2", "rc1.qcow2", "v2.qcow2", "el2.qcow2", "bitmap.qcow2", "raw.img"}) {
    for (const char* args :
         {"check ", "check --output=json ", "check -q ", "check -r leaks --output json ", "check -r all "}) {
      // Each tool on its own copy: a repair (or QEMU storing bitmaps when
      // it closes a writable image) changes the file.
      MustRun("cp '" + (img / name) + "' '" + (tmp / "q") + "' && cp '" + (img / name) + "' '" + (tmp / "o") + "'");
      Result theirs = Exec(tmp.path(), std::string("qemu-img ") + args + "q");
      Result ours = Exec(tmp.path(), Ours() + " " + args + "o");
      INFO(args << name);
      CHECK(ours.out == std::regex_replace(theirs.out, std::regex("\"q\""), "\"o\""));
      CHECK(ours.rc == theirs.rc);
    }
  }
}

TEST_CASE("check and repair agree with qemu-img on damaged images", "[check][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir tmp;
  for (const Damage& d : Damages()) {
    DYNAMIC_SECTION(d.name) {
      const std::string q = tmp / "q";
      const std::string o = tmp / "o";
      // check, human and JSON; then -r leaks.
      for (const char* args : {"check", "check --output=json", "check -r leaks --output=json"}) {
        MakeDamaged(d, q, "img.qcow2");
        MakeDamaged(d, o, "img.qcow2");
        Result theirs = Exec(q, std::string("qemu-img ") + args + " img.qcow2");
        Result ours = Exec(o, Ours() + " " + args + " img.qcow2");
        INFO(args << "\nqemu-img:\n" << theirs.out << "\ndmcow-img:\n" << ours.out);
        CHECK(ours.rc == theirs.rc);
        CHECK(ours.out == theirs.out);
        if (std::string(args) == "check") CHECK(theirs.rc != 0);  // the damage is seen
      }
      // -r all.
      MakeDamaged(d, q, "img.qcow2");
      MakeDamaged(d, o, "img.qcow2");
      Result theirs = Exec(q, "qemu-img check -r all --output=json img.qcow2");
      Result ours = Exec(o, Ours() + " check -r all --output=json img.qcow2");
      const bool qemu_repaired = Exec(q, "qemu-img check img.qcow2").rc == 0;
      Result after = Exec(o, "qemu-img check --output=json img.qcow2");
      INFO("qemu-img -r all:\n" << theirs.out << "\ndmcow-img -r all:\n" << ours.out << "\nafter:\n" << after.out);
      if (!d.ours_repairs) {
        CHECK_FALSE(qemu_repaired);
        CHECK(after.rc != 0);
        continue;
      }
      CHECK(after.rc == 0);
      CHECK(ours.rc == 0);
      if (qemu_repaired) {
        CHECK(ours.out == theirs.out);
        CHECK(Exec(tmp.path(), "qemu-img compare " + q + "/img.qcow2 " + o + "/img.qcow2").rc == 0);
        CHECK(Exec(q, "qemu-img snapshot -l img.qcow2").out == Exec(o, "qemu-img snapshot -l img.qcow2").out);
      } else {
        // Every byte outside the lost ranges as before the damage; the
        // lost ranges read as zeros.
        std::vector<uint8_t> expected = GuestContent(Images::Get().dir(), d.base);
        for (const auto& [start, len] : d.lost) std::fill_n(expected.begin() + start, len, 0);
        CHECK(GuestContent(o, "img.qcow2") == expected);
      }
    }
  }
}

bool Covers(const std::vector<std::pair<uint64_t, uint64_t>>& ranges, uint64_t start, uint64_t len) {
  for (const auto& [s, l] : ranges) {
    if (s <= start && start + len <= s + l) return true;
  }
  return false;
}

// Incremental backups trust an enabled bitmap to name every cluster whose
// content changed; a repair that drops a table entry changes what the guest
// reads there, so it must set those bits (a disabled bitmap stays as it was).
TEST_CASE("check -r all sets the bits of what it changes in every enabled bitmap", "[check][qemu][bitmap]") {
  SKIP_WITHOUT_QEMU();
  TempDir tmp;
  const std::string base = Images::Get() / "bitmaps.qcow2";
  std::map<std::string, std::vector<std::pair<uint64_t, uint64_t>>> before;
  for (const char* b : {"b0", "b1", "b2", "b3"}) before[b] = QemuDirtyRanges(Images::Get().dir(), "bitmaps.qcow2", b);
  REQUIRE(before["b2"].empty());  // no cluster behind its table entry
  REQUIRE(before["b1"].size() == 1);
  for (const Damage& d : Damages()) {
    if (d.name != std::string("data cluster past the end of the file") &&
        d.name != std::string("L2 table past the end of the file")) {
      continue;
    }
    DYNAMIC_SECTION(d.name) {
      Damage on_bitmaps = d;
      on_bitmaps.base = "bitmaps.qcow2";
      MakeDamaged(on_bitmaps, tmp.path(), "img.qcow2");
      Result repair = Exec(tmp.path(), Ours() + " check -r all img.qcow2");
      INFO(repair.out);
      REQUIRE(repair.rc == 0);
      Result after = Exec(tmp.path(), "qemu-img check img.qcow2");
      INFO(after.out);
      CHECK(after.rc == 0);
      CHECK(Exec(tmp.path(), "qemu-img info img.qcow2").out.find("in-use") == std::string::npos);
      for (const char* b : {"b0", "b1", "b2", "b3"}) {
        const auto dirty = QemuDirtyRanges(tmp.path(), "img.qcow2", b);
        INFO("bitmap " << b);
        if (std::string(b) == "b3") {
          CHECK(dirty == before[b]);
          continue;
        }
        for (const auto& [start, len] : d.lost) CHECK(Covers(dirty, start, len));
        for (const auto& [start, len] : before[b]) CHECK(Covers(dirty, start, len));
      }
    }
  }
}

TEST_CASE("overlapping structures are named", "[check][qemu]") {
  SKIP_WITHOUT_QEMU();
  struct Case {
    const char* damage;
    const char* note;
  } cases[] = {
      {"data cluster over the L1 table", "holds the active L1 table and is also referenced as data"},
      {"data cluster over a refcount block", "holds the refcount block and is also referenced as data"},
      {"L2 table over the refcount table", "L2 table at 0x10000 overlaps refcount table at 0x10000"},
  };
  TempDir tmp;
  for (const Case& c : cases) {
    for (const Damage& d : Damages()) {
      if (d.name != std::string(c.damage)) continue;
      MakeDamaged(d, tmp.path(), "img.qcow2");
      CheckResult r;
      REQUIRE(CheckImage(tmp / "img.qcow2", CheckOptions(), &r).ok());
      bool found = false;
      for (const CheckFinding& f : r.findings) {
        found = found || (f.kind == CheckFinding::Kind::kNote && f.message.find(c.note) != std::string::npos);
      }
      INFO(c.damage);
      CHECK(found);
    }
  }
}

TEST_CASE("the encryption header of a LUKS image is counted, no key needed", "[check][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir tmp;
  // The fixture qemu-img made (fixtures/regenerate.sh): made at test time, a
  // LUKS image depends on qemu-img timing its key derivation, which fails
  // where the thread CPU clock is coarse ("Unable to get accurate CPU usage").
  const std::string secret = "--object secret,id=sec0,data=abc ";
  std::vector<uint8_t> bytes = ReadWholeFile(SourceDir() + "/fixtures/images/encrypted-luks.qcow2");
  WriteWholeFile(tmp / "luks.qcow2", bytes);
  // Where the encryption header is: header extension 0x0537be77.
  uint64_t crypto = 0;
  for (uint64_t pos = Get64(bytes, 96) & 0xffffffff; pos + 8 < 65536;) {
    const uint32_t type = static_cast<uint32_t>(Get64(bytes, pos) >> 32);
    const uint32_t len = static_cast<uint32_t>(Get64(bytes, pos));
    if (type == 0) break;
    if (type == 0x0537be77) crypto = Get64(bytes, pos + 8);
    pos += 8 + ((len + 7) & ~7u);
  }
  REQUIRE(crypto != 0);
  // Undamaged, then with the encryption header's refcount zeroed.
  for (int damaged = 0; damaged < 2; damaged++) {
    if (damaged) {
      const uint64_t e = Layout(bytes).refcount_entry(crypto);
      bytes[e] = bytes[e + 1] = 0;
      WriteWholeFile(tmp / "luks.qcow2", bytes);
    }
    Result theirs = Exec(tmp.path(), "qemu-img check --output=json " + secret +
                                         "--image-opts driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=sec0");
    Result ours = Exec(tmp.path(), Ours() + " check --output=json luks.qcow2");
    INFO(theirs.out << ours.out);
    CHECK(ours.rc == theirs.rc);
    CHECK(ours.rc == (damaged ? 2 : 0));
    nlohmann::json t = nlohmann::json::parse(theirs.out), o = nlohmann::json::parse(ours.out);
    t.erase("filename");
    o.erase("filename");
    CHECK(o == t);
  }
}

TEST_CASE("qcow (version 1) images are checked: bounds, alignment, overlaps", "[check][qemu]") {
  SKIP_WITHOUT_QEMU();
  Images& img = Images::Get();
  for (const char* name : {"v1.qcow"}) {
    CheckResult r;
    REQUIRE(CheckImage(img / name, CheckOptions(), &r).ok());
    CHECK(r.format == "qcow");
    CHECK(r.corruptions == 0);
    CHECK(r.allocated_clusters > 0);
  }
  CHECK(Exec(img.dir(), Ours() + " check v1.qcow").rc == 0);
  CHECK(Exec(img.dir(), "qemu-img check v1.qcow").rc == 63);  // what we do beyond it

  // Damage the first L2 table's entries: misaligned, past the end, shared.
  std::vector<uint8_t> bytes = ReadWholeFile(img / "v1.qcow");
  const uint64_t l1 = Get64(bytes, 40);
  const uint64_t l2 = Get64(bytes, l1);
  const uint64_t e0 = Get64(bytes, l2);
  REQUIRE(e0 != 0);
  Put64(&bytes, l2 + 8, e0 + 0x100);   // not sector aligned
  Put64(&bytes, l2 + 16, 1ULL << 40);  // past the end of the file
  Put64(&bytes, l2 + 24, e0);          // the same cluster twice
  Put64(&bytes, l2 + 32, l2);          // over the L2 table itself
  TempDir tmp;
  WriteWholeFile(tmp / "bad.qcow", bytes);
  CheckResult r;
  REQUIRE(CheckImage(tmp / "bad.qcow", CheckOptions(), &r).ok());
  CHECK(r.corruptions == 4);
  CHECK(Exec(tmp.path(), Ours() + " check bad.qcow").rc == 2);
  // An L1 entry past the end of the file.
  Put64(&bytes, l1, 1ULL << 40);
  WriteWholeFile(tmp / "bad.qcow", bytes);
  REQUIRE(CheckImage(tmp / "bad.qcow", CheckOptions(), &r).ok());
  CHECK(r.corruptions == 1);
}

TEST_CASE("a crash at any write or sync of a repair is finished by a second repair", "[check][qemu][crash]") {
  SKIP_WITHOUT_QEMU();
  const char* cases[] = {"leaked cluster",
                         "cluster referenced twice",
                         "COPIED missing on a data cluster",
                         "data cluster not aligned",
                         "preallocated zero cluster not aligned",
                         "refcount table entry zeroed",
                         "reserved bits in a refcount table entry",
                         "refcount block past the end of the file",
                         "snapshot entry incomplete (v3)",
                         "dirty image with stale refcounts",
                         "bitmap image, data cluster past the end of the file"};
  TempDir tmp;
  for (const Damage& d : Damages()) {
    if (std::find_if(std::begin(cases), std::end(cases), [&](const char* c) { return d.name == std::string(c); }) ==
        std::end(cases)) {
      continue;
    }
    DYNAMIC_SECTION(d.name) {
      std::vector<uint8_t> damaged = ReadWholeFile(Images::Get() / d.base);
      d.edit(&damaged);
      CheckOptions options;
      options.repair = RepairMode::kAll;
      options.max_findings = 0;

      // The uninterrupted repair: how many writes and syncs, what content.
      CrashEnv full(UINT64_MAX);
      full.PutFile("img", damaged);
      options.env = &full;
      CheckResult r;
      REQUIRE(CheckImage("img", options, &r).ok());
      REQUIRE(r.corruptions == 0);
      const uint64_t ops = full.ops();
      REQUIRE(ops > 0);
      const std::string expected_path = tmp / "expected.qcow2";
      {
        std::unique_ptr<File> file;
        REQUIRE(full.OpenFile("img", OpenMode::kReadOnly, &file).ok());
        uint64_t size = 0;
        REQUIRE(file->Size(&size).ok());
        std::vector<uint8_t> repaired(size);
        REQUIRE(file->ReadExact(0, size, repaired.data(), "image").ok());
        WriteWholeFile(expected_path, repaired);
      }
      std::string expected_sum;
      {
        std::unique_ptr<Image> image;
        REQUIRE(OpenImage(expected_path, OpenOptions(), &image).ok());
        REQUIRE(ComputeContentSha256(image.get(), &expected_sum).ok());
      }

      // Every point (the sanitizer pass: a sample, DMCOW_CRASH_SAMPLE).
      for (uint64_t k : CrashPointsToTry(0, ops - 1, 0)) {
        for (uint64_t seed = 0; seed < 2; seed++) {
          CrashEnv env(k);
          env.PutFile("img", damaged);
          options.env = &env;
          CHECK_FALSE(CheckImage("img", options, &r).ok());  // the power fails
          std::mt19937_64 rng(seed * 1000 + k);
          const std::string path = tmp / "crashed.qcow2";
          WriteWholeFile(path, env.CrashedContent("img", rng));
          options.env = dmcow::Env::Default();
          Status s = CheckImage(path, options, &r);
          INFO("crash after " << k << " of " << ops << " writes/syncs, seed " << seed << ": " << s.ToString());
          REQUIRE(s.ok());
          CHECK(r.corruptions == 0);
          CHECK(r.leaks == 0);
          Result after = Exec(tmp.path(), "qemu-img check crashed.qcow2");
          INFO(after.out);
          CHECK(after.rc == 0);
          std::unique_ptr<Image> image;
          REQUIRE(OpenImage(path, OpenOptions(), &image).ok());
          std::string sum;
          REQUIRE(ComputeContentSha256(image.get(), &sum).ok());
          CHECK(sum == expected_sum);
          if (std::string(d.base) != "bitmaps.qcow2") continue;
          // Each enabled bitmap is marked in use (inconsistent) or has the
          // changed cluster's bit: never enabled, consistent and stale.
          nlohmann::json info =
              nlohmann::json::parse(Exec(tmp.path(), "qemu-img info --output=json crashed.qcow2").out);
          for (const auto& b : info["format-specific"]["data"]["bitmaps"]) {
            const auto& flags = b["flags"];
            const bool in_use = std::find(flags.begin(), flags.end(), "in-use") != flags.end();
            if (in_use || std::find(flags.begin(), flags.end(), "auto") == flags.end()) continue;
            INFO("bitmap " << b["name"]);
            CHECK(Covers(QemuDirtyRanges(tmp.path(), "crashed.qcow2", b["name"]), 64 << 10, 64 << 10));
          }
        }
      }
    }
  }
}

TEST_CASE("RepairDirtyQcow2 repairs a dirty image and clears the bit, as QEMU does on open", "[check][qemu]") {
  SKIP_WITHOUT_QEMU();
  Images& img = Images::Get();
  TempDir tmp;
  const std::string path = tmp / "dirty.qcow2";
  MustRun("cp '" + (img / "dirty.qcow2") + "' '" + path + "'");
  REQUIRE((ReadWholeFile(path)[79] & 1) == 1);
  std::unique_ptr<Image> image;
  OpenOptions writable;
  writable.writable = true;
  {
    // OpenImage for writing runs the repair itself.
    const std::string by_open = tmp / "by-open.qcow2";
    MustRun("cp '" + (img / "dirty.qcow2") + "' '" + by_open + "'");
    REQUIRE(OpenImage(by_open, writable, &image).ok());
    CHECK(!image->info().dirty);
    image.reset();
    CHECK((ReadWholeFile(by_open)[79] & 1) == 0);
    CHECK(Exec(tmp.path(), "qemu-img check by-open.qcow2").rc == 0);
  }

  std::unique_ptr<File> file;
  REQUIRE(Env::Default()->OpenFile(path, OpenMode::kReadWrite, &file).ok());
  CheckResult r;
  REQUIRE(RepairDirtyQcow2(file.get(), &r).ok());
  CHECK(r.corruptions_fixed > 0);
  file.reset();
  CHECK((ReadWholeFile(path)[79] & 1) == 0);
  CHECK(Exec(tmp.path(), "qemu-img check dirty.qcow2").rc == 0);
  REQUIRE(OpenImage(path, writable, &image).ok());

  // A clean image: nothing to do.
  REQUIRE(Env::Default()->OpenFile(path, OpenMode::kReadWrite, &file).ok());
  REQUIRE(RepairDirtyQcow2(file.get(), &r).ok());
  CHECK(r.corruptions_fixed == 0);
}
