// Encrypted images (issue 19), with the real qemu-img on both sides: LUKS
// in qcow2 (the default aes-256-xts-plain64 and other cipher settings,
// compat 0.10 and 1.1) and legacy AES (qcow2 and qcow v1). Images qemu-img
// made and wrote read identically through dmcow-img; images dmcow-img
// made, converted into and wrote are read identically by qemu-img and are
// clean under qemu-img check; wrong and missing keys are refused with
// qemu-img's words, nothing written; hostile LUKS headers are refused.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <map>
#include <string>
#include <vector>

#include "crash_env.h"
#include "dmcow/device_image.h"
#include "dmcow/image.h"
#include "test_util.h"

using namespace dmcow_test;

namespace {

const std::string kSecret = "--object secret,id=s0,data=pw --object secret,id=s1,data=other ";

// qemu-img's key derivation times itself and sometimes fails for it
// ("Unable to get accurate CPU usage": the thread's CPU clock did not move
// over its first batch of iterations): such runs are retried. A loaded
// 2-core machine has failed five in a row; a failed try costs milliseconds.
constexpr int kQemuKeyTimingTries = 20;

void QemuMake(const TempDir& dir, const std::string& command) {
  for (int attempt = 1;; attempt++) {
    SplitResult r = Exec(dir, "qemu-img", command);
    if (r.rc == 0) return;
    INFO("qemu-img " << command << "\n" << r.err);
    REQUIRE(r.err.find("Unable to get accurate CPU usage") != std::string::npos);
    REQUIRE(attempt < kQemuKeyTimingTries);
  }
}

// A 1 MiB image qemu-img made with `options`, as `name` in `dir`: each
// kind is made once per run and copied (qemu-img spends some 2 s timing
// its key derivation for each LUKS image it makes).
void QemuImage(const TempDir& dir, const std::string& format, const std::string& options, const std::string& name) {
  static TempDir cache;
  static std::map<std::string, std::string> made;
  const std::string key = format + " " + options;
  auto it = made.find(key);
  if (it == made.end()) {
    const std::string file = "img" + std::to_string(made.size()) + "." + format;
    QemuMake(cache, "create -q -f " + format + " " + kSecret + "-o " + options + " " + file + " 1M");
    it = made.emplace(key, cache / file).first;
  }
  MustRun("cp '" + it->second + "' '" + dir / name + "'");
}

// The same for a LUKS image under secret s1 whose backing file is `backing`.
void QemuOverlay(const TempDir& dir, const std::string& backing, const std::string& name) {
  QemuImage(dir, "qcow2", "encrypt.format=luks,encrypt.key-secret=s1,encrypt.iter-time=10", name);
  MustRun("cd '" + dir.path() + "' && qemu-img rebase -u -b " + backing + " -F qcow2 " + kSecret +
          "--image-opts driver=qcow2,file.filename=" + name + ",encrypt.key-secret=s1");
}

std::string Opts(const std::string& driver, const std::string& file, const std::string& secret = "s0") {
  return "driver=" + driver + ",file.filename=" + file + ",encrypt.key-secret=" + secret;
}

struct Setting {
  const char* name;
  const char* format;  // qcow2 or qcow
  const char* options;
};

const Setting kSettings[] = {
    {"luks-default", "qcow2", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"},
    {"luks-aes128-cbc-essiv-sha1", "qcow2",
     "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,"
     "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1"},
    {"luks-aes256-cbc-plain-v2-4k", "qcow2",
     "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,encrypt.cipher-mode=cbc,"
     "encrypt.ivgen-alg=plain,compat=0.10,cluster_size=4096"},
    {"luks-aes128-ctr-sha512", "qcow2",
     "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,"
     "encrypt.cipher-mode=ctr,encrypt.hash-alg=sha512"},
    {"aes-v3", "qcow2", "encrypt.format=aes,encrypt.key-secret=s0"},
    {"aes-v2", "qcow2", "encryption=on,encrypt.key-secret=s0,compat=0.10"},
    {"aes-qcow1", "qcow", "encrypt.format=aes,encrypt.key-secret=s0"},
};

// Writes of every alignment: whole clusters, part of a sector, across
// clusters, an unaligned tail.
const char* const kWrites[] = {"write -P 0x5a 0 64k", "write -P 0x33 70000 1000", "write -P 0x77 130559 3",
                               "write -P 0x11 200000 140000", "write -z 300k 8k"};

std::string QemuIo(const std::string& driver, const std::string& file) {
  std::string c = "qemu-io " + kSecret + "--image-opts " + Opts(driver, file);
  for (const char* w : kWrites) c += std::string(" -c '") + w + "'";
  return c + " >/dev/null";
}

void CheckClean(const TempDir& dir, const std::string& driver, const std::string& file,
                const std::string& secret = "s0") {
  if (driver != "qcow2") return;  // qemu-img checks qcow2 only
  SplitResult check =
      Exec(dir, "qemu-img",
           "check " + kSecret + "--object secret,id=s2,data=third --image-opts " + Opts(driver, file, secret));
  INFO(check.out << check.err);
  CHECK(check.rc == 0);
  CHECK(check.out.find("No errors were found on the image.") != std::string::npos);
}

}  // namespace

TEST_CASE("images qemu-img encrypted and wrote read identically through dmcow-img", "[encryption][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const Setting* setting : Sampled(kSettings)) {
    const Setting& s = *setting;
    DYNAMIC_SECTION(s.name) {
      const std::string img = std::string(s.name) + "." + s.format;
      QemuImage(dir, s.format, s.options, img);
      MustRun("cd '" + dir.path() + "' && " + QemuIo(s.format, img));
      const std::string opts = "--image-opts " + Opts(s.format, img);
      // Whole content, through convert, compare with the raw copy, checksum.
      MustRun("cd '" + dir.path() + "' && qemu-img convert " + kSecret + opts + " -O raw theirs.raw");
      SplitResult conv = Ours(dir, "convert " + kSecret + opts + " -O raw ours.raw");
      INFO(conv.err);
      REQUIRE(conv.rc == 0);
      CHECK(Sha256OfFile(dir / "ours.raw") == Sha256OfFile(dir / "theirs.raw"));
      SplitResult cmp = Ours(dir, "compare " + kSecret + opts + " driver=raw,file.filename=theirs.raw");
      CHECK(cmp.rc == 0);
      SplitResult sum = Ours(dir, "checksum " + kSecret + opts);
      SplitResult raw_sum = Ours(dir, "checksum theirs.raw");
      CHECK(sum.out.substr(0, 64) == raw_sum.out.substr(0, 64));
      // info (no key needed) and map, human and JSON, as qemu-img prints them.
      for (const std::string& args : {"info " + img, "info --output json " + img, "map --output json " + kSecret + opts,
                                      "map " + kSecret + opts}) {
        CheckSameAsQemu(Exec(dir, "qemu-img", args), Ours(dir, args));
      }
    }
  }
}

TEST_CASE("images dmcow-img encrypts are read and checked clean by qemu-img", "[encryption][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() + "' && head -c 700000 /dev/urandom > src.raw && truncate -s 1M src.raw");
  for (const Setting* setting : Sampled(kSettings)) {
    const Setting& s = *setting;
    DYNAMIC_SECTION(s.name) {
      const std::string img = std::string(s.name) + "." + s.format;
      // create, then qemu-io writes into what we made.
      SplitResult made =
          Ours(dir, "create -q -f " + std::string(s.format) + " " + kSecret + "-o " + s.options + " " + img + " 1M");
      INFO(made.err);
      REQUIRE(made.rc == 0);
      CheckClean(dir, s.format, img);
      MustRun("cd '" + dir.path() + "' && " + QemuIo(s.format, img));
      CheckClean(dir, s.format, img);
      // convert into a new encrypted image (all data paths of a fresh target).
      const std::string conv = std::string("conv-") + img;
      SplitResult c = Ours(dir, "convert " + kSecret + "-O " + s.format + " -o " + s.options + " src.raw " + conv);
      INFO(c.err);
      REQUIRE(c.rc == 0);
      SplitResult same =
          Exec(dir, "qemu-img",
               "compare " + kSecret + "--image-opts " + Opts(s.format, conv) + " driver=raw,file.filename=src.raw");
      INFO(same.out << same.err);
      CHECK(same.rc == 0);
      CheckClean(dir, s.format, conv);
      // convert -n into the image qemu-io wrote (clusters written in place).
      SplitResult n = Ours(dir, "convert -n " + kSecret + "--target-image-opts src.raw " + Opts(s.format, img));
      INFO(n.err);
      REQUIRE(n.rc == 0);
      same = Exec(dir, "qemu-img",
                  "compare " + kSecret + "--image-opts " + Opts(s.format, img) + " driver=raw,file.filename=src.raw");
      CHECK(same.rc == 0);
      CheckClean(dir, s.format, img);
    }
  }
}

TEST_CASE("writes of any alignment through the engine land as qemu-io reads them", "[encryption][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const Setting& s : {kSettings[0], kSettings[1], kSettings[6]}) {
    DYNAMIC_SECTION(s.name) {
      const std::string img = dir / (std::string(s.name) + "." + s.format);
      QemuImage(dir, s.format, s.options, std::string(s.name) + "." + s.format);
      MustRun("cd '" + dir.path() + "' && qemu-io " + kSecret + "--image-opts " + Opts(s.format, img) +
              " -c 'write -P 0x44 0 256k' >/dev/null");
      const std::string secret = "pw";
      dmcow::OpenOptions options;
      options.writable = true;
      options.layer_secrets = {&secret};
      std::unique_ptr<dmcow::Image> image;
      REQUIRE(dmcow::OpenImage(img, options, &image).ok());
      // In place (allocated clusters) and into new clusters, sector parts.
      const std::vector<std::pair<uint64_t, size_t>> writes = {
          {100, 7}, {511, 2}, {4096, 512}, {65530, 20}, {300001, 5000}, {524288, 65536}, {1048576 - 3, 3}};
      for (const auto& [at, len] : writes) {
        std::vector<uint8_t> data(len, 0xa7);
        REQUIRE(image->Write(at, data.data(), data.size()).ok());
      }
      REQUIRE(image->Flush().ok());
      image.reset();
      std::string reads = "qemu-io " + kSecret + "--image-opts " + Opts(s.format, img);
      for (const auto& [at, len] : writes) {
        reads += " -c 'read -P 0xa7 " + std::to_string(at) + " " + std::to_string(len) + "'";
      }
      reads += " -c 'read -P 0x44 0 100' -c 'read -P 0x44 107 404' -c 'read -P 0x44 70000 100000'";
      Result r = Exec(dir.path(), reads);
      INFO(r.out);
      CHECK(r.rc == 0);
      CHECK(r.out.find("Pattern verification failed") == std::string::npos);
      CheckClean(dir, s.format, img);
    }
  }
}

// dmcow-qcow attach of a LUKS image: the kernel's dm-crypt reads and writes
// its clusters, the engine fills new ones itself (the serving calls of
// DeviceImage) with the same key and IVs, and hands dm-crypt the cipher in
// dm-crypt's words. Filling (the content of a written cluster, and zeros)
// leaves the guest content as qemu-img reads it; legacy AES is not served.
TEST_CASE("LUKS images are served: filled clusters encrypted as qemu reads them, dm-crypt's cipher named",
          "[encryption][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  const std::map<std::string, std::pair<std::string, size_t>> kernel_cipher = {
      {"luks-default", {"aes-xts-plain64", 64}},
      {"luks-aes128-cbc-essiv-sha1", {"aes-cbc-essiv:sha256", 16}},
      {"luks-aes256-cbc-plain-v2-4k", {"aes-cbc-plain", 32}},
      {"luks-aes128-ctr-sha512", {"aes-ctr-plain64", 16}}};
  for (const Setting& s : kSettings) {
    DYNAMIC_SECTION(s.name) {
      const std::string img = std::string(s.name) + "." + s.format;
      QemuImage(dir, s.format, s.options, img);
      MustRun("cd '" + dir.path() + "' && " + QemuIo(s.format, img));
      const std::string opts = kSecret + "--image-opts " + Opts(s.format, img);
      MustRun("cd '" + dir.path() + "' && qemu-img convert " + opts + " -O raw before.raw");
      const std::string secret = "pw";
      dmcow::OpenOptions options;
      options.writable = true;
      options.layer_secrets = {&secret};
      std::unique_ptr<dmcow::Image> image;
      REQUIRE(dmcow::OpenImage(dir / img, options, &image).ok());
      dmcow::DeviceImage* device = image->AsDeviceImage();
      auto expected = kernel_cipher.find(s.name);
      if (expected == kernel_cipher.end()) {  // legacy AES: the IV is the guest sector
        CHECK(device == nullptr);
        continue;
      }
      REQUIRE(device != nullptr);
      std::string cipher;
      size_t key_len = 0;
      REQUIRE(device
                  ->WithKernelCipher([&](const std::string& c, const uint8_t*, size_t len) {
                    cipher = c;
                    key_len = len;
                    return dmcow::Status::OK();
                  })
                  .ok());
      CHECK(cipher == expected->second.first);
      CHECK(key_len == expected->second.second);
      // A cluster with data (written in parts: 70000+1000, 130559+3) and an
      // unwritten one (zeros) moved to new clusters, as attach moves them.
      const uint64_t cs = image->info().cluster_size;
      for (const uint64_t guest : {uint64_t{70000}, uint64_t{700000}}) {
        uint64_t host = 0;
        REQUIRE(device->ReserveClusters(1, &host).ok());
        REQUIRE(device->FillClusters(guest / cs, 1, host).ok());
        REQUIRE(device->LinkClusters(guest / cs, 1, host).ok());
      }
      REQUIRE(image->Flush().ok());
      image.reset();
      MustRun("cd '" + dir.path() + "' && qemu-img compare -q " + opts + " driver=raw,file.filename=before.raw");
      CheckClean(dir, s.format, img);
    }
  }
}

TEST_CASE("chains of encrypted and plain layers read as qemu-img reads them", "[encryption][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  QemuImage(dir, "qcow2", kSettings[0].options, "base.qcow2");
  MustRun("cd '" + dir.path() + "' && qemu-io " + kSecret + "--image-opts " + Opts("qcow2", "base.qcow2") +
          " -c 'write -P 1 0 1M' >/dev/null"
          " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2"
          " && qemu-io -c 'write -P 2 64k 64k' --image-opts driver=qcow2,file.filename=mid.qcow2,"
          "backing.encrypt.key-secret=s0 " +
          kSecret + " >/dev/null");
  // The top is encrypted with another passphrase.
  QemuOverlay(dir, "mid.qcow2", "top.qcow2");
  MustRun("cd '" + dir.path() + "' && qemu-io " + kSecret +
          "--image-opts driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=s1,"
          "backing.backing.encrypt.key-secret=s0 -c 'write -P 3 100k 10k' >/dev/null");
  const std::string chain =
      "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=s1,backing.backing.encrypt.key-secret=s0";
  MustRun("cd '" + dir.path() + "' && qemu-img convert " + kSecret + "--image-opts " + chain + " -O raw theirs.raw");
  SplitResult ours = Ours(dir, "convert " + kSecret + "--image-opts " + chain + " -O raw ours.raw");
  INFO(ours.err);
  REQUIRE(ours.rc == 0);
  CHECK(Sha256OfFile(dir / "ours.raw") == Sha256OfFile(dir / "theirs.raw"));
  // Without the base's key, both refuse the same way.
  const std::string partial = "convert " + kSecret + "--image-opts driver=qcow2,file.filename=top.qcow2," +
                              "encrypt.key-secret=s1 -O raw x.raw";
  CheckSameAsQemu(Exec(dir, "qemu-img", partial), Ours(dir, partial));
}

// What the daemon and the CLI learn from a key refusal comes from the
// status, not from its wording: which layer, missing or wrong, and QEMU's
// words with one prefix per layer above, whatever the files are called.
TEST_CASE("a key refusal names its layer, missing or wrong, through the chain", "[encryption][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  // The base's name looks like the end of a refusal itself.
  const std::string base = "b: Invalid password, cannot unlock any keyslot";
  QemuImage(dir, "qcow2", kSettings[0].options, "base.qcow2");
  // Named by its absolute path: QEMU would take "b:" for a protocol.
  MustRun("cd '" + dir.path() + "' && mv base.qcow2 '" + base + "' && qemu-img create -q -f qcow2 -b '" + dir / base +
          "' -F qcow2 mid.qcow2 && qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2");
  const std::string pw = "pw", wrong = "nope";
  auto open = [&](const std::string* base_key) {
    dmcow::OpenOptions o;
    o.layer_secrets = {nullptr, nullptr, base_key};
    std::unique_ptr<dmcow::Image> image;
    return dmcow::OpenImage(dir / "top.qcow2", o, &image);
  };
  const std::string prefix = "Could not open backing file: Could not open backing file: ";
  const dmcow::Status missing = open(nullptr);
  CHECK(missing.key_refusal() == dmcow::Status::KeyRefusal::kMissing);
  CHECK(missing.code() == dmcow::Status::Code::kInvalidArgument);
  CHECK(missing.message() == prefix + dir / base + ": Parameter 'encrypt.key-secret' is required for cipher");
  CHECK(dmcow::LayerMissingKey(missing) == dir / base);
  CHECK(missing.WithoutRefusedLayer() == prefix + "Parameter 'encrypt.key-secret' is required for cipher");
  const dmcow::Status refused = open(&wrong);
  CHECK(refused.key_refusal() == dmcow::Status::KeyRefusal::kWrong);
  CHECK(refused.message() == prefix + dir / base + ": Invalid password, cannot unlock any keyslot");
  CHECK(dmcow::LayerMissingKey(refused).empty());
  CHECK(refused.WithoutRefusedLayer() == prefix + "Invalid password, cannot unlock any keyslot");
  CHECK(open(&pw).ok());
  // The CLI words both as qemu-img does, the file's odd name left out.
  for (const char* key : {"", ",backing.backing.encrypt.key-secret=w"}) {
    const std::string c = "convert --object secret,id=w,data=nope --image-opts driver=qcow2,file.filename=top.qcow2" +
                          std::string(key) + " -O raw x.raw";
    CheckSameAsQemu(Exec(dir, "qemu-img", c), Ours(dir, c));
  }
  // The refused image itself: no prefix. Context added after the words
  // makes it no key refusal.
  {
    dmcow::OpenOptions o;
    std::unique_ptr<dmcow::Image> image;
    const dmcow::Status top = dmcow::OpenImage(dir / base, o, &image);
    CHECK(top.key_refusal() == dmcow::Status::KeyRefusal::kMissing);
    CHECK(top.WithoutRefusedLayer() == "Parameter 'encrypt.key-secret' is required for cipher");
    CHECK(top.WithMessage("Could not open backing file: " + top.message()).key_refusal() ==
          dmcow::Status::KeyRefusal::kMissing);
    CHECK(top.WithMessage(top.message() + " (and more)").key_refusal() == dmcow::Status::KeyRefusal::kNone);
  }
  // Anything else is no key refusal, whatever its words.
  const dmcow::Status lookalike = dmcow::Status::InvalidArgument(dir / base);
  CHECK(lookalike.key_refusal() == dmcow::Status::KeyRefusal::kNone);
  CHECK(dmcow::LayerMissingKey(lookalike).empty());
  CHECK(lookalike.WithoutRefusedLayer() == lookalike.message());
}

TEST_CASE("wrong and missing keys are refused as qemu-img refuses them, nothing written", "[encryption][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  QemuImage(dir, "qcow2", kSettings[0].options, "l.qcow2");
  MustRun("cd '" + dir.path() + "' && qemu-io " + kSecret + "--image-opts " + Opts("qcow2", "l.qcow2") +
          " -c 'write -P 9 0 128k' >/dev/null && cp l.qcow2 before && head -c 1M /dev/urandom > src.raw");
  const std::vector<std::string> commands = {
      "convert -O raw l.qcow2 x.raw",
      "convert " + kSecret + "-O raw --image-opts " + Opts("qcow2", "l.qcow2", "s1") + " x.raw",
      "convert " + kSecret + "-O raw --image-opts " + Opts("qcow2", "l.qcow2", "nosuch") + " x.raw",
      "convert -n " + kSecret + "--target-image-opts src.raw " + Opts("qcow2", "l.qcow2", "s1"),
      "convert -n " + kSecret + "--target-image-opts src.raw driver=qcow2,file.filename=l.qcow2",
      "compare l.qcow2 l.qcow2",
      "map --output json l.qcow2",
      "map " + kSecret + "--image-opts " + Opts("qcow2", "l.qcow2", "s1"),
      "convert " + kSecret + "--image-opts driver=raw,file.filename=src.raw,encrypt.key-secret=s0 -O raw x.raw",
  };
  for (const std::string& c : commands) CheckSameAsQemu(Exec(dir, "qemu-img", c), Ours(dir, c));
  CHECK(Sha256OfFile(dir / "l.qcow2") == Sha256OfFile(dir / "before"));
  // The wrong key never appears in what we print.
  SplitResult r = Ours(
      dir, "convert --object secret,id=k,data=Sekrit -O raw --image-opts " + Opts("qcow2", "l.qcow2", "k") + " x.raw");
  CHECK(r.rc == 1);
  CHECK(r.err.find("Sekrit") == std::string::npos);
}

TEST_CASE("bad encryption options are refused as qemu-img refuses them", "[encryption][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() + "' && head -c 64k /dev/urandom > src.raw");
  const std::vector<std::string> commands = {
      "create -q -f qcow2 -o encrypt.format=luks t.qcow2 1M",
      "create -q -f qcow2 -o encrypt.format=aes t.qcow2 1M",
      "create -q -f qcow2 " + kSecret + "-o encrypt.format=luks,encrypt.key-secret=nosuch t.qcow2 1M",
      "create -q -f qcow2 " + kSecret +
          "-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=foo t.qcow2 1M",
      "create -q -f qcow2 " + kSecret +
          "-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-mode=foo t.qcow2 1M",
      "create -q -f qcow2 " + kSecret + "-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.hash-alg=foo t.qcow2 1M",
      "create -q -f qcow2 " + kSecret + "-o encrypt.format=foo,encrypt.key-secret=s0 t.qcow2 1M",
      "create -q -f qcow2 " + kSecret +
          "-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha1 t.qcow2 1M",
      "create -q -f qcow " + kSecret + "-o encrypt.format=luks,encrypt.key-secret=s0 t.qcow 1M",
      "create -q -f qcow -o encrypt.format=aes t.qcow 1M",
      "convert -c -O qcow2 " + kSecret + "-o encrypt.format=luks,encrypt.key-secret=s0 src.raw t.qcow2",
      "convert -O qcow2 " + kSecret + "-o encrypt.format=luks,encrypt.key-secret=nosuch src.raw t.qcow2",
      "convert " + kSecret + "--target-image-opts src.raw driver=qcow2,file.filename=t.qcow2",
      "convert -n -O qcow2 " + kSecret + "--target-image-opts src.raw driver=qcow2,file.filename=t.qcow2",
      "measure -O qcow2 -o encrypt.format=luks --size 1G",
      "measure -O qcow2 " + kSecret + "-o encrypt.format=luks,encrypt.key-secret=nosuch --size 1G",
      "measure -O qcow2 " + kSecret + "-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=foo --size 1G",
  };
  // Ours leaves no file behind (qemu-img makes the qcow file before it
  // refuses LUKS or a missing key there).
  auto made = [&]() {
    const std::string files = std::to_string(::access((dir / "t.qcow2").c_str(), F_OK) == 0) +
                              std::to_string(::access((dir / "t.qcow").c_str(), F_OK) == 0);
    ::unlink((dir / "t.qcow2").c_str());
    ::unlink((dir / "t.qcow").c_str());
    return files;
  };
  for (const std::string& c : commands) {
    SplitResult theirs = Exec(dir, "qemu-img", c);
    made();
    SplitResult ours = Ours(dir, c);
    CheckSameAsQemu(theirs, ours);
    CHECK(made() == "00");
  }
  // measure with LUKS counts its header in whole clusters, as qemu-img.
  for (const char* o : {"", ",cluster_size=4k,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc"}) {
    const std::string args = "measure -O qcow2 " + kSecret +
                             "-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10" + o + " --size 1G";
    SplitResult theirs;
    for (int i = 0; i < kQemuKeyTimingTries; i++) {
      theirs = Exec(dir, "qemu-img", args);
      if (theirs.err.find("Unable to get accurate CPU usage") == std::string::npos) break;
    }
    CheckSameAsQemu(theirs, Ours(dir, args));
  }
}

TEST_CASE("hostile LUKS headers are refused, quickly, naming what is wrong", "[encryption][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  QemuImage(dir, "qcow2", kSettings[0].options, "good.qcow2");
  const std::vector<uint8_t> good = ReadWholeFile(dir / "good.qcow2");
  // The LUKS header is at the encryption header extension's offset (0x40000 as qemu-img lays it out).
  const uint64_t luks = 0x40000;
  REQUIRE(std::string(good.begin() + luks, good.begin() + luks + 4) == "LUKS");
  auto put32 = [](std::vector<uint8_t>& b, uint64_t at, uint32_t v) {
    for (int i = 0; i < 4; i++) b[at + i] = static_cast<uint8_t>(v >> (24 - 8 * i));
  };
  const struct {
    const char* name;
    uint64_t at;
    uint32_t value;
    const char* message;
  } kCases[] = {
      {"magic", luks, 0, "no LUKS magic"},
      {"version", luks + 4, 0xbabe0002, "LUKS version 2 is not supported"},
      {"key-bytes", luks + 108, 1000, "master key length 1000"},
      {"mk-iterations", luks + 164, 0xffffffff, "master key digest iterations"},
      {"slot-state", luks + 208, 0x12345678, "key slot 0 has state"},
      {"slot-iterations", luks + 208 + 4, 0xffffffff, "key slot 0 iterations"},
      {"slot-offset", luks + 208 + 40, 0x7fffffff, "outside the encryption header region"},
      {"slot-in-header", luks + 208 + 40, 0, "overlaps the LUKS header"},
      {"slot-overlap", luks + 208 + 48 + 40, 9, "overlaps key slot 0"},
      {"stripes", luks + 208 + 44, 0xffffffff, "stripes"},
      {"cipher-name", luks + 8, 0x74776f66 /* "twof" */, "LUKS cipher 'twof"},
  };
  for (const auto& c : kCases) {
    DYNAMIC_SECTION(c.name) {
      std::vector<uint8_t> bad = good;
      put32(bad, c.at, c.value);
      WriteWholeFile(dir / "bad.qcow2", bad);
      for (const std::string& args : {std::string("info bad.qcow2"), "convert " + kSecret + "-O raw --image-opts " +
                                                                         Opts("qcow2", "bad.qcow2") + " x.raw"}) {
        SplitResult r = Ours(dir, args);  // under Exec's 10 s timeout: no hang
        INFO(args << "\n" << r.err);
        CHECK(r.rc == 1);
        CHECK(r.err.find(c.message) != std::string::npos);
      }
    }
  }
  // Names not NUL-terminated, and the extension pointing at a region too small.
  std::vector<uint8_t> bad = good;
  std::fill(bad.begin() + luks + 40, bad.begin() + luks + 72, 'x');
  WriteWholeFile(dir / "bad.qcow2", bad);
  SplitResult r = Ours(dir, "info bad.qcow2");
  CHECK(r.rc == 1);
  CHECK(r.err.find("a name field is not NUL-terminated") != std::string::npos);
}

TEST_CASE("amend adds and erases LUKS key slots as qemu-img does", "[encryption][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  const std::string secrets = kSecret + "--object secret,id=s2,data=third ";
  QemuImage(dir, "qcow2", kSettings[0].options, "k.qcow2");
  MustRun("cd '" + dir.path() + "' && qemu-io " + secrets + "--image-opts " + Opts("qcow2", "k.qcow2") +
          " -c 'write -P 8 0 256k' >/dev/null && qemu-img convert " + secrets + "--image-opts " +
          Opts("qcow2", "k.qcow2") + " -O raw content.raw");
  QemuMake(dir, "amend " + secrets + "--image-opts " + Opts("qcow2", "k.qcow2") +
                    " -o encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10");
  MustRun("cd '" + dir.path() + "' && cp k.qcow2 start.qcow2");
  // Every refusal and every change, both tools from the same start: the same
  // streams, exit code and resulting slots (info shows which are active).
  for (const char* o :
       {"encrypt.state=active,encrypt.new-secret=s2,encrypt.iter-time=10",
        "encrypt.state=active,encrypt.new-secret=s2,encrypt.keyslot=6,encrypt.iter-time=10",
        "encrypt.state=active,encrypt.new-secret=s2,encrypt.keyslot=1",
        "encrypt.state=active,encrypt.new-secret=s2,encrypt.keyslot=8", "encrypt.state=active",
        "encrypt.state=active,encrypt.new-secret=s2,encrypt.old-secret=s1",
        "encrypt.state=active,encrypt.new-secret=nosuch", "encrypt.state=inactive,encrypt.keyslot=1",
        "encrypt.state=inactive,encrypt.old-secret=s1", "encrypt.state=inactive,encrypt.old-secret=s2",
        "encrypt.state=inactive,encrypt.keyslot=1,encrypt.old-secret=s2", "encrypt.state=inactive,encrypt.keyslot=3",
        "encrypt.state=inactive,encrypt.keyslot=9", "encrypt.state=inactive",
        "encrypt.state=inactive,encrypt.keyslot=1,encrypt.new-secret=s2", "encrypt.state=foo", "encrypt.keyslot=1"}) {
    const std::string args = "amend " + secrets + "--image-opts " + Opts("qcow2", "k.qcow2") + " -o " + o;
    INFO(args);
    MustRun("cd '" + dir.path() + "' && cp start.qcow2 k.qcow2");
    SplitResult theirs = Exec(dir, "qemu-img", args);
    const std::string theirs_slots = Exec(dir.path(), "qemu-img info k.qcow2 | grep 'active:'").out;
    MustRun("cd '" + dir.path() + "' && cp start.qcow2 k.qcow2");
    SplitResult ours = Ours(dir, args);
    CheckSameAsQemu(theirs, ours);
    CHECK(Exec(dir.path(), "qemu-img info k.qcow2 | grep 'active:'").out == theirs_slots);
  }
  // What the slots open, read by qemu-img: a slot we add opens the image,
  // one we erase no longer does, and the content never changes.
  MustRun("cd '" + dir.path() + "' && cp start.qcow2 k.qcow2");
  REQUIRE(Ours(dir, "amend " + secrets + "--image-opts " + Opts("qcow2", "k.qcow2") +
                        " -o encrypt.state=active,encrypt.new-secret=s2,encrypt.keyslot=5,encrypt.iter-time=10")
              .rc == 0);
  REQUIRE(Ours(dir, "amend " + secrets + "--image-opts " + Opts("qcow2", "k.qcow2", "s2") +
                        " -o encrypt.state=inactive,encrypt.old-secret=s0")
              .rc == 0);
  SplitResult by_s2 = Exec(dir, "qemu-img",
                           "compare " + secrets + "--image-opts " + Opts("qcow2", "k.qcow2", "s2") +
                               " driver=raw,file.filename=content.raw");
  CHECK(by_s2.rc == 0);
  SplitResult by_s0 =
      Exec(dir, "qemu-img", "convert " + secrets + "--image-opts " + Opts("qcow2", "k.qcow2") + " -O raw x.raw");
  CHECK(by_s0.rc == 1);
  CHECK(by_s0.err.find("Invalid password, cannot unlock any keyslot") != std::string::npos);
  CheckClean(dir, "qcow2", "k.qcow2", "s2");
}

// QEMU 7.2's downgrade writes host zeros into an encrypted image's zero
// clusters, which then read back as noise; ours writes the cipher's zeros.
TEST_CASE("downgrading an encrypted image keeps its zeroed clusters zero", "[encryption][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  for (const Setting& s : {kSettings[0], kSettings[4]}) {
    DYNAMIC_SECTION(s.name) {
      const std::string img = std::string(s.name) + ".qcow2";
      QemuImage(dir, "qcow2", s.options, img);
      MustRun("cd '" + dir.path() + "' && qemu-io " + kSecret + "--image-opts " + Opts("qcow2", img) +
              " -c 'write -P 5 0 1M' -c 'write -z 0 64k' -c 'write -z 192k 128k' >/dev/null");
      SplitResult r = Ours(dir, "amend " + kSecret + "--image-opts " + Opts("qcow2", img) + " -o compat=0.10");
      INFO(r.err);
      REQUIRE(r.rc == 0);
      Result read = Exec(dir.path(), "qemu-io " + kSecret + "--image-opts " + Opts("qcow2", img) +
                                         " -c 'read -P 0 0 64k' -c 'read -P 5 64k 128k' -c 'read -P 0 192k 128k'"
                                         " -c 'read -P 5 320k 704k'");
      INFO(read.out);
      CHECK(read.out.find("Pattern verification failed") == std::string::npos);
      CHECK(read.rc == 0);
      CheckClean(dir, "qcow2", img);
    }
  }
}

TEST_CASE("commit into an encrypted base, each layer with its own key, as qemu-img", "[encryption][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  QemuImage(dir, "qcow2", kSettings[1].options, "base.qcow2");
  MustRun("cd '" + dir.path() + "' && qemu-io " + kSecret + "--image-opts " + Opts("qcow2", "base.qcow2") +
          " -c 'write -P 1 0 1M' >/dev/null");
  for (const char* tool : {"theirs", "ours"}) {
    const std::string t = tool;
    MustRun("cd '" + dir.path() + "' && cp base.qcow2 base-" + t + ".qcow2");
    QemuOverlay(dir, "base-" + t + ".qcow2", "top-" + t + ".qcow2");
    const std::string chain =
        "driver=qcow2,file.filename=top-" + t + ".qcow2,encrypt.key-secret=s1,backing.encrypt.key-secret=s0";
    MustRun("cd '" + dir.path() + "' && qemu-io " + kSecret + "--image-opts " + chain +
            " -c 'write -P 2 100000 300000' -c 'write -z 512k 64k' >/dev/null");
    SplitResult r = t == "ours" ? Ours(dir, "commit " + kSecret + "--image-opts " + chain)
                                : Exec(dir, "qemu-img", "commit " + kSecret + "--image-opts " + chain);
    INFO(tool << ": " << r.err);
    REQUIRE(r.rc == 0);
    CHECK(r.out == "Image committed.\n");
    CheckClean(dir, "qcow2", "base-" + t + ".qcow2");
  }
  SplitResult same = Exec(dir, "qemu-img",
                          "compare " + kSecret + "--image-opts " + Opts("qcow2", "base-ours.qcow2") + " " +
                              Opts("qcow2", "base-theirs.qcow2"));
  INFO(same.out << same.err);
  CHECK(same.rc == 0);
}

TEST_CASE("resize, snapshot and rebase of an encrypted image, as qemu-img", "[encryption][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MustRun("cd '" + dir.path() +
          "' && qemu-img create -q -f qcow2 new-base.qcow2 1M"
          " && qemu-io -c 'write -P 6 0 1M' new-base.qcow2 >/dev/null && qemu-img create -q -f qcow2 old-base.qcow2 1M"
          " && qemu-io -c 'write -P 7 0 512k' old-base.qcow2 >/dev/null");
  for (const char* tool : {"theirs", "ours"}) {
    const std::string t = tool;
    const std::string img = "img-" + t + ".qcow2";
    QemuOverlay(dir, "old-base.qcow2", img);
    const std::string opts = "--image-opts driver=qcow2,file.filename=" + img + ",encrypt.key-secret=s1";
    MustRun("cd '" + dir.path() + "' && qemu-io " + kSecret + opts + " -c 'write -P 8 100k 200k' >/dev/null");
    auto run = [&](const std::string& args) {
      SplitResult r = t == "ours" ? Ours(dir, args) : Exec(dir, "qemu-img", args);
      INFO(tool << " " << args << "\n" << r.err);
      CHECK(r.rc == 0);
    };
    run("snapshot " + kSecret + "-c first " + opts);
    run("resize " + kSecret + opts + " 2M");
    // Safe rebase: what differs between the backing files is copied into
    // the encrypted image (an absolute name: qemu-img cannot resolve a
    // relative one against an option list).
    run("rebase " + kSecret + "-F qcow2 -b " + dir / "new-base.qcow2" + " " + opts);
    CheckClean(dir, "qcow2", img, "s1");
  }
  const std::string chain = ",encrypt.key-secret=s1";
  SplitResult same = Exec(dir, "qemu-img",
                          "compare " + kSecret + "--image-opts driver=qcow2,file.filename=img-ours.qcow2" + chain +
                              " driver=qcow2,file.filename=img-theirs.qcow2" + chain);
  INFO(same.out << same.err);
  CHECK(same.rc == 0);
  for (const char* t : {"ours", "theirs"}) {
    const std::string list =
        "snapshot -l " + kSecret + "--image-opts driver=qcow2,file.filename=img-" + t + ".qcow2,encrypt.key-secret=s1";
    CHECK(Exec(dir, "qemu-img", list).out.find("first") != std::string::npos);
  }
}

// crypto/luks.cc's ordering, at every crash point: a slot being added is
// active only once its key material is whole on disk; a slot being erased
// is inactive before its material is destroyed. Whatever the disk keeps,
// the slots the header names active open the image, the untouched slot
// still does, and the guest content never changes.
TEST_CASE("a crash while adding or erasing a key slot never leaves a slot that does not open",
          "[encryption][crash][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  const std::string secrets = kSecret + "--object secret,id=s2,data=third ";
  QemuImage(dir, "qcow2", kSettings[0].options, "k.qcow2");
  MustRun("cd '" + dir.path() + "' && qemu-io " + kSecret + "--image-opts " + Opts("qcow2", "k.qcow2") +
          " -c 'write -P 8 0 256k' >/dev/null");
  QemuMake(dir, "amend " + secrets + "--image-opts " + Opts("qcow2", "k.qcow2") +
                    " -o encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10");
  const std::vector<uint8_t> start = ReadWholeFile(dir / "k.qcow2");
  const std::string img = "k.qcow2";
  const std::string pw = "pw", other = "other", third = "third";
  auto open = [&](dmcow::Env* env, const std::string* key, bool writable, std::unique_ptr<dmcow::Image>* image) {
    dmcow::OpenOptions o;
    o.env = env;
    o.writable = writable;
    o.metadata_only = writable;  // as amend opens
    o.allow_missing_keys = key == nullptr;
    if (key != nullptr) o.layer_secrets = {key};
    return dmcow::OpenImage(img, o, image);
  };
  std::vector<uint8_t> content;
  {
    CrashEnv env(UINT64_MAX);
    env.PutFile(img, start);
    std::unique_ptr<dmcow::Image> image;
    REQUIRE(open(&env, &pw, false, &image).ok());
    content.assign(image->virtual_size(), 0);
    REQUIRE(image->Read(0, content.data(), content.size()).ok());
  }
  struct Change {
    const char* name;
    dmcow::KeySlotChange change;
    int slot;                // the slot that changes
    const std::string* key;  // its passphrase
  };
  dmcow::KeySlotChange add, erase;
  add.activate = true;
  add.has_keyslot = true;
  add.keyslot = 2;
  add.new_secret = &third;
  add.iter_time_ms = 10;
  erase.has_keyslot = true;
  erase.keyslot = 1;
  for (const Change& c : {Change{"add slot 2", add, 2, &third}, Change{"erase slot 1", erase, 1, &other}}) {
    DYNAMIC_SECTION(c.name) {
      uint64_t states = 0;
      for (uint64_t k = 1;; k++) {
        CrashEnv env(k);
        env.PutFile(img, start);
        std::unique_ptr<dmcow::Image> image;
        REQUIRE(open(&env, &pw, true, &image).ok());
        const dmcow::Status s = image->ChangeKeySlots(c.change);
        image.reset();
        if (!env.crashed()) {
          REQUIRE(s.ok());
          break;
        }
        for (const CrashEnv::State& state : env.CrashStates(img, k, 4)) {
          INFO(c.name << ": crash after " << k << " writes/syncs, " << state.label << "\n" << env.DescribePending(img));
          CrashEnv view(UINT64_MAX);
          view.PutFile(img, state.bytes);
          std::unique_ptr<dmcow::Image> meta;
          REQUIRE(open(&view, nullptr, false, &meta).ok());
          const bool active = meta->info().encryption.slots[c.slot].active;
          meta.reset();
          std::unique_ptr<dmcow::Image> by_slot;
          const dmcow::Status opened = open(&view, c.key, false, &by_slot);
          CHECK(opened.ok() == active);  // active exactly when it opens
          std::unique_ptr<dmcow::Image> by_pw;
          REQUIRE(open(&view, &pw, false, &by_pw).ok());
          std::vector<uint8_t> now(content.size());
          REQUIRE(by_pw->Read(0, now.data(), now.size()).ok());
          const bool same = now == content;
          CHECK(same);
          states++;
        }
      }
      CHECK(states > 0);
    }
  }
}
