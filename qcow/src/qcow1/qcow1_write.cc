// Writes into legacy qcow (version 1) images, and the order in which they
// reach the disk.
//
// The format has no refcounts: as QEMU's block/qcow.c does, every new data
// cluster and every new L2 table is appended at the end of the file (its
// start rounded up to the cluster size), and every compressed cluster is
// appended at the end of the file too, not cluster aligned (QEMU asks for
// the file length, which it knows in whole 512-byte sectors, so its
// compressed data starts on a sector boundary; we do the same). Space that
// stops being referenced (a compressed cluster rewritten, an entry cleared
// by WriteZeroes) is never reused: it is leaked in the file, as with QEMU,
// and only a convert reclaims it. Because nothing is ever reused, no write
// can land on space that a durable table still points at for other data.
//
// METADATA ORDERING. These rules keep an image consistent across a crash.
// "Durable" means written and followed by a completed File::Sync.
//
//  (1) Data, including copy-on-write data copied from a backing file or
//      from a compressed cluster, and compressed payloads, is durable before
//      the L2 entry that makes it visible. L2 entries change only in the
//      cache; Flush syncs the file before it writes any L2 slice.
//  (2) A new L2 table is durable, zeroed and filled, before the L1 entry
//      that points at it. Its zeros are written when it is appended; Flush
//      writes the dirty L2 slices and syncs before it writes any L1 entry.
//  (3) Flush returns only when every write issued before it is durable.
//      Dirty L2 slices are never evicted from the cache between flushes;
//      when too many accumulate, a flush is forced (MaybeFlush), which keeps
//      memory bounded by OpenOptions::l2_cache_bytes (plus at most half of it
//      again, at least 8 slices, of dirty slices).
// Consequences: a crash at any point leaves an image whose tables reference
// only fully written clusters and tables; space appended but not yet
// referenced is leaked (QEMU ignores it). Writes not yet flushed may be lost
// or (for in-place overwrites of uncompressed clusters) torn; flushed ones
// never are. An L2 entry is 8 bytes inside one sector, so a torn L2 slice
// write leaves each entry old or new, both valid by (1).
// tests/crash_test.cc drops and tears unsynced writes at every point of
// seeded write sequences and checks both claims with QEMU.
#include <algorithm>
#include <climits>
#include <cstring>

#include "qcow1/qcow1_image.h"
#include "util.h"

namespace dmcow {

using namespace qcow1;

namespace {
constexpr uint64_t kMaxRunBytes = 4 << 20;  // bytes allocated and written per step
constexpr uint64_t kSector = 512;

uint64_t AlignUp(uint64_t v, uint64_t align) { return (v + align - 1) & ~(align - 1); }
}  // namespace

Status Qcow1Image::PrepareForWriting(const OpenOptions& options) {
  const std::string& name = filename();
  uint64_t size = 0;
  DMCOW_RETURN_IF_ERROR(file_->Size(&size));
  // Appends start past everything the file holds and past every L2 table the
  // L1 table names, so a new cluster never lands on a table that lies beyond
  // the end of the file. Tables whose offsets overflow can never be read
  // (lookups refuse them) and are left out.
  file_end_ = size;
  for (uint64_t i = 0; i < l1_.size(); i++) {
    const uint64_t l2 = l1_[i];
    if (l2 == 0) continue;
    uint64_t table_end;
    if (!CheckedAdd(l2, l2_table_bytes(), &table_end) || table_end > static_cast<uint64_t>(INT64_MAX)) continue;
    l2_tables_.push_back(l2);
    file_end_ = std::max(file_end_, table_end);
  }
  std::sort(l2_tables_.begin(), l2_tables_.end());
  l2_tables_.erase(std::unique(l2_tables_.begin(), l2_tables_.end()), l2_tables_.end());
  if (file_end_ > static_cast<uint64_t>(INT64_MAX) - (1ULL << 20)) {
    return Status::Corrupt(name + ": file end " + Hex(file_end_) + " leaves no room to append clusters");
  }
  (void)options;
  max_dirty_slices_ = std::max<size_t>(8, l2_cache_->capacity_slices() / 2);
  writable_ = true;
  return Status::OK();
}

Qcow1Image::~Qcow1Image() {
  if (writable_) {
    WriterLock lock(&rw_mu_);
    (void)FlushLocked();  // best effort: callers that care call Flush and check it
  }
}

bool Qcow1Image::OverlapsMetadata(uint64_t offset, uint64_t len) const {
  auto overlaps = [&](uint64_t start, uint64_t n) { return offset < start + n && start < offset + len; };
  if (overlaps(0, header_end_) || overlaps(l1_offset_, l1_.size() * 8)) return true;
  // Tables all have one size, so only the last one starting before the end
  // of the range can reach into it.
  auto it = std::lower_bound(l2_tables_.begin(), l2_tables_.end(), offset + len);
  return it != l2_tables_.begin() && *std::prev(it) + l2_table_bytes() > offset;
}

Status Qcow1Image::WriteFile(uint64_t offset, const void* buf, size_t len) {
  unsynced_ = true;
  return file_->Write(offset, buf, len);
}

Status Qcow1Image::WriteGuestData(uint64_t guest, uint64_t host, const uint8_t* data, size_t n) {
  if (!info_.encrypted) return WriteFile(host, data, n);
  std::vector<uint8_t> sealed;
  uint64_t sealed_host;
  DMCOW_RETURN_IF_ERROR(SealForWrite(guest, host, data, n, &sealed, &sealed_host));
  return WriteFile(sealed_host, sealed.data(), sealed.size());
}

Status Qcow1Image::Append(uint64_t bytes, uint64_t align, const char* what, uint64_t* offset) {
  const uint64_t start = AlignUp(file_end_, align);
  uint64_t end;
  if (start < file_end_ || !CheckedAdd(start, bytes, &end) || end > static_cast<uint64_t>(INT64_MAX)) {
    return Status::IOError(filename() + ": cannot append " + std::string(what) + " of " + std::to_string(bytes) +
                           " bytes at offset " + Hex(file_end_) + ": the file would exceed the largest offset");
  }
  file_end_ = end;
  *offset = start;
  return Status::OK();
}

Status Qcow1Image::EnsureL2Table(uint64_t l1_index, uint64_t* l2_offset) {
  const uint64_t table_bytes = l2_table_bytes();
  if (l1_[l1_index] != 0) {
    *l2_offset = l1_[l1_index];
    uint64_t table_end;
    if (!CheckedAdd(*l2_offset, table_bytes, &table_end) || table_end > static_cast<uint64_t>(INT64_MAX)) {
      return Status::Corrupt(filename() + ": L2 table offset " + Hex(*l2_offset) + " is out of range");
    }
    // A table over the header or the L1 table (a hostile image) is not
    // written through: that would rewrite the header or the L1 table.
    auto overlaps = [&](uint64_t start, uint64_t n) {
      return *l2_offset < start + n && start < *l2_offset + table_bytes;
    };
    if (overlaps(0, header_end_) || overlaps(l1_offset_, l1_.size() * 8)) {
      return Status::Corrupt(filename() + ": L2 table at offset " + Hex(*l2_offset) + " (L1 index " +
                             std::to_string(l1_index) + ") overlaps the header or the L1 table");
    }
    return Status::OK();
  }
  // As QEMU: at the end of the file, cluster aligned, written as zeros now
  // (durable at the next flush, before the L1 entry is written: rule (2)).
  uint64_t fresh;
  DMCOW_RETURN_IF_ERROR(Append(table_bytes, cluster_size(), "an L2 table", &fresh));
  static const std::vector<uint8_t> zeros(8ULL << kMaxL2Bits, 0);
  DMCOW_RETURN_IF_ERROR(WriteFile(fresh, zeros.data(), table_bytes));
  l2_tables_.insert(std::upper_bound(l2_tables_.begin(), l2_tables_.end(), fresh), fresh);
  l1_.Set(l1_index, fresh);
  dirty_l1_.insert(l1_index);
  *l2_offset = fresh;
  return Status::OK();
}

Status Qcow1Image::SetL2Entry(uint64_t cluster, uint64_t entry) {
  uint64_t l2_offset;
  DMCOW_RETURN_IF_ERROR(EnsureL2Table(cluster >> l2_bits_, &l2_offset));
  const uint64_t slice_bytes = l2_cache_->slice_bytes();
  const uint64_t byte = (cluster & (l2_entries() - 1)) * 8;
  const uint64_t slice_start = byte & ~(slice_bytes - 1);
  const size_t word = (byte - slice_start) / 8;
  // The table's offset was checked against overflow by GetL2Entry (existing
  // tables) or Append (new ones).
  return l2_cache_->Modify(l2_offset + slice_start, "L2 table", [&](std::vector<uint64_t>& w) { w[word] = entry; });
}

Status Qcow1Image::MaybeFlush() {
  if (l2_cache_->dirty_count() < max_dirty_slices_) return Status::OK();
  return FlushLocked();
}

Status Qcow1Image::WriteLocked(uint64_t offset, const uint8_t* buf, size_t len) {
  const uint64_t cs = cluster_size();
  const uint64_t vsize = info_.virtual_size;
  thread_local std::vector<uint8_t> run;
  while (len > 0) {
    const uint64_t cluster = offset >> cluster_bits_;
    const uint64_t in_cluster = offset & (cs - 1);
    uint64_t entry;
    DMCOW_RETURN_IF_ERROR(GetL2Entry(cluster, &entry));

    if (entry != 0 && !(entry & kCompressed)) {
      // An uncompressed cluster: written in place, together with the
      // clusters after it that follow it on the host too.
      DMCOW_RETURN_IF_ERROR(CheckDataEntry(entry, cluster));
      uint64_t n = std::min<uint64_t>(len, cs - in_cluster);
      while (n < len && n < kMaxRunBytes) {
        uint64_t next;
        DMCOW_RETURN_IF_ERROR(GetL2Entry(cluster + (in_cluster + n) / cs, &next));
        if (next != entry + in_cluster + n || !CheckDataEntry(next, cluster + (in_cluster + n) / cs).ok()) break;
        n += std::min<uint64_t>(len - n, cs);
      }
      const uint64_t host = entry + in_cluster;
      if (OverlapsMetadata(host, n)) {
        return Status::Corrupt(filename() + ": data cluster at offset " + Hex(entry) + " for guest offset " +
                               Hex(cluster << cluster_bits_) + " overlaps the image's metadata; not writing there");
      }
      DMCOW_RETURN_IF_ERROR(WriteGuestData(offset, host, buf, static_cast<size_t>(n)));
      // Clusters that lay beyond the end of the file (reading as zeros) are
      // now part of it: nothing may be appended over them.
      file_end_ = std::max(file_end_, entry + AlignUp(in_cluster + n, cs));
      offset += n;
      buf += n;
      len -= n;
      continue;
    }

    // A run of clusters (in one L2 table) that all need new space: filled
    // with their current content where the write covers them partly (from
    // the backing chain, or decompressed), appended together, written in one
    // go. A compressed cluster is never modified in place: it is replaced.
    const uint64_t end = offset + len;
    uint64_t count = 1;
    while (count * cs < kMaxRunBytes && (cluster + count) * cs < end && (cluster + count) % l2_entries() != 0) {
      uint64_t next;
      DMCOW_RETURN_IF_ERROR(GetL2Entry(cluster + count, &next));
      if (next != 0 && !(next & kCompressed)) break;
      count++;
    }
    const uint64_t run_start = cluster * cs;
    run.resize(count * cs);
    auto fill_current = [&](uint64_t index) REQUIRES(rw_mu_) -> Status {
      const uint64_t guest = run_start + index * cs;
      const uint64_t n = std::min(cs, vsize - guest);
      std::memset(run.data() + index * cs + n, 0, cs - n);
      return ReadLocked(guest, run.data() + index * cs, n);
    };
    if (in_cluster != 0 || end < run_start + cs) DMCOW_RETURN_IF_ERROR(fill_current(0));
    const uint64_t run_end = run_start + count * cs;
    if (count > 1 && end < run_end) DMCOW_RETURN_IF_ERROR(fill_current(count - 1));
    const size_t n = static_cast<size_t>(std::min<uint64_t>(len, run_end - offset));
    std::memcpy(run.data() + in_cluster, buf, n);

    // As QEMU: the L2 table first (if new), then the data after it.
    uint64_t l2_offset, host;
    DMCOW_RETURN_IF_ERROR(EnsureL2Table(cluster >> l2_bits_, &l2_offset));
    DMCOW_RETURN_IF_ERROR(Append(run.size(), cs, "data clusters", &host));
    DMCOW_RETURN_IF_ERROR(WriteGuestData(run_start, host, run.data(), run.size()));
    for (uint64_t i = 0; i < count; i++) DMCOW_RETURN_IF_ERROR(SetL2Entry(cluster + i, host + i * cs));
    offset += n;
    buf += n;
    len -= n;
    DMCOW_RETURN_IF_ERROR(MaybeFlush());
  }
  return Status::OK();
}

Status Qcow1Image::Write(uint64_t offset, const void* buf, size_t len) {
  if (!writable_) return Image::Write(offset, buf, len);
  DMCOW_RETURN_IF_ERROR(CheckWriteRange(offset, len));
  WriterLock lock(&rw_mu_);
  return WriteLocked(offset, static_cast<const uint8_t*>(buf), len);
}

Status Qcow1Image::ZeroLocked(uint64_t offset, uint64_t len) {
  static const std::vector<uint8_t> zeros(1 << 20, 0);
  const uint64_t cs = cluster_size();
  const uint64_t end = offset + len;
  const bool has_backing = !info_.backing_filename.empty();
  // Zeros written as data, except over clusters that already read as zeros
  // (unallocated, with nothing underneath).
  auto as_data = [&](uint64_t from, uint64_t to) REQUIRES(rw_mu_) -> Status {
    for (uint64_t pos = from; pos < to;) {
      const uint64_t cluster_end = std::min((pos | (cs - 1)) + 1, to);
      uint64_t entry;
      DMCOW_RETURN_IF_ERROR(GetL2Entry(pos >> cluster_bits_, &entry));
      if (entry == 0 && !has_backing) {
        pos = cluster_end;
        continue;
      }
      // Several clusters per call when they are large runs (backing files).
      const uint64_t stop = has_backing ? to : cluster_end;
      const size_t n = static_cast<size_t>(std::min<uint64_t>(stop - pos, zeros.size()));
      DMCOW_RETURN_IF_ERROR(WriteLocked(pos, zeros.data(), n));
      pos += n;
    }
    return Status::OK();
  };
  // Over a backing file only data can hide what lies beneath: qcow v1 has no
  // zero flag.
  if (has_backing) return as_data(offset, end);

  const uint64_t first_full = AlignUp(offset, cs);
  const uint64_t last_full = end == info_.virtual_size ? AlignUp(end, cs) : end & ~(cs - 1);
  if (first_full >= last_full) return as_data(offset, end);
  DMCOW_RETURN_IF_ERROR(as_data(offset, first_full));
  // Whole clusters with no backing file: a cleared entry (0) reads as zeros.
  // The cluster it pointed at is leaked in the file, as QEMU would leave it
  // (qcow v1 cannot free space); a later write appends a new cluster.
  for (uint64_t pos = first_full; pos < last_full;) {
    const uint64_t cluster = pos >> cluster_bits_;
    if (l1_[cluster >> l2_bits_] == 0) {  // a whole missing table reads as zeros
      pos = std::min(last_full, ((cluster >> l2_bits_) + 1) << shift());
      continue;
    }
    uint64_t entry;
    DMCOW_RETURN_IF_ERROR(GetL2Entry(cluster, &entry));
    if (entry != 0) {
      DMCOW_RETURN_IF_ERROR(SetL2Entry(cluster, 0));
      DMCOW_RETURN_IF_ERROR(MaybeFlush());
    }
    pos += cs;
  }
  return as_data(std::min(last_full, end), end);
}

Status Qcow1Image::WriteZeroes(uint64_t offset, uint64_t len) {
  if (!writable_) return Image::WriteZeroes(offset, len);
  uint64_t end;
  if (!CheckedAdd(offset, len, &end) || end > info_.virtual_size) {
    return Status::InvalidArgument(filename() + ": zero write of " + std::to_string(len) + " bytes at offset " +
                                   Hex(offset) + " goes past the virtual size");
  }
  WriterLock lock(&rw_mu_);
  return ZeroLocked(offset, len);
}

Status Qcow1Image::Discard(uint64_t offset, uint64_t len) {
  if (!writable_) return Image::Discard(offset, len);
  uint64_t end;
  if (!CheckedAdd(offset, len, &end) || end > info_.virtual_size) {
    return Status::InvalidArgument(filename() + ": discard of " + std::to_string(len) + " bytes at offset " +
                                   Hex(offset) + " goes past the virtual size");
  }
  // qcow v1 can never free space (nothing is reused), so a discard would
  // only trade stored data for a leak and make the next write append: it is
  // a hint, and we leave the image unchanged.
  return Status::OK();
}

Status Qcow1Image::WriteCompressedCluster(uint64_t offset, const void* payload, size_t len) {
  if (!writable_) return Image::WriteCompressedCluster(offset, payload, len);
  const uint64_t cs = cluster_size();
  if (offset >= info_.virtual_size || (offset & (cs - 1)) != 0) {
    return Status::InvalidArgument(filename() + ": compressed cluster at guest offset " + Hex(offset) +
                                   " is not a cluster inside the disk");
  }
  if (info_.encrypted)
    return Status::NotSupported(filename() + ": Compression and encryption not supported at the same time");
  if (payload == nullptr || len == 0 || len >= cs) {
    return Status::InvalidArgument(filename() + ": compressed cluster at guest offset " + Hex(offset) + " has " +
                                   std::to_string(len) + " bytes; it must be 1 to " + std::to_string(cs - 1));
  }
  // qcow v1 stores raw deflate only; a payload that does not inflate to a
  // whole cluster (zstd, or a stream cut short) would make an image no one
  // can read. Checked before taking the lock: inflating costs little.
  std::vector<uint8_t> check(cs);
  Status inflated = DecompressCluster(CompressionType::kDeflate, static_cast<const uint8_t*>(payload), len,
                                      check.data(), check.size());
  if (!inflated.ok()) {
    return Status::InvalidArgument(filename() + ": compressed cluster for guest offset " + Hex(offset) +
                                   " is not a zlib (raw deflate) payload of one cluster: " + inflated.message());
  }
  WriterLock lock(&rw_mu_);
  const uint64_t cluster = offset >> cluster_bits_;
  uint64_t l2_offset, host;
  DMCOW_RETURN_IF_ERROR(EnsureL2Table(cluster >> l2_bits_, &l2_offset));
  // As QEMU: at the end of the file, which it knows in whole sectors.
  DMCOW_RETURN_IF_ERROR(Append(len, kSector, "a compressed cluster", &host));
  if (host > MaxCompressedOffset(cluster_bits_)) {
    return Status::IOError(filename() + ": compressed cluster offset " + Hex(host) +
                           " does not fit in a qcow descriptor");
  }
  DMCOW_RETURN_IF_ERROR(WriteFile(host, payload, len));
  DMCOW_RETURN_IF_ERROR(SetL2Entry(cluster, EncodeCompressed(host, len, cluster_bits_)));
  return MaybeFlush();
}

Status Qcow1Image::FlushLocked() {
  // (1) data and new tables' zeros, then (2) L2 slices, then L1 entries.
  if (unsynced_) {
    DMCOW_RETURN_IF_ERROR(file_->Sync());
    unsynced_ = false;
  }
  DMCOW_RETURN_IF_ERROR(l2_cache_->Flush());
  if (!dirty_l1_.empty()) {
    for (uint64_t index : dirty_l1_) {
      uint8_t raw[8];
      StoreBE64(raw, l1_[index]);
      DMCOW_RETURN_IF_ERROR(file_->Write(l1_offset_ + index * 8, raw, sizeof(raw)));
    }
    DMCOW_RETURN_IF_ERROR(file_->Sync());
    dirty_l1_.clear();  // only now: a failed sync leaves them to be written again
  }
  return Status::OK();
}

Status Qcow1Image::Flush() {
  if (!writable_) return Status::OK();
  WriterLock lock(&rw_mu_);
  return FlushLocked();
}

// As QEMU's qcow_make_empty: the L1 table is zeroed (durably), then the
// file is cut after it. Nothing can point past the L1 table once it is
// zero, so the truncation cannot lose live data even if it is torn.
Status Qcow1Image::MakeEmpty() {
  if (!writable_) return Image::MakeEmpty();
  WriterLock lock(&rw_mu_);
  DMCOW_RETURN_IF_ERROR(FlushLocked());
  const std::vector<uint8_t> zeros(l1_.size() * 8, 0);
  DMCOW_RETURN_IF_ERROR(file_->Write(l1_offset_, zeros.data(), zeros.size()));
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  l1_.Clear();
  l2_tables_.clear();
  // Cached slices of the dropped tables must not be found again when new
  // tables are appended at the same offsets.
  l2_cache_ = std::make_unique<TableCache>(file_.get(), l2_cache_->slice_bytes(),
                                           l2_cache_->capacity_slices() * l2_cache_->slice_bytes());
  compressed_->Invalidate();
  const uint64_t end = l1_offset_ + zeros.size();
  DMCOW_RETURN_IF_ERROR(file_->Truncate(std::max(end, header_end_)));
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  file_end_ = std::max(end, header_end_);
  return Status::OK();
}

}  // namespace dmcow
