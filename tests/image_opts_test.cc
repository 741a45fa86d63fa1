// --image-opts, and reading an image without its backing file: qemu-img
// reads "driver=qcow2,file.filename=F,backing=" (its deprecated spelling of
// a JSON null) without opening the backing file, so that unallocated
// clusters read as zeros; dmcow-img takes that and "backing=null" (which
// qemu-img 7.2 refuses as the name of a missing node) for the same thing,
// so a user can vet or convert an image without following what it names.
// Outputs are compared with qemu-img's; bad lists get qemu-img's messages.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "test_util.h"

using namespace dmcow_test;

namespace {

// qemu-img's stderr as ours would read: our program name, without the
// warning it gives for "backing=" (deprecated there, the only way there).
std::string AsOurs(std::string err) {
  const std::string warning =
      "qemu-img: warning: Use of \"backing\": \"\" is deprecated; use \"backing\": null instead\n";
  return ReplaceAll(ReplaceAll(err, warning, ""), "qemu-img:", "dmcow-img:");
}

}  // namespace

TEST_CASE("--image-opts backing=null reads the image without its backing file, as qemu-img", "[image_opts]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  // The backing file is a FIFO: following it would block, so any open of it
  // fails the test (under timeout) or is refused; backing=null opens nothing.
  MustRun("cd '" + dir.path() +
          "' && qemu-img create -q -f qcow2 base.qcow2 1M"
          " && qemu-io -c 'write -P 1 0 256k' base.qcow2 >/dev/null"
          " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2"
          " && qemu-io -c 'write -P 2 128k 64k' -c 'write -z 512k 64k' top.qcow2 >/dev/null"
          // Written before the FIFO is named: qemu-io would block on it.
          " && qemu-img create -q -f qcow2 overpipe.qcow2 1M && qemu-io -c 'write -P 3 64k 64k' overpipe.qcow2"
          " >/dev/null && mkfifo pipe && qemu-img rebase -u -b pipe -F raw overpipe.qcow2");
  const std::string top = "driver=qcow2,file.filename=top.qcow2";
  // qemu-img's own spelling (backing=) against ours; stdout and exit status equal.
  for (const std::string command : {"map {}", "map --output json {}", "info {}", "info --output json {}", "check {}",
                                    "compare {} driver=qcow2,file.filename=base.qcow2", "compare {} {}"}) {
    auto with = [&](const std::string& backing) {
      std::string c = command;
      for (size_t at; (at = c.find("{}")) != std::string::npos;) c.replace(at, 2, top + "," + backing);
      return "--image-opts " + c.substr(c.find(' ') + 1);
    };
    const std::string verb = command.substr(0, command.find(' '));
    SplitResult theirs = Exec(dir, "qemu-img", verb + " " + with("backing="));
    for (const char* backing : {"backing=", "backing=null"}) {
      SplitResult ours = Ours(dir, verb + " " + with(backing));
      INFO("dmcow-img " << verb << " " << with(backing) << "\nours: " << ours.err << "\ntheirs: " << theirs.err);
      CHECK(ours.rc == theirs.rc);
      CHECK(ours.out == theirs.out);
      CHECK(ours.err == AsOurs(theirs.err));
    }
  }
  // convert -O raw and checksum: the top's clusters, zeros elsewhere.
  MustRun("cd '" + dir.path() + "' && qemu-img convert --image-opts " + top +
          ",backing= -O raw theirs.raw 2>/dev/null");
  for (const char* backing : {"backing=", "backing=null"}) {
    SplitResult conv = Ours(dir, "convert --image-opts " + top + "," + backing + " -O raw ours.raw");
    INFO(conv.err);
    CHECK(conv.rc == 0);
    CHECK(ReadWholeFile(dir / "ours.raw") == ReadWholeFile(dir / "theirs.raw"));
    ::unlink((dir / "ours.raw").c_str());
    SplitResult sum = Ours(dir, "checksum --image-opts " + top + "," + backing);
    CHECK(sum.rc == 0);
    CHECK(sum.out.substr(0, 64) == BlockDigestOfFile(dir / "theirs.raw"));
  }
  // Nothing named is opened: the FIFO backing is never touched.
  const std::string pipe_top = "driver=qcow2,file.filename=overpipe.qcow2,backing=null";
  for (const std::string& command : {"map --image-opts " + pipe_top, "checksum --image-opts " + pipe_top,
                                     "convert --image-opts " + pipe_top + " -O raw pipe.raw"}) {
    SplitResult r = Ours(dir, command);
    INFO("dmcow-img " << command << "\n" << r.err);
    CHECK(r.rc == 0);
  }
  MustRun("cd '" + dir.path() +
          "' && qemu-io -f raw -c 'read -P 3 64k 64k' -c 'read -P 0 0 64k'"
          " -c 'read -P 0 128k 896k' pipe.raw >/dev/null");
}

TEST_CASE("--image-opts refuses bad option lists with qemu-img's messages", "[image_opts]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() +
          "' && qemu-img create -q -f qcow2 base.qcow2 1M"
          " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2");
  // Same message and status as qemu-img 7.2.
  for (const std::string& opts :
       {std::string("driver=qcow2,file.filename=top.qcow2,backing=foo"),
        std::string("driver=qcow2,file.filename=top.qcow2,backing=,backing=foo"),
        std::string("driver=foo,file.filename=top.qcow2"), std::string("driver=qcow2,file.filename=top.qcow2,foo=1"),
        std::string("driver=qcow2,file.filename=top.qcow2,file.foo=1"), std::string("driver=qcow2"),
        std::string("driver=qcow2,file.filename="), std::string("top.qcow2"),
        std::string("driver=qcow2,file=top.qcow2"), std::string("driver=qcow2,file.filename=top.qcow2,file=x"),
        std::string("''")}) {
    for (const char* verb : {"map", "convert -O raw", "compare", "check"}) {
      const std::string v = verb;
      const std::string args =
          v + " --image-opts " + opts + (v == "compare" ? " " + opts : "") + (v == "convert -O raw" ? " out.raw" : "");
      SplitResult theirs = Exec(dir, "qemu-img", args);
      SplitResult ours = Ours(dir, args);
      INFO("args: " << args << "\nours: " << ours.err << "theirs: " << theirs.err);
      CHECK(ours.rc == theirs.rc);
      CHECK(ours.rc != 0);
      CHECK(ours.err == AsOurs(theirs.err));
      CHECK(::access((dir / "out.raw").c_str(), F_OK) != 0);
    }
  }
  // Ours where qemu-img's differs: formats qemu reads and we do not; -f with --image-opts.
  SplitResult vmdk = Ours(dir, "map --image-opts driver=vmdk,file.filename=top.qcow2");
  CHECK(vmdk.rc == 1);
  CHECK(vmdk.err ==
        "dmcow-img: Could not open 'driver=vmdk,file.filename=top.qcow2': unsupported image format 'vmdk'\n");
  SplitResult both = Ours(dir, "map -f qcow2 --image-opts driver=qcow2,file.filename=top.qcow2");
  CHECK(both.rc == 1);
  CHECK(both.err == "dmcow-img: --image-opts and --format are mutually exclusive\n");
}
