#include "qcow2/qcow2_refcounts.h"

#include <algorithm>

#include "qcow2/qcow2_overlap.h"
#include "util.h"

namespace dmcow {

namespace {
constexpr uint64_t kRefTableOffsetMask = ~uint64_t{511};
}

Qcow2Refcounts::Qcow2Refcounts(File* file, Qcow2Header* header, size_t cache_bytes)
    : file_(file),
      header_(header),
      cluster_size_(header->cluster_size),
      bits_(1u << header->refcount_order),
      max_refcount_(bits_ == 64 ? UINT64_MAX : (uint64_t{1} << bits_) - 1),
      entries_per_block_(header->cluster_size * 8 / bits_),
      blocks_(file, static_cast<size_t>(std::min<uint64_t>(4096, header->cluster_size)), cache_bytes) {}

Status Qcow2Refcounts::Load() {
  const Qcow2Header& h = *header_;
  const uint64_t entries = uint64_t{h.refcount_table_clusters} * cluster_size_ / 8;  // <= 1 Mi, checked at open
  std::vector<uint8_t> raw(entries * 8);
  DMCOW_RETURN_IF_ERROR(file_->ReadExact(h.refcount_table_offset, raw.size(), raw.data(), "refcount table"));
  table_.resize(entries);
  for (uint64_t i = 0; i < entries; i++) {
    uint64_t block = LoadBE64(&raw[i * 8]) & kRefTableOffsetMask;
    if (block & (cluster_size_ - 1)) {
      return Status::Corrupt(file_->name() + ": refcount block offset " + Hex(block) + " (table index " +
                             std::to_string(i) + ") is not cluster aligned");
    }
    if (block >> 56)
      return Status::Corrupt(file_->name() + ": refcount block offset " + Hex(block) + " is out of range");
    table_[i] = block;
    if (block) end_cluster_ = std::max(end_cluster_, block / cluster_size_ + 1);
  }
  end_cluster_ = std::max(end_cluster_, DivRoundUp(h.file_size, cluster_size_));
  return Status::OK();
}

Status Qcow2Refcounts::Locate(uint64_t cluster, EntryPosition* pos, bool* has_block) {
  const uint64_t index = BlockOf(cluster);
  *has_block = index < table_.size() && table_[index] != 0;
  if (!*has_block) return Status::OK();
  const uint64_t entry = cluster % entries_per_block_;
  const uint64_t bit = entry * bits_;  // in the block's byte stream
  const uint64_t slice_bits = blocks_.slice_bytes() * 8;
  pos->slice_offset = table_[index] + (bit / slice_bits) * blocks_.slice_bytes();
  const uint64_t bit_in_slice = bit % slice_bits;
  pos->word = static_cast<size_t>(bit_in_slice / 64);
  const unsigned byte_in_word = static_cast<unsigned>((bit_in_slice / 8) % 8);
  // Wide entries are big-endian; entries narrower than a byte fill each byte
  // from its least significant bit (as QEMU lays them out).
  pos->shift = bits_ >= 8 ? 64 - 8 * byte_in_word - bits_ : 56 - 8 * byte_in_word + bit_in_slice % 8;
  return Status::OK();
}

Status Qcow2Refcounts::Get(uint64_t cluster, uint64_t* refcount) {
  EntryPosition pos;
  bool has_block;
  DMCOW_RETURN_IF_ERROR(Locate(cluster, &pos, &has_block));
  if (!has_block) {
    *refcount = 0;
    return Status::OK();
  }
  TableCache::Slice slice;
  DMCOW_RETURN_IF_ERROR(blocks_.Get(pos.slice_offset, "refcount block", &slice));
  *refcount = ((*slice)[pos.word] >> pos.shift) & max_refcount_;
  return Status::OK();
}

Status Qcow2Refcounts::Adjust(uint64_t cluster, int64_t delta) {
  EntryPosition pos;
  bool has_block;
  DMCOW_RETURN_IF_ERROR(Locate(cluster, &pos, &has_block));
  if (!has_block) {
    if (delta < 0) {
      return Status::Corrupt(file_->name() + ": freeing cluster " + Hex(cluster * cluster_size_) +
                             " which has no refcount block");
    }
    return Status::InvalidArgument("refcount block missing for cluster " + Hex(cluster * cluster_size_));
  }
  uint64_t current;
  DMCOW_RETURN_IF_ERROR(Get(cluster, &current));
  if (delta < 0 && current < static_cast<uint64_t>(-delta)) {
    return Status::Corrupt(file_->name() + ": refcount of cluster " + Hex(cluster * cluster_size_) +
                           " would drop below zero");
  }
  if (delta > 0 && max_refcount_ - current < static_cast<uint64_t>(delta)) {
    // A limit of the image's refcount width, not damage (QEMU: -ERANGE).
    return Status::InvalidArgument(file_->name() + ": refcount of cluster " + Hex(cluster * cluster_size_) +
                                   " would overflow " + std::to_string(bits_) + " bits");
  }
  const uint64_t value = current + static_cast<uint64_t>(delta);
  const uint64_t mask = max_refcount_ << pos.shift;
  DMCOW_RETURN_IF_ERROR(blocks_.Modify(pos.slice_offset, "refcount block", [&](std::vector<uint64_t>& words) {
    words[pos.word] = (words[pos.word] & ~mask) | (value << pos.shift);
  }));
  if (value == 0) free_hint_ = std::min(free_hint_, cluster);
  if (value > 0) end_cluster_ = std::max(end_cluster_, cluster + 1);
  return Status::OK();
}

Status Qcow2Refcounts::FindFreeRun(uint64_t count, uint64_t* first) {
  // First fit from the hint; a range without a refcount block is all free.
  uint64_t start = free_hint_, found = 0, cluster = free_hint_;
  while (found < count) {
    const uint64_t index = BlockOf(cluster);
    if (index >= table_.size() || table_[index] == 0) {
      const uint64_t range_end = (index + 1) * entries_per_block_;
      found += range_end - cluster;
      cluster = range_end;
      continue;
    }
    uint64_t refcount;
    DMCOW_RETURN_IF_ERROR(Get(cluster, &refcount));
    cluster++;
    if (refcount == 0) {
      found++;
    } else {
      start = cluster;
      found = 0;
    }
  }
  if ((start + count) >> (56 - header_->cluster_bits)) {
    return Status::IOError(file_->name() + ": image is full (host offsets past 2^56)");
  }
  *first = start;
  return Status::OK();
}

Status Qcow2Refcounts::Allocate(uint64_t count, uint64_t* host_offset) {
  // Ranges the run touches that have no refcount block get one, placed at
  // the front of the run (such a range is wholly free, so any of its
  // clusters may hold it). The run is lengthened until it has room for them.
  uint64_t blocks_room = 0;
  for (;;) {
    uint64_t start;
    DMCOW_RETURN_IF_ERROR(FindFreeRun(count + blocks_room, &start));
    const uint64_t last_index = BlockOf(start + count + blocks_room - 1);
    if (last_index >= table_.size()) {
      DMCOW_RETURN_IF_ERROR(GrowTable(last_index + 1));  // takes clusters at the end: search again
      continue;
    }
    std::vector<uint64_t> uncovered;
    for (uint64_t index = BlockOf(start); index <= last_index; index++) {
      if (table_[index] == 0) uncovered.push_back(index);
    }
    if (uncovered.size() > blocks_room) {
      blocks_room = uncovered.size();
      continue;
    }
    if (overlap_) DMCOW_RETURN_IF_ERROR(overlap_->CheckAllocation(start * cluster_size_, uncovered.size() + count));
    for (size_t i = 0; i < uncovered.size(); i++) {
      const uint64_t offset = (start + i) * cluster_size_;
      for (uint64_t s = 0; s < cluster_size_; s += blocks_.slice_bytes()) blocks_.InsertZeroed(offset + s);
      table_[uncovered[i]] = offset;
      dirty_table_entries_.insert(uncovered[i]);
      if (overlap_) overlap_->Add(offset, cluster_size_, Qcow2Metadata::kRefcountBlock);
    }
    const uint64_t data = start + uncovered.size();
    for (uint64_t c = start; c < data + count; c++) DMCOW_RETURN_IF_ERROR(Adjust(c, 1));
    free_hint_ = data + count;
    *host_offset = data * cluster_size_;
    return Status::OK();
  }
}

Status Qcow2Refcounts::GrowTable(uint64_t min_entries) {
  const uint64_t per_cluster = cluster_size_ / 8;
  uint64_t entries = std::max<uint64_t>(min_entries, table_.size() * 2);
  // The new table and the blocks describing it go past everything in use;
  // blocks for ranges that have none come first, then the table.
  const uint64_t start = end_cluster_;
  uint64_t new_blocks = 0, table_clusters = 0;
  std::vector<uint64_t> uncovered;
  for (int round = 0; round < 64; round++) {
    entries = std::max(entries, BlockOf(start + new_blocks + table_clusters) + 1);
    table_clusters = DivRoundUp(entries, per_cluster);
    uncovered.clear();
    for (uint64_t i = BlockOf(start); i <= BlockOf(start + new_blocks + table_clusters - 1); i++) {
      if (i >= table_.size() || table_[i] == 0) uncovered.push_back(i);
    }
    if (uncovered.size() == new_blocks && entries > BlockOf(start + new_blocks + table_clusters - 1)) break;
    new_blocks = uncovered.size();
  }
  entries = table_clusters * per_cluster;
  if (table_clusters * cluster_size_ > qcow2::kMaxRefTableBytes) {
    return Status::IOError(file_->name() + ": refcount table would exceed " + std::to_string(qcow2::kMaxRefTableBytes) +
                           " bytes");
  }
  const uint64_t old_offset = header_->refcount_table_offset;
  const uint64_t old_clusters = header_->refcount_table_clusters;
  if (overlap_) DMCOW_RETURN_IF_ERROR(overlap_->CheckAllocation(start * cluster_size_, new_blocks + table_clusters));
  table_.resize(entries, 0);
  for (uint64_t i = 0; i < new_blocks; i++) {
    const uint64_t offset = (start + i) * cluster_size_;
    for (uint64_t s = 0; s < cluster_size_; s += blocks_.slice_bytes()) blocks_.InsertZeroed(offset + s);
    table_[uncovered[i]] = offset;
    if (overlap_) overlap_->Add(offset, cluster_size_, Qcow2Metadata::kRefcountBlock);
  }
  for (uint64_t c = start; c < start + new_blocks + table_clusters; c++) DMCOW_RETURN_IF_ERROR(Adjust(c, 1));

  // Blocks, then the new table, durable before the header points at it.
  DMCOW_RETURN_IF_ERROR(blocks_.Flush());
  std::vector<uint8_t> raw(entries * 8);
  for (uint64_t i = 0; i < entries; i++) StoreBE64(&raw[i * 8], table_[i]);
  const uint64_t table_offset = (start + new_blocks) * cluster_size_;
  DMCOW_RETURN_IF_ERROR(file_->Write(table_offset, raw.data(), raw.size()));
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  uint8_t fields[12];
  StoreBE64(fields, table_offset);
  StoreBE32(fields + 8, static_cast<uint32_t>(table_clusters));
  DMCOW_RETURN_IF_ERROR(file_->Write(48, fields, sizeof(fields)));  // one sector: atomic
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  header_->refcount_table_offset = table_offset;
  header_->refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  dirty_table_entries_.clear();
  if (overlap_) {
    overlap_->Remove(old_offset, old_clusters * cluster_size_, Qcow2Metadata::kRefcountTable);
    overlap_->Add(table_offset, table_clusters * cluster_size_, Qcow2Metadata::kRefcountTable);
  }
  FreeLater(old_offset, old_clusters * cluster_size_);
  return Status::OK();
}

void Qcow2Refcounts::FreeLater(uint64_t host_offset, uint64_t bytes) {
  if (bytes == 0) return;
  const uint64_t first = host_offset / cluster_size_;
  const uint64_t last = (host_offset + bytes - 1) / cluster_size_;
  pending_frees_.emplace_back(first, last - first + 1);
}

Status Qcow2Refcounts::ApplyPendingFrees() {
  std::vector<std::pair<uint64_t, uint64_t>> frees;
  frees.swap(pending_frees_);
  for (const auto& [first, count] : frees) {
    for (uint64_t c = first; c < first + count; c++) DMCOW_RETURN_IF_ERROR(Adjust(c, -1));
  }
  return Status::OK();
}

Status Qcow2Refcounts::DropUnusedBlocks() {
  DMCOW_RETURN_IF_ERROR(Flush());
  std::vector<uint64_t> unused;
  for (uint64_t index = 0; index < table_.size(); index++) {
    if (table_[index] == 0) continue;
    const uint64_t self = table_[index] / cluster_size_;
    bool counts_something = false;
    for (uint64_t c = index * entries_per_block_; c < (index + 1) * entries_per_block_ && !counts_something; c++) {
      if (c == self) continue;
      uint64_t refcount = 0;
      DMCOW_RETURN_IF_ERROR(Get(c, &refcount));
      counts_something = refcount != 0;
    }
    if (!counts_something) unused.push_back(index);
  }
  if (unused.empty()) return Status::OK();
  for (uint64_t index : unused) {
    const uint64_t offset = header_->refcount_table_offset + index * 8;
    if (overlap_) {
      DMCOW_RETURN_IF_ERROR(
          overlap_->CheckWrite(offset, 8, Qcow2MetadataBit(Qcow2Metadata::kRefcountTable), "refcount table write"));
    }
    const uint8_t zero[8] = {};
    DMCOW_RETURN_IF_ERROR(file_->Write(offset, zero, sizeof(zero)));
  }
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  for (uint64_t index : unused) {
    const uint64_t block = table_[index];
    table_[index] = 0;
    if (overlap_) overlap_->Remove(block, cluster_size_, Qcow2Metadata::kRefcountBlock);
    // A count kept in another (still linked) block is its own to lower.
    if (BlockOf(block / cluster_size_) != index) DMCOW_RETURN_IF_ERROR(Adjust(block / cluster_size_, -1));
  }
  return Flush();
}

Status Qcow2Refcounts::Flush() {
  // A table entry naming a new block must not reach the disk before the
  // block: the entry alone would make the block's zeros (or stale bytes)
  // the refcounts of live clusters.
  DMCOW_RETURN_IF_ERROR(blocks_.Flush());
  // Nor before the entry of the block that holds the new block's own
  // refcount: Allocate puts the blocks for several new ranges side by side
  // in the first of them, so block B's count may live in new block A, and
  // B's entry durable without A's would make B a referenced cluster with
  // refcount 0. Entries go in rounds, each synced: first those whose own
  // count is reachable already (in a block with a durable entry, or in
  // themselves), then those that depended on them.
  while (!dirty_table_entries_.empty()) {
    std::vector<uint64_t> ready;
    for (uint64_t index : dirty_table_entries_) {
      const uint64_t holder = BlockOf(table_[index] / cluster_size_);
      if (holder == index || dirty_table_entries_.count(holder) == 0) ready.push_back(index);
    }
    if (ready.empty()) {  // not made by Allocate or GrowTable; no order helps
      ready.assign(dirty_table_entries_.begin(), dirty_table_entries_.end());
    }
    for (uint64_t index : ready) {
      const uint64_t offset = header_->refcount_table_offset + index * 8;
      if (overlap_) {
        DMCOW_RETURN_IF_ERROR(
            overlap_->CheckWrite(offset, 8, Qcow2MetadataBit(Qcow2Metadata::kRefcountTable), "refcount table write"));
      }
      uint8_t raw[8];
      StoreBE64(raw, table_[index]);
      DMCOW_RETURN_IF_ERROR(file_->Write(offset, raw, sizeof(raw)));
    }
    DMCOW_RETURN_IF_ERROR(file_->Sync());
    for (uint64_t index : ready) dirty_table_entries_.erase(index);
  }
  return Status::OK();
}

}  // namespace dmcow
