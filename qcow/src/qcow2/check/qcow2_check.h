// Qcow2Check: one run of the qcow2 consistency check (and repair), as QEMU
// 7.2's qcow2_co_check_locked performs it. The work is split by concern:
//   qcow2_check_run.cc        the run, comparing refcounts, COPIED flags
//   qcow2_check_refs.cc       counting references (tables, snapshots, bitmaps)
//   qcow2_check_snapshots.cc  reading (and rewriting) the snapshot table
//   qcow2_check_repair.cc     every write a repair makes, and their order
// Counts and messages follow QEMU's; see dmcow/check.h.
#ifndef DMCOW_QCOW_QCOW2_CHECK_H_
#define DMCOW_QCOW_QCOW2_CHECK_H_

#include <cstdint>
#include <string>
#include <unordered_set>
#include <vector>

#include "dmcow/check.h"
#include "qcow2/check/qcow2_check_io.h"
#include "qcow2/check/reference_counts.h"
#include "qcow2/qcow2_header.h"

namespace dmcow {

// qemu's BdrvCheckResult. Signed: a fix moves a count from corruptions to
// corruptions_fixed, sometimes before it is known that it was counted.
struct Qcow2CheckCounts {
  int64_t check_errors = 0;
  int64_t corruptions = 0;
  int64_t leaks = 0;
  int64_t corruptions_fixed = 0;
  int64_t leaks_fixed = 0;
  uint64_t total_clusters = 0;
  uint64_t allocated_clusters = 0;
  uint64_t fragmented_clusters = 0;
  uint64_t compressed_clusters = 0;
  uint64_t image_end_offset = 0;

  // qcow2_add_check_result
  void Add(const Qcow2CheckCounts& o, bool allocation_info);
};

// Hands findings to CheckOptions::on_finding and keeps the first ones.
class CheckReporter {
 public:
  CheckReporter(const CheckOptions& options, CheckResult* result) : options_(options), result_(result) {}
  void Report(CheckFinding::Kind kind, uint64_t offset, std::string message);

 private:
  const CheckOptions& options_;
  CheckResult* const result_;
};

// Whether [offset, offset + len) touches a cluster of `ranges` (sorted,
// merged [first, end) cluster ranges, as MetadataRanges makes them).
bool OverlapsRanges(const std::vector<std::pair<uint64_t, uint64_t>>& ranges, uint32_t cluster_bits, uint64_t offset,
                    uint64_t len);

// Printf-style formatting for findings.
std::string Format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

class Qcow2Check {
 public:
  // `header` parsed in check mode. `mode` says what may be repaired; with a
  // repair the file must be writable.
  Qcow2Check(File* file, const Qcow2Header& header, RepairMode mode, CheckReporter* reporter);

  // One check run (qcow2_co_check_locked). A non-OK status means the check
  // could not be completed; *counts then holds what was counted.
  Status Run(Qcow2CheckCounts* counts);

  // Beyond QEMU, before Run with RepairMode::kAll: table entries that cannot
  // be valid (misaligned, past the end of the file, reserved bits set,
  // impossible flags) are corrected or dropped so that their range reads as
  // unallocated (or as zeros, as QEMU's own fix of preallocated clusters
  // does). Tables and data clusters that overlap other metadata are left to
  // the refcount repair, as QEMU leaves them (their refcount is raised, so
  // a write copies them), and such tables are never written to. Counts what
  // it fixes.
  Status FixTables(Qcow2CheckCounts* counts);
  // What FixTables changed that the guest reads, and the enabled bitmaps it
  // marked in use before doing so (qcow2_check_bitmaps.cc).
  const std::vector<std::pair<uint64_t, uint64_t>>& changed_guest_ranges() const { return changed_guest_ranges_; }
  const std::vector<std::string>& bitmaps_in_use() const { return bitmaps_in_use_; }
  // After the repaired image checked clean: the bits of `guest_ranges` are
  // set in the bitmaps `names` (marked in use by FixTables), which are then
  // marked consistent again.
  Status SetBitmapBits(const std::vector<std::pair<uint64_t, uint64_t>>& guest_ranges,
                       const std::vector<std::string>& names);

 private:
  enum : uint32_t { kFixLeaks = 1, kFixErrors = 2 };
  struct Snapshot {
    std::vector<uint8_t> fixed;  // the 40-byte header as read
    uint64_t l1_offset = 0;
    uint32_t l1_size = 0;
    uint32_t extra_size = 0;     // after truncation to the maximum
    std::vector<uint8_t> extra;  // extra data, extra_size bytes
    std::string id, name;
  };

  // qcow2_check_run.cc
  Status Load();                                 // what QEMU reads at open: refcount table, active L1
  Status CheckRefcounts(Qcow2CheckCounts* res);  // qcow2_check_refcounts
  Status Compare(Qcow2CheckCounts* res, uint32_t fix, bool* rebuild, uint64_t* highest);
  Status CheckCopied(Qcow2CheckCounts* res, uint32_t fix);  // check_oflag_copied
  // The COPIED rule for the entries of one active L2 table; with `repair`
  // wrong flags are corrected in `table` and *changed counts them.
  void CopiedInL2(Qcow2CheckCounts* res, uint8_t* table, bool repair, int64_t* changed);

  // qcow2_check_refs.cc
  Status CountReferences(Qcow2CheckCounts* res, uint32_t fix, bool* rebuild);  // calculate_refcounts
  Status CountL1(Qcow2CheckCounts* res, uint64_t l1_offset, uint64_t l1_size, bool active);
  Status CountL2(Qcow2CheckCounts* res, uint64_t l2_offset, bool active, bool copied_check);
  Status CountBitmaps(Qcow2CheckCounts* res);
  // Names overlapping structures, and metadata clusters also referenced as
  // data (QEMU shows both only as refcount mismatches). Notes only.
  void NoteOverlaps(const std::vector<uint64_t>& l2_clusters);
  Status CheckRefblocks(Qcow2CheckCounts* res, uint32_t fix, bool* rebuild);
  Status IncRefs(Qcow2CheckCounts* res, uint64_t offset, uint64_t size);  // qcow2_inc_refcounts_imrt
  void ReportOverflow(Qcow2CheckCounts* res, uint64_t cluster);

  // qcow2_check_snapshots.cc
  Status ReadSnapshotTable(Qcow2CheckCounts* res);  // qcow2_check_read_snapshot_table
  Status ReadSnapshots(bool repair, uint32_t* reduced, uint32_t* extra_dropped, std::string* error);
  Status FixSnapshotTable(Qcow2CheckCounts* res);   // qcow2_check_fix_snapshot_table
  std::vector<uint8_t> SerializeSnapshots() const;  // as qcow2_write_snapshots lays it out

  // qcow2_check_repair.cc
  Status RebuildRefcountStructure(Qcow2CheckCounts* res);
  Status WriteRefblocks(uint64_t first, uint64_t end, std::vector<uint64_t>* reftable, bool* grown);
  uint64_t AllocateInCounts(uint64_t count, uint64_t* first_free);
  Status WriteSnapshotTable();
  Status WriteL1Entry(uint64_t index);
  Status GrowFileForRefblock(uint64_t offset);
  Status MarkClean(Qcow2CheckCounts* res);
  struct MetaRange {
    uint64_t first, end;  // clusters [first, end)
    const char* kind;
  };
  using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;
  // Every structure other than L2 tables, one range each, sorted.
  std::vector<MetaRange> MetadataList();
  // The same merged (what OverlapsRanges takes).
  Ranges MetadataRanges();
  // Whether [offset, offset + len) overlaps a structure of `list` other
  // than the one starting at cluster `self` (pass ~0 for none).
  bool OverlapsOther(const std::vector<MetaRange>& list, uint64_t offset, uint64_t len, uint64_t self) const;
  Status FixL1Table(Qcow2CheckCounts* res, uint64_t l1_offset, uint64_t l1_size, bool active,
                    const std::vector<MetaRange>& list, const Ranges& others, std::unordered_set<uint64_t>* done_l2,
                    bool* wrote);
  // guest_base: the guest offset the table maps (active tables), for
  // planned_changes_.
  Status FixL2Table(Qcow2CheckCounts* res, uint64_t l2_offset, uint64_t guest_base, bool* wrote);

  // qcow2_check_bitmaps.cc
  Status MarkBitmapsInUse(const std::vector<MetaRange>& list);

  bool data_file() const { return h_.HasDataFile(); }
  uint64_t cs() const { return h_.cluster_size; }
  const std::string& name() const { return file_->name(); }
  void Report(CheckFinding::Kind kind, uint64_t offset, std::string message) {
    if (!mute_) reporter_->Report(kind, offset, std::move(message));
  }

  File* const file_;
  Qcow2Header h_;
  const RepairMode mode_;
  const uint32_t fix_;  // kFixLeaks/kFixErrors from mode_
  CheckReporter* const reporter_;
  uint64_t file_size_ = 0;
  ReferenceCounts refs_;
  StoredRefcounts stored_;
  std::vector<uint64_t> l1_;  // the active L1 table, as QEMU keeps it from open
  std::vector<Snapshot> snapshots_;
  uint64_t snapshots_size_ = 0;
  bool copied_inline_ = false;                // check COPIED flags while counting (no repair)
  int64_t stored_read_errors_ = 0;            // "Can't get refcount" errors of the last Compare
  bool mute_ = false;                         // findings not reported (FixTables reading snapshots)
  std::vector<uint64_t>* l2_seen_ = nullptr;  // when set, CountL1 adds the aligned L2 clusters
  // When set, FixL1Table and FixL2Table write nothing and only add the guest
  // ranges their fixes would change (FixTables plans before it writes).
  std::vector<std::pair<uint64_t, uint64_t>>* planned_changes_ = nullptr;
  std::vector<std::pair<uint64_t, uint64_t>> changed_guest_ranges_;
  std::vector<std::string> bitmaps_in_use_;
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_QCOW2_CHECK_H_
