#include "l2_cache.h"

#include <algorithm>

#include "util.h"

namespace dmcow {

TableCache::TableCache(File* file, size_t slice_bytes, size_t capacity_bytes)
    : file_(file), slice_bytes_(slice_bytes), capacity_slices_(std::max<size_t>(4, capacity_bytes / slice_bytes)) {}

Status TableCache::Get(uint64_t slice_offset, const char* what, Slice* slice) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = index_.find(slice_offset);
    if (it != index_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second);
      *slice = it->second->second;
      return Status::OK();
    }
  }
  // Read without the lock so other threads' hits are not delayed by I/O; two
  // threads missing on the same slice both read it, harmlessly.
  std::vector<uint8_t> raw(slice_bytes_);
  DMCOW_RETURN_IF_ERROR(file_->ReadExact(slice_offset, raw.size(), raw.data(), what));
  auto decoded = std::make_shared<std::vector<uint64_t>>(slice_bytes_ / 8);
  for (size_t i = 0; i < decoded->size(); i++) (*decoded)[i] = LoadBE64(&raw[i * 8]);

  std::lock_guard<std::mutex> lock(mu_);
  auto it = index_.find(slice_offset);
  if (it != index_.end()) {
    *slice = it->second->second;
    return Status::OK();
  }
  lru_.emplace_front(slice_offset, decoded);
  index_[slice_offset] = lru_.begin();
  if (lru_.size() > capacity_slices_) {
    index_.erase(lru_.back().first);
    lru_.pop_back();
  }
  *slice = std::move(decoded);
  return Status::OK();
}

}  // namespace dmcow
