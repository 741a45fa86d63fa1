// dmcow-img against the real qemu-img 7.2: the same images (made by qemu-img
// and qemu-io) go through both tools and their outputs must agree: info
// (human and JSON, byte for byte), map, convert -O raw, compare exit codes
// and messages, and checksum against sha256sum of qemu-img's conversion.
// Skipped with a warning when qemu-img is not installed.
#include <sys/stat.h>
#include <sys/wait.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdio>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "test_util.h"

using namespace dmcow_test;
using nlohmann::json;

namespace {

uint64_t AllocatedBytes(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_blocks) * 512 : 0;
}

// Images made once by qemu-img/qemu-io, shared by every test case.
class Images {
 public:
  static Images& Get() {
    static Images images;
    return images;
  }

  const std::string& dir() const { return tmp_.path(); }
  std::string operator/(const std::string& name) const { return tmp_ / name; }

  // Every image, as a path relative to dir().
  const std::vector<std::string> all = {"raw.raw",        "empty.raw",   "base.qcow2", "top.qcow2",     "v2.qcow2",
                                        "comp.qcow2",     "zstd.qcow2",  "el2.qcow2",  "extdata.qcow2", "lazy.qcow2",
                                        "qcow1.qcow",     "short.qcow2", "tall.qcow2", "sub/rel.qcow2", "rawback.qcow2",
                                        "prealloc.qcow2", "zeros.qcow2", "holes.qcow2"};
  // Images with a backing file.
  const std::vector<std::string> chains = {"top.qcow2", "tall.qcow2", "sub/rel.qcow2", "rawback.qcow2"};

 private:
  Images() {
    const char* script[] = {
        "qemu-img create -f raw raw.raw 64M",
        "qemu-io -f raw -c 'write -P 0xab 1M 64k' -c 'write -P 0 8M 64k' -c 'write -P 0xcd 67104768 4k' raw.raw",
        "qemu-img create -f raw empty.raw 0",
        "qemu-img create -f qcow2 base.qcow2 64M",
        ("qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 4M 64k' -c 'write -c -P 3 8M 128k' -c 'write -z 12M 64k'"
         " base.qcow2"),  // one line (parentheses: a wrapped string, not a missing comma)
        "qemu-img create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2",
        "qemu-io -c 'write -P 4 512k 1M' -c 'write -z 4M 64k' -c 'write -P 0 10M 64k' top.qcow2",
        "qemu-img snapshot -c snap1 top.qcow2",
        "qemu-io -c 'write -P 5 20M 192k' -c 'write -z 0 64k' top.qcow2",
        "qemu-img bitmap --add top.qcow2 bm0",
        "qemu-img create -f qcow2 -o compat=0.10 v2.qcow2 32M",
        "qemu-io -c 'write -P 6 0 100k' -c 'write -P 7 16M 64k' v2.qcow2",
        "qemu-img convert -c -O qcow2 base.qcow2 comp.qcow2",
        "qemu-img create -f qcow2 -o compression_type=zstd zstd.qcow2 16M",
        "qemu-io -c 'write -c -P 3 0 64k' -c 'write -P 4 1M 64k' zstd.qcow2",
        "qemu-img create -f qcow2 -o extended_l2=on el2.qcow2 16M",
        "qemu-io -c 'write -P 9 4k 8k' -c 'write -z 64k 64k' -c 'write -P 1 1M 3k' el2.qcow2",
        "qemu-img create -f qcow2 -o data_file=extdata.bin extdata.qcow2 16M",
        "qemu-io -c 'write -P 9 64k 64k' extdata.qcow2",
        "qemu-img create -f qcow2 -o lazy_refcounts=on lazy.qcow2 16M",
        "ulimit -c 0; qemu-io -c 'write -P 8 0 64k' -c abort lazy.qcow2; true",
        "qemu-img create -f qcow qcow1.qcow 10M",
        "qemu-io -f qcow -c 'write -P 9 8k 4k' qcow1.qcow",
        "qemu-img create -f qcow2 short.qcow2 1M",
        "qemu-io -c 'write -P 1 0 1M' short.qcow2",
        "qemu-img create -f qcow2 -b short.qcow2 -F qcow2 tall.qcow2 4M",
        "qemu-io -c 'write -P 2 3M 64k' tall.qcow2",
        "mkdir sub && qemu-img create -f qcow2 -b ../base.qcow2 -F qcow2 sub/rel.qcow2",
        "qemu-io -c 'write -P 3 2M 64k' sub/rel.qcow2",
        "qemu-img create -f qcow2 -b raw.raw -F raw rawback.qcow2",
        "qemu-io -c 'write -P 4 1M 4k' rawback.qcow2",
        // Data clusters that are holes in the file: QEMU takes these images
        // for metadata-preallocated and reports the holes as zeros.
        "qemu-img create -f qcow2 -o preallocation=metadata prealloc.qcow2 16M",
        "qemu-io -c 'write -P 1 1M 64k' -c 'write -P 2 5M 4k' prealloc.qcow2",
        "qemu-img create -f qcow2 zeros.qcow2 16M",
        "qemu-io -c 'write -P 0 0 2M' -c 'write -P 3 4M 64k' -c 'write -P 0 8M 1M' zeros.qcow2",
        "cp --sparse=always zeros.qcow2 holes.qcow2",
    };
    for (const char* step : script) MustRun("cd '" + tmp_.path() + "' && " + step + " >/dev/null");
  }

  TempDir tmp_;
};

// Runs the same command line through both tools; stdout and exit code must match.
void CheckSame(const std::string& args) {
  Images& img = Images::Get();
  Result theirs = Exec(img.dir(), "qemu-img " + args);
  Result ours = Exec(img.dir(), Ours() + " " + args);
  INFO("command: " << args);
  CHECK(ours.out == theirs.out);
  CHECK(ours.rc == theirs.rc);
}

}  // namespace

TEST_CASE("info matches qemu-img", "[cli]") {
  SKIP_WITHOUT_QEMU();
  Images& img = Images::Get();
  for (const std::string& name : img.all) {
    CheckSame("info " + name);
    CheckSame("info --output=json " + name);
    CheckSame("info -U --output json '" + (img / name) + "'");
    // Same fields and values as parsed JSON too (clearer failure reports).
    Result theirs = Exec(img.dir(), "qemu-img info --output=json " + name);
    Result ours = Exec(img.dir(), Ours() + " info --output=json " + name);
    INFO("image: " << name);
    CHECK(json::parse(ours.out, nullptr, false) == json::parse(theirs.out, nullptr, false));
  }
  for (const std::string& name : img.chains) {
    CheckSame("info --backing-chain " + name);
    CheckSame("info --backing-chain --output=json " + name);
  }
}

TEST_CASE("map matches qemu-img", "[cli]") {
  SKIP_WITHOUT_QEMU();
  Images& img = Images::Get();
  for (const std::string& name : img.all) {
    CheckSame("map --output=json " + name);
    CheckSame("map " + name);  // fails (exit 1) like qemu-img on compressed clusters
  }
  CheckSame("map --output=json --start-offset 1000 --max-length 5000000 top.qcow2");
  CheckSame("map --output=json --start-offset 1.5k --max-length 0x1000 raw.raw");
  CheckSame("map --output=json --start-offset 100M raw.raw");
  CheckSame("map --start-offset 1M --max-length 64k raw.raw");
}

TEST_CASE("convert -O raw is byte-identical to qemu-img's and sparse", "[cli]") {
  SKIP_WITHOUT_QEMU();
  Images& img = Images::Get();
  for (const std::string* sampled : Sampled(img.all)) {
    const std::string& name = *sampled;
    INFO("image: " << name);
    REQUIRE(Exec(img.dir(), "qemu-img convert -O raw " + name + " theirs.out").rc == 0);
    REQUIRE(Exec(img.dir(), Ours() + " convert -O raw " + name + " ours.out").rc == 0);
    CHECK(Exec(img.dir(), "cmp theirs.out ours.out").rc == 0);
    // qemu-img always allocates the first 4 KiB of a raw file; allow a little slack.
    CHECK(AllocatedBytes(img / "ours.out") <= AllocatedBytes(img / "theirs.out") + 64 * 1024);
  }
  SECTION("internal snapshot, all -l spellings") {
    REQUIRE(Exec(img.dir(), "qemu-img convert -O raw -l snap1 top.qcow2 theirs.out").rc == 0);
    for (const char* l : {"snap1", "1", "snapshot.name=snap1", "snapshot.id=1", "snapshot.id=1,snapshot.name=snap1"}) {
      INFO("-l " << l);
      REQUIRE(Exec(img.dir(), Ours() + " convert -l " + l + " top.qcow2 ours.out").rc == 0);
      CHECK(Exec(img.dir(), "cmp theirs.out ours.out").rc == 0);
    }
    CHECK(Exec(img.dir(), Ours() + " convert -l nope top.qcow2 ours.out").rc == 1);
    CHECK(Exec(img.dir(), Ours() + " convert -l snapshot.foo=1 top.qcow2 ours.out").rc == 1);
  }
  SECTION("-S 0 allocates everything, -p prints progress") {
    Result r = Exec(img.dir(), Ours() + " convert -p -S 0 -f qcow2 -O raw top.qcow2 ours.out");
    REQUIRE(r.rc == 0);
    CHECK(r.out.find("(100.00/100%)") != std::string::npos);
    CHECK(AllocatedBytes(img / "ours.out") >= 64u << 20);
    REQUIRE(Exec(img.dir(), "qemu-img convert -O raw top.qcow2 theirs.out").rc == 0);
    CHECK(Exec(img.dir(), "cmp theirs.out ours.out").rc == 0);
  }
  SECTION("refused options") {
    CHECK(Exec(img.dir(), Ours() + " convert -O nosuchfmt top.qcow2 ours.out").rc == 1);
    CHECK(Exec(img.dir(), Ours() + " convert -S 1000 top.qcow2 ours.out").rc == 1);
    CHECK(Exec(img.dir(), Ours() + " convert missing.qcow2 ours.out").rc == 1);
    CHECK(Exec(img.dir(), Ours() + " convert top.qcow2 nodir/ours.out").rc == 1);
  }
}

// Whether an image counts as metadata-preallocated is decided from its
// refcounts (QEMU's qcow2_detect_metadata_preallocation): a hostile refcount
// table naming one block for a whole sparse terabyte, or a misaligned block,
// must give qemu-img's answer without walking the terabyte cluster by cluster.
TEST_CASE("map reads hostile refcount tables as qemu-img does when looking for preallocation", "[cli]") {
  SKIP_WITHOUT_QEMU();
  Images& img = Images::Get();
  auto get64 = [](const std::vector<uint8_t>& b, size_t at) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | b.at(at + i);
    return v;
  };
  auto put64 = [](std::vector<uint8_t>* b, size_t at, uint64_t v) {
    for (int i = 7; i >= 0; i--, v >>= 8) b->at(at + i) = static_cast<uint8_t>(v);
  };
  const std::vector<uint8_t> base = ReadWholeFile(img / "holes.qcow2");
  const uint64_t reftable = get64(base, 48);
  const uint64_t block = get64(base, reftable);
  REQUIRE(block != 0);
  struct Case {
    const char* name;
    std::function<void(std::vector<uint8_t>*)> edit;
    uint64_t truncate_to;  // 0: keep the size
  } cases[] = {
      {"one block named for a sparse terabyte",
       [&](std::vector<uint8_t>* b) {
         for (uint64_t i = 1; i < 1024; i++) put64(b, reftable + 8 * i, block);
       },
       uint64_t{1} << 40},
      {"a misaligned refcount block", [&](std::vector<uint8_t>* b) { put64(b, reftable, block + 512); }, 0},
  };
  for (const Case& c : cases) {
    INFO(c.name);
    std::vector<uint8_t> bytes = base;
    c.edit(&bytes);
    WriteWholeFile(img / "hostile.qcow2", bytes);
    if (c.truncate_to) MustRun("truncate -s " + std::to_string(c.truncate_to) + " '" + (img / "hostile.qcow2") + "'");
    CheckSame("map --output=json hostile.qcow2");
    CheckSame("map hostile.qcow2");
  }
  std::remove((img / "hostile.qcow2").c_str());
}

TEST_CASE("compare agrees with qemu-img", "[cli]") {
  SKIP_WITHOUT_QEMU();
  Images& img = Images::Get();
  MustRun("cd '" + img.dir() +
          "' && qemu-img convert -O raw top.qcow2 top.raw"
          " && cp top.raw padded.raw && truncate -s 65M padded.raw"
          " && cp top.raw tail.raw && truncate -s 65M tail.raw"
          " && printf X | dd of=tail.raw bs=1 seek=67200000 conv=notrunc 2>/dev/null"
          " && cp top.raw flip.raw && printf X | dd of=flip.raw bs=1 seek=3000001 conv=notrunc 2>/dev/null"
          " && qemu-img create -f raw big.raw 65M");
  const char* pairs[] = {
      "top.qcow2 top.raw",
      "-s top.qcow2 top.raw",
      "base.qcow2 top.qcow2",
      "top.raw big.raw",
      "raw.raw big.raw",
      "-s top.raw big.raw",
      "big.raw raw.raw",
      "top.raw padded.raw",
      "padded.raw top.qcow2",
      "top.raw tail.raw",
      "-s top.qcow2 top.qcow2",
      "top.raw flip.raw",
      "comp.qcow2 base.qcow2",
      "-s comp.qcow2 base.qcow2",
      "-q top.raw flip.raw",
      "-f qcow2 -F raw top.qcow2 top.raw",
      "tall.qcow2 short.qcow2",
      "raw.raw missing.raw",
      "-f qcow2 raw.raw raw.raw",
      "top.raw",
      "-s zeros.qcow2 holes.qcow2",
      "zeros.qcow2 holes.qcow2",
      "-s holes.qcow2 holes.qcow2",
      "-s prealloc.qcow2 zeros.qcow2",
      "-T none top.qcow2 top.raw",
      "-T bogus top.qcow2 top.raw",
  };
  for (const char* p : pairs) CheckSame(std::string("compare ") + p);
  // Progress steps differ from qemu-img's (other chunking); the result does not.
  Result r = Exec(img.dir(), Ours() + " compare -p top.qcow2 top.raw");
  CHECK(r.rc == 0);
  CHECK(r.out.find("(100.00/100%)\rImages are identical.\n\n") != std::string::npos);
}

// compare reads on several threads, in 256 KiB pieces dealt in turn
// (cli/range_compare.h); what it reports must still be what qemu-img's
// chunk-by-chunk reading meets first. Pieces 1 and 2 of the first 2 MiB
// chunk go to different threads where there are two cores or more (CI has
// two); tests/range_compare_test.cc holds the rule on 1 to 16 threads.
TEST_CASE("compare on several threads reports what qemu-img meets first", "[cli]") {
  SKIP_WITHOUT_QEMU();
  Images& img = Images::Get();
  // base.qcow2 holds 1 MiB of 0x01 at 0 and 64 KiB of 0x02 at 4 MiB.
  MustRun("cd '" + img.dir() +
          "' && qemu-img convert -O raw base.qcow2 base.raw && qemu-img convert -c -O qcow2 base.qcow2 bad0.qcow2"
          " && cp bad0.qcow2 bad2.qcow2"
          " && cp base.raw flip1.raw && printf X | dd of=flip1.raw bs=1 seek=300000 conv=notrunc 2>/dev/null"
          " && cp flip1.raw flip12.raw && printf X | dd of=flip12.raw bs=1 seek=600000 conv=notrunc 2>/dev/null"
          " && cp base.raw flip2.raw && printf X | dd of=flip2.raw bs=1 seek=600000 conv=notrunc 2>/dev/null");
  // Garbage over one compressed cluster: at 512 KiB (piece 2, chunk 0) in
  // bad0, at 4 MiB (chunk 2) in bad2. Their L2 table is L1[0]'s.
  auto corrupt_cluster = [&](const std::string& name, uint64_t guest) {
    std::vector<uint8_t> bytes = ReadWholeFile(img / name);
    const uint64_t l2 = BE64(bytes, BE64(bytes, 40)) & 0x00fffffffffffe00ULL;
    const uint64_t entry = BE64(bytes, l2 + 8 * (guest >> 16));
    REQUIRE((entry >> 62 & 1) == 1);  // compressed
    const uint64_t host = entry & ((1ULL << 54) - 1);
    for (uint64_t i = 0; i < 64; i++) bytes.at(host + i) = 0xff;
    WriteWholeFile(img / name, bytes);
  };
  corrupt_cluster("bad0.qcow2", 512 << 10);
  corrupt_cluster("bad2.qcow2", 4 << 20);
  // Mismatches in two threads' pieces: the lower one is reported. A
  // compressed image's extents are one cluster each, for qemu-img too: a
  // mismatch in an earlier cluster is met before a read error in a later one.
  for (const char* p :
       {"flip12.raw base.raw", "base.raw flip12.raw", "flip2.raw base.qcow2", "flip1.raw base.qcow2",
        "bad0.qcow2 flip1.raw", "flip1.raw bad0.qcow2", "bad2.qcow2 flip1.raw", "-s flip1.raw base.qcow2",
        "-s base.qcow2 flip1.raw", "-s bad0.qcow2 base.qcow2", "-s bad2.qcow2 base.raw"}) {
    CheckSame(std::string("compare ") + p);
  }
  CHECK(Exec(img.dir(), Ours() + " compare flip12.raw base.raw").out == "Content mismatch at offset 299520!\n");
  // Read errors: the same exit code and offset; the text after the file
  // name is the engine's own.
  for (const char* p : {"bad0.qcow2 base.raw", "base.raw bad0.qcow2", "bad0.qcow2 bad2.qcow2", "bad2.qcow2 base.raw"}) {
    INFO("compare " << p);
    Result theirs = ExecErr(img.dir(), std::string("qemu-img compare ") + p);
    Result ours = ExecErr(img.dir(), Ours() + " compare " + p);
    CHECK(theirs.rc == 4);
    CHECK(ours.rc == theirs.rc);
    const std::string expected = ReplaceAll(theirs.out, "qemu-img", "dmcow-img");
    const size_t cut = expected.find(".qcow2: ");
    REQUIRE(cut != std::string::npos);
    CHECK(ours.out.substr(0, cut) == expected.substr(0, cut));
  }
}

// The default digest is blk-sha256 (docs/checksum.md), held to
// BlockDigestOfFile, which computes it from its definition over the bytes
// qemu-img's raw conversion holds; -a sha256 is sha256sum of them.
TEST_CASE("checksum is the block digest of the raw conversion; -a sha256 its sha256sum", "[cli]") {
  SKIP_WITHOUT_QEMU();
  Images& img = Images::Get();
  for (const std::string* sampled : Sampled(img.all)) {
    const std::string& name = *sampled;
    INFO("image: " << name);
    REQUIRE(Exec(img.dir(), "qemu-img convert -O raw " + name + " theirs.out").rc == 0);
    Result ours = Exec(img.dir(), Ours() + " checksum " + name);
    REQUIRE(ours.rc == 0);
    CHECK(ours.out == BlockDigestOfFile(img / "theirs.out") + "  " + name + "\n");
    Result plain = Exec(img.dir(), Ours() + " checksum -a sha256 " + name);
    REQUIRE(plain.rc == 0);
    CHECK(plain.out == Sha256OfFile(img / "theirs.out") + "  " + name + "\n");
    CHECK(Exec(img.dir(), Ours() + " checksum --algorithm=blk-sha256 " + name).out == ours.out);
  }
  // Same content in other formats, cluster sizes, chain shapes, and zeros
  // stored as written zeros (-S 0), zero clusters or holes.
  MustRun("cd '" + img.dir() +
          "' && qemu-img convert -O qcow2 -o cluster_size=4k top.qcow2 flat4k.qcow2"
          " && qemu-img convert -c -O qcow2 top.qcow2 flatc.qcow2 && qemu-img convert -O raw top.qcow2 top.raw"
          " && qemu-img convert -S 0 -O qcow2 top.qcow2 full.qcow2 && cp top.qcow2 zeroed.qcow2"
          " && qemu-io -c 'write -z 0 64k' -c 'write -P 0 2M 64k' -c 'write -z -u 4M 128k' zeroed.qcow2 >/dev/null"
          " && qemu-img convert -O raw zeroed.qcow2 zeroed.raw");
  const std::string expected = BlockDigestOfFile(img / "top.raw");
  for (const char* name : {"top.qcow2", "flat4k.qcow2", "flatc.qcow2", "top.raw", "full.qcow2"}) {
    INFO(name);
    Result r = Exec(img.dir(), Ours() + " checksum " + name);
    CHECK(r.out.substr(0, 64) == expected);
  }
  CHECK(Exec(img.dir(), Ours() + " checksum zeroed.qcow2").out.substr(0, 64) == BlockDigestOfFile(img / "zeroed.raw"));
  // Bad input: a missing image, an unknown algorithm, no algorithm.
  CHECK(Exec(img.dir(), Ours() + " checksum missing.qcow2").rc == 1);
  SplitResult bad = Exec(img.dir(), img.dir(), Ours() + " checksum -a md5 top.qcow2");
  CHECK(bad.rc == 1);
  CHECK(bad.out.empty());
  CHECK(bad.err == "dmcow-img: Unknown checksum algorithm 'md5': use blk-sha256 or sha256\n");
  SplitResult none = Exec(img.dir(), img.dir(), Ours() + " checksum top.qcow2 -a");
  CHECK(none.rc == 1);
  CHECK(none.out.empty());
}

TEST_CASE("odd-size raw files are seen as qemu-img sees them", "[cli]") {
  SKIP_WITHOUT_QEMU();
  Images& img = Images::Get();
  MustRun("cd '" + img.dir() +
          "' && head -c 1000001 /dev/urandom > odd.raw"
          " && qemu-img create -f qcow2 -b odd.raw -F raw oddback.qcow2 2M >/dev/null");
  for (const char* name : {"odd.raw", "oddback.qcow2"}) {
    CheckSame(std::string("info --backing-chain --output=json ") + name);
    CheckSame(std::string("map --output=json ") + name);
    CheckSame(std::string("compare odd.raw ") + name);
  }
  CheckSame("info -f raw top.qcow2");
  REQUIRE(Exec(img.dir(), "qemu-img convert -O raw odd.raw theirs.out").rc == 0);
  REQUIRE(Exec(img.dir(), Ours() + " convert -O raw odd.raw ours.out").rc == 0);
  CHECK(Exec(img.dir(), "cmp theirs.out ours.out").rc == 0);
}

// Scripts read qemu-img's version from the first line's third word.
TEST_CASE("--version prints a first line shaped as qemu-img's", "[cli]") {
  SKIP_WITHOUT_QEMU();
  for (const char* flag : {"--version", "-V"}) {
    Result ours = Exec(".", Ours() + " " + flag + " | head -1 | awk '{print $1, $2, $3}'");
    Result theirs = Exec(".", std::string("qemu-img ") + flag + " | head -1 | awk '{print $2, $3}'");
    INFO(ours.out << theirs.out);
    CHECK(ours.out.rfind("dmcow-img version 7.2.", 0) == 0);
    CHECK(theirs.out.rfind("version 7.2.", 0) == 0);  // the release we are measured against
    CHECK(Exec(".", Ours() + " " + flag).rc == 0);
  }
}

// -T/--trace before the command only sets up QEMU's tracing: accepted, ignored.
TEST_CASE("the global trace option is accepted as qemu-img accepts it", "[cli]") {
  SKIP_WITHOUT_QEMU();
  for (const char* global : {"-T foo", "-Tfoo", "--trace foo", "--trace=enable=x", "-T a -T b"}) {
    CheckSame(std::string(global) + " info --output=json base.qcow2");
  }
  for (const char* bad : {"-X info base.qcow2", "-T", "--bogus info base.qcow2"}) {
    Images& img = Images::Get();
    Result theirs = ExecErr(img.dir(), std::string("qemu-img ") + bad);
    Result ours = ExecErr(img.dir(), Ours() + " " + bad);
    INFO(bad);
    CHECK(ours.rc == theirs.rc);
    CHECK(ReplaceAll(ours.out, "dmcow-img", "qemu-img") == theirs.out);
  }
}

TEST_CASE("command line handling", "[cli]") {
  TempDir tmp;
  CHECK(Exec(tmp.path(), Ours() + " --help").rc == 0);
  CHECK(Exec(tmp.path(), Ours() + " info --help").rc == 0);
  CHECK(Exec(tmp.path(), Ours()).rc == 1);
  CHECK(Exec(tmp.path(), Ours() + " frobnicate x").rc == 1);
  CHECK(Exec(tmp.path(), Ours() + " info --bogus x").rc == 1);
  CHECK(Exec(tmp.path(), Ours() + " info").rc == 1);
  CHECK(Exec(tmp.path(), Ours() + " info missing.img").rc == 1);
  CHECK(Exec(tmp.path(), Ours() + " compare missing.img missing.img").rc == 2);
  CHECK(Exec(tmp.path(), Ours() + " compare onlyone.img").rc == 1);
  MustRun("truncate -s 1M '" + (tmp / "a.raw") + "'");
  CHECK(Exec(tmp.path(), Ours() + " info --output=xml a.raw").rc == 1);
  CHECK(Exec(tmp.path(), Ours() + " map --start-offset abc a.raw").rc == 1);
  Result r = Exec(tmp.path(), Ours() + " info --output=json a.raw");
  REQUIRE(r.rc == 0);
  json j = json::parse(r.out, nullptr, false);
  CHECK(j["virtual-size"] == 1048576);
  CHECK(j["format"] == "raw");
}

// Format rules QEMU enforces that dmcow once let through (issue 22, found by
// mutation fuzzing), on images qemu-img and qemu-io made and one field then
// changed: every command agrees with qemu-img on the exit status (and on
// stdout where both succeed). The one knowing difference: qemu-img info
// opens with no I/O and so shows data-file-raw-without-data-file, which our
// info refuses as every other command does (docs/format-rules.md).
namespace {

uint64_t GetBE(const std::vector<uint8_t>& b, uint64_t off, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; i++) v = (v << 8) | b.at(off + i);
  return v;
}

void SetBE64(std::vector<uint8_t>* b, uint64_t off, uint64_t v) {
  for (int i = 0; i < 8; i++) b->at(off + i) = static_cast<uint8_t>(v >> (8 * (7 - i)));
}

// Rewrites `path` through `edit`.
template <typename F>
void Patch(const std::string& path, F edit) {
  std::vector<uint8_t> b = ReadWholeFile(path);
  edit(&b);
  WriteWholeFile(path, b);
}

}  // namespace

TEST_CASE("images QEMU refuses, or sizes in whole sectors, are seen as qemu-img sees them", "[cli][qemu-rules]") {
  SKIP_WITHOUT_QEMU();
  TempDir tmp;
  const std::string dir = tmp.path();
  auto sh = [&](const std::string& cmd) { MustRun("cd '" + dir + "' && " + cmd + " >/dev/null"); };
  const uint64_t kOffsetMask = 0x00fffffffffffe00ULL;

  // 1. v2 image, bit 0 of the first L2 entry set (the reproducer).
  sh("qemu-img create -q -f qcow2 -o compat=0.10 v2zero.qcow2 1M && qemu-io -c 'write -P 0x44 0 64k' v2zero.qcow2");
  Patch(tmp / "v2zero.qcow2", [&](std::vector<uint8_t>* b) {
    const uint64_t l2 = GetBE(*b, GetBE(*b, 40, 8), 8) & kOffsetMask;
    b->at(l2 + 7) |= 1;
  });
  // 2. Autoclear bit 1 (data-file-raw) without an external data file.
  sh("qemu-img create -q -f qcow2 rawbit.qcow2 1M && qemu-io -c 'write -P 0x45 0 64k' rawbit.qcow2");
  Patch(tmp / "rawbit.qcow2", [](std::vector<uint8_t>* b) { b->at(95) |= 2; });
  // 3. A persistent bitmap whose table entry has reserved bit 1 set.
  sh("qemu-img create -q -f qcow2 -o cluster_size=4096 bmres.qcow2 1M && qemu-img bitmap --add bmres.qcow2 bm0"
     " && qemu-io -c 'write -P 0x46 0 64k' bmres.qcow2");
  Patch(tmp / "bmres.qcow2", [&](std::vector<uint8_t>* b) {
    uint64_t off = GetBE(*b, 100, 4), dir_offset = 0;
    while (GetBE(*b, off, 4) != 0) {
      if (GetBE(*b, off, 4) == 0x23852875) dir_offset = GetBE(*b, off + 24, 8);
      off += 8 + ((GetBE(*b, off + 4, 4) + 7) & ~uint64_t{7});
    }
    REQUIRE(dir_offset != 0);
    const uint64_t table = GetBE(*b, dir_offset, 8);
    REQUIRE(GetBE(*b, table, 8) != 0);  // the write set bits: the entry points at a data cluster
    SetBE64(b, table, GetBE(*b, table, 8) | 2);
  });
  // 4. Virtual sizes that are not a multiple of 512, qcow2 and qcow v1,
  // with data in the last sectors.
  sh("qemu-img create -q -f qcow2 odd.qcow2 16M && qemu-io -c 'write -P 0x55 16320k 64k' odd.qcow2");
  sh("qemu-img create -q -f qcow odd.qcow 16M && qemu-io -f qcow -c 'write -P 0x55 16320k 64k' odd.qcow");
  for (const char* name : {"odd.qcow2", "odd.qcow"}) {
    Patch(tmp / name, [](std::vector<uint8_t>* b) { SetBE64(b, 24, 16777215); });
  }

  auto same = [&](const std::string& args, bool compare_stdout) {
    Result theirs = Exec(dir, "qemu-img " + args);
    Result ours = Exec(dir, Ours() + " " + args);
    INFO("command: " << args << "\nqemu-img: rc " << theirs.rc << " [" << theirs.out << "]\ndmcow-img: rc " << ours.rc
                     << " [" << ours.out << "]");
    CHECK(ours.rc == theirs.rc);
    if (compare_stdout) CHECK(ours.out == theirs.out);
    return ours.rc;
  };
  // A refusal by us: exit 1, one line on stderr naming the file.
  auto refused = [&](const std::string& args, const std::string& file, const std::string& expect) {
    Result r = ExecErr(dir, Ours() + " " + args);
    INFO("dmcow-img " << args << ": rc " << r.rc << " stderr [" << r.out << "]");
    CHECK(r.rc == 1);
    CHECK(std::count(r.out.begin(), r.out.end(), '\n') == 1);
    CHECK(r.out.find(file) != std::string::npos);
    CHECK(r.out.find(expect) != std::string::npos);
  };

  SECTION("a zero cluster in a version 2 image") {
    same("info v2zero.qcow2", true);
    same("convert -O raw v2zero.qcow2 out.raw", true);
    refused("convert -O raw v2zero.qcow2 out.raw", "v2zero.qcow2", "zero cluster entry in a version 2");
    same("map --output=json v2zero.qcow2", false);
    refused("checksum v2zero.qcow2", "v2zero.qcow2", "zero cluster entry in a version 2");
    // qemu-img check counts nothing here (its check_refcounts_l2 treats the
    // entry as a zero cluster), and -r all leaves the image as it is; ours
    // does the same (and names the entry on stderr).
    same("check v2zero.qcow2", true);
    same("check --output=json v2zero.qcow2", true);
    sh("cp v2zero.qcow2 q.qcow2 && cp v2zero.qcow2 d.qcow2");
    Result theirs = Exec(dir, "qemu-img check -r all q.qcow2");
    Result ours = Exec(dir, Ours() + " check -r all d.qcow2");
    CHECK(ours.rc == theirs.rc);
    CHECK(ours.out == theirs.out);
    CHECK(Exec(dir, "cmp q.qcow2 v2zero.qcow2").rc == 0);
    CHECK(Exec(dir, "cmp d.qcow2 v2zero.qcow2").rc == 0);
    Result note = ExecErr(dir, Ours() + " check v2zero.qcow2");
    CHECK(note.out.find("zero cluster, which a version 2 image cannot hold") != std::string::npos);
  }
  SECTION("data-file-raw without a data file") {
    for (const char* cmd : {"convert -O raw rawbit.qcow2 out.raw", "map --output=json rawbit.qcow2",
                            "check rawbit.qcow2", "compare rawbit.qcow2 rawbit.qcow2"}) {
      same(cmd, true);
    }
    for (const char* cmd :
         {"info rawbit.qcow2", "convert -O raw rawbit.qcow2 out.raw", "map rawbit.qcow2", "checksum rawbit.qcow2"}) {
      refused(cmd, "rawbit.qcow2", "data-file-raw (autoclear feature bit 1) is set");
    }
    CHECK(Exec(dir, "qemu-img info rawbit.qcow2").rc == 0);  // the knowing difference
  }
  SECTION("a bitmap table entry with a reserved bit set") {
    for (const char* cmd : {"info bmres.qcow2", "convert -O raw bmres.qcow2 out.raw", "map --output=json bmres.qcow2",
                            "check bmres.qcow2", "check -r all bmres.qcow2", "compare bmres.qcow2 bmres.qcow2"}) {
      same(cmd, true);
    }
    for (const char* cmd :
         {"info bmres.qcow2", "convert -O raw bmres.qcow2 out.raw", "check bmres.qcow2", "checksum bmres.qcow2"}) {
      refused(cmd, "bmres.qcow2", "bitmap 'bm0' has an invalid bitmap table entry");
    }
  }
  SECTION("virtual sizes in whole sectors") {
    for (const std::string name : {"odd.qcow2", "odd.qcow"}) {
      INFO("image " << name);
      same("info " + name, true);
      same("info --output=json " + name, true);
      same("map --output=json " + name, true);
      same("map " + name, true);
      REQUIRE(Exec(dir, "qemu-img convert -O raw " + name + " theirs.raw").rc == 0);
      REQUIRE(Exec(dir, Ours() + " convert -O raw " + name + " ours.raw").rc == 0);
      CHECK(ReadWholeFile(tmp / "ours.raw").size() == 16776704);
      CHECK(Exec(dir, "cmp theirs.raw ours.raw").rc == 0);
      same("compare " + name + " theirs.raw", true);
      same("compare -s " + name + " theirs.raw", true);
      Result sum = Exec(dir, Ours() + " checksum " + name);
      CHECK(sum.out == BlockDigestOfFile(tmp / "theirs.raw") + "  " + name + "\n");
    }
    same("compare odd.qcow2 odd.qcow", true);
    same("check odd.qcow2", true);
    same("check --output=json odd.qcow2", true);
  }
}

// convert and create read their command lines as qemu-img 7.2 does (GNU
// getopt_long): each line below runs through both tools, each in a fresh
// directory holding a 1 MiB src.raw (both), and stdout, stderr (qemu-img's name
// read as ours) and the exit status must be equal, byte for byte. Covered:
// unknown options and missing arguments with getopt's naming of the
// argument (argv[optind - 1]: "-qZ", "-qO", or the element before "-Zq"),
// a value given to a long flag, the first error in command-line order
// winning, -o lists (repeated, glued, ",," escapes, "help"), values glued
// to their option and options glued together, options after the operands,
// "--", unambiguous long-option prefixes, too few and too many operands.
TEST_CASE("convert and create read bad command lines as qemu-img does (word for word)", "[cli]") {
  SKIP_WITHOUT_QEMU();
  // qemu-img's result and ours.
  auto both = [](const std::string& args) {
    TempDir theirs_dir, ours_dir;
    MustRun("truncate -s 1M '" + (theirs_dir / "src.raw") + "' '" + (ours_dir / "src.raw") + "'");
    return std::make_pair(Exec(theirs_dir, "qemu-img", args), Ours(ours_dir, args));
  };
  auto same = [&](const std::string& args) {
    INFO("command: " << args);
    auto [theirs, ours] = both(args);
    theirs.err = ReplaceAll(theirs.err, "qemu-img", "dmcow-img");
    CHECK(ours.out == theirs.out);
    CHECK(ours.err == theirs.err);
    CHECK(ours.rc == theirs.rc);
  };
  const char* const kConvert[] = {
      // unknown options, missing arguments: getopt's words, naming argv[optind - 1]
      "--bogus src.raw x.img",
      "-Z src.raw x.img",
      "-qZ src.raw x.img",
      "-Zq src.raw x.img",
      "src.raw -Zq x.img",
      "-O",
      "src.raw x.img -O",
      "-qO",
      "--target-is-zero=1 -n src.raw x.img",
      "--help=x",
      "-Zh src.raw x.img",
      // the first error in command-line order is the one reported
      "-O qcow2 -o , -Z src.raw x.img",
      "-Z -o , src.raw x.img",
      "-m 17 -Z src.raw x.img",
      "-Z -m 17 src.raw x.img",
      "-S 1000 -O qcow2 src.raw x.img",
      // operands ("--" ends the options; too few: below)
      "-O qcow2 -B src.raw src.raw src.raw x.img",
      "--target-is-zero -- src.raw -n",
      "-O qcow2 src.raw -- -x.img",
      "-O qcow2 -o cluster_size=3k -- src.raw x.img",
      "src.raw x.img -O qcow2 -o cluster_size=3k",
      // -o: lists accumulate, the last value wins, help anywhere
      "-O qcow2 -o nosuch=1 src.raw x.img",
      "-O qcow2 -o , src.raw x.img",
      "-O qcow2 -o -x src.raw x.img",
      "-O qcow2 -o cluster_size=4k -o cluster_size=3k src.raw x.img",
      "-O qcow2 -o cluster_size=3k -o cluster_size=4k src.raw x.img",
      "-O qcow2 -o backing_file=c,,d,backing_fmt=raw -n src.raw x.img",
      "-O qcow2 -o help",
      "-O qcow2 -o cluster_size=4k -o help src.raw x.img",
      "-o help",
      "-n -O qcow2 -o cluster_size=4k src.raw x.img",
      // glued values and options
      "-Oqcow2 -ocluster_size=3k src.raw x.img",
      "-qpOqcow2 -ocluster_size=3k src.raw x.img",
      "-O -- src.raw x.img",
      "-c src.raw x.img",
      // long options by an unambiguous prefix
      "--force -O qcow2 -o , src.raw x.img",
      "--image-o -f raw src.raw x.img",
      // cache modes and the rate limit: checked as qemu-img checks them
      "-T bogus src.raw x.img",
      "-t off -T none -O qcow2 src.raw x.img",
      "-r abc src.raw x.img",
      "-r 1M -C -W -O qcow2 src.raw x.img",
  };
  for (const char* args : kConvert) same(std::string("convert ") + args);
  // Too few operands: qemu-img's message, which ours follows with its usage hint.
  for (const char* args : {"convert", "convert -O qcow2 src.raw"}) {
    INFO("command: " << args);
    auto [theirs, ours] = both(args);
    CHECK(theirs.err == "qemu-img: Must specify image file name\n");
    CHECK(ours.err == "dmcow-img: Must specify image file name\nTry 'dmcow-img --help' for more information\n");
    CHECK(ours.out == theirs.out);
    CHECK(ours.rc == theirs.rc);
  }
  const char* const kCreate[] = {
      "--bogus y.img 1M",
      "-Z y.img",
      "-qZ y.img 1M",
      "-Zq y.img",
      "y.img -Zq 1M",
      "-f",
      "-qf",
      "y.img 1M -f",
      "--help=x",
      "-Zh",
      "-o , -Z y.img",
      "-Z -o , y.img",
      "",
      "-u",
      "-q --",
      "-- --",
      "y.img 1M 2M",
      "-f qcow2 y.img 1M extra",
      "-f qcow2 -- -y.img 1M",
      "y.img 1M -f qcow2 -o cluster_size=3k",
      "-u -b -x.img -F raw -f qcow2 y.img 1M",
      "-u -b -x.img -f qcow2 y.img 1M",
      "-f qcow2 -o nosuch=1 y.img 1M",
      "-o , y.img 1M",
      "-o x -o y -f qcow2 y.img 1M",
      "-o size=1M -o size=2M -f qcow2 y.img",
      "-f qcow2 -u -b a,,b -F raw -o backing_file=c,,d y.img 1M",
      "-f qcow2 -u -o backing_file=c,,d -F raw y.img 1M",
      "-f qcow2 -b y.img -o backing_file=z.img y.img 1M",
      "-f qcow2 -o help",
      "-o help,cluster_size=3 -f qcow2",
      "-f qcow2 -o cluster_size=4k -o help",
      "-fqcow2 -qocluster_size=4k y.img 1M",
      "-fqcow2 -ocluster_size=3k y.img 1M",
  };
  for (const char* args : kCreate) same(std::string("create ") + args);
  // Help (-h, --help, a prefix of it, or -h before an unknown option): exit 0
  // with a usage text on stdout; the texts differ (qemu-img prints its whole help).
  for (const char* args : {"convert -h", "convert --help", "convert --he", "convert -hZ", "create -h", "create --help",
                           "create --h", "create -hZ y.img"}) {
    INFO("command: " << args);
    auto [theirs, ours] = both(args);
    CHECK(theirs.rc == 0);
    CHECK(ours.rc == 0);
    CHECK(!ours.out.empty());
    CHECK(ours.err.empty());
  }
}
