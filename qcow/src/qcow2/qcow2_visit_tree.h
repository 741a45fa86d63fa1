// Qcow2Image::VisitTree, shared by the writers that walk whole trees
// (snapshots, and freeing bitmaps, which must leave every tree's clusters).
#ifndef DMCOW_QCOW_QCOW2_VISIT_TREE_H_
#define DMCOW_QCOW_QCOW2_VISIT_TREE_H_

#include "image/table_cache.h"
#include "qcow2/qcow2_image.h"
#include "util.h"

namespace dmcow {

template <typename Visit>
Status Qcow2Image::VisitTree(const std::vector<uint64_t>& l1, Visit&& visit) {
  using namespace qcow2;
  const uint64_t cs = header_.cluster_size;
  const uint64_t words_per_entry = header_.l2_entry_bytes / 8;
  const uint64_t slice_bytes = l2_cache_->slice_bytes();
  uint64_t file_size = 0;
  DMCOW_RETURN_IF_ERROR(file_->Size(&file_size));
  auto check = [&](uint64_t host, const char* what, uint64_t where) -> Status {
    if ((host & (cs - 1)) == 0 && host < file_size) return Status::OK();
    return Status::Corrupt(filename() + ": " + what + " offset " + Hex(host) + " (" + Hex(where) + ") is " +
                           ((host & (cs - 1)) ? "not cluster aligned" : "past the end of the file"));
  };
  for (uint64_t i = 0; i < l1.size(); i++) {
    const uint64_t l2 = l1[i] & kOffsetMask;
    if (l2 == 0) continue;
    DMCOW_RETURN_IF_ERROR(check(l2, "L2 table", i));
    for (uint64_t s = 0; s < cs; s += slice_bytes) {
      TableCache::Slice slice;
      DMCOW_RETURN_IF_ERROR(l2_cache_->Get(l2 + s, "L2 table", &slice));
      for (size_t w = 0; w < slice->size(); w += words_per_entry) {
        const uint64_t entry = (*slice)[w];
        if (entry & kCompressed) {
          const CompressedExtent c = DecodeCompressed(entry, header_.cluster_bits);
          const uint64_t start = c.offset & ~uint64_t{511};
          if (start >= file_size) {
            return Status::Corrupt(filename() + ": compressed cluster at " + Hex(start) +
                                   " is past the end of the file");
          }
          const uint64_t end = start + c.sectors * 512;
          for (uint64_t cluster = start / cs; cluster <= (end - 1) / cs; cluster++) {
            DMCOW_RETURN_IF_ERROR(visit(cluster, false));
          }
          continue;
        }
        const uint64_t host = entry & kOffsetMask;
        if (host == 0 || header_.HasDataFile()) continue;
        DMCOW_RETURN_IF_ERROR(check(host, "data cluster", l2 + s + w * 8));
        DMCOW_RETURN_IF_ERROR(visit(host / cs, false));
      }
    }
    DMCOW_RETURN_IF_ERROR(visit(l2 / cs, true));
  }
  return Status::OK();
}

}  // namespace dmcow

#endif  // DMCOW_QCOW_QCOW2_VISIT_TREE_H_
