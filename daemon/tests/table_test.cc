// Table planning: coalescing, the target bound, set differences, segments.
#include <catch2/catch.hpp>

#include <chrono>
#include <cstdio>
#include <random>

#include "table.h"

using namespace dmcowd;

namespace {

constexpr uint32_t kCs = 128;

bool Same(const std::vector<Extent>& a, const std::vector<Extent>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); i++) {
    if (a[i].chunk != b[i].chunk || a[i].nr_chunks != b[i].nr_chunks || a[i].cow_sector != b[i].cow_sector)
      return false;
  }
  return true;
}

// Checks that segments tile [0, dev) and agree with `linear`.
void CheckSegments(const std::vector<Segment>& segs, const std::vector<Extent>& linear, uint64_t dev) {
  uint64_t pos = 0;
  size_t li = 0;
  bool prev_cow = false;
  for (const Segment& s : segs) {
    REQUIRE(s.start == pos);
    REQUIRE(s.len > 0);
    REQUIRE(s.start % kCs == 0);  // cow targets must start chunk aligned; linear do too
    if (s.linear) {
      REQUIRE(li < linear.size());
      REQUIRE(s.start == linear[li].chunk * kCs);
      REQUIRE(s.cow_sector == linear[li].cow_sector);
      li++;
      prev_cow = false;
    } else {
      REQUIRE_FALSE(prev_cow);  // no two cow targets in a row
      prev_cow = true;
    }
    pos += s.len;
  }
  REQUIRE(pos == dev);
}

}  // namespace

TEST_CASE("Coalesce merges runs adjacent in device and cow space only") {
  std::vector<Extent> in = {{0, 2, 1000}, {2, 1, 1000 + 2 * kCs}, {3, 1, 5000}, {5, 1, 5000 + kCs}};
  CHECK(Same(Coalesce(in, kCs), {{0, 3, 1000}, {3, 1, 5000}, {5, 1, 5000 + kCs}}));
}

TEST_CASE("ChooseLinear keeps the longest runs within the bound") {
  std::vector<Extent> runs;
  for (uint64_t i = 0; i < 10; i++) runs.push_back(Extent{i * 100, 1 + (i * 7) % 10, i * 100 * kCs});
  CHECK(Same(ChooseLinear(runs, 21), runs));  // 10 runs need at most 21 targets
  std::vector<Extent> three = ChooseLinear(runs, 7);
  REQUIRE(three.size() == 3);
  // Lengths 1 + (7i mod 10): i = 7 gives 10, i = 4 gives 9, i = 1 gives 8.
  CHECK(three[0].chunk == 100);
  CHECK(three[1].chunk == 400);
  CHECK(three[2].chunk == 700);
  CHECK(ChooseLinear(runs, 1).empty());
}

TEST_CASE("Subtract keeps the uncovered parts with their cow sectors") {
  std::vector<Extent> a = {{0, 10, 0}, {20, 5, 50000}};
  std::vector<Extent> b = {{2, 3, 999}, {8, 15, 999}};
  CHECK(Same(Subtract(a, b, kCs), {{0, 2, 0}, {5, 3, 5 * kCs}, {23, 2, 50000 + 3 * kCs}}));
  CHECK(Same(Subtract(a, {}, kCs), a));
  CHECK(Subtract(a, {{0, 100, 0}}, kCs).empty());
}

TEST_CASE("BuildSegments tiles the device, the last chunk short") {
  const uint64_t dev = 10 * kCs + 5;
  std::vector<Extent> lin = {{0, 2, 640}, {5, 1, 64}, {9, 2, 128}};
  auto segs = BuildSegments(lin, dev, kCs);
  CheckSegments(segs, lin, dev);
  REQUIRE(segs.size() == 5);
  CHECK(segs.back().len == kCs + 5);
  TableDevices d{"id", "7:0", "7:1", kCs, false};
  CHECK(SegmentParams(segs[0], d) == "7:1 640");
  CHECK(std::string(SegmentType(segs[1])) == "cow");
  CHECK(SegmentParams(segs[1], d) == "id 7:0 7:1 128");
  // With a direct device: linear segments past direct_from go to it, the rest
  // (and cow targets) stay on the cow device.
  TableDevices direct{"id", "7:0", "253:4", kCs, true, "7:2", 600};
  CHECK(SegmentParams(segs[0], direct) == "7:2 40");
  CHECK(SegmentParams(segs[1], direct) == "id 7:0 253:4 128 1 read_to_daemon");
  direct.direct_from = 641;
  CHECK(SegmentParams(segs[0], direct) == "253:4 640");
}

TEST_CASE("random plans stay within the target bound and tile the device") {
  std::mt19937_64 rng(42);
  for (int iter = 0; iter < 200; iter++) {
    const uint64_t chunks = 1 + rng() % 3000;
    std::vector<Extent> ext;
    uint64_t cow = 0;
    for (uint64_t c = 0; c < chunks; c++) {
      if (rng() % 3 == 0) continue;
      if (rng() % 4 == 0) cow += kCs * (1 + rng() % 5);  // a jump in cow space
      ext.push_back(Extent{c, 1, cow});
      cow += kCs;
    }
    const uint64_t max_targets = 3 + rng() % 400;
    auto runs = Coalesce(ext, kCs);
    auto lin = ChooseLinear(runs, max_targets);
    const uint64_t dev = chunks * kCs - rng() % kCs;
    auto segs = BuildSegments(lin, dev, kCs);
    REQUIRE(segs.size() <= max_targets);
    CheckSegments(segs, lin, dev);
    // Every chunk is either in a linear run or still a kernel mapping.
    auto rest = Subtract(runs, lin, kCs);
    uint64_t n = 0;
    for (auto& e : lin) n += e.nr_chunks;
    for (auto& e : rest) n += e.nr_chunks;
    REQUIRE(n == ext.size());
  }
}

TEST_CASE("a fragmented device of 2 M chunks plans within device-mapper's limit") {
  // Every other chunk mapped, each to a place that breaks every run.
  const uint64_t chunks = 2 * 1024 * 1024;
  std::vector<Extent> ext;
  for (uint64_t c = 0; c < chunks; c += 2) ext.push_back(Extent{c, 1, (chunks - c) * kCs});
  const auto t0 = std::chrono::steady_clock::now();
  auto lin = ChooseLinear(Coalesce(ext, kCs), kDmMaxTargets);
  auto segs = BuildSegments(lin, chunks * kCs, kCs);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  CHECK(segs.size() <= kDmMaxTargets);
  CHECK(lin.size() == (kDmMaxTargets - 1) / 2);
  std::printf("plan of %zu runs into %zu targets: %.0f ms\n", ext.size(), segs.size(), ms);
}
