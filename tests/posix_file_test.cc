// The POSIX file's allocation answers (File::GetAllocation) against lseek's
// own, on the test directory's file system and on tmpfs (/dev/shm) where
// there is one: the data run it remembers (tmpfs's SEEK_HOLE costs time in
// proportion to the data it passes) never changes an answer, and every call
// that can turn data into a hole forgets it.
#include <fcntl.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "dmcow/env.h"

namespace {

using dmcow::Env;
using dmcow::File;
using dmcow::OpenMode;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kStep = 64 << 10;

// What lseek says at `offset` on a descriptor of its own: data or hole, and
// where that run ends (capped at max_len).
void LseekTruth(const std::string& path, uint64_t offset, uint64_t max_len, bool* is_data, uint64_t* len) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  const off_t data = ::lseek(fd, static_cast<off_t>(offset), SEEK_DATA);
  if (data < 0 || static_cast<uint64_t>(data) > offset) {
    *is_data = false;
    *len = data < 0 ? max_len : std::min<uint64_t>(max_len, static_cast<uint64_t>(data) - offset);
  } else {
    const off_t hole = ::lseek(fd, static_cast<off_t>(offset), SEEK_HOLE);
    REQUIRE(hole > data);
    *is_data = true;
    *len = std::min<uint64_t>(max_len, static_cast<uint64_t>(hole) - offset);
  }
  ::close(fd);
}

// Every 64 KiB of [0, end), asked in the order a convert walks (each answer
// capped at 1 MiB, so a long data run is asked about many times), equals
// lseek's answer.
void ExpectSameAsLseek(File* file, const std::string& path, uint64_t end) {
  for (uint64_t off = 0; off < end; off += kStep) {
    bool data = false, truth_data = false;
    uint64_t len = 0, truth_len = 0;
    REQUIRE(file->GetAllocation(off, kMiB, &data, &len).ok());
    LseekTruth(path, off, kMiB, &truth_data, &truth_len);
    INFO(path << " at " << off);
    CHECK(data == truth_data);
    CHECK(len == truth_len);
  }
}

void WriteData(File* file, uint64_t offset, uint64_t len) {
  const std::vector<uint8_t> buf(len, 0x5a);
  REQUIRE(file->Write(offset, buf.data(), buf.size()).ok());
}

// Where to try: $TMPDIR's file system always, tmpfs when there is one.
std::vector<std::string> Places() {
  const char* tmp = std::getenv("TMPDIR");
  std::vector<std::string> places = {tmp ? tmp : "/tmp"};
  struct statfs fs;
  if (::statfs("/dev/shm", &fs) == 0 && fs.f_type == 0x01021994 /* TMPFS_MAGIC */ && ::access("/dev/shm", W_OK) == 0) {
    places.push_back("/dev/shm");
  }
  return places;
}

TEST_CASE("GetAllocation answers as lseek does, also inside a remembered data run", "[posix_file]") {
  const std::string place = GENERATE(from_range(Places()));
  {
    const std::string path = place + "/dmcow-posix-file-test-" + std::to_string(::getpid());
    std::unique_ptr<File> file;
    REQUIRE(Env::Default()->OpenFile(path, OpenMode::kCreateTruncate, &file).ok());
    // data [0, 8 MiB), hole [8, 16), data [16, 17), hole to 20 MiB.
    WriteData(file.get(), 0, 8 * kMiB);
    WriteData(file.get(), 16 * kMiB, kMiB);
    REQUIRE(file->Truncate(20 * kMiB).ok());
    ExpectSameAsLseek(file.get(), path, 20 * kMiB);

    SECTION("deallocating inside the remembered run makes a hole there at once") {
      bool data = false;
      uint64_t len = 0;
      REQUIRE(file->GetAllocation(kMiB, kMiB, &data, &len).ok());  // remembers [1 MiB, 8 MiB)
      REQUIRE(data);
      REQUIRE(file->Deallocate(2 * kMiB, kMiB).ok());
      REQUIRE(file->GetAllocation(2 * kMiB, kMiB, &data, &len).ok());
      CHECK_FALSE(data);
      ExpectSameAsLseek(file.get(), path, 20 * kMiB);
    }
    SECTION("zeroing inside it answers as the file system left the range") {
      bool data = false;
      uint64_t len = 0;
      REQUIRE(file->GetAllocation(kMiB, kMiB, &data, &len).ok());
      REQUIRE(file->WriteZeroes(3 * kMiB, kMiB).ok());
      ExpectSameAsLseek(file.get(), path, 20 * kMiB);
    }
    SECTION("truncating inside it: the rest is past the end") {
      bool data = false;
      uint64_t len = 0;
      REQUIRE(file->GetAllocation(kMiB, kMiB, &data, &len).ok());
      REQUIRE(file->Truncate(4 * kMiB).ok());
      REQUIRE(file->Truncate(8 * kMiB).ok());  // [4, 8) MiB a hole now
      REQUIRE(file->GetAllocation(5 * kMiB, kMiB, &data, &len).ok());
      CHECK_FALSE(data);
      ExpectSameAsLseek(file.get(), path, 8 * kMiB);
    }
    SECTION("writes into a hole are data at once") {
      WriteData(file.get(), 10 * kMiB, kMiB);
      ExpectSameAsLseek(file.get(), path, 20 * kMiB);
    }
    file.reset();
    ::unlink(path.c_str());
  }
}

TEST_CASE("a lookup beside a deallocation does not keep the data it saw", "[posix_file]") {
  const std::string place = GENERATE(from_range(Places()));
  const std::string path = place + "/dmcow-posix-file-race-" + std::to_string(::getpid());
  std::unique_ptr<File> file;
  REQUIRE(Env::Default()->OpenFile(path, OpenMode::kCreateTruncate, &file).ok());
  // data [0, 8 MiB) and [16, 17 MiB): a lookup at 0 remembers [0, 8 MiB)
  // (SEEK_HOLE walks 2,048 pages on tmpfs: a wide window), one at 16 MiB
  // replaces it, so every lookup at 0 does its lseeks again.
  WriteData(file.get(), 0, 8 * kMiB);
  WriteData(file.get(), 16 * kMiB, kMiB);
  std::atomic<bool> stop{false};
  std::thread looker([&] {
    bool data;
    uint64_t len;
    for (uint64_t i = 0; !stop; i++) (void)file->GetAllocation(i % 2 ? 16 * kMiB : 0, 8 * kMiB, &data, &len);
  });
  int stale = 0;
  for (int i = 0; i < 3000 && stale == 0; i++) {
    const uint64_t at = (1 + i % 6) * kMiB;
    REQUIRE(file->Deallocate(at, 64 << 10).ok());
    bool data = true;
    uint64_t len = 0;
    REQUIRE(file->GetAllocation(at, 64 << 10, &data, &len).ok());
    if (data) stale++;  // the hole just punched, reported as data
    WriteData(file.get(), at, 64 << 10);
  }
  stop = true;
  looker.join();
  CHECK(stale == 0);
  file.reset();
  ::unlink(path.c_str());
}

}  // namespace
