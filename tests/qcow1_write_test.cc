// qcow v1 writes beyond what the random and crash tests reach: compressed
// clusters stored through WriteCompressedCluster (QEMU must read them), the
// payloads and calls such an image must refuse, hostile tables that a
// write must not follow onto metadata, and the block-device calls
// (qcow/src/qcow1/qcow1_device.cc) on hostile tables and foreign offsets.
#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "dmcow/compress.h"
#include "dmcow/image.h"
#include "dmcow/mem_env.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;
using nlohmann::json;

namespace {

uint64_t Load64(const std::vector<uint8_t>& f, uint64_t at) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = (v << 8) | f.at(at + i);
  return v;
}
void Store64(std::vector<uint8_t>* f, uint64_t at, uint64_t v) {
  for (int i = 7; i >= 0; i--, v >>= 8) f->at(at + i) = static_cast<uint8_t>(v);
}

// A 1 GiB qcow v1 image with 4 KiB clusters in which QEMU wrote guest
// clusters 0 and 2, and where its L1 table (4 KiB at 48), first L2 table and
// first data cluster lie.
struct QemuQcow1 {
  std::vector<uint8_t> bytes;
  uint64_t l1 = 0, l2 = 0, data = 0;
};
QemuQcow1 MakeQemuQcow1(const TempDir& dir) {
  MustRun("cd '" + dir.path() +
          "' && qemu-img create -q -f qcow img.qcow 1G && "
          "qemu-io -t unsafe -f qcow -c 'write -P 1 0 4k' -c 'write -P 2 8k 4k' img.qcow >/dev/null");
  QemuQcow1 q;
  q.bytes = ReadWholeFile(dir / "img.qcow");
  q.l1 = Load64(q.bytes, 40);
  REQUIRE(q.l1 == 48);
  q.l2 = Load64(q.bytes, q.l1);
  REQUIRE(q.l2 != 0);
  q.data = Load64(q.bytes, q.l2);
  REQUIRE(q.data != 0);
  return q;
}

}  // namespace

TEST_CASE("qcow v1: clusters stored compressed by the engine are read by QEMU", "[qemu][qcow1]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  // 1 MiB and one sector: the last cluster is short, stored padded.
  const uint64_t size = (1 << 20) + 512, cs = 4096;
  MustRun("cd '" + dir.path() + "' && qemu-img create -q -f qcow img.qcow " + std::to_string(size));
  const std::string img = dir / "img.qcow";
  std::vector<uint8_t> ref(size, 0);
  std::vector<uint64_t> compressed;  // guest offsets expected to stay compressed
  std::mt19937_64 rng(7);
  const int levels[] = {0, 1, 3, 9};  // zlib 6, igzip 1 and 3, zlib 9
  int stored = 0, incompressible = 0;
  {
    std::unique_ptr<Image> image = MustOpenWritable(img);
    REQUIRE(image->info().cluster_size == cs);
    auto store = [&](uint64_t guest, const std::vector<uint8_t>& cluster, int level) {
      std::vector<uint8_t> payload;
      CompressionSettings settings;
      settings.level = level;
      const uint64_t n = std::min<uint64_t>(cs, size - guest);
      if (CompressCluster(settings, cluster.data(), cs, &payload)) {
        Status s = image->WriteCompressedCluster(guest, payload.data(), payload.size());
        INFO(s.ToString());
        REQUIRE(s.ok());
        stored++;
      } else {
        REQUIRE(image->Write(guest, cluster.data(), n).ok());
        incompressible++;
      }
      std::memcpy(ref.data() + guest, cluster.data(), n);
    };
    // Clusters 0-59 (every third one left alone), in two L2 tables' worth of
    // order: backwards, so payloads land in the file out of guest order.
    for (int i = 59; i >= 0; i--) {
      if (i % 3 == 2) continue;
      std::vector<uint8_t> cluster = MixedData(rng, cs);
      if (i % 10 == 0) std::fill(cluster.begin(), cluster.end(), static_cast<uint8_t>(i));
      store(i * cs, cluster, levels[i % 4]);
    }
    // The short last cluster.
    std::vector<uint8_t> last(cs, 0);
    std::fill(last.begin(), last.begin() + 512, 0x5a);
    store(size / cs * cs, last, 0);
    // A compressed cluster replaced by another, and one partly overwritten
    // (copy on write out of the compressed cluster into a new one).
    std::vector<uint8_t> again = MixedData(rng, cs);
    std::fill(again.begin(), again.begin() + 2000, 'q');
    store(3 * cs, again, 0);
    std::vector<uint8_t> patch(100, 0xee);
    REQUIRE(image->Write(4 * cs + 1000, patch.data(), patch.size()).ok());
    std::memcpy(ref.data() + 4 * cs + 1000, patch.data(), patch.size());
    REQUIRE(image->Flush().ok());

    // The engine's own view, before closing.
    std::vector<uint8_t> got(size);
    REQUIRE(image->Read(0, got.data(), got.size()).ok());
    REQUIRE(got == ref);
  }
  REQUIRE(stored >= 30);
  WriteWholeFile(dir / "ref.raw", ref);

  std::string out;
  int rc = Run("cd '" + dir.path() + "' && qemu-img compare -f raw -F qcow ref.raw img.qcow", &out);
  INFO("qemu-img compare: " << out);
  CHECK(rc == 0);
  rc =
      Run("cd '" + dir.path() + "' && qemu-img convert -f qcow -O raw img.qcow back.raw && cmp ref.raw back.raw", &out);
  INFO("qemu-img convert, cmp: " << out);
  CHECK(rc == 0);

  // Which clusters are compressed: ours says so; QEMU's map has no
  // compressed flag for qcow v1 and shows them as data without an offset.
  OpenOptions options;
  std::unique_ptr<Image> image;
  REQUIRE(OpenImage(img, options, &image).ok());
  rc = Run("cd '" + dir.path() + "' && qemu-img map -f qcow --output=json img.qcow", &out);
  REQUIRE(rc == 0);
  json map = json::parse(out, nullptr, false);
  REQUIRE(map.is_array());
  auto qemu_extent = [&](uint64_t guest) {
    for (const json& e : map) {
      if (e["start"].get<uint64_t>() <= guest && guest < e["start"].get<uint64_t>() + e["length"].get<uint64_t>())
        return e;
    }
    FAIL("qemu-img map does not cover " << guest);
    return json();
  };
  int seen_compressed = 0;
  for (uint64_t guest = 0; guest < size; guest += cs) {
    MapExtent m;
    REQUIRE(GetMapExtent(image.get(), guest, cs, &m).ok());
    const uint64_t i = guest / cs;
    const bool untouched = i < 60 && i % 3 == 2;
    const bool beyond = i >= 60 && guest != size / cs * cs;
    const json q = qemu_extent(guest);
    INFO("cluster " << i << " qemu-img map: " << q.dump());
    if (untouched || beyond) {
      CHECK_FALSE(m.present);
      CHECK_FALSE(q["present"].get<bool>());
    } else if (i == 4) {  // copied out of its compressed cluster by the partial write
      CHECK_FALSE(m.compressed);
      CHECK(m.has_offset);
      CHECK(q.contains("offset"));
    } else if (m.compressed) {
      seen_compressed++;
      CHECK(q["data"].get<bool>());
      CHECK_FALSE(q.contains("offset"));
    }
  }
  CHECK(seen_compressed == stored - 2);  // stored counts cluster 3 twice; cluster 4 was rewritten
}

TEST_CASE("qcow v1: WriteCompressedCluster refuses what the image cannot hold", "[qcow1]") {
  TempDir dir;
  MustRun("cd '" + dir.path() + "' && qemu-img create -q -f qcow img.qcow 64k");
  const std::string img = dir / "img.qcow";
  const uint64_t cs = 4096;
  std::vector<uint8_t> cluster(cs, 'x'), payload;
  REQUIRE(CompressCluster(CompressionSettings{}, cluster.data(), cs, &payload));
  {
    OpenOptions options;
    std::unique_ptr<Image> ro;
    REQUIRE(OpenImage(img, options, &ro).ok());
    CHECK(ro->WriteCompressedCluster(0, payload.data(), payload.size()).IsNotSupported());
  }
  std::unique_ptr<Image> image = MustOpenWritable(img);
  CHECK(image->WriteCompressedCluster(512, payload.data(), payload.size()).code() ==
        Status::Code::kInvalidArgument);  // not aligned
  CHECK(image->WriteCompressedCluster(64 << 10, payload.data(), payload.size()).code() ==
        Status::Code::kInvalidArgument);  // past the end
  CHECK(image->WriteCompressedCluster(0, payload.data(), 0).code() == Status::Code::kInvalidArgument);
  std::vector<uint8_t> big(cs, 0);
  CHECK(image->WriteCompressedCluster(0, big.data(), big.size()).code() ==
        Status::Code::kInvalidArgument);  // not smaller than a cluster
  // qcow v1 holds raw deflate only: a zstd payload, or a deflate stream cut
  // short, would make a cluster no one can read.
  std::vector<uint8_t> zstd;
  CompressionSettings zs;
  zs.type = "zstd";
  REQUIRE(CompressCluster(zs, cluster.data(), cs, &zstd));
  Status s = image->WriteCompressedCluster(0, zstd.data(), zstd.size());
  CHECK(s.code() == Status::Code::kInvalidArgument);
  CHECK(s.message().find(img) != std::string::npos);
  CHECK(image->WriteCompressedCluster(0, payload.data(), payload.size() / 2).code() == Status::Code::kInvalidArgument);
  // Nothing of that reached the image.
  std::vector<uint8_t> got(cs);
  REQUIRE(image->Read(0, got.data(), got.size()).ok());
  CHECK(std::all_of(got.begin(), got.end(), [](uint8_t b) { return b == 0; }));
  REQUIRE(image->WriteCompressedCluster(0, payload.data(), payload.size()).ok());
  REQUIRE(image->Read(0, got.data(), got.size()).ok());
  CHECK(got == cluster);
}

TEST_CASE("qcow v1: writes do not follow hostile tables onto metadata", "[qcow1]") {
  TempDir dir;
  // 1 GiB with 4 KiB clusters: an L1 table of 512 entries (4 KiB at 48).
  // One cluster written by QEMU gives an L2 table and a data cluster.
  const QemuQcow1 q = MakeQemuQcow1(dir);
  const std::vector<uint8_t>& good = q.bytes;
  const uint64_t l1 = q.l1, l2 = q.l2, data = q.data;
  const std::string path = "/img/h.qcow";

  struct Case {
    const char* name;
    std::function<void(std::vector<uint8_t>*)> mutate;
    const char* expect;  // in the error message
  };
  const Case cases[] = {
      {"data cluster inside the L1 table", [&](auto* f) { Store64(f, l2, 1024); }, "overlaps the image's metadata"},
      {"data cluster on its own L2 table", [&](auto* f) { Store64(f, l2, l2); }, "overlaps the image's metadata"},
      {"L2 table over the header", [&](auto* f) { Store64(f, l1, 8); }, "overlaps the header or the L1 table"},
      {"data cluster offset out of range", [&](auto* f) { Store64(f, l2, 0x7ffffffffffffe00ULL); }, "out of range"},
      {"data cluster not sector aligned", [&](auto* f) { Store64(f, l2, data + 1); }, "not sector aligned"},
      {"compressed cluster of garbage", [&](auto* f) { Store64(f, l2, (1ULL << 63) | (100ULL << 51) | data); },
       "compressed cluster"},
  };
  for (const Case& c : cases) {
    SECTION(c.name) {
      std::vector<uint8_t> bytes = good;
      c.mutate(&bytes);
      MemEnv env;
      env.PutFile(path, bytes);
      std::unique_ptr<Image> image = MustOpenWritable(path, &env);
      std::vector<uint8_t> buf(100, 0xab);
      Status s = image->Write(10, buf.data(), buf.size());
      INFO(s.ToString());
      CHECK(s.IsCorrupt());
      CHECK(s.message().find(path) != std::string::npos);
      CHECK(s.message().find(c.expect) != std::string::npos);
      CHECK(image->Flush().ok());
      image.reset();
      std::vector<uint8_t> after;
      REQUIRE(env.GetFile(path, &after));
      CHECK(after == bytes);
    }
  }

  SECTION("an L2 table offset out of range, met by a compressed write") {
    // WriteCompressedCluster replaces the entry without reading it first.
    std::vector<uint8_t> bytes = good;
    Store64(&bytes, l1, 0xfffffffffffff000ULL);
    MemEnv env;
    env.PutFile(path, bytes);
    std::unique_ptr<Image> image = MustOpenWritable(path, &env);
    std::vector<uint8_t> cluster(4096, 'z'), payload;
    REQUIRE(CompressCluster(CompressionSettings{}, cluster.data(), cluster.size(), &payload));
    Status s = image->WriteCompressedCluster(0, payload.data(), payload.size());
    INFO(s.ToString());
    CHECK(s.IsCorrupt());
    CHECK(s.message().find("out of range") != std::string::npos);
    image.reset();
    std::vector<uint8_t> after;
    REQUIRE(env.GetFile(path, &after));
    CHECK(after == bytes);
  }

  SECTION("a cluster beyond the end of the file is reserved before anything is appended") {
    // Guest cluster 0 points 16 clusters past the end of the file, sector
    // but not cluster aligned (it reads as zeros there, as in QEMU). Writing
    // its first sector in place makes it part of the file; clusters appended
    // later (cluster aligned) must not land on any of it.
    std::vector<uint8_t> bytes = good;
    const uint64_t beyond = (bytes.size() + 4095) / 4096 * 4096 + 16 * 4096 + 512;
    Store64(&bytes, l2, beyond);
    MemEnv env;
    env.PutFile(path, bytes);
    std::vector<uint8_t> want(64 * 4096, 0);
    {
      std::unique_ptr<Image> image = MustOpenWritable(path, &env);
      std::vector<uint8_t> head(512, 0x11);
      REQUIRE(image->Write(0, head.data(), head.size()).ok());
      std::copy(head.begin(), head.end(), want.begin());
      std::mt19937_64 rng(3);
      std::vector<uint8_t> rest = MixedData(rng, 40 * 4096);
      REQUIRE(image->Write(4096, rest.data(), rest.size()).ok());
      std::copy(rest.begin(), rest.end(), want.begin() + 4096);
      REQUIRE(image->Flush().ok());
    }
    OpenOptions options;
    options.env = &env;
    std::unique_ptr<Image> image;
    REQUIRE(OpenImage(path, options, &image).ok());
    std::vector<uint8_t> got(want.size());
    REQUIRE(image->Read(0, got.data(), got.size()).ok());
    const size_t diff = std::mismatch(got.begin(), got.end(), want.begin()).first - got.begin();
    INFO("first difference at guest offset " << diff);
    CHECK(diff == got.size());
  }
}

TEST_CASE("qcow v1: reads run alongside writes and see whole clusters", "[qcow1]") {
  // Every write covers whole clusters with one byte value, so a reader that
  // ever sees a cluster of mixed values has raced a writer (or a table
  // change). Run it under the sanitize build to catch memory errors too.
  TempDir dir;
  MustRun("cd '" + dir.path() + "' && qemu-img create -q -f qcow img.qcow 4M");
  const uint64_t cs = 4096, clusters = 1024;
  OpenOptions options;
  options.writable = true;
  options.l2_cache_bytes = 8 << 10;  // evictions and forced flushes while readers read
  std::unique_ptr<Image> image;
  REQUIRE(OpenImage(dir / "img.qcow", options, &image).ok());
  std::atomic<bool> done{false};
  std::atomic<int> mixed{0}, errors{0};
  auto reader = [&](uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<uint8_t> buf(16 * cs);
    while (!done.load()) {
      const uint64_t first = rng() % (clusters - 16);
      if (!image->Read(first * cs, buf.data(), buf.size()).ok()) errors++;
      for (uint64_t c = 0; c < 16; c++) {
        const uint8_t* p = buf.data() + c * cs;
        if (!std::all_of(p, p + cs, [&](uint8_t b) { return b == p[0]; })) mixed++;
      }
    }
  };
  std::thread r1(reader, 1), r2(reader, 2);
  std::mt19937_64 rng(9);
  std::vector<uint8_t> cluster(cs), payload;
  for (int op = 0; op < 3000; op++) {
    const uint64_t c = rng() % clusters;
    const uint64_t n = 1 + rng() % 4;
    const uint8_t value = static_cast<uint8_t>(1 + rng() % 255);
    const uint64_t kind = rng() % 10;
    Status s;
    if (kind < 5) {
      std::vector<uint8_t> data(std::min(n, clusters - c) * cs, value);
      s = image->Write(c * cs, data.data(), data.size());
    } else if (kind < 8) {
      std::fill(cluster.begin(), cluster.end(), value);
      REQUIRE(CompressCluster(CompressionSettings{}, cluster.data(), cs, &payload));
      s = image->WriteCompressedCluster(c * cs, payload.data(), payload.size());
    } else if (kind < 9) {
      s = image->WriteZeroes(c * cs, std::min(n, clusters - c) * cs);
    } else {
      s = image->Flush();
    }
    if (!s.ok()) FAIL(s.ToString());
  }
  done = true;
  r1.join();
  r2.join();
  CHECK(errors.load() == 0);
  CHECK(mixed.load() == 0);
  REQUIRE(image->Flush().ok());
}

// The calls dmcowd's plugin makes (qcow/src/qcow1/qcow1_device.cc) on
// hostile tables and on offsets the image did not hand out.
TEST_CASE("qcow v1: device calls on hostile tables and foreign offsets", "[qcow1]") {
  TempDir dir;
  const QemuQcow1 q = MakeQemuQcow1(dir);
  const std::vector<uint8_t>& good = q.bytes;
  const uint64_t l1 = q.l1, l2 = q.l2, data = q.data;
  const std::string path = "/img/d.qcow";
  using Place = DeviceImage::ClusterPlace;
  auto describe = [](Image* image, uint64_t cluster) {
    Place p;
    Status s = Device(image)->DescribeCluster(cluster, &p);
    INFO(s.ToString());
    REQUIRE(s.ok());
    return p;
  };
  auto open = [&](const std::vector<uint8_t>& bytes, MemEnv* env) {
    env->PutFile(path, bytes);
    return MustOpenWritable(path, env);
  };

  SECTION("what QEMU wrote: exclusive data, unallocated, compressed") {
    std::vector<uint8_t> bytes = good;
    Store64(&bytes, l2 + 8 * 5, (1ULL << 63) | (100ULL << 51) | data);  // a compressed descriptor
    MemEnv env;
    std::unique_ptr<Image> image = open(bytes, &env);
    Place p = describe(image.get(), 0);
    CHECK(p.state == ClusterState::kData);
    CHECK(p.exclusive);
    CHECK_FALSE(p.partial);
    CHECK(p.host_offset == data);
    CHECK(describe(image.get(), 1).state == ClusterState::kUnallocated);
    CHECK(describe(image.get(), 5).state == ClusterState::kCompressed);
    CHECK(describe(image.get(), 200000).state == ClusterState::kUnallocated);  // no L2 table
    Place out;
    CHECK(Device(image)->DescribeCluster((1ULL << 30) / 4096, &out).code() == Status::Code::kInvalidArgument);
  }
  SECTION("data over the L1 table or an L2 table is never writable in place") {
    for (uint64_t target : {uint64_t{1024}, l2}) {
      std::vector<uint8_t> bytes = good;
      Store64(&bytes, l2, target);
      MemEnv env;
      std::unique_ptr<Image> image = open(bytes, &env);
      Place p = describe(image.get(), 0);
      CHECK(p.state == ClusterState::kData);
      CHECK_FALSE(p.exclusive);
    }
  }
  SECTION("data past the end of the file is assembled, not mapped") {
    std::vector<uint8_t> bytes = good;
    Store64(&bytes, l2, (bytes.size() + 4095) / 4096 * 4096 + 16 * 4096);
    MemEnv env;
    std::unique_ptr<Image> image = open(bytes, &env);
    Place p = describe(image.get(), 0);
    CHECK(p.state == ClusterState::kData);
    CHECK(p.partial);
    CHECK_FALSE(p.exclusive);
  }
  SECTION("misaligned, overflowing entries and tables are errors naming the file") {
    const std::pair<uint64_t, uint64_t> bad[] = {
        {l2, data + 1}, {l2, 0x7ffffffffffffe00ULL}, {l1, 0xfffffffffffff000ULL}};
    for (const auto& [at, value] : bad) {
      std::vector<uint8_t> bytes = good;
      Store64(&bytes, at, value);
      MemEnv env;
      std::unique_ptr<Image> image = open(bytes, &env);
      Place p;
      Status s = Device(image)->DescribeCluster(0, &p);
      INFO(s.ToString());
      CHECK(s.IsCorrupt());
      CHECK(s.message().find(path) != std::string::npos);
    }
  }
  SECTION("reserve, fill, link; foreign offsets refused") {
    MemEnv env;
    std::unique_ptr<Image> image = open(good, &env);
    uint64_t host = 0;
    CHECK(Device(image)->ReserveClusters(0, &host).code() == Status::Code::kInvalidArgument);
    CHECK(Device(image)->ReserveClusters(1025, &host).code() == Status::Code::kInvalidArgument);
    REQUIRE(Device(image)->ReserveClusters(1, &host).ok());
    CHECK(host % 4096 == 0);
    CHECK(host >= good.size());
    CHECK(Device(image)->AllocationEnd() >= host + 4096);
    // Space the image did not append: existing data, the header, beyond the end.
    for (uint64_t foreign : std::vector<uint64_t>{data, 0, host + 4096, host + 512, 0xfffffffffffff000ULL}) {
      INFO("host offset " << foreign);
      CHECK(Device(image)->FillClusters(2, 1, foreign).code() == Status::Code::kInvalidArgument);
      CHECK(Device(image)->LinkClusters(2, 1, foreign).code() == Status::Code::kInvalidArgument);
    }
    CHECK(Device(image)->LinkClusters((1ULL << 30) / 4096, 1, host).code() == Status::Code::kInvalidArgument);
    CHECK(Device(image)->LinkClusters(0, 0, host).code() == Status::Code::kInvalidArgument);
    // Guest cluster 2 (pattern 2) copied into the new cluster and linked.
    REQUIRE(Device(image)->FillClusters(2, 1, host).ok());
    REQUIRE(Device(image)->LinkClusters(2, 1, host).ok());
    REQUIRE(image->Flush().ok());
    uint64_t spare = 0;
    REQUIRE(Device(image)->ReserveClusters(2, &spare).ok());
    CHECK(spare >= host + 4096);
    CHECK(Device(image)->UnreserveClusters(2, spare).ok());  // dead space: nothing to give back
    CHECK(Device(image)->UnreserveClusters(1, data).code() == Status::Code::kInvalidArgument);
    image.reset();
    OpenOptions options;
    options.env = &env;
    REQUIRE(OpenImage(path, options, &image).ok());
    Place p = describe(image.get(), 2);
    CHECK(p.host_offset == host);
    CHECK(p.exclusive);
    std::vector<uint8_t> got(4096);
    REQUIRE(image->Read(8192, got.data(), got.size()).ok());
    CHECK(std::count(got.begin(), got.end(), 2) == 4096);
    // Read-only: nothing to reserve.
    CHECK(Device(image)->ReserveClusters(1, &spare).IsNotSupported());
  }
}
