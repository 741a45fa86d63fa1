// compare's threaded data check (cli/range_compare.h) reports what qemu-img's
// chunk-by-chunk reading meets first, on any number of threads: the first
// 2 MiB chunk with an event, within it a read error of the first image,
// then of the second, then the first differing 512-byte block. Raw images
// in memory; reads fail where a test says.
#include <algorithm>
#include <catch2/catch.hpp>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "dmcow/image.h"
#include "dmcow/mem_env.h"
#include "range_compare.h"

namespace {

using dmcow::Env;
using dmcow::File;
using dmcow::MemEnv;
using dmcow::OpenMode;
using dmcow::Status;
using dmcow::cli::RangeComparer;
using dmcow::cli::RangeOutcome;
using Kind = RangeOutcome::Kind;

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kSize = 16 * kMiB;

// A file whose reads fail (EIO) where they touch a byte from `bad` on (to
// `bad_end`), with the read's offset in the message; or, `throws`, whose
// reads there throw std::bad_alloc (memory running out mid-read).
class FailingFile final : public File {
 public:
  FailingFile(std::unique_ptr<File> base, uint64_t bad, uint64_t bad_end, bool throws)
      : base_(std::move(base)), bad_(bad), bad_end_(bad_end), throws_(throws) {}
  const std::string& name() const override { return base_->name(); }
  Status Read(uint64_t offset, size_t len, void* buf, size_t* bytes_read) override {
    if (offset < bad_end_ && bad_ < offset + len) {
      if (throws_) throw std::bad_alloc();
      return Status::IOError(name() + ": injected read error at " + std::to_string(offset));
    }
    return base_->Read(offset, len, buf, bytes_read);
  }
  Status Write(uint64_t offset, const void* buf, size_t len) override { return base_->Write(offset, buf, len); }
  Status Sync() override { return base_->Sync(); }
  Status Size(uint64_t* size) override { return base_->Size(size); }
  Status Truncate(uint64_t size) override { return base_->Truncate(size); }

 private:
  std::unique_ptr<File> base_;
  uint64_t bad_, bad_end_;
  bool throws_;
};

class FailingEnv final : public Env {
 public:
  FailingEnv(MemEnv* base, uint64_t bad, uint64_t bad_end, bool throws)
      : base_(base), bad_(bad), bad_end_(bad_end), throws_(throws) {}
  Status OpenFile(const std::string& path, OpenMode mode, std::unique_ptr<File>* file) override {
    std::unique_ptr<File> inner;
    Status st = base_->OpenFile(path, mode, &inner);
    if (st.ok()) *file = std::make_unique<FailingFile>(std::move(inner), bad_, bad_end_, throws_);
    return st;
  }
  bool FileExists(const std::string& path) override { return base_->FileExists(path); }

 private:
  MemEnv* base_;
  uint64_t bad_, bad_end_;
  bool throws_;
};

struct Disk {
  MemEnv mem;
  FailingEnv env;
  std::unique_ptr<dmcow::Image> image;

  // kSize bytes of a pattern, with 'X' at each of `flips`; reads of bytes
  // [bad, bad_end) fail (throw, with `throws`).
  Disk(const std::vector<uint64_t>& flips, uint64_t bad = UINT64_MAX, uint64_t bad_end = 0, bool throws = false)
      : Disk(Pattern(), flips, bad, bad_end, throws) {}
  // kSize zero bytes, with 'X' at each of `flips`.
  static std::unique_ptr<Disk> Zeros(const std::vector<uint64_t>& flips) {
    return std::unique_ptr<Disk>(new Disk(std::vector<uint8_t>(kSize, 0), flips, UINT64_MAX, 0, false));
  }

 private:
  Disk(std::vector<uint8_t> bytes, const std::vector<uint64_t>& flips, uint64_t bad, uint64_t bad_end, bool throws)
      : env(&mem, bad, std::max(bad_end, bad + 1), throws) {
    for (uint64_t at : flips) bytes[at] = 'X';
    mem.PutFile("disk", std::move(bytes));
    dmcow::OpenOptions o;
    o.format = "raw";
    o.env = &env;
    Status st = dmcow::OpenImage("disk", o, &image);
    INFO(st.ToString());
    REQUIRE(st.ok());
  }
  static std::vector<uint8_t> Pattern() {
    std::vector<uint8_t> bytes(kSize);
    for (uint64_t i = 0; i < kSize; i++) bytes[i] = static_cast<uint8_t>(i * 7 + i / 4096);
    return bytes;
  }
};

// A run queued, with which image reads as zeros there.
struct Run {
  uint64_t offset, len;
  bool first_zero = false, second_zero = false;
};

// The outcome of comparing `runs` on every thread count, which must not
// depend on it; `whole`: runs read a chunk at once.
RangeOutcome CompareOnAnyThreads(Disk& first, Disk* second, const std::vector<Run>& runs, bool whole = false) {
  auto compare = [&](unsigned threads) {
    RangeComparer comparer(first.image.get(), second ? second->image.get() : nullptr, threads);
    uint64_t queued = 0;
    for (const Run& r : runs) {
      comparer.Add(r.offset, r.len, r.first_zero, r.second_zero, whole);
      queued += r.len;
    }
    CHECK(comparer.queued() == queued);
    RangeOutcome out = comparer.Flush();
    CHECK(comparer.queued() == 0);
    return out;
  };
  RangeOutcome once = compare(1);
  for (unsigned threads : {2u, 3u, 8u, 16u}) {
    INFO("threads: " << threads);
    for (int repeat = 0; repeat < 2; repeat++) {
      RangeOutcome r = compare(threads);
      CHECK(r.kind == once.kind);
      CHECK(r.offset == once.offset);
      CHECK(r.error.ToString() == once.error.ToString());
    }
  }
  return once;
}

RangeOutcome CompareOnAnyThreads(Disk& first, Disk* second, uint64_t offset, uint64_t len) {
  return CompareOnAnyThreads(first, second, {{offset, len}});
}

}  // namespace

TEST_CASE("range compare: equal ranges are the same", "[compare]") {
  Disk a({}), b({});
  RangeOutcome r = CompareOnAnyThreads(a, &b, 0, kSize);
  CHECK(r.kind == Kind::kSame);
  // An odd length and start: the last piece is short.
  CHECK(CompareOnAnyThreads(a, &b, 512, kSize - 1000).kind == Kind::kSame);
}

TEST_CASE("range compare: the lowest mismatch, whichever thread finds it", "[compare]") {
  Disk a({300000, 600000, 5 * kMiB}), b({});
  RangeOutcome r = CompareOnAnyThreads(a, &b, 0, kSize);
  CHECK(r.kind == Kind::kMismatch);
  CHECK(r.offset == 299520);  // the 512-byte block holding 300000
  // From another start, blocks count from it.
  r = CompareOnAnyThreads(a, &b, 1000, kSize - 1000);
  CHECK(r.kind == Kind::kMismatch);
  CHECK(r.offset == 1000 + (299000 / 512) * 512);
  // Only the later ones.
  r = CompareOnAnyThreads(a, &b, 400000, kSize - 400000);
  CHECK(r.offset == 400000 + (200000 / 512) * 512);
}

TEST_CASE("range compare: a read error in the chunk of a mismatch wins, one in a later chunk does not", "[compare]") {
  SECTION("first image, same chunk") {
    Disk a({300000}, 600000), b({});
    RangeOutcome r = CompareOnAnyThreads(a, &b, 0, kSize);
    CHECK(r.kind == Kind::kReadErrorFirst);
    CHECK(r.offset == 0);
    CHECK(r.error.ToString().find("injected read error") != std::string::npos);
  }
  SECTION("second image, same chunk, mismatch after the error") {
    Disk a({1900000}), b({}, 300000);
    RangeOutcome r = CompareOnAnyThreads(a, &b, 0, kSize);
    CHECK(r.kind == Kind::kReadErrorSecond);
    CHECK(r.offset == 0);
  }
  SECTION("several failing pieces in one chunk: the first one's error, on any thread count") {
    Disk a({}, kMiB / 4, 2 * kMiB), b({});  // pieces 1-7 fail
    RangeOutcome r = CompareOnAnyThreads(a, &b, 0, kSize);
    CHECK(r.kind == Kind::kReadErrorFirst);
    CHECK(r.offset == 0);
    CHECK(r.error.ToString().find("injected read error at 262144") != std::string::npos);
  }
  SECTION("second image, same chunk, mismatch before the error") {
    Disk a({300000}), b({}, 1500000);
    RangeOutcome r = CompareOnAnyThreads(a, &b, 0, kSize);
    CHECK(r.kind == Kind::kReadErrorSecond);
    CHECK(r.offset == 0);
  }
  SECTION("a read that throws is that piece's read error, in the same order") {
    Disk a({300000}, 600000, 600001, true), b({});
    RangeOutcome r = CompareOnAnyThreads(a, &b, 0, kSize);
    CHECK(r.kind == Kind::kReadErrorFirst);
    CHECK(r.offset == 0);
    CHECK(r.error.ToString().find("cannot read: std::bad_alloc") != std::string::npos);
    Disk later({300000}, 3 * kMiB, 3 * kMiB + 1, true);
    CHECK(CompareOnAnyThreads(later, &b, 0, kSize).kind == Kind::kMismatch);
    CHECK(CompareOnAnyThreads(b, &later, {{0, 8 * kMiB, false, false}}, true).kind == Kind::kMismatch);
  }
  SECTION("both images in one chunk: the first image's error") {
    Disk a({}, 3 * kMiB + 5), b({}, 2 * kMiB + 10);
    RangeOutcome r = CompareOnAnyThreads(a, &b, 0, kSize);
    CHECK(r.kind == Kind::kReadErrorFirst);
    CHECK(r.offset == 2 * kMiB);
  }
  SECTION("an error in a later chunk than the mismatch") {
    Disk a({300000}, 5 * kMiB), b({});
    RangeOutcome r = CompareOnAnyThreads(a, &b, 0, kSize);
    CHECK(r.kind == Kind::kMismatch);
    CHECK(r.offset == 299520);
  }
  SECTION("chunks count from the range's start") {
    Disk a({}, 3 * kMiB + kMiB / 2), b({});
    RangeOutcome r = CompareOnAnyThreads(a, &b, kMiB, 8 * kMiB);
    CHECK(r.kind == Kind::kReadErrorFirst);
    CHECK(r.offset == 3 * kMiB);
  }
}

// Short runs queued together (a compressed image's are one cluster each):
// each is its own chunk, so an event in an earlier run comes first.
TEST_CASE("range compare: queued short runs are chunks of their own", "[compare]") {
  std::vector<Run> clusters;
  for (uint64_t at = 0; at < 4 * kMiB; at += 64 << 10) clusters.push_back({at, 64 << 10});
  SECTION("a mismatch in a cluster before the one that cannot be read") {
    Disk a({300000}, 600000), b({});
    RangeOutcome r = CompareOnAnyThreads(a, &b, clusters);
    CHECK(r.kind == Kind::kMismatch);
    CHECK(r.offset == 299520);
  }
  SECTION("a read error in the cluster of the mismatch") {
    Disk a({300000}, 310000), b({});
    RangeOutcome r = CompareOnAnyThreads(a, &b, clusters);
    CHECK(r.kind == Kind::kReadErrorFirst);
    CHECK(r.offset == 262144);
  }
  SECTION("runs where one image reads as zeros: only the other is read") {
    std::unique_ptr<Disk> zeros = Disk::Zeros({});
    Disk failing({}, 3 * kMiB);  // never read: it reads as zeros there
    CHECK(CompareOnAnyThreads(failing, zeros.get(), {{0, 2 * kMiB, false, true}}).kind == Kind::kMismatch);
    CHECK(CompareOnAnyThreads(failing, zeros.get(), {{2 * kMiB, 2 * kMiB, true, false}}).kind == Kind::kSame);
    CHECK(CompareOnAnyThreads(*zeros, &failing, {{0, 4 * kMiB, false, true}}).kind == Kind::kSame);
    // A read error of the image that is read, in the chunk of a mismatch.
    Disk a({});
    RangeOutcome r = CompareOnAnyThreads(a, &failing, {{0, kMiB, false, false}, {3 * kMiB, kMiB, true, false}});
    CHECK(r.kind == Kind::kReadErrorSecond);
    CHECK(r.offset == 3 * kMiB);
  }
}

// Runs of compressed clusters are read a chunk at once; the outcome is the
// same, and a chunk's read error is the whole chunk's read.
TEST_CASE("range compare: whole chunks", "[compare]") {
  Disk a({300000, 3 * kMiB}), b({});
  RangeOutcome r = CompareOnAnyThreads(a, &b, {{0, 5 * kMiB}}, true);
  CHECK(r.kind == Kind::kMismatch);
  CHECK(r.offset == 299520);
  Disk failing({}, 3 * kMiB);
  r = CompareOnAnyThreads(failing, &b, {{0, 5 * kMiB}}, true);
  CHECK(r.kind == Kind::kReadErrorFirst);
  CHECK(r.offset == 2 * kMiB);
  CHECK(r.error.ToString().find("injected read error at 2097152") != std::string::npos);
}

// One comparer, flushed again and again: chunks count afresh each time.
TEST_CASE("range compare: one comparer, several flushes", "[compare]") {
  Disk a({5 * kMiB + 7}, 9 * kMiB), b({});
  RangeComparer comparer(a.image.get(), b.image.get(), 2);
  comparer.Add(0, 4 * kMiB, false, false);
  CHECK(comparer.Flush().kind == Kind::kSame);
  comparer.Add(4 * kMiB, 4 * kMiB, false, false);
  RangeOutcome r = comparer.Flush();
  CHECK(r.kind == Kind::kMismatch);
  CHECK(r.offset == 5 * kMiB);
  comparer.Add(8 * kMiB, 3 * kMiB, false, false);
  r = comparer.Flush();
  CHECK(r.kind == Kind::kReadErrorFirst);
  CHECK(r.offset == 8 * kMiB);
  CHECK(comparer.Flush().kind == Kind::kSame);  // nothing queued
}

TEST_CASE("range compare: against zeros", "[compare]") {
  std::unique_ptr<Disk> zeros = Disk::Zeros({});
  CHECK(CompareOnAnyThreads(*zeros, nullptr, 0, kSize).kind == Kind::kSame);
  std::unique_ptr<Disk> dirty = Disk::Zeros({700000, 9 * kMiB});
  RangeOutcome r = CompareOnAnyThreads(*dirty, nullptr, 0, kSize);
  CHECK(r.kind == Kind::kMismatch);
  CHECK(r.offset == 699904);
  // A failing read of the only image is the first image's.
  Disk failing({}, kMiB);
  r = CompareOnAnyThreads(failing, nullptr, 0, kSize);
  CHECK(r.kind == Kind::kReadErrorFirst);
  CHECK(r.offset == 0);
}
