#include "qcow2/qcow2_mapper.h"

#include <algorithm>
#include <cerrno>
#include <iterator>
#include <string>

namespace dmcowd {

using dmcow::ClusterState;
using dmcow::Image;

namespace {
constexpr uint64_t kMaxRunChunks = 4096;  // bounds the kernel's work per reply
}  // namespace

Qcow2Geometry Qcow2Mapper::GeometryFor(const Image& image) {
  Qcow2Geometry g;
  const uint64_t cs = image.info().cluster_size;
  const uint64_t chunk_bytes = std::max<uint64_t>(cs, 4096);
  g.chunk_sectors = static_cast<uint32_t>(chunk_bytes / 512);
  g.clusters_per_chunk = chunk_bytes / cs;
  g.chunks = (image.virtual_size() + chunk_bytes - 1) / chunk_bytes;
  g.scratch_sectors = g.chunks * g.chunk_sectors;
  return g;
}

Qcow2Mapper::Qcow2Mapper(Image* image, CowSpace* space, bool writable, bool has_backing)
    : image_(image),
      device_(image->AsDeviceImage()),
      space_(space),
      has_backing_(has_backing),
      writable_(writable),
      cluster_size_(image->info().cluster_size),
      geo_(GeometryFor(*image)) {}

uint64_t Qcow2Mapper::ClustersIn(uint64_t chunk) const {
  const uint64_t clusters = (image_->virtual_size() + cluster_size_ - 1) / cluster_size_;
  return std::min(geo_.clusters_per_chunk, clusters - chunk * geo_.clusters_per_chunk);
}

Status Qcow2Mapper::Classify(uint64_t chunk, ChunkState* out) {
  const uint64_t first = chunk * geo_.clusters_per_chunk;
  const uint64_t n = ClustersIn(chunk);
  bool all_unallocated = true, all_zero = true, all_data = true, all_exclusive = true;
  uint64_t host0 = 0;
  for (uint64_t i = 0; i < n; i++) {
    dmcow::DeviceImage::ClusterPlace p;
    DMCOW_RETURN_IF_ERROR(device_->DescribeCluster(first + i, &p));
    const bool whole = !p.partial;
    all_unallocated &= whole && p.state == ClusterState::kUnallocated;
    all_zero &= whole && p.state == ClusterState::kZero;
    const bool data = whole && p.state == ClusterState::kData;
    if (data && i == 0) host0 = p.host_offset;
    all_data &= data && p.host_offset == host0 + i * cluster_size_;
    all_exclusive &= data && p.exclusive;
  }
  // Only whole 4 KiB-aligned chunks of the image can be mapped in place.
  if (all_data && (host0 % 4096) != 0) all_data = all_exclusive = false;
  *out = ChunkState();
  if (all_data && all_exclusive) {
    *out = ChunkState{ChunkKind::kWritable, host0};
  } else if (all_data) {
    *out = ChunkState{ChunkKind::kShared, host0};
  } else if (all_unallocated) {
    out->kind = ChunkKind::kUnallocated;
  } else if (all_zero) {
    out->kind = ChunkKind::kZero;
  } else {
    out->kind = ChunkKind::kAssembled;
  }
  return Status::OK();
}

Status Qcow2Mapper::Init() {
  if (device_ == nullptr) {
    return Status::NotSupported(image_->filename() + ": is " + image_->info().format +
                                "; only qcow2 and qcow images can be served as a block device");
  }
  stable_.clear();
  stable_sorted_ = true;
  scan_pos_ = scan_chunk_ = 0;
  return Status::OK();
}

Status Qcow2Mapper::ScanStable(uint64_t max_chunks, bool* more) {
  const uint64_t vsize = image_->virtual_size();
  *more = scan_pos_ < vsize;
  if (!*more || !linked_.empty()) return Status::OK();
  // Walk the layer's runs so that a sparse image costs little; describe
  // only chunks that hold data.
  const uint64_t chunk_bytes = uint64_t{geo_.chunk_sectors} * 512;
  uint64_t classified = 0, runs = 0;
  bool found = false;
  while (scan_pos_ < vsize && classified < max_chunks && runs < max_chunks) {
    dmcow::LayerExtent e;
    DMCOW_RETURN_IF_ERROR(image_->GetLayerStatus(scan_pos_, vsize - scan_pos_, &e));
    runs++;
    if (e.length == 0)
      return Status::Corrupt(image_->filename() + ": empty block status at " + std::to_string(scan_pos_));
    const uint64_t end = std::min(vsize, scan_pos_ + e.length);
    if (e.state == ClusterState::kData) {
      uint64_t c = std::max(scan_chunk_, scan_pos_ / chunk_bytes);
      for (; c * chunk_bytes < end && classified < max_chunks; c++, classified++) {
        ChunkState st;
        DMCOW_RETURN_IF_ERROR(Classify(c, &st));
        if (st.kind != ChunkKind::kWritable) continue;
        // Runs as they are found (a dense image must not cost an Extent
        // per chunk until StableExtents merges).
        const uint64_t sector = ImageSector(st.host_offset);
        Extent* last = stable_.empty() ? nullptr : &stable_.back();
        if (last != nullptr && last->chunk + last->nr_chunks == c &&
            last->cow_sector + last->nr_chunks * geo_.chunk_sectors == sector) {
          last->nr_chunks++;
        } else {
          stable_.push_back(Extent{c, 1, sector});
        }
        found = true;
      }
      scan_chunk_ = c;
      if (c * chunk_bytes < end) {  // out of budget inside the run
        scan_pos_ = c * chunk_bytes;
        break;
      }
    }
    scan_pos_ = end;
  }
  if (found) {
    stable_sorted_ = false;
    generation_++;
  }
  *more = scan_pos_ < vsize;
  return Status::OK();
}

Status Qcow2Mapper::ExtendRun(uint64_t chunk, ChunkKind kind, uint64_t host_offset, uint64_t limit, uint64_t* n) {
  *n = 1;
  const uint64_t chunk_bytes = uint64_t{geo_.chunk_sectors} * 512;
  while (*n < limit && chunk + *n < geo_.chunks) {
    const uint64_t next = chunk + *n;
    if (reserved_.count(next)) break;
    if (kind == ChunkKind::kAssembled && InScratch(next)) break;  // one slot per chunk
    ChunkState st;
    DMCOW_RETURN_IF_ERROR(Classify(next, &st));
    if (st.kind != kind) break;
    if ((kind == ChunkKind::kShared || kind == ChunkKind::kWritable) &&
        st.host_offset != host_offset + *n * chunk_bytes)
      break;
    ++*n;
  }
  return Status::OK();
}

std::map<uint64_t, Qcow2Mapper::ScratchRun>::const_iterator Qcow2Mapper::RunHolding(uint64_t chunk) const {
  auto it = scratch_runs_.upper_bound(chunk);
  if (it == scratch_runs_.begin()) return scratch_runs_.end();
  --it;
  return chunk - it->first < it->second.nr_chunks ? it : scratch_runs_.end();
}

bool Qcow2Mapper::InScratch(uint64_t chunk, uint64_t* slot) const {
  auto it = RunHolding(chunk);
  if (it == scratch_runs_.end()) return false;
  if (slot) *slot = it->second.slot + (chunk - it->first);
  return true;
}

bool Qcow2Mapper::AllocSlots(uint64_t n, uint64_t* slot) {
  for (auto it = free_slots_.begin(); it != free_slots_.end(); ++it) {
    if (it->second < n) continue;
    *slot = it->first;
    if (it->second > n) free_slots_[it->first + n] = it->second - n;
    free_slots_.erase(it);
    return true;
  }
  if (n > geo_.chunks - scratch_end_) return false;
  *slot = scratch_end_;
  scratch_end_ += n;
  return true;
}

void Qcow2Mapper::SetScratchBudget(uint64_t bytes) {
  const uint64_t chunk_bytes = uint64_t{geo_.chunk_sectors} * 512;
  const uint64_t min_slots = 2 * std::max<uint64_t>(1, (uint64_t{2} << 20) / chunk_bytes);
  scratch_budget_ = bytes == 0 ? 0 : std::max(min_slots, bytes / chunk_bytes);
  if (scratch_budget_ > geo_.chunks / 2) scratch_budget_ = 0;
}

void Qcow2Mapper::LeaveScratch(uint64_t chunk) {
  auto it = RunHolding(chunk);
  if (it == scratch_runs_.end()) return;
  const uint64_t first = it->first, k = chunk - first;
  const ScratchRun run = it->second;
  scratch_runs_.erase(it);
  if (k > 0) scratch_runs_[first] = ScratchRun{k, run.slot};
  if (k + 1 < run.nr_chunks) {
    scratch_runs_[chunk + 1] = ScratchRun{run.nr_chunks - k - 1, run.slot + k + 1};
    scratch_order_.push_back(chunk + 1);
  }
  orphans_.push_back(Forgotten{chunk, 1, run.slot + k});
  scratch_live_--;
}

void Qcow2Mapper::Reclaim(std::vector<Extent>* forget) {
  forget->clear();
  // Refused last time first (their chunks are out of the lookup already).
  std::vector<Forgotten> items = std::move(reclaiming_);
  reclaiming_.clear();
  items.insert(items.end(), orphans_.begin(), orphans_.end());
  orphans_.clear();
  while (scratch_live_ > scratch_budget_ / 2 && !scratch_order_.empty()) {
    const uint64_t first = scratch_order_.front();
    scratch_order_.pop_front();
    auto it = scratch_runs_.find(first);
    if (it == scratch_runs_.end()) continue;  // left by a split or a write
    items.push_back(Forgotten{first, it->second.nr_chunks, it->second.slot});
    scratch_live_ -= it->second.nr_chunks;
    scratch_runs_.erase(it);
  }
  for (const Forgotten& f : items) forget->push_back(Extent{f.chunk, f.nr_chunks, f.slot * geo_.chunk_sectors});
  reclaiming_ = std::move(items);
  ahead_next_ = UINT64_MAX;
}

void Qcow2Mapper::Reclaimed(const std::vector<int>& errors) {
  std::vector<Forgotten> again;
  for (size_t i = 0; i < reclaiming_.size(); i++) {
    const int err = i < errors.size() ? errors[i] : EIO;
    if (err == 0 || err == EINVAL) {
      FreeSlots(reclaiming_[i].slot, reclaiming_[i].nr_chunks);
    } else {
      again.push_back(reclaiming_[i]);  // e.g. EBUSY: a kernel fill still reads it
    }
  }
  reclaiming_ = std::move(again);
}

void Qcow2Mapper::FreeSlots(uint64_t first, uint64_t count) {
  const uint64_t chunk_bytes = uint64_t{geo_.chunk_sectors} * 512;
  (void)space_->ReleaseScratch(first * chunk_bytes, count * chunk_bytes);  // only storage
  auto next = free_slots_.lower_bound(first);
  if (next != free_slots_.end() && next->first == first + count) {
    count += next->second;
    next = free_slots_.erase(next);
  }
  if (next != free_slots_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == first) {
      first = prev->first;
      count += prev->second;
      free_slots_.erase(prev);
    }
  }
  free_slots_[first] = count;
}

Status Qcow2Mapper::MapRead(uint64_t chunk, const ChunkState& st, Mapping* m) {
  const uint64_t chunk_bytes = uint64_t{geo_.chunk_sectors} * 512;
  m->chunk = chunk;
  m->nr_chunks = 1;
  switch (st.kind) {
    case ChunkKind::kWritable:
      m->kind = MapKind::kFilledRW;
      m->cow_sector = ImageSector(st.host_offset);
      return ExtendRun(chunk, st.kind, st.host_offset, kMaxRunChunks, &m->nr_chunks);
    case ChunkKind::kShared:
      m->kind = MapKind::kRO;
      m->cow_sector = ImageSector(st.host_offset);
      return ExtendRun(chunk, st.kind, st.host_offset, kMaxRunChunks, &m->nr_chunks);
    case ChunkKind::kUnallocated:
      // Without a backing file the base device reads zeros; ZERO saves the I/O.
      m->kind = has_backing_ ? MapKind::kBase : MapKind::kZero;
      return ExtendRun(chunk, st.kind, 0, kMaxRunChunks, &m->nr_chunks);
    case ChunkKind::kZero: m->kind = MapKind::kZero; return ExtendRun(chunk, st.kind, 0, kMaxRunChunks, &m->nr_chunks);
    case ChunkKind::kAssembled: {
      // Decompressed (or merged) once, then read from scratch by the kernel.
      m->kind = MapKind::kRO;
      uint64_t slot;
      if (InScratch(chunk, &slot)) {  // assembled before, unchanged since
        m->cow_sector = slot * geo_.chunk_sectors;
        return Status::OK();
      }
      // Reads that go on where the last assembled run ended are sequential:
      // assemble ahead, doubling up to 2 MiB a reply, so that reading a
      // compressed image in order costs a few round trips per MiB instead of
      // one per cluster. Random reads stay at one chunk.
      const uint64_t max_ahead = std::max<uint64_t>(1, (uint64_t{2} << 20) / chunk_bytes);
      ahead_ = chunk == ahead_next_ ? std::min(ahead_ * 2, max_ahead) : 1;
      uint64_t n = 1;
      if (ahead_ > 1) DMCOW_RETURN_IF_ERROR(ExtendRun(chunk, st.kind, 0, ahead_, &n));
      // The run is contiguous in scratch too: one read, one write.
      bool placed = AllocSlots(n, &slot);
      if (!placed && n > 1) {
        n = 1;
        placed = AllocSlots(1, &slot);
      }
      if (!placed) {  // every slot taken, or waiting for the kernel to forget it
        return Status::IOError("scratch full: no slot for chunk " + std::to_string(chunk) + " until a reclaim");
      }
      const uint64_t guest = chunk * chunk_bytes;
      const uint64_t len = std::min(n * chunk_bytes, image_->virtual_size() - guest);
      assembly_.resize(n * chunk_bytes);
      std::fill(assembly_.begin() + len, assembly_.end(), 0);  // past the disk's end
      DMCOW_RETURN_IF_ERROR(image_->Read(guest, assembly_.data(), len));
      DMCOW_RETURN_IF_ERROR(space_->WriteScratch(slot * chunk_bytes, assembly_.data(), n * chunk_bytes));
      scratch_runs_[chunk] = ScratchRun{n, slot};
      scratch_order_.push_back(chunk);
      scratch_live_ += n;
      m->cow_sector = slot * geo_.chunk_sectors;
      m->nr_chunks = n;
      ahead_next_ = chunk + n;
      return Status::OK();
    }
  }
  return Status::OK();
}

Status Qcow2Mapper::MapWrite(const MapRequest& req, const ChunkState& st, Answer* answer) {
  Mapping& m = answer->mapping;
  m.chunk = req.chunk;
  m.nr_chunks = 1;
  if (!writable_) {
    answer->error = EROFS;
    return Status::OK();
  }
  const uint64_t n = ClustersIn(req.chunk);
  const uint64_t first = req.chunk * geo_.clusters_per_chunk;
  uint64_t host = 0;
  Status s = device_->ReserveClusters(n, &host);
  if (s.ok()) s = space_->EnsureImageBytes(host + n * cluster_size_);
  // The kernel fills an RW answer by copying from the base device unless the
  // write covers the whole chunk; but a whole-chunk write that a noflush
  // suspend (a reload, a reclaim) pushes back is replayed after a copy, and
  // the kernel copies from the base device whenever it holds no mapping for
  // the chunk (never asked, or dropped: docs/abi.md, "Cached mappings"). That
  // copy reaches the image, linked, before the replayed write does, so RW is
  // answered only where the base device holds the chunk's content:
  // unallocated chunks (the backing file, or zeros without one) and zero
  // chunks without a backing file. Everything else (zero clusters over a
  // backing file, compressed, partly allocated and snapshot-shared data) is
  // filled here first (zeros by File::WriteZeroes, a fallocate: no copy).
  const bool base_holds_content = st.kind == ChunkKind::kUnallocated || (st.kind == ChunkKind::kZero && !has_backing_);
  // Zeros for an image without backing are a fallocate here, cheaper than
  // the kernel's copy from the zero device, except for an encrypted image:
  // zeros must be encrypted there, which dm-crypt does on the kernel's copy
  // faster than the engine (one pass, no round trip through the daemon).
  const bool kernel_fills = base_holds_content && (req.full_chunk || has_backing_ || image_->info().encrypted);
  if (s.ok() && !kernel_fills) s = device_->FillClusters(first, n, host);
  if (!s.ok()) {
    if (host != 0) (void)device_->UnreserveClusters(n, host);
    return s;
  }
  if (st.kind == ChunkKind::kAssembled) LeaveScratch(req.chunk);
  reserved_[req.chunk] = Reserved{req.chunk, host, req.batch};
  m.kind = kernel_fills ? MapKind::kRW : MapKind::kFilledRW;
  m.cow_sector = ImageSector(host);
  return Status::OK();
}

Status Qcow2Mapper::Map(const MapRequest& req, Answer* answer) {
  *answer = Answer();
  if (req.chunk >= geo_.chunks) {
    answer->error = EINVAL;
    return Status::OK();
  }
  auto it = reserved_.find(req.chunk);
  if (it != reserved_.end()) {
    // Handed out already (the kernel asks again after a refusal): same place.
    answer->mapping = Mapping{MapKind::kFilledRW, req.chunk, 1, ImageSector(it->second.host_offset)};
    return Status::OK();
  }
  ChunkState st;
  DMCOW_RETURN_IF_ERROR(Classify(req.chunk, &st));
  // Chunks writable in place need no new space, for reads or writes.
  if (req.write && st.kind != ChunkKind::kWritable) return MapWrite(req, st, answer);
  return MapRead(req.chunk, st, &answer->mapping);
}

void Qcow2Mapper::Retract(const MapRequest& req, const Mapping& mapping) {
  if (mapping.kind != MapKind::kRW && mapping.kind != MapKind::kFilledRW) return;
  auto it = reserved_.find(req.chunk);
  if (it == reserved_.end() || ImageSector(it->second.host_offset) != mapping.cow_sector) return;
  (void)device_->UnreserveClusters(ClustersIn(req.chunk), it->second.host_offset);
  reserved_.erase(it);
}

Status Qcow2Mapper::Flush(uint64_t durable_batch) {
  std::vector<Reserved> ready;
  for (const auto& [chunk, r] : reserved_) {
    if (r.batch <= durable_batch) ready.push_back(r);
  }
  std::sort(ready.begin(), ready.end(), [](const Reserved& a, const Reserved& b) { return a.chunk < b.chunk; });
  for (const Reserved& r : ready) {
    DMCOW_RETURN_IF_ERROR(device_->LinkClusters(r.chunk * geo_.clusters_per_chunk, ClustersIn(r.chunk), r.host_offset));
    // Linked (in the table cache): never linked twice, even if the flush fails.
    reserved_.erase(r.chunk);
    linked_.push_back(Extent{r.chunk, 1, ImageSector(r.host_offset)});
  }
  DMCOW_RETURN_IF_ERROR(image_->Flush());
  // Linked and durable: from now on these chunks are writable in place.
  if (!linked_.empty()) {
    stable_.insert(stable_.end(), linked_.begin(), linked_.end());
    linked_.clear();
    stable_sorted_ = false;
    generation_++;
  }
  return Status::OK();
}

Status Qcow2Mapper::StableExtents(std::vector<Extent>* out) {
  if (!stable_sorted_) {
    std::sort(stable_.begin(), stable_.end(), [](const Extent& a, const Extent& b) { return a.chunk < b.chunk; });
    // A chunk linked and flushed before the scan reached it is found twice,
    // in the same place (a writable chunk never moves): overlaps merge.
    std::vector<Extent> merged;
    for (const Extent& e : stable_) {
      if (!merged.empty()) {
        Extent& last = merged.back();
        const uint64_t last_end = last.chunk + last.nr_chunks;
        if (e.chunk <= last_end && last.cow_sector + (e.chunk - last.chunk) * geo_.chunk_sectors == e.cow_sector) {
          last.nr_chunks = std::max(last_end, e.chunk + e.nr_chunks) - last.chunk;
          continue;
        }
        if (e.chunk < last_end) continue;  // cannot happen (see above); the first answer stays
      }
      merged.push_back(e);
    }
    stable_ = std::move(merged);
    stable_sorted_ = true;
  }
  *out = stable_;
  return Status::OK();
}

}  // namespace dmcowd
