// Freeing the clusters of persistent bitmaps that left the directory
// (bitmap --remove, a rewritten bitmap's old bits, a resize, a downgrade).
//
// The tables being freed come from the image and are not trusted: an entry
// may name a cluster twice, another bitmap's cluster, an L2 table, a data
// cluster of any tree, the header or a refcount block. Freeing such a
// cluster would let the allocator hand it out again while something still
// uses it, and the next write there destroys guest data or metadata. So:
//  (F1) a cluster is freed at most once, whatever number of entries name it;
//  (F2) nothing still reachable is freed: not a cluster of the bitmaps the
//       header now names (their tables, bits and directory, freshly written
//       ones included), not a structure of the overlap map other than a
//       bitmap's, not an L2 table or data cluster of the active tree or of any
//       snapshot's tree;
//  (F3) only clusters inside the file, cluster aligned, with a refcount
//       above 0 are freed.
// A cluster a hostile table names wrongly is therefore leaked, at worst,
// and `check -r leaks` takes it back. The frees wait for the next flush, like
// every free (rule 4 of qcow2_write.cc).
#include <algorithm>
#include <vector>

#include "qcow2/qcow2_bitmaps.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/qcow2_metadata_tables.h"
#include "qcow2/qcow2_visit_tree.h"
#include "util.h"

namespace dmcow {

using namespace qcow2;

namespace {

// Sorted, without duplicates.
void SortUnique(std::vector<uint64_t>* clusters) {
  std::sort(clusters->begin(), clusters->end());
  clusters->erase(std::unique(clusters->begin(), clusters->end()), clusters->end());
}

// Collects clusters, keeping memory in proportion to distinct ones: a
// table may name one cluster millions of times.
class ClusterSet {
 public:
  ClusterSet(uint64_t cluster_size, uint64_t file_size) : cluster_size_(cluster_size), file_size_(file_size) {}

  // Every cluster of [offset, offset + bytes) if all of it lies in the file
  // and `offset` is cluster aligned; nothing otherwise (F3).
  void AddRange(uint64_t offset, uint64_t bytes) {
    if (offset == 0 || bytes == 0 || (offset & (cluster_size_ - 1)) || offset >= file_size_ ||
        bytes > file_size_ - offset) {
      return;
    }
    for (uint64_t c = offset / cluster_size_; c < DivRoundUp(offset + bytes, cluster_size_); c++) {
      clusters_.push_back(c);
    }
    if (clusters_.size() > 2 * unique_after_last_sort_ + (1 << 20)) {
      SortUnique(&clusters_);
      unique_after_last_sort_ = clusters_.size();
    }
  }

  // A bitmap's table clusters and the data clusters its entries name.
  Status AddBitmap(File* file, const Qcow2Bitmap& b) {
    const uint64_t table_bytes = uint64_t{b.table_entries} * 8;
    if ((b.table_offset & (cluster_size_ - 1)) || b.table_offset >= file_size_ ||
        table_bytes > file_size_ - b.table_offset) {
      return Status::OK();
    }
    constexpr uint64_t kEntriesPerRead = 1 << 17;  // 1 MiB
    std::vector<uint8_t> raw;
    for (uint64_t first = 0; first < b.table_entries; first += kEntriesPerRead) {
      const uint64_t n = std::min<uint64_t>(kEntriesPerRead, b.table_entries - first);
      raw.resize(n * 8);
      DMCOW_RETURN_IF_ERROR(file->ReadExact(b.table_offset + first * 8, raw.size(), raw.data(), "bitmap table"));
      for (uint64_t i = 0; i < n; i++) AddRange(LoadBE64(&raw[i * 8]) & kOffsetMask, cluster_size_);
    }
    AddRange(b.table_offset, table_bytes);
    return Status::OK();
  }

  std::vector<uint64_t> Take() {
    SortUnique(&clusters_);
    return std::move(clusters_);
  }

 private:
  const uint64_t cluster_size_;
  const uint64_t file_size_;
  std::vector<uint64_t> clusters_;
  size_t unique_after_last_sort_ = 0;
};

bool Contains(const std::vector<uint64_t>& sorted, uint64_t cluster) {
  return std::binary_search(sorted.begin(), sorted.end(), cluster);
}

}  // namespace

Status Qcow2Image::FreeBitmapClustersLocked(const std::vector<Qcow2Bitmap>& bitmaps, uint64_t directory_offset,
                                            uint64_t directory_bytes) {
  const uint64_t cs = header_.cluster_size;
  uint64_t file_size = 0;
  DMCOW_RETURN_IF_ERROR(file_->Size(&file_size));
  ClusterSet gone(cs, file_size);
  for (const Qcow2Bitmap& b : bitmaps) DMCOW_RETURN_IF_ERROR(gone.AddBitmap(file_.get(), b));
  gone.AddRange(directory_offset, directory_bytes);
  std::vector<uint64_t> candidates = gone.Take();  // (F1)
  if (candidates.empty()) return Status::OK();

  // (F2) What the header names now.
  std::vector<Qcow2Bitmap> current;
  DMCOW_RETURN_IF_ERROR(ReadQcow2BitmapDirectory(file_.get(), header_, &current));
  ClusterSet kept_set(cs, file_size);
  for (const Qcow2Bitmap& b : current) DMCOW_RETURN_IF_ERROR(kept_set.AddBitmap(file_.get(), b));
  if (!current.empty()) kept_set.AddRange(header_.bitmap_directory_offset, header_.bitmap_directory_size);
  const std::vector<uint64_t> kept = kept_set.Take();
  std::vector<bool> reachable(candidates.size(), false);
  auto mark = [&](uint64_t cluster) {
    const auto it = std::lower_bound(candidates.begin(), candidates.end(), cluster);
    if (it != candidates.end() && *it == cluster) reachable[it - candidates.begin()] = true;
  };
  const uint32_t bitmap_kinds =
      Qcow2MetadataBit(Qcow2Metadata::kBitmapDirectory) | Qcow2MetadataBit(Qcow2Metadata::kBitmapTable);
  for (size_t i = 0; i < candidates.size(); i++) {
    uint64_t hit = 0;
    Qcow2Metadata kind;
    if (Contains(kept, candidates[i]) || overlap_->map().Find(candidates[i], 1, bitmap_kinds, &hit, &kind)) {
      reachable[i] = true;
    }
  }
  std::vector<std::vector<uint64_t>> trees{ActiveL1Entries()};
  std::vector<SnapshotInfo> snapshots;
  DMCOW_RETURN_IF_ERROR(ReadQcow2Snapshots(file_.get(), header_, &snapshots));
  header_.file_size = file_size;
  for (const SnapshotInfo& s : snapshots) {
    DMCOW_RETURN_IF_ERROR(ValidateL1Table(header_, filename(), "snapshot L1 table", s.l1_table_offset, s.l1_size, 0));
    trees.emplace_back();
    DMCOW_RETURN_IF_ERROR(ReadL1Entries(s.l1_table_offset, s.l1_size, &trees.back()));
  }
  for (const std::vector<uint64_t>& l1 : trees) {
    const Status walked = VisitTree(l1, [&](uint64_t cluster, bool) {
      mark(cluster);
      return Status::OK();
    });
    // The header no longer names these bitmaps: a tree too damaged to walk
    // leaves their clusters leaked, which is safe, rather than failing an
    // operation already made.
    if (walked.IsCorrupt()) return Status::OK();
    DMCOW_RETURN_IF_ERROR(walked);
  }

  for (size_t i = 0; i < candidates.size(); i++) {
    if (reachable[i]) continue;
    uint64_t refs = 0;
    DMCOW_RETURN_IF_ERROR(refcounts_->Get(candidates[i], &refs));
    if (refs > 0) refcounts_->FreeLater(candidates[i] * cs, cs);  // (F3)
  }
  return Status::OK();
}

}  // namespace dmcow
