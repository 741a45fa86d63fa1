// Seeded random images written by the real qemu-io, read through our engine
// and compared byte for byte with `qemu-img convert -O raw`.
#include <catch2/catch.hpp>
#include <cstring>
#include <random>

#include "dmcow/image.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;

namespace {

struct OpsConfig {
  uint64_t size;
  uint64_t cluster;
  bool compressed_writes = false;  // write -c of whole clusters; the image must be new
  bool zero_writes = true;         // write -z
  int count = 40;
  uint64_t max_compressed_run = 4;  // qcow v1 compresses one cluster per write
};

// Applies `cfg.count` random writes to `image` in one qemu-io run.
void ApplyRandomOps(const std::string& image, const std::string& format, const OpsConfig& cfg, uint64_t seed,
                    const std::string& source_file) {
  std::mt19937_64 rng(seed);
  // Run where the image is: QEMU resolves relative data file names that way.
  std::string cmd = "cd \"$(dirname '" + image + "')\" && qemu-io -f " + format;
  // QEMU only compresses into unallocated clusters, so compressed writes come
  // first, onto fresh clusters (the image must be new when this is asked);
  // later writes then land on top of compressed clusters.
  if (cfg.compressed_writes) {
    const uint64_t clusters = cfg.size / cfg.cluster;
    std::vector<bool> used(clusters);
    for (int i = 0; i < cfg.count / 3; i++) {
      uint64_t first = rng() % clusters;
      uint64_t n = 1 + rng() % std::min<uint64_t>(cfg.max_compressed_run, clusters - first);
      bool fresh = true;
      for (uint64_t c = first; c < first + n; c++) fresh = fresh && !used[c];
      if (!fresh) continue;
      for (uint64_t c = first; c < first + n; c++) used[c] = true;
      cmd += " -c 'write -c -s " + source_file + " " + std::to_string(first * cfg.cluster) + " " +
             std::to_string(n * cfg.cluster) + "'";
    }
  }
  for (int i = 0; i < cfg.count; i++) {
    uint64_t kind = rng() % 10;
    uint64_t len = 1 + rng() % std::min<uint64_t>(cfg.size / 4, 3 * cfg.cluster + 5000);
    uint64_t off = rng() % (cfg.size - len);
    if (cfg.zero_writes && kind == 3) {
      // Cluster-aligned zero writes become zero clusters; others write zeros.
      if (rng() % 2) {
        off -= off % cfg.cluster;
        len = std::min(cfg.size - off, (1 + rng() % 3) * cfg.cluster);
      }
      cmd += " -c 'write -z " + std::to_string(off) + " " + std::to_string(len) + "'";
    } else if (kind < 7) {
      cmd += " -c 'write -s " + source_file + " " + std::to_string(off) + " " + std::to_string(len) + "'";
    } else {
      cmd += " -c 'write -P " + std::to_string(1 + rng() % 255) + " " + std::to_string(off) + " " +
             std::to_string(len) + "'";
    }
  }
  // qemu-io exits 0 even when a command fails; its messages are what tell.
  std::string out;
  Run(cmd + " '" + image + "'", &out);
  std::string errors;
  size_t pos = 0;
  while (pos < out.size()) {
    size_t eol = out.find('\n', pos);
    if (eol == std::string::npos) eol = out.size();
    std::string line = out.substr(pos, eol - pos);
    if (!line.empty() && line.rfind("wrote ", 0) != 0 && line.find("ops/sec") == std::string::npos) {
      errors += line + "\n";
    }
    pos = eol + 1;
  }
  INFO("qemu-io on " << image << " reported:\n" << errors);
  REQUIRE(errors.empty());
}

// Reads the whole image through the engine in random-sized unaligned pieces
// and compares with qemu-img's raw conversion; also checks the checksum and
// that block status never calls non-zero data zero.
void VerifyAgainstQemu(const std::string& image, const std::string& snapshot, const TempDir& dir, uint64_t seed) {
  std::string raw = dir / "expected.raw";
  std::string l_arg = snapshot.empty() ? "" : " -l 'snapshot.name=" + snapshot + "'";
  MustRun("cd \"$(dirname '" + image + "')\" && qemu-img convert -O raw" + l_arg + " '" + image + "' '" + raw + "'");
  std::vector<uint8_t> expected = ReadWholeFile(raw);

  OpenOptions options;
  options.snapshot = snapshot;
  options.l2_cache_bytes = 64 << 10;  // small, so eviction is exercised
  std::unique_ptr<Image> img;
  Status s = OpenImage(image, options, &img);
  INFO(image << " snapshot '" << snapshot << "': " << s.ToString());
  REQUIRE(s.ok());
  REQUIRE(img->virtual_size() == expected.size());

  std::mt19937_64 rng(seed);
  std::vector<uint8_t> got(expected.size());
  for (uint64_t off = 0; off < expected.size();) {
    uint64_t n = std::min<uint64_t>(expected.size() - off, 1 + rng() % (3 << 20));
    if (rng() % 4 == 0) n = std::min<uint64_t>(n, 1 + rng() % 4096);
    s = img->Read(off, got.data() + off, n);
    INFO("read at " << off << " len " << n << ": " << s.ToString());
    REQUIRE(s.ok());
    off += n;
  }
  if (got != expected) {
    size_t i = 0;
    while (got[i] == expected[i]) i++;
    FAIL(image << ": first difference at guest offset " << i << " (ours " << int(got[i]) << ", qemu "
               << int(expected[i]) << ")");
  }

  for (uint64_t off = 0; off < expected.size();) {
    MapExtent e;
    REQUIRE(GetMapExtent(img.get(), off, UINT64_MAX, &e).ok());
    REQUIRE(e.length > 0);
    if (e.zero) {
      bool all_zero =
          std::all_of(expected.begin() + off, expected.begin() + off + e.length, [](uint8_t b) { return b == 0; });
      INFO("map says zero at " << off << " len " << e.length);
      REQUIRE(all_zero);
    }
    off += e.length;
  }

  std::string hex;
  REQUIRE(ComputeContentSha256(img.get(), &hex).ok());
  REQUIRE(hex == Sha256OfFile(raw));
}

struct Fixture {
  TempDir dir;
  std::string source;
  Fixture() {
    std::mt19937_64 rng(42);
    source = dir / "source.bin";
    WriteWholeFile(source, MixedData(rng, 8 << 20));
  }
};

}  // namespace

TEST_CASE("qcow2 images written by qemu-io read identically", "[qemu][qcow2]") {
  SKIP_WITHOUT_QEMU();
  struct Case {
    const char* name;
    const char* options;
    uint64_t size;
    uint64_t cluster;
    bool compressed;
  };
  const Case cases[] = {
      {"v3-64k", "compat=1.1", 32 << 20, 65536, true},
      {"v2-64k", "compat=0.10", 32 << 20, 65536, true},
      {"v3-512", "cluster_size=512", 4 << 20, 512, true},
      {"v3-4k-zstd", "cluster_size=4096,compression_type=zstd", 8 << 20, 4096, true},
      {"v3-2m", "cluster_size=2M", 64 << 20, 2 << 20, true},
      {"v3-extl2-64k", "extended_l2=on", 32 << 20, 65536, true},
      {"v3-extl2-16k-zstd", "extended_l2=on,cluster_size=16k,compression_type=zstd", 8 << 20, 16384, true},
      {"v3-refcount1", "refcount_bits=1", 16 << 20, 65536, false},
      {"v3-refcount64", "refcount_bits=64,cluster_size=4k", 16 << 20, 4096, false},
      {"v3-lazy", "lazy_refcounts=on", 16 << 20, 65536, false},
  };
  Fixture f;
  for (const Case& c : cases) {
    for (uint64_t seed = 1; seed <= 2; seed++) {
      DYNAMIC_SECTION(c.name << " seed " << seed) {
        std::string img = f.dir / (std::string(c.name) + ".qcow2");
        MustRun("qemu-img create -q -f qcow2 -o " + std::string(c.options) + " '" + img + "' " +
                std::to_string(c.size));
        ApplyRandomOps(img, "qcow2", {c.size, c.cluster, c.compressed, true, 40}, seed * 1000 + 7, f.source);
        VerifyAgainstQemu(img, "", f.dir, seed);
      }
    }
  }
}

TEST_CASE("backing chains read identically", "[qemu][chain]") {
  SKIP_WITHOUT_QEMU();
  Fixture f;
  const uint64_t mib = 1 << 20;
  SECTION("raw <- qcow2 <- qcow2, overlays larger than the base") {
    std::string base = f.dir / "base.raw", mid = f.dir / "mid.qcow2", top = f.dir / "top.qcow2";
    MustRun("qemu-img create -q -f raw '" + base + "' 8M");
    ApplyRandomOps(base, "raw", {8 * mib, 4096, false, false, 20}, 11, f.source);
    // Relative backing names, resolved against the overlay's directory.
    MustRun("cd '" + f.dir.path() + "' && qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 12M");
    ApplyRandomOps(mid, "qcow2", {12 * mib, 65536, true, true, 30}, 12, f.source);
    MustRun("cd '" + f.dir.path() +
            "' && qemu-img create -q -f qcow2 -o extended_l2=on -b mid.qcow2 -F qcow2 top.qcow2 16M");
    ApplyRandomOps(top, "qcow2", {16 * mib, 65536, true, true, 30}, 13, f.source);
    VerifyAgainstQemu(top, "", f.dir, 1);
  }
  SECTION("qcow <- qcow2 (v2)") {
    std::string base = f.dir / "base.qcow", top = f.dir / "top.qcow2";
    MustRun("qemu-img create -q -f qcow '" + base + "' 8M");
    ApplyRandomOps(base, "qcow", {8 * mib, 4096, true, false, 30, 1}, 21, f.source);
    VerifyAgainstQemu(base, "", f.dir, 2);
    MustRun("cd '" + f.dir.path() +
            "' && qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow -F qcow top.qcow2 8M");
    ApplyRandomOps(top, "qcow2", {8 * mib, 65536, false, true, 30}, 22, f.source);
    VerifyAgainstQemu(top, "", f.dir, 3);
  }
  SECTION("qcow v1 over a qcow2 backing file, 512-byte clusters (qcow v1 stores no backing format: probed)") {
    std::string base = f.dir / "base.qcow2", top = f.dir / "top.qcow";
    MustRun("qemu-img create -q -f qcow2 '" + base + "' 4M");
    ApplyRandomOps(base, "qcow2", {4 * mib, 65536, true, true, 20}, 31, f.source);
    MustRun("cd '" + f.dir.path() + "' && qemu-img create -q -f qcow -b base.qcow2 -F qcow2 top.qcow 4M");
    ApplyRandomOps(top, "qcow", {4 * mib, 512, true, false, 40, 1}, 32, f.source);
    VerifyAgainstQemu(top, "", f.dir, 4);
  }
}

TEST_CASE("internal snapshots read as point-in-time views", "[qemu][snapshot]") {
  SKIP_WITHOUT_QEMU();
  Fixture f;
  const uint64_t size = 16 << 20;
  std::string img = f.dir / "snap.qcow2";
  MustRun("qemu-img create -q -f qcow2 '" + img + "' 16M");
  ApplyRandomOps(img, "qcow2", {size, 65536, true, true, 30}, 41, f.source);
  MustRun("qemu-img snapshot -c first '" + img + "'");
  ApplyRandomOps(img, "qcow2", {size, 65536, false, true, 30}, 42, f.source);
  MustRun("qemu-img snapshot -c second '" + img + "'");
  ApplyRandomOps(img, "qcow2", {size, 65536, false, true, 30}, 43, f.source);
  VerifyAgainstQemu(img, "", f.dir, 5);
  VerifyAgainstQemu(img, "first", f.dir, 6);
  VerifyAgainstQemu(img, "second", f.dir, 7);
}

TEST_CASE("external data files read identically", "[qemu][datafile]") {
  SKIP_WITHOUT_QEMU();
  Fixture f;
  for (const char* raw_flag : {"off", "on"}) {
    DYNAMIC_SECTION("data_file_raw=" << raw_flag) {
      std::string img = f.dir / "ext.qcow2";
      MustRun("cd '" + f.dir.path() +
              "' && qemu-img create -q -f qcow2 -o data_file=ext.data,data_file_raw=" + raw_flag + " ext.qcow2 16M");
      ApplyRandomOps(img, "qcow2", {16 << 20, 65536, false, true, 40}, 51, f.source);
      VerifyAgainstQemu(img, "", f.dir, 8);
    }
  }
}
