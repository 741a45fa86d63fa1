// L1Table: an image's L1 table in memory (qcow2, and qcow v1), held in
// chunks of 512 entries of which only those with a non-zero entry are
// allocated.
//
// A header may claim an L1 table of up to 32 MiB, and the table need only
// lie inside the file, which a sparse file satisfies in a few KiB of disk. A
// whole-table vector would make every open of such an image (and of each
// image in a chain of them) cost the claimed size in memory. Chunks cost what
// the table really holds: a directory of 1/512 of the claimed size, plus 4 KiB
// per chunk that names an L2 table.
//
// Thread safety: as std::vector: concurrent readers, one writer excluding
// them (the owner's rw_mu_).
#ifndef DMCOW_QCOW_L1_TABLE_H_
#define DMCOW_QCOW_L1_TABLE_H_

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "dmcow/env.h"
#include "dmcow/status.h"

namespace dmcow {

class L1Table {
 public:
  static constexpr uint64_t kChunkEntries = 512;
  static constexpr uint64_t kChunkBytes = kChunkEntries * 8;

  uint64_t size() const { return size_; }

  // REQUIRES: i < size().
  uint64_t operator[](uint64_t i) const {
    const Chunk* c = chunks_[i / kChunkEntries].get();
    return c ? (*c)[i % kChunkEntries] : 0;
  }

  // REQUIRES: i < size().
  void Set(uint64_t i, uint64_t value);

  // Grows (new entries are 0) or shrinks to `entries`.
  void Resize(uint64_t entries);

  // Every entry 0; the size is kept.
  void Clear();

  // Replaces the table with the `entries` big-endian entries at `offset` in
  // `file` (known to lie inside it), skipping holes of a sparse file. The
  // memory it takes is added to *chain_bytes; passing `max_chain_bytes` is a
  // NotSupported error naming the file and `what` (e.g. "active L1 table").
  // With `skip_holes`, ranges the file system reports as holes are not
  // read; a writable open reads them anyway, so that a file system whose
  // SEEK_HOLE errs can never make a live entry look empty to a writer.
  Status Load(File* file, uint64_t offset, uint64_t entries, const char* what, uint64_t* chain_bytes,
              uint64_t max_chain_bytes, bool skip_holes);

 private:
  using Chunk = std::array<uint64_t, kChunkEntries>;

  uint64_t size_ = 0;
  std::vector<std::unique_ptr<Chunk>> chunks_;
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_L1_TABLE_H_
