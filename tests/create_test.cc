// dmcow-img create and dmcow::CreateImage against the real qemu-img 7.2.
//
// For every option combination below, qemu-img create and dmcow-img create
// run with the same command line in two directories holding the same
// backing images. Then:
//   - stdout ("Formatting ...") and the exit status are equal;
//   - every file made (image, external data file) is byte-identical;
//   - qemu-img check finds no error and no leak in ours (qcow2);
//   - qemu-img info --output=json is equal (but for actual-size);
//   - our engine opens ours and reads zeros, or the backing file's content.
// Bad options: both exit 1, and ours says why in one line.
// Skipped with a warning when qemu-img is not installed.
#include <sys/stat.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dmcow/create.h"
#include "dmcow/image.h"
#include "dmcow/mem_env.h"
#include "test_util.h"

using namespace dmcow_test;
using nlohmann::json;

namespace {

std::vector<std::string> ListFiles(const std::string& dir) {
  std::string out;
  Run("ls -1 '" + dir + "'", &out);
  std::vector<std::string> names;
  size_t pos = 0;
  while (pos < out.size()) {
    size_t nl = out.find('\n', pos);
    if (nl == std::string::npos) nl = out.size();
    if (nl > pos) names.push_back(out.substr(pos, nl - pos));
    pos = nl + 1;
  }
  return names;
}

void DropActualSize(json* j) {
  if (j->is_object()) {
    j->erase("actual-size");
    for (auto& [key, value] : j->items()) DropActualSize(&value);
  } else if (j->is_array()) {
    for (auto& value : *j) DropActualSize(&value);
  }
}

// Backing images, made by qemu-img and qemu-io, with data in them.
const char* const kBackingScript[] = {
    "qemu-img create -q -f qcow2 base.qcow2 32M",
    "qemu-io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 5M 64k' -c 'write -P 0x33 31M 1M' base.qcow2",
    "qemu-img create -q -f raw base.raw 3M",
    "qemu-io -f raw -c 'write -P 0x44 64k 1M' base.raw",
    "qemu-img create -q -f qcow base.qcow 8M",
    "qemu-io -f qcow -c 'write -P 0x55 4k 8k' base.qcow",
};

struct Case {
  const char* args;              // after "create"; the image is always "img"
  bool backing_missing = false;  // -u with a backing file that does not exist
};

const Case kCases[] = {
    // qcow2 v3 defaults, sizes (rounded up to 512), an empty image, a huge one
    {"-f qcow2 img 64M"},
    {"-f qcow2 img 0"},
    {"-f qcow2 img 1000"},
    {"-f qcow2 img 1T"},
    // v2
    {"-f qcow2 -o compat=0.10 img 64M"},
    {"-f qcow2 -o compat=0.10,cluster_size=4k,preallocation=metadata img 24M"},
    // cluster sizes
    {"-f qcow2 -o cluster_size=512 img 64M"},
    {"-f qcow2 -o cluster_size=4k img 64M"},
    {"-f qcow2 -o cluster_size=2M img 10G"},
    // refcount widths, with refcount blocks and table growing under preallocation
    {"-f qcow2 -o refcount_bits=1,cluster_size=512,preallocation=metadata img 16M"},
    {"-f qcow2 -o refcount_bits=8,cluster_size=4k,preallocation=falloc img 64M"},
    {"-f qcow2 -o refcount_bits=64,cluster_size=512 img 1G"},
    {"-f qcow2 -o refcount_bits=64,cluster_size=512,preallocation=metadata img 32M"},
    {"-f qcow2 -o cluster_size=512,preallocation=metadata img 64M"},
    // features
    {"-f qcow2 -o lazy_refcounts=on img 64M"},
    {"-f qcow2 -o extended_l2=on img 64M"},
    {"-f qcow2 -o extended_l2=on,cluster_size=16k,preallocation=metadata img 1049088"},
    {"-f qcow2 -o compression_type=zstd img 64M"},
    {"-f qcow2 -o lazy_refcounts=on,extended_l2=on,compression_type=zstd,refcount_bits=8 img 8M"},
    // external data file
    {"-f qcow2 -o data_file=img.data img 10M"},
    {"-f qcow2 -o data_file=img.data,data_file_raw=on img 10M"},
    {"-f qcow2 -o data_file=img.data,preallocation=metadata img 1049088"},
    {"-f qcow2 -o data_file=img.data,preallocation=full,cluster_size=4k img 5M"},
    // backing files
    {"-f qcow2 -b base.qcow2 -F qcow2 img"},
    {"-f qcow2 -b base.qcow2 -F qcow2 img 64M"},
    {"-f qcow2 -b base.raw -F raw -o compat=0.10 img"},
    {"-f qcow2 -o backing_file=base.qcow,backing_fmt=qcow img"},
    {"-f qcow2 -b base.qcow2 -F qcow2 -o extended_l2=on,preallocation=metadata img 16M"},
    {"-f qcow2 -u -b missing.qcow2 -F qcow2 img 16M", true},
    // preallocation
    {"-f qcow2 -o preallocation=metadata img 20M"},
    {"-f qcow2 -o preallocation=falloc img 20M"},
    {"-f qcow2 -o preallocation=full img 20M"},
    {"-f qcow2 -o preallocation=metadata img 1049088"},
    {"-f qcow2 -o preallocation=falloc img 0"},
    {"-f qcow2 -o preallocation=full,cluster_size=512,refcount_bits=16 img 4M"},
    // qcow v1
    {"-f qcow img 64M"},
    {"-f qcow img 1000"},
    {"-f qcow -b base.qcow2 -F qcow2 img"},
    {"-f qcow -b base.raw -F raw img 16M"},
    {"-f qcow -o preallocation=full img 1M"},
    {"-f qcow -u -b missing.raw -F raw img 4M", true},
    // raw
    {"img 1M"},
    {"-f raw img 1000"},
    {"-f raw -o preallocation=falloc img 4M"},
    {"-f raw -o preallocation=full img 4M"},
    // option spellings
    {"-f qcow2 -o cluster_size=64k,cluster_size=4k -o refcount_bits=0x8,lazy_refcounts img 2M"},
    {"-q -f qcow2 -o size=5M,nocow=off,extent_size_hint=1M img"},
};

class CreateFixture {
 public:
  CreateFixture() {
    MustRun("mkdir '" + tmp_ / "q" + "' '" + tmp_ / "o" + "' '" + tmp_ / "logs" + "'");
    for (const char* step : kBackingScript) {
      MustRun("cd '" + tmp_.path() + "/q' && " + step + " >/dev/null");
    }
    MustRun("cp -p '" + tmp_.path() + "/q/'base.* '" + tmp_.path() + "/o/'");
  }
  std::string q() const { return tmp_ / "q"; }
  std::string o() const { return tmp_ / "o"; }
  std::string logs() const { return tmp_ / "logs"; }
  void Clean() {
    for (const std::string& dir : {q(), o()}) MustRun("cd '" + dir + "' && rm -f img img.data");
  }

 private:
  TempDir tmp_;
};

// Reads [offset, offset+len) of `image` and of what it should show:
// zeros, or the backing image's content below its end.
void CheckContent(dmcow::Image* image, dmcow::Image* backing, uint64_t offset, uint64_t len) {
  std::vector<uint8_t> got(len), want(len, 0);
  REQUIRE(image->Read(offset, got.data(), len).ok());
  if (backing && offset < backing->virtual_size()) {
    uint64_t n = std::min<uint64_t>(len, backing->virtual_size() - offset);
    REQUIRE(backing->Read(offset, want.data(), n).ok());
  }
  INFO("offset " << offset);
  CHECK(got == want);
}

}  // namespace

TEST_CASE("create matches qemu-img create byte for byte", "[create]") {
  SKIP_WITHOUT_QEMU();
  CreateFixture fx;
  const std::string ours = std::string("'") + kDmcowImg + "'";
  for (const Case& c : kCases) {
    fx.Clean();
    INFO("create " << c.args);
    SplitResult theirs = Exec(fx.q(), fx.logs(), std::string("qemu-img create ") + c.args);
    SplitResult mine = Exec(fx.o(), fx.logs(), ours + " create " + c.args);
    REQUIRE(theirs.rc == 0);
    CHECK(mine.rc == 0);
    CHECK(mine.out == theirs.out);
    CHECK(mine.err == "");
    if (mine.rc != 0) continue;

    // Every file qemu-img made, byte for byte.
    for (const std::string& name : ListFiles(fx.q())) {
      if (name.rfind("base.", 0) == 0) continue;
      INFO("file " << name);
      CHECK(Sha256OfFile(fx.q() + "/" + name) == Sha256OfFile(fx.o() + "/" + name));
    }

    const std::string args = c.args;
    const bool qcow2 = args.find("-f qcow2") != std::string::npos;
    const bool has_backing = args.find(" -b ") != std::string::npos || args.find("backing_file=") != std::string::npos;

    // qemu-img check: no corruption, no leak.
    if (qcow2 && !c.backing_missing) {
      std::string out;
      int rc = Run("cd '" + fx.o() + "' && qemu-img check --output=json img 2>&1", &out);
      INFO("qemu-img check: " << out);
      CHECK(rc == 0);
      json check = json::parse(out, nullptr, false);
      // qemu-img leaves out the counts that are zero.
      CHECK(check.value("corruptions", 0) == 0);
      CHECK(check.value("leaks", 0) == 0);
      CHECK(check.value("check-errors", -1) == 0);
    }

    // qemu-img info --output=json, less actual-size.
    if (!c.backing_missing) {
      std::string a, b;
      REQUIRE(Run("cd '" + fx.q() + "' && qemu-img info --output=json img 2>/dev/null", &a) == 0);
      REQUIRE(Run("cd '" + fx.o() + "' && qemu-img info --output=json img 2>/dev/null", &b) == 0);
      json ja = json::parse(a), jb = json::parse(b);
      DropActualSize(&ja);
      DropActualSize(&jb);
      CHECK(jb == ja);
    }

    // Our engine reads zeros, or the backing content.
    dmcow::OpenOptions open;
    open.open_backing = !c.backing_missing;
    std::unique_ptr<dmcow::Image> image;
    dmcow::Status s = dmcow::OpenImage(fx.o() + "/img", open, &image);
    INFO("open: " << s.ToString());
    REQUIRE(s.ok());
    dmcow::Image* backing = has_backing && !c.backing_missing ? image->backing() : nullptr;
    if (has_backing && !c.backing_missing) REQUIRE(backing != nullptr);
    const uint64_t size = image->virtual_size();
    const uint64_t head = std::min<uint64_t>(size, 8 << 20);
    if (head) CheckContent(image.get(), backing, 0, head);
    if (size > head) {
      uint64_t tail = std::min<uint64_t>(size - head, 2 << 20);
      CheckContent(image.get(), backing, size - tail, tail);
    }
    if (size > (64 << 20)) CheckContent(image.get(), backing, (size / 2) & ~uint64_t{511}, 1 << 20);
  }
}

TEST_CASE("create refuses bad options as qemu-img does", "[create]") {
  SKIP_WITHOUT_QEMU();
  CreateFixture fx;
  const std::string ours = std::string("'") + kDmcowImg + "'";
  const char* const kBad[] = {
      "-f qcow2 img",                               // no size, no backing
      "-f qcow2 -b base.qcow2 img",                 // backing without format
      "-f qcow2 -u -b missing.qcow2 img 1M",        // same, not opened
      "-f qcow2 -u -b missing.qcow2 -F qcow2 img",  // -u and no size
      "-f qcow2 -b missing.qcow2 -F qcow2 img 1M",  // backing does not exist
      "-f qcow2 -b img -F qcow2 img",               // backing is the image
      "-f qcow2 -b '' -F raw img 1M",
      "-f qcow2 -o foo=bar img 1M",
      "-f qcow2 -o cluster_size=3000 img 1M",
      "-f qcow2 -o cluster_size=4M img 1M",
      "-f qcow2 -o cluster_size=1x img 1M",
      "-f qcow2 -o refcount_bits=3 img 1M",
      "-f qcow2 -o refcount_bits=128 img 1M",
      "-f qcow2 -o refcount_bits=x img 1M",
      "-f qcow2 -o compat=0.10,refcount_bits=8 img 1M",
      "-f qcow2 -o compat=0.10,lazy_refcounts=on img 1M",
      "-f qcow2 -o compat=0.10,extended_l2=on img 1M",
      "-f qcow2 -o compat=0.10,compression_type=zstd img 1M",
      "-f qcow2 -o compat=0.10,data_file=img.data img 1M",
      "-f qcow2 -o compat=1.2 img 1M",
      "-f qcow2 -o extended_l2=on,cluster_size=4k img 1M",
      "-f qcow2 -o data_file_raw=on img 1M",
      "-f qcow2 -o data_file=img.data,data_file_raw=on -b base.qcow2 -F qcow2 img 1M",
      "-f qcow2 -o compression_type=lz4 img 1M",
      "-f qcow2 -o preallocation=bogus img 1M",
      "-f qcow2 -o preallocation=metadata -b base.qcow2 -F qcow2 img 1M",
      "-f qcow2 -o backing_fmt=qcow2 img 1M",
      "-f qcow2 -o lazy_refcounts=maybe img 1M",
      "-f qcow2 -u -b base.qcow2 -F nosuchfmt img 1M",
      "-f qcow2 -o size=5M img 6M",
      "-f qcow2 -o cluster_size=, img 1M",
      "-f qcow2 img 4P",
      "-f qcow2 -o cluster_size=512 img 1T",
      "-f qcow2 img 1x",
      "-f qcow2 img 9E",
      "-f qcow2 img 1M extra",
      "-f qcow2 img -1",
      "-f nosuchfmt img 1M",
      "-f raw -b base.raw -F raw img 1M",
      "-f raw -o preallocation=metadata img 1M",
      "-f raw -o preallocation=foo img 1M",
      "-f raw -o cluster_size=4k img 1M",
      "-f qcow img 0",
      "-f qcow -o preallocation=metadata img 1M",
      "-f qcow2",
      "-f",
      "-f qcow2 /nonexistent/dir/img 1M",
      "-f qcow2 -o data_file=/nonexistent/img.data img 1M",
      "-f qcow /nonexistent/dir/img 1M",
  };
  for (const char* args : kBad) {
    fx.Clean();
    INFO("create " << args);
    SplitResult theirs = Exec(fx.q(), fx.logs(), std::string("qemu-img create ") + args);
    SplitResult mine = Exec(fx.o(), fx.logs(), ours + " create " + args);
    CHECK(theirs.rc == 1);
    CHECK(mine.rc == 1);
    CHECK(mine.out == theirs.out);  // the "Formatting" line when qemu-img prints it too
    INFO("stderr: " << mine.err);
    REQUIRE(!mine.err.empty());
    CHECK(mine.err.rfind("dmcow-img: ", 0) == 0);
    // As many lines as qemu-img's (a usage hint, a size's suffix help).
    CHECK(std::count(mine.err.begin(), mine.err.end(), '\n') == std::count(theirs.err.begin(), theirs.err.end(), '\n'));
    // qemu-img says the same thing (the first line of its message).
    std::string first = theirs.err.substr(0, theirs.err.find('\n'));
    std::string said = mine.err.substr(0, mine.err.find('\n'));
    CHECK(said.substr(std::strlen("dmcow-img: ")).rfind(first.substr(std::strlen("qemu-img: ")), 0) == 0);
    // Nothing is left behind.
    struct stat st;
    CHECK(stat((fx.o() + "/img").c_str(), &st) != 0);
  }
}

TEST_CASE("create -o help lists qemu-img's options", "[create]") {
  SKIP_WITHOUT_QEMU();
  CreateFixture fx;
  const std::string ours = std::string("'") + kDmcowImg + "'";
  for (const char* args : {"-o help", "-f qcow2 -o help", "-f qcow -o help", "-f raw -o help img",
                           "-f qcow2 -o '?' img", "-f qcow -o help img", "-f qcow2 -o cluster_size=4k,help"}) {
    INFO("create " << args);
    SplitResult theirs = Exec(fx.q(), fx.logs(), std::string("qemu-img create ") + args);
    SplitResult mine = Exec(fx.o(), fx.logs(), ours + " create " + args);
    CHECK(mine.rc == theirs.rc);
    CHECK(mine.out == theirs.out);
  }
}

TEST_CASE("CreateImage is reproducible and works on any Env", "[create]") {
  // Same options, same bytes: twice on disk, and once in memory.
  TempDir tmp;
  dmcow::CreateOptions o;
  o.size = 48 << 20;
  o.cluster_size = 4096;
  o.refcount_bits = 2;
  o.preallocation = "metadata";
  REQUIRE(dmcow::CreateImage(tmp / "a.qcow2", o).ok());
  REQUIRE(dmcow::CreateImage(tmp / "b.qcow2", o).ok());
  CHECK(Sha256OfFile(tmp / "a.qcow2") == Sha256OfFile(tmp / "b.qcow2"));

  dmcow::MemEnv env;
  o.env = &env;
  REQUIRE(dmcow::CreateImage("m.qcow2", o).ok());
  std::unique_ptr<dmcow::File> f;
  REQUIRE(env.OpenFile("m.qcow2", dmcow::OpenMode::kReadOnly, &f).ok());
  uint64_t size = 0;
  REQUIRE(f->Size(&size).ok());
  std::vector<uint8_t> bytes(size);
  size_t got = 0;
  REQUIRE(f->Read(0, size, bytes.data(), &got).ok());
  CHECK(bytes == ReadWholeFile(tmp / "a.qcow2"));

  // A backing file gives the size; a missing size without one is refused.
  dmcow::CreateOptions top;
  top.env = &env;
  top.backing_file = "m.qcow2";
  top.backing_fmt = "qcow2";
  REQUIRE(dmcow::PrepareCreateOptions("top.qcow2", &top).ok());
  CHECK(top.size == uint64_t{48} << 20);
  REQUIRE(dmcow::CreateImage("top.qcow2", top).ok());
  dmcow::OpenOptions open;
  open.env = &env;
  std::unique_ptr<dmcow::Image> image;
  REQUIRE(dmcow::OpenImage("top.qcow2", open, &image).ok());
  CHECK(image->virtual_size() == uint64_t{48} << 20);
  REQUIRE(image->backing() != nullptr);

  dmcow::CreateOptions none;
  none.env = &env;
  dmcow::Status s = dmcow::CreateImage("x.qcow2", none);
  CHECK(s.message() == "x.qcow2: Image creation needs a size parameter");
  CHECK_FALSE(env.FileExists("x.qcow2"));
}
