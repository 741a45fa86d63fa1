// Preallocate: qemu-img resize --preallocation=metadata|falloc|full of a
// qcow2 image (qcow2_co_truncate). Every unallocated cluster of the range
// gets a host cluster that reads as zeros: past the end of the file the
// file is extended (metadata: a hole; falloc: reserved blocks; full: zeros
// written), a free cluster reused inside the file is zeroed first. The
// METADATA ORDERING rules of qcow2_write.cc apply as for a write: the
// zeros, the file's new length and the refcounts are durable before an L2
// entry names the cluster, so a crash leaves the range unallocated or
// allocated, reading zeros either way. A zero cluster without host space
// (a resize over a longer backing file zeroes its new range so) gets host
// space too, and keeps its zero flag in metadata mode, as in QEMU. Clusters
// already allocated are left as they are; so is a first cluster the range
// starts inside of while a backing file could show through its head.
//
// Metadata preallocation, as QEMU detects it (qcow2_detect_metadata_
// preallocation, block/qcow2-refcount.c): when the image file holds clearly
// more clusters with a refcount than the storage really holds, the image is
// taken for metadata-preallocated, and block status then looks into the
// file under every data run: a hole there reads as zeros and is reported
// as "zero" (qemu-img map, compare -s; convert and checksum skip it). The
// same happens to an image copied with `cp --sparse=always`.
#include <algorithm>
#include <unordered_map>
#include <vector>

#include "qcow2/check/qcow2_check_io.h"
#include "qcow2/qcow2_image.h"

namespace dmcow {

using namespace qcow2;

Status Qcow2Image::Preallocate(uint64_t offset, uint64_t len, Preallocation mode) {
  if (!writable_) return Image::Preallocate(offset, len, mode);
  uint64_t end;
  if (!CheckedAdd(offset, len, &end) || end > info_.virtual_size) {
    return Status::InvalidArgument(filename() + ": preallocation past the virtual size");
  }
  return WriteStep([&]() REQUIRES(rw_mu_) { return PreallocateLocked(offset, len, mode); });
}

Status Qcow2Image::PreallocateLocked(uint64_t offset, uint64_t len, Preallocation mode) {
  const uint64_t cs = header_.cluster_size;
  DMCOW_RETURN_IF_ERROR(FlushLocked());
  uint64_t cluster = (backing_ ? offset + cs - 1 : offset) / cs;
  const uint64_t end_cluster = DivRoundUp(offset + len, cs);
  // Clusters with no host space that read as zeros: unallocated, or (over
  // a backing file, which a resize zeroes so) zero clusters.
  auto wanted = [&](uint64_t entry, uint64_t bitmap) { return bitmap == 0 && (entry == 0 || entry == kZeroFlag); };
  while (cluster < end_cluster) {
    uint64_t entry, bitmap;
    DMCOW_RETURN_IF_ERROR(GetL2Entry(cluster, &entry, &bitmap));
    if (!wanted(entry, bitmap)) {
      cluster++;
      continue;
    }
    // A run of them inside one L2 table, all of the same kind.
    const uint64_t kind = entry;
    uint64_t count = 1;
    while (count < kMaxRunClusters && cluster + count < end_cluster && (cluster + count) % header_.l2_entries != 0) {
      DMCOW_RETURN_IF_ERROR(GetL2Entry(cluster + count, &entry, &bitmap));
      if (entry != kind || bitmap != 0) break;
      count++;
    }
    uint64_t host = 0;
    DMCOW_RETURN_IF_ERROR(PreallocateRunLocked(cluster, count, mode, &host));
    // As QEMU: a zero cluster preallocated as metadata stays a zero cluster
    // (flag and host space); with extended L2 entries the subclusters stay
    // unallocated (the bitmap 0) under the host cluster.
    const uint64_t flags = kCopied | (kind == kZeroFlag && mode == Preallocation::kMetadata ? kZeroFlag : 0);
    for (uint64_t i = 0; i < count; i++) {
      DMCOW_RETURN_IF_ERROR(SetL2Entry(cluster + i, (host + i * cs) | flags, 0));
    }
    DMCOW_RETURN_IF_ERROR(MaybeFlush());
    cluster += count;
  }
  return FlushLocked();
}

Status Qcow2Image::PreallocateRunLocked(uint64_t cluster, uint64_t count, Preallocation mode, uint64_t* host) {
  const uint64_t cs = header_.cluster_size;
  if (header_.HasDataFile()) {
    *host = cluster * cs;  // external data files map guest offsets 1:1
  } else {
    DMCOW_RETURN_IF_ERROR(refcounts_->Allocate(count, host));
  }
  const uint64_t bytes = count * cs;
  DMCOW_RETURN_IF_ERROR(CheckDataWrite(*host, bytes, "preallocation"));
  File* data = data_file();
  uint64_t file_size = 0;
  DMCOW_RETURN_IF_ERROR(data->Size(&file_size));
  const uint64_t end = *host + bytes;
  // Inside the file (a free cluster reused, an external data file's range):
  // zeros, as holes (metadata), reserved blocks (falloc) or written (full).
  const uint64_t inside_end = std::min(end, std::max(file_size, *host));
  if (inside_end > *host) {
    const uint64_t n = inside_end - *host;
    if (mode == Preallocation::kMetadata) DMCOW_RETURN_IF_ERROR(data->Deallocate(*host, n));
    if (mode == Preallocation::kFalloc) DMCOW_RETURN_IF_ERROR(data->WriteZeroes(*host, n));
    if (mode == Preallocation::kFull) DMCOW_RETURN_IF_ERROR(data->WriteZeroBytes(*host, n));
  }
  if (end <= inside_end) return Status::OK();
  // Past the end: the file grows by a hole (metadata), reserved blocks
  // (falloc; where the file system cannot, a hole, as in QEMU) or zeros.
  const uint64_t from = inside_end;
  if (mode == Preallocation::kFull) return data->WriteZeroBytes(from, end - from);
  if (mode == Preallocation::kFalloc) {
    const Status s = data->Allocate(from, end - from);
    if (!s.IsNotSupported()) DMCOW_RETURN_IF_ERROR(s);
  }
  uint64_t now = 0;
  DMCOW_RETURN_IF_ERROR(data->Size(&now));
  if (now < end) DMCOW_RETURN_IF_ERROR(data->Truncate(end));
  return Status::OK();
}

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
