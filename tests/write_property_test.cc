// Seeded random operations applied to a raw reference file and, through the
// engine, to qcow2 and qcow (v1) images of many shapes; afterwards the real
// qemu-img must find the image clean and identical to the reference.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstring>
#include <random>

#include "dmcow/compress.h"
#include "dmcow/image.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;

namespace {

struct Shape {
  const char* name;
  const char* create;  // qemu-img commands run in the temp dir; the image is img.qcow2
  uint64_t size;
  uint64_t cluster;
  bool zero_representable;  // a discard makes full clusters read as zero (qcow2 v3, or nothing underneath)
  int ops;
  const char* format = "qcow2";
  bool compressible = true;  // WriteCompressedCluster works (not with an external data file)
};

std::vector<uint8_t> RandomBytes(std::mt19937_64& rng, size_t n) {
  std::vector<uint8_t> v(n);
  // Runs of a repeated byte and random stretches; some all-zero data too.
  size_t pos = 0;
  while (pos < n) {
    size_t run = std::min<size_t>(n - pos, 1 + rng() % 70000);
    if (rng() % 3 == 0) {
      std::fill(v.begin() + pos, v.begin() + pos + run, static_cast<uint8_t>(rng() % 4 == 0 ? 0 : rng()));
    } else {
      for (size_t i = 0; i < run; i++) v[pos + i] = static_cast<uint8_t>(rng());
    }
    pos += run;
  }
  return v;
}

void RunShape(const Shape& shape, uint64_t seed) {
  TempDir dir;
  MustRun("cd '" + dir.path() + "' && " + shape.create);
  const std::string img = dir / "img.qcow2";
  const std::string ref_path = dir / "ref.raw";
  MustRun("cd '" + dir.path() + "' && qemu-img convert -O raw img.qcow2 ref.raw");
  std::vector<uint8_t> ref = ReadWholeFile(ref_path);
  REQUIRE(ref.size() == shape.size);

  std::mt19937_64 rng(seed);
  {
    OpenOptions options;
    options.writable = true;
    options.l2_cache_bytes = 32 << 10;  // small caches: eviction and forced flushes happen
    options.refcount_cache_bytes = 16 << 10;
    std::unique_ptr<Image> image;
    Status s = OpenImage(img, options, &image);
    INFO(s.ToString());
    REQUIRE(s.ok());
    for (int op = 0; op < shape.ops; op++) {
      const uint64_t kind = rng() % 20;
      uint64_t len = 1 + rng() % (rng() % 8 == 0 ? (4 << 20) : 3 * shape.cluster);
      len = std::min(len, shape.size);
      const uint64_t off = rng() % (shape.size - len + 1);
      INFO("op " << op << " kind " << kind << " offset " << off << " length " << len);
      if (kind < 12) {
        std::vector<uint8_t> data = RandomBytes(rng, len);
        REQUIRE(image->Write(off, data.data(), data.size()).ok());
        std::memcpy(ref.data() + off, data.data(), len);
      } else if (kind < 15) {
        REQUIRE(image->WriteZeroes(off, len).ok());
        std::memset(ref.data() + off, 0, len);
      } else if (kind < 18) {
        REQUIRE(image->Discard(off, len).ok());
        // Whole clusters inside the range read as zeros where the format can
        // say so; the rest keeps its content.
        const uint64_t cs = shape.cluster;
        uint64_t first = (off + cs - 1) / cs * cs;
        uint64_t last = off + len == shape.size ? shape.size : (off + len) / cs * cs;
        if (shape.zero_representable && first < last) std::memset(ref.data() + first, 0, last - first);
      } else if (kind == 19 && shape.compressible) {
        // A whole cluster stored compressed (zero-padded past the end).
        const uint64_t cs = shape.cluster;
        const uint64_t at = off / cs * cs;
        const uint64_t n = std::min(cs, shape.size - at);
        std::vector<uint8_t> data = RandomBytes(rng, cs);
        std::fill(data.begin() + static_cast<long>(n), data.end(), 0);
        CompressionSettings settings;
        settings.type = image->info().compression_type;
        settings.level = static_cast<int>(rng() % 10);
        std::vector<uint8_t> payload;
        if (CompressCluster(settings, data.data(), cs, &payload)) {
          REQUIRE(image->WriteCompressedCluster(at, payload.data(), payload.size()).ok());
        } else {
          REQUIRE(image->Write(at, data.data(), n).ok());
        }
        std::memcpy(ref.data() + at, data.data(), n);
      } else {
        REQUIRE(image->Flush().ok());
      }
      if (op % 50 == 49) {  // the engine's own view matches as it goes
        std::vector<uint8_t> got(shape.size);
        REQUIRE(image->Read(0, got.data(), got.size()).ok());
        // The first difference, not the vectors: Catch would print megabytes.
        const size_t diff = std::mismatch(got.begin(), got.end(), ref.begin()).first - got.begin();
        INFO("engine and reference first differ at guest offset " << diff);
        REQUIRE(diff == got.size());
      }
    }
    REQUIRE(image->Flush().ok());
  }
  WriteWholeFile(ref_path, ref);
  std::string out;
  const std::string format = shape.format;
  if (format == "qcow") {
    // qemu-img check does not support qcow v1 (exit 63): QEMU must read the
    // image as equal to the reference, both through compare and convert.
    int rc = Run("cd '" + dir.path() + "' && qemu-img compare -f raw -F qcow ref.raw img.qcow2", &out);
    INFO("qemu-img compare: " << out);
    CHECK(rc == 0);
    rc = Run("cd '" + dir.path() + "' && qemu-img convert -f qcow -O raw img.qcow2 back.raw && cmp ref.raw back.raw",
             &out);
    INFO("qemu-img convert, cmp: " << out);
    CHECK(rc == 0);
    return;
  }
  int rc = Run("cd '" + dir.path() + "' && qemu-img check img.qcow2", &out);
  INFO("qemu-img check:\n" << out);
  CHECK(rc == 0);
  CHECK(out.find("No errors were found") != std::string::npos);
  CHECK(out.find("leaked") == std::string::npos);
  // Closed cleanly: lazy refcounts written back and the dirty bit cleared.
  CHECK(Run("qemu-img info --output=json '" + img + "' | grep -q '\"dirty-flag\": true'") != 0);
  rc = Run("cd '" + dir.path() + "' && qemu-img compare -f raw -F qcow2 ref.raw img.qcow2", &out);
  INFO("qemu-img compare: " << out);
  CHECK(rc == 0);
}

}  // namespace

TEST_CASE("random writes keep qcow2 images clean and equal to a raw reference", "[qemu][write]") {
  SKIP_WITHOUT_QEMU();
  const Shape shapes[] = {
      {"v3-64k", "qemu-img create -q -f qcow2 img.qcow2 64M", 64 << 20, 65536, true, 300},
      {"v2-64k", "qemu-img create -q -f qcow2 -o compat=0.10 img.qcow2 64M", 64 << 20, 65536, true, 300},
      {"v3-512", "qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 8M", 8 << 20, 512, true, 300},
      {"v3-2m", "qemu-img create -q -f qcow2 -o cluster_size=2M img.qcow2 96M", 96 << 20, 2 << 20, true, 120},
      {"refcount1", "qemu-img create -q -f qcow2 -o refcount_bits=1,cluster_size=4k img.qcow2 32M", 32 << 20, 4096,
       true, 300},
      // 64-bit refcounts in 512-byte clusters: a block covers 32 KiB, so the
      // refcount table must grow many times.
      {"refcount64-512", "qemu-img create -q -f qcow2 -o refcount_bits=64,cluster_size=512 img.qcow2 16M", 16 << 20,
       512, true, 300},
      {"lazy-refcounts", "qemu-img create -q -f qcow2 -o lazy_refcounts=on,cluster_size=16k img.qcow2 32M", 32 << 20,
       16384, true, 300},
      {"extended-l2", "qemu-img create -q -f qcow2 -o extended_l2=on img.qcow2 64M", 64 << 20, 65536, true, 300},
      {"compressed-base",
       "head -c 24M /dev/urandom > r.raw && head -c 8M /dev/zero >> r.raw && qemu-img convert -c -O qcow2 r.raw "
       "img.qcow2",
       32 << 20, 65536, true, 300},
      {"over-backing",
       "qemu-img create -q -f qcow2 base.qcow2 48M && qemu-io -c 'write -P 7 0 40M' base.qcow2 >/dev/null && "
       "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2 64M",
       64 << 20, 65536, true, 300},
      {"v2-over-backing",
       "qemu-img create -q -f raw base.raw 32M && qemu-io -f raw -c 'write -P 9 1M 20M' base.raw >/dev/null && "
       "qemu-img create -q -f qcow2 -o compat=0.10 -b base.raw -F raw img.qcow2 32M",
       32 << 20, 65536, false, 300},
      {"after-snapshot",
       "qemu-img create -q -f qcow2 img.qcow2 32M && qemu-io -c 'write -P 3 0 30M' img.qcow2 >/dev/null && "
       "qemu-img snapshot -c snap img.qcow2",
       32 << 20, 65536, true, 300},
      {"data-file", "qemu-img create -q -f qcow2 -o data_file=img.data img.qcow2 32M", 32 << 20, 65536, true, 200,
       "qcow2", false},
      {"zstd-4k",
       "head -c 6M /dev/urandom > r.raw && head -c 2M /dev/zero >> r.raw && "
       "qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=4k r.raw img.qcow2",
       8 << 20, 4096, true, 400},
      // qcow v1. qemu-img chooses the cluster size itself: 4 KiB clusters
      // (4 KiB L2 tables) without a backing file, 512-byte clusters (32 KiB
      // L2 tables) with one. Discard never changes a qcow v1 image (it
      // cannot free space), so zero_representable is false throughout.
      // QEMU reads 512-byte-cluster qcow images slowly (seconds per compare
      // of 24 MiB), hence the smaller disks.
      {"qcow1-4k", "qemu-img create -q -f qcow img.qcow2 64M", 64 << 20, 4096, false, 300, "qcow"},
      {"qcow1-over-raw",
       "qemu-img create -q -f raw base.raw 20M && qemu-io -f raw -c 'write -P 9 1M 14M' base.raw >/dev/null && "
       "qemu-img create -q -f qcow -b base.raw -F raw img.qcow2 24M",
       24 << 20, 512, false, 300, "qcow"},
      {"qcow1-over-qcow1",
       "qemu-img create -q -f qcow base.qcow 24M && qemu-io -t unsafe -f qcow -c 'write -P 7 0 10M' -c 'write -P 8 12M "
       "6M' "
       "base.qcow >/dev/null && qemu-img create -q -f qcow -b base.qcow -F qcow img.qcow2 24M",
       24 << 20, 512, false, 300, "qcow"},
      {"qcow1-compressed-base",
       "(yes 'a compressible line of qcow text' | head -c 12M; head -c 6M /dev/urandom; head -c 6M /dev/zero;"
       " yes 'more text' | head -c 8M) > r.raw && "
       // qemu-img 7.2 exits 1 after converting to qcow with -c (its final
       // zero-length compressed write is refused by the qcow driver), with
       // the image complete: compare is what counts.
       "{ qemu-img convert -c -f raw -O qcow r.raw img.qcow2; qemu-img compare -q -f raw -F qcow r.raw img.qcow2; }",
       32 << 20, 4096, false, 300, "qcow"},
      // 512-byte clusters with nothing underneath: made with a backing file
      // (the only way qemu-img makes them), whose name is then cut from the
      // header (offset and size fields zeroed).
      {"qcow1-512",
       "qemu-img create -q -f raw base.raw 16M && qemu-img create -q -f qcow -b base.raw -F raw img.qcow2 16M && "
       "head -c 12 /dev/zero | dd of=img.qcow2 bs=1 seek=8 conv=notrunc status=none",
       16 << 20, 512, false, 300, "qcow"},
  };
  for (const Shape* shape : Sampled(shapes)) {
    DYNAMIC_SECTION(shape->name) { RunShape(*shape, 1234 + shape->size + shape->cluster); }
  }
}
