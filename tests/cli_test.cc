// dmcow-img against the real qemu-img 7.2: the same images (made by qemu-img
// and qemu-io) go through both tools and their outputs must agree: info
// (human and JSON, byte for byte), map, convert -O raw, compare exit codes
// and messages, and checksum against sha256sum of qemu-img's conversion.
// Skipped with a warning when qemu-img is not installed.
#include <sys/stat.h>
#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_util.h"

using namespace dmcow_test;
using nlohmann::json;

namespace {

const char kDmcowImg[] = DMCOW_IMG_PATH;

struct Result {
  int rc = -1;
  std::string out;  // stdout only
};

// Runs `command` in `dir` with /bin/sh; stderr is discarded.
Result Exec(const std::string& dir, const std::string& command) {
  std::string full = "cd '" + dir + "' && " + command + " 2>/dev/null";
  Result r;
  FILE* pipe = popen(full.c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) r.out.append(buf, n);
  int status = pclose(pipe);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string Ours() { return std::string("'") + kDmcowImg + "'"; }

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
  const std::vector<std::string> all = {
      "raw.raw",     "empty.raw",    "base.qcow2",   "top.qcow2",  "v2.qcow2",      "comp.qcow2",
      "zstd.qcow2",  "el2.qcow2",    "extdata.qcow2", "lazy.qcow2", "qcow1.qcow",   "short.qcow2",
      "tall.qcow2",  "sub/rel.qcow2", "rawback.qcow2"};
  // Images with a backing file.
  const std::vector<std::string> chains = {"top.qcow2", "tall.qcow2", "sub/rel.qcow2", "rawback.qcow2"};

 private:
  Images() {
    const char* script[] = {
        "qemu-img create -f raw raw.raw 64M",
        "qemu-io -f raw -c 'write -P 0xab 1M 64k' -c 'write -P 0 8M 64k' -c 'write -P 0xcd 67104768 4k' raw.raw",
        "qemu-img create -f raw empty.raw 0",
        "qemu-img create -f qcow2 base.qcow2 64M",
        "qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 4M 64k' -c 'write -c -P 3 8M 128k' -c 'write -z 12M 64k'"
        " base.qcow2",
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
    };
    for (const char* step : script) MustRun("cd '" + tmp_.path() + "' && " + step + " >/dev/null");
  }

  TempDir tmp_;
};

#define SKIP_WITHOUT_QEMU()                                   \
  do {                                                        \
    if (!HaveQemuImg()) {                                     \
      WARN("qemu-img/qemu-io not installed: test skipped");   \
      return;                                                 \
    }                                                         \
  } while (0)

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
  for (const std::string& name : img.all) {
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

TEST_CASE("compare agrees with qemu-img", "[cli]") {
  SKIP_WITHOUT_QEMU();
  Images& img = Images::Get();
  MustRun("cd '" + img.dir() + "' && qemu-img convert -O raw top.qcow2 top.raw"
          " && cp top.raw padded.raw && truncate -s 65M padded.raw"
          " && cp top.raw tail.raw && truncate -s 65M tail.raw"
          " && printf X | dd of=tail.raw bs=1 seek=67200000 conv=notrunc 2>/dev/null"
          " && cp top.raw flip.raw && printf X | dd of=flip.raw bs=1 seek=3000001 conv=notrunc 2>/dev/null"
          " && qemu-img create -f raw big.raw 65M");
  const char* pairs[] = {
      "top.qcow2 top.raw",     "-s top.qcow2 top.raw", "base.qcow2 top.qcow2", "top.raw big.raw",
      "raw.raw big.raw",       "-s top.raw big.raw",   "big.raw raw.raw",      "top.raw padded.raw",
      "padded.raw top.qcow2",  "top.raw tail.raw",     "-s top.qcow2 top.qcow2", "top.raw flip.raw",
      "comp.qcow2 base.qcow2", "-s comp.qcow2 base.qcow2", "-q top.raw flip.raw", "-f qcow2 -F raw top.qcow2 top.raw",
      "tall.qcow2 short.qcow2", "raw.raw missing.raw", "-f qcow2 raw.raw raw.raw",
      "top.raw",
  };
  for (const char* p : pairs) CheckSame(std::string("compare ") + p);
  // Progress steps differ from qemu-img's (other chunking); the result does not.
  Result r = Exec(img.dir(), Ours() + " compare -p top.qcow2 top.raw");
  CHECK(r.rc == 0);
  CHECK(r.out.find("(100.00/100%)\rImages are identical.\n\n") != std::string::npos);
}

TEST_CASE("checksum is sha256sum of the raw conversion", "[cli]") {
  SKIP_WITHOUT_QEMU();
  Images& img = Images::Get();
  for (const std::string& name : img.all) {
    INFO("image: " << name);
    REQUIRE(Exec(img.dir(), "qemu-img convert -O raw " + name + " theirs.out").rc == 0);
    Result ours = Exec(img.dir(), Ours() + " checksum " + name);
    REQUIRE(ours.rc == 0);
    CHECK(ours.out == Sha256OfFile(img / "theirs.out") + "  " + name + "\n");
  }
  // Same content in other formats, cluster sizes and chain shapes.
  MustRun("cd '" + img.dir() + "' && qemu-img convert -O qcow2 -o cluster_size=4k top.qcow2 flat4k.qcow2"
          " && qemu-img convert -c -O qcow2 top.qcow2 flatc.qcow2 && qemu-img convert -O raw top.qcow2 top.raw");
  std::string expected = Sha256OfFile(img / "top.raw");
  for (const char* name : {"top.qcow2", "flat4k.qcow2", "flatc.qcow2", "top.raw"}) {
    Result r = Exec(img.dir(), Ours() + " checksum " + name);
    CHECK(r.out.substr(0, 64) == expected);
  }
  CHECK(Exec(img.dir(), Ours() + " checksum missing.qcow2").rc == 1);
}

TEST_CASE("odd-size raw files are seen as qemu-img sees them", "[cli]") {
  SKIP_WITHOUT_QEMU();
  Images& img = Images::Get();
  MustRun("cd '" + img.dir() + "' && head -c 1000001 /dev/urandom > odd.raw"
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
