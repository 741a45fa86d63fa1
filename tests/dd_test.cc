// dmcow-img dd against qemu-img dd 7.2: the same command line on two copies
// of the same input, one per tool. Exit code, stdout and stderr must agree
// (tool names aside); where qemu-img made an output, ours must have the
// same virtual size and content (qemu-img compare), pass qemu-img check
// (qcow2) and take no more disk space than qemu-img's (ours skips zeros).
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "test_util.h"

using namespace dmcow_test;

namespace {

bool FileExists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

uint64_t AllocatedBytes(const std::string& path) {
  struct stat st {};
  REQUIRE(stat(path.c_str(), &st) == 0);
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

struct Input {
  const char* name;
  const char* make;  // shell steps in the work directory making "in"
};

const Input kInputs[] = {
    {"qcow2: data, zeros, holes",
     "qemu-img create -q -f qcow2 in 10M && qemu-io -c 'write -P 5 1M 2M' -c 'write -z 4M 1M' -c 'write -P 7 9M 1000' "
     "in"},
    {"qcow2 over a shorter raw backing",
     "qemu-img create -q -f raw base 3M && qemu-io -f raw -c 'write -P 3 0 3M' base && "
     "qemu-img create -q -f qcow2 -b base -F raw -o cluster_size=4k in 6M && qemu-io -c 'write -P 4 2M 64k' in"},
    {"compressed, 512-byte clusters",
     "qemu-img create -q -f raw r 2M && qemu-io -f raw -c 'write -P 9 100k 900k' r && "
     "qemu-img convert -c -O qcow2 -o cluster_size=512 r in"},
    {"raw, not a multiple of 512", "head -c 300000 /dev/urandom > in"},
};

// Runs `dd ARGS` through both tools; "OUT" names the output.
void DdBoth(const TempDir& dir, const Input& input, const std::string& args) {
  INFO(input.name << ": dd " << args);
  MustRun("cd '" + dir.path() + "' && rm -rf src q o && mkdir src && (cd src && " + input.make +
          ") >/dev/null && cp -a src q && cp -a src o");
  const std::string a = ReplaceAll(args, "OUT", "out");
  // (The streams pass through dir/out and dir/err, outside q/ and o/.)
  SplitResult theirs = Exec(dir.path() + "/q", dir.path(), "timeout 20 qemu-img dd " + a);
  SplitResult ours = Exec(dir.path() + "/o", dir.path(), "timeout 20 " + Ours() + " dd " + a);
  INFO("qemu-img: " << theirs.out << theirs.err << "\ndmcow-img: " << ours.out << ours.err);
  CHECK(ours.rc == theirs.rc);
  CHECK(ours.out == theirs.out);
  CHECK(ReplaceAll(ours.err, "dmcow-img", "qemu-img") == theirs.err);
  const std::string q = dir.path() + "/q/out", o = dir.path() + "/o/out";
  // (After a failed create qemu-img may leave a file behind; ours need not.)
  if (theirs.rc != 0) return;
  CHECK(FileExists(o) == FileExists(q));
  if (!FileExists(q) || !FileExists(o)) return;
  std::string fmt = "raw";
  if (args.find("-O qcow2") != std::string::npos) fmt = "qcow2";
  if (args.find("-O qcow ") != std::string::npos) fmt = "qcow";
  const std::string info = "qemu-img info -f " + fmt + " --output=json ";
  Result q_info = Exec(dir.path(), info + q + " | grep '\"virtual-size\"'");
  Result o_info = Exec(dir.path(), info + o + " | grep '\"virtual-size\"'");
  CHECK(o_info.out == q_info.out);
  CHECK(Run("qemu-img compare -q -f " + fmt + " -F " + fmt + " " + q + " " + o) == 0);
  if (fmt == "qcow2") CHECK(Run("qemu-img check -q " + o) == 0);
  CHECK(AllocatedBytes(o) <= AllocatedBytes(q));
}

}  // namespace

TEST_CASE("dd agrees with qemu-img on block sizes, counts, skips and output formats", "[dd][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const Input& input : kInputs) {
    for (const char* args : {
             "if=in of=OUT", "if=in of=OUT bs=1M", "if=in of=OUT bs=1.5k count=100", "if=in of=OUT bs=4k skip=300",
             "if=in of=OUT bs=1M skip=3 count=5",  // count from the start, not from skip
             "if=in of=OUT bs=1000 count=1", "if=in of=OUT bs=1000 skip=2999",
             "if=in of=OUT bs=1M skip=100",  // past the end: a warning, an empty output
             "if=in of=OUT bs=1M skip=9 count=1", "if=in of=OUT bs=1M skip=6", "if=in of=OUT count=0",
             "-O qcow2 if=in of=OUT bs=64k", "-O qcow2 if=in of=OUT bs=3000 skip=7 count=2000",
             "-O qcow if=in of=OUT bs=512k skip=1", "-U if=in of=OUT bs=256M",
             "of=OUT if=in skip=1 bs=1k skip=2",  // the last value wins
         }) {
      DdBoth(dir, input, args);
    }
  }
  DdBoth(dir, kInputs[0], "-f qcow2 if=in of=OUT");
  DdBoth(dir, kInputs[0], "-f raw if=in of=OUT");
  DdBoth(dir, kInputs[0], "--image-opts if=driver=qcow2,file.filename=in of=OUT");
}

TEST_CASE("dd refuses bad command lines as qemu-img does", "[dd][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const char* args : {
           "",
           "if=in",
           "of=OUT",
           "if=in of=OUT foo=1",
           "if=in of=OUT foo",
           "if=in of=OUT bs=0",
           "if=in of=OUT bs=2G",
           "if=in of=OUT bs=-1",
           "if=in of=OUT bs=x",
           "if=in of=OUT count=-1",
           "if=in of=OUT count=9E",
           "if=in of=OUT skip=1x",
           "if=in of=OUT -O foo",
           "if=missing of=OUT",
           "if=in of=/nonexistent/dir/OUT",
           "-f qcow2 if=in of=OUT --image-opts",
           "--image-opts if=driver=qcow2,file.filename=missing of=OUT",
       }) {
    DdBoth(dir, kInputs[0], args);
  }
  // A device or other non-regular output is refused before anything is
  // written (qemu-img would write into it): convert -n does that.
  MustRun("cd '" + dir.path() + "' && mkfifo o/fifo");
  SplitResult fifo = Ours(dir, "dd if=o/in of=o/fifo");
  CHECK(fifo.rc == 1);
  CHECK(fifo.err ==
        "dmcow-img: o/fifo: not a regular file; dd creates image files (convert -n writes into a device)\n");
}
