// KernelModel: the dm-cow kernel target as docs/abi.md describes it
// (mapping kinds, fills from the current data, whole-chunk writes skipping
// the fill, extents, cached mappings dropped past a bound), driving a
// Qcow2Mapper over the image file and an in-memory scratch area; the base
// device is the backing chain's content.
// Shared by the qcow2 plugin's host tests. I/O failures (a crashed CrashEnv)
// come back as a non-OK Status; protocol violations fail the test.
#ifndef DMCOWD_TESTS_KERNEL_MODEL_H_
#define DMCOWD_TESTS_KERNEL_MODEL_H_

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstring>
#include <map>
#include <vector>

#include "dmcow/env.h"
#include "dmcow/image.h"
#include "qcow2/qcow2_mapper.h"

namespace dmcowd_test {

using dmcowd::Answer;
using dmcowd::Extent;
using dmcowd::MapKind;
using dmcowd::MapRequest;
using dmcowd::Qcow2Mapper;
using dmcowd::Status;

class KernelModel : public dmcowd::CowSpace {
 public:
  // `image_file`: the image as the kernel's loop device sees it.
  KernelModel(dmcow::File* image_file, dmcow::Image* backing, uint64_t dev_bytes)
      : file_(image_file), backing_(backing), dev_bytes_(dev_bytes) {}

  // `scan`: the mapper's whole scan first, in slices of 3 chunks (so every
  // session resumes it); else the caller scans.
  void Attach(Qcow2Mapper* mapper, bool scan = true) {
    mapper_ = mapper;
    geo_ = mapper->geometry();
    chunk_bytes_ = uint64_t{geo_.chunk_sectors} * 512;
    maps_.clear();
    for (bool more = scan; more;) REQUIRE(mapper->ScanStable(3, &more).ok());
    std::vector<Extent> stable;
    REQUIRE(mapper->StableExtents(&stable).ok());
    // As a table with too many runs for its target budget: every other run
    // is linear, the rest is asked about at first access (read_to_daemon).
    for (size_t r = 0; r < stable.size(); r += 2) {
      const Extent& e = stable[r];
      for (uint64_t i = 0; i < e.nr_chunks; i++)
        maps_[e.chunk + i] = {MapKind::kFilledRW, e.cow_sector + i * geo_.chunk_sectors};
    }
  }

  Status WriteScratch(uint64_t offset, const void* buf, size_t len) override {
    REQUIRE(offset + len <= geo_.scratch_sectors * 512);
    REQUIRE((offset % chunk_bytes_ == 0 && len % chunk_bytes_ == 0));  // whole chunks
    const auto* p = static_cast<const uint8_t*>(buf);
    for (size_t done = 0; done < len; done += chunk_bytes_) {
      scratch_[offset + done].assign(p + done, p + done + chunk_bytes_);
    }
    return Status::OK();
  }
  Status EnsureImageBytes(uint64_t end) override {
    image_limit_ = std::max(image_limit_, end);
    return Status::OK();
  }

  Status Read(uint64_t off, uint8_t* buf, uint64_t len) {
    while (len > 0) {
      const uint64_t chunk = off / chunk_bytes_, in = off % chunk_bytes_;
      const uint64_t n = std::min(len, chunk_bytes_ - in);
      auto it = maps_.find(chunk);
      if (it == maps_.end() || it->second.dropped) DMCOW_RETURN_IF_ERROR(Ask(chunk, false, false));
      DMCOW_RETURN_IF_ERROR(ReadChunk(chunk, in, buf, n));
      off += n, buf += n, len -= n;
    }
    return Status::OK();
  }

  Status Write(uint64_t off, const uint8_t* buf, uint64_t len) {
    while (len > 0) {
      const uint64_t chunk = off / chunk_bytes_, in = off % chunk_bytes_;
      const uint64_t n = std::min(len, chunk_bytes_ - in);
      const uint64_t chunk_len = std::min(chunk_bytes_, dev_bytes_ - chunk * chunk_bytes_);
      auto it = maps_.find(chunk);
      if (it == maps_.end() || it->second.dropped ||
          (it->second.kind != MapKind::kRW && it->second.kind != MapKind::kFilledRW)) {
        DMCOW_RETURN_IF_ERROR(Ask(chunk, true, in == 0 && n == chunk_len));
      }
      const Map& m = maps_.at(chunk);
      REQUIRE((m.kind == MapKind::kRW || m.kind == MapKind::kFilledRW));
      DMCOW_RETURN_IF_ERROR(CowWrite(m.sector * 512 + in, buf, n));
      off += n, buf += n, len -= n;
    }
    return Status::OK();
  }

  // A flush bio: the cow device is flushed (every fill and write of replies
  // so far is durable), then the daemon's FLUSH round trip.
  Status Flush() {
    DMCOW_RETURN_IF_ERROR(file_->Sync());
    return mapper_->Flush(batch_);
  }

 private:
  struct Map {
    MapKind kind;
    uint64_t sector;
    bool dropped = false;  // by the kernel (DropCached); kept here to check RW answers
  };

  Status Ask(uint64_t chunk, bool write, bool full) {
    MapRequest req{chunk, write, full, ++batch_};
    Answer a;
    DMCOW_RETURN_IF_ERROR(mapper_->Map(req, &a));
    REQUIRE(a.error == 0);
    const dmcowd::Mapping& m = a.mapping;
    REQUIRE(m.chunk <= chunk);
    REQUIRE(chunk < m.chunk + m.nr_chunks);
    if (write) REQUIRE((m.kind == MapKind::kRW || m.kind == MapKind::kFilledRW));
    if (m.kind == MapKind::kRW) {
      REQUIRE(m.nr_chunks == 1);
      // The kernel may have dropped a ZERO or BASE mapping, and a
      // whole-chunk write pushed back by a suspend leaves the fill to copy
      // after all: the base device must hold what the chunk reads now
      // (docs/abi.md, "Cached mappings").
      auto mapped = maps_.find(chunk);
      if (mapped != maps_.end() && mapped->second.kind == MapKind::kZero) {
        const uint64_t n = std::min(chunk_bytes_, dev_bytes_ - chunk * chunk_bytes_);
        std::vector<uint8_t> now(n), base(n);
        DMCOW_RETURN_IF_ERROR(ReadChunk(chunk, 0, now.data(), n));
        maps_[chunk] = {MapKind::kBase, 0};
        DMCOW_RETURN_IF_ERROR(ReadChunk(chunk, 0, base.data(), n));
        INFO("RW answer for chunk " << chunk << ", mapped ZERO, whose base data is not zeros");
        REQUIRE(now == base);
      }
      if (!full) {  // fill from the current data
        std::vector<uint8_t> cur(chunk_bytes_);
        const uint64_t n = std::min(chunk_bytes_, dev_bytes_ - chunk * chunk_bytes_);
        auto it = maps_.find(chunk);
        if (it == maps_.end() || it->second.dropped) maps_[chunk] = {MapKind::kBase, 0};
        DMCOW_RETURN_IF_ERROR(ReadChunk(chunk, 0, cur.data(), n));
        DMCOW_RETURN_IF_ERROR(CowWrite(m.cow_sector * 512, cur.data(), n));
      }
    }
    for (uint64_t i = 0; i < m.nr_chunks; i++) {
      const bool has_cow = m.kind == MapKind::kRW || m.kind == MapKind::kRO || m.kind == MapKind::kFilledRW;
      maps_[m.chunk + i] = {m.kind == MapKind::kRW ? MapKind::kFilledRW : m.kind,
                            has_cow ? m.cow_sector + i * geo_.chunk_sectors : 0};
    }
    DropCached(chunk);
    return Status::OK();
  }

  // Past kCacheChunks cached mappings (read_to_daemon: ZERO and BASE) the
  // kernel drops older ones; here all but the one just asked about, so
  // that every chunk read again is asked again.
  void DropCached(uint64_t keep) {
    static constexpr size_t kCacheChunks = 16;
    auto cached = [](const Map& m) { return !m.dropped && (m.kind == MapKind::kZero || m.kind == MapKind::kBase); };
    size_t n = 0;
    for (const auto& [c, m] : maps_) n += cached(m);
    if (n <= kCacheChunks) return;
    for (auto& [c, m] : maps_) {
      if (c != keep && cached(m)) m.dropped = true;
    }
  }

  Status ReadChunk(uint64_t chunk, uint64_t in, uint8_t* buf, uint64_t n) {
    const Map& m = maps_.at(chunk);
    switch (m.kind) {
      case MapKind::kZero: std::memset(buf, 0, n); return Status::OK();
      case MapKind::kBase: {
        const uint64_t off = chunk * chunk_bytes_ + in;
        std::memset(buf, 0, n);
        if (backing_ && off < backing_->virtual_size()) {
          return backing_->Read(off, buf, std::min(n, backing_->virtual_size() - off));
        }
        return Status::OK();
      }
      default: return CowRead(m.sector * 512 + in, buf, n);
    }
  }

  Status CowRead(uint64_t byte, uint8_t* buf, uint64_t n) {
    const uint64_t scratch = geo_.scratch_sectors * 512;
    if (byte < scratch) {
      const uint64_t slot = byte / chunk_bytes_ * chunk_bytes_;
      auto it = scratch_.find(slot);
      REQUIRE(it != scratch_.end());
      std::memcpy(buf, it->second.data() + (byte - slot), n);
      return Status::OK();
    }
    std::memset(buf, 0, n);
    size_t got = 0;
    return file_->Read(byte - scratch, n, buf, &got);
  }
  Status CowWrite(uint64_t byte, const uint8_t* buf, uint64_t n) {
    const uint64_t scratch = geo_.scratch_sectors * 512;
    REQUIRE(byte >= scratch);  // nothing writes to scratch
    REQUIRE(byte - scratch + n <= image_limit_);
    return file_->Write(byte - scratch, buf, n);
  }

  dmcow::File* file_;
  dmcow::Image* backing_;
  uint64_t dev_bytes_;
  Qcow2Mapper* mapper_ = nullptr;
  dmcowd::Qcow2Geometry geo_;
  uint64_t chunk_bytes_ = 0;
  uint64_t batch_ = 0;
  uint64_t image_limit_ = 0;
  std::map<uint64_t, Map> maps_;
  std::map<uint64_t, std::vector<uint8_t>> scratch_;
};

}  // namespace dmcowd_test

#endif  // DMCOWD_TESTS_KERNEL_MODEL_H_
