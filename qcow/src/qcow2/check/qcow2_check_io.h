// Reading for the qcow2 check: file reads with QEMU's semantics (bytes past
// the end of the file read as zeros) and the stored refcounts, looked up
// the way qcow2_get_refcount does.
#ifndef DMCOW_QCOW_QCOW2_CHECK_IO_H_
#define DMCOW_QCOW_QCOW2_CHECK_IO_H_

#include <cstdint>
#include <vector>

#include "dmcow/env.h"
#include "util.h"

namespace dmcow {

namespace qcow2 {
// Masks of QEMU's block/qcow2.h.
constexpr uint64_t kL1Reserved = 0x7f000000000001ffULL;
constexpr uint64_t kL2StdReserved = 0x3f000000000001feULL;
constexpr uint64_t kRefTableReserved = 0x1ffULL;
constexpr uint64_t kRefTableOffsetMask = ~kRefTableReserved;
constexpr uint64_t kSubclusterAllAlloc = 0xffffffffULL;
constexpr uint64_t kSubclusterAllZero = 0xffffffffULL << 32;
// Reads ending past this fail, as QEMU's BDRV_MAX_LENGTH makes them.
constexpr uint64_t kMaxIoEnd = 0x7fffffffc0000000ULL;
}  // namespace qcow2

// Reads [offset, offset + len); what lies past the end of the file reads as
// zeros. Ranges ending past kMaxIoEnd are an I/O error.
Status ReadPadded(File* file, uint64_t offset, size_t len, void* buf);

// Entry `index` of a refcount block of width 2^order bits (sub-byte widths
// fill each byte from its least significant bit, as QEMU lays them out).
inline uint64_t GetRefcountEntry(const uint8_t* block, uint64_t index, uint32_t order) {
  switch (order) {
    case 0: return (block[index / 8] >> (index % 8)) & 1;
    case 1: return (block[index / 4] >> (2 * (index % 4))) & 3;
    case 2: return (block[index / 2] >> (4 * (index % 2))) & 15;
    case 3: return block[index];
    case 4: return LoadBE16(block + 2 * index);
    case 5: return LoadBE32(block + 4 * index);
    default: return LoadBE64(block + 8 * index);
  }
}

inline void SetRefcountEntry(uint8_t* block, uint64_t index, uint32_t order, uint64_t value) {
  if (order < 3) {
    const uint32_t bits = 1u << order;
    const uint32_t per_byte = 8 / bits;
    const uint32_t shift = static_cast<uint32_t>(index % per_byte) * bits;
    const uint8_t mask = static_cast<uint8_t>(((1u << bits) - 1) << shift);
    uint8_t& b = block[index / per_byte];
    b = static_cast<uint8_t>((b & ~mask) | ((value << shift) & mask));
    return;
  }
  switch (order) {
    case 3: block[index] = static_cast<uint8_t>(value); break;
    case 4: StoreBE16(block + 2 * index, static_cast<uint16_t>(value)); break;
    case 5: StoreBE32(block + 4 * index, static_cast<uint32_t>(value)); break;
    default: StoreBE64(block + 8 * index, value); break;
  }
}

// The refcounts stored in the image, through its refcount table (held in
// memory, as QEMU holds it) and a small cache of refcount blocks.
class StoredRefcounts {
 public:
  StoredRefcounts(File* file, uint32_t cluster_bits, uint32_t refcount_order);

  // Reads the refcount table (entries past the end of the file read as 0).
  Status Load(uint64_t table_offset, uint64_t table_entries);
  const std::vector<uint64_t>& table() const { return table_; }
  void SetTable(std::vector<uint64_t> table) {
    table_ = std::move(table);
    Invalidate();
  }

  // qcow2_get_refcount: 0 past the table or for a missing block. False (as
  // QEMU's -EIO) for a block offset that is not cluster aligned or cannot
  // be read; the check then skips the cluster, as QEMU does.
  bool Get(uint64_t cluster, uint64_t* refcount) {
    const uint64_t index = cluster >> block_bits_;
    if (index == last_index_) {
      *refcount = GetRefcountEntry(last_data_, cluster & ((uint64_t{1} << block_bits_) - 1), order_);
      return true;
    }
    return GetSlow(cluster, refcount);
  }

  // Forgets cached blocks (after the file's refcount blocks changed).
  void Invalidate() {
    for (Cached& c : cache_) c.offset = kNone;
    last_index_ = kNone;
  }

  uint64_t entries_per_block() const { return uint64_t{1} << block_bits_; }
  uint32_t block_bits() const { return block_bits_; }

 private:
  static constexpr uint64_t kNone = ~uint64_t{0};
  bool GetSlow(uint64_t cluster, uint64_t* refcount);
  struct Cached {
    uint64_t offset = kNone;
    uint64_t last_use = 0;
    std::vector<uint8_t> data;
  };

  File* const file_;
  const uint32_t cluster_bits_;
  const uint32_t order_;
  const uint32_t block_bits_;  // log2 of entries per block
  std::vector<uint64_t> table_;
  Cached cache_[4];
  uint64_t clock_ = 0;
  uint64_t last_index_ = kNone;         // table index of the last block used
  const uint8_t* last_data_ = nullptr;  // its data, in cache_
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_QCOW2_CHECK_IO_H_
