// Counting references: every cluster the image's metadata points at, and
// the checks QEMU makes on the way (calculate_refcounts, check_refcounts_l1,
// check_refcounts_l2, check_refblocks, qcow2_check_bitmaps_refcounts).
//
// L2 tables are read one at a time and dropped, so memory is the reference
// counts (at most 4 bits per cluster) plus one table.
#include <algorithm>
#include <string>
#include <unordered_map>

#include "qcow2/check/qcow2_check.h"

namespace dmcow {

using namespace qcow2;
using Kind = CheckFinding::Kind;

namespace {
using ull = unsigned long long;
}  // namespace

void Qcow2Check::ReportOverflow(Qcow2CheckCounts* res, uint64_t cluster) {
  const uint64_t offset = cluster << h_.cluster_bits;
  res->corruptions++;
  Report(Kind::kCorruption, offset, Format("ERROR: overflow cluster offset=%#llx", static_cast<ull>(offset)));
  Report(Kind::kNote, offset,
         "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if "
         "the image cannot be opened for writing");
}

Status Qcow2Check::IncRefs(Qcow2CheckCounts* res, uint64_t offset, uint64_t size) {
  if (size == 0) return Status::OK();
  // The last cluster of an image may lie partly past the end of the file;
  // anything further is a corruption and is not counted.
  uint64_t end;
  if (!CheckedAdd(offset, size, &end) || end > static_cast<uint64_t>(INT64_MAX) ||
      (end > file_size_ && end - file_size_ >= cs())) {
    res->corruptions++;
    Report(Kind::kCorruption, offset,
           Format("ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                  "offset %#llx size %#llx",
                  static_cast<ull>(offset), static_cast<ull>(size)));
    return Status::OK();
  }
  const uint64_t first = offset >> h_.cluster_bits;
  const uint64_t last = (end - 1) >> h_.cluster_bits;
  if (last >= refs_.size()) refs_.Resize(last + 1);
  for (uint64_t k = first; k <= last; k++) {
    if (!refs_.Increment(k)) ReportOverflow(res, k);
  }
  return Status::OK();
}

Status Qcow2Check::CountReferences(Qcow2CheckCounts* res, uint32_t fix, bool* rebuild) {
  DMCOW_RETURN_IF_ERROR(IncRefs(res, 0, cs()));  // the header
  DMCOW_RETURN_IF_ERROR(CountL1(res, h_.l1_table_offset, h_.l1_size, true));
  if (data_file() && !snapshots_.empty()) {
    res->corruptions++;
    Report(Kind::kCorruption, h_.snapshots_offset,
           Format("ERROR %zu snapshots in image with data file", snapshots_.size()));
  }
  for (size_t i = 0; i < snapshots_.size(); i++) {
    const Snapshot& sn = snapshots_[i];
    if (sn.l1_offset & (cs() - 1)) {
      res->corruptions++;
      Report(Kind::kCorruption, sn.l1_offset,
             Format("ERROR snapshot %s (%s) l1_offset=%#llx: L1 table is not cluster aligned; snapshot table entry "
                    "corrupted",
                    sn.id.c_str(), sn.name.c_str(), static_cast<ull>(sn.l1_offset)));
      continue;
    }
    if (sn.l1_size > kMaxL1Bytes / 8) {
      res->corruptions++;
      Report(Kind::kCorruption, sn.l1_offset,
             Format("ERROR snapshot %s (%s) l1_size=%#x: L1 table is too large; snapshot table entry corrupted",
                    sn.id.c_str(), sn.name.c_str(), sn.l1_size));
      continue;
    }
    DMCOW_RETURN_IF_ERROR(CountL1(res, sn.l1_offset, sn.l1_size, false));
  }
  DMCOW_RETURN_IF_ERROR(IncRefs(res, h_.snapshots_offset, snapshots_size_));
  DMCOW_RETURN_IF_ERROR(IncRefs(res, h_.refcount_table_offset, stored_.table().size() * 8));
  if (h_.has_crypto_ext && h_.crypto_header_length) {
    DMCOW_RETURN_IF_ERROR(IncRefs(res, h_.crypto_header_offset, h_.crypto_header_length));
  }
  DMCOW_RETURN_IF_ERROR(CountBitmaps(res));
  return CheckRefblocks(res, fix, rebuild);
}

Status Qcow2Check::CountL1(Qcow2CheckCounts* res, uint64_t l1_offset, uint64_t l1_size, bool active) {
  if (l1_size == 0) return Status::OK();
  DMCOW_RETURN_IF_ERROR(IncRefs(res, l1_offset, l1_size * 8));
  std::vector<uint8_t> raw(l1_size * 8);  // at most 32 MiB (checked by the callers)
  Status s = ReadPadded(file_, l1_offset, raw.size(), raw.data());
  if (!s.ok()) {
    res->check_errors++;
    Report(Kind::kCheckError, l1_offset, "ERROR: I/O error in check_refcounts_l1: " + s.message());
    return s;
  }
  for (uint64_t i = 0; i < l1_size; i++) {
    const uint64_t entry = LoadBE64(&raw[i * 8]);
    if (entry == 0) continue;
    if (entry & kL1Reserved) {
      res->corruptions++;
      Report(Kind::kCorruption, l1_offset + i * 8,
             Format("ERROR found L1 entry with reserved bits set: %llx", static_cast<ull>(entry)));
    }
    const uint64_t l2_offset = entry & kOffsetMask;
    DMCOW_RETURN_IF_ERROR(IncRefs(res, l2_offset, cs()));
    if (l2_seen_ && l2_offset && !(l2_offset & (cs() - 1))) l2_seen_->push_back(l2_offset >> h_.cluster_bits);
    if (l2_offset & (cs() - 1)) {
      res->corruptions++;
      Report(Kind::kCorruption, l1_offset + i * 8,
             Format("ERROR l2_offset=%llx: Table is not cluster aligned; L1 entry corrupted",
                    static_cast<ull>(l2_offset)));
    }
    // check_oflag_copied, done here when nothing is repaired: it reads the
    // same tables, and skips a table whose own refcount cannot be read.
    bool copied_check = false;
    if (active && copied_inline_ && l2_offset != 0) {
      uint64_t refcount;
      if (stored_.Get(l2_offset >> h_.cluster_bits, &refcount)) {
        copied_check = true;
        if ((refcount == 1) != ((entry & kCopied) != 0)) {
          res->corruptions++;
          Report(Kind::kCorruption, l1_offset + i * 8,
                 Format("ERROR OFLAG_COPIED L2 cluster: l1_index=%llu l1_entry=%llx refcount=%llu", static_cast<ull>(i),
                        static_cast<ull>(entry), static_cast<ull>(refcount)));
        }
      }
    }
    DMCOW_RETURN_IF_ERROR(CountL2(res, l2_offset, active, copied_check));
  }
  return Status::OK();
}

Status Qcow2Check::CountL2(Qcow2CheckCounts* res, uint64_t l2_offset, bool active, bool copied_check) {
  std::vector<uint8_t> table(cs());
  Status s = ReadPadded(file_, l2_offset, table.size(), table.data());
  if (!s.ok()) {
    res->check_errors++;
    Report(Kind::kCheckError, l2_offset, "ERROR: I/O error in check_refcounts_l2: " + s.message());
    return s;
  }
  const bool frag = active;  // CHECK_FRAG_INFO: the active table only
  const uint64_t entry_bytes = h_.l2_entry_bytes;
  uint64_t next_contiguous = 0;
  for (uint64_t i = 0; i < h_.l2_entries; i++) {
    const uint8_t* p = &table[i * entry_bytes];
    const uint64_t entry = LoadBE64(p);
    const uint64_t bitmap = h_.extended_l2 ? LoadBE64(p + 8) : 0;
    if (entry == 0 && bitmap == 0) continue;  // unallocated, nothing to check
    const uint64_t entry_offset = l2_offset + i * entry_bytes;

    if (entry & kCompressed) {
      if (entry & kCopied) {
        res->corruptions++;
        const uint64_t coffset = DecodeCompressed(entry, h_.cluster_bits).offset;
        Report(Kind::kCorruption, entry_offset,
               Format("ERROR: coffset=0x%llx: copied flag must never be set for compressed clusters",
                      static_cast<ull>(coffset)));
      }
      if (data_file()) {
        res->corruptions++;
        Report(Kind::kCorruption, entry_offset,
               Format("ERROR compressed cluster %llu with data file, entry=0x%llx", static_cast<ull>(i),
                      static_cast<ull>(entry)));
        continue;
      }
      if (bitmap) {
        res->corruptions++;
        Report(Kind::kCorruption, entry_offset,
               Format("ERROR compressed cluster %llu with non-zero subcluster allocation bitmap, entry=0x%llx",
                      static_cast<ull>(i), static_cast<ull>(entry)));
        continue;
      }
      const CompressedExtent c = DecodeCompressed(entry & ~kCopied, h_.cluster_bits);
      DMCOW_RETURN_IF_ERROR(IncRefs(res, c.offset, c.bytes()));
      if (frag) {
        res->allocated_clusters++;
        res->compressed_clusters++;
        res->fragmented_clusters++;  // compressed clusters are fragmented by nature
      }
      continue;
    }

    if (entry & kL2StdReserved) {
      res->corruptions++;
      Report(Kind::kCorruption, entry_offset,
             Format("ERROR found l2 entry with reserved bits set: %llx", static_cast<ull>(entry)));
    }
    const uint64_t offset = entry & kOffsetMask;
    const bool zero_flag = !h_.extended_l2 && (entry & kZeroFlag);
    if (zero_flag && h_.version < 3) {
      // QEMU's check counts this as a zero cluster and reports nothing (nor
      // does its repair change it), while its reads refuse it; so do ours.
      // Named, not counted, so that the result stays qemu-img's.
      Report(Kind::kNote, entry_offset,
             Format("L2 entry at %#llx is a zero cluster, which a version 2 image cannot hold: reads of that cluster "
                    "fail (entry=%llx)",
                    static_cast<ull>(entry_offset), static_cast<ull>(entry)));
    }
    const bool allocated = offset != 0 || (!zero_flag && data_file() && (entry & kCopied));
    if (!allocated) {
      // QCOW2_CLUSTER_ZERO_PLAIN or QCOW2_CLUSTER_UNALLOCATED
      if (!zero_flag && (bitmap & kSubclusterAllAlloc)) {
        res->corruptions++;
        Report(Kind::kCorruption, entry_offset, "ERROR: Unallocated cluster has non-zero subcluster allocation map");
      }
      continue;
    }
    // QCOW2_CLUSTER_NORMAL or QCOW2_CLUSTER_ZERO_ALLOC
    if ((bitmap >> 32) & bitmap) {
      res->corruptions++;
      Report(Kind::kCorruption, entry_offset,
             Format("ERROR offset=%llx: Allocated cluster has corrupted subcluster allocation bitmap",
                    static_cast<ull>(offset)));
    }
    if (offset & (cs() - 1)) {
      res->corruptions++;
      const bool contains_data = h_.extended_l2 ? (bitmap & kSubclusterAllAlloc) != 0 : !(entry & kZeroFlag);
      if (!contains_data) {
        Report(Kind::kCorruption, entry_offset,
               Format("ERROR offset=%llx: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                      static_cast<ull>(offset)));
      } else {
        Report(Kind::kCorruption, entry_offset,
               Format("ERROR offset=%llx: Data cluster is not properly aligned; L2 entry corrupted.",
                      static_cast<ull>(offset)));
      }
    }
    if (frag) {
      res->allocated_clusters++;
      if (next_contiguous && offset != next_contiguous) res->fragmented_clusters++;
      next_contiguous = offset + cs();
    }
    if (!data_file()) {
      // IncRefs, inlined for the common case: one aligned cluster in the file.
      const uint64_t k = offset >> h_.cluster_bits;
      if (!(offset & (cs() - 1)) && offset < file_size_ && k < refs_.size()) {
        if (!refs_.Increment(k)) ReportOverflow(res, k);
        continue;
      }
      DMCOW_RETURN_IF_ERROR(IncRefs(res, offset, cs()));
    }
  }
  if (copied_check) CopiedInL2(res, table.data(), false, nullptr);
  return Status::OK();
}

void Qcow2Check::NoteOverlaps(const std::vector<uint64_t>& l2_clusters) {
  std::vector<MetaRange> list = MetadataList();
  for (uint64_t c : l2_clusters) list.push_back({c, c + 1, "L2 table"});
  std::sort(list.begin(), list.end(), [](const MetaRange& a, const MetaRange& b) { return a.first < b.first; });
  std::unordered_map<uint64_t, uint64_t> uses;  // cluster -> references from these structures
  for (size_t i = 0; i < list.size(); i++) {
    const MetaRange& a = list[i];
    for (uint64_t c = a.first; c < a.end; c++) uses[c]++;
    for (size_t j = i + 1; j < list.size() && list[j].first < a.end; j++) {
      const MetaRange& b = list[j];
      const bool shared_l2 = a.first == b.first && a.end == b.end && std::string(a.kind) == "L2 table" &&
                             std::string(b.kind) == "L2 table";  // a table shared with a snapshot
      if (shared_l2) continue;
      Report(Kind::kNote, b.first << h_.cluster_bits,
             Format("%s at %#llx overlaps %s at %#llx", b.kind, static_cast<ull>(b.first << h_.cluster_bits), a.kind,
                    static_cast<ull>(a.first << h_.cluster_bits)));
    }
  }
  for (const MetaRange& r : list) {
    for (uint64_t c = r.first; c < r.end && c < refs_.size(); c++) {
      const uint64_t counted = refs_.Get(c);
      if (counted <= uses[c] || counted == refs_.max()) continue;
      Report(Kind::kNote, c << h_.cluster_bits,
             Format("cluster %#llx holds the %s and is also referenced as data by an L2 entry",
                    static_cast<ull>(c << h_.cluster_bits), r.kind));
      uses[c] = counted;  // once per cluster
    }
  }
}

Status Qcow2Check::CountBitmaps(Qcow2CheckCounts* res) {
  if (!h_.has_bitmaps_ext || h_.nb_bitmaps == 0) return Status::OK();
  DMCOW_RETURN_IF_ERROR(IncRefs(res, h_.bitmap_directory_offset, h_.bitmap_directory_size));
  // The directory itself was validated when the image was opened.
  std::vector<uint8_t> dir(h_.bitmap_directory_size);
  DMCOW_RETURN_IF_ERROR(ReadPadded(file_, h_.bitmap_directory_offset, dir.size(), dir.data()));
  constexpr uint64_t kEntryReserved = 0xff000000000001feULL;
  for (uint64_t pos = 0; pos + 24 <= dir.size();) {
    const uint8_t* e = &dir[pos];
    const uint64_t table_offset = LoadBE64(e);
    const uint32_t table_entries = LoadBE32(e + 8);
    const uint64_t entry_size = (24 + uint64_t{LoadBE32(e + 20)} + LoadBE16(e + 18) + 7) & ~uint64_t{7};
    pos += entry_size;
    DMCOW_RETURN_IF_ERROR(IncRefs(res, table_offset, uint64_t{table_entries} * 8));
    std::vector<uint8_t> raw(uint64_t{table_entries} * 8);  // bounded at open (512 MiB of bitmap)
    DMCOW_RETURN_IF_ERROR(ReadPadded(file_, table_offset, raw.size(), raw.data()));
    // QEMU refuses the whole table (and ends the check) on one bad entry.
    for (uint32_t i = 0; i < table_entries; i++) {
      const uint64_t entry = LoadBE64(&raw[i * 8]);
      const uint64_t offset = entry & kOffsetMask;
      if ((entry & kEntryReserved) || (offset && ((entry & 1) || (offset & (cs() - 1))))) {
        res->corruptions++;
        Report(Kind::kCorruption, table_offset + i * 8,
               Format("ERROR bitmap table entry %u at %#llx is invalid: %#llx", i,
                      static_cast<ull>(table_offset + i * 8), static_cast<ull>(entry)));
        return Status::Corrupt(name() + ": bitmap table at " + Hex(table_offset) + " has an invalid entry");
      }
    }
    for (uint32_t i = 0; i < table_entries; i++) {
      const uint64_t offset = LoadBE64(&raw[i * 8]) & kOffsetMask;
      if (offset) DMCOW_RETURN_IF_ERROR(IncRefs(res, offset, cs()));
    }
  }
  return Status::OK();
}

Status Qcow2Check::CheckRefblocks(Qcow2CheckCounts* res, uint32_t fix, bool* rebuild) {
  const std::vector<uint64_t>& table = stored_.table();
  for (uint64_t i = 0; i < table.size(); i++) {
    const uint64_t offset = table[i] & kRefTableOffsetMask;
    const uint64_t cluster = offset >> h_.cluster_bits;
    if (table[i] & kRefTableReserved) {
      res->corruptions++;
      *rebuild = true;
      Report(Kind::kCorruption, h_.refcount_table_offset + i * 8,
             Format("ERROR refcount table entry %llu has reserved bits set", static_cast<ull>(i)));
      continue;
    }
    if (offset & (cs() - 1)) {
      res->corruptions++;
      *rebuild = true;
      Report(Kind::kCorruption, h_.refcount_table_offset + i * 8,
             Format("ERROR refcount block %llu is not cluster aligned; refcount table entry corrupted",
                    static_cast<ull>(i)));
      continue;
    }
    if (cluster >= refs_.size()) {
      res->corruptions++;
      const bool repair = fix & kFixErrors;
      Report(repair ? Kind::kRepaired : Kind::kCorruption, offset,
             Format("%s refcount block %llu is outside image", repair ? "Repairing" : "ERROR", static_cast<ull>(i)));
      if (repair) {
        // Grow the file so that the block exists (it reads as zeros).
        Status s = GrowFileForRefblock(offset);
        if (s.ok() && cluster < refs_.size()) {
          res->corruptions--;
          res->corruptions_fixed++;
          DMCOW_RETURN_IF_ERROR(IncRefs(res, offset, cs()));
          continue;
        }
        *rebuild = true;
        Report(Kind::kCheckError, offset, "ERROR could not resize image: " + s.message());
      }
      continue;
    }
    if (offset == 0) continue;
    DMCOW_RETURN_IF_ERROR(IncRefs(res, offset, cs()));
    const uint64_t count = refs_.Get(cluster);
    if (count != 1) {
      res->corruptions++;
      *rebuild = true;
      Report(Kind::kCorruption, offset,
             Format("ERROR refcount block %llu refcount=%llu", static_cast<ull>(i), static_cast<ull>(count)));
    }
  }
  return Status::OK();
}

}  // namespace dmcow
