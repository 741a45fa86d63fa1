// Check of legacy qcow (version 1) images, which qemu-img cannot check.
//
// The format has no refcounts, so there are no leaks to count; what can be
// wrong is where entries point. Every L1 entry must name a sector-aligned L2
// table inside the file; every L2 entry a sector-aligned data cluster (QEMU
// refuses to read others) or compressed data inside the file; and no
// cluster may serve two purposes (tables, data, the header), since a write
// through one would change the other. Compressed clusters may share host
// clusters with each other (QEMU packs them), but not with anything else.
// Each violation is one corruption. The header rules are those of opening
// (qcow1_image.cc); an image that breaks them cannot be checked.
#include <algorithm>
#include <memory>

#include "image/check_internal.h"
#include "qcow2/check/qcow2_check.h"  // CheckReporter, Format
#include "qcow2/check/qcow2_check_io.h"
#include "util.h"

namespace dmcow {
namespace {

using Kind = CheckFinding::Kind;
using ull = unsigned long long;

constexpr uint64_t kCompressedFlag = 1ULL << 63;
constexpr uint64_t kMaxL1Bytes = 32 << 20;  // as qcow1_image.cc

class Qcow1Check {
 public:
  Qcow1Check(File* file, CheckReporter* reporter, CheckResult* result)
      : file_(file), reporter_(reporter), result_(result) {}

  Status Run() {
    const std::string& name = file_->name();
    DMCOW_RETURN_IF_ERROR(file_->Size(&file_size_));
    uint8_t h[48];
    size_t got = 0;
    DMCOW_RETURN_IF_ERROR(file_->Read(0, sizeof(h), h, &got));
    if (got < sizeof(h) || LoadBE32(h) != 0x514649fb || LoadBE32(h + 4) != 1) {
      return Status::Corrupt(name + ": not a qcow (version 1) image");
    }
    const uint64_t backing_offset = LoadBE64(h + 8);
    const uint32_t backing_size = LoadBE32(h + 16);
    const uint64_t size = LoadBE64(h + 24);
    cluster_bits_ = h[32];
    l2_bits_ = h[33];
    const uint64_t l1_offset = LoadBE64(h + 40);
    if (size <= 1 || cluster_bits_ < 9 || cluster_bits_ > 16 || l2_bits_ < 6 || l2_bits_ > 13 || LoadBE32(h + 36) > 1 ||
        size > static_cast<uint64_t>(INT64_MAX) - (1ULL << (cluster_bits_ + l2_bits_))) {
      return Status::Corrupt(name + ": invalid qcow header (cluster, table or virtual size)");
    }
    cs_ = 1ULL << cluster_bits_;
    const uint32_t shift = cluster_bits_ + l2_bits_;
    const uint64_t l1_entries = (size + (1ULL << shift) - 1) >> shift;
    if (l1_entries * 8 > kMaxL1Bytes) return Status::Corrupt(name + ": L1 table too large");
    result_->total_clusters = DivRoundUp(size, cs_);
    result_->opened = true;

    use_.assign(DivRoundUp(file_size_, cs_), kFree);
    // The header, the backing file name and the L1 table are written
    // together by the creator and may share clusters.
    Claim(0, 48, kHeaderArea, "the header");
    if (backing_offset) Claim(backing_offset, backing_size, kHeaderArea, "the backing file name");
    if (!Inside(l1_offset, l1_entries * 8)) {
      return Status::Corrupt(name + ": L1 table at " + Hex(l1_offset) + " lies beyond the end of the file");
    }
    Claim(l1_offset, l1_entries * 8, kHeaderArea, "the L1 table");

    std::vector<uint8_t> raw(l1_entries * 8);
    DMCOW_RETURN_IF_ERROR(ReadPadded(file_, l1_offset, raw.size(), raw.data()));
    const uint64_t l2_bytes = 8ULL << l2_bits_;
    std::vector<uint64_t> tables;  // valid L2 tables, by L1 index order
    for (uint64_t i = 0; i < l1_entries; i++) {
      const uint64_t l2 = LoadBE64(&raw[i * 8]);
      if (l2 == 0) {
        tables.push_back(0);
        continue;
      }
      const char* why = (l2 & 511)              ? "is not sector aligned"
                        : !Inside(l2, l2_bytes) ? "lies beyond the end of the file"
                                                : nullptr;
      if (why) {
        Corrupt(l1_offset + i * 8, Format("ERROR L1 entry %llu: L2 table offset %#llx %s", static_cast<ull>(i),
                                          static_cast<ull>(l2), why));
        tables.push_back(0);
        continue;
      }
      Claim(l2, l2_bytes, kOwned, Format("the L2 table of L1 entry %llu", static_cast<ull>(i)).c_str());
      tables.push_back(l2);
    }
    uint64_t end = 0;
    for (size_t k = 0; k < use_.size(); k++) {
      if (use_[k] != kFree) end = k + 1;
    }
    std::vector<uint8_t> table(l2_bytes);
    for (uint64_t i = 0; i < l1_entries; i++) {
      if (tables[i] == 0) continue;
      DMCOW_RETURN_IF_ERROR(ReadPadded(file_, tables[i], table.size(), table.data()));
      uint64_t next_contiguous = 0;
      for (uint64_t j = 0; j < (1ULL << l2_bits_); j++) {
        const uint64_t entry = LoadBE64(&table[j * 8]);
        if (entry == 0) continue;
        const uint64_t where = tables[i] + j * 8;
        const uint64_t guest = ((i << l2_bits_) + j) << cluster_bits_;
        result_->allocated_clusters++;
        if (entry & kCompressedFlag) {
          result_->compressed_clusters++;
          result_->fragmented_clusters++;
          const uint32_t bits = 63 - cluster_bits_;
          const uint64_t offset = entry & ((1ULL << bits) - 1);
          const uint64_t bytes = (entry >> bits) & (cs_ - 1);
          if (bytes == 0 || !Inside(offset, bytes)) {
            Corrupt(where, Format("ERROR guest offset %#llx: compressed data at %#llx (%llu bytes) %s",
                                  static_cast<ull>(guest), static_cast<ull>(offset), static_cast<ull>(bytes),
                                  bytes == 0 ? "is empty" : "lies beyond the end of the file"));
            continue;
          }
          Claim(offset, bytes, kCompressed,
                Format("compressed data of guest offset %#llx", static_cast<ull>(guest)).c_str());
          end = std::max(end, DivRoundUp(offset + bytes, cs_));
          continue;
        }
        if (next_contiguous && entry != next_contiguous) result_->fragmented_clusters++;
        next_contiguous = entry + cs_;
        if ((entry & 511) || entry >= file_size_ || entry > static_cast<uint64_t>(INT64_MAX) - cs_) {
          Corrupt(where, Format("ERROR guest offset %#llx: data cluster offset %#llx %s", static_cast<ull>(guest),
                                static_cast<ull>(entry),
                                (entry & 511) ? "is not sector aligned" : "lies beyond the end of the file"));
          continue;
        }
        Claim(entry, cs_, kOwned, Format("the data of guest offset %#llx", static_cast<ull>(guest)).c_str());
        end = std::max(end, DivRoundUp(entry + cs_, cs_));
      }
    }
    result_->image_end_offset = end * cs_;
    return Status::OK();
  }

 private:
  bool Inside(uint64_t offset, uint64_t bytes) const {
    uint64_t end;
    return CheckedAdd(offset, bytes, &end) && end <= file_size_;
  }

  void Corrupt(uint64_t offset, std::string message) {
    result_->corruptions++;
    reporter_->Report(Kind::kCorruption, offset, std::move(message));
  }

  // What a host cluster holds. Header-area structures may share clusters
  // with each other, compressed data with other compressed data; nothing
  // else may share.
  enum Use : uint8_t { kFree, kHeaderArea, kOwned, kCompressed };

  // Marks the clusters of [offset, offset + bytes) as used by `what`; a
  // cluster already used otherwise is an overlap. Parts past the end of the
  // file are ignored (they were reported already).
  void Claim(uint64_t offset, uint64_t bytes, Use use, const char* what) {
    if (bytes == 0) return;
    for (uint64_t c = offset >> cluster_bits_; c <= (offset + bytes - 1) >> cluster_bits_ && c < use_.size(); c++) {
      if (use_[c] == kFree) {
        use_[c] = use;
      } else if (use_[c] != use || use == kOwned) {
        Corrupt(c << cluster_bits_, Format("ERROR cluster %#llx holds %s and is also used by other data or metadata",
                                           static_cast<ull>(c << cluster_bits_), what));
      }
    }
  }

  File* const file_;
  CheckReporter* const reporter_;
  CheckResult* const result_;
  uint64_t file_size_ = 0;
  uint32_t cluster_bits_ = 0, l2_bits_ = 0;
  uint64_t cs_ = 0;
  std::vector<Use> use_;  // per host cluster of the file
};

}  // namespace

Status CheckQcow1(File* file, const CheckOptions& options, CheckResult* result) {
  if (options.repair != RepairMode::kNone) {
    result->opened = true;
    return Status::NotSupported("Repairing qcow (version 1) images is not supported");
  }
  CheckReporter reporter(options, result);
  return Qcow1Check(file, &reporter, result).Run();
}

}  // namespace dmcow
