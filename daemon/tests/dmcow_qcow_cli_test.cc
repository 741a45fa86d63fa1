// Bad command lines and images refused by dmcow-qcow and by dmcowd's qcow2
// plugin before anything is created: exit codes and messages. These run on
// the host (they fail before device-mapper or the kernel module are needed);
// the VM tests (tests/vm/qcow_test.cc) cover what happens with a kernel.
#include <catch2/catch.hpp>
#include <string>

#include "test_util.h"

using namespace dmcow_test;

namespace {

int Qcow(const std::string& args, std::string* out) { return Run(std::string(DMCOW_QCOW_PATH) + " " + args, out); }
int Daemon(const std::string& args, std::string* out) { return Run(std::string(DMCOWD_PATH) + " " + args, out); }

}  // namespace

TEST_CASE("dmcow-qcow refuses bad command lines with exit 2") {
  std::string out;
  CHECK(Qcow("", &out) == 2);
  CHECK(Qcow("frobnicate", &out) == 2);
  CHECK(out.find("unknown command 'frobnicate'") != std::string::npos);
  CHECK(Qcow("attach", &out) == 2);
  CHECK(out.find("usage: dmcow-qcow attach") != std::string::npos);
  CHECK(Qcow("attach --name 'a/b' x.qcow2", &out) == 2);
  CHECK(out.find("name 'a/b'") != std::string::npos);
  CHECK(Qcow("attach --name abcdefghijklmnopqrstuvwxyz0123 x.qcow2", &out) == 2);  // 30 characters
  CHECK(Qcow("attach --bogus x.qcow2", &out) == 2);
  for (const char* bad : {"-1", "1T", "12Q", "", "9999999G"}) {
    CHECK(Qcow(std::string("attach --scratch-max '") + bad + "' x.qcow2", &out) == 2);
    CHECK(out.find("bad --scratch-max") != std::string::npos);
  }
  CHECK(Qcow("detach", &out) == 2);
  CHECK(Qcow("detach ..", &out) == 2);
  CHECK(Qcow("list --output xml", &out) == 2);
  CHECK(Qcow("--help", &out) == 0);
  CHECK(out.find("dmcow-qcow attach") != std::string::npos);
}

TEST_CASE("dmcow-qcow refuses images it cannot serve, naming the file") {
  TempDir dir;
  std::string out;
  CHECK(Qcow("attach " + dir / "missing.qcow2", &out) == 1);
  CHECK(out.find("missing.qcow2") != std::string::npos);
  if (!HaveQemuImg()) {
    WARN("qemu-img not found: the rest skipped");
    return;
  }
  MustRun("qemu-img create -q -f raw " + dir / "disk.raw" + " 1M");
  CHECK(Qcow("attach " + dir / "disk.raw", &out) == 1);
  CHECK(out.find("disk.raw: is raw; attach serves qcow2") != std::string::npos);
  // A backing file of a format the engine does not read.
  MustRun("qemu-img create -q -f vmdk " + dir / "base.vmdk" + " 1M");
  MustRun("qemu-img create -q -f qcow2 -b base.vmdk -F vmdk " + dir / "top.qcow2" + " 1M");
  CHECK(Qcow("attach " + dir / "top.qcow2", &out) == 1);
  CHECK(out.find("top.qcow2: backing format 'vmdk' is not supported") != std::string::npos);
  // Encrypted images (the header's crypt_method set to AES: no key
  // derivation, whose timing qemu-img's LUKS creation depends on).
  MustRun("qemu-img create -q -f qcow2 " + dir / "enc.qcow2" + " 1M && printf '\\000\\000\\000\\001' | "
          "dd of=" + dir / "enc.qcow2" + " bs=1 seek=32 conv=notrunc status=none");
  CHECK(Qcow("attach " + dir / "enc.qcow2", &out) == 1);
  CHECK(out.find("enc.qcow2: image is encrypted") != std::string::npos);
  CHECK(Qcow("detach nothere", &out) == 1);
  CHECK(out.find("nothere: not attached") != std::string::npos);
}

TEST_CASE("dmcowd's qcow2 plugin refuses bad settings with exit 2") {
  TempDir dir;
  std::string out;
  const std::string img = dir / "i.qcow2";
  CHECK(Daemon("--plugin qcow2 --name t --opt bogus=1 " + img, &out) == 2);
  CHECK(out.find("no setting 'bogus'") != std::string::npos);
  CHECK(Daemon("--plugin qcow2 --name t --opt read_only=2 " + img, &out) == 2);
  CHECK(out.find("read_only=2") != std::string::npos);
  for (const char* bad : {"1G", "-5", "", "99999999999999999999"}) {
    CHECK(Daemon(std::string("--plugin qcow2 --name t --opt 'scratch_max=") + bad + "' " + img, &out) == 2);
    CHECK(out.find("expected a number of bytes") != std::string::npos);
  }
  CHECK(Daemon("--plugin qcow2 --name t --chunk-size 64K " + img, &out) == 2);
  CHECK(out.find("chunk is the image's cluster") != std::string::npos);
  CHECK(Daemon("--plugin qcow2 --name t", &out) == 2);
  CHECK(out.find("one argument, IMAGE") != std::string::npos);
  CHECK(Daemon("--plugin qcow2 --name t --ready-fd 1 " + img, &out) == 2);
  CHECK(out.find("bad --ready-fd") != std::string::npos);
}
