#include "image/l1_table.h"

#include <algorithm>

#include "util.h"

namespace dmcow {

void L1Table::Set(uint64_t i, uint64_t value) {
  std::unique_ptr<Chunk>& c = chunks_[i / kChunkEntries];
  if (!c) {
    if (value == 0) return;
    c = std::make_unique<Chunk>();
    c->fill(0);
  }
  (*c)[i % kChunkEntries] = value;
}

void L1Table::Resize(uint64_t entries) {
  const uint64_t old = size_;
  size_ = entries;
  chunks_.resize(DivRoundUp(entries, kChunkEntries));
  // Entries past the end of a kept last chunk must read 0 if the table grows again.
  if (entries < old && entries % kChunkEntries != 0 && chunks_.back()) {
    std::fill(chunks_.back()->begin() + entries % kChunkEntries, chunks_.back()->end(), 0);
  }
}

void L1Table::Clear() {
  for (std::unique_ptr<Chunk>& c : chunks_) c.reset();
}

Status L1Table::Load(File* file, uint64_t offset, uint64_t entries, const char* what, uint64_t* chain_bytes,
                     uint64_t max_chain_bytes, bool skip_holes) {
  auto charge = [&](uint64_t bytes) {
    if (*chain_bytes + bytes > max_chain_bytes) {
      return Status::NotSupported(file->name() + ": " + what + " would take the tables of the backing chain past " +
                                  std::to_string(max_chain_bytes >> 20) + " MiB of memory");
    }
    *chain_bytes += bytes;
    return Status::OK();
  };
  size_ = 0;
  chunks_.clear();
  chunks_.shrink_to_fit();
  DMCOW_RETURN_IF_ERROR(charge(DivRoundUp(entries, kChunkEntries) * sizeof(chunks_[0])));
  Resize(entries);

  // One bounded buffer, whatever the table's size.
  constexpr uint64_t kBatchEntries = 16 * kChunkEntries;
  std::vector<uint8_t> raw;
  uint64_t i = 0;
  while (i < entries) {
    const uint64_t left = (entries - i) * 8;
    bool is_data = true;
    uint64_t run = left;
    if (skip_holes) DMCOW_RETURN_IF_ERROR(file->GetAllocation(offset + i * 8, left, &is_data, &run));
    if (!is_data && run >= 8) {  // a hole reads as zeros: nothing to hold
      i += std::min(run, left) / 8;
      continue;
    }
    const uint64_t n = std::min(kBatchEntries, entries - i);
    raw.resize(n * 8);
    DMCOW_RETURN_IF_ERROR(file->ReadExact(offset + i * 8, raw.size(), raw.data(), what));
    for (uint64_t k = 0; k < n; k++) {
      const uint64_t value = LoadBE64(&raw[k * 8]);
      if (value == 0) continue;
      if (!chunks_[(i + k) / kChunkEntries]) DMCOW_RETURN_IF_ERROR(charge(kChunkBytes));
      Set(i + k, value);
    }
    i += n;
  }
  return Status::OK();
}

}  // namespace dmcow
