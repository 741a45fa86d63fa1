// dmcow-img convert into qcow2 (and qcow), against the real qemu-img 7.2:
// every output passes qemu-img check with no errors and no leaks, and
// qemu-img compare finds it identical to qemu-img's own conversion with the
// same options (so QEMU reads our compressed clusters). Outputs are
// reproducible: converting twice, or with a different thread count, gives
// the same bytes. Error cases exit as qemu-img does.
#include <algorithm>
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "test_util.h"

using namespace dmcow_test;

namespace {

// Sources made once: raw files with data, zero runs and all-zero clusters
// inside data; a qcow2 chain with zero clusters and discards; a compressed
// qcow2; a qcow2 with an internal snapshot.
class Sources {
 public:
  static Sources& Get() {
    static Sources s;
    return s;
  }
  std::string operator/(const std::string& name) const { return dir_ / name; }
  const std::string& dir() const { return dir_.path(); }

 private:
  Sources() {
    std::mt19937_64 rng(20261123);
    std::vector<uint8_t> raw((24 << 20) + 1536, 0);
    for (int i = 0; i < 40; i++) {
      const size_t len = 1 + rng() % (700 << 10);
      const size_t at = rng() % (raw.size() - len);
      auto data = MixedData(rng, len);
      std::copy(data.begin(), data.end(), raw.begin() + static_cast<long>(at));
    }
    std::fill(raw.begin() + (5 << 20), raw.begin() + (5 << 20) + (192 << 10), 0);  // zero clusters in data
    WriteWholeFile(dir_ / "src.raw", raw);
    std::vector<uint8_t> raw2(3 << 20);
    auto data = MixedData(rng, 1 << 20);
    std::copy(data.begin(), data.end(), raw2.begin() + (1 << 20));
    WriteWholeFile(dir_ / "src2.raw", raw2);

    const std::string d = "cd '" + dir_.path() + "' && ";
    MustRun(d + "qemu-img convert -O qcow2 src.raw base.qcow2");
    MustRun(d + "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2");
    MustRun(d +
            "qemu-io -c 'write -P 0x5a 1M 300k' -c 'write -z 6M 1M' -c 'discard 9M 128k' "
            "-c 'write -P 0x11 20M 64k' -c 'write -z 23M 64k' top.qcow2 >/dev/null");
    MustRun(d + "qemu-img convert -c -O qcow2 src.raw comp.qcow2");
    MustRun(d +
            "cp base.qcow2 snap.qcow2 && qemu-img snapshot -c first snap.qcow2 && "
            "qemu-io -c 'write -P 0x77 0 2M' snap.qcow2 >/dev/null");
  }
  TempDir dir_;
};

// Runs `command` in the sources' directory (see Run).
int InSources(const std::string& command, std::string* out = nullptr) {
  return Run("cd '" + Sources::Get().dir() + "' && " + command, out);
}

// Bytes qemu-img map reports as data (allocated in the top layer).
uint64_t DataBytes(const std::string& image) {
  std::string out;
  if (InSources("qemu-img map --output=json '" + image + "' 2>/dev/null", &out) != 0) return UINT64_MAX;
  uint64_t total = 0;
  for (const auto& e : nlohmann::json::parse(out)) {
    if (e["data"].get<bool>() && e["depth"].get<int>() == 0) total += e["length"].get<uint64_t>();
  }
  return total;
}

uint64_t FileSize(const std::string& path) { return ReadWholeFile(path).size(); }

void ExpectClean(const std::string& image) {
  std::string out;
  const int rc = InSources("qemu-img check '" + image + "' 2>&1", &out);
  INFO(out);
  CHECK(rc == 0);
}

// Converts with both tools and checks what the header promises.
void ConvertBoth(const std::string& args, const std::string& srcs, bool compare_allocation = true) {
  INFO("convert " << args << " " << srcs);
  const Sources& s = Sources::Get();
  std::string out;
  REQUIRE(InSources("rm -f theirs.img ours.img ours2.img && qemu-img convert " + args + " " + srcs + " theirs.img 2>&1",
                    &out) == 0);
  INFO(out);
  REQUIRE(InSources(Ours() + " convert " + args + " " + srcs + " ours.img 2>&1", &out) == 0);
  if (args.find("-O qcow2") != std::string::npos) ExpectClean(s / "ours.img");
  CHECK(InSources("qemu-img compare -q theirs.img ours.img") == 0);
  // Reproducible, whatever the thread count.
  REQUIRE(InSources(Ours() + " convert -m 1 " + args + " " + srcs + " ours2.img 2>&1", &out) == 0);
  CHECK(InSources("cmp ours.img ours2.img") == 0);
  if (compare_allocation && DataBytes(s / "ours.img") > DataBytes(s / "theirs.img")) {
    std::string ours_map, theirs_map;
    InSources("qemu-img map ours.img", &ours_map);
    InSources("qemu-img map theirs.img", &theirs_map);
    FAIL_CHECK("more allocated than qemu-img's output\nours:\n" << ours_map << "theirs:\n" << theirs_map);
  }
}

}  // namespace

TEST_CASE("convert -O qcow2 agrees with qemu-img", "[convert]") {
  SKIP_WITHOUT_QEMU();
  const std::vector<std::string> shapes = {
      "-O qcow2",
      "-O qcow2 -o compat=0.10",
      "-O qcow2 -o cluster_size=512",
      "-O qcow2 -o cluster_size=2M",
      "-O qcow2 -o refcount_bits=1",
      "-O qcow2 -o refcount_bits=64,cluster_size=4k",
      "-O qcow2 -o lazy_refcounts=on",
      "-O qcow2 -S 0",
      "-O qcow2 -S 1M",
      "-O qcow2 -o preallocation=metadata",
      "-O qcow2 -o preallocation=falloc",
      "-O qcow2 -o data_file=ours-data.raw",
      "-O raw",
      "-O qcow",
  };
  for (const std::string& shape : shapes) {
    ConvertBoth(shape, "src.raw",
                shape.find("preallocation") == std::string::npos && shape.find("data_file") == std::string::npos);
    if (shape.find("falloc") != std::string::npos) {
      // Every cluster is given its blocks (fallocate), zero ranges included.
      std::string ours, theirs;
      REQUIRE(InSources("du -k ours.img | cut -f1", &ours) == 0);
      REQUIRE(InSources("du -k theirs.img | cut -f1", &theirs) == 0);
      INFO("du: ours " << ours << " KiB, theirs " << theirs << " KiB");
      CHECK(std::stoull(ours) * 10 >= std::stoull(theirs) * 9);
      CHECK(std::stoull(ours) > 24 * 1024);
    }
  }
  // Subclusters: qemu-img leaves all-zero subclusters unallocated, we
  // allocate whole clusters: same content, more allocated.
  ConvertBoth("-O qcow2 -o extended_l2=on", "src.raw", false);
  SECTION("from a chain, a compressed image and a snapshot") {
    ConvertBoth("-O qcow2", "top.qcow2");
    ConvertBoth("-O qcow2", "comp.qcow2");
    ConvertBoth("-O qcow2 -l first", "snap.qcow2");
  }
  SECTION("several sources are concatenated") {
    ConvertBoth("-O qcow2", "src.raw src2.raw top.qcow2");
    ConvertBoth("-O raw", "src2.raw src.raw");
  }
}

TEST_CASE("convert -c stores compressed clusters QEMU reads", "[convert]") {
  SKIP_WITHOUT_QEMU();
  const Sources& s = Sources::Get();
  for (std::string shape :
       {"-c -O qcow2", "-c -O qcow2 -o compression_type=zstd", "-c -O qcow2 -o cluster_size=4k",
        "-c -O qcow2 -o cluster_size=512", "-c -O qcow2 -o extended_l2=on", "-c -O qcow2 -o refcount_bits=1"}) {
    ConvertBoth(shape, "src.raw", false);
    std::string check;
    REQUIRE(InSources("qemu-img check --output=json ours.img", &check) == 0);
    CHECK(nlohmann::json::parse(check).value("compressed-clusters", 0) > 100);
  }
  // qcow v1: qemu-img 7.2 exits 1 after `convert -c -O qcow` (its last,
  // empty compressed write is refused) though the image is whole, so ours
  // is compared with the source directly.
  for (std::string shape : {"-c -O qcow", "-c -O qcow -o compression_level=1"}) {
    INFO(shape);
    REQUIRE(InSources("rm -f ours.img ours2.img && " + Ours() + " convert " + shape + " src.raw ours.img") == 0);
    CHECK(InSources("qemu-img compare -q src.raw ours.img") == 0);
    REQUIRE(InSources(Ours() + " convert -m 1 " + shape + " src.raw ours2.img") == 0);
    CHECK(InSources("cmp ours.img ours2.img") == 0);
    CHECK(FileSize(s / "ours.img") < FileSize(s / "src.raw") * 3 / 4);
  }
  // At QEMU's settings the output is as small as qemu-img's (within 1%).
  ConvertBoth("-c -O qcow2", "src.raw", false);
  CHECK(FileSize(s / "ours.img") <= FileSize(s / "theirs.img") * 101 / 100);
  // Other levels: igzip at 1-3, zlib above; QEMU reads them all.
  for (std::string level : {"1", "3", "9"}) {
    REQUIRE(InSources(Ours() + " convert -c -O qcow2 -o compression_level=" + level + " src.raw ours.img") == 0);
    ExpectClean(s / "ours.img");
    CHECK(InSources("qemu-img compare -q src.raw ours.img") == 0);
  }
}

// Images of many TiB with a few MiB of data: what the job plans as holes
// (tests/convert_job_test.cc) reads back as qemu-img's conversion.
TEST_CASE("sparse images of 8 and 16 TiB convert as qemu-img converts them", "[convert]") {
  SKIP_WITHOUT_QEMU();
  REQUIRE(InSources("rm -f big16.qcow2 big8.qcow2 big8.raw && qemu-img create -q -f qcow2 big16.qcow2 16T && "
                    "qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 3T 1M' -c 'write -z 5T 1G' "
                    "-c 'write -P 0x33 16383G 64k' big16.qcow2 >/dev/null && "
                    "qemu-img create -q -f qcow2 big8.qcow2 8T && "
                    "qemu-io -c 'write -P 0x44 7T 64k' -c 'write -P 0x45 1T 3k' big8.qcow2 >/dev/null && "
                    "truncate -s 8T big8.raw && qemu-io -f raw -c 'write -P 0x55 2T 4k' big8.raw >/dev/null") == 0);
  for (const char* shape : {"-O qcow2", "-c -O qcow2", "-O qcow2 -o cluster_size=2M", "-O qcow2 -S 1M"}) {
    ConvertBoth(shape, "big16.qcow2");
  }
  ConvertBoth("-O qcow2", "big8.raw");
  ConvertBoth("-O qcow2", "big8.qcow2 big8.raw");
  // Raw targets (8 TiB: ext4 files stop short of 16 TiB): equal content,
  // and holes where the source has none of its own data.
  for (const char* src : {"big8.qcow2", "big8.raw"}) {
    INFO(src);
    REQUIRE(InSources("rm -f ours.img && " + Ours() + " convert -O raw " + src + " ours.img") == 0);
    CHECK(InSources(std::string("qemu-img compare -q ") + src + " ours.img") == 0);
    std::string du;
    REQUIRE(InSources("du -k ours.img | cut -f1", &du) == 0);
    CHECK(std::stoull(du) < 1024);
  }
  InSources("rm -f big16.qcow2 big8.qcow2 big8.raw ours.img ours2.img theirs.img");
}

TEST_CASE("convert -B, -n and --target-is-zero", "[convert]") {
  SKIP_WITHOUT_QEMU();
  const Sources& s = Sources::Get();
  // -B: only the top layer is copied; the rest is left to the new backing.
  ConvertBoth("-O qcow2 -B base.qcow2 -F qcow2", "top.qcow2");
  CHECK(DataBytes(s / "ours.img") < (2u << 20));
  CHECK(InSources("qemu-img compare -q top.qcow2 ours.img") == 0);
  // The same backing named with -o, as qemu-img allows (it copied the whole chain).
  ConvertBoth("-O qcow2 -o backing_file=base.qcow2,backing_fmt=qcow2", "top.qcow2");
  CHECK(DataBytes(s / "ours.img") < (2u << 20));
  CHECK(InSources("qemu-img compare -q top.qcow2 ours.img") == 0);

  // -n into an existing image full of other data: every byte is replaced.
  REQUIRE(InSources("rm -f ours.img && qemu-img create -q -f qcow2 ours.img 25167360 && "
                    "qemu-io -c 'write -P 0xee 0 25167360' ours.img >/dev/null") == 0);
  REQUIRE(InSources(Ours() + " convert -n -O qcow2 top.qcow2 ours.img") == 0);
  ExpectClean(s / "ours.img");
  CHECK(InSources("qemu-img compare -q top.qcow2 ours.img") == 0);
  // --target-is-zero on a fresh target: zero ranges need no writes.
  REQUIRE(InSources("rm -f ours.img && qemu-img create -q -f qcow2 ours.img 25167360") == 0);
  REQUIRE(InSources(Ours() + " convert -n --target-is-zero -O qcow2 src.raw ours.img") == 0);
  ExpectClean(s / "ours.img");
  CHECK(InSources("qemu-img compare -q src.raw ours.img") == 0);
}

// -n into a raw file full of data: the zero ranges become holes, as
// qemu-img makes them (write-zeroes may unmap), instead of written zeros;
// zeroing a large sparse raw target once filled the disk.
TEST_CASE("convert -n onto a raw file punches its zero ranges", "[convert]") {
  SKIP_WITHOUT_QEMU();
  REQUIRE(InSources("rm -f punch.qcow2 punch.raw && qemu-img create -q -f qcow2 punch.qcow2 64M && "
                    "qemu-io -c 'write -P 0x61 5M 1M' punch.qcow2 >/dev/null && "
                    "qemu-img create -q -f raw punch.raw 64M && "
                    "qemu-io -f raw -c 'write -P 0xee 0 64M' punch.raw >/dev/null && sync punch.raw") == 0);
  std::string du;
  REQUIRE(InSources("du -k punch.raw | cut -f1", &du) == 0);
  REQUIRE(std::stoull(du) >= 64 * 1024);
  REQUIRE(InSources(Ours() + " convert -n -O raw punch.qcow2 punch.raw") == 0);
  CHECK(InSources("qemu-img compare -q punch.qcow2 punch.raw") == 0);
  REQUIRE(InSources("du -k punch.raw | cut -f1", &du) == 0);
  CHECK(std::stoull(du) <= 2 * 1024);  // the 1 MiB of data, and no more than a MiB besides
  InSources("rm -f punch.qcow2 punch.raw");
}

TEST_CASE("convert -p shows progress and bad command lines fail as in qemu-img", "[convert]") {
  SKIP_WITHOUT_QEMU();
  std::string out;
  REQUIRE(InSources(Ours() + " convert -p -O qcow2 src.raw ours.img", &out) == 0);
  CHECK(out.find("(100.00/100%)") != std::string::npos);
  const std::vector<std::string> bad = {
      "-c -O raw src.raw x.img",
      "-m 17 -O qcow2 src.raw x.img",
      "-S 1000 -O qcow2 src.raw x.img",
      "--target-is-zero -O qcow2 src.raw x.img",
      "-O qcow2 missing.raw x.img",
      "-O qcow2 -B base.qcow2 top.qcow2 x.img",
      "-O qcow2 src.raw",
      "-O qcow2 -o cluster_size=3k src.raw x.img",
      "-O qcow2 -o nosuch=1 src.raw x.img",
  };
  for (const std::string& args : bad) {
    INFO(args);
    const int theirs = InSources("rm -f x.img; qemu-img convert " + args + " >/dev/null 2>&1");
    const int ours = InSources("rm -f x.img; " + Ours() + " convert " + args + " >/dev/null 2>&1");
    CHECK(theirs != 0);
    CHECK(ours == theirs);
  }
  CHECK(InSources(Ours() + " convert -c -o compression_level=10 -O qcow2 src.raw x.img 2>/dev/null") == 1);
}

namespace {

uint64_t BigEndian64(const std::vector<uint8_t>& b, size_t at) {
  uint64_t v = 0;
  for (size_t i = 0; i < 8; i++) v = v << 8 | b[at + i];
  return v;
}

void PutBigEndian64(std::vector<uint8_t>* b, size_t at, uint64_t v) {
  for (size_t i = 0; i < 8; i++) (*b)[at + i] = static_cast<uint8_t>(v >> (56 - 8 * i));
}

// The warnings of a salvaging convert, tool name and reason dropped (ours
// name the file and what is wrong where qemu-img says "Input/output
// error"); lines that are not warnings (QEMU's "Image is corrupt") dropped.
std::vector<std::string> SalvageWarnings(const std::string& err) {
  std::vector<std::string> lines;
  size_t pos = 0;
  while (pos < err.size()) {
    const size_t end = std::min(err.find('\n', pos), err.size());
    const std::string line = err.substr(pos, end - pos);
    pos = end + 1;
    const size_t w = line.find("warning: error while reading ");
    if (w == std::string::npos) continue;
    const size_t colon = line.find(':', line.find("offset ", w));
    lines.push_back(line.substr(w, colon - w));
  }
  return lines;
}

}  // namespace

// --salvage: where the source cannot be read, qemu-img writes zeros and warns
// once per sector; ours does the same, and the outputs read identically.
// Two damaged images: a compressed cluster whose deflate data is garbage
// (the read fails), and an L2 table offset that is not cluster aligned
// (block status fails first, then the read).
TEST_CASE("convert --salvage writes zeros for what cannot be read, as qemu-img", "[convert][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() +
          "' && qemu-img create -q -f qcow2 plain.qcow2 1M && qemu-io -c 'write -P 0xab 0 64k'"
          " -c 'write -P 0xcd 128k 64k' plain.qcow2 >/dev/null && qemu-img convert -c -O qcow2 plain.qcow2 comp.qcow2"
          " && qemu-img create -q -f qcow2 -o cluster_size=1k l2.qcow2 512k && qemu-io -c 'write -P 7 0 512k' l2.qcow2"
          " >/dev/null && head -c 65536 /dev/urandom > good.raw");
  {
    std::vector<uint8_t> comp = ReadWholeFile(dir / "comp.qcow2");
    const uint64_t l2 = BigEndian64(comp, BigEndian64(comp, 40)) & 0x00fffffffffffe00ULL;
    const uint64_t entry = BigEndian64(comp, l2);
    REQUIRE((entry >> 62) == 1);                             // compressed
    const uint64_t data = entry & ((1ULL << (62 - 8)) - 1);  // 64 KiB clusters: 54 offset bits
    std::fill(comp.begin() + static_cast<long>(data), comp.begin() + static_cast<long>(data) + 16, 0xff);
    WriteWholeFile(dir / "comp.qcow2", comp);
    std::vector<uint8_t> l2img = ReadWholeFile(dir / "l2.qcow2");
    const uint64_t l1 = BigEndian64(l2img, 40);
    PutBigEndian64(&l2img, l1 + 8, BigEndian64(l2img, l1 + 8) + 512);  // L1[1]: guest 128k-256k
    WriteWholeFile(dir / "l2.qcow2", l2img);
  }
  struct Case {
    const char* args;
    bool block_status;  // qemu-img warns twice per sector there: compare the sets of lines
  };
  const Case kCases[] = {
      {"--salvage -O raw comp.qcow2", false},
      {"--salvage -O qcow2 comp.qcow2", false},
      {"--salvage -c -O qcow2 comp.qcow2", false},
      {"--salvage -O raw good.raw comp.qcow2", false},
      {"-q --salvage -O raw comp.qcow2", false},
      {"--salvage -O raw l2.qcow2", true},
      {"--salvage -O qcow2 -m 1 l2.qcow2", true},
      {"-O raw comp.qcow2", false},
      {"-O qcow2 l2.qcow2", false},
  };
  for (const Case& c : kCases) {
    INFO("convert " << c.args);
    const SplitResult theirs = Exec(dir.path(), dir.path(), "qemu-img convert " + std::string(c.args) + " q.img");
    const SplitResult ours = Exec(dir.path(), dir.path(), Ours() + " convert " + c.args + " o.img");
    INFO("qemu-img: " << theirs.err.substr(0, 2000) << "\ndmcow-img: " << ours.err.substr(0, 2000));
    CHECK(ours.rc == theirs.rc);
    CHECK(ours.out == theirs.out);
    std::vector<std::string> q = SalvageWarnings(theirs.err), o = SalvageWarnings(ours.err);
    if (c.block_status) {
      std::sort(q.begin(), q.end());
      q.erase(std::unique(q.begin(), q.end()), q.end());
      std::sort(o.begin(), o.end());
    }
    const bool same_warnings = o == q;
    CHECK(same_warnings);
    CHECK(o.size() == q.size());
    const bool quiet = std::string(c.args).find("-q") != std::string::npos;
    if (quiet) CHECK(ours.err.empty());
    if (theirs.rc != 0) {
      CHECK(ours.err.find("error while reading") != std::string::npos);
      continue;
    }
    CHECK(o.empty() == quiet);
    CHECK(Exec(dir.path(), "qemu-img compare q.img o.img").rc == 0);
    if (std::string(c.args).find("qcow2 ") != std::string::npos)
      CHECK(Exec(dir.path(), "qemu-img check o.img").rc == 0);
  }
  // qemu-img's refusals of -C (copy offloading) beside --salvage, -c, -S.
  for (const char* args : {"-C --salvage", "--salvage -C -c -O qcow2", "-C -S 4k", "-C -S 0 --salvage", "-W -C"}) {
    INFO("convert " << args);
    const std::string tail = std::string(" convert ") + args + " plain.qcow2 ";
    CheckSameAsQemu(Exec(dir.path(), dir.path(), "qemu-img" + tail + "q.img"),
                    Exec(dir.path(), dir.path(), Ours() + tail + "q.img"));
  }
}
