// ImageLock against the real QEMU 7.2 tools.
//
// A qemu-io in the background holds a qcow2 image open (writable, -r, or
// -r -U), and we hold the same image with ImageLock in the matching mode.
// Then:
//  - /proc/locks shows the very same lock bytes for QEMU's open and ours;
//  - for every holder, each QEMU opener (qemu-io writable, -r, -r -U;
//    qemu-img info with and without -U) succeeds or fails with the same
//    message whether the holder is QEMU or us;
//  - our Acquire in each mode succeeds exactly where the matching qemu-io
//    open does, and fails with QEMU's words ("Failed to get \"write\"
//    lock") and a Busy status;
//  - the expected outcome table is also written out, so a mistake shared by
//    both sides (no locking at all) cannot pass.
// Skipped with a warning when qemu-img/qemu-io are not installed or the
// kernel has no OFD locks.
#include "dmcow/image_lock.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "qemu_holder.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;
using Mode = ImageLock::Mode;

namespace {

const Mode kModes[] = {Mode::kReadWrite, Mode::kReadOnly, Mode::kReadOnlyShared};

// What a QEMU tool did: "ok", or its first line of error.
std::string Outcome(const std::string& command) {
  std::string out;
  int rc = Run("timeout 60 " + command, &out);
  if (rc == 0) return "ok";
  std::string first = out.substr(0, out.find('\n'));
  return "rc " + std::to_string(rc) + ": " + first;
}

// The QEMU openers tried against each holder.
std::vector<std::string> Openers(const std::string& image) {
  return {
      "qemu-io -f qcow2 -c 'read 0 512' '" + image + "'",
      "qemu-io -f qcow2 -r -c 'read 0 512' '" + image + "'",
      "qemu-io -f qcow2 -r -U -c 'read 0 512' '" + image + "'",
      "qemu-img info '" + image + "'",
      "qemu-img info -U '" + image + "'",
  };
}

bool Skip() {
  if (!HaveQemuImg()) {
    NoteSkipped("qemu-img/qemu-io not installed");
    return true;
  }
  return false;
}

// Probe: does this kernel lock at all? (Acquire succeeds unlocked if not.)
bool Unlocked(const std::string& image) {
  std::unique_ptr<ImageLock> lock;
  REQUIRE(ImageLock::Acquire(image, Mode::kReadOnlyShared, &lock).ok());
  if (lock->held()) return false;
  NoteSkipped("kernel without OFD locks");
  return true;
}

void MakeImage(const std::string& image) { MustRun("qemu-img create -q -f qcow2 '" + image + "' 16M"); }

// The whole comparison for one holder mode; `expect_ok[m]`: may an open in
// mode m coexist with the holder (QEMU's rule, written out).
void CompareHolders(Mode holder, const bool expect_ok[3]) {
  if (Skip()) return;
  TempDir dir;
  const std::string image = dir / "a.qcow2";
  MakeImage(image);
  if (Unlocked(image)) return;
  INFO("holder: " << ImageLock::ModeName(holder));

  std::vector<std::string> against_qemu, against_us;
  {
    QemuHolder q(image, holder, dir / "holder.log");
    for (const std::string& cmd : Openers(image)) against_qemu.push_back(Outcome(cmd));
    // Ours in each mode, against QEMU's holder: as the matching qemu-io.
    for (int m = 0; m < 3; ++m) {
      std::unique_ptr<ImageLock> lock;
      Status s = ImageLock::Acquire(image, kModes[m], &lock);
      INFO("ours: " << ImageLock::ModeName(kModes[m]) << ": " << s.ToString() << "\nqemu-io: " << against_qemu[m]);
      CHECK(s.ok() == expect_ok[m]);
      CHECK(s.ok() == (against_qemu[m] == "ok"));
      if (!s.ok()) {
        CHECK(s.IsBusy());
        CHECK(s.message().rfind(image + ": ", 0) == 0);
        // QEMU's own words, e.g. Failed to get "write" lock / Failed to get shared "write" lock.
        size_t at = against_qemu[m].find("Failed to get");
        REQUIRE(at != std::string::npos);
        CHECK(s.message().find(against_qemu[m].substr(at)) != std::string::npos);
        CHECK(s.message().find("QEMU lock byte ") != std::string::npos);
      } else {
        CHECK(lock->held());
      }
    }
  }
  REQUIRE(HeldBytes(image).empty());
  {
    std::unique_ptr<ImageLock> ours;
    Status s = ImageLock::Acquire(image, holder, &ours);
    REQUIRE(s.ok());
    for (const std::string& cmd : Openers(image)) against_us.push_back(Outcome(cmd));
  }
  REQUIRE(HeldBytes(image).empty());

  for (size_t i = 0; i < against_qemu.size(); ++i) {
    INFO("opener: " << Openers(image)[i]);
    CHECK(against_us[i] == against_qemu[i]);
  }
  // qemu-img info opens read-only (qemu-io -r), -U like qemu-io -r -U.
  CHECK((against_qemu[3] == "ok") == expect_ok[1]);
  CHECK((against_qemu[4] == "ok") == expect_ok[2]);
  for (int m = 0; m < 3; ++m) CHECK((against_qemu[m] == "ok") == expect_ok[m]);
}

}  // namespace

TEST_CASE("image lock: each mode locks the bytes QEMU locks") {
  if (Skip()) return;
  TempDir dir;
  const std::string image = dir / "a.qcow2";
  MakeImage(image);
  if (Unlocked(image)) return;
  // What QEMU 7.2 takes on a qcow2 file: 100 + perm used, 200 + perm not
  // shared (perms: 0 consistent read, 1 write, 2 write unchanged, 3 resize).
  const std::set<int> expected[3] = {{100, 101, 103, 201, 203}, {100, 201, 203}, {100}};
  for (int m = 0; m < 3; ++m) {
    INFO("mode: " << ImageLock::ModeName(kModes[m]));
    std::set<int> qemu_bytes;
    {
      QemuHolder q(image, kModes[m], dir / "holder.log");
      qemu_bytes = q.bytes();
    }
    REQUIRE(HeldBytes(image).empty());
    std::set<int> our_bytes;
    {
      std::unique_ptr<ImageLock> lock;
      REQUIRE(ImageLock::Acquire(image, kModes[m], &lock).ok());
      REQUIRE(lock->held());
      our_bytes = HeldBytes(image);
    }
    INFO("qemu-io " << QemuIoFlags(kModes[m]) << ": " << Show(qemu_bytes) << ", ours: " << Show(our_bytes));
    CHECK(our_bytes == qemu_bytes);
    CHECK(qemu_bytes == expected[m]);
    CHECK(HeldBytes(image).empty());  // released on destruction
  }
}

TEST_CASE("image lock: against a writable holder only force-share opens") {
  const bool ok[3] = {false, false, true};
  CompareHolders(Mode::kReadWrite, ok);
}

TEST_CASE("image lock: against a read-only holder only a writer is refused") {
  const bool ok[3] = {false, true, true};
  CompareHolders(Mode::kReadOnly, ok);
}

TEST_CASE("image lock: a force-share holder refuses nobody") {
  const bool ok[3] = {true, true, true};
  CompareHolders(Mode::kReadOnlyShared, ok);
}

TEST_CASE("image lock: two locks of this process conflict; release on destruction") {
  if (Skip()) return;
  TempDir dir;
  const std::string image = dir / "a.qcow2";
  MakeImage(image);
  if (Unlocked(image)) return;

  std::unique_ptr<ImageLock> writer, other;
  REQUIRE(ImageLock::Acquire(image, Mode::kReadWrite, &writer).ok());
  Status s = ImageLock::Acquire(image, Mode::kReadWrite, &other);
  CHECK(s.IsBusy());
  CHECK(s.message() == image +
                           ": Failed to get \"write\" lock: another process has the image open and does "
                           "not share write (QEMU lock byte 201); is another process using the image?");
  CHECK(other == nullptr);
  s = ImageLock::Acquire(image, Mode::kReadOnly, &other);
  CHECK(s.IsBusy());
  CHECK(s.message() == image +
                           ": Failed to get shared \"write\" lock: another process has the image open for "
                           "write (QEMU lock byte 101); is another process using the image? (force-share "
                           "/ -U opens it read-only anyway)");
  // A failed attempt leaves the winner's bytes only.
  CHECK(HeldBytes(image) == std::set<int>{100, 101, 103, 201, 203});
  REQUIRE(ImageLock::Acquire(image, Mode::kReadOnlyShared, &other).ok());
  other.reset();
  writer.reset();
  CHECK(HeldBytes(image).empty());
  CHECK(Outcome("qemu-io -f qcow2 -c 'write 0 512' '" + image + "'") == "ok");
}

TEST_CASE("image lock: AcquireFd keeps the lock after the caller closes its fd") {
  if (Skip()) return;
  TempDir dir;
  const std::string image = dir / "a.qcow2";
  MakeImage(image);
  if (Unlocked(image)) return;

  int fd = ::open(image.c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  std::unique_ptr<ImageLock> lock;
  Status s = ImageLock::AcquireFd(fd, "img", Mode::kReadWrite, &lock);
  ::close(fd);
  REQUIRE(s.ok());
  CHECK(lock->name() == "img");
  CHECK(Outcome("qemu-io -f qcow2 -c 'read 0 512' '" + image + "'").find("Failed to get \"write\" lock") !=
        std::string::npos);
  lock.reset();
  CHECK(HeldBytes(image).empty());
  CHECK(Outcome("qemu-io -f qcow2 -c 'read 0 512' '" + image + "'") == "ok");
}

TEST_CASE("image lock: a missing file is NotFound") {
  TempDir dir;
  std::unique_ptr<ImageLock> lock;
  Status s = ImageLock::Acquire(dir / "nope.qcow2", Mode::kReadOnly, &lock);
  CHECK(s.IsNotFound());
  CHECK(s.message().find("nope.qcow2") != std::string::npos);
  CHECK(lock == nullptr);
}

TEST_CASE("image lock: dmcow-img check -r refuses an image QEMU has open, as qemu-img does") {
  if (Skip()) return;
  TempDir dir;
  const std::string image = dir / "a.qcow2";
  MakeImage(image);
  if (Unlocked(image)) return;
  const std::string ours = std::string(DMCOW_IMG_PATH) + " check -r all '" + image + "'";
  const std::string theirs = "qemu-img check -r all '" + image + "'";
  for (Mode holder : {Mode::kReadWrite, Mode::kReadOnly}) {
    INFO("holder: qemu-io " << QemuIoFlags(holder));
    QemuHolder q(image, holder, dir / "holder.log");
    std::string qemu = Outcome(theirs), dmcow = Outcome(ours);
    INFO("qemu-img: " << qemu << "\ndmcow-img: " << dmcow);
    CHECK(qemu.rfind("rc 1: ", 0) == 0);
    CHECK(dmcow.rfind("rc 1: dmcow-img: Could not open '" + image + "': ", 0) == 0);
    CHECK(dmcow.find("Failed to get \"write\" lock") != std::string::npos);
    CHECK(qemu.find("Failed to get \"write\" lock") != std::string::npos);
    // A plain check reads: refused by a writer only, as qemu-img check is; -U reads anyway.
    const std::string plain = Outcome(std::string(DMCOW_IMG_PATH) + " check '" + image + "'");
    std::string qemu_plain = Outcome("qemu-img check '" + image + "'");
    if (size_t at = qemu_plain.find("qemu-img: "); at != std::string::npos) qemu_plain.replace(at, 8, "dmcow-img");
    CHECK(plain == qemu_plain);
    CHECK((plain == "ok") == (holder == Mode::kReadOnly));
    CHECK(Outcome(std::string(DMCOW_IMG_PATH) + " check -U '" + image + "'") == "ok");
  }
  {  // a force-share holder does not stop a repair, for either tool
    QemuHolder q(image, Mode::kReadOnlyShared, dir / "holder.log");
    CHECK(Outcome(theirs) == "ok");
    CHECK(Outcome(ours) == "ok");
  }
  CHECK(Outcome(ours) == "ok");
  CHECK(HeldBytes(image).empty());
}
