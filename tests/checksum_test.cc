// The block digest blk-sha256 (docs/checksum.md): the vectors published
// there, computed by the engine from raw and qcow2 images however their
// zeros are stored; and on random shapes (cluster sizes 512 B to 2 MiB,
// data, written zeros and zero clusters at any alignment, backing chains)
// equal to BlockDigestOfFile, which computes it from the definition over the
// image's raw bytes.
#include <catch2/catch.hpp>
#include <memory>
#include <random>
#include <string>
#include <vector>

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

std::unique_ptr<Image> MustMake(const std::string& path, const std::string& format, uint64_t size,
                                uint64_t cluster_size = 65536, const std::string& backing = "") {
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
  OpenOptions o;
  o.writable = true;
  std::unique_ptr<Image> image;
  st = OpenImage(path, o, &image);
  INFO(st.ToString());
  REQUIRE(st.ok());
  return image;
}

std::string Digest(Image* image) {
  std::string hex;
  Status st = dmcow::ComputeBlockDigest(image, &hex);
  INFO(st.ToString());
  REQUIRE(st.ok());
  return hex;
}

std::string DigestOf(const std::string& path) {
  std::unique_ptr<Image> image;
  Status st = OpenImage(path, OpenOptions(), &image);
  INFO(path << ": " << st.ToString());
  REQUIRE(st.ok());
  return Digest(image.get());
}

// The vectors of docs/checksum.md.
constexpr char kEmpty0[] = "45d21853cc23baecdf86713a836e64f66246a4e386fcc075bd6c3bec5475b454";
constexpr char kZeros1M[] = "7b208f640cba6a21a5188bd99e8d0d1c0aa64b07d1f40326333158cf9e2f8b1f";
constexpr char k5a64kThenZeros1M[] = "83e8f4985ecaaaa7188df243e1703bf9cb8ae08ea70555b0c9ac99f5072b4048";
constexpr char k5aOdd100000[] = "d4d65507132c9496d458ab97637502023d813b35e3a8ba08e64ec525b3984816";
// The same file as QEMU reads it: 100,352 bytes, the partial sector read as zeros.
constexpr char k5aOddAsQemuReadsIt[] = "1179bac151e1d06e5bf0ba00e9896d113ed3a04bbaa2ca1f0acb07235a669303";
constexpr char kEmpty16T[] = "b665291557fa0bef8e710eeb730669127cf2edf64dd687d3694e52287473a40a";

TEST_CASE("the published blk-sha256 vectors, however the zeros are stored", "[checksum]") {
  TempDir tmp;
  const uint64_t MiB = 1 << 20;
  WriteWholeFile(tmp / "empty.raw", {});
  CHECK(DigestOf(tmp / "empty.raw") == kEmpty0);
  CHECK(BlockDigestOfFile(tmp / "empty.raw") == kEmpty0);
  WriteWholeFile(tmp / "odd.raw", std::vector<uint8_t>(100000, 0x5a));
  CHECK(BlockDigestOfFile(tmp / "odd.raw") == k5aOdd100000);
  CHECK(DigestOf(tmp / "odd.raw") == k5aOddAsQemuReadsIt);

  // 1 MiB of zeros: a hole, written zeros, zero clusters, in raw and qcow2.
  WriteWholeFile(tmp / "zeros.raw", std::vector<uint8_t>(MiB, 0));
  CHECK(DigestOf(tmp / "zeros.raw") == kZeros1M);
  MustRun("truncate -s 1M '" + (tmp / "hole.raw") + "'");
  CHECK(DigestOf(tmp / "hole.raw") == kZeros1M);
  {
    std::unique_ptr<Image> q = MustMake(tmp / "z.qcow2", "qcow2", MiB);
    CHECK(Digest(q.get()) == kZeros1M);
    std::vector<uint8_t> zeros(300000, 0);
    REQUIRE(q->Write(4096, zeros.data(), zeros.size()).ok());
    REQUIRE(q->WriteZeroes(512 << 10, 256 << 10).ok());
    CHECK(Digest(q.get()) == kZeros1M);
  }
  // 64 KiB of 0x5a, then zeros, in clusters of 512 B, 64 KiB and 2 MiB.
  for (uint64_t cluster : {uint64_t{512}, uint64_t{65536}, uint64_t{2} << 20}) {
    INFO("cluster " << cluster);
    std::unique_ptr<Image> q = MustMake(tmp / "d.qcow2", "qcow2", MiB, cluster);
    std::vector<uint8_t> data(65536, 0x5a);
    REQUIRE(q->Write(0, data.data(), data.size()).ok());
    CHECK(Digest(q.get()) == k5a64kThenZeros1M);
  }

  // 16 TiB: empty, and with a zeroed GiB and written zeros.
  std::unique_ptr<Image> big = MustMake(tmp / "big.qcow2", "qcow2", uint64_t{16} << 40);
  CHECK(Digest(big.get()) == kEmpty16T);
  REQUIRE(big->WriteZeroes(uint64_t{5} << 40, uint64_t{1} << 30).ok());
  std::vector<uint8_t> zeros(3 << 20, 0);
  REQUIRE(big->Write((uint64_t{9} << 40) + 512, zeros.data(), zeros.size()).ok());
  CHECK(Digest(big.get()) == kEmpty16T);
}

// Raw bytes of `image`, read through the engine, into a plain file.
void WriteRaw(Image* image, const std::string& path) {
  std::vector<uint8_t> content(image->virtual_size());
  REQUIRE(image->Read(0, content.data(), content.size()).ok());
  WriteWholeFile(path, content);
}

TEST_CASE("blk-sha256 of random shapes equals the definition over the raw bytes", "[checksum]") {
  TempDir tmp;
  for (uint64_t seed = 1; seed <= 30; seed++) {
    std::mt19937_64 rng(seed);
    const uint64_t cluster = uint64_t{512} << (rng() % 13);
    const uint64_t size = 512 * (1 + rng() % (12 << 11));  // up to 12 MiB, any sector count
    std::string backing;
    if (rng() % 3 == 0) {
      backing = tmp / "base.qcow2";
      // Sometimes shorter than the top: past its end the chain reads zeros.
      const uint64_t base_size = rng() % 2 ? size : size / 2 / 512 * 512 + 512;
      std::unique_ptr<Image> base = MustMake(backing, "qcow2", base_size);
      std::vector<uint8_t> data = MixedData(rng, std::min<uint64_t>(base_size, 1 << 20));
      REQUIRE(base->Write(0, data.data(), data.size()).ok());
      REQUIRE(base->Flush().ok());
    }
    std::unique_ptr<Image> q = MustMake(tmp / "top.qcow2", "qcow2", size, cluster, backing);
    for (int i = 0; i < 12; i++) {
      const uint64_t at = 512 * (rng() % (size / 512));
      const uint64_t len = std::min<uint64_t>(size - at, 512 * (1 + rng() % 400));
      switch (rng() % 3) {
        case 0: REQUIRE(q->WriteZeroes(at, len).ok()); break;
        case 1: {
          std::vector<uint8_t> zeros(len, 0);
          REQUIRE(q->Write(at, zeros.data(), zeros.size()).ok());
          break;
        }
        default: {
          std::vector<uint8_t> data = MixedData(rng, len);
          REQUIRE(q->Write(at, data.data(), data.size()).ok());
        }
      }
    }
    REQUIRE(q->Flush().ok());
    INFO("seed " << seed << ", cluster " << cluster << ", size " << size << (backing.empty() ? "" : ", backed"));
    WriteRaw(q.get(), tmp / "flat.raw");
    CHECK(Digest(q.get()) == BlockDigestOfFile(tmp / "flat.raw"));
    CHECK(DigestOf(tmp / "flat.raw") == BlockDigestOfFile(tmp / "flat.raw"));
    // The same bytes as a raw file with holes next to data (SEEK_DATA).
    MustRun("rm -f '" + (tmp / "holes.raw") + "' && cp --sparse=always '" + (tmp / "flat.raw") + "' '" +
            (tmp / "holes.raw") + "'");
    CHECK(DigestOf(tmp / "holes.raw") == BlockDigestOfFile(tmp / "flat.raw"));
  }
}

}  // namespace
