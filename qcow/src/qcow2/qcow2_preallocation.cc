// Metadata preallocation, as QEMU detects it (qcow2_detect_metadata_
// preallocation, block/qcow2-refcount.c): when the image file holds clearly
// more clusters with a refcount than the storage really holds, the image is
// taken for metadata-preallocated, and block status then looks into the
// file under every data run: a hole there reads as zeros and is reported
// as "zero" (qemu-img map, compare -s; convert and checksum skip it). The
// same happens to an image copied with `cp --sparse=always`.
#include <algorithm>
#include <unordered_map>

#include "qcow2/check/qcow2_check_io.h"
#include "qcow2/qcow2_image.h"

namespace dmcow {

bool Qcow2Image::HostHolesReadAsZero() {
  std::call_once(preallocation_once_, [this] { metadata_preallocated_ = DetectMetadataPreallocation(); });
  return metadata_preallocated_;
}

bool Qcow2Image::DetectMetadataPreallocation() {
  // QEMU reports no host offset for encrypted data, so never recurses there.
  if (header_.crypt_method != 0) return false;
  uint64_t file_length = 0;
  if (!file_->Size(&file_length).ok()) return false;  // QEMU: an error is "not preallocated"
  const uint64_t real_clusters = file_->AllocatedBytes() / info_.cluster_size;
  const uint64_t threshold = std::max(real_clusters * 10 / 9, real_clusters + 2);
  const uint64_t end_cluster = (file_length + info_.cluster_size - 1) / info_.cluster_size;
  StoredRefcounts stored(file_.get(), header_.cluster_bits, header_.refcount_order);
  if (!stored.Load(header_.refcount_table_offset, uint64_t{header_.refcount_table_clusters} * info_.cluster_size / 8)
           .ok()) {
    return false;
  }
  // QEMU walks every cluster of the file; a refcount block absent from the
  // table counts nothing, and a block the table names twice (hostile) is
  // counted once and reused, so the work is bounded by the blocks really
  // stored, not by the file's length.
  const uint64_t per_block = stored.entries_per_block();
  const std::vector<uint64_t>& table = stored.table();
  std::unordered_map<uint64_t, uint64_t> nonzero_in_block;
  uint64_t counted = 0;
  for (uint64_t index = 0; index < table.size() && index * per_block < end_cluster && counted < threshold; index++) {
    const uint64_t block = table[index] & qcow2::kRefTableOffsetMask;
    if (block == 0) continue;
    const uint64_t first = index * per_block;
    const uint64_t n = std::min(per_block, end_cluster - first);
    auto cached = nonzero_in_block.find(block);
    if (n == per_block && cached != nonzero_in_block.end()) {
      counted += cached->second;
      continue;
    }
    uint64_t nonzero = 0;
    for (uint64_t i = 0; i < n; i++) {
      uint64_t refcount = 0;
      if (!stored.Get(first + i, &refcount)) return false;
      nonzero += refcount != 0;
    }
    if (n == per_block) nonzero_in_block[block] = nonzero;
    counted += nonzero;
  }
  return counted >= threshold;
}

}  // namespace dmcow
