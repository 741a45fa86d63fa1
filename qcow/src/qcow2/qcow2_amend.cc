// qemu-img amend's changes to a qcow2 image: the version (compat), the
// refcount width (refcount_bits) and lazy refcounts.
//
// ORDERING. None of these changes what the guest reads, and a crash at any
// point must leave the image as before or as after, with at most leaked
// clusters. Besides the rules at the top of qcow2_write.cc (which the zero
// cluster expansion's table writes follow) and the header rules of
// qcow2_backing.cc (B1-B3: every header change below is one sector write,
// synced, made after what it names is durable):
//  (A1) Upgrade (2 to 3): a snapshot table whose entries lack the disk size
//       (fewer than 16 bytes of extra data, which version 3 requires) is
//       rewritten first (S3 of qcow2_snapshot.cc); then the header.
//  (A2) Downgrade (3 to 2): every refusal is decided before anything is
//       written. Zero clusters are expanded while the image is still version
//       3, which reads a zero cluster and a zeroed data cluster alike: the
//       zeros, and the refcount of a new cluster, are durable before the L2
//       entry naming it (rules 1-2); a data cluster some table outside this
//       L2 table also references is never zeroed in place (QEMU zeroes it,
//       changing what a snapshot reads): the entry gets a new zeroed cluster
//       and the old one loses this table's references after the entry is
//       durable (rule 4). Every refcount is made durable (the dirty bit
//       cleared), then the version 2 header is written, without the
//       persistent bitmaps it cannot hold; only then are their clusters
//       freed (a crash in between leaks them).
//  (A3) Refcount width: the new refcount table and blocks are written past
//       every allocated cluster and synced while the header still names the
//       old ones, which stay untouched; the header switch names the new ones;
//       the old ones, not counted in the new blocks, are free space from then
//       on.
//  (A4) Lazy refcounts off: every refcount is durable and the dirty bit
//       clear (the closing flush) before the compatible bit goes.
#include <algorithm>

#include "qcow2/qcow2_bitmaps.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/qcow2_metadata_tables.h"
#include "util.h"

namespace dmcow {

using namespace qcow2;

namespace {

constexpr uint64_t kMaxVmStateSizeV2 = UINT32_MAX;  // a version 2 snapshot entry holds 32 bits

// Stores `value` as entry `index` of a refcount block of `bits`-bit entries:
// wide entries big-endian, narrow ones filling each byte from its least
// significant bit (as Qcow2Refcounts reads them).
void StoreRefcount(uint8_t* block, uint64_t index, uint32_t bits, uint64_t value) {
  if (bits >= 8) {
    const uint32_t bytes = bits / 8;
    for (uint32_t i = 0; i < bytes; i++)
      block[index * bytes + i] = static_cast<uint8_t>(value >> (8 * (bytes - 1 - i)));
    return;
  }
  const uint64_t bit = index * bits;
  block[bit / 8] |= static_cast<uint8_t>(value << (bit % 8));
}

}  // namespace

template <typename Visit>
Status Qcow2Image::VisitL2Entries(const std::vector<uint64_t>& l1, Visit&& visit) {
  const uint64_t cs = header_.cluster_size;
  uint64_t file_size = 0;
  DMCOW_RETURN_IF_ERROR(file_->Size(&file_size));
  for (uint64_t i = 0; i < l1.size(); i++) {
    const uint64_t l2 = l1[i] & kOffsetMask;
    if (l2 == 0) continue;
    if ((l2 & (cs - 1)) || l2 >= file_size) {
      return Status::Corrupt(filename() + ": L2 table offset " + Hex(l2) + " (L1 index " + std::to_string(i) +
                             ") is not cluster aligned or past the end of the file");
    }
    for (uint64_t s = 0; s < cs; s += l2_cache_->slice_bytes()) {
      TableCache::Slice slice;
      DMCOW_RETURN_IF_ERROR(l2_cache_->Get(l2 + s, "L2 table", &slice));
      for (size_t w = 0; w < slice->size(); w += header_.l2_entry_bytes / 8) {
        DMCOW_RETURN_IF_ERROR(visit((*slice)[w], file_size));
      }
    }
  }
  return Status::OK();
}

Status Qcow2Image::ChangeVersion(uint32_t version, const AmendProgress& progress) {
  if (!writable_) return Image::ChangeVersion(version, progress);
  if (version != 2 && version != 3) {
    return Status::InvalidArgument(filename() + ": version " + std::to_string(version) + " is not 2 or 3");
  }
  if (version == header_.version) return Status::OK();
  return WriteStep([&]() REQUIRES(rw_mu_) {
    return version > header_.version ? UpgradeLocked(progress) : DowngradeLocked(progress);
  });
}

Status Qcow2Image::UpgradeLocked(const AmendProgress& progress) {
  if (progress) progress(0, 2);
  DMCOW_RETURN_IF_ERROR(FlushLocked());
  std::vector<SnapshotInfo> snapshots;
  std::vector<std::vector<uint8_t>> unknown_extra;
  DMCOW_RETURN_IF_ERROR(ReadQcow2Snapshots(file_.get(), header_, &snapshots, &unknown_extra));
  const bool short_entries =
      std::any_of(snapshots.begin(), snapshots.end(), [](const SnapshotInfo& s) { return !s.has_disk_size; });
  if (short_entries) {  // (A1)
    for (SnapshotInfo& s : snapshots) {
      if (!s.has_disk_size) {
        s.has_disk_size = true;
        s.disk_size = info_.virtual_size;  // what QEMU assumes of them
      }
    }
    DMCOW_RETURN_IF_ERROR(WriteSnapshotTable(snapshots, unknown_extra));
    DMCOW_RETURN_IF_ERROR(FlushLocked());
  }
  if (progress) progress(1, 2);
  Qcow2Header next = header_;
  next.version = 3;
  next.incompatible_features = next.compatible_features = next.autoclear_features = 0;
  next.refcount_order = 4;
  next.compression_type = 0;
  DMCOW_RETURN_IF_ERROR(WriteHeaderLocked(std::move(next)));
  info_.version = 3;
  info_.snapshots = snapshots;
  if (progress) progress(2, 2);
  return Status::OK();
}

Status Qcow2Image::DowngradeLocked(const AmendProgress& progress) {
  const std::string& name = filename();
  auto refuse = [&](const std::string& why) { return Status::InvalidArgument(name + ": " + why); };
  if (header_.refcount_order != 4) return refuse("compat=0.10 requires refcount_bits=16");
  if (header_.HasDataFile()) return refuse("Cannot downgrade an image with a data file");
  DMCOW_RETURN_IF_ERROR(FlushLocked(/*closing=*/true));  // every refcount durable, the dirty bit clear
  std::vector<SnapshotInfo> snapshots;
  DMCOW_RETURN_IF_ERROR(ReadQcow2Snapshots(file_.get(), header_, &snapshots));
  for (const SnapshotInfo& s : snapshots) {
    if (s.vm_state_size > kMaxVmStateSizeV2 || s.disk_size != info_.virtual_size) {
      return refuse("Internal snapshots prevent downgrade of image");
    }
  }
  const uint64_t other = header_.incompatible_features & ~(kIncompatCompression | kIncompatDirty);
  if (other != 0) {
    char hex[32];
    std::snprintf(hex, sizeof(hex), "0x%llx", static_cast<unsigned long long>(other));
    return refuse(std::string("Cannot downgrade an image with incompatible features ") + hex + " set");
  }
  // Every tree, validated, and no compressed cluster left in zstd.
  std::vector<std::vector<uint64_t>> trees{ActiveL1Entries()};
  DMCOW_RETURN_IF_ERROR(file_->Size(&header_.file_size));
  for (const SnapshotInfo& s : snapshots) {
    DMCOW_RETURN_IF_ERROR(ValidateL1Table(header_, name, "snapshot L1 table", s.l1_table_offset, s.l1_size, 0));
    trees.emplace_back();
    DMCOW_RETURN_IF_ERROR(ReadL1Entries(s.l1_table_offset, s.l1_size, &trees.back()));
  }
  const bool zstd = header_.compression_type != 0;
  const uint64_t cs = header_.cluster_size;
  for (const std::vector<uint64_t>& l1 : trees) {
    bool compressed = false;
    DMCOW_RETURN_IF_ERROR(VisitL2Entries(l1, [&](uint64_t entry, uint64_t file_size) -> Status {
      compressed = compressed || (entry & kCompressed);
      const uint64_t host = entry & kOffsetMask;
      if ((entry & kCompressed) || !(entry & kZeroFlag) || host == 0) return Status::OK();
      if ((host & (cs - 1)) == 0 && host < file_size) return Status::OK();
      return Status::Corrupt(name + ": zero cluster at " + Hex(host) +
                             " is not cluster aligned or past the end of the file");
    }));
    if (compressed && zstd) {
      return refuse("Cannot downgrade an image with zstd compression type and existing compressed clusters");
    }
  }
  std::vector<Qcow2Bitmap> bitmaps;
  DMCOW_RETURN_IF_ERROR(ReadQcow2BitmapDirectory(file_.get(), header_, &bitmaps));

  // (A2) Zero clusters, then every count durable, then the header.
  uint64_t entries = 0, done = 0;
  for (const std::vector<uint64_t>& l1 : trees) entries += l1.size();
  for (const std::vector<uint64_t>& l1 : trees) {
    DMCOW_RETURN_IF_ERROR(ExpandZeroClustersInTree(l1, progress, &done, entries));
  }
  DMCOW_RETURN_IF_ERROR(FlushLocked(/*closing=*/true));
  Qcow2Header next = header_;
  next.version = 2;
  next.incompatible_features = next.compatible_features = next.autoclear_features = 0;
  next.compression_type = 0;
  next.has_bitmaps_ext = false;
  next.nb_bitmaps = 0;
  const uint64_t directory_offset = header_.bitmap_directory_offset;
  const uint64_t directory_bytes = header_.bitmap_directory_size;
  DMCOW_RETURN_IF_ERROR(WriteHeaderLocked(std::move(next)));
  header_.bitmap_directory_offset = header_.bitmap_directory_size = 0;
  lazy_refcounts_ = false;
  info_.version = 2;
  info_.bitmaps.clear();
  if (!bitmaps.empty()) {
    DMCOW_RETURN_IF_ERROR(FreeBitmapClustersLocked(bitmaps, directory_offset, directory_bytes));
    DMCOW_RETURN_IF_ERROR(FlushLocked(/*closing=*/true));
  }
  return ReloadRefcountsLocked();  // the overlap map forgets the bitmaps
}

Status Qcow2Image::ExpandZeroClustersInTree(const std::vector<uint64_t>& l1, const AmendProgress& progress,
                                            uint64_t* done, uint64_t total) {
  const uint64_t cs = header_.cluster_size;
  const bool backed = backing() != nullptr || !header_.backing_file.empty();
  // An encrypted image's zeros are the cipher's zeros: host zeros would
  // read back as noise (QEMU 7.2's downgrade writes those; we do not).
  const std::vector<uint8_t> zeros(info_.encrypted ? cs : 0, 0);
  for (uint64_t l1_index = 0; l1_index < l1.size(); l1_index++) {
    const uint64_t l2 = l1[l1_index] & kOffsetMask;
    const auto entry_done = [&] {
      if (progress) progress(++*done, total);
    };
    if (l2 == 0) {
      entry_done();
      continue;
    }
    uint64_t table_refs = 0;  // trees sharing this table: each maps its clusters once
    DMCOW_RETURN_IF_ERROR(refcounts_->Get(l2 / cs, &table_refs));
    if (table_refs == 0) return Status::Corrupt(filename() + ": L2 table at " + Hex(l2) + " has refcount 0");
    for (uint64_t s = 0; s < cs; s += l2_cache_->slice_bytes()) {
      TableCache::Slice slice;
      DMCOW_RETURN_IF_ERROR(l2_cache_->Get(l2 + s, "L2 table", &slice));
      std::vector<std::pair<size_t, uint64_t>> changes;
      for (size_t w = 0; w < slice->size(); w += header_.l2_entry_bytes / 8) {
        const uint64_t entry = (*slice)[w];
        if ((entry & kCompressed) || !(entry & kZeroFlag)) continue;
        const uint64_t old_host = entry & kOffsetMask;
        uint64_t old_refs = 0;
        if (old_host != 0) DMCOW_RETURN_IF_ERROR(refcounts_->Get(old_host / cs, &old_refs));
        if (old_host != 0 && old_refs < table_refs) {
          return Status::Corrupt(filename() + ": cluster at " + Hex(old_host) + " has refcount " +
                                 std::to_string(old_refs) + ", below its L2 table's " + std::to_string(table_refs));
        }
        // Only this table maps the cluster: zeroing it in place changes
        // nothing any tree reads.
        const bool in_place = old_host != 0 && old_refs == table_refs;
        uint64_t host = in_place ? old_host : 0;
        if (!in_place && backed) {
          DMCOW_RETURN_IF_ERROR(refcounts_->Allocate(1, &host));
          if (table_refs > 1)
            DMCOW_RETURN_IF_ERROR(refcounts_->Adjust(host / cs, static_cast<int64_t>(table_refs - 1)));
        }
        if (host != 0) {
          DMCOW_RETURN_IF_ERROR(CheckDataWrite(host, cs, "zero cluster expansion"));
          if (info_.encrypted) {
            const uint64_t guest = (l1_index * header_.l2_entries + (s + w * 8) / header_.l2_entry_bytes) * cs;
            DMCOW_RETURN_IF_ERROR(WriteGuestData(guest, host, zeros.data(), cs));
          } else {
            DMCOW_RETURN_IF_ERROR(file_->WriteZeroes(host, cs));
          }
        }
        if (old_host != 0 && !in_place) {
          for (uint64_t r = 0; r < table_refs; r++) refcounts_->FreeLater(old_host, cs);
        }
        changes.emplace_back(w, host == 0 ? 0 : host | (table_refs == 1 ? kCopied : 0));
      }
      if (changes.empty()) continue;
      // The zeros are written: FlushLocked syncs them before any table (rule 2).
      DMCOW_RETURN_IF_ERROR(l2_cache_->Modify(l2 + s, "L2 table", [&](std::vector<uint64_t>& words) {
        for (const auto& [w, value] : changes) words[w] = value;
      }));
      DMCOW_RETURN_IF_ERROR(MaybeFlush());
    }
    entry_done();
  }
  return Status::OK();
}

Status Qcow2Image::ChangeRefcountBits(uint32_t bits, const AmendProgress& progress) {
  if (!writable_) return Image::ChangeRefcountBits(bits, progress);
  if (bits == 0 || bits > 64 || (bits & (bits - 1)) != 0) {
    return Status::InvalidArgument(filename() + ": Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (header_.version < 3 && bits != 16) {
    return Status::InvalidArgument(filename() +
                                   ": Refcount widths other than 16 bits require compatibility level 1.1 or above "
                                   "(use compat=1.1 or greater)");
  }
  if (bits == (1u << header_.refcount_order)) return Status::OK();
  return WriteStep([&]() REQUIRES(rw_mu_) { return ChangeRefcountBitsLocked(bits, progress); });
}

Status Qcow2Image::ChangeRefcountBitsLocked(uint32_t bits, const AmendProgress& progress) {
  DMCOW_RETURN_IF_ERROR(FlushLocked(/*closing=*/true));  // every count in the blocks, frees applied
  const uint64_t cs = header_.cluster_size;
  uint64_t file_size = 0;
  DMCOW_RETURN_IF_ERROR(file_->Size(&file_size));
  const uint64_t end = std::max(refcounts_->allocation_end(), RoundUp(file_size, cs)) / cs;
  // Every count, in the old width; the old structures count for nothing in
  // the new one.
  std::vector<uint64_t> counts(end);
  const uint64_t new_max = bits == 64 ? UINT64_MAX : (uint64_t{1} << bits) - 1;
  for (uint64_t c = 0; c < end; c++) {
    if (progress && c % 4096 == 0) progress(c, end);
    DMCOW_RETURN_IF_ERROR(refcounts_->Get(c, &counts[c]));
    if (counts[c] > new_max) {
      return Status::InvalidArgument(filename() + ": Cannot decrease refcount entry width to " + std::to_string(bits) +
                                     " bits: Cluster at offset " + Hex(c * cs) + " has a refcount of " +
                                     std::to_string(counts[c]));
    }
  }
  for (uint64_t block : refcounts_->table()) {
    if (block != 0 && block / cs < end) counts[block / cs] = 0;
  }
  for (uint64_t c = 0; c < header_.refcount_table_clusters; c++) {
    if (header_.refcount_table_offset / cs + c < end) counts[header_.refcount_table_offset / cs + c] = 0;
  }
  // The new table, then the blocks, from cluster `end` on: as many blocks
  // as the counts (theirs included) need.
  const uint64_t per_block = cs * 8 / bits;
  uint64_t table_clusters = 1, blocks = 0;
  std::vector<uint64_t> needed;  // block indices that count something
  for (int round = 0;; round++) {
    const uint64_t total = end + table_clusters + blocks;
    needed.clear();
    for (uint64_t b = 0; b < DivRoundUp(total, per_block); b++) {
      const uint64_t first = b * per_block, last = std::min(total, first + per_block);
      bool any = last > end;
      for (uint64_t c = first; !any && c < std::min(last, end); c++) any = counts[c] != 0;
      if (any) needed.push_back(b);
    }
    const uint64_t want_table = std::max<uint64_t>(1, DivRoundUp((needed.empty() ? 0 : needed.back() + 1) * 8, cs));
    if (want_table * cs > kMaxRefTableBytes) {
      return Status::NoSpace(filename() +
                             ": This operation would make the refcount table grow beyond the maximum size supported "
                             "by QEMU, aborting");
    }
    if (want_table == table_clusters && needed.size() == blocks) break;
    if (round == 64) return Status::Corrupt(filename() + ": the new refcount structure's size does not settle");
    table_clusters = want_table;
    blocks = needed.size();
  }
  counts.resize(end + table_clusters + blocks, 1);
  // (A3) Blocks and table past everything, synced, before the header.
  std::vector<uint8_t> table(table_clusters * cs, 0);
  std::vector<uint8_t> block(cs);
  for (uint64_t i = 0; i < needed.size(); i++) {
    const uint64_t at = (end + table_clusters + i) * cs;
    std::fill(block.begin(), block.end(), 0);
    const uint64_t first = needed[i] * per_block;
    for (uint64_t c = first; c < std::min<uint64_t>(counts.size(), first + per_block); c++) {
      if (counts[c] != 0) StoreRefcount(block.data(), c - first, bits, counts[c]);
    }
    DMCOW_RETURN_IF_ERROR(file_->Write(at, block.data(), cs));
    StoreBE64(&table[needed[i] * 8], at);
  }
  DMCOW_RETURN_IF_ERROR(file_->Write(end * cs, table.data(), table.size()));
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  Qcow2Header next = header_;
  next.refcount_order = static_cast<uint32_t>(__builtin_ctz(bits));
  next.refcount_table_offset = end * cs;
  next.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  DMCOW_RETURN_IF_ERROR(WriteHeaderLocked(std::move(next)));
  info_.refcount_bits = bits;
  if (progress) progress(end, end);
  return ReloadRefcountsLocked();
}

Status Qcow2Image::ReloadRefcountsLocked() {
  DMCOW_RETURN_IF_ERROR(file_->Size(&header_.file_size));
  refcounts_ = std::make_unique<Qcow2Refcounts>(file_.get(), &header_, refcount_cache_bytes_);
  DMCOW_RETURN_IF_ERROR(refcounts_->Load());
  return LoadOverlapGuard();
}

Status Qcow2Image::SetLazyRefcounts(bool on) {
  if (!writable_) return Image::SetLazyRefcounts(on);
  if (on && header_.version < 3) {
    return Status::InvalidArgument(filename() +
                                   ": Lazy refcounts only supported with compatibility level 1.1 and above (use "
                                   "compat=1.1 or greater)");
  }
  if (on == lazy_refcounts_) return Status::OK();
  return WriteStep([&]() REQUIRES(rw_mu_) -> Status {
    DMCOW_RETURN_IF_ERROR(FlushLocked(/*closing=*/true));  // (A4)
    Qcow2Header next = header_;
    next.compatible_features =
        on ? next.compatible_features | kCompatLazyRefcounts : next.compatible_features & ~kCompatLazyRefcounts;
    DMCOW_RETURN_IF_ERROR(WriteHeaderLocked(std::move(next)));
    lazy_refcounts_ = on;
    info_.lazy_refcounts = on;
    return Status::OK();
  });
}

}  // namespace dmcow
