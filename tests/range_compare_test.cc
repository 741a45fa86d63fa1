// compare's threaded data check (cli/range_compare.h) reports what qemu-img's
// chunk-by-chunk reading meets first, on any number of threads: the first
// 2 MiB chunk with an event, within it a read error of the first image,
// then of the second, then the first differing 512-byte block. Raw images
// in memory; reads fail where a test says.
#include <catch2/catch.hpp>
#include <memory>
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

// A file whose reads fail (EIO) where they touch the byte `bad`.
class FailingFile final : public File {
 public:
  FailingFile(std::unique_ptr<File> base, uint64_t bad) : base_(std::move(base)), bad_(bad) {}
  const std::string& name() const override { return base_->name(); }
  Status Read(uint64_t offset, size_t len, void* buf, size_t* bytes_read) override {
    if (offset <= bad_ && bad_ < offset + len) return Status::IOError(name() + ": injected read error");
    return base_->Read(offset, len, buf, bytes_read);
  }
  Status Write(uint64_t offset, const void* buf, size_t len) override { return base_->Write(offset, buf, len); }
  Status Sync() override { return base_->Sync(); }
  Status Size(uint64_t* size) override { return base_->Size(size); }
  Status Truncate(uint64_t size) override { return base_->Truncate(size); }

 private:
  std::unique_ptr<File> base_;
  uint64_t bad_;
};

class FailingEnv final : public Env {
 public:
  explicit FailingEnv(MemEnv* base, uint64_t bad) : base_(base), bad_(bad) {}
  Status OpenFile(const std::string& path, OpenMode mode, std::unique_ptr<File>* file) override {
    std::unique_ptr<File> inner;
    Status st = base_->OpenFile(path, mode, &inner);
    if (st.ok()) *file = std::make_unique<FailingFile>(std::move(inner), bad_);
    return st;
  }
  bool FileExists(const std::string& path) override { return base_->FileExists(path); }

 private:
  MemEnv* base_;
  uint64_t bad_;
};

struct Disk {
  MemEnv mem;
  FailingEnv env;
  std::unique_ptr<dmcow::Image> image;

  // kSize bytes of a pattern, with 'X' at each of `flips`; reads of byte
  // `bad` fail.
  Disk(const std::vector<uint64_t>& flips, uint64_t bad = UINT64_MAX) : env(&mem, bad) {
    std::vector<uint8_t> bytes(kSize);
    for (uint64_t i = 0; i < kSize; i++) bytes[i] = static_cast<uint8_t>(i * 7 + i / 4096);
    for (uint64_t at : flips) bytes[at] = 'X';
    mem.PutFile("disk", std::move(bytes));
    Open();
  }
  // kSize zero bytes, with 'X' at each of `flips`.
  static std::unique_ptr<Disk> Zeros(const std::vector<uint64_t>& flips) {
    auto d = std::make_unique<Disk>(std::vector<uint64_t>{});
    std::vector<uint8_t> bytes(kSize, 0);
    for (uint64_t at : flips) bytes[at] = 'X';
    d->mem.PutFile("disk", std::move(bytes));
    d->Open();
    return d;
  }
  void Open() {
    dmcow::OpenOptions o;
    o.format = "raw";
    o.env = &env;
    Status st = dmcow::OpenImage("disk", o, &image);
    INFO(st.ToString());
    REQUIRE(st.ok());
  }
};

// The outcome on every thread count, which must not depend on it.
RangeOutcome CompareOnAnyThreads(Disk& first, Disk* second, uint64_t offset, uint64_t len) {
  RangeOutcome once = RangeComparer(1).Compare(first.image.get(), second ? second->image.get() : nullptr, offset, len);
  for (unsigned threads : {2u, 3u, 8u, 64u}) {
    INFO("threads: " << threads);
    for (int repeat = 0; repeat < 5; repeat++) {
      RangeOutcome r =
          RangeComparer(threads).Compare(first.image.get(), second ? second->image.get() : nullptr, offset, len);
      CHECK(r.kind == once.kind);
      CHECK(r.offset == once.offset);
      CHECK(r.error.ToString() == once.error.ToString());
    }
  }
  return once;
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
