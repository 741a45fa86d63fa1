// Qcow2Refcounts: the refcount table and blocks of a writable qcow2 image,
// and the cluster allocator built on them.
//
// Refcount blocks are cached (write-back) in TableCache slices; the table is
// held in memory (at most 8 MiB by the open-time rules). Changes reach the
// file only through Flush, called by the owner in the order set out at the
// top of qcow2_write.cc. Decrements are deferred (FreeLater) until the
// metadata that stopped referencing a cluster is durable, so a freed cluster
// is never reused while a durable table may still point at it.
//
// Thread safety: none; the owning image serialises all calls.
#ifndef DMCOW_QCOW_QCOW2_REFCOUNTS_H_
#define DMCOW_QCOW_QCOW2_REFCOUNTS_H_

#include <memory>
#include <set>
#include <vector>

#include "image/table_cache.h"
#include "qcow2/qcow2_header.h"

namespace dmcow {

class Qcow2OverlapGuard;

class Qcow2Refcounts {
 public:
  Qcow2Refcounts(File* file, Qcow2Header* header, size_t cache_bytes);

  // Reads the refcount table; validates its entries.
  Status Load();
  // Refcount block offsets (0: none), as loaded and since allocated.
  const std::vector<uint64_t>& table() const { return table_; }
  // From now on allocations, new refcount structures and refcount writes go
  // through `guard` (qcow2_overlap.h; defined in qcow2_overlap.cc).
  void set_overlap_guard(Qcow2OverlapGuard* guard);

  Status Get(uint64_t cluster, uint64_t* refcount);
  uint64_t max_refcount() const { return max_refcount_; }

  // Adds `delta` to a cluster's refcount, in the cache. Overflow of the
  // refcount width and underflow below zero are errors.
  Status Adjust(uint64_t cluster, int64_t delta);

  // Finds `count` contiguous free clusters, sets their refcounts to 1 and
  // returns the host offset of the first.
  Status Allocate(uint64_t count, uint64_t* host_offset);

  // Decrements the refcounts of the clusters covering [host_offset,
  // host_offset + bytes) when ApplyPendingFrees runs.
  void FreeLater(uint64_t host_offset, uint64_t bytes);
  // Past every allocated cluster and the file's end at Load, in bytes.
  uint64_t allocation_end() const { return end_cluster_ * cluster_size_; }
  bool HasPendingFrees() const { return !pending_frees_.empty(); }
  Status ApplyPendingFrees();

  // Makes dirty refcount blocks and table entries durable: blocks first,
  // synced, and only then the table entries that point at new blocks,
  // synced (rule 7 of qcow2_write.cc). Nothing is marked clean before the
  // sync after its write succeeded.
  Status Flush();
  size_t dirty_slices() { return blocks_.dirty_count(); }

  // qcow2_shrink_reftable, after a shrink freed the end of the file:
  // refcount blocks that count nothing but themselves are unlinked, so the
  // file can be cut before them. Flushes first; each table entry is cleared
  // with one 8-byte write, synced, and only then is the count a block kept
  // of itself in another block lowered (QEMU leaks it). A crash leaves each
  // block linked or not; an unlinked one counted nothing.
  Status DropUnusedBlocks();
  // Whether Flush has anything to write (blocks or table entries).
  bool dirty() { return blocks_.dirty_count() > 0 || !dirty_table_entries_.empty(); }

 private:
  // Where a cluster's refcount lives: the refcount block slice and the bit
  // position of its entry in the slice's big-endian 64-bit words.
  struct EntryPosition {
    uint64_t slice_offset;
    size_t word;
    unsigned shift;
  };

  Status Locate(uint64_t cluster, EntryPosition* pos, bool* has_block);
  // First cluster of `count` contiguous free ones, searching from the hint.
  Status FindFreeRun(uint64_t count, uint64_t* first);
  // Replaces the refcount table by a larger one covering `min_entries`.
  Status GrowTable(uint64_t min_entries);
  uint64_t BlockOf(uint64_t cluster) const { return cluster / entries_per_block_; }

  File* const file_;
  Qcow2Header* const header_;
  const uint64_t cluster_size_;
  const uint32_t bits_;
  const uint64_t max_refcount_;
  const uint64_t entries_per_block_;
  TableCache blocks_;
  std::vector<uint64_t> table_;
  std::set<uint64_t> dirty_table_entries_;
  Qcow2OverlapGuard* overlap_ = nullptr;                      // null: unchecked (repair)
  std::vector<std::pair<uint64_t, uint64_t>> pending_frees_;  // (first cluster, count)
  uint64_t free_hint_ = 0;                                    // no free cluster below this index
  uint64_t end_cluster_ = 0;                                  // past every allocated cluster and the file's end
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_QCOW2_REFCOUNTS_H_
