// The convert job plans a run of chunks without data as one piece (the work
// follows the data, not the virtual size). These tests show that this gives
// byte for byte the target the walk of fixed chunks gave, on random shapes
// (data at chunk edges, zero clusters, data that is all zeros, -S, -c, -B,
// several sources, raw and qcow2 targets, one to three threads), and that an
// empty or nearly empty image of 16 TiB is planned in a handful of pieces.
#include <catch2/catch.hpp>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "convert_job.h"
#include "dmcow/create.h"
#include "dmcow/image.h"
#include "test_util.h"

namespace {

using namespace dmcow_test;

using dmcow::CreateImage;
using dmcow::CreateOptions;
using dmcow::Image;
using dmcow::OpenImage;
using dmcow::OpenOptions;
using dmcow::Status;
using dmcow::cli::ConvertJob;
using dmcow::cli::ConvertSettings;
using dmcow::cli::Progress;

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kChunk = 2 * kMiB;  // the job's chunk for clusters up to 2 MiB

void MustCreate(const std::string& path, const std::string& format, uint64_t size, uint64_t cluster_size = 65536,
                const std::string& backing = "") {
  CreateOptions co;
  co.format = format;
  co.size = size;
  co.cluster_size = cluster_size;
  if (!backing.empty()) {
    co.backing_file = backing;
    co.backing_fmt = "qcow2";
  }
  Status st = CreateImage(path, co);
  INFO(path << ": " << st.ToString());
  REQUIRE(st.ok());
}

std::unique_ptr<Image> MustOpen(const std::string& path, bool writable) {
  OpenOptions o;
  o.writable = writable;
  std::unique_ptr<Image> image;
  Status st = OpenImage(path, o, &image);
  INFO(path << ": " << st.ToString());
  REQUIRE(st.ok());
  return image;
}

// Data, data that is all zeros, and zeroed ranges, often across a chunk
// edge, where the fixed walk cut a run and the hole planner must not.
void Scribble(Image* image, std::mt19937_64& rng, int pieces) {
  const uint64_t size = image->virtual_size();
  for (int i = 0; i < pieces; i++) {
    const uint64_t len = 512 * (1 + rng() % 512);
    uint64_t at;
    if (rng() % 2) {
      const uint64_t edge = kChunk * (rng() % (size / kChunk + 1));
      at = edge > len / 2 ? edge - len / 2 + 512 * (rng() % 8) : 512 * (rng() % 8);
    } else {
      at = 512 * (rng() % (size / 512));
    }
    if (at >= size) at = size - 512;
    const uint64_t n = std::min(len, size - at);
    switch (rng() % 4) {
      case 0: REQUIRE(image->WriteZeroes(at, n).ok()); break;
      case 1: {
        std::vector<uint8_t> zeros(n, 0);
        REQUIRE(image->Write(at, zeros.data(), zeros.size()).ok());
        break;
      }
      default: {
        std::vector<uint8_t> data = MixedData(rng, n);
        REQUIRE(image->Write(at, data.data(), data.size()).ok());
      }
    }
  }
  REQUIRE(image->Flush().ok());
}

struct Variant {
  bool raw_target = false;
  uint64_t cluster_size = 65536;
  bool compress = false;
  uint64_t min_sparse = 4096;
  bool zero_init = true;
  bool top_layer_only = false;
  int threads = 2;
  bool prefill = false;  // the target starts full of 0xee (as with -n): zero runs must be written
};

std::string Describe(const Variant& v) {
  return std::string(v.raw_target ? "raw" : "qcow2") + " cluster " + std::to_string(v.cluster_size) +
         (v.compress ? " -c" : "") + " -S " + std::to_string(v.min_sparse) + (v.zero_init ? "" : " no-zero-init") +
         (v.top_layer_only ? " -B" : "") + " threads " + std::to_string(v.threads) + (v.prefill ? " prefilled" : "");
}

// Converts into a new target at `out`; returns the pieces the job planned.
uint64_t Convert(const std::vector<Image*>& sources, const Variant& v, bool plan_holes, const std::string& out) {
  uint64_t total = 0;
  for (Image* s : sources) total += s->virtual_size();
  MustCreate(out, v.raw_target ? "raw" : "qcow2", total, v.cluster_size);
  std::unique_ptr<Image> target = MustOpen(out, true);
  if (v.prefill) {
    const std::vector<uint8_t> fill(kMiB, 0xee);
    for (uint64_t at = 0; at < total; at += kMiB) {
      REQUIRE(target->Write(at, fill.data(), static_cast<size_t>(std::min(kMiB, total - at))).ok());
    }
  }
  Progress progress(false, 1.0f);
  ConvertSettings cs;
  cs.sources = sources;
  cs.target = target.get();
  cs.ordered_writes = !v.raw_target;
  cs.cluster_size = v.raw_target ? 512 : v.cluster_size;
  cs.compress = v.compress;
  cs.min_sparse = v.min_sparse;
  cs.zero_init = v.zero_init;
  cs.top_layer_only = v.top_layer_only;
  cs.threads = v.threads;
  cs.progress = &progress;
  cs.plan_holes = plan_holes;
  ConvertJob job(cs);
  std::string error;
  const bool ok = job.Run(&error);
  INFO(error);
  REQUIRE(ok);
  return job.pieces_planned();
}

// Guest bytes of the concatenated sources equal the target's.
void CheckContent(const std::vector<Image*>& sources, const std::string& out) {
  std::unique_ptr<Image> target = MustOpen(out, false);
  uint64_t base = 0;
  std::vector<uint8_t> a(kMiB), b(kMiB);
  for (Image* s : sources) {
    for (uint64_t off = 0; off < s->virtual_size(); off += kMiB) {
      const size_t n = static_cast<size_t>(std::min(kMiB, s->virtual_size() - off));
      REQUIRE(s->Read(off, a.data(), n).ok());
      REQUIRE(target->Read(base + off, b.data(), n).ok());
      INFO("guest offset " << base + off);
      REQUIRE(std::equal(a.begin(), a.begin() + n, b.begin()));
    }
    base += s->virtual_size();
  }
}

TEST_CASE("planning holes gives the bytes the fixed-chunk walk gave, on random shapes", "[convert_job]") {
  TempDir tmp;
  for (uint64_t seed = 1; seed <= 40; seed++) {
    std::mt19937_64 rng(seed);
    Variant v;
    v.raw_target = rng() % 3 == 0;
    v.cluster_size = v.raw_target ? 65536 : (uint64_t{512} << (rng() % 13));  // 512 B to 2 MiB
    v.compress = !v.raw_target && rng() % 3 == 0;
    const uint64_t sparse[] = {0, 512, 4096, 65536, kMiB};
    v.min_sparse = sparse[rng() % 5];
    v.zero_init = rng() % 4 != 0;
    v.prefill = !v.zero_init && rng() % 2 == 0;
    v.top_layer_only = !v.raw_target && rng() % 4 == 0;
    v.threads = 1 + static_cast<int>(rng() % 3);
    const std::string dir = tmp / ("s" + std::to_string(seed));
    MustRun("mkdir -p '" + dir + "'");

    // One or two sources; with -B, one top over a base with data of its own.
    std::vector<std::unique_ptr<Image>> owned;
    std::vector<Image*> sources;
    const int count = v.top_layer_only ? 1 : 1 + static_cast<int>(rng() % 3);
    for (int i = 0; i < count; i++) {
      const uint64_t size = 512 * (rng() % (48 * kMiB / 512)) + 4 * kMiB;
      const std::string path = dir + "/src" + std::to_string(i) + ".qcow2";
      std::string backing;
      // With -B the top must have a backing file; without, a chain is read
      // whole (zero runs from several layers), and a base may be shorter.
      if (v.top_layer_only || rng() % 4 == 0) {
        backing = dir + "/base" + std::to_string(i) + ".qcow2";
        MustCreate(backing, "qcow2", v.top_layer_only ? size : size / 2 / 512 * 512 + 512);
        Scribble(MustOpen(backing, true).get(), rng, 20);
      }
      const bool raw_source = backing.empty() && rng() % 4 == 0;
      MustCreate(raw_source ? dir + "/src" + std::to_string(i) + ".raw" : path, raw_source ? "raw" : "qcow2", size,
                 65536, backing);
      const std::string made = raw_source ? dir + "/src" + std::to_string(i) + ".raw" : path;
      Scribble(MustOpen(made, true).get(), rng, 1 + static_cast<int>(rng() % 24));
      owned.push_back(MustOpen(made, false));
      sources.push_back(owned.back().get());
    }

    INFO("seed " << seed << ": " << Describe(v));
    const std::string walked = dir + "/walked", planned = dir + "/planned";
    const uint64_t walked_pieces = Convert(sources, v, false, walked);
    const uint64_t planned_pieces = Convert(sources, v, true, planned);
    INFO("pieces: walked " << walked_pieces << ", planned " << planned_pieces);
    CHECK(planned_pieces <= walked_pieces);
    CHECK(Sha256OfFile(planned) == Sha256OfFile(walked));
    if (!v.top_layer_only) CheckContent(sources, planned);
    MustRun("rm -rf '" + dir + "'");
  }
}

// 16 TiB with qcow2 targets; raw files stop short of 16 TiB on ext4, so the
// raw cases use 8 TiB.
TEST_CASE("an empty or nearly empty 16 TiB image is planned in a handful of pieces", "[convert_job]") {
  TempDir tmp;
  const uint64_t TiB = uint64_t{1} << 40;
  for (uint64_t tib : {16, 8}) {
    const std::string n = std::to_string(tib);
    const uint64_t size = tib * TiB;
    MustCreate(tmp / ("empty" + n + ".qcow2"), "qcow2", size);
    MustCreate(tmp / ("sparse" + n + ".qcow2"), "qcow2", size);
    std::unique_ptr<Image> img = MustOpen(tmp / ("sparse" + n + ".qcow2"), true);
    std::vector<uint8_t> data(65536, 0x5a);
    for (uint64_t at : {uint64_t{0}, 3 * TiB, size - 65536}) REQUIRE(img->Write(at, data.data(), 65536).ok());
    REQUIRE(img->WriteZeroes(5 * TiB, uint64_t{1} << 30).ok());
    REQUIRE(img->Flush().ok());
  }
  MustRun("truncate -s 8T '" + (tmp / "sparse8.raw") + "'");
  struct Case {
    const char* source;
    bool raw_target;
    bool compress;
    uint64_t max_pieces;  // and whether 0x5a is at 3 TiB: the sparse qcow2 images
  } cases[] = {
      {"empty16.qcow2", false, false, 1},
      {"empty16.qcow2", false, true, 1},
      {"empty8.qcow2", true, false, 1},
      {"sparse8.raw", false, false, 1},
      {"sparse8.raw", true, false, 1},
      // Three data chunks, the holes between and after them, the zeroed GiB.
      {"sparse16.qcow2", false, false, 8},
      {"sparse16.qcow2", false, true, 8},
      {"sparse8.qcow2", true, false, 8},
  };
  for (const Case& c : cases) {
    std::unique_ptr<Image> src = MustOpen(tmp / c.source, false);
    Variant v;
    v.raw_target = c.raw_target;
    v.compress = c.compress;
    INFO(c.source << " to " << Describe(v));
    const std::string out = tmp / "out";
    const uint64_t pieces = Convert({src.get()}, v, true, out);
    CHECK(pieces <= c.max_pieces);
    std::unique_ptr<Image> target = MustOpen(out, false);
    std::vector<uint8_t> got(65536);
    REQUIRE(target->Read(3 * TiB, got.data(), got.size()).ok());
    const bool has_data = std::string(c.source).rfind("sparse", 0) == 0 && c.max_pieces > 1;
    CHECK(got[0] == (has_data ? 0x5a : 0));
    target.reset();
    MustRun("rm -f '" + out + "'");
  }
}

}  // namespace
