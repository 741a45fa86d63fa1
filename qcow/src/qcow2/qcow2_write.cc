// Writes into qcow2 images, and the order in which they reach the disk.
//
// METADATA ORDERING. These rules are what keep an image consistent across a
// crash; every path that changes an image follows them, and the daemon that
// serves block devices relies on exactly them. "Durable" means written and
// followed by a completed File::Sync.
//
//  (1) A cluster's refcount is durable before any durable table points at
//      it. Allocation sets refcounts in the cache; Flush writes refcount
//      blocks and syncs before it writes any L2 or L1 entry.
//  (2) Data, including copy-on-write data copied from a backing file, a
//      compressed or a shared cluster, is durable before the L2 entry that
//      makes it visible. Flush syncs the data file first.
//  (3) A new L2 table is durable before the L1 entry that points at it.
//      Flush writes L2 slices and syncs before writing L1 entries.
//  (4) A cluster is freed (refcount decremented) only after the tables that
//      stopped pointing at it are durable, so a freed cluster is never
//      reused while an on-disk table still references it. Decrements wait
//      in Qcow2Refcounts::FreeLater until Flush has done (1)-(3).
//  (5) Flush returns only when every write issued before it is durable.
//      Dirty metadata is never evicted from the caches between flushes; when
//      too much accumulates, a Flush is forced.
//  (6) Lazy refcounts (images created with lazy_refcounts=on) relax (1) and
//      (4) as QEMU does: before the first table write whose refcounts are
//      not yet durable, the header's dirty bit is made durable; from then on
//      Flush skips refcount writes (one sync fewer) unless the refcount
//      cache is half full. Closing the image writes every refcount, syncs,
//      and only then clears the dirty bit (durably). A crash while the bit is
//      set leaves refcounts that only a repair (check -r all, which a
//      writable open runs itself) makes right; tables and data obey (2)-(3).
//  (7) Whatever a pointer names is durable before the pointer: a new
//      refcount block before the refcount-table entry naming it
//      (Qcow2Refcounts::Flush syncs between the two, and writes a block's
//      entry only once the entry of the block holding the new block's own
//      refcount is durable); a new refcount table and its blocks before the
//      header fields naming it (GrowTable); a grown L1 table and its
//      refcounts before the header's l1_size and l1_table_offset
//      (qcow2_grow.cc); and (3) for L2 tables. Without the sync, a crash
//      could keep a table entry whose block never arrived, and the block's
//      zeros would become the refcounts of live clusters.
//  (8) Metadata counts as written only once a sync that followed its write
//      succeeded: caches mark slices clean and the L1 forgets dirty entries
//      after that sync, never before. And the first failed write, zeroing,
//      truncation or sync of an image file ends writing through that open
//      (FailStopFile): every later write, sync and flush fails with the
//      first error, so nothing is acknowledged after the kernel may have
//      dropped the failed pages (a second fdatasync after EIO reports
//      success on Linux). Those pages may still be readable in the page
//      cache after the error, so a reopen in the same boot is not proof of
//      what is on disk: after the cause is fixed, `check -r all` (or a
//      reboot first) is what to trust.
//  (9) A writing call that fails half way stops writing through that open
//      (Qcow2Image::WriteStep): a read error or a hostile entry met after
//      the caches changed leaves them half made (a refcount block entry
//      without its count, frees queued for clusters still mapped), and no
//      later call, flush or close may write them. Frees are queued only
//      after the entry that stopped mapping the cluster is in the cache.
// Consequences: a crash at any point leaves an image that references only
// allocated, fully written clusters; it may leak clusters (refcount without
// reference), which `check -r leaks` reclaims. Writes not yet flushed may be
// lost or (for in-place overwrites) torn; flushed ones never are.
// tests/crash_test.cc drops and tears unsynced writes at every point of
// seeded write sequences and checks both claims; tests/io_error_test.cc
// fails each write and sync in turn and checks that nothing is lost or
// acknowledged.
#include <algorithm>
#include <cstring>

#include "qcow2/qcow2_image.h"
#include "util.h"

namespace dmcow {

using namespace qcow2;

namespace {
constexpr uint64_t kAllZero = 0xffffffffULL << 32;
}  // namespace

Status Qcow2Image::CheckWritable() const {
  const std::string& name = filename();
  if (header_.incompatible_features & kIncompatCorrupt) {
    return Status::NotSupported(
        name + ": image is marked corrupt; it can only be opened read-only (repair it with check -r all)");
  }
  if (header_.incompatible_features & kIncompatDirty) {
    return Status::NotSupported(
        name + ": image has unflushed lazy refcounts (dirty); repair it with check -r all before writing");
  }
  return Status::OK();
}

Status Qcow2Image::PrepareForWriting(const OpenOptions& options) {
  Qcow2Header& h = header_;
  DMCOW_RETURN_IF_ERROR(CheckWritable());
  // Autoclear bits mark extensions kept consistent by the writer. Unless
  // this open maintains the bitmaps, or changes no guest byte (metadata
  // only), their bit is cleared (QEMU then ignores them, as the
  // specification requires); unknown bits are cleared too.
  const bool bitmaps_stay = options.metadata_only || options.maintain_bitmaps;
  const uint64_t keep = kAutoclearDataFileRaw | (bitmaps_stay ? kAutoclearBitmaps : 0);
  if (h.version >= 3 && (h.autoclear_features & ~keep)) {
    h.autoclear_features &= keep;
    uint8_t raw[8];
    StoreBE64(raw, h.autoclear_features);
    DMCOW_RETURN_IF_ERROR(file_->Write(88, raw, sizeof(raw)));
    DMCOW_RETURN_IF_ERROR(file_->Sync());
  }
  metadata_only_ = options.metadata_only;
  refcount_cache_bytes_ = options.refcount_cache_bytes;
  refcounts_ = std::make_unique<Qcow2Refcounts>(file_.get(), &header_, options.refcount_cache_bytes);
  DMCOW_RETURN_IF_ERROR(refcounts_->Load());
  DMCOW_RETURN_IF_ERROR(LoadOverlapGuard());
  max_dirty_slices_ = std::max<size_t>(8, l2_cache_->capacity_slices() / 2);
  lazy_refcounts_ = h.version >= 3 && (h.compatible_features & kCompatLazyRefcounts);
  writable_ = true;
  if (options.maintain_bitmaps && !options.metadata_only) DMCOW_RETURN_IF_ERROR(StartMaintainingBitmaps());
  return Status::OK();
}

Status Qcow2Image::RefuseIfMetadataOnly(const char* what) const {
  if (!BitmapsKept()) return Status::OK();
  return Status::NotSupported(filename() + ": " + what +
                              " an image with persistent bitmaps is not supported yet (they would become "
                              "inconsistent); remove them or use qemu-img");
}

Qcow2Image::~Qcow2Image() {
  // Best effort: callers that care call Flush and check it. After a failed
  // step nothing is written (WriteStep).
  if (writable_) {
    (void)WriteStep([&]() REQUIRES(rw_mu_) {
      if (!maintained_bitmaps_.empty()) {
        DMCOW_RETURN_IF_ERROR(FlushLocked());
        DMCOW_RETURN_IF_ERROR(StoreMaintainedBitmapsLocked());  // M3; a failure leaves them in use
      }
      return FlushLocked(/*closing=*/true);
    });
  }
}

Status Qcow2Image::GetL2Entry(uint64_t cluster, uint64_t* entry, uint64_t* bitmap) {
  const uint64_t l1_index = cluster / header_.l2_entries;
  uint64_t l2_offset = 0;
  *entry = *bitmap = 0;
  DMCOW_RETURN_IF_ERROR(L2TableOffset(l1_index, &l2_offset));
  if (l2_offset == 0) return Status::OK();
  const uint64_t byte = (cluster % header_.l2_entries) * header_.l2_entry_bytes;
  const uint64_t slice_start = byte & ~uint64_t{l2_cache_->slice_bytes() - 1};
  TableCache::Slice slice;
  DMCOW_RETURN_IF_ERROR(l2_cache_->Get(l2_offset + slice_start, "L2 table", &slice));
  const size_t word = (byte - slice_start) / 8;
  *entry = (*slice)[word];
  if (header_.extended_l2) *bitmap = (*slice)[word + 1];
  // Every write path and the block-device calls get their entries here.
  return CheckZeroFlagAllowed(cluster, *entry);
}

Status Qcow2Image::EnsureL2Table(uint64_t l1_index, uint64_t* l2_offset) {
  const uint64_t l1_entry = l1_[l1_index];
  uint64_t old = 0;
  DMCOW_RETURN_IF_ERROR(L2TableOffset(l1_index, &old));
  if (old != 0 && (l1_entry & kCopied)) {
    *l2_offset = old;
    return Status::OK();
  }
  if (old != 0) {
    uint64_t refcount;
    DMCOW_RETURN_IF_ERROR(refcounts_->Get(old / header_.cluster_size, &refcount));
    if (refcount == 1) {  // not shared after all: only the flag was missing
      l1_.Set(l1_index, old | kCopied);
      dirty_l1_.insert(l1_index);
      *l2_offset = old;
      return Status::OK();
    }
  }
  uint64_t fresh;
  DMCOW_RETURN_IF_ERROR(refcounts_->Allocate(1, &fresh));
  const uint64_t slice_bytes = l2_cache_->slice_bytes();
  for (uint64_t s = 0; s < header_.cluster_size; s += slice_bytes) {
    l2_cache_->InsertZeroed(fresh + s);
    if (old == 0) continue;
    // A table shared with a snapshot is copied; the clusters it points at
    // already count the snapshot's reference, so their refcounts stay.
    TableCache::Slice shared;
    DMCOW_RETURN_IF_ERROR(l2_cache_->Get(old + s, "L2 table", &shared));
    DMCOW_RETURN_IF_ERROR(l2_cache_->Modify(fresh + s, "L2 table", [&](std::vector<uint64_t>& w) { w = *shared; }));
  }
  if (old != 0) refcounts_->FreeLater(old, header_.cluster_size);
  if (old != 0) overlap_->Remove(old, header_.cluster_size, Qcow2Metadata::kActiveL2);  // the snapshot's now
  overlap_->Add(fresh, header_.cluster_size, Qcow2Metadata::kActiveL2);
  l1_.Set(l1_index, fresh | kCopied);
  dirty_l1_.insert(l1_index);
  *l2_offset = fresh;
  return Status::OK();
}

Status Qcow2Image::SetL2Entry(uint64_t cluster, uint64_t entry, uint64_t bitmap) {
  uint64_t l2_offset;
  DMCOW_RETURN_IF_ERROR(EnsureL2Table(cluster / header_.l2_entries, &l2_offset));
  const uint64_t byte = (cluster % header_.l2_entries) * header_.l2_entry_bytes;
  const uint64_t slice_start = byte & ~uint64_t{l2_cache_->slice_bytes() - 1};
  const size_t word = (byte - slice_start) / 8;
  const bool extended = header_.extended_l2;
  return l2_cache_->Modify(l2_offset + slice_start, "L2 table", [&](std::vector<uint64_t>& w) {
    w[word] = entry;
    if (extended) w[word + 1] = bitmap;
  });
}

bool Qcow2Image::WritableInPlace(uint64_t entry, uint64_t bitmap) const {
  if (!(entry & kCopied) || (entry & kCompressed)) return false;
  if (header_.extended_l2) return (bitmap & kAllSubclustersAllocated) == kAllSubclustersAllocated;
  if (entry & kZeroFlag) return false;
  return (entry & kOffsetMask) != 0 || header_.HasDataFile();
}

void Qcow2Image::ReleaseClusterOf(uint64_t entry) {
  if (entry & kCompressed) {
    const CompressedExtent c = DecodeCompressed(entry, header_.cluster_bits);
    refcounts_->FreeLater(c.offset & ~uint64_t{511}, c.sectors * 512);
    return;
  }
  const uint64_t host = entry & kOffsetMask;
  // Data in an external data file is not refcounted.
  if (host != 0 && !header_.HasDataFile()) refcounts_->FreeLater(host, header_.cluster_size);
}

Status Qcow2Image::MaybeFlush() {
  if (l2_cache_->dirty_count() + refcounts_->dirty_slices() < max_dirty_slices_) return Status::OK();
  return FlushLocked();
}

Status Qcow2Image::WriteGuestData(uint64_t guest, uint64_t host, const uint8_t* data, size_t n) {
  if (!info_.encrypted) return data_file()->Write(host, data, n);
  thread_local std::vector<uint8_t> sealed;
  uint64_t sealed_host;
  DMCOW_RETURN_IF_ERROR(SealForWrite(guest, host, data, n, &sealed, &sealed_host));
  return data_file()->Write(sealed_host, sealed.data(), sealed.size());
}

Status Qcow2Image::WriteLocked(uint64_t offset, const uint8_t* buf, size_t len) {
  const uint64_t cs = header_.cluster_size;
  const uint64_t vsize = info_.virtual_size;
  thread_local std::vector<uint8_t> run;
  while (len > 0) {
    const uint64_t cluster = offset >> header_.cluster_bits;
    const uint64_t in_cluster = offset & (cs - 1);
    uint64_t entry, bitmap;
    DMCOW_RETURN_IF_ERROR(GetL2Entry(cluster, &entry, &bitmap));

    if (WritableInPlace(entry, bitmap)) {
      const uint64_t host = header_.HasDataFile() && (entry & kOffsetMask) == 0 ? 0 : entry & kOffsetMask;
      const size_t n = static_cast<size_t>(std::min<uint64_t>(len, cs - in_cluster));
      DMCOW_RETURN_IF_ERROR(CheckDataWrite(host + in_cluster, n, "write"));
      DMCOW_RETURN_IF_ERROR(WriteGuestData(offset, host + in_cluster, buf, n));
      offset += n;
      buf += n;
      len -= n;
      continue;
    }

    // A run of clusters that all need new space: allocated together, filled
    // with their current content where the write covers them partly, and
    // written in one go.
    const uint64_t end = offset + len;
    std::vector<uint64_t> old_entries{entry};
    uint64_t count = 1;
    while (count < kMaxRunClusters && (cluster + count) * cs < end && (cluster + count) % header_.l2_entries != 0) {
      uint64_t next, next_bitmap;
      DMCOW_RETURN_IF_ERROR(GetL2Entry(cluster + count, &next, &next_bitmap));
      if (WritableInPlace(next, next_bitmap)) break;
      old_entries.push_back(next);
      count++;
    }
    const uint64_t run_start = cluster * cs;
    const uint64_t run_end = run_start + count * cs;
    // Whole clusters are written straight from the caller's buffer.
    const bool whole = in_cluster == 0 && end >= run_end;
    run.resize(whole ? 0 : count * cs);
    auto fill_current = [&](uint64_t index) REQUIRES(rw_mu_) -> Status {
      const uint64_t guest = run_start + index * cs;
      const uint64_t n = std::min(cs, vsize - guest);
      std::memset(run.data() + index * cs + n, 0, cs - n);
      return ReadLocked(guest, run.data() + index * cs, n);
    };
    const size_t n = static_cast<size_t>(std::min<uint64_t>(len, run_end - offset));
    if (!whole) {
      if (in_cluster != 0 || end < run_start + cs) DMCOW_RETURN_IF_ERROR(fill_current(0));
      if (count > 1 && end < run_end) DMCOW_RETURN_IF_ERROR(fill_current(count - 1));
      std::memcpy(run.data() + in_cluster, buf, n);
    }

    uint64_t host;
    if (header_.HasDataFile()) {
      host = run_start;  // external data files map guest offsets 1:1
    } else {
      DMCOW_RETURN_IF_ERROR(refcounts_->Allocate(count, &host));
    }
    DMCOW_RETURN_IF_ERROR(CheckDataWrite(host, count * cs, "write"));
    DMCOW_RETURN_IF_ERROR(WriteGuestData(run_start, host, whole ? buf : run.data(), count * cs));
    for (uint64_t i = 0; i < count; i++) {
      DMCOW_RETURN_IF_ERROR(
          SetL2Entry(cluster + i, (host + i * cs) | kCopied, header_.extended_l2 ? kAllSubclustersAllocated : 0));
      ReleaseClusterOf(old_entries[i]);  // after: a failed SetL2Entry must not free a cluster still mapped
    }
    offset += n;
    buf += n;
    len -= n;
    DMCOW_RETURN_IF_ERROR(MaybeFlush());
  }
  return Status::OK();
}

Status Qcow2Image::Write(uint64_t offset, const void* buf, size_t len) {
  if (!writable_) return Image::Write(offset, buf, len);
  DMCOW_RETURN_IF_ERROR(RefuseIfMetadataOnly("writing to"));
  DMCOW_RETURN_IF_ERROR(CheckWriteRange(offset, len));
  return WriteStep([&]() REQUIRES(rw_mu_) {
    NoteGuestWriteLocked(offset, len);
    return WriteLocked(offset, static_cast<const uint8_t*>(buf), len);
  });
}

Status Qcow2Image::ZeroLocked(uint64_t offset, uint64_t len, bool discard) {
  static const std::vector<uint8_t> zeros(1 << 20, 0);
  DMCOW_RETURN_IF_ERROR(overlap_->failure());  // its table edits would never be written: say so now
  const uint64_t cs = header_.cluster_size;
  const uint64_t end = offset + len;
  // Parts of clusters: zeros are written as data (a discard leaves them).
  auto partial = [&](uint64_t from, uint64_t to) REQUIRES(rw_mu_) -> Status {
    for (uint64_t pos = from; !discard && pos < to;) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(to - pos, zeros.size()));
      DMCOW_RETURN_IF_ERROR(WriteLocked(pos, zeros.data(), n));
      pos += n;
    }
    return Status::OK();
  };
  uint64_t first_full = (offset + cs - 1) & ~(cs - 1);
  uint64_t last_full = end == info_.virtual_size ? (end + cs - 1) & ~(cs - 1) : end & ~(cs - 1);
  if (first_full >= last_full) return partial(offset, end);
  DMCOW_RETURN_IF_ERROR(partial(offset, first_full));

  const bool has_backing = !info_.backing_filename.empty();
  const bool can_say_zero = header_.version >= 3 && !info_.data_file_raw;
  for (uint64_t pos = first_full; pos < last_full; pos += cs) {
    const uint64_t cluster = pos >> header_.cluster_bits;
    uint64_t entry, bitmap;
    DMCOW_RETURN_IF_ERROR(GetL2Entry(cluster, &entry, &bitmap));
    const bool unallocated = (entry & ~kCopied) == 0 && bitmap == 0 && !(header_.HasDataFile() && (entry & kCopied));
    if (unallocated && !has_backing) continue;  // already reads as zeros
    if (!can_say_zero && has_backing) {
      // qcow2 v2 (or a raw data file) over a backing file: only data can hide it.
      DMCOW_RETURN_IF_ERROR(partial(pos, std::min(pos + cs, info_.virtual_size)));
      continue;
    }
    if (info_.data_file_raw) {  // the data file must stay a faithful raw image
      DMCOW_RETURN_IF_ERROR(partial(pos, std::min(pos + cs, info_.virtual_size)));
      continue;
    }
    uint64_t new_entry = 0, new_bitmap = 0;
    if (header_.extended_l2) {
      new_bitmap = kAllZero;
    } else if (header_.version >= 3) {
      new_entry = kZeroFlag;
    }
    if (entry == new_entry && bitmap == new_bitmap) continue;
    DMCOW_RETURN_IF_ERROR(SetL2Entry(cluster, new_entry, new_bitmap));
    ReleaseClusterOf(entry);
    DMCOW_RETURN_IF_ERROR(MaybeFlush());
  }
  return partial(std::min(last_full, end), end);
}

Status Qcow2Image::WriteZeroes(uint64_t offset, uint64_t len) {
  if (!writable_) return Image::WriteZeroes(offset, len);
  DMCOW_RETURN_IF_ERROR(RefuseIfMetadataOnly("writing zeroes to"));
  uint64_t end;
  if (!CheckedAdd(offset, len, &end) || end > info_.virtual_size) {
    return Status::InvalidArgument(filename() + ": zero write past the virtual size");
  }
  return WriteStep([&]() REQUIRES(rw_mu_) {
    NoteGuestWriteLocked(offset, len);
    return ZeroLocked(offset, len, /*discard=*/false);
  });
}

Status Qcow2Image::Discard(uint64_t offset, uint64_t len) {
  if (!writable_) return Image::Discard(offset, len);
  DMCOW_RETURN_IF_ERROR(RefuseIfMetadataOnly("discarding in"));
  uint64_t end;
  if (!CheckedAdd(offset, len, &end) || end > info_.virtual_size) {
    return Status::InvalidArgument(filename() + ": discard past the virtual size");
  }
  return WriteStep([&]() REQUIRES(rw_mu_) {
    NoteGuestWriteLocked(offset, len);
    return ZeroLocked(offset, len, /*discard=*/true);
  });
}

Status Qcow2Image::AllocateCompressedBytes(uint64_t bytes, uint64_t* host_offset) {
  const uint64_t cs = header_.cluster_size;
  uint64_t offset = free_byte_offset_;
  if (offset != 0) {
    uint64_t refcount;
    DMCOW_RETURN_IF_ERROR(refcounts_->Get(offset / cs, &refcount));
    // A full refcount cannot count one more user; a zero one was freed.
    if (refcount == 0 || refcount >= refcounts_->max_refcount()) offset = 0;
  }
  const uint64_t free_in_cluster = offset == 0 ? 0 : cs - (offset & (cs - 1));
  if (offset != 0 && bytes <= free_in_cluster) {
    DMCOW_RETURN_IF_ERROR(refcounts_->Adjust(offset / cs, 1));
  } else {
    uint64_t fresh;
    DMCOW_RETURN_IF_ERROR(refcounts_->Allocate(1, &fresh));  // refcount 1 already
    if (offset != 0 && offset + free_in_cluster == fresh) {
      DMCOW_RETURN_IF_ERROR(refcounts_->Adjust(offset / cs, 1));  // spans into `fresh`
    } else {
      offset = fresh;
    }
  }
  *host_offset = offset;
  free_byte_offset_ = (offset + bytes) & (cs - 1) ? offset + bytes : 0;
  return Status::OK();
}

Status Qcow2Image::WriteCompressedCluster(uint64_t offset, const void* payload, size_t len) {
  if (!writable_) return Image::WriteCompressedCluster(offset, payload, len);
  DMCOW_RETURN_IF_ERROR(RefuseIfMetadataOnly("writing to"));
  const uint64_t cs = header_.cluster_size;
  if (header_.HasDataFile()) {
    return Status::NotSupported(filename() + ": compressed clusters cannot be stored with an external data file");
  }
  if (info_.encrypted)
    return Status::NotSupported(filename() + ": Compression and encryption not supported at the same time");
  if ((offset & (cs - 1)) != 0 || offset >= info_.virtual_size || len == 0 || len >= cs) {
    return Status::InvalidArgument(filename() + ": compressed write of " + std::to_string(len) +
                                   " bytes at guest offset " + Hex(offset) +
                                   " (needs a cluster-aligned offset and less than one cluster of payload)");
  }
  return WriteStep([&]() REQUIRES(rw_mu_) -> Status {
    NoteGuestWriteLocked(offset, std::min(cs, info_.virtual_size - offset));
    const uint64_t cluster = offset >> header_.cluster_bits;
    uint64_t entry, bitmap;
    DMCOW_RETURN_IF_ERROR(GetL2Entry(cluster, &entry, &bitmap));
    uint64_t host;
    DMCOW_RETURN_IF_ERROR(AllocateCompressedBytes(len, &host));
    DMCOW_RETURN_IF_ERROR(CheckDataWrite(host, len, "compressed write"));
    DMCOW_RETURN_IF_ERROR(file_->Write(host, payload, len));
    DMCOW_RETURN_IF_ERROR(SetL2Entry(cluster, EncodeCompressed(host, len, header_.cluster_bits), 0));
    ReleaseClusterOf(entry);  // only once nothing maps it: a failed SetL2Entry must not free a live cluster
    return MaybeFlush();
  });
}

Status Qcow2Image::SetDirtyBit(bool dirty) {
  const uint64_t features =
      dirty ? header_.incompatible_features | kIncompatDirty : header_.incompatible_features & ~kIncompatDirty;
  uint8_t raw[8];
  StoreBE64(raw, features);
  DMCOW_RETURN_IF_ERROR(file_->Write(kIncompatibleFeaturesOffset, raw, sizeof(raw)));
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  header_.incompatible_features = features;
  info_.dirty = dirty;
  info_.incompatible_features = features;
  return Status::OK();
}

Status Qcow2Image::FlushLocked(bool closing) {
  // (2) data first, then (1) refcounts, (3) L2 tables, L1 entries, (4) frees.
  // Lazy refcounts (6): while the dirty bit is durable, refcounts may lag.
  const bool lazy = lazy_refcounts_ && !closing && refcounts_->dirty_slices() < max_dirty_slices_ / 2;
  const bool tables_dirty = l2_cache_->dirty_count() > 0 || !dirty_l1_.empty();
  DMCOW_RETURN_IF_ERROR(overlap_->failure());  // after an overlap, nothing more is written
  DMCOW_RETURN_IF_ERROR(data_file()->Sync());
  if (lazy && tables_dirty && refcounts_->dirty() && !(header_.incompatible_features & kIncompatDirty)) {
    DMCOW_RETURN_IF_ERROR(SetDirtyBit(true));
  }
  if (refcounts_->dirty() && !lazy) DMCOW_RETURN_IF_ERROR(refcounts_->Flush());
  DMCOW_RETURN_IF_ERROR(l2_cache_->Flush());
  if (!dirty_l1_.empty()) {
    for (uint64_t index : dirty_l1_) {
      DMCOW_RETURN_IF_ERROR(overlap_->CheckWrite(header_.l1_table_offset + index * 8, 8,
                                                 Qcow2MetadataBit(Qcow2Metadata::kActiveL1), "L1 table write"));
      uint8_t raw[8];
      StoreBE64(raw, l1_[index]);
      DMCOW_RETURN_IF_ERROR(file_->Write(header_.l1_table_offset + index * 8, raw, sizeof(raw)));
    }
    DMCOW_RETURN_IF_ERROR(file_->Sync());
    dirty_l1_.clear();  // only now: after a failed sync they are still owed (rule 8)
  }
  if (refcounts_->HasPendingFrees()) {
    free_byte_offset_ = 0;
    compressed_->Invalidate();  // freed compressed bytes may be reused from now on
    DMCOW_RETURN_IF_ERROR(refcounts_->ApplyPendingFrees());
    if (!lazy) DMCOW_RETURN_IF_ERROR(refcounts_->Flush());
  }
  if (closing && (header_.incompatible_features & kIncompatDirty) && !refcounts_->dirty()) {
    DMCOW_RETURN_IF_ERROR(SetDirtyBit(false));  // every refcount is durable again
  }
  return Status::OK();
}

Status Qcow2Image::Flush() {
  if (!writable_) return Status::OK();
  return WriteStep([&]() REQUIRES(rw_mu_) { return FlushLocked(); });
}

// Empties the active layer (qemu's bdrv_make_empty) by dropping whole L2
// tables: every L1 entry is cleared, then the clusters its table referenced
// and the table itself lose the active layer's reference. That is all of
// their reference where nothing else holds one; a table or cluster shared
// with an internal snapshot keeps the snapshot's. Ordering: pending writes
// are flushed first, so no dirty slice of a dropped table is left; the
// cleared L1 entries are durable before any decrement (rule 4), so a crash
// in between leaks clusters at worst.
Status Qcow2Image::MakeEmpty() {
  if (!writable_) return Image::MakeEmpty();
  DMCOW_RETURN_IF_ERROR(RefuseIfMetadataOnly("emptying"));
  if (info_.data_file_raw) {
    return Status::NotSupported(filename() +
                                ": cannot empty an image whose external data file must stay a "
                                "faithful raw image (data_file_raw)");
  }
  return WriteStep([&]() REQUIRES(rw_mu_) {
    NoteGuestWriteLocked(0, info_.virtual_size);
    return MakeEmptyLocked();
  });
}

Status Qcow2Image::MakeEmptyLocked() {
  DMCOW_RETURN_IF_ERROR(FlushLocked());
  const uint64_t cs = header_.cluster_size;
  const uint64_t clusters = (info_.virtual_size + cs - 1) >> header_.cluster_bits;
  // Every table offset checked before anything is released: a bad entry
  // must not leave the image half emptied.
  for (uint64_t i = 0; i < l1_.size(); i++) {
    uint64_t l2_offset = 0;
    DMCOW_RETURN_IF_ERROR(L2TableOffset(i, &l2_offset));
  }
  for (uint64_t i = 0; i < l1_.size(); i++) {
    if (l1_[i] == 0) continue;
    uint64_t l2_offset = 0;
    DMCOW_RETURN_IF_ERROR(L2TableOffset(i, &l2_offset));
    // Only entries inside the disk describe clusters (as qemu discards).
    const uint64_t first = i * header_.l2_entries;
    const uint64_t count = first >= clusters ? 0 : std::min<uint64_t>(header_.l2_entries, clusters - first);
    DMCOW_RETURN_IF_ERROR(DropL2TableLocked(i, l2_offset, count));
  }
  return FlushLocked();
}

Status Qcow2Image::DropL2TableLocked(uint64_t l1_index, uint64_t l2_offset, uint64_t count) {
  if (l2_offset != 0) {
    const uint64_t words_per_entry = header_.l2_entry_bytes / 8;
    for (uint64_t done = 0; done < count;) {
      TableCache::Slice slice;
      DMCOW_RETURN_IF_ERROR(l2_cache_->Get(l2_offset + done * header_.l2_entry_bytes, "L2 table", &slice));
      for (uint64_t w = 0; w < slice->size() && done < count; w += words_per_entry, done++) {
        ReleaseClusterOf((*slice)[w]);
      }
    }
    refcounts_->FreeLater(l2_offset, header_.cluster_size);
    overlap_->Remove(l2_offset, header_.cluster_size, Qcow2Metadata::kActiveL2);
  }
  l1_.Set(l1_index, 0);
  dirty_l1_.insert(l1_index);
  return Status::OK();
}

}  // namespace dmcow
