// Every golden image in fixtures/ (made by the real qemu-img and qemu-io, see
// fixtures/regenerate.sh) read through the engine and compared with what
// qemu-img recorded in fixtures/manifest.json: content hash, snapshot
// hashes, info fields and block status. Needs no QEMU at test time.
#include <algorithm>
#include <catch2/catch.hpp>
#include <fstream>
#include <nlohmann/json.hpp>

#include "dmcow/image.h"
#include "test_util.h"

using namespace dmcow;
using namespace dmcow_test;
using nlohmann::json;

namespace {

json LoadManifest() {
  std::ifstream in(SourceDir() + "/fixtures/manifest.json");
  REQUIRE(in.good());
  json manifest = json::parse(in, nullptr, /*allow_exceptions=*/false);
  REQUIRE(manifest.is_array());
  REQUIRE(manifest.size() > 0);
  return manifest;
}

std::unique_ptr<Image> MustOpen(const std::string& path, const std::string& format, const std::string& snapshot = "") {
  OpenOptions options;
  options.format = format;
  options.snapshot = snapshot;
  std::unique_ptr<Image> image;
  Status s = OpenImage(path, options, &image);
  INFO(path << ": " << s.ToString());
  REQUIRE(s.ok());
  return image;
}

// qemu-img's format-specific fields that describe the image itself.
void CheckInfo(const ImageInfo& ours, const json& qemu) {
  CHECK(ours.virtual_size == qemu.value("virtual-size", uint64_t{0}));
  CHECK(ours.format == qemu.value("format", std::string()));
  if (qemu.contains("cluster-size")) CHECK(ours.cluster_size == qemu["cluster-size"].get<uint64_t>());
  CHECK(ours.dirty == qemu.value("dirty-flag", false));
  CHECK(ours.backing_filename == qemu.value("backing-filename", std::string()));
  CHECK(ours.backing_format == qemu.value("backing-filename-format", ours.backing_format));
  size_t qemu_snapshots = qemu.contains("snapshots") ? qemu["snapshots"].size() : 0;
  REQUIRE(ours.snapshots.size() == qemu_snapshots);
  for (size_t i = 0; i < qemu_snapshots; i++) {
    CHECK(ours.snapshots[i].name == qemu["snapshots"][i]["name"].get<std::string>());
    CHECK(ours.snapshots[i].id == qemu["snapshots"][i]["id"].get<std::string>());
    CHECK(ours.snapshots[i].vm_state_size == qemu["snapshots"][i]["vm-state-size"].get<uint64_t>());
  }
  if (ours.format != "qcow2") return;
  const json& data = qemu["format-specific"]["data"];
  CHECK(ours.compression_type == data.value("compression-type", std::string("zlib")));
  CHECK((ours.version == 2 ? "0.10" : "1.1") == data["compat"].get<std::string>());
  CHECK(ours.refcount_bits == data["refcount-bits"].get<uint32_t>());
  CHECK(ours.corrupt == data.value("corrupt", false));
  CHECK(ours.lazy_refcounts == data.value("lazy-refcounts", false));
  CHECK(ours.extended_l2 == data.value("extended-l2", false));
  CHECK(ours.data_file == data.value("data-file", std::string()));
  CHECK(ours.data_file_raw == data.value("data-file-raw", false));
  size_t qemu_bitmaps = data.contains("bitmaps") ? data["bitmaps"].size() : 0;
  REQUIRE(ours.bitmaps.size() == qemu_bitmaps);
  for (size_t i = 0; i < qemu_bitmaps; i++) {
    CHECK(ours.bitmaps[i].name == data["bitmaps"][i]["name"].get<std::string>());
    CHECK(ours.bitmaps[i].granularity == data["bitmaps"][i]["granularity"].get<uint32_t>());
  }
}

Image* LayerAt(Image* top, int depth) {
  Image* layer = top;
  for (int i = 0; i < depth && layer->backing(); i++) layer = layer->backing();
  return layer;
}

// Each range qemu-img map reported must be described the same way by our
// block status (we may split it differently, never disagree).
void CheckMap(Image* image, const json& qemu_map) {
  for (const json& q : qemu_map) {
    const uint64_t start = q["start"], length = q["length"];
    for (uint64_t off = start; off < start + length;) {
      MapExtent e;
      REQUIRE(GetMapExtent(image, off, start + length - off, &e).ok());
      INFO("guest offset " << off << ", qemu entry " << q.dump());
      CHECK(e.depth == q["depth"].get<int>());
      CHECK(e.present == q["present"].get<bool>());
      const bool raw = LayerAt(image, e.depth)->info().format == "raw";
      if (e.zero && q["data"].get<bool>() && !q["zero"].get<bool>() && (raw || e.data)) {
        // A file's holes depend on how it was copied (a git checkout on ext4
        // has none; some file systems make them): zero is right for a raw
        // range, or for qcow2 data that is a hole in this copy (QEMU's
        // metadata-preallocation rule, which qemu-img applies to the same
        // copy), exactly when it reads as zeros.
        if (!raw) CHECK(e.data);
        std::vector<uint8_t> bytes(e.length);
        REQUIRE(image->Read(off, bytes.data(), bytes.size()).ok());
        CHECK(std::all_of(bytes.begin(), bytes.end(), [](uint8_t b) { return b == 0; }));
      } else {
        CHECK(e.zero == q["zero"].get<bool>());
        CHECK(e.data == q["data"].get<bool>());
      }
      CHECK(e.has_offset == q.contains("offset"));
      if (e.has_offset && q.contains("offset")) CHECK(e.offset == q["offset"].get<uint64_t>() + (off - start));
      off += e.length;
    }
  }
}

}  // namespace

TEST_CASE("golden fixtures read as qemu-img recorded", "[fixtures]") {
  const json manifest = LoadManifest();
  for (const json& entry : manifest) {
    const std::string name = entry["name"];
    const std::string path = SourceDir() + "/fixtures/" + entry["path"].get<std::string>();
    const std::string format = entry.value("open_format", entry.value("format", std::string()));
    DYNAMIC_SECTION(name) {
      if (entry.value("expect", std::string("ok")) == "refuse") {
        // The encrypted fixtures (secret "abc", 4 KiB of 0xee written at
        // 0, see made_by): refused without the key, read with it.
        OpenOptions options;
        options.format = format;
        std::unique_ptr<Image> image;
        Status s = OpenImage(path, options, &image);
        INFO(s.ToString());
        CHECK(s.code() == Status::Code::kInvalidArgument);
        CHECK(s.message() == path + ": Parameter 'encrypt.key-secret' is required for cipher");
        const std::string secret = "abc";
        options.layer_secrets = {&secret};
        REQUIRE(OpenImage(path, options, &image).ok());
        std::vector<uint8_t> content(image->virtual_size()), expected(image->virtual_size(), 0);
        std::fill(expected.begin(), expected.begin() + 4096, 0xee);
        REQUIRE(image->Read(0, content.data(), content.size()).ok());
        CHECK((content == expected));
        continue;
      }
      std::unique_ptr<Image> image = MustOpen(path, format);
      CHECK(image->virtual_size() == entry["virtual_size"].get<uint64_t>());
      std::string hex;
      REQUIRE(ComputeContentSha256(image.get(), &hex).ok());
      CHECK(hex == entry["sha256"].get<std::string>());
      if (entry.contains("info")) CheckInfo(image->info(), entry["info"]);
      if (entry.contains("map")) CheckMap(image.get(), entry["map"]);
      for (const json& snap : entry.value("snapshots", json::array())) {
        std::unique_ptr<Image> view = MustOpen(path, format, snap["name"].get<std::string>());
        REQUIRE(ComputeContentSha256(view.get(), &hex).ok());
        INFO("snapshot " << snap["name"]);
        CHECK(hex == snap["sha256"].get<std::string>());
      }
    }
  }
}
