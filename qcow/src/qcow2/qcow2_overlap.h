// Overlap checks for qcow2 writers: no write and no allocation may land on
// the image's own metadata, whatever its refcounts or L2 entries claim.
//
// THE RULE. A writable Qcow2Image checks, before it happens:
//  - every write it issues to the image file: guest data written in place or
//    into new clusters, compressed data, L2 slices, refcount blocks and table
//    entries, L1 entries, a new L1 or refcount table;
//  - every cluster run the allocator hands out (Qcow2Refcounts::Allocate, so
//    also AllocateCompressedBytes and ReserveClusters);
//  - every host cluster the block-device daemon is told it may write in place
//    (DescribeCluster's exclusive data clusters, FillClusters, LinkClusters);
// against the metadata map: the header cluster, the active L1 table, the
// active L2 tables, the refcount table and blocks, the snapshot table and the
// snapshots' L1 tables, the bitmap directory and bitmap tables, and the
// encryption header. That is QEMU's default ("cached") overlap check, which
// leaves out only inactive L2 tables. A table's own write ignores its kind (an
// L2 slice is written over its own L2 table).
// On a hit the image is marked corrupt (incompatible feature bit 1, synced, as
// QEMU's qcow2_signal_corruption does; version 2 headers have no such field),
// the operation fails with a Corrupt status naming the file, the host offset
// and the structure, and the image writes nothing more: every later check,
// hence every write and flush, and the close, fails with the same status
// before touching the file. The file then holds the metadata of the last
// flush plus the corrupt bit, which `check -r all` repairs.
//
// Cost: the map holds disjoint cluster ranges in a std::map, updated as tables
// are allocated and freed, so a check is O(log n) in the number of tables.
//
// Thread safety: none; the owning image serialises all calls (rw_mu_).
#ifndef DMCOW_QCOW_QCOW2_OVERLAP_H_
#define DMCOW_QCOW_QCOW2_OVERLAP_H_

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "dmcow/env.h"
#include "dmcow/image.h"
#include "dmcow/status.h"
#include "image/l1_table.h"
#include "qcow2/qcow2_header.h"

namespace dmcow {

enum class Qcow2Metadata : uint8_t {
  kHeader,
  kActiveL1,
  kActiveL2,
  kRefcountTable,
  kRefcountBlock,
  kSnapshotTable,
  kSnapshotL1,
  kBitmapDirectory,
  kBitmapTable,
  kCryptoHeader,
};
constexpr size_t kQcow2MetadataKinds = 10;

// "the active L1 table", "a refcount block", ... for messages.
const char* Qcow2MetadataName(Qcow2Metadata kind);

// A bit per kind, for the `ignore` argument of the checks.
constexpr uint32_t Qcow2MetadataBit(Qcow2Metadata kind) { return 1u << static_cast<unsigned>(kind); }

// Cluster ranges covered by metadata, each counting how many structures of
// each kind cover it (a hostile image may place two structures on one
// cluster; freeing one must leave the other).
class Qcow2MetadataMap {
 public:
  void Add(uint64_t first_cluster, uint64_t clusters, Qcow2Metadata kind);
  void Remove(uint64_t first_cluster, uint64_t clusters, Qcow2Metadata kind);
  // The first cluster of [first_cluster, first_cluster + clusters) covered by
  // a structure whose kind is not in `ignore`, and that kind.
  bool Find(uint64_t first_cluster, uint64_t clusters, uint32_t ignore, uint64_t* cluster, Qcow2Metadata* kind) const;
  size_t segments() const { return segments_.size(); }

 private:
  struct Segment {
    uint64_t end;  // past the last cluster
    std::array<uint32_t, kQcow2MetadataKinds> count{};
  };
  // Makes `cluster` the first cluster of a segment if a segment spans it.
  void SplitAt(uint64_t cluster);

  std::map<uint64_t, Segment> segments_;  // by first cluster; disjoint
};

class Qcow2OverlapGuard {
 public:
  // `header` is the image's own, kept up to date by its owner.
  Qcow2OverlapGuard(File* file, Qcow2Header* header);

  // Registers every structure of the image as opened: the header cluster, the
  // active L1 (`l1`, its entries), the refcount table and its blocks
  // (`refcount_table`: block offsets), the snapshot table and L1 tables, the
  // bitmap directory and tables, the encryption header. Reads the snapshot
  // table and bitmap directory again (only offsets and sizes are kept).
  Status Load(const L1Table& l1, const std::vector<uint64_t>& refcount_table,
              const std::vector<SnapshotInfo>& snapshots);

  // A structure now occupies (or no longer occupies) the clusters covering
  // [offset, offset + bytes).
  void Add(uint64_t offset, uint64_t bytes, Qcow2Metadata kind);
  void Remove(uint64_t offset, uint64_t bytes, Qcow2Metadata kind);

  // OK when [offset, offset + bytes) touches no structure but those of kinds in
  // `ignore`; otherwise signals corruption (see the rule above) and returns it,
  // `what` naming the write in the message ("write", "L2 table write"). After
  // a failure every call returns that failure.
  Status CheckWrite(uint64_t offset, uint64_t bytes, uint32_t ignore, const char* what);
  // The same for `clusters` clusters the allocator is about to hand out.
  Status CheckAllocation(uint64_t offset, uint64_t clusters);

  // OK until a check failed; then the failure (sticky).
  const Status& failure() const { return failure_; }
  const Qcow2MetadataMap& map() const { return map_; }

 private:
  Status Check(uint64_t offset, uint64_t bytes, uint32_t ignore, const std::string& what);
  // Marks the image corrupt in its header, durably, and records `message`.
  Status Signal(std::string message);

  File* const file_;
  Qcow2Header* const header_;
  Qcow2MetadataMap map_;
  Status failure_;
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_QCOW2_OVERLAP_H_
