// The qcow2 plugin's decisions against the real qemu-img: a model of the
// kernel target (docs/abi.md section 3: mapping kinds, fills, held writes)
// drives Qcow2Mapper with seeded reads, writes and flushes on images that
// qemu-img made (empty, compressed, snapshots, zero clusters, subclusters,
// backing files, 512-byte clusters; and legacy qcow v1 images: empty, with
// data, compressed, over a raw and over a qcow v1 backing file); every read
// is checked against a raw reference that received the same writes, and
// after each detach the image must pass `qemu-img check` (no errors, no
// leaks) and `qemu-img compare` equal to the reference. qemu-img cannot
// check qcow v1 images: for those, `qemu-img compare` and `qemu-img convert
// -O raw` must succeed and `dmcow-img check` must find no errors. The VM tests (tests/vm) run the same plugin in
// the real kernel; this one reaches many more shapes and operations.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <random>

#include <catch2/catch.hpp>
#include <sys/stat.h>
#include "dmcow/image.h"
#include "qcow2/qcow2_mapper.h"
#include "test_util.h"

using dmcowd::Answer;
using dmcowd::Extent;
using dmcowd::MapKind;
using dmcowd::MapRequest;
using dmcowd::Qcow2Mapper;
using dmcowd::Status;
using namespace dmcow_test;

namespace {

// The kernel target as the ABI describes it, over the image file and an
// in-memory scratch area; the base device is the backing chain's content.
class KernelModel : public dmcowd::CowSpace {
 public:
  KernelModel(const std::string& image_path, dmcow::Image* backing, uint64_t dev_bytes)
      : backing_(backing), dev_bytes_(dev_bytes) {
    fd_ = ::open(image_path.c_str(), O_RDWR);
    REQUIRE(fd_ >= 0);
  }
  ~KernelModel() override { ::close(fd_); }

  void Attach(Qcow2Mapper* mapper) {
    mapper_ = mapper;
    geo_ = mapper->geometry();
    chunk_bytes_ = uint64_t{geo_.chunk_sectors} * 512;
    maps_.clear();
    std::vector<Extent> stable;
    REQUIRE(mapper->StableExtents(&stable).ok());
    for (const Extent& e : stable) {
      for (uint64_t i = 0; i < e.nr_chunks; i++) maps_[e.chunk + i] = {MapKind::kFilledRW, e.cow_sector + i * geo_.chunk_sectors};
    }
  }

  Status WriteScratch(uint64_t offset, const void* buf, size_t len) override {
    REQUIRE(offset + len <= geo_.scratch_sectors * 512);
    auto& v = scratch_[offset];
    v.assign(static_cast<const uint8_t*>(buf), static_cast<const uint8_t*>(buf) + len);
    return Status::OK();
  }
  Status EnsureImageBytes(uint64_t end) override {
    image_limit_ = std::max(image_limit_, end);
    return Status::OK();
  }

  void Read(uint64_t off, uint8_t* buf, uint64_t len) {
    while (len > 0) {
      const uint64_t chunk = off / chunk_bytes_, in = off % chunk_bytes_;
      const uint64_t n = std::min(len, chunk_bytes_ - in);
      if (!maps_.count(chunk)) Ask(chunk, false, false);
      ReadChunk(chunk, in, buf, n);
      off += n, buf += n, len -= n;
    }
  }

  void Write(uint64_t off, const uint8_t* buf, uint64_t len) {
    while (len > 0) {
      const uint64_t chunk = off / chunk_bytes_, in = off % chunk_bytes_;
      const uint64_t n = std::min(len, chunk_bytes_ - in);
      const uint64_t chunk_len = std::min(chunk_bytes_, dev_bytes_ - chunk * chunk_bytes_);
      auto it = maps_.find(chunk);
      if (it == maps_.end() || (it->second.kind != MapKind::kRW && it->second.kind != MapKind::kFilledRW)) {
        Ask(chunk, true, in == 0 && n == chunk_len);
      }
      const Map& m = maps_.at(chunk);
      REQUIRE((m.kind == MapKind::kRW || m.kind == MapKind::kFilledRW));
      CowWrite(m.sector * 512 + in, buf, n);
      off += n, buf += n, len -= n;
    }
  }

  void Flush() {
    // Every reply so far is "durable" (the model writes straight to the file).
    REQUIRE(mapper_->Flush(batch_).ok());
  }

  uint64_t requests() const { return requests_; }

 private:
  struct Map {
    MapKind kind;
    uint64_t sector;
  };

  void Ask(uint64_t chunk, bool write, bool full) {
    MapRequest req{chunk, write, full, ++batch_};
    Answer a;
    requests_++;
    Status s = mapper_->Map(req, &a);
    REQUIRE(s.ok());
    REQUIRE(a.error == 0);
    const dmcowd::Mapping& m = a.mapping;
    REQUIRE(m.chunk <= chunk);
    REQUIRE(chunk < m.chunk + m.nr_chunks);
    if (write) REQUIRE((m.kind == MapKind::kRW || m.kind == MapKind::kFilledRW));
    if (m.kind == MapKind::kRW) {
      REQUIRE(m.nr_chunks == 1);
      if (!full) {  // fill from the current data
        std::vector<uint8_t> cur(chunk_bytes_);
        const uint64_t n = std::min(chunk_bytes_, dev_bytes_ - chunk * chunk_bytes_);
        if (!maps_.count(chunk)) maps_[chunk] = {MapKind::kBase, 0};
        ReadChunk(chunk, 0, cur.data(), n);
        CowWrite(m.cow_sector * 512, cur.data(), n);
      }
    }
    for (uint64_t i = 0; i < m.nr_chunks; i++) {
      const bool has_cow = m.kind == MapKind::kRW || m.kind == MapKind::kRO || m.kind == MapKind::kFilledRW;
      maps_[m.chunk + i] = {m.kind == MapKind::kRW ? MapKind::kFilledRW : m.kind,
                            has_cow ? m.cow_sector + i * geo_.chunk_sectors : 0};
    }
  }

  void ReadChunk(uint64_t chunk, uint64_t in, uint8_t* buf, uint64_t n) {
    const Map& m = maps_.at(chunk);
    switch (m.kind) {
      case MapKind::kZero: std::memset(buf, 0, n); break;
      case MapKind::kBase: {
        const uint64_t off = chunk * chunk_bytes_ + in;
        std::memset(buf, 0, n);
        if (backing_ && off < backing_->virtual_size()) {
          REQUIRE(backing_->Read(off, buf, std::min(n, backing_->virtual_size() - off)).ok());
        }
        break;
      }
      default: CowRead(m.sector * 512 + in, buf, n);
    }
  }

  void CowRead(uint64_t byte, uint8_t* buf, uint64_t n) {
    const uint64_t scratch = geo_.scratch_sectors * 512;
    if (byte < scratch) {
      const uint64_t slot = byte / chunk_bytes_ * chunk_bytes_;
      auto it = scratch_.find(slot);
      REQUIRE(it != scratch_.end());
      std::memcpy(buf, it->second.data() + (byte - slot), n);
      return;
    }
    std::memset(buf, 0, n);
    REQUIRE(::pread(fd_, buf, n, static_cast<off_t>(byte - scratch)) >= 0);
  }
  void CowWrite(uint64_t byte, const uint8_t* buf, uint64_t n) {
    const uint64_t scratch = geo_.scratch_sectors * 512;
    REQUIRE(byte >= scratch);  // nothing writes to scratch
    REQUIRE(byte - scratch + n <= image_limit_);
    REQUIRE(::pwrite(fd_, buf, n, static_cast<off_t>(byte - scratch)) == static_cast<ssize_t>(n));
  }

  int fd_ = -1;
  dmcow::Image* backing_;
  uint64_t dev_bytes_;
  Qcow2Mapper* mapper_ = nullptr;
  dmcowd::Qcow2Geometry geo_;
  uint64_t chunk_bytes_ = 0;
  uint64_t batch_ = 0;
  uint64_t requests_ = 0;
  uint64_t image_limit_ = 0;
  std::map<uint64_t, Map> maps_;
  std::map<uint64_t, std::vector<uint8_t>> scratch_;
};

struct Shape {
  const char* name;
  std::string setup;  // shell commands run in the temp dir; must make img.qcow2 (img.qcow for v1)
  bool has_backing = false;
  bool v1 = false;    // legacy qcow (version 1)
};

void Session(const std::string& path, bool has_backing, std::mt19937_64& rng, int ops, std::vector<uint8_t>* ref) {
  dmcow::OpenOptions o;
  o.writable = true;
  std::unique_ptr<dmcow::Image> image;
  Status s = dmcow::OpenImage(path, o, &image);
  REQUIRE(s.ok());
  {
    struct stat st;
    REQUIRE(::stat(path.c_str(), &st) == 0);
    KernelModel kernel(path, image->backing(), image->virtual_size());
    kernel.EnsureImageBytes(static_cast<uint64_t>(st.st_size) & ~uint64_t{511});
    Qcow2Mapper mapper(image.get(), &kernel, true, has_backing);
    REQUIRE(mapper.Init().ok());
    kernel.Attach(&mapper);
    const uint64_t size = image->virtual_size();
    for (int i = 0; i < ops; i++) {
      const int what = static_cast<int>(rng() % 10);
      uint64_t len = 1 + rng() % (what < 2 ? 3 * 65536 : 9000);
      uint64_t off = rng() % size;
      if (rng() % 3 == 0) off &= ~uint64_t{4095}, len = (len + 4095) & ~uint64_t{4095};
      len = std::min(len, size - off);
      if (what < 5) {
        std::vector<uint8_t> data = MixedData(rng, len);
        kernel.Write(off, data.data(), len);
        std::memcpy(ref->data() + off, data.data(), len);
      } else if (what < 9) {
        std::vector<uint8_t> got(len);
        kernel.Read(off, got.data(), len);
        INFO("read at " << off << " +" << len);
        REQUIRE(std::memcmp(got.data(), ref->data() + off, len) == 0);
      } else {
        kernel.Flush();
      }
    }
    kernel.Flush();
    // Every byte through the device equals the reference.
    std::vector<uint8_t> all(size);
    kernel.Read(0, all.data(), size);
    const bool device_equals_reference = all == *ref;
    REQUIRE(device_equals_reference);
  }
  REQUIRE(image->Flush().ok());
  image.reset();
}

}  // namespace

TEST_CASE("qcow2 plugin decisions keep qemu-made images consistent") {
  if (!HaveQemuImg()) {
    WARN("qemu-img not found: skipped");
    return;
  }
  const std::vector<Shape> shapes = {
      {"empty v3 64K", "qemu-img create -q -f qcow2 img.qcow2 8M"},
      {"empty v2 512-byte clusters", "qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 img.qcow2 3M"},
      {"2K clusters, data and zeros",
       "qemu-img create -q -f qcow2 -o cluster_size=2048 img.qcow2 4M && "
       "qemu-io -f qcow2 -c 'write -P 0x11 0 1M' -c 'write -z 64k 64k' -c 'write -P 0x22 2050k 7k' img.qcow2 >/dev/null"},
      {"data, zero clusters, discards",
       "qemu-img create -q -f qcow2 img.qcow2 8M && "
       "qemu-io -f qcow2 -c 'write -P 0x5a 0 3M' -c 'write -z 1M 512k' -c 'discard 2M 256k' -c 'write -P 7 5M 100k' img.qcow2 >/dev/null"},
      {"zlib compressed",
       "qemu-img create -q -f raw src.raw 8M && qemu-io -f raw -c 'write -P 0x33 0 2M' -c 'write -P 0x44 3M 1M' src.raw >/dev/null && "
       "qemu-img convert -c -O qcow2 src.raw img.qcow2"},
      {"zstd compressed 4K clusters",
       "qemu-img create -q -f raw src.raw 4M && qemu-io -f raw -c 'write -P 0x61 0 1M' -c 'write -P 0x62 2M 600k' src.raw >/dev/null && "
       "qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=4096 src.raw img.qcow2"},
      {"internal snapshot (shared clusters)",
       "qemu-img create -q -f qcow2 img.qcow2 8M && qemu-io -f qcow2 -c 'write -P 1 0 4M' img.qcow2 >/dev/null && "
       "qemu-img snapshot -c snap img.qcow2 && qemu-io -f qcow2 -c 'write -P 2 1M 64k' img.qcow2 >/dev/null"},
      {"raw backing",
       "qemu-img create -q -f raw base.raw 6M && qemu-io -f raw -c 'write -P 0x77 0 6M' base.raw >/dev/null && "
       "qemu-img create -q -f qcow2 -b base.raw -F raw img.qcow2 8M && qemu-io -f qcow2 -c 'write -P 9 1M 64k' img.qcow2 >/dev/null",
       true},
      {"qcow2 backing, extended L2 overlay with partial clusters",
       "qemu-img create -q -f qcow2 base.qcow2 8M && qemu-io -f qcow2 -c 'write -P 0x31 0 8M' base.qcow2 >/dev/null && "
       "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 -o extended_l2=on,cluster_size=128k img.qcow2 8M && "
       "qemu-io -f qcow2 -c 'write -P 0x32 4k 4k' -c 'write -z 200k 8k' -c 'write -z 512k 256k' -c 'write -P 0x33 1M 256k' img.qcow2 >/dev/null",
       true},
      {"lazy refcounts",
       "qemu-img create -q -f qcow2 -o lazy_refcounts=on img.qcow2 8M && qemu-io -f qcow2 -c 'write -P 3 0 1M' img.qcow2 >/dev/null"},
      // Legacy qcow v1: qemu-img makes 4 KiB clusters, 512-byte ones over a
      // backing file (chunks of 4 KiB hold 8), appended one by one at the end
      // of the file, often not 4 KiB aligned.
      {"qcow v1 empty", "qemu-img create -q -f qcow img.qcow 8M", false, true},
      {"qcow v1 data",
       "qemu-img create -q -f qcow img.qcow 8M && "
       "qemu-io -f qcow -c 'write -P 0x11 0 1M' -c 'write -P 0x22 3073k 7k' -c 'write -P 0x23 6M 100k' img.qcow >/dev/null",
       false, true},
      {"qcow v1 compressed",
       "qemu-img create -q -f raw src.raw 8M && qemu-io -f raw -c 'write -P 0x33 0 2M' -c 'write -P 0x44 3M 1M' src.raw >/dev/null && "
       // qemu-img 7.2 'convert -c -O qcow' writes everything, then exits 1
       // without a message (as fixtures/regenerate.sh notes): checked by compare.
       "(qemu-img convert -c -O qcow src.raw img.qcow || true) && qemu-img compare -q -F raw img.qcow src.raw",
       false, true},
      {"qcow v1 raw backing",
       "qemu-img create -q -f raw base.raw 6M && qemu-io -f raw -c 'write -P 0x77 0 6M' base.raw >/dev/null && "
       "qemu-img create -q -f qcow -b base.raw -F raw img.qcow 8M && qemu-io -f qcow -c 'write -P 9 1M 64k' img.qcow >/dev/null",
       true, true},
      {"qcow v1 over a qcow v1 backing",
       "qemu-img create -q -f raw src.raw 8M && qemu-io -f raw -c 'write -P 0x31 0 5M' src.raw >/dev/null && "
       "(qemu-img convert -c -O qcow src.raw base.qcow || true) && qemu-img compare -q -F raw base.qcow src.raw && qemu-io -f qcow -c 'write -P 0x34 6M 1M' base.qcow >/dev/null && "
       "qemu-img create -q -f qcow -b base.qcow -F qcow img.qcow 8M && "
       "qemu-io -f qcow -c 'write -P 0x32 4k 4k' -c 'write -P 0x33 1025k 3k' -c 'write -P 0x35 7M 64k' img.qcow >/dev/null",
       true, true},
  };
  uint64_t seed = 1;
  for (const Shape& shape : shapes) {
    SECTION(shape.name) {
      TempDir dir;
      const char* format = shape.v1 ? "qcow" : "qcow2";
      const std::string image = dir / (std::string("img.") + format);
      MustRun("cd " + dir.path() + " && " + shape.setup);
      MustRun("qemu-img convert -O raw " + image + " " + dir / "ref.raw");
      std::vector<uint8_t> ref = ReadWholeFile(dir / "ref.raw");
      std::mt19937_64 rng(seed++);
      for (int session = 0; session < 3; session++) {
        INFO(shape.name << " session " << session);
        Session(image, shape.has_backing, rng, 300, &ref);
        std::string out;
        int rc;
        if (shape.v1) {
          // qemu-img does not check qcow v1 ("does not support checks"):
          // QEMU must read it whole, and our check must find nothing wrong.
          rc = Run("qemu-img convert -O raw " + image + " " + dir / "got.raw", &out);
          INFO("qemu-img convert: " << out);
          REQUIRE(rc == 0);
          rc = Run(std::string(DMCOW_IMG_PATH) + " check " + image, &out);
          INFO("dmcow-img check: " << out);
          REQUIRE(rc == 0);
          REQUIRE(out.find("No errors were found") != std::string::npos);
        } else {
          rc = Run("qemu-img check " + image, &out);
          INFO(out);
          REQUIRE(rc == 0);
          REQUIRE(out.find("No errors were found") != std::string::npos);
          REQUIRE(out.find("leaked") == std::string::npos);
        }
        WriteWholeFile(dir / "want.raw", ref);
        rc = Run(std::string("qemu-img compare -f raw -F ") + format + " " + dir / "want.raw" + " " + image, &out);
        INFO(out);
        REQUIRE(rc == 0);
      }
      if (std::string(shape.name).find("snapshot") != std::string::npos) {
        // The snapshot still holds what it held: shared clusters were copied, not written.
        MustRun("qemu-img convert -O raw -l snap " + dir / "img.qcow2" + " " + dir / "snap.raw");
        std::vector<uint8_t> snap = ReadWholeFile(dir / "snap.raw");
        REQUIRE(snap.size() == 8u << 20);
        REQUIRE(std::count(snap.begin(), snap.begin() + (4 << 20), 1) == 4 << 20);
        REQUIRE(std::count(snap.begin() + (4 << 20), snap.end(), 0) == 4 << 20);
      }
    }
  }
}
