// Resizing a qcow2 image (qemu's qcow2_co_truncate, preallocation off),
// following the METADATA ORDERING rules at the top of qcow2_write.cc.
//
// Growing:
//  - a larger L1 table is written, with its refcounts, and made durable
//    before the header points at it; the old table is freed only after the
//    header no longer does (rules 1, 3, 4);
//  - the new size is written last: a crash before it leaves the old size
//    with a larger L1 table, which is valid.
// Persistent bitmaps kept valid by the open (metadata_only) are resized in
// the same header write as the size (ResizeBitmapsLocked,
// qcow2_bitmap_change.cc), so QEMU never sees a table of the wrong size.
// New clusters read as unallocated. Where the image has a backing file
// longer than the old size, the new range is zeroed, as QEMU does, so it
// does not start showing the backing file's content.
//
// Shrinking (--shrink):
//  - the new size is written first, durable: from then on nothing past it
//    can be read, and what still hangs off the tables there is merely
//    unreachable (refcounts still match the tables: the image is valid);
//  - the clusters past the new end are then unlinked (L2 entries cleared,
//    whole L2 tables dropped from the L1 table, whose size stays as QEMU
//    keeps it) and freed only once the tables are durable (rules 1 and 3);
//  - refcount blocks left counting nothing are unlinked
//    (Qcow2Refcounts::DropUnusedBlocks);
//  - last, the file is cut after its last cluster in use, and an external
//    data file to the new size: a crash before leaves free space only.
#include <algorithm>
#include <vector>

#include "qcow2/qcow2_image.h"
#include "util.h"

namespace dmcow {

using namespace qcow2;

Status Qcow2Image::CheckResize(uint64_t new_size) const {
  const std::string& name = filename();
  if (new_size % 512 != 0) return Status::InvalidArgument(name + ": The new size must be a multiple of 512");
  if (new_size > static_cast<uint64_t>(INT64_MAX)) return Status::InvalidArgument(name + ": the new size is too large");
  if (!info_.snapshots.empty() && header_.version < 3) {
    return Status::NotSupported(name + ": Can't resize a v2 image which has snapshots");
  }
  return Status::OK();
}

Status Qcow2Image::Grow(uint64_t new_size) {
  if (!writable_) return Image::Grow(new_size);
  const uint64_t old_size = info_.virtual_size;
  if (new_size == old_size) return Status::OK();
  if (new_size < old_size) return Status::NotSupported(filename() + ": Grow cannot shrink an image");
  DMCOW_RETURN_IF_ERROR(CheckResize(new_size));
  DMCOW_RETURN_IF_ERROR(CheckBitmapsResizable(new_size));
  if (DivRoundUp(new_size, header_.cluster_size * header_.l2_entries) > kMaxL1Bytes / 8) {
    // QEMU's words (qcow2_grow_l1_table: -EFBIG past QCOW_MAX_L1_SIZE).
    return Status::InvalidArgument(filename() + ": Failed to grow the L1 table: File too large");
  }
  return WriteStep([&]() REQUIRES(rw_mu_) { return GrowLocked(new_size); });
}

Status Qcow2Image::Shrink(uint64_t new_size) {
  if (!writable_) return Image::Shrink(new_size);
  if (new_size == info_.virtual_size) return Status::OK();
  if (new_size > info_.virtual_size) return Status::NotSupported(filename() + ": Shrink cannot grow an image");
  DMCOW_RETURN_IF_ERROR(CheckResize(new_size));
  DMCOW_RETURN_IF_ERROR(CheckBitmapsResizable(new_size));
  return WriteStep([&]() REQUIRES(rw_mu_) { return ShrinkLocked(new_size); });
}

Status Qcow2Image::ShrinkLocked(uint64_t new_size) {
  DMCOW_RETURN_IF_ERROR(FlushLocked());
  const uint64_t cs = header_.cluster_size;
  const uint64_t old_clusters = DivRoundUp(info_.virtual_size, cs);
  const uint64_t first_gone = DivRoundUp(new_size, cs);  // first guest cluster dropped
  // Every table offset checked before anything changes.
  for (uint64_t i = 0; i < l1_.size(); i++) {
    uint64_t l2_offset = 0;
    DMCOW_RETURN_IF_ERROR(L2TableOffset(i, &l2_offset));
  }
  DMCOW_RETURN_IF_ERROR(WriteVirtualSize(new_size));

  for (uint64_t i = first_gone / header_.l2_entries; i < l1_.size(); i++) {
    uint64_t l2_offset = 0;
    DMCOW_RETURN_IF_ERROR(L2TableOffset(i, &l2_offset));
    if (l2_offset == 0) continue;
    const uint64_t first = i * header_.l2_entries;
    const uint64_t end = std::min(first + header_.l2_entries, std::max(old_clusters, first));
    if (first >= first_gone) {
      // The whole table is past the end: dropped, with every cluster it maps.
      DMCOW_RETURN_IF_ERROR(DropL2TableLocked(i, l2_offset, end - first));
      continue;
    }
    for (uint64_t cluster = first_gone; cluster < end; cluster++) {
      uint64_t entry, bitmap;
      DMCOW_RETURN_IF_ERROR(GetL2Entry(cluster, &entry, &bitmap));
      if (entry == 0 && bitmap == 0) continue;
      DMCOW_RETURN_IF_ERROR(SetL2Entry(cluster, 0, 0));
      ReleaseClusterOf(entry);
      DMCOW_RETURN_IF_ERROR(MaybeFlush());
    }
  }
  DMCOW_RETURN_IF_ERROR(FlushLocked());  // tables, then the frees
  DMCOW_RETURN_IF_ERROR(refcounts_->DropUnusedBlocks());

  // Cut the file after the last cluster still in use (qcow2_get_last_cluster).
  uint64_t file_size = 0;
  DMCOW_RETURN_IF_ERROR(file_->Size(&file_size));
  uint64_t last = DivRoundUp(file_size, cs);
  for (; last > 0; last--) {
    uint64_t refcount = 0;
    DMCOW_RETURN_IF_ERROR(refcounts_->Get(last - 1, &refcount));
    if (refcount != 0) break;
  }
  if (last * cs < file_size) {
    DMCOW_RETURN_IF_ERROR(file_->Truncate(last * cs));
    DMCOW_RETURN_IF_ERROR(file_->Sync());
  }
  if (header_.HasDataFile()) {
    uint64_t data_size = 0;
    DMCOW_RETURN_IF_ERROR(data_file()->Size(&data_size));
    if (data_size > new_size) {
      DMCOW_RETURN_IF_ERROR(data_file()->Truncate(new_size));
      DMCOW_RETURN_IF_ERROR(data_file()->Sync());
    }
  }
  return Status::OK();
}

Status Qcow2Image::WriteVirtualSize(uint64_t new_size) {
  if (BitmapsKept()) return ResizeBitmapsLocked(new_size);  // with the bitmaps, in one header write
  DMCOW_RETURN_IF_ERROR(DropMaintainedBitmapsLocked());     // in use already: their tables may stay as they are
  uint8_t size_field[8];
  StoreBE64(size_field, new_size);
  DMCOW_RETURN_IF_ERROR(file_->Write(24, size_field, sizeof(size_field)));
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  header_.size = new_size;
  info_.virtual_size = new_size;
  return Status::OK();
}

Status Qcow2Image::GrowLocked(uint64_t new_size) {
  const uint64_t old_size = info_.virtual_size;
  DMCOW_RETURN_IF_ERROR(FlushLocked());  // nothing pending refers to the old L1 table's place

  const uint64_t cs = header_.cluster_size;
  const uint64_t l1_needed = DivRoundUp(new_size, cs * header_.l2_entries);  // bounded by Grow
  if (l1_needed > l1_.size()) {
    const uint64_t bytes = l1_needed * 8;
    const uint64_t clusters = DivRoundUp(bytes, cs);
    uint64_t fresh;
    DMCOW_RETURN_IF_ERROR(refcounts_->Allocate(clusters, &fresh));
    // The table's bytes only, as QEMU writes them: a new table at the end
    // of the file leaves the file ending with it (the rest of its last
    // cluster reads as zeros), byte for byte what qemu-img resize makes.
    std::vector<uint8_t> raw(bytes, 0);
    for (uint64_t i = 0; i < l1_.size(); i++) StoreBE64(&raw[i * 8], l1_[i]);
    DMCOW_RETURN_IF_ERROR(overlap_->CheckWrite(fresh, clusters * cs, 0, "L1 table write"));
    DMCOW_RETURN_IF_ERROR(file_->Write(fresh, raw.data(), raw.size()));
    DMCOW_RETURN_IF_ERROR(file_->Sync());
    DMCOW_RETURN_IF_ERROR(refcounts_->Flush());
    uint8_t l1_fields[12];  // l1_size and l1_table_offset, one write
    StoreBE32(l1_fields, static_cast<uint32_t>(l1_needed));
    StoreBE64(l1_fields + 4, fresh);
    DMCOW_RETURN_IF_ERROR(file_->Write(36, l1_fields, sizeof(l1_fields)));
    DMCOW_RETURN_IF_ERROR(file_->Sync());
    if (header_.l1_table_offset != 0 && header_.l1_size != 0) {
      refcounts_->FreeLater(header_.l1_table_offset, uint64_t{header_.l1_size} * 8);
    }
    overlap_->Remove(header_.l1_table_offset, uint64_t{header_.l1_size} * 8, Qcow2Metadata::kActiveL1);
    overlap_->Add(fresh, bytes, Qcow2Metadata::kActiveL1);
    header_.l1_table_offset = fresh;
    header_.l1_size = static_cast<uint32_t>(l1_needed);
    l1_.Resize(l1_needed);
  }
  if (header_.HasDataFile()) {
    uint64_t data_size = 0;
    DMCOW_RETURN_IF_ERROR(data_file()->Size(&data_size));
    if (data_size < new_size) DMCOW_RETURN_IF_ERROR(data_file()->Truncate(new_size));
  }
  DMCOW_RETURN_IF_ERROR(WriteVirtualSize(new_size));

  if (backing_ && backing_->virtual_size() > old_size) {
    DMCOW_RETURN_IF_ERROR(ZeroLocked(old_size, std::min(new_size, backing_->virtual_size()) - old_size, false));
  }
  return FlushLocked();
}

}  // namespace dmcow
