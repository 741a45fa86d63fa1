// The qcow2 plugin's decisions against the real qemu-img: a model of the
// kernel target (docs/abi.md section 3: mapping kinds, fills, held writes)
// drives Qcow2Mapper with seeded reads, writes and flushes on images that
// qemu-img made (empty, compressed, snapshots, zero clusters, subclusters,
// backing files, 512-byte clusters; and legacy qcow v1 images: empty, with
// data, compressed, over a raw and over a qcow v1 backing file); every read
// is checked against a raw reference that received the same writes, and
// after each detach the image must pass `qemu-img check` (no errors, no
// leaks) and `qemu-img compare` equal to the reference. qemu-img cannot
// check qcow v1 images: for those, `qemu-img compare` and `qemu-img convert
// -O raw` must succeed and `dmcow-img check` must find no errors. The VM tests (tests/vm) run the same plugin in
// the real kernel; this one reaches many more shapes and operations.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <set>

#include <sys/stat.h>
#include <catch2/catch.hpp>
#include "dmcow/image.h"
#include "kernel_model.h"
#include "qcow2/qcow2_mapper.h"
#include "test_util.h"

using dmcowd::Qcow2Mapper;
using dmcowd::Status;
using dmcowd_test::KernelModel;
using namespace dmcow_test;

namespace {

struct Shape {
  const char* name;
  std::string setup;  // shell commands run in the temp dir; must make img.qcow2 (img.qcow for v1)
  bool has_backing = false;
  bool v1 = false;  // legacy qcow (version 1)
};

void Session(const std::string& path, bool has_backing, std::mt19937_64& rng, int ops, std::vector<uint8_t>* ref) {
  dmcow::OpenOptions o;
  o.writable = true;
  std::unique_ptr<dmcow::Image> image;
  Status s = dmcow::OpenImage(path, o, &image);
  REQUIRE(s.ok());
  {
    struct stat st;
    REQUIRE(::stat(path.c_str(), &st) == 0);
    std::unique_ptr<dmcow::File> file;
    REQUIRE(dmcow::Env::Default()->OpenFile(path, dmcow::OpenMode::kReadWrite, &file).ok());
    KernelModel kernel(file.get(), image->backing(), image->virtual_size());
    REQUIRE(kernel.EnsureImageBytes(static_cast<uint64_t>(st.st_size) & ~uint64_t{511}).ok());
    Qcow2Mapper mapper(image.get(), &kernel, true, has_backing);
    REQUIRE(mapper.Init().ok());
    kernel.Attach(&mapper);
    const uint64_t size = image->virtual_size();
    for (int i = 0; i < ops; i++) {
      const int what = static_cast<int>(rng() % 10);
      uint64_t len = 1 + rng() % (what < 2 ? 3 * 65536 : 9000);
      uint64_t off = rng() % size;
      if (rng() % 3 == 0) off &= ~uint64_t{4095}, len = (len + 4095) & ~uint64_t{4095};
      len = std::min(len, size - off);
      if (what < 5) {
        std::vector<uint8_t> data = MixedData(rng, len);
        REQUIRE(kernel.Write(off, data.data(), len).ok());
        std::memcpy(ref->data() + off, data.data(), len);
      } else if (what < 9) {
        std::vector<uint8_t> got(len);
        REQUIRE(kernel.Read(off, got.data(), len).ok());
        INFO("read at " << off << " +" << len);
        REQUIRE(std::memcmp(got.data(), ref->data() + off, len) == 0);
      } else {
        REQUIRE(kernel.Flush().ok());
      }
    }
    REQUIRE(kernel.Flush().ok());
    // Every byte through the device equals the reference.
    std::vector<uint8_t> all(size);
    REQUIRE(kernel.Read(0, all.data(), size).ok());
    const bool device_equals_reference = all == *ref;
    REQUIRE(device_equals_reference);
  }
  REQUIRE(image->Flush().ok());
  image.reset();
}

}  // namespace

TEST_CASE("qcow2 plugin decisions keep qemu-made images consistent") {
  SKIP_WITHOUT_QEMU();
  const std::vector<Shape> shapes = {
      {"empty v3 64K", "qemu-img create -q -f qcow2 img.qcow2 8M"},
      {"empty v2 512-byte clusters", "qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 img.qcow2 3M"},
      {"2K clusters, data and zeros",
       "qemu-img create -q -f qcow2 -o cluster_size=2048 img.qcow2 4M && "
       "qemu-io -f qcow2 -c 'write -P 0x11 0 1M' -c 'write -z 64k 64k' -c 'write -P 0x22 2050k 7k' img.qcow2 "
       ">/dev/null"},
      {"data, zero clusters, discards",
       "qemu-img create -q -f qcow2 img.qcow2 8M && "
       "qemu-io -f qcow2 -c 'write -P 0x5a 0 3M' -c 'write -z 1M 512k' -c 'discard 2M 256k' -c 'write -P 7 5M 100k' "
       "img.qcow2 >/dev/null"},
      {"zlib compressed",
       "qemu-img create -q -f raw src.raw 8M && qemu-io -f raw -c 'write -P 0x33 0 2M' -c 'write -P 0x44 3M 1M' "
       "src.raw >/dev/null && "
       "qemu-img convert -c -O qcow2 src.raw img.qcow2"},
      {"zstd compressed 4K clusters",
       "qemu-img create -q -f raw src.raw 4M && qemu-io -f raw -c 'write -P 0x61 0 1M' -c 'write -P 0x62 2M 600k' "
       "src.raw >/dev/null && "
       "qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=4096 src.raw img.qcow2"},
      {"internal snapshot (shared clusters)",
       "qemu-img create -q -f qcow2 img.qcow2 8M && qemu-io -f qcow2 -c 'write -P 1 0 4M' img.qcow2 >/dev/null && "
       "qemu-img snapshot -c snap img.qcow2 && qemu-io -f qcow2 -c 'write -P 2 1M 64k' img.qcow2 >/dev/null"},
      {"raw backing",
       "qemu-img create -q -f raw base.raw 6M && qemu-io -f raw -c 'write -P 0x77 0 6M' base.raw >/dev/null && "
       "qemu-img create -q -f qcow2 -b base.raw -F raw img.qcow2 8M && qemu-io -f qcow2 -c 'write -P 9 1M 64k' "
       "img.qcow2 >/dev/null",
       true},
      {"qcow2 backing, extended L2 overlay with partial clusters",
       "qemu-img create -q -f qcow2 base.qcow2 8M && qemu-io -f qcow2 -c 'write -P 0x31 0 8M' base.qcow2 >/dev/null && "
       "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 -o extended_l2=on,cluster_size=128k img.qcow2 8M && "
       "qemu-io -f qcow2 -c 'write -P 0x32 4k 4k' -c 'write -z 200k 8k' -c 'write -z 512k 256k' -c 'write -P 0x33 1M "
       "256k' img.qcow2 >/dev/null",
       true},
      {"lazy refcounts",
       "qemu-img create -q -f qcow2 -o lazy_refcounts=on img.qcow2 8M && qemu-io -f qcow2 -c 'write -P 3 0 1M' "
       "img.qcow2 >/dev/null"},
      // Legacy qcow v1: qemu-img makes 4 KiB clusters, 512-byte ones over a
      // backing file (chunks of 4 KiB hold 8), appended one by one at the end
      // of the file, often not 4 KiB aligned.
      {"qcow v1 empty", "qemu-img create -q -f qcow img.qcow 8M", false, true},
      {"qcow v1 data",
       "qemu-img create -q -f qcow img.qcow 8M && "
       "qemu-io -f qcow -c 'write -P 0x11 0 1M' -c 'write -P 0x22 3073k 7k' -c 'write -P 0x23 6M 100k' img.qcow "
       ">/dev/null",
       false, true},
      {"qcow v1 compressed",
       "qemu-img create -q -f raw src.raw 8M && qemu-io -f raw -c 'write -P 0x33 0 2M' -c 'write -P 0x44 3M 1M' "
       "src.raw >/dev/null && "
       // qemu-img 7.2 'convert -c -O qcow' writes everything, then exits 1
       // without a message (as fixtures/regenerate.sh notes): checked by compare.
       "(qemu-img convert -c -O qcow src.raw img.qcow || true) && qemu-img compare -q -F raw img.qcow src.raw",
       false, true},
      {"qcow v1 raw backing",
       "qemu-img create -q -f raw base.raw 6M && qemu-io -f raw -c 'write -P 0x77 0 6M' base.raw >/dev/null && "
       "qemu-img create -q -f qcow -b base.raw -F raw img.qcow 8M && qemu-io -f qcow -c 'write -P 9 1M 64k' img.qcow "
       ">/dev/null",
       true, true},
      {"qcow v1 over a qcow v1 backing",
       "qemu-img create -q -f raw src.raw 8M && qemu-io -f raw -c 'write -P 0x31 0 5M' src.raw >/dev/null && "
       "(qemu-img convert -c -O qcow src.raw base.qcow || true) && qemu-img compare -q -F raw base.qcow src.raw && "
       "qemu-io -f qcow -c 'write -P 0x34 6M 1M' base.qcow >/dev/null && "
       "qemu-img create -q -f qcow -b base.qcow -F qcow img.qcow 8M && "
       "qemu-io -f qcow -c 'write -P 0x32 4k 4k' -c 'write -P 0x33 1025k 3k' -c 'write -P 0x35 7M 64k' img.qcow "
       ">/dev/null",
       true, true},
  };
  uint64_t seed = 1;
  for (const Shape& shape : shapes) {
    SECTION(shape.name) {
      TempDir dir;
      const char* format = shape.v1 ? "qcow" : "qcow2";
      const std::string image = dir / (std::string("img.") + format);
      MustRun("cd " + dir.path() + " && " + shape.setup);
      MustRun("qemu-img convert -O raw " + image + " " + dir / "ref.raw");
      std::vector<uint8_t> ref = ReadWholeFile(dir / "ref.raw");
      std::mt19937_64 rng(seed++);
      for (int session = 0; session < 3; session++) {
        INFO(shape.name << " session " << session);
        Session(image, shape.has_backing, rng, 300, &ref);
        std::string out;
        int rc;
        if (shape.v1) {
          // qemu-img does not check qcow v1 ("does not support checks"):
          // QEMU must read it whole, and our check must find nothing wrong.
          rc = Run("qemu-img convert -O raw " + image + " " + dir / "got.raw", &out);
          INFO("qemu-img convert: " << out);
          REQUIRE(rc == 0);
          rc = Run(std::string(DMCOW_IMG_PATH) + " check " + image, &out);
          INFO("dmcow-img check: " << out);
          REQUIRE(rc == 0);
          REQUIRE(out.find("No errors were found") != std::string::npos);
        } else {
          rc = Run("qemu-img check " + image, &out);
          INFO(out);
          REQUIRE(rc == 0);
          REQUIRE(out.find("No errors were found") != std::string::npos);
          REQUIRE(out.find("leaked") == std::string::npos);
        }
        WriteWholeFile(dir / "want.raw", ref);
        rc = Run(std::string("qemu-img compare -f raw -F ") + format + " " + dir / "want.raw" + " " + image, &out);
        INFO(out);
        REQUIRE(rc == 0);
      }
      if (std::string(shape.name).find("snapshot") != std::string::npos) {
        // The snapshot still holds what it held: shared clusters were copied, not written.
        MustRun("qemu-img convert -O raw -l snap " + dir / "img.qcow2" + " " + dir / "snap.raw");
        std::vector<uint8_t> snap = ReadWholeFile(dir / "snap.raw");
        REQUIRE(snap.size() == 8u << 20);
        REQUIRE(std::count(snap.begin(), snap.begin() + (4 << 20), 1) == 4 << 20);
        REQUIRE(std::count(snap.begin() + (4 << 20), snap.end(), 0) == 4 << 20);
      }
    }
  }
}

namespace {

// The scratch area as the mapper fills it, written runs recorded.
class ScratchRecorder : public dmcowd::CowSpace {
 public:
  explicit ScratchRecorder(uint64_t scratch_bytes) : bytes(scratch_bytes) {}
  Status WriteScratch(uint64_t offset, const void* buf, size_t len) override {
    REQUIRE(offset + len <= bytes.size());
    std::memcpy(bytes.data() + offset, buf, len);
    writes.emplace_back(offset, len);
    return Status::OK();
  }
  Status EnsureImageBytes(uint64_t) override { return Status::OK(); }
  Status ReleaseScratch(uint64_t offset, uint64_t len) override {  // as a punched hole reads
    REQUIRE(offset + len <= bytes.size());
    std::memset(bytes.data() + offset, 0, len);
    released += len;
    return Status::OK();
  }
  std::vector<uint8_t> bytes;
  std::vector<std::pair<uint64_t, size_t>> writes;
  uint64_t released = 0;
};

// The mapper's answer to a request of batch 1; the call itself must work.
dmcowd::Answer MapChunk(Qcow2Mapper* mapper, uint64_t chunk, bool write = false) {
  dmcowd::MapRequest req;
  req.chunk = chunk;
  req.write = write;
  req.batch = 1;
  dmcowd::Answer a;
  REQUIRE(mapper->Map(req, &a).ok());
  return a;
}

// `data` compressed by qemu-img into DIR/img.qcow2, opened.
std::unique_ptr<dmcow::Image> CompressedImage(const TempDir& dir, const std::vector<uint8_t>& data,
                                              bool writable = false) {
  WriteWholeFile(dir / "src.raw", data);
  MustRun("cd " + dir.path() + " && qemu-img convert -c -f raw -O qcow2 src.raw img.qcow2");
  dmcow::OpenOptions o;
  o.writable = writable;
  std::unique_ptr<dmcow::Image> image;
  REQUIRE(dmcow::OpenImage(dir / "img.qcow2", o, &image).ok());
  return image;
}

}  // namespace

TEST_CASE("the scan for stable chunks, in slices between writes and flushes, finds each writable chunk once") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  // Data, zero clusters, a discard, an internal snapshot (shared clusters),
  // compressed clusters and 64 scattered single clusters: writable chunks
  // and the kinds that are not.
  std::string scattered;
  for (int i = 0; i < 64; i++)
    scattered += " -c 'write -P " + std::to_string(i + 1) + " " + std::to_string(i * 3 * 64 + 512) + "k 64k'";
  MustRun("cd " + dir.path() +
          " && qemu-img create -q -f raw src.raw 32M && qemu-io -f raw -c 'write -P 0x33 30M 1M' src.raw >/dev/null"
          " && qemu-img convert -c -O qcow2 src.raw img.qcow2"
          " && qemu-io -f qcow2 -c 'write -P 0x5a 0 3M' -c 'write -z 1M 512k' -c 'discard 2M 256k' img.qcow2 >/dev/null"
          " && qemu-img snapshot -c snap img.qcow2 && qemu-io -f qcow2 -c 'write -P 2 1M 64k'" +
          scattered + " img.qcow2 >/dev/null");
  for (uint64_t seed = 1; seed <= 4; seed++) {
    MustRun("cd " + dir.path() + " && cp img.qcow2 run.qcow2");
    dmcow::OpenOptions o;
    o.writable = true;
    std::unique_ptr<dmcow::Image> image;
    REQUIRE(dmcow::OpenImage(dir / "run.qcow2", o, &image).ok());
    struct stat st;
    REQUIRE(::stat((dir / "run.qcow2").c_str(), &st) == 0);
    std::unique_ptr<dmcow::File> file;
    REQUIRE(dmcow::Env::Default()->OpenFile(dir / "run.qcow2", dmcow::OpenMode::kReadWrite, &file).ok());
    KernelModel kernel(file.get(), nullptr, image->virtual_size());
    REQUIRE(kernel.EnsureImageBytes(static_cast<uint64_t>(st.st_size) & ~uint64_t{511}).ok());
    Qcow2Mapper mapper(image.get(), &kernel, true, false);
    REQUIRE(mapper.Init().ok());
    kernel.Attach(&mapper, false);
    const dmcowd::Qcow2Geometry geo = mapper.geometry();
    const uint64_t chunk_bytes = uint64_t{geo.chunk_sectors} * 512;
    std::mt19937_64 rng(seed);
    // Writes ahead of and behind the scan, flushed at random: chunks linked
    // and made durable before the scan reaches them are found twice.
    bool more = true;
    uint64_t slices = 0;
    const uint64_t generation0 = mapper.stable_generation();
    for (int op = 0; more || op < 40; op++) {
      const uint64_t chunk = rng() % geo.chunks;
      std::vector<uint8_t> data(4096, static_cast<uint8_t>(op));
      REQUIRE(kernel.Write(chunk * chunk_bytes + (rng() % 16) * 4096, data.data(), data.size()).ok());
      if (rng() % 3 == 0) REQUIRE(kernel.Flush().ok());
      if (more) {
        REQUIRE(mapper.ScanStable(1 + rng() % 4, &more).ok());
        slices++;
      }
    }
    REQUIRE(kernel.Flush().ok());
    INFO("seed " << seed << ", " << slices << " slices");
    CHECK(slices > 20);  // the scan was resumed many times
    CHECK(mapper.stable_generation() != generation0);
    std::vector<dmcowd::Extent> stable;
    REQUIRE(mapper.StableExtents(&stable).ok());
    // Sorted, apart, and exactly the chunks the image holds writable in
    // place (whole, exclusive, contiguous, 4 KiB-aligned data), each at its
    // place in the image.
    std::map<uint64_t, uint64_t> listed;  // chunk -> cow sector
    for (size_t i = 0; i < stable.size(); i++) {
      if (i > 0) REQUIRE(stable[i - 1].chunk + stable[i - 1].nr_chunks <= stable[i].chunk);
      for (uint64_t k = 0; k < stable[i].nr_chunks; k++)
        listed[stable[i].chunk + k] = stable[i].cow_sector + k * geo.chunk_sectors;
    }
    dmcow::DeviceImage* device = image->AsDeviceImage();
    uint64_t writable = 0;
    for (uint64_t chunk = 0; chunk < geo.chunks; chunk++) {
      dmcow::DeviceImage::ClusterPlace p;
      REQUIRE(device->DescribeCluster(chunk, &p).ok());  // 64 KiB clusters: one per chunk
      const bool in_place =
          !p.partial && p.state == dmcow::ClusterState::kData && p.exclusive && p.host_offset % 4096 == 0;
      INFO("chunk " << chunk);
      REQUIRE(listed.count(chunk) == (in_place ? 1u : 0u));
      if (in_place) {
        writable++;
        REQUIRE(listed[chunk] == geo.scratch_sectors + p.host_offset / 512);
      }
    }
    CHECK(writable > 64);
    image.reset();
  }
}

TEST_CASE("assembled chunks fill scratch in the order they are read, each once") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  // 64 chunks of 64 KiB, each compressed, each with its own content.
  std::string cmds;
  for (int c = 0; c < 64; c++)
    cmds += " -c 'write -P " + std::to_string(c + 1) + " " + std::to_string(c * 64) + "k 40k'";
  MustRun("cd " + dir.path() + " && qemu-img create -q -f raw src.raw 4M && qemu-io -f raw" + cmds +
          " src.raw >/dev/null && qemu-img convert -c -O qcow2 src.raw img.qcow2");
  const std::vector<uint8_t> ref = ReadWholeFile(dir / "src.raw");
  std::unique_ptr<dmcow::Image> image;
  REQUIRE(dmcow::OpenImage(dir / "img.qcow2", dmcow::OpenOptions(), &image).ok());
  const dmcowd::Qcow2Geometry geo = Qcow2Mapper::GeometryFor(*image);
  REQUIRE(geo.chunks == 64);
  const uint64_t chunk_bytes = uint64_t{geo.chunk_sectors} * 512;
  ScratchRecorder scratch(geo.scratch_sectors * 512);
  Qcow2Mapper mapper(image.get(), &scratch, false, false);
  REQUIRE(mapper.Init().ok());
  auto read = [&](uint64_t chunk, dmcowd::Mapping* m) {
    const dmcowd::Answer a = MapChunk(&mapper, chunk);
    REQUIRE(a.error == 0);
    REQUIRE(a.mapping.kind == dmcowd::MapKind::kRO);
    REQUIRE(a.mapping.chunk == chunk);
    *m = a.mapping;
  };
  auto holds = [&](const dmcowd::Mapping& m) {  // scratch at the mapping = the chunks' data
    const uint64_t at = m.cow_sector * 512;
    return std::memcmp(scratch.bytes.data() + at, ref.data() + m.chunk * chunk_bytes, m.nr_chunks * chunk_bytes) == 0;
  };
  // Random order: each new chunk takes the next slot, not its own place.
  const uint64_t random_order[] = {41, 7, 63, 20, 2};
  uint64_t slot = 0;
  for (uint64_t chunk : random_order) {
    dmcowd::Mapping m;
    read(chunk, &m);
    INFO("chunk " << chunk);
    REQUIRE(m.nr_chunks == 1);
    REQUIRE(m.cow_sector == slot * geo.chunk_sectors);
    REQUIRE(holds(m));
    slot++;
  }
  // Asked again: the same slot, nothing assembled twice.
  dmcowd::Mapping again;
  read(7, &again);
  REQUIRE(again.cow_sector == 1 * geo.chunk_sectors);
  REQUIRE(scratch.writes.size() == 5);
  // Reading on from chunk 3 (2 was the last assembled: sequential): runs
  // grow, 3-4 then 5-6, each at the log's end; the second stops before 7,
  // which has its slot already.
  dmcowd::Mapping m3, m4, m5;
  read(3, &m3);
  read(4, &m4);
  read(5, &m5);
  REQUIRE(m3.nr_chunks == 2);
  REQUIRE(m3.cow_sector == 5 * geo.chunk_sectors);
  REQUIRE(m4.cow_sector == 6 * geo.chunk_sectors);  // inside 3's run
  REQUIRE(m5.nr_chunks == 2);
  REQUIRE(m5.cow_sector == 7 * geo.chunk_sectors);
  REQUIRE((holds(m3) && holds(m4) && holds(m5)));
  // Every chunk read: the log ends exactly at the scratch area's end, and
  // every chunk still reads its own data.
  for (uint64_t chunk = 0; chunk < geo.chunks; chunk++) {
    dmcowd::Mapping m;
    read(chunk, &m);
    INFO("chunk " << chunk);
    REQUIRE(holds(m));
  }
  uint64_t written = 0;
  for (const auto& w : scratch.writes) written += w.second;
  REQUIRE(written == geo.scratch_sectors * 512);
}

TEST_CASE("scratch over its budget is reclaimed, oldest first, and reused") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  // 512 chunks of 64 KiB, each compressible and unlike the others (no chunk
  // reads zeros, so a stale mapping onto a punched slot shows).
  constexpr uint64_t kChunks = 512, kChunkBytes = 65536;
  std::vector<uint8_t> ref(kChunks * kChunkBytes);
  for (size_t i = 0; i < ref.size(); i++)
    ref[i] = static_cast<uint8_t>(i / kChunkBytes * 7 + 1 + (i % 97 == 0 ? i % 5 : 0));
  std::unique_ptr<dmcow::Image> image = CompressedImage(dir, ref);
  const dmcowd::Qcow2Geometry geo = Qcow2Mapper::GeometryFor(*image);
  REQUIRE(geo.chunks == kChunks);
  ScratchRecorder scratch(geo.scratch_sectors * 512);
  Qcow2Mapper mapper(image.get(), &scratch, false, false);
  REQUIRE(mapper.Init().ok());
  mapper.SetScratchBudget(4 << 20);  // 64 slots
  const uint64_t budget = 64;

  // The kernel's side: installed RO mappings, forgotten on reclaim.
  std::map<uint64_t, uint64_t> installed;  // chunk -> cow sector
  uint64_t reclaims = 0, max_end = 0;
  bool reclaim = true;
  auto read = [&](uint64_t chunk) {
    if (!installed.count(chunk)) {
      const dmcowd::Answer a = MapChunk(&mapper, chunk);
      REQUIRE(a.error == 0);
      REQUIRE(a.mapping.kind == dmcowd::MapKind::kRO);
      for (uint64_t i = 0; i < a.mapping.nr_chunks; i++) {
        installed[a.mapping.chunk + i] = a.mapping.cow_sector + i * geo.chunk_sectors;
      }
    }
    INFO("chunk " << chunk);
    REQUIRE(std::memcmp(scratch.bytes.data() + installed[chunk] * 512, ref.data() + chunk * kChunkBytes, kChunkBytes) ==
            0);
    max_end = std::max(max_end, mapper.scratch_end_chunks());
    if (reclaim && mapper.WantsReclaim()) {  // what the daemon does, under a suspend
      std::vector<dmcowd::Extent> forget;
      mapper.Reclaim(&forget);
      REQUIRE(!forget.empty());
      for (const dmcowd::Extent& e : forget) {
        for (uint64_t i = 0; i < e.nr_chunks; i++) installed.erase(e.chunk + i);
      }
      REQUIRE(mapper.scratch_live_chunks() <= budget / 2);
      mapper.Reclaimed(std::vector<int>(forget.size(), 0));
      reclaims++;
    }
  };
  // Random reads, then runs in order, then random again: every read checked.
  std::mt19937_64 rng(7);
  for (int i = 0; i < 1500; i++) read(rng() % kChunks);
  for (uint64_t c = 0; c < kChunks; c++) read(c);
  for (int i = 0; i < 1500; i++) read(rng() % kChunks);
  INFO("reclaims " << reclaims << ", log end " << max_end << " slots, released " << scratch.released);
  REQUIRE(reclaims >= 10);
  REQUIRE(scratch.released > 0);
  // Reclaimed slots are reused: the log stays near the budget (a run of up
  // to 32 slots may pass it before the reclaim), far from the disk's size.
  REQUIRE(max_end <= budget + 32 + 32);

  // INVALIDATEs the kernel refused (EBUSY: a fill still reads the slot):
  // those slots are not reused, and the next reclaim names them again first.
  std::vector<dmcowd::Extent> refused;
  reclaim = false;
  while (!mapper.WantsReclaim()) read(rng() % kChunks);
  mapper.Reclaim(&refused);
  REQUIRE(!refused.empty());
  mapper.Reclaimed(std::vector<int>(refused.size(), EBUSY));
  std::set<uint64_t> refused_sectors;
  for (const dmcowd::Extent& e : refused) {
    for (uint64_t i = 0; i < e.nr_chunks; i++) {
      installed.erase(e.chunk + i);
      refused_sectors.insert(e.cow_sector + i * geo.chunk_sectors);
    }
  }
  const uint64_t released_before = scratch.released;
  for (int i = 0; i < 200; i++) {
    const uint64_t c = rng() % kChunks;
    read(c);
    REQUIRE(!refused_sectors.count(installed[c]));
  }
  REQUIRE(scratch.released == released_before);  // nothing punched meanwhile
  std::vector<dmcowd::Extent> again;
  mapper.Reclaim(&again);
  REQUIRE(again.size() >= refused.size());
  for (size_t i = 0; i < refused.size(); i++) {
    REQUIRE((again[i].chunk == refused[i].chunk && again[i].cow_sector == refused[i].cow_sector));
  }
  mapper.Reclaimed(std::vector<int>(again.size(), 0));
  REQUIRE(scratch.released > released_before);
}

TEST_CASE("a chunk written after it was assembled leaves its run; its slot is reclaimed") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  constexpr uint64_t kChunks = 512, kChunkBytes = 65536;
  std::vector<uint8_t> ref(kChunks * kChunkBytes);
  for (size_t i = 0; i < ref.size(); i++) ref[i] = static_cast<uint8_t>(i / kChunkBytes + 1 + (i % 89 == 0));
  std::unique_ptr<dmcow::Image> image = CompressedImage(dir, ref, true);
  const dmcowd::Qcow2Geometry geo = Qcow2Mapper::GeometryFor(*image);
  ScratchRecorder scratch(geo.scratch_sectors * 512);
  Qcow2Mapper mapper(image.get(), &scratch, true, false);
  REQUIRE(mapper.Init().ok());
  mapper.SetScratchBudget(4 << 20);
  auto map = [&](uint64_t chunk, bool write) {
    const dmcowd::Answer a = MapChunk(&mapper, chunk, write);
    REQUIRE(a.error == 0);
    return a.mapping;
  };
  // 0, then 1-2, 3-6 (sequential runs), then write chunk 4.
  map(0, false);
  map(1, false);
  const dmcowd::Mapping run = map(3, false);
  REQUIRE((run.chunk == 3 && run.nr_chunks == 4));
  const uint64_t live = mapper.scratch_live_chunks();
  const uint64_t writes = scratch.writes.size();
  REQUIRE(map(4, true).kind == dmcowd::MapKind::kFilledRW);
  REQUIRE(mapper.scratch_live_chunks() == live - 1);
  // The run's other chunks keep their slots, nothing assembled again.
  for (uint64_t c : {3, 5, 6}) {
    const dmcowd::Mapping m = map(c, false);
    INFO("chunk " << c);
    REQUIRE(m.kind == dmcowd::MapKind::kRO);
    REQUIRE(m.cow_sector == run.cow_sector + (c - 3) * geo.chunk_sectors);
  }
  REQUIRE(scratch.writes.size() == writes);
  // The next reclaim names chunk 4 at its old slot (the kernel may still
  // map it there if the write's reply was refused).
  std::vector<dmcowd::Extent> forget;
  mapper.Reclaim(&forget);
  REQUIRE(!forget.empty());
  REQUIRE(forget[0].chunk == 4);
  REQUIRE(forget[0].nr_chunks == 1);
  REQUIRE(forget[0].cow_sector == run.cow_sector + 1 * geo.chunk_sectors);
  mapper.Reclaimed(std::vector<int>(forget.size(), 0));
}

TEST_CASE("a disk under twice the scratch budget is never reclaimed") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  // 96 chunks, all compressed; a 64-slot budget would be passed, but the
  // disk is under twice it: scratch is bounded by the disk anyway.
  std::vector<uint8_t> ref(96 * 65536);
  for (size_t i = 0; i < ref.size(); i++) ref[i] = static_cast<uint8_t>(i / 65536 + 1);
  std::unique_ptr<dmcow::Image> image = CompressedImage(dir, ref);
  ScratchRecorder scratch(Qcow2Mapper::GeometryFor(*image).scratch_sectors * 512);
  Qcow2Mapper mapper(image.get(), &scratch, false, false);
  REQUIRE(mapper.Init().ok());
  mapper.SetScratchBudget(4 << 20);
  for (uint64_t c = 0; c < 96; c += 2) {  // every other chunk: one-chunk runs
    REQUIRE(MapChunk(&mapper, c).mapping.kind == dmcowd::MapKind::kRO);
  }
  for (uint64_t c = 1; c < 96; c += 2) MapChunk(&mapper, c);
  REQUIRE(mapper.scratch_live_chunks() == 96);
  REQUIRE(!mapper.WantsReclaim());
}

TEST_CASE("a whole-chunk write answers RW only where the base device holds the chunk's data") {
  SKIP_WITHOUT_QEMU();
  // An RW answer leaves the fill to the kernel, which copies from the base
  // device when it holds no mapping for the chunk (a ZERO or RO mapping it
  // dropped, or never had), and does copy even for a whole-chunk write that
  // a noflush suspend pushed back (docs/abi.md, "Cached mappings"). Over a
  // backing file the base device holds the backing's data, so zero,
  // compressed and snapshot-shared clusters must be filled here.
  TempDir dir;
  MustRun(
      "cd " + dir.path() +
      " && qemu-img create -q -f qcow2 base.qcow2 1M && qemu-io -f qcow2 -c 'write -P 0x31 0 1M' base.qcow2 >/dev/null"
      " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2 1M"
      " && qemu-io -f qcow2 -c 'write -z 0 64k' -c 'write -c -P 0x42 128k 64k' -c 'write -P 0x53 192k 64k'"
      " img.qcow2 >/dev/null && qemu-img snapshot -c s1 img.qcow2");
  dmcow::OpenOptions o;
  o.writable = true;
  std::unique_ptr<dmcow::Image> image;
  REQUIRE(dmcow::OpenImage(dir / "img.qcow2", o, &image).ok());
  const uint64_t scratch_sectors = Qcow2Mapper::GeometryFor(*image).scratch_sectors;
  ScratchRecorder space(scratch_sectors * 512);
  Qcow2Mapper mapper(image.get(), &space, true, true);
  REQUIRE(mapper.Init().ok());
  // A whole-chunk write to `chunk` (not read before: the kernel has no
  // mapping); its kind, and the 64 KiB now at the place it names.
  auto full_write = [&](uint64_t chunk, std::vector<uint8_t>* placed) {
    dmcowd::MapRequest req;
    req.chunk = chunk;
    req.write = true;
    req.full_chunk = true;
    req.batch = 1;
    dmcowd::Answer a;
    REQUIRE(mapper.Map(req, &a).ok());
    REQUIRE(a.error == 0);
    REQUIRE(a.mapping.cow_sector >= scratch_sectors);
    const std::vector<uint8_t> file = ReadWholeFile(dir / "img.qcow2");
    const uint64_t at = (a.mapping.cow_sector - scratch_sectors) * 512;
    placed->assign(64 << 10, 0xee);  // what a file too short for the chunk shows
    if (at < file.size()) {
      std::copy(file.begin() + at, file.begin() + std::min<uint64_t>(file.size(), at + placed->size()),
                placed->begin());
    }
    return a.mapping.kind;
  };
  std::vector<uint8_t> placed;
  REQUIRE(full_write(0, &placed) == dmcowd::MapKind::kFilledRW);  // zero cluster: zeroed here
  CHECK(placed == std::vector<uint8_t>(64 << 10, 0));
  REQUIRE(full_write(1, &placed) == dmcowd::MapKind::kRW);        // unallocated: the base device holds its data
  REQUIRE(full_write(2, &placed) == dmcowd::MapKind::kFilledRW);  // compressed: decompressed here
  CHECK(placed == std::vector<uint8_t>(64 << 10, 0x42));
  REQUIRE(full_write(3, &placed) == dmcowd::MapKind::kFilledRW);  // shared with s1: copied here
  CHECK(placed == std::vector<uint8_t>(64 << 10, 0x53));
}
