// Growing a qcow2 image's virtual size (qemu's qcow2_co_truncate with
// preallocation off, for a larger size), following the METADATA ORDERING
// rules at the top of qcow2_write.cc:
//  - a larger L1 table is written, with its refcounts, and made durable
//    before the header points at it; the old table is freed only after the
//    header no longer does (rules 1, 3, 4);
//  - the new size is written last: a crash before it leaves the old size
//    with a larger L1 table, which is valid.
// New clusters read as unallocated. Where the image has a backing file
// longer than the old size, the new range is zeroed, as QEMU does, so it
// does not start showing the backing file's content.
#include <algorithm>
#include <vector>

#include "qcow2/qcow2_image.h"
#include "util.h"

namespace dmcow {

using namespace qcow2;

Status Qcow2Image::Grow(uint64_t new_size) {
  if (!writable_) return Image::Grow(new_size);
  const std::string& name = filename();
  const uint64_t old_size = info_.virtual_size;
  if (new_size == old_size) return Status::OK();
  if (new_size < old_size) return Status::NotSupported(name + ": shrinking an image is not supported");
  if (new_size % 512 != 0) return Status::InvalidArgument(name + ": the new size must be a multiple of 512");
  if (new_size > static_cast<uint64_t>(INT64_MAX)) return Status::InvalidArgument(name + ": the new size is too large");
  if (!info_.snapshots.empty()) return Status::NotSupported(name + ": can't resize an image which has snapshots");
  if (DivRoundUp(new_size, header_.cluster_size * header_.l2_entries) > kMaxL1Bytes / 8) {
    return Status::InvalidArgument(name + ": the new size needs too large an L1 table");
  }
  return WriteStep([&]() REQUIRES(rw_mu_) { return GrowLocked(new_size); });
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
    std::vector<uint8_t> raw(clusters * cs, 0);
    for (uint64_t i = 0; i < l1_.size(); i++) StoreBE64(&raw[i * 8], l1_[i]);
    DMCOW_RETURN_IF_ERROR(overlap_->CheckWrite(fresh, raw.size(), 0, "L1 table write"));
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
  uint8_t size_field[8];
  StoreBE64(size_field, new_size);
  DMCOW_RETURN_IF_ERROR(file_->Write(24, size_field, sizeof(size_field)));
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  header_.size = new_size;
  info_.virtual_size = new_size;

  if (backing_ && backing_->virtual_size() > old_size) {
    DMCOW_RETURN_IF_ERROR(ZeroLocked(old_size, std::min(new_size, backing_->virtual_size()) - old_size, false));
  }
  return FlushLocked();
}

}  // namespace dmcow
