// Bounded opens of hostile backing chains (issue 14): an image whose chain
// loops back onto itself (by name, through a symbolic link, a hard link, or
// another spelling of its path) and that claims a 32 MiB L1 table over a
// sparse file is refused as a loop before any table is loaded; a long chain
// of such images that does not loop opens within a few MiB. Checked through
// OpenImage (heap counted by this binary's operator new) and through
// dmcow-img's commands (peak RSS of the child from wait4).
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "dmcow/image.h"
#include "dmcow/mem_env.h"
#include "heap_peak.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;

namespace {

constexpr uint64_t kMiB = 1024 * 1024;
// What one open may cost. The images claim 32 MiB L1 tables: loading one
// whole (as before this bound) passes it on the first image.
constexpr uint64_t kMaxPeakBytes = 64 * kMiB;
constexpr uint32_t kBigL1Entries = 4 * 1024 * 1024;  // 32 MiB, the most the open-time limits allow

bool Contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

void Store32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = static_cast<uint8_t>(v >> (24 - 8 * i));
}
void Store64(uint8_t* p, uint64_t v) {
  Store32(p, static_cast<uint32_t>(v >> 32));
  Store32(p + 4, static_cast<uint32_t>(v));
}

// A qcow2 v3 image with 512-byte clusters (header, refcount table, refcount
// block, then the L1 table), `l1_entries` L1 entries that are all zero (a
// hole: the file takes 1.5 KiB of disk), a virtual size the L1 exactly
// covers, and `backing` as its backing file name. qemu-img accepts it.
std::vector<uint8_t> Qcow2Bytes(const std::string& backing, uint32_t l1_entries, uint64_t* file_size) {
  constexpr uint64_t cs = 512;
  std::vector<uint8_t> b(3 * cs, 0);
  uint8_t* h = b.data();
  Store32(h, 0x514649fb);
  Store32(h + 4, 3);
  if (!backing.empty()) {
    Store64(h + 8, 112);  // after the v3 header and its end-of-extensions marker
    Store32(h + 16, static_cast<uint32_t>(backing.size()));
    std::memcpy(h + 112, backing.data(), backing.size());
  }
  Store32(h + 20, 9);                                     // cluster_bits
  Store64(h + 24, uint64_t{l1_entries} * (cs / 8) * cs);  // virtual size
  Store32(h + 36, l1_entries);
  Store64(h + 40, 3 * cs);  // L1 table
  Store64(h + 48, cs);      // refcount table
  Store32(h + 56, 1);
  Store32(h + 96, 4);                                     // refcount_order
  Store32(h + 100, 104);                                  // header_length
  Store64(b.data() + cs, 2 * cs);                         // refcount table -> block
  for (int i = 0; i < 3; i++) b[2 * cs + 2 * i + 1] = 1;  // clusters 0-2 in use
  *file_size = 3 * cs + uint64_t{l1_entries} * 8;
  return b;
}

void MakeQcow2(const std::string& path, const std::string& backing, uint32_t l1_entries = kBigL1Entries) {
  uint64_t size = 0;
  WriteWholeFile(path, Qcow2Bytes(backing, l1_entries, &size));
  REQUIRE(::truncate(path.c_str(), static_cast<off_t>(size)) == 0);  // the L1 table: a hole
}

// One hostile shape: opening `top` must fail as a loop naming `looping`
// (the file whose backing name closes the loop).
struct LoopShape {
  std::string name;
  std::string top;
};

// Builds every loop shape in `dir`; each has big sparse L1 tables.
std::vector<LoopShape> MakeLoops(const TempDir& dir) {
  MakeQcow2(dir / "self.qcow2", "self.qcow2");
  MakeQcow2(dir / "a.qcow2", "b.qcow2");
  MakeQcow2(dir / "b.qcow2", "a.qcow2");
  // Through a symbolic link: target names the link, which is target itself.
  MakeQcow2(dir / "target.qcow2", "link.qcow2");
  REQUIRE(::symlink("target.qcow2", (dir / "link.qcow2").c_str()) == 0);
  // Through a hard link: one inode under two names, naming the other name.
  MakeQcow2(dir / "hard1.qcow2", "hard2.qcow2");
  REQUIRE(::link((dir / "hard1.qcow2").c_str(), (dir / "hard2.qcow2").c_str()) == 0);
  // "./dot.qcow2" resolved from dir/dot.qcow2 is dir/./dot.qcow2, then
  // dir/././dot.qcow2...: the name never repeats, the file does.
  MakeQcow2(dir / "dot.qcow2", "./dot.qcow2");
  return {{"self", dir / "self.qcow2"},
          {"pair", dir / "a.qcow2"},
          {"symlink", dir / "target.qcow2"},
          {"hardlink", dir / "hard1.qcow2"},
          {"dot", dir / "dot.qcow2"}};
}

struct Measured {
  Status status;
  uint64_t peak_heap = 0;
  double seconds = 0;
};

Measured OpenMeasured(const std::string& path, const OpenOptions& options, std::unique_ptr<Image>* image) {
  Measured m;
  ResetHeapPeak();
  auto start = std::chrono::steady_clock::now();
  m.status = OpenImage(path, options, image);
  m.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  m.peak_heap = HeapPeakSinceReset();
  return m;
}

TEST_CASE("a backing chain loop is refused by file identity before any table is loaded", "[chain]") {
  TempDir dir;
  for (const LoopShape& shape : MakeLoops(dir)) {
    SECTION(shape.name) {
      for (const char* format : {"", "qcow2"}) {
        OpenOptions o;
        o.format = format;
        std::unique_ptr<Image> image;
        Measured m = OpenMeasured(shape.top, o, &image);
        INFO(shape.name << " format '" << format << "': " << m.status.ToString() << "; " << m.seconds
                        << " s, peak heap " << m.peak_heap << " bytes");
        CHECK(m.status.IsCorrupt());
        CHECK(Contains(m.status.message(), "creates an infinite loop"));
        CHECK(m.status.message().find('\n') == std::string::npos);
        CHECK(m.status.message().rfind(dir.path(), 0) == 0);  // names the file whose header closes the loop
        CHECK(m.peak_heap < kMaxPeakBytes);
        CHECK(!image);
      }
    }
  }
}

TEST_CASE("a loop through a hard link in an in-memory Env is found by identity", "[chain]") {
  MemEnv env;
  uint64_t size = 0;
  std::vector<uint8_t> bytes = Qcow2Bytes("two.qcow2", 64, &size);
  bytes.resize(size);
  env.PutFile("/m/one.qcow2", bytes);
  REQUIRE(env.LinkFile("/m/one.qcow2", "/m/two.qcow2"));
  OpenOptions o;
  o.env = &env;
  std::unique_ptr<Image> image;
  Status s = OpenImage("/m/one.qcow2", o, &image);
  INFO(s.ToString());
  CHECK(s.IsCorrupt());
  CHECK(Contains(s.message(), "/m/one.qcow2: backing file '/m/two.qcow2' creates an infinite loop"));
  CHECK(Contains(s.message(), "it is /m/one.qcow2, already in the backing chain"));
}

TEST_CASE("a long chain of images with big sparse L1 tables opens within a few MiB", "[chain]") {
  TempDir dir;
  constexpr int kImages = 40;
  for (int i = 0; i < kImages; i++) {
    MakeQcow2(dir / ("c" + std::to_string(i) + ".qcow2"),
              i + 1 < kImages ? "c" + std::to_string(i + 1) + ".qcow2" : "");
  }
  std::unique_ptr<Image> image;
  Measured m = OpenMeasured(dir / "c0.qcow2", OpenOptions(), &image);
  INFO(m.status.ToString() << "; " << m.seconds << " s, peak heap " << m.peak_heap << " bytes");
  REQUIRE(m.status.ok());
  CHECK(m.peak_heap < kMaxPeakBytes);
  int depth = 0;
  for (Image* i = image.get(); i; i = i->backing()) depth++;
  CHECK(depth == kImages);
  // Every layer is unallocated: reads go through the chain and give zeros.
  std::vector<uint8_t> buf(64 * 1024, 0xff);
  REQUIRE(image->Read(image->virtual_size() - buf.size(), buf.data(), buf.size()).ok());
  CHECK(std::all_of(buf.begin(), buf.end(), [](uint8_t b) { return b == 0; }));
}

TEST_CASE("a chain deeper than the limit is still refused", "[chain]") {
  TempDir dir;
  constexpr int kImages = 66;
  for (int i = 0; i < kImages; i++) {
    MakeQcow2(dir / ("d" + std::to_string(i) + ".qcow2"), "d" + std::to_string(i + 1) + ".qcow2", 64);
  }
  std::unique_ptr<Image> image;
  Status s = OpenImage(dir / "d0.qcow2", OpenOptions(), &image);
  INFO(s.ToString());
  CHECK(s.IsCorrupt());
  CHECK(Contains(s.message(), "backing chain is deeper than 64 images"));
}

TEST_CASE("the L1 tables of a chain count against max_chain_table_bytes", "[chain]") {
  // Dense L1 tables (every entry names an L2 table, all the same one: a
  // hostile chain whose tables are real) are held, and bounded together.
  TempDir dir;
  constexpr uint32_t kEntries = 64 * 1024;  // 512 KiB each
  for (int i = 0; i < 4; i++) {
    uint64_t size = 0;
    std::vector<uint8_t> b = Qcow2Bytes(i < 3 ? "e" + std::to_string(i + 1) + ".qcow2" : "", kEntries, &size);
    const uint64_t l2 = size;  // one zeroed L2 table after the L1
    b.resize(size + 512, 0);
    for (uint32_t e = 0; e < kEntries; e++) Store64(b.data() + 3 * 512 + 8 * e, l2);
    WriteWholeFile(dir / ("e" + std::to_string(i) + ".qcow2"), b);
  }
  OpenOptions o;
  std::unique_ptr<Image> image;
  REQUIRE(OpenImage(dir / "e0.qcow2", o, &image).ok());
  o.max_chain_table_bytes = 1 * kMiB;  // two of the four tables
  Status s = OpenImage(dir / "e0.qcow2", o, &image);
  INFO(s.ToString());
  CHECK(s.IsNotSupported());
  CHECK(Contains(s.message(), "L1 table would take the tables of the backing chain past 1 MiB of memory"));
  CHECK(s.message().rfind(dir.path() + "/e", 0) == 0);
}

#ifdef DMCOW_IMG_PATH
// Whether this tree (dmcow-img with it) is built with ASan: gcc says so with
// __SANITIZE_ADDRESS__, clang 14 only through __has_feature.
#if defined(__SANITIZE_ADDRESS__)
#define DMCOW_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DMCOW_UNDER_ASAN 1
#endif
#endif

struct ChildRun {
  int rc = -1;
  std::string err;
  uint64_t max_rss = 0;  // bytes
  double seconds = 0;
};

// Runs dmcow-img with `args` in a child, stdout discarded and stderr kept;
// peak RSS from wait4. The child's address space is capped (4 GiB) so that
// a regression fails the test instead of exhausting a shared machine.
ChildRun RunImg(const std::vector<std::string>& args, const std::string& err_file) {
  ChildRun r;
  auto start = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid == 0) {
#if !defined(DMCOW_UNDER_ASAN)
    // (Not under ASan, which reserves terabytes of address space for its
    // shadow at start; the RSS bound below still holds it.)
    rlimit as{uint64_t{4} << 30, uint64_t{4} << 30};
    ::setrlimit(RLIMIT_AS, &as);
#endif
    const int out = ::open("/dev/null", O_WRONLY);
    const int err = ::open(err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out < 0 || err < 0 || ::dup2(out, 1) < 0 || ::dup2(err, 2) < 0) ::_exit(126);
    std::vector<char*> argv;
    std::string bin = DMCOW_IMG_PATH;
    argv.push_back(bin.data());
    std::vector<std::string> copy = args;
    for (std::string& a : copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(bin.c_str(), argv.data());
    ::_exit(127);
  }
  REQUIRE(pid > 0);
  int status = 0;
  rusage usage{};
  REQUIRE(::wait4(pid, &status, 0, &usage) == pid);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.max_rss = static_cast<uint64_t>(usage.ru_maxrss) * 1024;
  const std::vector<uint8_t> raw = ReadWholeFile(err_file);
  r.err.assign(raw.begin(), raw.end());
  return r;
}
#endif

TEST_CASE("dmcow-img refuses backing chain loops quickly and in bounded memory", "[chain][cli]") {
  if (::access(DMCOW_IMG_PATH, X_OK) != 0) {
    DMCOW_SKIP(std::string("dmcow-img not built: ") + DMCOW_IMG_PATH);
  }
  TempDir dir;
  MakeQcow2(dir / "other.qcow2", "", 64);
  // The process's own footprint (an ASan build's runtime is most of it),
  // from a run that opens a small image: a refused loop may add less than
  // the 32 MiB one claimed L1 table would take.
  const ChildRun baseline = RunImg({"info", dir / "other.qcow2"}, dir / "stderr");
  REQUIRE(baseline.rc == 0);
  const uint64_t max_rss = baseline.max_rss + 24 * kMiB;
  for (const LoopShape& shape : MakeLoops(dir)) {
    struct Command {
      std::string name;
      std::vector<std::string> args;
      int rc;  // as qemu-img's: compare reports errors with 2
    };
    const std::vector<Command> commands = {
        {"map", {"map", shape.top}, 1},
        {"checksum", {"checksum", shape.top}, 1},
        {"convert", {"convert", "-O", "raw", shape.top, dir / "out.raw"}, 1},
        {"info --backing-chain", {"info", "--backing-chain", shape.top}, 1},
        {"compare", {"compare", dir / "other.qcow2", shape.top}, 2},
    };
    for (const Command& c : commands) {
      SECTION(shape.name + ": " + c.name) {
        ChildRun r = RunImg(c.args, dir / "stderr");
        INFO(shape.name << " " << c.name << ": rc " << r.rc << ", " << r.seconds << " s, peak RSS " << r.max_rss
                        << " bytes (info of a small image: " << baseline.max_rss << "); stderr: " << r.err);
        CHECK(r.rc == c.rc);
        CHECK(Contains(r.err, "creates an infinite loop"));
        CHECK(Contains(r.err, dir.path()));
        CHECK(r.max_rss < max_rss);
      }
    }
  }
}

}  // namespace
