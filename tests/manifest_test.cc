// dmcow-img manifest (issue 20, "Golden images for CI"): what it pins about
// images qemu-img made agrees with qemu-img info and dmcow-img checksum and
// check; --verify passes on the same images and names each change, one line
// per difference; bad manifests and command lines are refused with the
// reason, no crash.
#include <algorithm>
#include <catch2/catch.hpp>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "test_util.h"

using namespace dmcow_test;
using Json = nlohmann::json;

namespace {

// raw base <- qcow2 top (over it), and a zstd-compressed standalone copy.
void MakeGoldenImages(const TempDir& dir) {
  const std::string in = "cd '" + dir.path() + "' && ";
  MustRun(in + "qemu-img create -q -f raw base.raw 4M && qemu-io -f raw -c 'write -P 0x11 0 1M' base.raw >/dev/null");
  MustRun(in + "qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 4M && " +
          "qemu-io -f qcow2 -c 'write -P 0x22 512k 1M' -c 'write -z 3M 64k' top.qcow2 >/dev/null");
  MustRun(in + "qemu-img convert -c -O qcow2 -o compression_type=zstd top.qcow2 z.qcow2");
}

}  // namespace

TEST_CASE("manifest pins what qemu-img says about images, and --verify names each change", "[manifest][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MakeGoldenImages(dir);
  SplitResult made = Ours(dir, "manifest --output json top.qcow2 z.qcow2 base.raw");
  INFO(made.err);
  REQUIRE(made.rc == 0);
  const Json m = Json::parse(made.out);
  REQUIRE(m.size() == 3);
  for (const Json& entry : m) {
    const std::string file = entry["filename"];
    INFO(file);
    const Json info = Json::parse(Exec(dir, "qemu-img", "info --output json " + file).out);
    CHECK(entry["format"] == info["format"]);
    CHECK(entry["virtual-size"] == info["virtual-size"]);
    const std::string sum = Ours(dir, "checksum " + file).out;
    CHECK(entry["blk-sha256"] == sum.substr(0, sum.find(' ')));
    if (file == "base.raw") {
      CHECK(entry["check"] == "not checked");  // qemu-img check does not check raw either
      CHECK(!entry.contains("cluster-size"));
      continue;
    }
    CHECK(entry["cluster-size"] == info["cluster-size"]);
    CHECK(entry["compression-type"] == info["format-specific"]["data"]["compression-type"]);
    CHECK(entry["check"] == "clean");
  }
  CHECK(m[0]["backing-chain"] == Json::parse(R"([{"filename": "base.raw", "format": "raw"}])"));
  CHECK(m[1]["backing-chain"].empty());
  CHECK(m[1]["compression-type"] == "zstd");
  // Human output: one line per image.
  SplitResult human = Ours(dir, "manifest top.qcow2");
  CHECK(human.rc == 0);
  CHECK(human.out.find("top.qcow2: qcow2, 4194304 bytes, clusters of 65536, zlib, over base.raw (raw), check clean, "
                       "blk-sha256 ") == 0);

  std::ofstream(dir / "m.json") << made.out;
  SplitResult same = Ours(dir, "manifest --verify m.json");
  CHECK(same.rc == 0);
  CHECK(same.out == "3 image(s) as the manifest says\n");
  // A change of content: one line, the field and both values.
  MustRun("cd '" + dir.path() + "' && qemu-io -f qcow2 -c 'write -P 0x33 0 4k' z.qcow2 >/dev/null");
  SplitResult changed = Ours(dir, "manifest --verify m.json");
  CHECK(changed.rc == 1);
  CHECK(changed.out.rfind("z.qcow2: blk-sha256: expected \"" + m[1]["blk-sha256"].get<std::string>() + "\", found \"",
                          0) == 0);
  CHECK(std::count(changed.out.begin(), changed.out.end(), '\n') == 1);
  // A new backing file and another size: each named.
  MustRun("cd '" + dir.path() +
          "' && qemu-img rebase -q -u -b z.qcow2 -F qcow2 top.qcow2 && qemu-img resize -q base.raw 8M");
  SplitResult rebased = Ours(dir, "manifest --verify m.json");
  CHECK(rebased.rc == 1);
  CHECK(rebased.out.find("top.qcow2: backing-chain: expected [{\"filename\":\"base.raw\",\"format\":\"raw\"}], found "
                         "[{\"filename\":\"z.qcow2\",\"format\":\"qcow2\"}]") != std::string::npos);
  CHECK(rebased.out.find("base.raw: virtual-size: expected 4194304, found 8388608") != std::string::npos);
  // An image gone: named, the others still checked.
  MustRun("rm " + dir / "z.qcow2");
  SplitResult gone = Ours(dir, "manifest --verify m.json");
  CHECK(gone.rc == 1);
  CHECK(gone.out.find("z.qcow2: ") != std::string::npos);
  CHECK(gone.out.find("No such file") != std::string::npos);
}

TEST_CASE("manifest refuses bad manifests and command lines, naming what is wrong", "[manifest][qemu]") {
  SKIP_WITHOUT_QEMU();
  TempDir dir;
  MakeGoldenImages(dir);
  const struct {
    const char* text;
    const char* want;
  } bad[] = {
      {"not json", "m.json: not JSON"},
      {R"({"filename": "top.qcow2"})", "expected a JSON array of images"},
      {R"([1])", "entry 1: expected an object with a \"filename\""},
      {R"([{"format": "qcow2"}])", "entry 1: expected an object with a \"filename\""},
      {R"([{"filename": ""}])", "entry 1: expected an object with a \"filename\""},
      {R"([{"filename": 7}])", "entry 1: expected an object with a \"filename\""},
      {R"([{"filename": "top.qcow2", "colour": "red"}])", "member \"colour\" is not a manifest field"},
      {R"([{"filename": "top.qcow2", "virtual-size": "4M"}])", "member \"virtual-size\" has the wrong type"},
      {R"([{"filename": "top.qcow2", "virtual-size": -1}])", "member \"virtual-size\" has the wrong type"},
      {R"([{"filename": "top.qcow2", "backing-chain": [{"filename": "a"}]}])",
       "member \"backing-chain\" has the wrong type"},
      {R"([{"filename": "top.qcow2", "backing-chain": "base.raw"}])", "member \"backing-chain\" has the wrong type"},
  };
  for (const auto& b : bad) {
    INFO(b.text);
    std::ofstream(dir / "m.json") << b.text;
    SplitResult r = Ours(dir, "manifest --verify m.json");
    CHECK(r.rc == 1);
    CHECK(r.err.find(b.want) != std::string::npos);
    CHECK(r.out.empty());
  }
  // Too large to be a manifest: refused before it is parsed.
  MustRun("truncate -s 17M " + dir / "huge.json");
  SplitResult huge = Ours(dir, "manifest --verify huge.json");
  CHECK(huge.rc == 1);
  CHECK(huge.err.find("larger than 16777216 bytes") != std::string::npos);
  // Not regular files: refused at once (a FIFO does not hang).
  MustRun("mkfifo " + dir / "fifo.json");
  for (const char* odd : {"fifo.json", "."}) {
    SplitResult r = Ours(dir, std::string("manifest --verify ") + odd);
    CHECK(r.rc == 1);
    CHECK(r.err.find("not a regular file") != std::string::npos);
  }
  SplitResult missing = Ours(dir, "manifest --verify nothere.json");
  CHECK(missing.rc == 1);
  CHECK(missing.err.find("Could not open 'nothere.json'") != std::string::npos);
  // Command lines.
  std::ofstream(dir / "empty.json") << "[]";
  CHECK(Ours(dir, "manifest --verify empty.json").rc == 0);
  SplitResult both = Ours(dir, "manifest --verify empty.json top.qcow2");
  CHECK(both.rc != 0);
  CHECK(both.err.find("--verify takes no FILE") != std::string::npos);
  SplitResult none = Ours(dir, "manifest");
  CHECK(none.rc != 0);
  CHECK(none.err.find("Expecting image file names") != std::string::npos);
  CHECK(Ours(dir, "manifest --output xml top.qcow2").rc != 0);
  // An encrypted image (crypt_method set to AES in the header): refused, named.
  MustRun("qemu-img create -q -f qcow2 " + dir / "enc.qcow2" + " 1M && printf '\\000\\000\\000\\001' | dd of=" +
          dir / "enc.qcow2" + " bs=1 seek=32 conv=notrunc status=none");
  SplitResult enc = Ours(dir, "manifest enc.qcow2");
  CHECK(enc.rc == 1);
  CHECK(enc.err.find("enc.qcow2: Parameter 'encrypt.key-secret' is required for cipher") != std::string::npos);
  SplitResult no_image = Ours(dir, "manifest nothere.qcow2");
  CHECK(no_image.rc == 1);
  CHECK(no_image.err.find("nothere.qcow2") != std::string::npos);
}
