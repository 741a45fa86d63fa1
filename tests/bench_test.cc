// dmcow-img bench against qemu-img bench 7.2: the same command line on two
// copies of the same image, one per tool. Both must agree on the exit code,
// stdout (the time aside) and stderr (tool names aside); after writes, the
// two images hold the same content and ours checks clean.
#include <catch2/catch.hpp>
#include <regex>
#include <string>
#include <vector>

#include "test_util.h"

using namespace dmcow_test;

namespace {

std::string WithoutTime(const std::string& out) {
  return std::regex_replace(out, std::regex("Run completed in [0-9]+\\.[0-9]+ seconds"), "Run completed in T seconds");
}

// Runs `args` through both tools on fresh copies of the files `make` makes.
void BenchBoth(const TempDir& dir, const std::string& make, const std::string& args) {
  INFO("bench " << args);
  MustRun("cd '" + dir.path() + "' && rm -rf src q o && mkdir -p src logs && (cd src && " + make +
          ") >/dev/null && cp -a --sparse=never src q && cp -a --sparse=never src o");
  SplitResult theirs = Exec(dir.path() + "/q", dir.path() + "/logs", "qemu-img bench " + args);
  SplitResult ours = Exec(dir.path() + "/o", dir.path() + "/logs", Ours() + " bench " + args);
  INFO("qemu-img: " << theirs.out << theirs.err << "\ndmcow-img: " << ours.out << ours.err);
  CHECK(ours.rc == theirs.rc);
  CHECK(WithoutTime(ours.out) == WithoutTime(theirs.out));
  CHECK(ReplaceAll(ours.err, "dmcow-img", "qemu-img") == theirs.err);
  if (theirs.rc == 0 && WithoutTime(theirs.out).find("Run completed in T seconds.\n") == std::string::npos) {
    FAIL("qemu-img's output lacks its last line");
  }
  CHECK(Exec(dir.path(), "qemu-img compare q/img o/img").rc == 0);
  if (Exec(dir.path(), "qemu-img info o/img").out.find("file format: qcow2") != std::string::npos) {
    CHECK(Exec(dir.path(), "qemu-img check o/img").rc == 0);
  }
}

const char kQcow2[] = "qemu-img create -q -f qcow2 img 16M && qemu-io -c 'write -P 1 0 1M' img";
const char kChain[] =
    "qemu-img create -q -f qcow2 base 16M && qemu-io -c 'write -P 1 0 8M' base"
    " && qemu-img create -q -f qcow2 -b base -F qcow2 img && qemu-io -c 'write -P 2 4M 64k' img";
const char kRaw[] = "qemu-img create -q -f raw img 4M && qemu-io -f raw -c 'write -P 1 0 1M' img";

}  // namespace

TEST_CASE("bench reads and writes as qemu-img bench does", "[bench][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  BenchBoth(dir, kQcow2, "-c 2000 img");
  BenchBoth(dir, kQcow2, "-c 0 img");
  BenchBoth(dir, kQcow2, "-c 300 -d 4 -o 1M -s 64k -S 128k img");             // wraps at the end
  BenchBoth(dir, kQcow2, "-c 5 -o 16M img");                                  // starts at the end: fails
  BenchBoth(dir, kQcow2, "-c 5 -o 16380k -s 8k -S 1k img");                   // crosses the end: fails
  BenchBoth(dir, kQcow2, "-c 100 -s 0 img");                                  // empty requests
  BenchBoth(dir, kChain, "-c 500 -d 1 -s 32k -f qcow2 img");                  // through the backing file
  BenchBoth(dir, kChain, "-c 500 -w --pattern=7 -s 4k -S 12k -f qcow2 img");  // copy-on-write
  BenchBoth(dir, kQcow2, "-c 200 -w --pattern=0x2a -d 8 --flush-interval=16 -s 64k img");
  BenchBoth(dir, kQcow2, "-c 70 -w --flush-interval=64 --no-drain img");
  BenchBoth(dir, kQcow2, "-c 40 -w -o 15M -s 32k img");  // wraps to the start
  BenchBoth(dir, kRaw, "-c 100 -w --pattern=3 -f raw img");
  BenchBoth(dir, kRaw, "-c 100 -w img");  // probed raw: QEMU's warning
  BenchBoth(dir, kQcow2, "-q -t writethrough -c 10 img");
  BenchBoth(dir, kQcow2, "-U -i threads -c 10 img");
  BenchBoth(dir, kQcow2, "--image-opts -c 10 driver=qcow2,file.filename=img");
}

// Bad command lines: qemu-img's message and exit code, nothing written.
TEST_CASE("bench: bad input gets qemu-img's message", "[bench][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const char* args : {"-c x img",
                           "-c -1 img",
                           "-c 3000000000 img",
                           "-d x img",
                           "-o x img",
                           "-o -1 img",
                           "-s x img",
                           "-s 3G img",
                           "-S x img",
                           "--pattern=x -w img",
                           "--pattern=300 -w img",
                           "--flush-interval=x -w img",
                           "-c 10 --flush-interval=3 img",
                           "-c 10 -w --flush-interval=3 img",
                           "-i bogus img",
                           "-i native -c 1 img",
                           "-n -c 1 img",
                           "-t bogus img",
                           "-c 2",
                           "-c 2 img img",
                           "-x img",
                           "-c",
                           "-U -w -c 2 img",
                           "-c 2 nofile",
                           "-f qcow2 --image-opts -c 2 driver=qcow2,file.filename=img"}) {
    DYNAMIC_SECTION(args) {
      BenchBoth(dir, kQcow2, args);
      CHECK(Exec(dir.path(), "cmp src/img o/img").rc == 0);
    }
  }
  // qemu-img 7.2 waits forever with no request in flight; we refuse.
  MustRun("cd '" + dir.path() + "' && qemu-img create -q -f qcow2 z 1M");
  SplitResult ours = Exec(dir, Ours(), "bench -d 0 -c 2 z");
  CHECK(ours.rc == 1);
  CHECK(ours.err == "dmcow-img: Invalid queue depth specified\n");
}
