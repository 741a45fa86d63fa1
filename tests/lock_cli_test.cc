// dmcow-img takes the image locks qemu-img 7.2 takes, against the real QEMU.
//
// A qemu-io in the background holds an image (qemu_holder.h), and each
// dmcow-img command is run next to the same qemu-img command:
//  - writers (create, convert's target with and without -n, commit, check
//    -r, snapshot -c/-a/-d, amend, bitmap) are refused while QEMU has the image open read-write, with
//    qemu-img's message and exit code, and the image (and commit's base)
//    keeps every byte;
//  - readers (info, map, check, compare, convert's source, snapshot -l; checksum, which
//    qemu-img lacks) are refused the same way unless -U, and read with it;
//  - -U exactly where qemu-img accepts it;
//  - the other way round, QEMU is refused while dmcow-img holds the image
//    (the command is held still by a full stdout pipe at its progress line).
// Skipped (reported as skipped) without qemu-img/qemu-io, or without OFD locks.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "dmcow/image_lock.h"
#include "qemu_holder.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;
using Mode = ImageLock::Mode;

namespace {

// `args` run by `tool` in `dir`, under a timeout; "dmcow-img" in the output
// reads "qemu-img", so the two tools' outputs compare as they are.
Result Tool(const std::string& tool, const std::string& dir, const std::string& args) {
  Result r;
  r.rc = Run("cd '" + dir + "' && timeout 60 " + tool + " " + args, &r.out);
  r.out = ReplaceAll(r.out, "dmcow-img", "qemu-img");
  return r;
}

// Both tools; they must agree on exit code and output.
Result Same(const std::string& dir, const std::string& args) {
  const Result theirs = Tool("qemu-img", dir, args);
  const Result ours = Tool(kDmcowImg, dir, args);
  INFO("command: " << args << "\nqemu-img: rc " << theirs.rc << " [" << theirs.out << "]\ndmcow-img: rc " << ours.rc
                   << " [" << ours.out << "]");
  CHECK(ours.rc == theirs.rc);
  CHECK(ours.out == theirs.out);
  return ours;
}

// True (the test case is marked skipped) without the QEMU tools or without
// OFD locks; the caller returns.
bool Skip(const std::string& image) {
  if (!HaveQemuImg()) {
    NoteSkipped("qemu-img/qemu-io not installed");
    return true;
  }
  std::unique_ptr<ImageLock> lock;
  REQUIRE(ImageLock::Acquire(image, Mode::kReadOnlyShared, &lock).ok());
  if (!lock->held()) {
    NoteSkipped("kernel without OFD locks");
    return true;
  }
  return false;
}

// dir/img.qcow2 (16 MiB, data in its own clusters) over dir/base.qcow2
// (other data), and dir/src.qcow2 to convert from.
void MakeImages(const TempDir& dir) {
  const std::string d = "cd '" + dir.path() + "' && ";
  MustRun(d + "qemu-img create -q -f qcow2 base.qcow2 16M && qemu-io -c 'write -P 1 0 1M' base.qcow2 >/dev/null");
  MustRun(d +
          "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2 16M"
          " && qemu-io -c 'write -P 2 512k 1M' img.qcow2 >/dev/null");
  MustRun(d + "qemu-img create -q -f qcow2 src.qcow2 16M && qemu-io -c 'write -P 3 0 64k' src.qcow2 >/dev/null");
  // Two more over base.qcow2: one a level further up, one with an external
  // data file (opened, and locked, before its backing file).
  MustRun(d + "qemu-img create -q -f qcow2 -b img.qcow2 -F qcow2 top.qcow2 16M");
  MustRun(d + "qemu-img create -q -f qcow2 -o data_file=data.raw -b base.qcow2 -F qcow2 withdata.qcow2 16M");
}

}  // namespace

TEST_CASE("lock: every writer is refused while QEMU writes the image, which keeps every byte") {
  TempDir dir;
  MakeImages(dir);
  if (Skip(dir / "img.qcow2")) return;
  const std::string img = Sha256OfFile(dir / "img.qcow2"), base = Sha256OfFile(dir / "base.qcow2");
  {
    QemuHolder q(dir / "img.qcow2", Mode::kReadWrite, dir / "holder.log");
    for (const char* args :
         {"create -f qcow2 img.qcow2 16M", "create -q -f raw img.qcow2 1M", "convert -O qcow2 src.qcow2 img.qcow2",
          "convert -O raw src.qcow2 img.qcow2", "convert -n -O qcow2 src.qcow2 img.qcow2",
          "convert -U -O qcow2 src.qcow2 img.qcow2", "commit img.qcow2", "commit -d img.qcow2",
          "check -r all img.qcow2", "snapshot -c s img.qcow2", "snapshot -a s img.qcow2", "snapshot -d s img.qcow2",
          "amend -o compat=0.10 img.qcow2", "amend -o lazy_refcounts=on img.qcow2", "bitmap --add img.qcow2 b"}) {
      INFO("command: " << args);
      const Result r = Same(dir.path(), args);
      CHECK(r.rc == 1);
      CHECK(r.out.find("Failed to get \"write\" lock\nIs another process using the image [img.qcow2]?\n") !=
            std::string::npos);
      CHECK(Sha256OfFile(dir / "img.qcow2") == img);
      CHECK(Sha256OfFile(dir / "base.qcow2") == base);
    }
  }
  {  // commit writes the base too: refused while QEMU writes it, nothing changed
    QemuHolder q(dir / "base.qcow2", Mode::kReadWrite, dir / "holder.log");
    for (const char* args : {"commit img.qcow2", "commit -d img.qcow2", "convert -n -O qcow2 src.qcow2 img.qcow2"}) {
      const Result r = Same(dir.path(), args);
      CHECK(r.rc == 1);
      CHECK(r.out.find("Could not open backing file: Failed to get shared \"write\" lock\n"
                       "Is another process using the image [base.qcow2]?") != std::string::npos);
    }
  }
  {  // a QEMU reading the base lets nobody write it: commit is refused at the base
    QemuHolder q(dir / "base.qcow2", Mode::kReadOnly, dir / "holder.log");
    const Result r = Same(dir.path(), "commit img.qcow2");
    CHECK(r.out == "qemu-img: Failed to get \"write\" lock\nIs another process using the image [base.qcow2]?\n");
  }
  CHECK(Sha256OfFile(dir / "img.qcow2") == img);
  CHECK(Sha256OfFile(dir / "base.qcow2") == base);
  CHECK(HeldBytes(dir / "img.qcow2").empty());
  // Once QEMU is gone, the same commands work.
  CHECK(Tool(kDmcowImg, dir.path(), "commit img.qcow2").rc == 0);
  CHECK(Tool(kDmcowImg, dir.path(), "convert -n -O qcow2 src.qcow2 img.qcow2").rc == 0);
}

TEST_CASE("lock: readers are refused while QEMU writes the image, and read it with -U") {
  TempDir dir;
  MakeImages(dir);
  if (Skip(dir / "img.qcow2")) return;
  {
    QemuHolder q(dir / "img.qcow2", Mode::kReadWrite, dir / "holder.log");
    const std::string refused =
        "Could not open 'img.qcow2': Failed to get shared \"write\" lock\n"
        "Is another process using the image [img.qcow2]?\n";
    for (const char* args :
         {"info img.qcow2", "map img.qcow2", "check img.qcow2", "compare img.qcow2 src.qcow2",
          "compare src.qcow2 img.qcow2", "convert -O raw img.qcow2 out.raw", "snapshot -l img.qcow2"}) {
      const Result r = Same(dir.path(), args);
      CHECK(r.rc == (std::string(args).rfind("compare", 0) == 0 ? 2 : 1));
      CHECK(r.out == "qemu-img: " + refused);
    }
    for (const char* args : {"info -U img.qcow2", "map -U img.qcow2", "check -U img.qcow2",
                             "compare -U img.qcow2 src.qcow2", "info --force-share --backing-chain img.qcow2",
                             "convert -U -O raw img.qcow2 out.raw", "snapshot -U -l img.qcow2"}) {
      CHECK(Same(dir.path(), args).rc == (std::string(args).rfind("compare", 0) == 0 ? 1 : 0));
    }
    // checksum (not a qemu-img command) reads like the others.
    Result r = Tool(kDmcowImg, dir.path(), "checksum img.qcow2");
    CHECK(r.rc == 1);
    CHECK(r.out == "qemu-img: " + refused);
    CHECK(Tool(kDmcowImg, dir.path(), "checksum -U img.qcow2").rc == 0);
  }
  {  // a QEMU writing the backing file: refused there, as qemu-img is; info alone does not open it
    QemuHolder b(dir / "base.qcow2", Mode::kReadWrite, dir / "base.log");
    for (const char* args : {"map img.qcow2", "compare img.qcow2 src.qcow2", "convert -O raw img.qcow2 out.raw"}) {
      const Result r = Same(dir.path(), args);
      CHECK(r.out.find("Could not open 'img.qcow2': Could not open backing file: Failed to get shared \"write\" "
                       "lock\nIs another process using the image [base.qcow2]?") != std::string::npos);
    }
    // One "Could not open backing file: " per level, whatever else is open.
    CHECK(Same(dir.path(), "map top.qcow2")
              .out.find("Could not open backing file: Could not open backing file: "
                        "Failed to get shared") != std::string::npos);
    CHECK(Same(dir.path(), "map withdata.qcow2").rc == 1);
    CHECK(Same(dir.path(), "info --backing-chain img.qcow2").rc == 1);
    CHECK(Same(dir.path(), "info img.qcow2").rc == 0);
    CHECK(Same(dir.path(), "map -U img.qcow2").rc == 0);
  }
}

TEST_CASE("lock: readers share the image with a reading QEMU; -U only where qemu-img has it") {
  TempDir dir;
  MakeImages(dir);
  if (Skip(dir / "img.qcow2")) return;
  {
    QemuHolder q(dir / "img.qcow2", Mode::kReadOnly, dir / "holder.log");
    for (const char* args : {"info img.qcow2", "map img.qcow2", "check img.qcow2", "compare img.qcow2 img.qcow2"}) {
      CHECK(Same(dir.path(), args).rc == 0);
    }
    CHECK(Tool(kDmcowImg, dir.path(), "checksum img.qcow2").rc == 0);
    CHECK(Same(dir.path(), "check -r leaks img.qcow2").rc == 1);  // a writer is refused
  }
  // -U is for reading: refused on the writers, as qemu-img refuses it.
  for (const char* args : {"commit -U img.qcow2", "commit --force-share img.qcow2", "create -U -f qcow2 x.qcow2 1M",
                           "check -U -r leaks img.qcow2"}) {
    CHECK(Same(dir.path(), args).rc == 1);
  }
  CHECK(access((dir / "x.qcow2").c_str(), F_OK) != 0);
}

namespace {

// dmcow-img running with its stdout a full pipe: it stops at its first
// progress line, with its images open and locked, until Finish() drains it.
class StalledCommand {
 public:
  explicit StalledCommand(const std::string& dir, const std::vector<std::string>& args) {
    int fds[2];
    REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
    REQUIRE(::fcntl(fds[1], F_SETFL, O_NONBLOCK) == 0);
    char block[4096] = {};
    while (::write(fds[1], block, sizeof(block)) > 0) {
    }
    REQUIRE(errno == EAGAIN);
    REQUIRE(::fcntl(fds[1], F_SETFL, 0) == 0);  // the command's writes block
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      ::dup2(fds[1], 1);
      if (::chdir(dir.c_str()) != 0) ::_exit(126);
      std::vector<char*> argv = {const_cast<char*>(kDmcowImg)};
      for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv(kDmcowImg, argv.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    out_ = fds[0];
  }
  ~StalledCommand() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (out_ >= 0) ::close(out_);
  }
  // Drains stdout; the exit status.
  int Finish() {
    char buf[65536];
    while (::read(out_, buf, sizeof(buf)) > 0) {
    }
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

 private:
  pid_t pid_ = -1;
  int out_ = -1;
};

// Waits (at most 20 s) until `path` shows exactly `bytes` in /proc/locks.
bool LocksSettle(const std::string& path, const std::set<int>& bytes) {
  for (int i = 0; i < 400; i++) {
    if (HeldBytes(path) == bytes) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

}  // namespace

TEST_CASE("lock: QEMU is refused while dmcow-img holds the image") {
  TempDir dir;
  MakeImages(dir);
  if (Skip(dir / "img.qcow2")) return;
  const std::string qemu_read = "qemu-io -f qcow2 -r -c 'read 0 512' img.qcow2";
  const std::string qemu_write = "qemu-io -f qcow2 -c 'write 0 512' img.qcow2";
  {  // a writer (convert -n's target): QEMU may not even read it, but with -U
    StalledCommand c(dir.path(), {"convert", "-p", "-n", "-O", "qcow2", "src.qcow2", "img.qcow2"});
    REQUIRE(LocksSettle(dir / "img.qcow2", {100, 101, 103, 201, 203}));
    Result r = Tool("", dir.path(), qemu_read);
    CHECK(r.rc == 1);
    CHECK(r.out.find("Failed to get shared \"write\" lock") != std::string::npos);
    CHECK(Tool("", dir.path(), "qemu-io -f qcow2 -r -U -c 'read 0 512' img.qcow2").rc == 0);
    CHECK(c.Finish() == 0);
  }
  {  // readers (compare -p): QEMU may read, not write
    StalledCommand c(dir.path(), {"compare", "-p", "img.qcow2", "src.qcow2"});
    REQUIRE(LocksSettle(dir / "img.qcow2", {100, 201, 203}));
    CHECK(Tool("", dir.path(), qemu_read).rc == 0);
    Result r = Tool("", dir.path(), qemu_write);
    CHECK(r.rc == 1);
    CHECK(r.out.find("Failed to get \"write\" lock") != std::string::npos);
    CHECK(c.Finish() == 0);  // img.qcow2 now holds src.qcow2's content
  }
  CHECK(HeldBytes(dir / "img.qcow2").empty());
  CHECK(Tool("", dir.path(), qemu_write).rc == 0);
}
