#include "image/image_base.h"

#include <algorithm>
#include <cstring>

#include "qcow2/qcow2_bitmaps.h"
#include "util.h"

namespace dmcow {

Status ImageBase::ReadBacking(uint64_t offset, void* buf, size_t len) {
  auto* out = static_cast<uint8_t*>(buf);
  size_t from_backing = 0;
  if (backing_ && offset < backing_->virtual_size()) {
    from_backing = static_cast<size_t>(std::min<uint64_t>(len, backing_->virtual_size() - offset));
    DMCOW_RETURN_IF_ERROR(backing_->Read(offset, out, from_backing));
  }
  std::memset(out + from_backing, 0, len - from_backing);
  return Status::OK();
}

Status Image::Write(uint64_t, const void*, size_t) {
  return Status::NotSupported(filename() + ": image is not open for writing");
}
Status Image::WriteZeroes(uint64_t, uint64_t) {
  return Status::NotSupported(filename() + ": image is not open for writing");
}
Status Image::Discard(uint64_t, uint64_t) {
  return Status::NotSupported(filename() + ": image is not open for writing");
}
Status Image::WriteCompressedCluster(uint64_t, const void*, size_t) {
  return Status::NotSupported(filename() + ": image cannot hold compressed clusters (or is not open for writing)");
}
Status Image::Flush() { return Status::OK(); }
Status Image::Grow(uint64_t) {
  return Status::NotSupported(filename() + ": growing an image is not supported for this format (" + info().format +
                              ") or the image is not open for writing");
}
Status Image::Shrink(uint64_t) {
  return Status::NotSupported(filename() + ": shrinking an image is not supported for this format (" + info().format +
                              ") or the image is not open for writing");
}
Status Image::Preallocate(uint64_t, uint64_t, Preallocation) {
  return Status::NotSupported(filename() + ": preallocation is not supported for this format (" + info().format +
                              ") or the image is not open for writing");
}
Status Image::CreateSnapshot(SnapshotInfo*) {
  return Status::NotSupported(filename() + ": the format has no internal snapshots");
}

Status Image::DeleteSnapshot(const std::string&) {
  return Status::NotSupported(filename() + ": the format has no internal snapshots");
}

Status Image::ApplySnapshot(const std::string&) {
  return Status::NotSupported(filename() + ": the format has no internal snapshots");
}

const SnapshotInfo* FindSnapshot(const std::vector<SnapshotInfo>& snapshots, const std::string& id_or_name) {
  for (const SnapshotInfo& s : snapshots) {
    if (s.id == id_or_name) return &s;
  }
  for (const SnapshotInfo& s : snapshots) {
    if (s.name == id_or_name) return &s;
  }
  return nullptr;
}

namespace {
Status AmendNotSupported(const Image& image) {
  return Status::NotSupported(image.filename() + ": amending is not supported for this format (" + image.info().format +
                              ") or the image is not open for writing");
}
}  // namespace
Status Image::ChangeVersion(uint32_t, const AmendProgress&) { return AmendNotSupported(*this); }
Status Image::ChangeRefcountBits(uint32_t, const AmendProgress&) { return AmendNotSupported(*this); }
Status Image::SetLazyRefcounts(bool) { return AmendNotSupported(*this); }
Status Image::ChangeKeySlots(const KeySlotChange&) { return AmendNotSupported(*this); }

// Formats without persistent bitmaps: QEMU's answers (an add is refused by
// the format, any other action finds no bitmap).
Status Image::ChangeBitmap(const std::string& name, const std::vector<BitmapAction>& actions, size_t* failed) {
  if (failed) *failed = 0;
  if (actions.empty()) return Status::OK();
  if (actions[0].kind == BitmapAction::Kind::kAdd) {
    DMCOW_RETURN_IF_ERROR(CheckBitmapAddRequest(filename(), name, actions[0].granularity));
    return Status::NotSupported(filename() + ": Can't store persistent bitmaps to " + filename() +
                                ": Operation not supported");
  }
  return Status::NotFound(filename() + ": Dirty bitmap '" + name + "' not found");
}

Status Image::ChangeBackingFile(const std::string&, const std::string&) {
  return Status::NotSupported(filename() + ": changing the backing file is not supported for this format (" +
                              info().format + ") or the image is not open for writing");
}
Status Image::MakeEmpty() {
  return Status::NotSupported(filename() + ": emptying an image is not supported for this format (" + info().format +
                              ") or the image is not open for writing");
}

Status ImageBase::CheckWriteRange(uint64_t offset, uint64_t len) const {
  uint64_t end;
  if (!CheckedAdd(offset, len, &end) || end > info_.virtual_size) {
    return Status::InvalidArgument(filename() + ": write of " + std::to_string(len) + " bytes at offset " +
                                   Hex(offset) + " goes past the virtual size");
  }
  return Status::OK();
}

Status ImageBase::CheckGuestRange(uint64_t offset, uint64_t len) const {
  uint64_t end;
  if (!CheckedAdd(offset, len, &end) || end > info_.virtual_size) {
    return Status::InvalidArgument(filename() + ": read of " + std::to_string(len) + " bytes at offset " + Hex(offset) +
                                   " goes past the virtual size " + std::to_string(info_.virtual_size));
  }
  return Status::OK();
}

}  // namespace dmcow
