// Damaged refcounts or L2 entries must not make a writer overwrite the image's
// own metadata (issue 14; the rule: qcow/src/qcow2/qcow2_overlap.h).
//
// Each case starts from an image qemu-img and qemu-io made, patches bytes (a
// refcount set to zero, so the allocator would hand out a table; an L2 entry
// with COPIED set pointing at a table, so a write in place would land on it)
// and runs one writer: Image::Write, `dmcow-img convert -n` (also -c),
// `dmcow-img commit` into the damaged image as the base, and the block-device
// calls. Each must refuse with a message naming the file, the host offset and
// the structure; the metadata must be byte for byte what it was but for the
// corrupt bit, which `qemu-img info` must show; and both `dmcow-img check -r
// all` and `qemu-img check -r all` must then leave an image qemu-img check
// calls clean.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "dmcow/image.h"
#include "qcow2/qcow2_overlap.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;

namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kDiskSize = 4 * kMiB;
constexpr uint64_t kCopied = 1ULL << 63;
constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ULL;
constexpr uint64_t kUnallocatedGuest = 2 * kMiB + 64 * 1024;  // qemu-io writes even clusters only

void PutBE16(std::vector<uint8_t>& b, uint64_t at, uint16_t v) {
  b.at(at) = static_cast<uint8_t>(v >> 8);
  b.at(at + 1) = static_cast<uint8_t>(v);
}

// Where qemu-img put the tables (read from the file, not assumed).
struct Layout {
  uint64_t cluster_size, l1, l1_bytes, reftable, reftable_bytes, refblock, l2;
};

Layout ReadLayout(const std::vector<uint8_t>& f) {
  Layout l;
  l.cluster_size = uint64_t{1} << BE32(f, 20);
  l.l1_bytes = uint64_t{BE32(f, 36)} * 8;
  l.l1 = BE64(f, 40);
  l.reftable = BE64(f, 48);
  l.reftable_bytes = uint64_t{BE32(f, 56)} * l.cluster_size;
  l.refblock = BE64(f, l.reftable);
  l.l2 = BE64(f, l.l1) & kOffsetMask;
  return l;
}

// The bytes of every table (whole clusters) and the header but its
// incompatible-features field.
std::vector<uint8_t> Metadata(const std::vector<uint8_t>& f, const Layout& l) {
  std::vector<uint8_t> out(f.begin(), f.begin() + l.cluster_size);
  std::memset(out.data() + 72, 0, 8);
  for (uint64_t at : {l.l1, l.reftable, l.refblock, l.l2})
    out.insert(out.end(), f.begin() + at, f.begin() + at + l.cluster_size);
  return out;
}

struct Damage {
  const char* name;
  const char* structure;  // as the error message names it
  bool allocates;         // the refusal comes from the allocator (else a write in place)
  std::function<void(std::vector<uint8_t>&, const Layout&)> apply;
};

// 16-bit refcounts (qemu-img's default), one block covering the whole file.
void ZeroRefcount(std::vector<uint8_t>& f, const Layout& l, uint64_t host) {
  PutBE16(f, l.refblock + host / l.cluster_size * 2, 0);
}
// Guest cluster 0's L2 entry, COPIED (writable in place), pointing at `host`.
void PointL2(std::vector<uint8_t>& f, const Layout& l, uint64_t host) { PutBE64(f, l.l2, host | kCopied); }

std::vector<Damage> Damages() {
  return {
      {"refcount of the header cluster is 0", "the qcow2 header", true,
       [](auto& f, const Layout& l) { ZeroRefcount(f, l, 0); }},
      {"refcount of the L1 table is 0", "the active L1 table", true,
       [](auto& f, const Layout& l) { ZeroRefcount(f, l, l.l1); }},
      {"refcount of the refcount table is 0", "the refcount table", true,
       [](auto& f, const Layout& l) { ZeroRefcount(f, l, l.reftable); }},
      {"refcount of the refcount block is 0", "a refcount block", true,
       [](auto& f, const Layout& l) { ZeroRefcount(f, l, l.refblock); }},
      {"refcount of the L2 table is 0", "an active L2 table", true,
       [](auto& f, const Layout& l) { ZeroRefcount(f, l, l.l2); }},
      {"L2 entry with COPIED points at the L1 table", "the active L1 table", false,
       [](auto& f, const Layout& l) { PointL2(f, l, l.l1); }},
      {"L2 entry with COPIED points at the refcount table", "the refcount table", false,
       [](auto& f, const Layout& l) { PointL2(f, l, l.reftable); }},
      {"L2 entry with COPIED points at the refcount block", "a refcount block", false,
       [](auto& f, const Layout& l) { PointL2(f, l, l.refblock); }},
      {"L2 entry with COPIED points at its own L2 table", "an active L2 table", false,
       [](auto& f, const Layout& l) { PointL2(f, l, l.l2); }},
  };
}

class OverlapTest {
 protected:
  // base.qcow2: 4 MiB, every other 64 KiB cluster written by qemu-io (an L2
  // table, data clusters), so that a writer filling the gaps allocates one
  // cluster at a time and the allocator's first fit reaches a metadata
  // cluster whose refcount was zeroed; top.qcow2 over it with all 4 MiB
  // written (for commit); data.raw: 4 MiB of random bytes (for convert).
  void MakeImages() {
    std::string writes;
    for (uint64_t at = 0; at < kDiskSize; at += 128 * 1024)
      writes += " -c 'write -P 0x5a " + std::to_string(at) + " 64k'";
    MustRun("cd '" + tmp_.path() +
            "' && qemu-img create -f qcow2 base.qcow2 4M >/dev/null && "
            "qemu-io" +
            writes +
            " base.qcow2 >/dev/null && "
            "qemu-img create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 >/dev/null && "
            "qemu-io -c 'write -P 0x77 0 4M' top.qcow2 >/dev/null");
    std::mt19937_64 rng(14);
    std::vector<uint8_t> raw(kDiskSize);
    for (auto& b : raw) b = static_cast<uint8_t>(rng());
    WriteWholeFile(tmp_ / "data.raw", raw);
    pristine_ = ReadWholeFile(tmp_ / "base.qcow2");
    pristine_top_ = ReadWholeFile(tmp_ / "top.qcow2");
    layout_ = ReadLayout(pristine_);
    REQUIRE(layout_.l2 != 0);
  }

  // base.qcow2 damaged afresh (top.qcow2 restored too); returns its bytes.
  std::vector<uint8_t> Damaged(const Damage& d) {
    std::vector<uint8_t> f = pristine_;
    d.apply(f, layout_);
    WriteWholeFile(tmp_ / "base.qcow2", f);
    WriteWholeFile(tmp_ / "top.qcow2", pristine_top_);
    return f;
  }

  // What every refusal must leave: the metadata as it was but for the
  // corrupt bit, an image qemu-img still reads as qcow2 and calls corrupt,
  // and one both repairs make clean.
  void CheckRefused(const std::vector<uint8_t>& before) {
    const std::string path = tmp_ / "base.qcow2";
    const std::vector<uint8_t> after = ReadWholeFile(path);
    REQUIRE(after.size() >= before.size());
    const bool metadata_unchanged = Metadata(after, layout_) == Metadata(before, layout_);
    CHECK(metadata_unchanged);
    CHECK(BE64(after, 72) == (BE64(before, 72) | 2));

    std::string out;
    REQUIRE(Run("qemu-img info -U --output=json '" + path + "'", &out) == 0);
    INFO(out);
    const auto info = nlohmann::json::parse(out);
    CHECK(info["format"] == "qcow2");
    CHECK(info["format-specific"]["data"]["corrupt"] == true);

    for (const std::string& repair : {std::string(kDmcowImg), std::string("qemu-img")}) {
      const std::string copy = tmp_ / "repaired.qcow2";
      WriteWholeFile(copy, after);
      Run(repair + " check -r all '" + copy + "'", &out);
      INFO(repair << " check -r all: " << out);
      CHECK(Run("qemu-img check '" + copy + "'", &out) == 0);
      INFO("qemu-img check after repair: " << out);
      CHECK(Run("qemu-img info --output=json '" + copy + "' | grep -q '\"corrupt\": false'") == 0);
    }
  }

  void CheckMessage(const std::string& message, const Damage& d) {
    INFO(message);
    CHECK(message.find(tmp_ / "base.qcow2") != std::string::npos);
    CHECK(message.find(" at host offset ") != std::string::npos);
    CHECK(message.find(std::string("overlaps ") + d.structure) != std::string::npos);
    CHECK(message.find("image marked corrupt") != std::string::npos);
  }

  TempDir tmp_;
  std::vector<uint8_t> pristine_, pristine_top_;
  Layout layout_{};
};

}  // namespace

TEST_CASE_METHOD(OverlapTest, "Image::Write refuses to overwrite metadata", "[overlap]") {
  SKIP_WITHOUT_QEMU();
  MakeImages();
  for (const Damage& d : Damages()) {
    DYNAMIC_SECTION(d.name) {
      const std::vector<uint8_t> before = Damaged(d);
      {
        std::unique_ptr<Image> image = MustOpenWritable(tmp_ / "base.qcow2");
        const std::vector<uint8_t> buf(layout_.cluster_size, 0xab);
        const uint64_t guest = d.allocates ? kUnallocatedGuest : 0;
        Status s = image->Write(guest, buf.data(), buf.size());
        REQUIRE_FALSE(s.ok());
        CHECK(s.IsCorrupt());
        CheckMessage(s.message(), d);
        // Sticky: nothing more is written, by a later write or the flush.
        CHECK_FALSE(image->Write(3 * kMiB, buf.data(), buf.size()).ok());
        CHECK_FALSE(image->WriteZeroes(0, layout_.cluster_size).ok());
        CHECK_FALSE(image->Flush().ok());
      }
      CheckRefused(before);
    }
  }
}

TEST_CASE_METHOD(OverlapTest, "dmcow-img convert -n refuses to overwrite metadata", "[overlap]") {
  SKIP_WITHOUT_QEMU();
  MakeImages();
  for (const Damage& d : Damages()) {
    for (const char* options : {"", "-c"}) {
      // A compressed write never goes in place: only the allocator is tested.
      if (*options && !d.allocates) continue;
      DYNAMIC_SECTION(d.name << " convert " << options) {
        const std::vector<uint8_t> before = Damaged(d);
        std::string out;
        const int rc = Run(std::string(kDmcowImg) + " convert -n " + options + " -f raw -O qcow2 '" +
                               (tmp_ / "data.raw") + "' '" + (tmp_ / "base.qcow2") + "'",
                           &out);
        CHECK(rc == 1);
        CheckMessage(out, d);
        CheckRefused(before);
      }
    }
  }
}

TEST_CASE_METHOD(OverlapTest, "dmcow-img commit refuses to overwrite the base's metadata", "[overlap]") {
  SKIP_WITHOUT_QEMU();
  MakeImages();
  for (const Damage& d : Damages()) {
    DYNAMIC_SECTION(d.name) {
      const std::vector<uint8_t> before = Damaged(d);
      std::string out;
      CHECK(Run(std::string(kDmcowImg) + " commit '" + (tmp_ / "top.qcow2") + "'", &out) == 1);
      CheckMessage(out, d);
      CheckRefused(before);
      const bool top_unchanged = ReadWholeFile(tmp_ / "top.qcow2") == pristine_top_;
      CHECK(top_unchanged);  // not emptied
    }
  }
}

TEST_CASE_METHOD(OverlapTest, "The block-device calls refuse metadata clusters", "[overlap]") {
  SKIP_WITHOUT_QEMU();
  MakeImages();
  // Damaged images: the daemon asks where guest cluster 0 lives (a writable
  // linear segment if exclusive) or reserves a cluster for a new write.
  for (const Damage& d : Damages()) {
    DYNAMIC_SECTION(d.name) {
      const std::vector<uint8_t> before = Damaged(d);
      {
        std::unique_ptr<Image> image = MustOpenWritable(tmp_ / "base.qcow2");
        Status s;
        if (d.allocates) {
          uint64_t host = 0;
          s = Device(image)->ReserveClusters(1, &host);
        } else {
          DeviceImage::ClusterPlace place;
          s = Device(image)->DescribeCluster(0, &place);
        }
        REQUIRE_FALSE(s.ok());
        CHECK(s.IsCorrupt());
        CheckMessage(s.message(), d);
      }
      CheckRefused(before);
    }
  }
  // An undamaged image: FillClusters and LinkClusters given a host offset
  // that holds a table (the daemon's bookkeeping gone wrong) refuse too.
  const uint64_t unallocated_cluster = kUnallocatedGuest / layout_.cluster_size;
  const std::vector<std::pair<const char*, std::function<Status(Image*)>>> calls = {
      {"FillClusters onto the L1 table",
       [&](Image* i) { return Device(i)->FillClusters(unallocated_cluster, 1, layout_.l1); }},
      {"LinkClusters onto the refcount table",
       [&](Image* i) { return Device(i)->LinkClusters(unallocated_cluster, 1, layout_.reftable); }},
      {"LinkClusters onto the header", [&](Image* i) { return Device(i)->LinkClusters(unallocated_cluster, 1, 0); }},
  };
  for (const auto& [name, call] : calls) {
    DYNAMIC_SECTION(name) {
      WriteWholeFile(tmp_ / "base.qcow2", pristine_);
      {
        std::unique_ptr<Image> image = MustOpenWritable(tmp_ / "base.qcow2");
        Status s = call(image.get());
        INFO(s.ToString());
        REQUIRE_FALSE(s.ok());
        CHECK(s.IsCorrupt());
        CHECK(s.message().find("image marked corrupt") != std::string::npos);
        CHECK_FALSE(image->Flush().ok());
      }
      CheckRefused(pristine_);
    }
  }
}

TEST_CASE_METHOD(OverlapTest, "Snapshot and bitmap structures are protected too", "[overlap]") {
  SKIP_WITHOUT_QEMU();
  // Two clusters written, a snapshot taken, cluster 0 written again (a new
  // active L2 table, entry 0 COPIED), a persistent bitmap added.
  MustRun("cd '" + tmp_.path() +
          "' && qemu-img create -f qcow2 snap.qcow2 4M >/dev/null && "
          "qemu-io -c 'write -P 1 0 128k' snap.qcow2 >/dev/null && qemu-img snapshot -c s1 snap.qcow2 && "
          "qemu-io -c 'write -P 2 0 64k' snap.qcow2 >/dev/null && qemu-img bitmap --add snap.qcow2 b1");
  const std::vector<uint8_t> made = ReadWholeFile(tmp_ / "snap.qcow2");
  const Layout l = ReadLayout(made);
  const uint64_t snapshot_table = BE64(made, 64);
  const uint64_t snapshot_l1 = BE64(made, snapshot_table);
  uint64_t bitmap_directory = 0;
  for (uint64_t at = BE32(made, 100); BE32(made, at) != 0; at += 8 + ((BE32(made, at + 4) + 7) & ~7u)) {
    if (BE32(made, at) == 0x23852875) bitmap_directory = BE64(made, at + 8 + 16);
  }
  REQUIRE(bitmap_directory != 0);
  const uint64_t bitmap_table = BE64(made, bitmap_directory);
  const std::vector<std::pair<uint64_t, const char*>> targets = {
      {snapshot_table, "the snapshot table"},
      {snapshot_l1, "a snapshot's L1 table"},
      {bitmap_directory, "the bitmap directory"},
      {bitmap_table, "a bitmap table"},
  };
  for (const auto& [target, structure] : targets) {
    DYNAMIC_SECTION(structure) {
      std::vector<uint8_t> f = made;
      PointL2(f, l, target);
      WriteWholeFile(tmp_ / "snap.qcow2", f);
      {
        std::unique_ptr<Image> image = MustOpenWritable(tmp_ / "snap.qcow2");
        const std::vector<uint8_t> buf(l.cluster_size, 0xab);
        Status s = image->Write(0, buf.data(), buf.size());
        INFO(s.ToString());
        REQUIRE_FALSE(s.ok());
        CHECK(s.message().find(std::string("overlaps ") + structure) != std::string::npos);
        CHECK(s.message().find("image marked corrupt") != std::string::npos);
      }
      const std::vector<uint8_t> after = ReadWholeFile(tmp_ / "snap.qcow2");
      // qemu-img ends the file with the bitmap directory: compare what there is.
      const uint64_t n = std::min<uint64_t>(l.cluster_size, f.size() - target);
      const bool target_unchanged =
          after.size() >= target + n && std::equal(f.begin() + target, f.begin() + target + n, after.begin() + target);
      CHECK(target_unchanged);
      CHECK(Run("qemu-img info -U --output=json '" + (tmp_ / "snap.qcow2") +
                "' 2>/dev/null | grep -q '\"corrupt\": true'") == 0);
    }
  }
}

TEST_CASE("Qcow2MetadataMap: overlapping structures, removal, ignored kinds", "[overlap]") {
  Qcow2MetadataMap map;
  uint64_t hit = 0;
  Qcow2Metadata kind;
  map.Add(0, 1, Qcow2Metadata::kHeader);
  map.Add(3, 4, Qcow2Metadata::kActiveL1);  // clusters 3-6
  map.Add(5, 1, Qcow2Metadata::kActiveL2);  // inside the L1 table (hostile)
  map.Add(5, 1, Qcow2Metadata::kActiveL2);  // twice (two L1 entries)
  CHECK_FALSE(map.Find(1, 2, 0, &hit, &kind));
  REQUIRE(map.Find(1, 3, 0, &hit, &kind));
  CHECK(hit == 3);
  CHECK(kind == Qcow2Metadata::kActiveL1);
  REQUIRE(map.Find(5, 1, Qcow2MetadataBit(Qcow2Metadata::kActiveL1), &hit, &kind));
  CHECK(kind == Qcow2Metadata::kActiveL2);
  CHECK_FALSE(map.Find(6, 1, Qcow2MetadataBit(Qcow2Metadata::kActiveL1), &hit, &kind));
  map.Remove(3, 4, Qcow2Metadata::kActiveL1);
  REQUIRE(map.Find(2, 10, 0, &hit, &kind));
  CHECK(hit == 5);
  map.Remove(5, 1, Qcow2Metadata::kActiveL2);
  CHECK(map.Find(5, 1, 0, &hit, &kind));  // the other L1 entry still points there
  map.Remove(5, 1, Qcow2Metadata::kActiveL2);
  CHECK_FALSE(map.Find(1, 100, 0, &hit, &kind));
  CHECK(map.segments() == 1);  // only the header left
  map.Add(UINT64_MAX - 1, 1, Qcow2Metadata::kActiveL2);
  CHECK(map.Find(UINT64_MAX - 2, 2, 0, &hit, &kind));
}
