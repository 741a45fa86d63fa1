// Qcow1Image: reads legacy qcow (version 1) images: two-level tables of
// plain 64-bit offsets, deflate-compressed clusters, backing files. The
// format has no refcounts and no zero clusters.
#ifndef DMCOW_QCOW_QCOW1_IMAGE_H_
#define DMCOW_QCOW_QCOW1_IMAGE_H_

#include <memory>
#include <vector>

#include "table_image.h"
#include "l2_cache.h"

namespace dmcow {

class Qcow1Image final : public TableImage {
 public:
  static Status Open(std::unique_ptr<File> file, const OpenOptions& options, std::unique_ptr<Image>* image);


 private:
  explicit Qcow1Image(std::unique_ptr<File> file) : TableImage(std::move(file)) {}

  Status Lookup(uint64_t offset, uint64_t max_len, Mapping* m) override;

  uint32_t shift() const { return cluster_bits_ + l2_bits_; }

  uint32_t cluster_bits_ = 0;
  uint32_t l2_bits_ = 0;
  std::vector<uint64_t> l1_;
  std::unique_ptr<TableCache> l2_cache_;
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_QCOW1_IMAGE_H_
