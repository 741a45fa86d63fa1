// The overlap check (rule at the top of qcow2_overlap.h) and the Qcow2Image
// hooks that apply it.
#include "qcow2/qcow2_overlap.h"

#include <algorithm>

#include "qcow2/qcow2_image.h"
#include "util.h"

namespace dmcow {

using namespace qcow2;

namespace {

constexpr uint64_t kRefTableOffsetMask = ~uint64_t{511};

// The clusters covering [offset, offset + bytes), saturating at the top of the
// address space (hostile offsets may come close to it).
void ClusterSpan(uint64_t offset, uint64_t bytes, uint32_t bits, uint64_t* first, uint64_t* count) {
  uint64_t end;
  if (!CheckedAdd(offset, bytes, &end)) end = UINT64_MAX;
  *first = offset >> bits;
  *count = bytes == 0 ? 0 : ((end - 1) >> bits) - *first + 1;
}

}  // namespace

const char* Qcow2MetadataName(Qcow2Metadata kind) {
  switch (kind) {
    case Qcow2Metadata::kHeader: return "the qcow2 header";
    case Qcow2Metadata::kActiveL1: return "the active L1 table";
    case Qcow2Metadata::kActiveL2: return "an active L2 table";
    case Qcow2Metadata::kRefcountTable: return "the refcount table";
    case Qcow2Metadata::kRefcountBlock: return "a refcount block";
    case Qcow2Metadata::kSnapshotTable: return "the snapshot table";
    case Qcow2Metadata::kSnapshotL1: return "a snapshot's L1 table";
    case Qcow2Metadata::kBitmapDirectory: return "the bitmap directory";
    case Qcow2Metadata::kBitmapTable: return "a bitmap table";
    case Qcow2Metadata::kCryptoHeader: return "the encryption header";
  }
  return "metadata";
}

void Qcow2MetadataMap::SplitAt(uint64_t cluster) {
  auto it = segments_.upper_bound(cluster);
  if (it == segments_.begin()) return;
  --it;
  if (it->first >= cluster || it->second.end <= cluster) return;
  Segment tail = it->second;
  it->second.end = cluster;
  segments_.emplace_hint(std::next(it), cluster, tail);
}

void Qcow2MetadataMap::Add(uint64_t first_cluster, uint64_t clusters, Qcow2Metadata kind) {
  if (clusters == 0) return;
  const uint64_t end = first_cluster + clusters;  // ClusterSpan keeps this from wrapping
  const size_t k = static_cast<size_t>(kind);
  SplitAt(first_cluster);
  SplitAt(end);
  uint64_t pos = first_cluster;
  auto it = segments_.lower_bound(first_cluster);
  while (pos < end) {
    if (it == segments_.end() || it->first > pos) {  // a gap: a new segment fills it
      Segment fresh;
      fresh.end = it == segments_.end() ? end : std::min(end, it->first);
      fresh.count[k] = 1;
      segments_.emplace_hint(it, pos, fresh);
      pos = fresh.end;
      continue;
    }
    it->second.count[k]++;
    pos = it->second.end;
    ++it;
  }
}

void Qcow2MetadataMap::Remove(uint64_t first_cluster, uint64_t clusters, Qcow2Metadata kind) {
  if (clusters == 0) return;
  const uint64_t end = first_cluster + clusters;
  const size_t k = static_cast<size_t>(kind);
  SplitAt(first_cluster);
  SplitAt(end);
  for (auto it = segments_.lower_bound(first_cluster); it != segments_.end() && it->first < end;) {
    if (it->second.count[k] > 0) it->second.count[k]--;
    const auto& c = it->second.count;
    if (std::all_of(c.begin(), c.end(), [](uint32_t n) { return n == 0; })) {
      it = segments_.erase(it);
    } else {
      ++it;
    }
  }
}

bool Qcow2MetadataMap::Find(uint64_t first_cluster, uint64_t clusters, uint32_t ignore, uint64_t* cluster,
                            Qcow2Metadata* kind) const {
  if (clusters == 0) return false;
  const uint64_t end = first_cluster + clusters;
  auto it = segments_.upper_bound(first_cluster);
  if (it != segments_.begin() && std::prev(it)->second.end > first_cluster) --it;
  // Segments of ignored kinds only are stepped over: they are the written
  // table itself, one or a few segments.
  for (; it != segments_.end() && it->first < end; ++it) {
    for (size_t k = 0; k < kQcow2MetadataKinds; k++) {
      if (it->second.count[k] == 0 || (ignore & (1u << k))) continue;
      *cluster = std::max(it->first, first_cluster);
      *kind = static_cast<Qcow2Metadata>(k);
      return true;
    }
  }
  return false;
}

Qcow2OverlapGuard::Qcow2OverlapGuard(File* file, Qcow2Header* header) : file_(file), header_(header) {}

void Qcow2OverlapGuard::Add(uint64_t offset, uint64_t bytes, Qcow2Metadata kind) {
  uint64_t first, count;
  ClusterSpan(offset, bytes, header_->cluster_bits, &first, &count);
  map_.Add(first, count, kind);
}

void Qcow2OverlapGuard::Remove(uint64_t offset, uint64_t bytes, Qcow2Metadata kind) {
  uint64_t first, count;
  ClusterSpan(offset, bytes, header_->cluster_bits, &first, &count);
  map_.Remove(first, count, kind);
}

Status Qcow2OverlapGuard::Load(const L1Table& l1, const std::vector<uint64_t>& refcount_table,
                               const std::vector<SnapshotInfo>& snapshots) {
  const Qcow2Header& h = *header_;
  const uint64_t cs = h.cluster_size;
  Add(0, cs, Qcow2Metadata::kHeader);  // header, extensions and backing file name
  Add(h.l1_table_offset, uint64_t{h.l1_size} * 8, Qcow2Metadata::kActiveL1);
  for (uint64_t i = 0; i < l1.size(); i++) {
    if (l1[i] & kOffsetMask) Add(l1[i] & kOffsetMask, cs, Qcow2Metadata::kActiveL2);
  }
  Add(h.refcount_table_offset, uint64_t{h.refcount_table_clusters} * cs, Qcow2Metadata::kRefcountTable);
  for (uint64_t block : refcount_table) {
    if (block & kRefTableOffsetMask) Add(block & kRefTableOffsetMask, cs, Qcow2Metadata::kRefcountBlock);
  }

  // The snapshot table's length is the sum of its entries' (8-aligned); the
  // open already walked it within the size limit, so these reads succeed.
  uint64_t offset = h.snapshots_offset;
  for (uint32_t i = 0; i < h.nb_snapshots; i++) {
    uint8_t fixed[40];
    DMCOW_RETURN_IF_ERROR(file_->ReadExact(offset, sizeof(fixed), fixed, "snapshot table entry"));
    const uint64_t variable = uint64_t{LoadBE32(fixed + 36)} + LoadBE16(fixed + 12) + LoadBE16(fixed + 14);
    offset = (offset + 40 + variable + 7) & ~uint64_t{7};
  }
  Add(h.snapshots_offset, offset - h.snapshots_offset, Qcow2Metadata::kSnapshotTable);
  for (const SnapshotInfo& s : snapshots) Add(s.l1_table_offset, uint64_t{s.l1_size} * 8, Qcow2Metadata::kSnapshotL1);

  if (h.has_bitmaps_ext) {
    // Validated at open (ReadQcow2Bitmaps): within the file, at most 64 MiB.
    Add(h.bitmap_directory_offset, h.bitmap_directory_size, Qcow2Metadata::kBitmapDirectory);
    std::vector<uint8_t> dir(h.bitmap_directory_size);
    DMCOW_RETURN_IF_ERROR(file_->ReadExact(h.bitmap_directory_offset, dir.size(), dir.data(), "bitmap directory"));
    for (uint64_t pos = 0; pos + 24 <= dir.size();) {
      const uint64_t table = LoadBE64(&dir[pos]) & ~uint64_t{511};
      const uint64_t table_entries = LoadBE32(&dir[pos + 8]);
      Add(table, table_entries * 8, Qcow2Metadata::kBitmapTable);
      const uint64_t entry_bytes = 24 + uint64_t{LoadBE32(&dir[pos + 20])} + LoadBE16(&dir[pos + 18]);
      pos += (entry_bytes + 7) & ~uint64_t{7};
    }
  }
  if (h.has_crypto_ext) Add(h.crypto_header_offset, h.crypto_header_length, Qcow2Metadata::kCryptoHeader);
  return Status::OK();
}

Status Qcow2OverlapGuard::Check(uint64_t offset, uint64_t bytes, uint32_t ignore, const std::string& what) {
  if (!failure_.ok()) return failure_;
  uint64_t first, count, hit;
  Qcow2Metadata kind;
  ClusterSpan(offset, bytes, header_->cluster_bits, &first, &count);
  if (!map_.Find(first, count, ignore, &hit, &kind)) return Status::OK();
  std::string message =
      file_->name() + ": " + what + " at host offset " + Hex(offset) + " overlaps " + Qcow2MetadataName(kind);
  if ((hit << header_->cluster_bits) > offset) message += " (cluster " + Hex(hit << header_->cluster_bits) + ")";
  return Signal(std::move(message));
}

Status Qcow2OverlapGuard::CheckWrite(uint64_t offset, uint64_t bytes, uint32_t ignore, const char* what) {
  return Check(offset, bytes, ignore, what);
}

Status Qcow2OverlapGuard::CheckAllocation(uint64_t offset, uint64_t clusters) {
  if (!failure_.ok()) return failure_;
  uint64_t first, count, hit;
  Qcow2Metadata kind;
  ClusterSpan(offset, clusters * header_->cluster_size, header_->cluster_bits, &first, &count);
  if (!map_.Find(first, count, 0, &hit, &kind)) return Status::OK();
  // Refcounts call metadata free: QEMU's "Preventing invalid allocation".
  return Check(offset, clusters * header_->cluster_size, 0,
               "allocation of " + std::to_string(clusters) + (clusters == 1 ? " cluster" : " clusters") +
                   " that the refcounts call free");
}

Status Qcow2OverlapGuard::Signal(std::string message) {
  if (header_->version < 3) {
    failure_ = Status::Corrupt(message + "; writing stopped (a version 2 header has no corrupt bit to set)");
    return failure_;
  }
  const uint64_t features = header_->incompatible_features | kIncompatCorrupt;
  uint8_t raw[8];
  StoreBE64(raw, features);
  Status s = file_->Write(kIncompatibleFeaturesOffset, raw, sizeof(raw));
  if (s.ok()) s = file_->Sync();
  if (!s.ok()) {
    failure_ = Status::Corrupt(message + "; writing stopped, and marking the image corrupt failed: " + s.message());
    return failure_;
  }
  header_->incompatible_features = features;
  failure_ = Status::Corrupt(message + "; image marked corrupt");
  return failure_;
}

// ---------------------------------------------------------------------------
// Qcow2Image hooks.
// ---------------------------------------------------------------------------

void Qcow2Refcounts::set_overlap_guard(Qcow2OverlapGuard* guard) {
  overlap_ = guard;
  blocks_.set_write_check([guard](uint64_t offset, uint64_t bytes) {
    return guard->CheckWrite(offset, bytes, Qcow2MetadataBit(Qcow2Metadata::kRefcountBlock), "refcount block write");
  });
}

Status Qcow2Image::LoadOverlapGuard() {
  overlap_ = std::make_unique<Qcow2OverlapGuard>(file_.get(), &header_);
  DMCOW_RETURN_IF_ERROR(overlap_->Load(l1_, refcounts_->table(), info_.snapshots));
  refcounts_->set_overlap_guard(overlap_.get());
  Qcow2OverlapGuard* guard = overlap_.get();
  l2_cache_->set_write_check([guard](uint64_t offset, uint64_t bytes) {
    return guard->CheckWrite(offset, bytes, Qcow2MetadataBit(Qcow2Metadata::kActiveL2), "L2 table write");
  });
  return Status::OK();
}

Status Qcow2Image::CheckDataWrite(uint64_t host_offset, uint64_t bytes, const char* what) {
  // An external data file holds no metadata; its offsets are not checked.
  Status s = header_.HasDataFile() ? overlap_->failure() : overlap_->CheckWrite(host_offset, bytes, 0, what);
  if (!s.ok()) {
    info_.corrupt = header_.incompatible_features & kIncompatCorrupt;
    info_.incompatible_features = header_.incompatible_features;
  }
  return s;
}

}  // namespace dmcow
