#include "image/table_cache.h"

#include <algorithm>

#include "util.h"

namespace dmcow {

TableCache::TableCache(File* file, size_t slice_bytes, size_t capacity_bytes)
    : file_(file), slice_bytes_(slice_bytes), capacity_slices_(std::max<size_t>(4, capacity_bytes / slice_bytes)) {}

Status TableCache::Get(uint64_t slice_offset, const char* what, Slice* slice) {
  {
    MutexLock lock(&mu_);
    auto it = index_.find(slice_offset);
    if (it != index_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second);
      *slice = it->second->slice;
      return Status::OK();
    }
  }
  // Read without the lock so other threads' hits are not delayed by I/O; two
  // threads missing on the same slice both read it, harmlessly.
  std::vector<uint8_t> raw(slice_bytes_);
  DMCOW_RETURN_IF_ERROR(file_->ReadExact(slice_offset, raw.size(), raw.data(), what));
  auto decoded = std::make_shared<std::vector<uint64_t>>(slice_bytes_ / 8);
  for (size_t i = 0; i < decoded->size(); i++) (*decoded)[i] = LoadBE64(&raw[i * 8]);

  MutexLock lock(&mu_);
  auto it = index_.find(slice_offset);
  if (it != index_.end()) {
    *slice = it->second->slice;
    return Status::OK();
  }
  lru_.push_front(Entry{slice_offset, decoded, false});
  index_[slice_offset] = lru_.begin();
  EvictLocked();
  *slice = std::move(decoded);
  return Status::OK();
}

void TableCache::EvictLocked() {
  // Only clean slices leave; dirty ones wait for Flush, so the cache may
  // briefly exceed its bound (the owner flushes when dirty_count grows).
  auto it = lru_.end();
  while (lru_.size() > capacity_slices_ && it != lru_.begin()) {
    --it;
    if (it->dirty) continue;
    index_.erase(it->offset);
    it = lru_.erase(it);
  }
}

void TableCache::Store(uint64_t slice_offset, std::shared_ptr<std::vector<uint64_t>> slice) {
  MutexLock lock(&mu_);
  auto it = index_.find(slice_offset);
  if (it != index_.end()) {
    if (!it->second->dirty) dirty_++;
    it->second->slice = std::move(slice);
    it->second->dirty = true;
    lru_.splice(lru_.begin(), lru_, it->second);
  } else {
    lru_.push_front(Entry{slice_offset, std::move(slice), true});
    index_[slice_offset] = lru_.begin();
    dirty_++;
  }
  EvictLocked();
}

void TableCache::InsertZeroed(uint64_t slice_offset) {
  Store(slice_offset, std::make_shared<std::vector<uint64_t>>(slice_bytes_ / 8, 0));
}

Status TableCache::Flush() {
  std::vector<std::pair<uint64_t, Slice>> dirty;
  {
    MutexLock lock(&mu_);
    for (Entry& e : lru_) {
      if (e.dirty) dirty.emplace_back(e.offset, e.slice);
    }
  }
  if (dirty.empty()) return Status::OK();
  std::sort(dirty.begin(), dirty.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<uint8_t> raw(slice_bytes_);
  for (const auto& [offset, slice] : dirty) {
    if (write_check_) DMCOW_RETURN_IF_ERROR(write_check_(offset, raw.size()));
    for (size_t i = 0; i < slice->size(); i++) StoreBE64(&raw[i * 8], (*slice)[i]);
    DMCOW_RETURN_IF_ERROR(file_->Write(offset, raw.data(), raw.size()));
  }
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  MutexLock lock(&mu_);
  for (const auto& [offset, slice] : dirty) {
    auto it = index_.find(offset);
    // A slice modified again while we wrote stays dirty.
    if (it != index_.end() && it->second->dirty && it->second->slice == slice) {
      it->second->dirty = false;
      dirty_--;
    }
  }
  EvictLocked();
  return Status::OK();
}

size_t TableCache::dirty_count() {
  MutexLock lock(&mu_);
  return dirty_;
}

}  // namespace dmcow
