// Qcow2Check's run (the check itself; its writes are in
// qcow2_check_repair.cc): load what QEMU loads at open, then read the snapshot
// table, count references, compare them with the stored refcounts (fixing
// them when asked), check COPIED flags, and clear the dirty and corrupt bits
// after a successful repair. Mirrors qcow2_co_check_locked and
// qcow2_check_refcounts of QEMU 7.2 (block/qcow2.c, block/qcow2-refcount.c).
#include "qcow2/check/qcow2_check.h"

#include <algorithm>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <type_traits>

namespace dmcow {

using namespace qcow2;
using Kind = CheckFinding::Kind;

std::string Format(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  return buf;
}

void Qcow2CheckCounts::Add(const Qcow2CheckCounts& o, bool allocation_info) {
  corruptions += o.corruptions;
  leaks += o.leaks;
  check_errors += o.check_errors;
  corruptions_fixed += o.corruptions_fixed;
  leaks_fixed += o.leaks_fixed;
  if (allocation_info) {
    image_end_offset = o.image_end_offset;
    total_clusters = o.total_clusters;
    allocated_clusters = o.allocated_clusters;
    fragmented_clusters = o.fragmented_clusters;
    compressed_clusters = o.compressed_clusters;
  }
}

void CheckReporter::Report(CheckFinding::Kind kind, uint64_t offset, std::string message) {
  CheckFinding f{kind, offset, std::move(message)};
  if (options_.on_finding) options_.on_finding(f);
  if (result_->findings.size() < options_.max_findings) {
    result_->findings.push_back(std::move(f));
  } else {
    result_->findings_dropped++;
  }
}

Qcow2Check::Qcow2Check(File* file, const Qcow2Header& header, RepairMode mode, CheckReporter* reporter)
    : file_(file),
      h_(header),
      mode_(mode),
      fix_(mode == RepairMode::kAll     ? uint32_t{kFixLeaks | kFixErrors}
           : mode == RepairMode::kLeaks ? uint32_t{kFixLeaks}
                                        : 0u),
      reporter_(reporter),
      refs_(1u << header.refcount_order),
      stored_(file, header.cluster_bits, header.refcount_order) {}

Status Qcow2Check::Load() {
  DMCOW_RETURN_IF_ERROR(file_->Size(&file_size_));
  DMCOW_RETURN_IF_ERROR(stored_.Load(h_.refcount_table_offset, uint64_t{h_.refcount_table_clusters} * cs() / 8));
  std::vector<uint8_t> raw(uint64_t{h_.l1_size} * 8);  // at most 32 MiB (open-time rule)
  DMCOW_RETURN_IF_ERROR(ReadPadded(file_, h_.l1_table_offset, raw.size(), raw.data()));
  l1_.resize(h_.l1_size);
  for (uint64_t i = 0; i < l1_.size(); i++) l1_[i] = LoadBE64(&raw[i * 8]);
  return Status::OK();
}

Status Qcow2Check::Run(Qcow2CheckCounts* counts) {
  *counts = Qcow2CheckCounts();
  DMCOW_RETURN_IF_ERROR(Load());
  copied_inline_ = fix_ == 0;
  if (h_.incompatible_features & kIncompatDirty) {
    Report(Kind::kNote, 72,
           "Image is marked dirty: lazy refcounts were not written back, so stored refcounts may be stale");
  }
  if (h_.incompatible_features & kIncompatCorrupt) {
    Report(Kind::kNote, 72, "Image is marked corrupt");
  }

  Qcow2CheckCounts snapshot_res, refcount_res;
  Status s = ReadSnapshotTable(&snapshot_res);
  if (!s.ok()) {
    counts->Add(snapshot_res, false);
    return s;
  }
  s = CheckRefcounts(&refcount_res);
  counts->Add(refcount_res, true);
  if (!s.ok()) {
    counts->Add(snapshot_res, false);
    return s;
  }
  s = FixSnapshotTable(&snapshot_res);
  counts->Add(snapshot_res, false);
  DMCOW_RETURN_IF_ERROR(s);
  if (fix_ && counts->check_errors == 0 && counts->corruptions == 0) return MarkClean(counts);
  return Status::OK();
}

Status Qcow2Check::CheckRefcounts(Qcow2CheckCounts* res) {
  const uint64_t nb_clusters = DivRoundUp(file_size_, cs());
  if (nb_clusters > INT_MAX) {
    res->check_errors++;
    return Status::IOError(name() + ": image file is too large to check (" + std::to_string(nb_clusters) +
                           " clusters)");
  }
  res->total_clusters = DivRoundUp(h_.size / 512 * 512, cs());
  refs_.Resize(nb_clusters);

  bool rebuild = false;
  std::vector<uint64_t> l2_clusters;
  l2_seen_ = &l2_clusters;
  Status counted = CountReferences(res, fix_, &rebuild);
  l2_seen_ = nullptr;
  DMCOW_RETURN_IF_ERROR(counted);
  NoteOverlaps(l2_clusters);

  // With a repair that needs no rebuild, Compare runs again with fixing on
  // and the counts of this first comparison are dropped (as QEMU does).
  const Qcow2CheckCounts pre_compare = *res;
  uint64_t highest = 0;
  DMCOW_RETURN_IF_ERROR(Compare(res, 0, &rebuild, &highest));

  if (rebuild && (fix_ & kFixErrors)) {
    const Qcow2CheckCounts old = *res;
    int64_t fresh_leaks = 0;
    Report(Kind::kRepaired, h_.refcount_table_offset, "Rebuilding refcount structure");
    DMCOW_RETURN_IF_ERROR(RebuildRefcountStructure(res));
    // Beyond QEMU: failures to read the old, now replaced, structure are
    // not errors of the repaired image.
    res->check_errors -= stored_read_errors_;
    res->corruptions = 0;
    res->leaks = 0;
    // The old structure is now referenced by nothing: count again.
    rebuild = false;
    refs_.Clear();
    DMCOW_RETURN_IF_ERROR(CountReferences(res, 0, &rebuild));
    if (fix_ & kFixLeaks) {
      // Free what the rebuild left leaked (the old structure); the counts of
      // this pass are not part of the result, except leaks it could not fix.
      const Qcow2CheckCounts saved = *res;
      *res = Qcow2CheckCounts();
      DMCOW_RETURN_IF_ERROR(Compare(res, kFixLeaks, &rebuild, &highest));
      if (rebuild) Report(Kind::kCheckError, 0, "ERROR rebuilt refcount structure is still broken");
      fresh_leaks = res->leaks;
      *res = saved;
    }
    if (res->corruptions < old.corruptions) res->corruptions_fixed += old.corruptions - res->corruptions;
    if (res->leaks < old.leaks) res->leaks_fixed += old.leaks - res->leaks;
    res->leaks += fresh_leaks;
  } else if (fix_) {
    if (rebuild) {
      Report(Kind::kCheckError, 0, "ERROR need to rebuild refcount structures");
      res->check_errors++;
      return Status::IOError(name() + ": the refcount structure must be rebuilt (check -r all)");
    }
    if (res->leaks || res->corruptions) {
      *res = pre_compare;
      DMCOW_RETURN_IF_ERROR(Compare(res, fix_, &rebuild, &highest));
    }
  }

  if (!copied_inline_) DMCOW_RETURN_IF_ERROR(CheckCopied(res, fix_));
  res->image_end_offset = (highest + 1) * cs();
  return Status::OK();
}

// compare_refcounts: the stored refcount of every cluster of the file
// against the references counted. Walks one refcount block at a time; with
// `fix`, corrected blocks are written back whole (see qcow2_check_repair.cc for
// why that order is safe) and synced at the end.
Status Qcow2Check::Compare(Qcow2CheckCounts* res, uint32_t fix, bool* rebuild, uint64_t* highest) {
  *highest = 0;
  stored_read_errors_ = 0;
  const uint64_t n = refs_.size();
  const uint64_t per_block = stored_.entries_per_block();
  const std::vector<uint64_t>& table = stored_.table();
  const uint32_t order = h_.refcount_order;
  std::vector<uint8_t> block(cs());
  bool wrote = false;
  for (uint64_t first = 0; first < n; first += per_block) {
    const uint64_t index = first / per_block;
    const uint64_t count = std::min(per_block, n - first);
    const uint64_t offset = index < table.size() ? table[index] & kRefTableOffsetMask : 0;
    Status block_status;
    if (offset == 0) {
      if (refs_.AllZero(first, count)) continue;  // nothing stored, nothing referenced
    } else if (offset & (cs() - 1)) {
      block_status = Status::IOError("refcount block offset " + Hex(offset) + " is not cluster aligned");
    } else {
      block_status = ReadPadded(file_, offset, block.size(), block.data());
    }
    bool dirty = false;
    if (!block_status.ok()) {
      for (uint64_t i = first; i < first + count; i++) {
        res->check_errors++;
        stored_read_errors_++;
        Report(Kind::kCheckError, i * cs(),
               Format("Can't get refcount for cluster %llu: %s", static_cast<unsigned long long>(i),
                      block_status.message().c_str()));
      }
      continue;
    }
    // One comparison per cluster, with the refcount width a constant.
    auto compare_block = [&](auto order_constant) {
      constexpr uint32_t kOrder = decltype(order_constant)::value;
      for (uint64_t j = 0; j < count; j++) {
        const uint64_t i = first + j;
        const uint64_t stored = offset ? GetRefcountEntry(block.data(), j, kOrder) : 0;
        const uint64_t counted = refs_.Get(i);
        if (stored == counted) {
          if (stored) *highest = i;
          continue;
        }
        *highest = i;
        int64_t* num_fixed = nullptr;
        if (stored == 0) {
          *rebuild = true;
        } else if (stored > counted && (fix & kFixLeaks)) {
          num_fixed = &res->leaks_fixed;
        } else if (stored < counted && (fix & kFixErrors)) {
          num_fixed = &res->corruptions_fixed;
        }
        const char* what = num_fixed ? "Repairing" : stored < counted ? "ERROR" : "Leaked";
        Report(num_fixed          ? Kind::kRepaired
               : stored < counted ? Kind::kCorruption
                                  : Kind::kLeak,
               i * cs(),
               Format("%s cluster %llu refcount=%llu reference=%llu", what, static_cast<unsigned long long>(i),
                      static_cast<unsigned long long>(stored), static_cast<unsigned long long>(counted)));
        if (num_fixed) {
          SetRefcountEntry(block.data(), j, kOrder, counted);
          dirty = true;
          (*num_fixed)++;
        } else if (stored < counted) {
          res->corruptions++;
        } else {
          res->leaks++;
        }
      }
    };
    switch (order) {
      case 0: compare_block(std::integral_constant<uint32_t, 0>()); break;
      case 1: compare_block(std::integral_constant<uint32_t, 1>()); break;
      case 2: compare_block(std::integral_constant<uint32_t, 2>()); break;
      case 3: compare_block(std::integral_constant<uint32_t, 3>()); break;
      case 4: compare_block(std::integral_constant<uint32_t, 4>()); break;
      case 5: compare_block(std::integral_constant<uint32_t, 5>()); break;
      default: compare_block(std::integral_constant<uint32_t, 6>()); break;
    }
    if (dirty) {
      DMCOW_RETURN_IF_ERROR(file_->Write(offset, block.data(), block.size()));
      wrote = true;
    }
  }
  if (wrote) {
    DMCOW_RETURN_IF_ERROR(file_->Sync());
    stored_.Invalidate();
  }
  return Status::OK();
}

void Qcow2Check::CopiedInL2(Qcow2CheckCounts* res, uint8_t* table, bool repair, int64_t* changed) {
  const uint64_t entry_bytes = h_.l2_entry_bytes;
  for (uint64_t j = 0; j < h_.l2_entries; j++) {
    uint8_t* p = table + j * entry_bytes;
    const uint64_t entry = LoadBE64(p);
    if (entry & kCompressed) continue;
    const uint64_t offset = entry & kOffsetMask;
    // QCOW2_CLUSTER_NORMAL and QCOW2_CLUSTER_ZERO_ALLOC only.
    const bool zero_flag = !h_.extended_l2 && (entry & kZeroFlag);
    const bool normal_or_zero_alloc = offset != 0 || (!zero_flag && data_file() && (entry & kCopied));
    if (!normal_or_zero_alloc) continue;
    uint64_t refcount = 1;
    if (!data_file() && !stored_.Get(offset >> h_.cluster_bits, &refcount)) continue;
    if ((refcount == 1) == ((entry & kCopied) != 0)) continue;
    res->corruptions++;
    Report(repair ? Kind::kRepaired : Kind::kCorruption, offset,
           Format("%s OFLAG_COPIED data cluster: l2_entry=%llx refcount=%llu", repair ? "Repairing" : "ERROR",
                  static_cast<unsigned long long>(entry), static_cast<unsigned long long>(refcount)));
    if (repair) {
      StoreBE64(p, refcount == 1 ? entry | kCopied : entry & ~kCopied);
      (*changed)++;
    }
  }
}

Status Qcow2Check::CheckCopied(Qcow2CheckCounts* res, uint32_t fix) {
  bool repair = false;
  if (fix & kFixErrors) {
    repair = true;
  } else if (fix & kFixLeaks) {
    // Only when the refcounts are now known to be right.
    repair = !res->check_errors && !res->corruptions && !res->leaks;
  }
  const auto metadata = MetadataRanges();
  std::vector<uint8_t> table(cs());
  bool wrote = false;
  for (uint64_t i = 0; i < l1_.size(); i++) {
    const uint64_t l1_entry = l1_[i];
    const uint64_t l2_offset = l1_entry & kOffsetMask;
    if (l2_offset == 0) continue;
    uint64_t refcount;
    if (!stored_.Get(l2_offset >> h_.cluster_bits, &refcount)) continue;
    if ((refcount == 1) != ((l1_entry & kCopied) != 0)) {
      res->corruptions++;
      Report(repair ? Kind::kRepaired : Kind::kCorruption, h_.l1_table_offset + i * 8,
             Format("%s OFLAG_COPIED L2 cluster: l1_index=%llu l1_entry=%llx refcount=%llu",
                    repair ? "Repairing" : "ERROR", static_cast<unsigned long long>(i),
                    static_cast<unsigned long long>(l1_entry), static_cast<unsigned long long>(refcount)));
      if (repair) {
        l1_[i] = refcount == 1 ? l1_entry | kCopied : l1_entry & ~kCopied;
        Status s = WriteL1Entry(i);
        if (!s.ok()) {
          res->check_errors++;
          Report(Kind::kCheckError, h_.l1_table_offset + i * 8, "ERROR: Could not write L1 entry: " + s.message());
          return s;
        }
        wrote = true;
        res->corruptions--;
        res->corruptions_fixed++;
      }
    }
    Status s = ReadPadded(file_, l2_offset, table.size(), table.data());
    if (!s.ok()) {
      res->check_errors++;
      Report(Kind::kCheckError, l2_offset, "ERROR: Could not read L2 table: " + s.message());
      return s;
    }
    int64_t changed = 0;
    CopiedInL2(res, table.data(), repair, &changed);
    if (changed == 0) continue;
    if ((l2_offset & (cs() - 1)) || OverlapsRanges(metadata, h_.cluster_bits, l2_offset, cs())) {
      res->check_errors++;
      Report(Kind::kCheckError, l2_offset,
             "ERROR: Could not write L2 table at " + Hex(l2_offset) + ": it overlaps other metadata");
      return Status::IOError(name() + ": L2 table at " + Hex(l2_offset) + " overlaps other metadata");
    }
    DMCOW_RETURN_IF_ERROR(file_->Write(l2_offset, table.data(), table.size()));
    wrote = true;
    res->corruptions -= changed;
    res->corruptions_fixed += changed;
  }
  if (wrote) DMCOW_RETURN_IF_ERROR(file_->Sync());
  return Status::OK();
}

}  // namespace dmcow
