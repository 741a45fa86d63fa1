// Qcow2Check's repair: every write a qcow2 repair makes, and the order that
// keeps a crash from making things worse. (What is checked, and what a
// repair sets right, is decided in qcow2_check_run.cc and the other
// qcow2_check_*.cc.)
//
// REPAIR ORDERING. A repair (check -r leaks|all, or the repair of a dirty
// image) may be interrupted at any write or sync; whatever reached the disk,
// a second repair must be able to finish, and no cluster that a table still
// references may ever be left with a refcount of 0 that it did not already
// have. "Durable" means written and followed by a completed File::Sync.
//
//  (0) Bitmaps first: before a table fix changes what the guest reads,
//      every enabled bitmap is marked in use, synced (see (7)).
//  (1) Table fixes then (FixTables, -r all): entries that cannot be valid
//      are corrected or dropped in place. Each entry is 8 or 16 bytes inside
//      one 512-byte sector, so a torn table write leaves every entry either
//      old or new. These writes only remove references (or clear flags and
//      reserved bits), and they are durable before any refcount is lowered:
//      a refcount is never lowered while a durable table still points at it.
//  (2) Refcounts are then set to exactly the references counted from the
//      durable tables (Compare with fixing). A refcount block is rewritten
//      whole; each entry lies inside one sector and ends up either at its
//      old value or at the exact count, both no lower than the references
//      (the old value may be too low only where it already was). Synced.
//  (3) A rebuilt refcount structure is written only into clusters that
//      nothing references and that are not part of the old structure (even
//      its damaged parts), then synced, and only then does one write of 12
//      bytes inside the header's first sector (refcount table offset and
//      size) switch to it, synced. A crash before the switch leaves the old
//      structure untouched; after it, the old structure is merely leaked,
//      which step (2) then frees.
//  (4) COPIED flags are set only after the refcount of 1 they promise is
//      durable (they are checked against the stored refcounts after (2)).
//      Clearing a flag is always safe.
//  (5) A new snapshot table is written into free clusters and made durable,
//      then their refcounts, then the header (count and offset, one 12-byte
//      write in the first sector) points at it; the old table is freed only
//      after that. (Data before refcount: a crash never leaves a refcount
//      past the end of the file, which no check examines.)
//  (6) The dirty and corrupt bits are cleared last, after everything else
//      is durable, and only when the repaired image has no errors left.
//  (7) Once the repaired image checks clean, the bitmaps marked in (0) get
//      the bits of every changed range, synced, then lose the in-use flag,
//      synced (qcow2_check_bitmaps.cc).
// One exception to "never lower a refcount a table still uses": a snapshot
// whose L1 table is unusable (misaligned, too large, past the end) is not
// counted (QEMU does not count it either), so its clusters are freed in (2)
// before (5) removes it from the snapshot table. Nothing could read it.
// Nothing here writes into a structure that overlaps other metadata (the
// write would damage the other structure); such damage is left reported.
// tests/check_test.cc crashes a repair at every write and sync, repairs
// again, and checks the result with qemu-img.
#include <algorithm>
#include <unordered_set>

#include "qcow2/check/qcow2_check.h"
#include "qcow2/qcow2_refcounts.h"

namespace dmcow {

using namespace qcow2;
using Kind = CheckFinding::Kind;

namespace {
using ull = unsigned long long;
}  // namespace

bool OverlapsRanges(const std::vector<std::pair<uint64_t, uint64_t>>& ranges, uint32_t cluster_bits, uint64_t offset,
                    uint64_t len) {
  if (len == 0) return false;
  const uint64_t first = offset >> cluster_bits;
  const uint64_t last = (offset + len - 1) >> cluster_bits;
  // The first range ending after `first`.
  auto it = std::upper_bound(ranges.begin(), ranges.end(), first,
                             [](uint64_t c, const std::pair<uint64_t, uint64_t>& r) { return c < r.second; });
  return it != ranges.end() && it->first <= last;
}

std::vector<Qcow2Check::MetaRange> Qcow2Check::MetadataList() {
  std::vector<MetaRange> list;
  auto add = [&](uint64_t offset, uint64_t bytes, const char* kind) {
    uint64_t end;
    if (bytes == 0 || !CheckedAdd(offset, bytes, &end) || end > kMaxIoEnd) return;
    list.push_back({offset >> h_.cluster_bits, ((end - 1) >> h_.cluster_bits) + 1, kind});
  };
  add(0, cs(), "header");
  add(h_.l1_table_offset, uint64_t{h_.l1_size} * 8, "active L1 table");
  for (const Snapshot& sn : snapshots_) {
    if (!(sn.l1_offset & (cs() - 1)) && sn.l1_size <= kMaxL1Bytes / 8) {
      add(sn.l1_offset, uint64_t{sn.l1_size} * 8, "snapshot L1 table");
    }
  }
  add(h_.refcount_table_offset, stored_.table().size() * 8, "refcount table");
  for (uint64_t entry : stored_.table()) {
    const uint64_t offset = entry & kRefTableOffsetMask;
    if (offset) add(offset, cs(), "refcount block");
  }
  add(h_.snapshots_offset, snapshots_size_, "snapshot table");
  if (h_.has_bitmaps_ext) add(h_.bitmap_directory_offset, h_.bitmap_directory_size, "bitmap directory");
  if (h_.has_crypto_ext) add(h_.crypto_header_offset, h_.crypto_header_length, "encryption header");
  std::sort(list.begin(), list.end(), [](const MetaRange& a, const MetaRange& b) { return a.first < b.first; });
  return list;
}

Qcow2Check::Ranges Qcow2Check::MetadataRanges() {
  Ranges merged;
  for (const MetaRange& r : MetadataList()) {
    if (!merged.empty() && r.first <= merged.back().second) {
      merged.back().second = std::max(merged.back().second, r.end);
    } else {
      merged.emplace_back(r.first, r.end);
    }
  }
  return merged;
}

bool Qcow2Check::OverlapsOther(const std::vector<MetaRange>& list, uint64_t offset, uint64_t len, uint64_t self) const {
  const uint64_t first = offset >> h_.cluster_bits;
  const uint64_t end = ((offset + len - 1) >> h_.cluster_bits) + 1;
  bool skipped_self = false;
  for (const MetaRange& r : list) {
    if (r.first >= end) break;
    if (r.end <= first) continue;
    if (r.first == self && r.first == first && !skipped_self) {
      skipped_self = true;  // the structure itself
      continue;
    }
    return true;
  }
  return false;
}

Status Qcow2Check::WriteL1Entry(uint64_t index) {
  const uint64_t bytes = uint64_t{h_.l1_size} * 8;
  if (OverlapsOther(MetadataList(), h_.l1_table_offset, bytes, h_.l1_table_offset >> h_.cluster_bits)) {
    return Status::IOError(name() + ": the active L1 table overlaps other metadata; not written");
  }
  uint8_t raw[8];
  StoreBE64(raw, l1_[index]);
  return file_->Write(h_.l1_table_offset + index * 8, raw, sizeof(raw));
}

Status Qcow2Check::GrowFileForRefblock(uint64_t offset) {
  if (offset > static_cast<uint64_t>(INT64_MAX) - cs()) return Status::InvalidArgument("offset out of range");
  DMCOW_RETURN_IF_ERROR(file_->Truncate(offset + cs()));
  DMCOW_RETURN_IF_ERROR(file_->Size(&file_size_));
  refs_.Resize(DivRoundUp(file_size_, cs()));
  return Status::OK();
}

Status Qcow2Check::MarkClean(Qcow2CheckCounts* res) {
  (void)res;
  const uint64_t bits = kIncompatDirty | kIncompatCorrupt;
  if (h_.version < 3 || !(h_.incompatible_features & bits)) return Status::OK();
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  h_.incompatible_features &= ~bits;
  uint8_t raw[8];
  StoreBE64(raw, h_.incompatible_features);
  DMCOW_RETURN_IF_ERROR(file_->Write(72, raw, sizeof(raw)));
  return file_->Sync();
}

// alloc_clusters_imrt: `count` contiguous clusters free in the reference
// counts, searching from *first_free (updated to the first free cluster
// seen), growing the counts past the end of the file if needed.
uint64_t Qcow2Check::AllocateInCounts(uint64_t count, uint64_t* first_free) {
  uint64_t cluster = *first_free, run = 0;
  bool first_gap = true;
  for (; cluster < refs_.size() && run < count; cluster++) {
    if (refs_.Get(cluster) == 0) {
      run++;
      if (first_gap) {
        *first_free = cluster;
        first_gap = false;
      }
    } else {
      run = 0;
    }
  }
  if (run < count) refs_.Resize(cluster + count - run);
  cluster -= run;
  for (uint64_t i = 0; i < count; i++) refs_.Set(cluster + i, 1);
  return cluster << h_.cluster_bits;
}

// rebuild_refcounts_write_refblocks: writes a refcount block for every
// block range of [first, end) that holds referenced clusters, allocating
// blocks that do not exist yet in the reference counts themselves.
Status Qcow2Check::WriteRefblocks(uint64_t first, uint64_t end, std::vector<uint64_t>* reftable, bool* grown) {
  const uint64_t per_block = stored_.entries_per_block();
  uint64_t first_free = 0;
  std::vector<uint8_t> block(cs());
  for (uint64_t start = first / per_block * per_block; start < end; start += per_block) {
    const uint64_t scan_from = std::max(start, first);
    const uint64_t scan_end = std::min({start + per_block, end, refs_.size()});
    if (scan_from >= scan_end || refs_.AllZero(scan_from, scan_end - scan_from)) continue;
    const uint64_t index = start / per_block;
    uint64_t offset = index < reftable->size() ? (*reftable)[index] : 0;
    if (offset == 0) {
      first_free = std::max(first_free, start);
      offset = AllocateInCounts(1, &first_free);
      end = std::max(end, (offset >> h_.cluster_bits) + 1);  // its own count must be written too
      if (reftable->size() <= index) {
        const uint64_t per_cluster = cs() / 8;
        reftable->resize(DivRoundUp(index + 1, per_cluster) * per_cluster, 0);
        *grown = true;
      }
      (*reftable)[index] = offset;
    }
    std::fill(block.begin(), block.end(), 0);
    const uint64_t limit = std::min(start + per_block, refs_.size());
    for (uint64_t c = start; c < limit; c++) {
      const uint64_t v = refs_.Get(c);
      if (v) SetRefcountEntry(block.data(), c - start, h_.refcount_order, v);
    }
    DMCOW_RETURN_IF_ERROR(file_->Write(offset, block.data(), block.size()));
  }
  return Status::OK();
}

// rebuild_refcount_structure: a new refcount table and blocks made from the
// reference counts alone; see (3) above.
Status Qcow2Check::RebuildRefcountStructure(Qcow2CheckCounts* res) {
  // Never place the new structure over any part of the old one, even the
  // parts the count left out (misaligned or flagged blocks): until the
  // header switches, the old structure is the one in use. They are counted
  // as references here and freed as leaks after the switch.
  for (uint64_t entry : stored_.table()) {
    const uint64_t offset = entry & kRefTableOffsetMask;
    if (offset == 0 || (!(entry & kRefTableReserved) && !(offset & (cs() - 1)))) continue;
    const uint64_t first = offset >> h_.cluster_bits;
    const uint64_t last = (offset + cs() - 1) >> h_.cluster_bits;
    for (uint64_t c = first; c <= last && c < refs_.size(); c++) refs_.Increment(c);
  }

  std::vector<uint64_t> reftable;
  bool grown = false;
  Status s = WriteRefblocks(0, refs_.size(), &reftable, &grown);
  uint64_t table_offset = 0, table_clusters = 0;
  while (s.ok()) {
    table_clusters = DivRoundUp(reftable.size() * 8, cs());
    uint64_t first_free = 0;
    table_offset = AllocateInCounts(table_clusters, &first_free);
    // The table's own clusters changed the counts of their block range.
    grown = false;
    s = WriteRefblocks(table_offset >> h_.cluster_bits, (table_offset >> h_.cluster_bits) + table_clusters, &reftable,
                       &grown);
    if (!grown) break;
  }
  if (s.ok() && table_clusters * cs() > kMaxRefTableBytes) {
    s = Status::IOError(name() + ": the rebuilt refcount table would exceed " + std::to_string(kMaxRefTableBytes) +
                        " bytes");
  }
  if (s.ok()) s = file_->Sync();  // blocks durable before the table and the header point at them
  if (s.ok()) {
    std::vector<uint8_t> raw(table_clusters * cs(), 0);
    for (size_t i = 0; i < reftable.size(); i++) StoreBE64(&raw[i * 8], reftable[i]);
    s = file_->Write(table_offset, raw.data(), raw.size());
  }
  if (s.ok()) s = file_->Sync();
  if (s.ok()) {
    uint8_t fields[12];
    StoreBE64(fields, table_offset);
    StoreBE32(fields + 8, static_cast<uint32_t>(table_clusters));
    s = file_->Write(48, fields, sizeof(fields));
  }
  if (s.ok()) s = file_->Sync();
  if (!s.ok()) {
    res->check_errors++;
    Report(Kind::kCheckError, table_offset, "ERROR rebuilding the refcount structure: " + s.message());
    return s;
  }
  h_.refcount_table_offset = table_offset;
  h_.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  reftable.resize(table_clusters * cs() / 8, 0);
  stored_.SetTable(std::move(reftable));
  return file_->Size(&file_size_);
}

// qcow2_write_snapshots, for a repaired table; see (5) above.
Status Qcow2Check::WriteSnapshotTable() {
  const std::vector<uint8_t> table = SerializeSnapshots();
  Qcow2Header hdr = h_;
  DMCOW_RETURN_IF_ERROR(file_->Size(&hdr.file_size));
  Qcow2Refcounts refcounts(file_, &hdr, 1 << 20);
  DMCOW_RETURN_IF_ERROR(refcounts.Load());
  uint64_t offset = 0;
  if (!table.empty()) {
    // The table is written (and the file grown to hold it) before its
    // refcounts: a crash in between leaves an unreferenced cluster with a
    // refcount of 0 inside the file, never a refcount past its end (which
    // no check looks at, so no repair would free).
    DMCOW_RETURN_IF_ERROR(refcounts.Allocate(DivRoundUp(table.size(), cs()), &offset));
    DMCOW_RETURN_IF_ERROR(file_->Write(offset, table.data(), table.size()));
    DMCOW_RETURN_IF_ERROR(file_->Sync());
    DMCOW_RETURN_IF_ERROR(refcounts.Flush());
  }
  uint8_t fields[12];
  StoreBE32(fields, static_cast<uint32_t>(snapshots_.size()));
  StoreBE64(fields + 4, offset);
  DMCOW_RETURN_IF_ERROR(file_->Write(60, fields, sizeof(fields)));
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  // Free the old table's clusters (those that are counted at all), and an
  // old refcount table the allocator may have replaced.
  DMCOW_RETURN_IF_ERROR(refcounts.ApplyPendingFrees());
  if (snapshots_size_ > 0) {
    uint64_t old_end = h_.snapshots_offset + snapshots_size_;
    const uint64_t file_clusters = DivRoundUp(hdr.file_size, cs());
    for (uint64_t c = h_.snapshots_offset >> h_.cluster_bits; c <= (old_end - 1) >> h_.cluster_bits; c++) {
      uint64_t refcount = 0;
      if (c < file_clusters) DMCOW_RETURN_IF_ERROR(refcounts.Get(c, &refcount));
      if (refcount > 0) DMCOW_RETURN_IF_ERROR(refcounts.Adjust(c, -1));
    }
  }
  if (refcounts.dirty()) {
    DMCOW_RETURN_IF_ERROR(refcounts.Flush());
  }
  h_.nb_snapshots = static_cast<uint32_t>(snapshots_.size());
  h_.snapshots_offset = offset;
  snapshots_size_ = table.size();
  h_.refcount_table_offset = hdr.refcount_table_offset;  // the allocator may have grown the table
  h_.refcount_table_clusters = hdr.refcount_table_clusters;
  return stored_.Load(h_.refcount_table_offset, uint64_t{h_.refcount_table_clusters} * cs() / 8);
}

// FixTables: see qcow2_check.h and (1) above.
Status Qcow2Check::FixTables(Qcow2CheckCounts* res) {
  DMCOW_RETURN_IF_ERROR(Load());
  uint32_t reduced = 0, dropped = 0;
  std::string error;
  mute_ = true;
  // As Run will read them (repairing: overhanging entries and extra data
  // dropped), without writing anything yet.
  if (h_.nb_snapshots > kMaxSnapshots || !ReadSnapshots(true, &reduced, &dropped, &error).ok()) snapshots_.clear();
  mute_ = false;

  const std::vector<MetaRange> list = MetadataList();
  const Ranges others = MetadataRanges();
  std::vector<std::pair<uint64_t, uint64_t>> l1s = {{h_.l1_table_offset, h_.l1_size}};
  for (const Snapshot& sn : snapshots_) {
    if (!(sn.l1_offset & (cs() - 1)) && sn.l1_size <= kMaxL1Bytes / 8) l1s.emplace_back(sn.l1_offset, sn.l1_size);
  }
  // (0): what the fixes will change that the guest reads (active table).
  {
    Qcow2CheckCounts scratch;
    std::unordered_set<uint64_t> scratch_done;
    bool scratch_wrote = false;
    mute_ = true;
    planned_changes_ = &changed_guest_ranges_;
    Status s = FixL1Table(&scratch, l1s[0].first, l1s[0].second, true, list, others, &scratch_done, &scratch_wrote);
    planned_changes_ = nullptr;
    mute_ = false;
    DMCOW_RETURN_IF_ERROR(s);
  }
  if (!changed_guest_ranges_.empty() && h_.has_bitmaps_ext) DMCOW_RETURN_IF_ERROR(MarkBitmapsInUse(list));

  bool wrote = false;
  std::unordered_set<uint64_t> done;
  for (size_t i = 0; i < l1s.size(); i++) {
    DMCOW_RETURN_IF_ERROR(FixL1Table(res, l1s[i].first, l1s[i].second, i == 0, list, others, &done, &wrote));
  }
  if (wrote) DMCOW_RETURN_IF_ERROR(file_->Sync());
  return Status::OK();
}

Status Qcow2Check::FixL1Table(Qcow2CheckCounts* res, uint64_t l1_offset, uint64_t l1_size, bool active,
                              const std::vector<MetaRange>& list, const Ranges& others,
                              std::unordered_set<uint64_t>* done_l2, bool* wrote) {
  if (l1_size == 0) return Status::OK();
  std::vector<uint8_t> raw(l1_size * 8);
  DMCOW_RETURN_IF_ERROR(ReadPadded(file_, l1_offset, raw.size(), raw.data()));
  // An L1 table past the end of the file or over other metadata is not written.
  const bool writable = l1_offset + l1_size * 8 <= file_size_ &&
                        !OverlapsOther(list, l1_offset, l1_size * 8, l1_offset >> h_.cluster_bits);
  const char* what = active ? "active" : "snapshot";
  for (uint64_t i = 0; i < l1_size; i++) {
    const uint64_t entry = LoadBE64(&raw[i * 8]);
    if (entry == 0) continue;
    uint64_t fixed = entry & ~kL1Reserved;
    const uint64_t l2 = fixed & kOffsetMask;
    const char* why = entry != fixed ? "reserved bits set" : nullptr;
    bool drop = true;  // the range then reads as unallocated
    if (l2 == 0) {
      why = "flags without an L2 table";
    } else if (l2 & (cs() - 1)) {
      why = "L2 table not cluster aligned";
    } else if (l2 >= file_size_) {
      why = "L2 table past the end of the file";
    } else {
      // A table over other metadata is kept, as QEMU keeps it (the refcount
      // repair then makes it consistent), but not written to: its "entries"
      // are that other structure.
      drop = false;
      // Planning visits a table shared by two entries twice: both ranges change.
      if (!OverlapsRanges(others, h_.cluster_bits, l2, cs()) && (planned_changes_ || done_l2->insert(l2).second)) {
        DMCOW_RETURN_IF_ERROR(FixL2Table(res, l2, i * (h_.l2_entries << h_.cluster_bits), wrote));
      }
    }
    if (why == nullptr) continue;
    if (drop) fixed = 0;
    if (!writable) continue;  // left for the check to report
    if (planned_changes_) {
      if (fixed == 0) planned_changes_->emplace_back(i * (h_.l2_entries << h_.cluster_bits), h_.l2_entries * cs());
      continue;
    }
    StoreBE64(&raw[i * 8], fixed);
    DMCOW_RETURN_IF_ERROR(file_->Write(l1_offset + i * 8, &raw[i * 8], 8));
    *wrote = true;
    if (active) l1_[i] = fixed;
    res->corruptions_fixed++;
    Report(Kind::kRepaired, l1_offset + i * 8,
           Format("Repairing %s L1 entry %llu (%llx): %s; %s", what, static_cast<ull>(i), static_cast<ull>(entry), why,
                  fixed ? "cleared the reserved bits" : "dropped, the range now reads as unallocated"));
  }
  return Status::OK();
}

Status Qcow2Check::FixL2Table(Qcow2CheckCounts* res, uint64_t l2_offset, uint64_t guest_base, bool* wrote) {
  std::vector<uint8_t> table(cs());
  DMCOW_RETURN_IF_ERROR(ReadPadded(file_, l2_offset, table.size(), table.data()));
  bool changed = false;
  for (uint64_t j = 0; j < h_.l2_entries; j++) {
    uint8_t* p = &table[j * h_.l2_entry_bytes];
    const uint64_t entry = LoadBE64(p);
    const uint64_t bitmap = h_.extended_l2 ? LoadBE64(p + 8) : 0;
    if (entry == 0 && bitmap == 0) continue;
    uint64_t e = entry, b = bitmap;
    const char* why = nullptr;
    if (entry & kCompressed) {
      if (e & kCopied) {
        e &= ~kCopied;
        why = "COPIED flag on a compressed cluster";
      }
      const CompressedExtent c = DecodeCompressed(e, h_.cluster_bits);
      const uint64_t end = c.offset + c.bytes();
      if (data_file()) {
        e = b = 0;
        why = "compressed cluster in an image with an external data file";
      } else if (end > file_size_ && end - file_size_ >= cs()) {
        e = b = 0;
        why = "compressed data past the end of the file";
      } else if (b) {
        b = 0;
        why = "subcluster bitmap on a compressed cluster";
      }
    } else {
      if (e & kL2StdReserved) {
        e &= ~kL2StdReserved;
        why = "reserved bits set";
      }
      const uint64_t offset = e & kOffsetMask;
      const bool zero_flag = !h_.extended_l2 && (e & kZeroFlag);
      const bool allocated = offset != 0 || (!zero_flag && data_file() && (e & kCopied));
      if (!allocated) {
        if (!zero_flag && (b & kSubclusterAllAlloc)) {
          b &= ~kSubclusterAllAlloc;
          why = "subclusters allocated without a host cluster";
        }
      } else {
        if ((b >> 32) & b) {
          b &= ~((b & kSubclusterAllAlloc) << 32);  // allocated wins: keep the data
          why = "subclusters both allocated and zero";
        }
        const bool contains_data = h_.extended_l2 ? (b & kSubclusterAllAlloc) != 0 : !(e & kZeroFlag);
        if (offset & (cs() - 1)) {
          if (!contains_data) {  // as QEMU's fix_l2_entry_by_zero
            b = h_.extended_l2 ? ((b | (b << 32)) & kSubclusterAllZero) : 0;
            e = h_.extended_l2 ? 0 : kZeroFlag;
            why = "preallocated cluster not aligned; now reads as zeros";
          } else {
            e = b = 0;
            why = "data cluster not aligned";
          }
        } else if (!data_file() && offset >= file_size_) {
          e = b = 0;
          why = "data cluster past the end of the file";
        }
      }
    }
    if (why == nullptr || (e == entry && b == bitmap)) continue;
    if (planned_changes_) {
      planned_changes_->emplace_back(guest_base + j * cs(), cs());
      continue;
    }
    StoreBE64(p, e);
    if (h_.extended_l2) StoreBE64(p + 8, b);
    changed = true;
    res->corruptions_fixed++;
    Report(Kind::kRepaired, l2_offset + j * h_.l2_entry_bytes,
           Format("Repairing L2 entry %llu of the table at %#llx (%llx): %s", static_cast<ull>(j),
                  static_cast<ull>(l2_offset), static_cast<ull>(entry), why));
  }
  if (!changed) return Status::OK();
  *wrote = true;
  return file_->Write(l2_offset, table.data(), table.size());
}

}  // namespace dmcow
