// DecompressCluster on deflate streams shaped as QEMU stores them: a 4 KiB
// window, sector-rounded with trailing slack, and the edge cases where the
// fast path (libdeflate, whole streams only) hands over to ISA-L's inflate
// (a stream that goes on past the cluster: QEMU accepts a full cluster, as
// zlib's Z_BUF_ERROR with no room left). Refusals: short output, garbage.
#include <catch2/catch.hpp>

#include <random>
#include <vector>

#include "image/decompress.h"
#include "test_util.h"

using namespace dmcow;
using dmcow_test::MixedData;
using dmcow_test::QemuDeflate;

namespace {

constexpr size_t kCluster = 65536;

bool Decompresses(const std::vector<uint8_t>& in, const uint8_t* expect) {
  std::vector<uint8_t> out(kCluster, 0xcc);
  Status s = DecompressCluster(CompressionType::kDeflate, in.data(), in.size(), out.data(), out.size());
  if (!s.ok()) return false;
  return std::equal(out.begin(), out.end(), expect);
}

}  // namespace

TEST_CASE("DecompressCluster: QEMU-shaped deflate streams, slack, overlong and short streams", "[compress]") {
  std::mt19937_64 rng(11);
  const std::vector<uint8_t> data = MixedData(rng, 2 * kCluster);
  const std::vector<uint8_t> first(data.begin(), data.begin() + kCluster);

  std::vector<uint8_t> stream = QemuDeflate(first);
  CHECK(Decompresses(stream, first.data()));
  std::vector<uint8_t> slack = stream;
  slack.resize((stream.size() + 511) / 512 * 512 + 512, 0xa5);  // sector-rounded, then junk
  CHECK(Decompresses(slack, first.data()));

  // Two clusters' worth in one stream: the first cluster is what counts.
  CHECK(Decompresses(QemuDeflate(data), first.data()));
  // A stream cut after the cluster's worth of output (no end-of-stream block).
  std::vector<uint8_t> longer = QemuDeflate(data);
  longer.resize(longer.size() * 3 / 4);
  CHECK(Decompresses(longer, first.data()));

  // Half a cluster of output, or a stream cut early: refused.
  std::vector<uint8_t> half = QemuDeflate(std::vector<uint8_t>(first.begin(), first.begin() + kCluster / 2));
  CHECK_FALSE(Decompresses(half, first.data()));
  std::vector<uint8_t> cut = stream;
  cut.resize(stream.size() / 2);
  CHECK_FALSE(Decompresses(cut, first.data()));
  CHECK_FALSE(Decompresses(std::vector<uint8_t>(4096, 0xff), first.data()));
  CHECK_FALSE(Decompresses(std::vector<uint8_t>(), first.data()));
}
