// ImageBase: what every driver shares: its file, its info, its backing image
// and the rule for reading through to a backing image that may be shorter.
#ifndef DMCOW_QCOW_IMAGE_BASE_H_
#define DMCOW_QCOW_IMAGE_BASE_H_

#include <memory>
#include <string>

#include "dmcow/image.h"

namespace dmcow {

class ImageBase : public Image {
 public:
  const std::string& filename() const override { return file_->name(); }
  const ImageInfo& info() const override { return info_; }
  Image* backing() const override { return backing_.get(); }
  const std::string& data_filename() const override { return file_->name(); }
  uint64_t AllocatedFileBytes() const override { return file_->AllocatedBytes(); }

  void SetBacking(std::unique_ptr<Image> backing) { backing_ = std::move(backing); }

  // The second step of opening, run by OpenImage once the whole backing chain
  // has been resolved, so that a loop, a missing backing file or a chain too
  // deep costs no table memory: loads the tables the header sizes and
  // prepares a writable image. *chain_table_bytes is the memory the chain's
  // tables hold so far; the image adds its own, refusing to pass
  // options.max_chain_table_bytes.
  virtual Status LoadTables(const OpenOptions& options, uint64_t* chain_table_bytes) {
    (void)options;
    (void)chain_table_bytes;
    return Status::OK();
  }

 protected:
  explicit ImageBase(std::unique_ptr<File> file) : file_(std::move(file)) {}

  // Guest bytes of the layers below this one; zeros past the backing's end or
  // when there is no backing image.
  Status ReadBacking(uint64_t offset, void* buf, size_t len);

  // Rejects reads that leave the guest disk.
  Status CheckGuestRange(uint64_t offset, uint64_t len) const;
  // Rejects writes that leave the guest disk.
  Status CheckWriteRange(uint64_t offset, uint64_t len) const;

  std::unique_ptr<File> file_;
  ImageInfo info_;
  std::unique_ptr<Image> backing_;
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_IMAGE_BASE_H_
