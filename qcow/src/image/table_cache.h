// TableCache: a bounded LRU cache of table slices (qcow2 and qcow v1 L2
// tables, and qcow2 refcount blocks), decoded to host byte order.
//
// Tables are cached in slices of at most 4 KiB rather than whole tables so
// that memory stays bounded by the configured size even with 2 MiB clusters,
// and so a random lookup reads 4 KiB, not a whole table (as QEMU does).
//
// Write-back: Modify and InsertZeroed mark a slice dirty. Dirty slices are
// never evicted; they reach the file only through Flush, so the owner
// decides when (and after what) metadata is written. See qcow2/qcow2_write.cc for
// the ordering rules this serves. A slice is marked clean only once a sync
// that followed its write has succeeded: after a failed write or sync it
// stays dirty, so nothing treats it as durable.
//
// Thread safety: every method may be called from several threads at once. A
// returned slice stays valid for as long as the caller holds it, even if
// evicted or modified (modification replaces the slice, copy-on-write).
#ifndef DMCOW_QCOW_TABLE_CACHE_H_
#define DMCOW_QCOW_TABLE_CACHE_H_

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <unordered_map>
#include <vector>
#include "dmcow/mutex.h"

#include "dmcow/env.h"
#include "dmcow/status.h"

namespace dmcow {

class TableCache {
 public:
  using Slice = std::shared_ptr<const std::vector<uint64_t>>;

  // slice_bytes: a power of two, multiple of 8. capacity_bytes: the bound.
  TableCache(File* file, size_t slice_bytes, size_t capacity_bytes);
  TableCache(const TableCache&) = delete;
  TableCache& operator=(const TableCache&) = delete;

  size_t slice_bytes() const { return slice_bytes_; }
  size_t capacity_slices() const { return capacity_slices_; }

  // The slice starting at `slice_offset` (slice aligned). A slice that lies
  // beyond the end of the file is a Corrupt error naming `what`.
  Status Get(uint64_t slice_offset, const char* what, Slice* slice);

  // Applies `change` to a copy of the slice and stores it, dirty.
  template <typename Change>
  Status Modify(uint64_t slice_offset, const char* what, Change&& change) {
    Slice current;
    DMCOW_RETURN_IF_ERROR(Get(slice_offset, what, &current));
    auto updated = std::make_shared<std::vector<uint64_t>>(*current);
    change(*updated);
    Store(slice_offset, std::move(updated));
    return Status::OK();
  }

  // A new all-zero slice (a table just allocated), dirty, without reading.
  void InsertZeroed(uint64_t slice_offset);

  // Writes every dirty slice, syncs the file, and only then marks them
  // clean. Does nothing (no sync) when no slice is dirty.
  Status Flush();

  // Called with each slice's range before Flush writes it; an error
  // stops the write (qcow2's overlap check: qcow2/qcow2_overlap.h).
  void set_write_check(std::function<Status(uint64_t offset, uint64_t bytes)> check) {
    write_check_ = std::move(check);
  }

  size_t dirty_count();

 private:
  struct Entry {
    uint64_t offset;
    Slice slice;
    bool dirty;
  };
  using LruList = std::list<Entry>;

  void Store(uint64_t slice_offset, std::shared_ptr<std::vector<uint64_t>> slice);
  void EvictLocked() REQUIRES(mu_);

  File* const file_;
  const size_t slice_bytes_;
  const size_t capacity_slices_;
  Mutex mu_;
  LruList lru_ GUARDED_BY(mu_);  // front = most recently used
  std::unordered_map<uint64_t, LruList::iterator> index_ GUARDED_BY(mu_);
  size_t dirty_ GUARDED_BY(mu_) = 0;
  std::function<Status(uint64_t, uint64_t)> write_check_;
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_TABLE_CACHE_H_
