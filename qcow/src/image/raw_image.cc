#include "image/raw_image.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace dmcow {

Status RawImage::Open(std::unique_ptr<File> file, bool writable, std::unique_ptr<Image>* image) {
  std::unique_ptr<RawImage> raw(new RawImage(std::move(file)));
  raw->writable_ = writable;
  raw->info_.format = "raw";
  uint64_t file_size = 0;
  DMCOW_RETURN_IF_ERROR(raw->file_->Size(&file_size));
  // QEMU sizes block devices in 512-byte sectors: a raw file's tail is
  // rounded up and reads as zeros. Matching it keeps sizes, maps and
  // conversions identical to qemu-img's.
  raw->info_.virtual_size = (file_size + 511) & ~uint64_t{511};
  *image = std::move(raw);
  return Status::OK();
}

Status RawImage::Read(uint64_t offset, void* buf, size_t len) {
  DMCOW_RETURN_IF_ERROR(CheckGuestRange(offset, len));
  size_t got = 0;
  DMCOW_RETURN_IF_ERROR(file_->Read(offset, len, buf, &got));
  // The file may shrink under us; what is gone reads as zeros, as in QEMU.
  std::memset(static_cast<uint8_t*>(buf) + got, 0, len - got);
  return Status::OK();
}

Status RawImage::GetLayerStatus(uint64_t offset, uint64_t max_len, LayerExtent* out) {
  DMCOW_RETURN_IF_ERROR(CheckGuestRange(offset, 1));
  uint64_t len = std::min(max_len, info_.virtual_size - offset);
  bool is_data = true;
  DMCOW_RETURN_IF_ERROR(file_->GetAllocation(offset, len, &is_data, &len));
  out->length = len;
  out->state = is_data ? ClusterState::kData : ClusterState::kZero;
  out->has_host_offset = true;
  out->host_offset = offset;
  return Status::OK();
}

Status RawImage::Write(uint64_t offset, const void* buf, size_t len) {
  if (!writable_) return Image::Write(offset, buf, len);
  DMCOW_RETURN_IF_ERROR(CheckGuestRange(offset, len));
  return file_->Write(offset, buf, len);
}

Status RawImage::WriteZeroes(uint64_t offset, uint64_t len) {
  if (!writable_) return Image::WriteZeroes(offset, len);
  DMCOW_RETURN_IF_ERROR(CheckGuestRange(offset, len));
  return file_->WriteZeroes(offset, len);  // the blocks stay allocated
}

Status RawImage::WriteZeroesMayUnmap(uint64_t offset, uint64_t len) {
  if (!writable_) return Image::WriteZeroes(offset, len);
  DMCOW_RETURN_IF_ERROR(CheckGuestRange(offset, len));
  // A hole where the file system can make one: zeroing 1 TiB of a sparse
  // target must not write (or reserve) 1 TiB.
  return file_->Deallocate(offset, len);
}

Status RawImage::Discard(uint64_t offset, uint64_t len) {
  if (!writable_) return Image::Discard(offset, len);
  return CheckGuestRange(offset, len);  // advisory; raw content stays as it is
}

Status RawImage::Grow(uint64_t new_size) {
  if (!writable_) return Image::Grow(new_size);
  if (new_size < info_.virtual_size) return Status::NotSupported(filename() + ": shrinking an image is not supported");
  uint64_t file_size = 0;
  DMCOW_RETURN_IF_ERROR(file_->Size(&file_size));
  if (new_size > file_size) {
    DMCOW_RETURN_IF_ERROR(file_->Truncate(new_size));
    DMCOW_RETURN_IF_ERROR(file_->Sync());
  }
  info_.virtual_size = (new_size + 511) & ~uint64_t{511};
  return Status::OK();
}

Status RawImage::Shrink(uint64_t new_size) {
  if (!writable_) return Image::Shrink(new_size);
  if (new_size > info_.virtual_size) return Status::NotSupported(filename() + ": shrinking to a larger size");
  DMCOW_RETURN_IF_ERROR(file_->Truncate(new_size));
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  info_.virtual_size = (new_size + 511) & ~uint64_t{511};
  return Status::OK();
}

Status RawImage::Preallocate(uint64_t offset, uint64_t len, Preallocation mode) {
  if (!writable_) return Image::Preallocate(offset, len, mode);
  // QEMU's words (raw_co_truncate).
  if (mode == Preallocation::kMetadata) return Status::NotSupported("Unsupported preallocation mode: metadata");
  DMCOW_RETURN_IF_ERROR(CheckGuestRange(offset, len));
  const bool write_zeroes = mode == Preallocation::kFull;
  // full: zeros written (or, where the file system can, blocks allocated
  // as zeros: the same reads and the same space).
  if (!write_zeroes) {
    Status s = file_->Allocate(offset, len);
    if (s.IsNotSupported()) return Status::OK();  // stays sparse, as in QEMU (File::Allocate)
    DMCOW_RETURN_IF_ERROR(s);
    return file_->Sync();
  }
  // full: zeros really written, as QEMU writes them, so block status sees
  // data there (an unwritten extent from fallocate reads as a hole).
  DMCOW_RETURN_IF_ERROR(file_->WriteZeroBytes(offset, len));
  return file_->Sync();
}

Status RawImage::Flush() { return writable_ ? file_->Sync() : Status::OK(); }

}  // namespace dmcow
