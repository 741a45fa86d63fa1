// Images in formats dmcow does not read (vmdk, vdi, vpc, vhdx, qed,
// parallels, luks, dmg, cloop, bochs) are probed as qemu-img probes them and
// refused with "unsupported image format '<qemu's name>'", exit 1 (compare:
// 2, its open-error code), no output file written; -f raw still reads the
// container as raw. Before, each was silently read as a raw disk.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "test_util.h"

using namespace dmcow_test;

namespace {

bool Contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

void Put(std::vector<uint8_t>* buf, size_t at, const void* bytes, size_t len) {
  if (buf->size() < at + len) buf->resize(at + len);
  std::memcpy(buf->data() + at, bytes, len);
}
void PutLE32(std::vector<uint8_t>* buf, size_t at, uint32_t v) {
  const uint8_t b[4] = {uint8_t(v), uint8_t(v >> 8), uint8_t(v >> 16), uint8_t(v >> 24)};
  Put(buf, at, b, 4);
}
void PutBE32(std::vector<uint8_t>* buf, size_t at, uint32_t v) {
  const uint8_t b[4] = {uint8_t(v >> 24), uint8_t(v >> 16), uint8_t(v >> 8), uint8_t(v)};
  Put(buf, at, b, 4);
}

// Headers as QEMU's probes want them, for formats qemu-img cannot create.
std::vector<uint8_t> BochsImage() {  // block/bochs.c: growing redolog v2, one extent
  std::vector<uint8_t> b(1024, 0);
  Put(&b, 0, "Bochs Virtual HD Image", 23);
  Put(&b, 32, "Redolog", 8);
  Put(&b, 48, "Growing", 8);
  PutLE32(&b, 64, 0x00020000);   // version
  PutLE32(&b, 68, 512);          // header size
  PutLE32(&b, 72, 1);            // catalog entries
  PutLE32(&b, 76, 1);            // bitmap size
  PutLE32(&b, 80, 4096);         // extent size
  PutLE32(&b, 96, 4096);         // disk size (low half)
  PutLE32(&b, 512, 0xffffffff);  // the one extent: unallocated
  return b;
}

std::vector<uint8_t> CloopImage() {  // block/cloop.c: the V2.0 script, one 512-byte block
  static const char kMagic[] = "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
  std::vector<uint8_t> b(128, 0);
  Put(&b, 0, kMagic, sizeof(kMagic) - 1);
  PutBE32(&b, 128, 512);  // block size
  PutBE32(&b, 132, 1);    // blocks
  for (size_t at : {136, 144}) {
    PutBE32(&b, at, 0);
    PutBE32(&b, at + 4, 152);  // offsets: an empty block at the end
  }
  return b;
}

std::vector<uint8_t> LuksHeader() {  // crypto/block-luks.c: magic and version 1 is what the probe reads
  std::vector<uint8_t> b(4096, 0);
  Put(&b, 0, "LUKS\xba\xbe\x00\x01", 8);
  return b;
}

struct Foreign {
  const char* file;
  const char* format;  // qemu's name, in the refusal
  bool qemu_opens;     // qemu-img info names the same format (the oracle)
};

}  // namespace

TEST_CASE("images in formats dmcow does not read are refused, not read as raw", "[foreign_format]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() +
          "' && for f in vmdk vdi vpc vhdx qed parallels; do qemu-img create -q -f $f d.$f 1M;"
          " done && qemu-img create -q -f vmdk -o subformat=monolithicFlat desc.vmdk 1M");
  WriteWholeFile(dir / "d.bochs", BochsImage());
  WriteWholeFile(dir / "d.cloop", CloopImage());
  WriteWholeFile(dir / "d.luks", LuksHeader());
  WriteWholeFile(dir / "d.dmg", std::vector<uint8_t>(4096, 1));  // qemu probes dmg by the name alone
  const Foreign foreign[] = {
      {"d.vmdk", "vmdk", true},
      {"desc.vmdk", "vmdk", true},  // a sparse extent, a text descriptor
      {"d.vdi", "vdi", true},
      {"d.vpc", "vpc", true},
      {"d.vhdx", "vhdx", true},
      {"d.qed", "qed", true},
      {"d.parallels", "parallels", true},
      {"d.bochs", "bochs", true},
      {"d.cloop", "cloop", true},
      {"d.luks", "luks", false},
      {"d.dmg", "dmg", false},  // qemu-img refuses these bare headers itself
  };
  for (const Foreign& f : foreign) {
    const std::string file = f.file;
    if (f.qemu_opens) {  // our probe agrees with qemu-img's
      SplitResult theirs = Exec(dir, "qemu-img", "info --output json " + file);
      INFO(file << ": " << theirs.err);
      CHECK(Contains(theirs.out, std::string("\"format\": \"") + f.format + "\""));
    }
    for (const std::string& command :
         {"info " + file, "info --output json " + file, "map " + file, "checksum " + file, "check " + file,
          "compare " + file + " " + file, "convert -O raw " + file + " out.raw",
          "convert -O qcow2 " + file + " out.raw"}) {
      SplitResult r = Ours(dir, command);
      INFO("dmcow-img " << command << "\nstdout: " << r.out << "\nstderr: " << r.err);
      CHECK(r.rc == (command.rfind("compare", 0) == 0 ? 2 : 1));
      CHECK(r.out.empty());
      CHECK(r.err ==
            "dmcow-img: Could not open '" + file + "': " + file + ": unsupported image format '" + f.format + "'\n");
      CHECK(::access((dir / "out.raw").c_str(), F_OK) != 0);
    }
    // -f raw: the container's bytes, as the user asked (and as qemu-img
    // reads them: a partial last sector reads as zeros to its end).
    MustRun("cd '" + dir.path() + "' && qemu-img convert -f raw -O raw " + file + " theirs.raw");
    SplitResult sum = Ours(dir, "checksum -f raw " + file);
    CHECK(sum.rc == 0);
    CHECK(sum.out.substr(0, 64) == BlockDigestOfFile(dir / "theirs.raw"));
    CHECK(Ours(dir, "convert -f raw -O raw " + file + " out.raw").rc == 0);
    CHECK(ReadWholeFile(dir / "out.raw") == ReadWholeFile(dir / "theirs.raw"));
    ::unlink((dir / "out.raw").c_str());
    CHECK(Ours(dir, "info -f raw " + file).rc == 0);
  }
  // A backing file is probed too (no -F): a vmdk under a qcow2 is refused.
  // qemu-img 7.2 wants -F to name a backing file: its backing-format
  // extension is then renamed to an unknown type, which readers ignore.
  MustRun("cd '" + dir.path() + "' && qemu-img create -q -f qcow2 -u -b d.vmdk -F raw over.qcow2 1M");
  std::vector<uint8_t> over = ReadWholeFile(dir / "over.qcow2");
  const uint8_t kBackingFormatExt[] = {0xe2, 0x79, 0x2a, 0xca};
  auto ext = std::search(over.begin(), over.begin() + 4096, std::begin(kBackingFormatExt), std::end(kBackingFormatExt));
  REQUIRE(ext != over.begin() + 4096);
  *ext = 0x12;
  WriteWholeFile(dir / "over.qcow2", over);
  REQUIRE(Exec(dir, "qemu-img", "info over.qcow2").out.find("backing file format") == std::string::npos);
  SplitResult r = Ours(dir, "convert -O raw over.qcow2 out.raw");
  INFO(r.err);
  CHECK(r.rc == 1);
  CHECK(Contains(r.err, "d.vmdk: unsupported image format 'vmdk'"));
  CHECK(::access((dir / "out.raw").c_str(), F_OK) != 0);
  // What is raw stays raw: text that is not a vmdk descriptor, a short file, an empty one.
  WriteWholeFile(dir / "text.img", std::vector<uint8_t>{'\n', 'v', 'e', 'r', 's', 'i', 'o', 'n', '=', '1', '\n'});
  WriteWholeFile(dir / "short.img", std::vector<uint8_t>{'K', 'D', 'M'});
  WriteWholeFile(dir / "empty.img", {});
  for (const char* file : {"text.img", "short.img", "empty.img"}) {
    SplitResult ours = Ours(dir, std::string("info --output json ") + file);
    SplitResult theirs = Exec(dir, "qemu-img", std::string("info --output json ") + file);
    INFO(file << ": " << ours.err);
    CHECK(ours.rc == 0);
    CHECK(Contains(ours.out, "\"format\": \"raw\""));
    CHECK(Contains(theirs.out, "\"format\": \"raw\""));
  }
}

// A LUKS container made by qemu-img itself (its key derivation takes seconds,
// so not in CI): run with "[slow]".
TEST_CASE("a LUKS image qemu-img made is refused", "[.][slow][foreign_format]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() +
          "' && qemu-img create -q -f luks --object secret,id=s0,data=pw"
          " -o key-secret=s0,iter-time=10 d.luks 1M");
  SplitResult r = Ours(dir, "convert -O raw d.luks out.raw");
  CHECK(r.rc == 1);
  CHECK(r.err == "dmcow-img: Could not open 'd.luks': d.luks: unsupported image format 'luks'\n");
  CHECK(::access((dir / "out.raw").c_str(), F_OK) != 0);
}
