// RawImage: a plain file or block device; the guest sees its bytes as they are.
#ifndef DMCOW_QCOW_RAW_IMAGE_H_
#define DMCOW_QCOW_RAW_IMAGE_H_

#include "image/image_base.h"

namespace dmcow {

class RawImage final : public ImageBase {
 public:
  static Status Open(std::unique_ptr<File> file, bool writable, std::unique_ptr<Image>* image);

  Status Read(uint64_t offset, void* buf, size_t len) override;
  Status GetLayerStatus(uint64_t offset, uint64_t max_len, LayerExtent* out) override;

  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status WriteZeroes(uint64_t offset, uint64_t len) override;
  Status WriteZeroesMayUnmap(uint64_t offset, uint64_t len) override;
  Status Discard(uint64_t offset, uint64_t len) override;
  Status Flush() override;
  Status Grow(uint64_t new_size) override;
  Status Shrink(uint64_t new_size) override;
  Status Preallocate(uint64_t offset, uint64_t len, Preallocation mode) override;

 private:
  using ImageBase::ImageBase;

  bool writable_ = false;
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_RAW_IMAGE_H_
