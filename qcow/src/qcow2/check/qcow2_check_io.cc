#include "qcow2/check/qcow2_check_io.h"

#include <cstring>

namespace dmcow {

using namespace qcow2;

Status ReadPadded(File* file, uint64_t offset, size_t len, void* buf) {
  uint64_t end;
  if (!CheckedAdd(offset, len, &end) || end > kMaxIoEnd) {
    return Status::IOError(file->name() + ": read of " + std::to_string(len) + " bytes at offset " + Hex(offset) +
                           " is out of range");
  }
  size_t got = 0;
  DMCOW_RETURN_IF_ERROR(file->Read(offset, len, buf, &got));
  if (got < len) std::memset(static_cast<uint8_t*>(buf) + got, 0, len - got);
  return Status::OK();
}

StoredRefcounts::StoredRefcounts(File* file, uint32_t cluster_bits, uint32_t refcount_order)
    : file_(file),
      cluster_bits_(cluster_bits),
      order_(refcount_order),
      block_bits_(cluster_bits + 3 - refcount_order) {}

Status StoredRefcounts::Load(uint64_t table_offset, uint64_t table_entries) {
  std::vector<uint8_t> raw(table_entries * 8);  // at most 8 MiB (open-time rule)
  DMCOW_RETURN_IF_ERROR(ReadPadded(file_, table_offset, raw.size(), raw.data()));
  table_.resize(table_entries);
  for (uint64_t i = 0; i < table_entries; i++) table_[i] = LoadBE64(&raw[i * 8]);
  Invalidate();
  return Status::OK();
}

bool StoredRefcounts::GetSlow(uint64_t cluster, uint64_t* refcount) {
  const uint64_t index = cluster >> block_bits_;
  const uint64_t block = index < table_.size() ? table_[index] & kRefTableOffsetMask : 0;
  if (block == 0) {
    *refcount = 0;
    return true;
  }
  const uint64_t cluster_size = uint64_t{1} << cluster_bits_;
  if (block & (cluster_size - 1)) return false;
  Cached* slot = nullptr;
  for (Cached& c : cache_) {
    if (c.offset == block) slot = &c;
  }
  if (slot == nullptr) {
    slot = &cache_[0];
    for (Cached& c : cache_) {
      if (c.last_use < slot->last_use) slot = &c;
    }
    if (slot->data.data() == last_data_) last_index_ = kNone;
    slot->offset = kNone;
    slot->data.resize(cluster_size);
    if (!ReadPadded(file_, block, cluster_size, slot->data.data()).ok()) return false;
    slot->offset = block;
  }
  slot->last_use = ++clock_;
  last_index_ = index;
  last_data_ = slot->data.data();
  *refcount = GetRefcountEntry(slot->data.data(), cluster & ((uint64_t{1} << block_bits_) - 1), order_);
  return true;
}

}  // namespace dmcow
