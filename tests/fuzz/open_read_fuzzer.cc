// libFuzzer target: the input is an image file. It is opened with format
// detection (no backing files), its first 16 MiB are read and its block
// status is walked; the first internal snapshot, if any, is opened and read
// too. A small file named fuzz.data lies beside the input, so that images
// naming it as their external data file (make_seeds.sh makes some) open.
// Errors are expected; crashes, sanitizer reports, hangs, large
// allocations and broken Status contracts (an empty or multi-line message)
// are bugs.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "dmcow/image.h"
#include "dmcow/mem_env.h"

namespace {

constexpr uint64_t kMaxReadBytes = 16 << 20;
constexpr size_t kChunkBytes = (192 << 10) + 512;  // not cluster aligned: exercises partial clusters
constexpr int kMaxExtents = 1000;
constexpr size_t kDataFileBytes = 64 << 10;

// A non-OK Status must carry a one-line message.
void CheckStatus(const dmcow::Status& s) {
  if (s.ok()) return;
  const std::string& m = s.message();
  if (m.empty() || m.find('\n') != std::string::npos) std::abort();
}

void ReadAndMap(dmcow::Image* image) {
  const uint64_t size = image->virtual_size();
  const uint64_t limit = std::min(size, kMaxReadBytes);
  std::vector<uint8_t> buf(kChunkBytes);
  for (uint64_t off = 0; off < limit;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), limit - off));
    dmcow::Status s = image->Read(off, buf.data(), n);
    CheckStatus(s);
    if (!s.ok()) break;
    off += n;
  }
  uint64_t off = 0;
  for (int i = 0; i < kMaxExtents && off < size; i++) {
    dmcow::MapExtent e;
    dmcow::Status s = dmcow::GetMapExtent(image, off, size - off, &e);
    CheckStatus(s);
    if (!s.ok()) break;
    if (e.length == 0 || e.start != off) std::abort();  // would loop forever
    off += e.length;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  dmcow::MemEnv env;
  const std::string path = "fuzz.img";
  env.PutFile(path, std::vector<uint8_t>(data, data + size));
  static const std::vector<uint8_t> data_file = [] {
    std::vector<uint8_t> d(kDataFileBytes);
    for (size_t i = 0; i < d.size(); i++) d[i] = static_cast<uint8_t>(i * 131 + (i >> 9));
    return d;
  }();
  env.PutFile("fuzz.data", data_file);
  dmcow::OpenOptions options;
  options.env = &env;
  options.open_backing = false;
  std::unique_ptr<dmcow::Image> image;
  dmcow::Status s = dmcow::OpenImage(path, options, &image);
  CheckStatus(s);
  if (!s.ok()) return 0;
  ReadAndMap(image.get());

  const std::vector<dmcow::SnapshotInfo>& snapshots = image->info().snapshots;
  if (!snapshots.empty()) {
    options.snapshot = snapshots.front().id;
    std::unique_ptr<dmcow::Image> snap;
    s = dmcow::OpenImage(path, options, &snap);
    CheckStatus(s);
    if (s.ok()) ReadAndMap(snap.get());
  }
  return 0;
}
