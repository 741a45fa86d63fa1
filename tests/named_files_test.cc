// Files an image names (a backing file, an external data file) and the image
// itself are untrusted: dmcow-img never blocks on one and refuses what
// cannot hold an image (a FIFO, a socket, a character device), naming the
// file, what it is and the image that named it. `info` shows an external
// data file's name without opening it, as qemu-img info does.
//
// Every command runs under `timeout 10`: a regression (an open that blocks
// on a FIFO) fails the test with exit 124 instead of hanging CI.
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <string>
#include <vector>

#include "test_util.h"

using namespace dmcow_test;

namespace {

constexpr int kTimedOut = 124;  // timeout(1)'s exit status

bool Contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// A bound AF_UNIX socket file at `path` (the descriptor may be closed: the
// file stays, and opening it fails with ENXIO either way).
void MakeSocketFile(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  REQUIRE(path.size() < sizeof(addr.sun_path));
  std::strcpy(addr.sun_path, path.c_str());
  const int rc = ::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  ::close(fd);
  REQUIRE(rc == 0);
}

struct Special {
  const char* name;  // as the image names it
  const char* kind;  // as the refusal words it
};

}  // namespace

TEST_CASE("a backing file that is a FIFO, a socket or a character device is refused at once", "[named_files]") {
  TempDir dir;
  REQUIRE(::mkfifo((dir / "fifo").c_str(), 0600) == 0);
  MakeSocketFile(dir / "sock");
  const Special specials[] = {
      {"fifo", "is a FIFO (named pipe), not a regular file or block device"},
      {"sock", "is a socket, not a regular file or block device"},
      {"/dev/null", "is a character device, not a regular file or block device"},
      {"/dev/zero", "is a character device, not a regular file or block device"},
  };
  const std::vector<std::string> commands = {"map {}",        "map --output json {}",
                                             "checksum {}",   "convert -O raw {} out.raw",
                                             "compare {} {}", "info --backing-chain {}"};
  for (const Special& sp : specials) {
    // -u: the backing file is named, not opened, at creation.
    const std::string top = std::string("over-") + (sp.name[0] == '/' ? sp.name + 5 : sp.name) + ".qcow2";
    REQUIRE(Ours(dir, "create -q -f qcow2 -u -b " + std::string(sp.name) + " -F raw " + top + " 1M").rc == 0);
    for (std::string command : commands) {
      for (size_t at; (at = command.find("{}")) != std::string::npos;) command.replace(at, 2, top);
      SplitResult r = Ours(dir, command);
      INFO("dmcow-img " << command << "\nstderr: " << r.err);
      CHECK(r.rc != kTimedOut);
      CHECK(r.rc == (command.rfind("compare", 0) == 0 ? 2 : 1));
      // Which image named which file, and what the file is.
      CHECK(Contains(r.err, top + ": could not open backing file '" + sp.name + "': " + sp.kind));
      CHECK(r.err.find('\n') == r.err.size() - 1);
      CHECK(::access((dir / "out.raw").c_str(), F_OK) != 0);
    }
  }
  // The top image itself.
  for (const Special& sp : specials) {
    for (const char* command : {"info", "map", "checksum", "check"}) {
      SplitResult r = Ours(dir, std::string(command) + " " + sp.name);
      INFO("dmcow-img " << command << " " << sp.name << "\nstderr: " << r.err);
      CHECK(r.rc == 1);
      CHECK(Contains(r.err, std::string(sp.name) + ": " + sp.kind));
    }
  }
}

TEST_CASE("info shows an external data file without opening it; map and convert refuse a FIFO", "[named_files]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  // Each image names its data file: present, missing, a FIFO.
  MustRun("cd '" + dir.path() +
          "' && qemu-img create -q -f qcow2 -o data_file=data.bin present.qcow2 1M"
          " && qemu-io -c 'write -P 7 64k 64k' present.qcow2 >/dev/null"
          " && qemu-img create -q -f qcow2 -o data_file=gone.bin missing.qcow2 1M && rm gone.bin"
          " && qemu-img create -q -f qcow2 -o data_file=fifo.bin fifo.qcow2 1M && rm fifo.bin && mkfifo fifo.bin");
  for (const char* image : {"present.qcow2", "missing.qcow2", "fifo.qcow2"}) {
    for (const char* args : {"info", "info --output json", "info --backing-chain"}) {
      const std::string command = std::string(args) + " " + image;
      SplitResult ours = Ours(dir, command);
      SplitResult theirs = Exec(dir, "qemu-img", command);
      INFO("command: " << command << "\nours: " << ours.err << "\ntheirs: " << theirs.err);
      CHECK(ours.rc == 0);
      CHECK(theirs.rc == 0);
      CHECK(ours.out == theirs.out);
      const std::string named = image[0] == 'p' ? "data.bin" : image[0] == 'm' ? "gone.bin" : "fifo.bin";
      CHECK(Contains(ours.out, named));
    }
  }
  // Reading the content needs the data file: a FIFO is refused, promptly
  // (qemu-img 7.2 blocks here for ever), and nothing is written.
  for (const char* command : {"map fifo.qcow2", "convert -O raw fifo.qcow2 out.raw", "checksum fifo.qcow2",
                              "compare fifo.qcow2 present.qcow2"}) {
    SplitResult r = Ours(dir, command);
    INFO("dmcow-img " << command << "\nstderr: " << r.err);
    CHECK(r.rc != kTimedOut);
    CHECK(r.rc == (std::string(command).rfind("compare", 0) == 0 ? 2 : 1));
    CHECK(Contains(r.err,
                   "fifo.qcow2: could not open external data file 'fifo.bin': is a FIFO (named pipe), "
                   "not a regular file or block device"));
    CHECK(::access((dir / "out.raw").c_str(), F_OK) != 0);
  }
  // The data file is still used where it is there.
  SplitResult map = Ours(dir, "map --output json present.qcow2");
  CHECK(map.rc == 0);
  CHECK(map.out == Exec(dir, "qemu-img", "map --output json present.qcow2").out);
}
