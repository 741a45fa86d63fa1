// Internal snapshots of qcow2 images: create, delete and apply (qemu-img
// snapshot -c, -d, -a; QEMU's block/qcow2-snapshot.c), ordered so that a
// crash at any point leaves the image as it was before or after.
//
// A snapshot is an L1 table of its own over L2 tables and data clusters it
// shares with the active state and other snapshots. Refcounts count trees:
// every L1 tree that reaches an L2 table or a data cluster (through any L2
// table) adds one. The COPIED flag of an active L1 or L2 entry says
// "refcount 1: write in place" (qcow2_write.cc); a cleared flag makes the
// writer copy first, so a shared cluster is never written in place.
//
// SNAPSHOT ORDERING. Each operation first flushes every pending write
// (qcow2_write.cc's rules), then:
//  (S1) A tree's references are counted before the tree exists: the
//       refcounts a new tree adds (a new snapshot's, or a snapshot's that is
//       becoming the active state) are durable before the header or table
//       write that makes the tree reachable; and the COPIED flags of the
//       entries that tree will share are cleared, durably, before that write
//       too. So a durable snapshot never shares a cluster the active tables
//       would write in place. Until the switch the extra counts are leaks.
//  (S2) A tree's references are dropped before their counts: the snapshot
//       leaves the table (delete), or the old active tree leaves the header
//       (apply), durably, before the refcounts of what it reached go down;
//       COPIED flags are set again only after those refcounts are written.
//  (S3) One switch per operation, inside the header's first 512-byte
//       sector, which a disk writes whole: the snapshot table moves with one
//       write of nb_snapshots and snapshots_offset (bytes 60-71), the active
//       state with one write of size, l1_size and l1_table_offset (bytes
//       24-47). A new snapshot table or L1 table is written into free
//       clusters, and durable with its refcounts, before the switch; the old
//       one is freed after it. Nothing reachable is written over in place
//       except COPIED flags, whose meaning (S1, S2) does not depend on the
//       content.
// Between the steps a crash leaves the image as before or as after, with
// leaked clusters (refcounts above the references), and in (S1)'s and
// (S2)'s windows COPIED flags that disagree with refcounts in the safe
// direction: set on a cluster that only one reachable tree holds, or clear
// on a cluster whose refcount is 1 (a needless copy). `qemu-img check`
// counts those disagreements, `check -r all` repairs them and the leaks;
// no guest data depends on them. tests/snapshot_test.cc replays a crash at
// every write of each operation and checks exactly that.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "qcow2/qcow2_image.h"
#include "qcow2/qcow2_metadata_tables.h"
#include "qcow2/qcow2_visit_tree.h"
#include "util.h"

namespace dmcow {

using namespace qcow2;

namespace {

constexpr uint64_t kEntryFixedBytes = 40;

// One snapshot table entry, laid out as QEMU's qcow2_write_snapshots lays it
// out: 24 bytes of extra data it knows (a disk size missing from a version 2
// entry is the current one, as QEMU reads it), then extra data it does not
// know, kept; the id, the name; padding to 8 bytes.
void AppendSnapshotEntry(const SnapshotInfo& s, const std::vector<uint8_t>& unknown_extra, uint64_t current_size,
                         std::vector<uint8_t>* table) {
  const size_t start = table->size();
  const uint32_t extra = kKnownSnapshotExtraData + static_cast<uint32_t>(unknown_extra.size());
  table->resize(start + kEntryFixedBytes + extra + s.id.size() + s.name.size());
  uint8_t* p = table->data() + start;
  StoreBE64(p, s.l1_table_offset);
  StoreBE32(p + 8, s.l1_size);
  StoreBE16(p + 12, static_cast<uint16_t>(s.id.size()));
  StoreBE16(p + 14, static_cast<uint16_t>(s.name.size()));
  StoreBE32(p + 16, s.date_sec);
  StoreBE32(p + 20, s.date_nsec);
  StoreBE64(p + 24, s.vm_clock_nsec);
  StoreBE32(p + 32, static_cast<uint32_t>(s.vm_state_size));  // QEMU truncates; the extra data holds all 64 bits
  StoreBE32(p + 36, extra);
  StoreBE64(p + 40, s.vm_state_size);
  StoreBE64(p + 48, s.has_disk_size ? s.disk_size : current_size);
  StoreBE64(p + 56, s.has_icount ? s.icount : UINT64_MAX);
  uint8_t* q = p + kEntryFixedBytes + kKnownSnapshotExtraData;
  if (!unknown_extra.empty()) std::memcpy(q, unknown_extra.data(), unknown_extra.size());
  q += unknown_extra.size();
  std::memcpy(q, s.id.data(), s.id.size());
  std::memcpy(q + s.id.size(), s.name.data(), s.name.size());
  table->resize((table->size() + 7) & ~size_t{7}, 0);
}

// QEMU refuses snapshots over an external data file: its clusters have no
// refcounts, and an L2 entry at offset 0 is data there, so the COPIED flags
// snapshots change would mean something else. Delete and apply are refused
// too (such an image has no snapshot QEMU made).
Status NoSnapshotsWithDataFile(const std::string& name) {
  return Status::NotSupported(name + ": internal snapshots are not supported with an external data file");
}

}  // namespace

Status Qcow2Image::CreateSnapshot(SnapshotInfo* snapshot) {
  if (!writable_) return Image::CreateSnapshot(snapshot);
  // QEMU's qcow2_snapshot_create: at most 65536 (-EFBIG).
  if (header_.HasDataFile()) return NoSnapshotsWithDataFile(filename());
  if (info_.snapshots.size() >= kMaxSnapshots) {
    return Status::NoSpace(filename() + ": the image already has " + std::to_string(kMaxSnapshots) + " snapshots");
  }
  if (snapshot->name.size() > UINT16_MAX) return Status::InvalidArgument(filename() + ": snapshot name too long");
  return WriteStep([&]() REQUIRES(rw_mu_) { return CreateSnapshotLocked(snapshot); });
}

Status Qcow2Image::DeleteSnapshot(const std::string& id) {
  if (!writable_) return Image::DeleteSnapshot(id);
  if (header_.HasDataFile()) return NoSnapshotsWithDataFile(filename());
  return WriteStep([&]() REQUIRES(rw_mu_) { return DeleteSnapshotLocked(id); });
}

Status Qcow2Image::ApplySnapshot(const std::string& id) {
  if (!writable_) return Image::ApplySnapshot(id);
  // QEMU's refusal (bdrv_snapshot_goto): the content would change under
  // bitmaps that do not follow it.
  if (BitmapsKept()) return Status::InvalidArgument(filename() + ": Device has active dirty bitmaps");
  if (header_.HasDataFile()) return NoSnapshotsWithDataFile(filename());
  return WriteStep([&]() REQUIRES(rw_mu_) { return ApplySnapshotLocked(id); });
}

std::vector<uint64_t> Qcow2Image::ActiveL1Entries() const {
  std::vector<uint64_t> l1(l1_.size());
  for (uint64_t i = 0; i < l1.size(); i++) l1[i] = l1_[i];
  return l1;
}

void Qcow2Image::SetActiveL1Entries(const std::vector<uint64_t>& l1) {
  for (uint64_t i = 0; i < l1.size(); i++) {
    if (l1_[i] == l1[i]) continue;
    l1_.Set(i, l1[i]);
    dirty_l1_.insert(i);
  }
}

Status Qcow2Image::ReadL1Entries(uint64_t offset, uint64_t entries, std::vector<uint64_t>* l1) {
  // Validated by the caller (ValidateL1Table): at most kMaxL1Bytes.
  std::vector<uint8_t> raw(entries * 8);
  if (!raw.empty()) DMCOW_RETURN_IF_ERROR(file_->ReadExact(offset, raw.size(), raw.data(), "snapshot L1 table"));
  l1->resize(entries);
  for (uint64_t i = 0; i < entries; i++) (*l1)[i] = LoadBE64(&raw[i * 8]);
  return Status::OK();
}

Status Qcow2Image::AdjustTreeRefcounts(const std::vector<uint64_t>& l1, int64_t delta) {
  const uint64_t cs = header_.cluster_size;
  if (delta < 0) {
    // Frees wait for the next flush (rule 4 of qcow2_write.cc), which also
    // forgets cached compressed clusters whose space may be reused.
    return VisitTree(l1, [&](uint64_t cluster, bool) {
      refcounts_->FreeLater(cluster * cs, cs);
      return Status::OK();
    });
  }
  // Nothing changes unless every count can take one more (QEMU fails half
  // way with -EINVAL and leaks; refcount_bits=1 images cannot share at all).
  const Status room = VisitTree(l1, [&](uint64_t cluster, bool) {
    uint64_t refcount = 0;
    DMCOW_RETURN_IF_ERROR(refcounts_->Get(cluster, &refcount));
    if (refcounts_->max_refcount() - refcount < static_cast<uint64_t>(delta)) {
      return Status::InvalidArgument(filename() + ": the refcount of cluster " + Hex(cluster * cs) +
                                     " is at its maximum (" + std::to_string(refcounts_->max_refcount()) + ")");
    }
    return Status::OK();
  });
  if (!room.ok()) return room;
  // Written as they accumulate (leaks until the switch, S1): memory stays
  // bounded on large images.
  return VisitTree(l1, [&](uint64_t cluster, bool) {
    DMCOW_RETURN_IF_ERROR(refcounts_->Adjust(cluster, delta));
    return refcounts_->dirty_slices() < max_dirty_slices_ ? Status::OK() : refcounts_->Flush();
  });
}

Status Qcow2Image::SyncCopiedFlags(std::vector<uint64_t>* l1) {
  const uint64_t cs = header_.cluster_size;
  const uint64_t words_per_entry = header_.l2_entry_bytes / 8;
  const uint64_t slice_bytes = l2_cache_->slice_bytes();
  auto exclusive = [&](uint64_t host, bool* only_one) {
    uint64_t refcount = 0;
    DMCOW_RETURN_IF_ERROR(refcounts_->Get(host / cs, &refcount));
    *only_one = refcount == 1;
    return Status::OK();
  };
  for (uint64_t i = 0; i < l1->size(); i++) {
    const uint64_t l2 = (*l1)[i] & kOffsetMask;
    if (l2 == 0) continue;
    for (uint64_t s = 0; s < cs; s += slice_bytes) {
      TableCache::Slice slice;
      DMCOW_RETURN_IF_ERROR(l2_cache_->Get(l2 + s, "L2 table", &slice));
      std::vector<std::pair<size_t, uint64_t>> changes;
      for (size_t w = 0; w < slice->size(); w += words_per_entry) {
        const uint64_t entry = (*slice)[w];
        const uint64_t host = entry & kOffsetMask;
        bool only_one = false;
        // Compressed and unallocated clusters never carry the flag.
        if (!(entry & kCompressed) && host != 0) DMCOW_RETURN_IF_ERROR(exclusive(host, &only_one));
        const uint64_t wanted = only_one ? entry | kCopied : entry & ~kCopied;
        if (wanted != entry) changes.emplace_back(w, wanted);
      }
      if (changes.empty()) continue;
      DMCOW_RETURN_IF_ERROR(l2_cache_->Modify(l2 + s, "L2 table", [&](std::vector<uint64_t>& words) {
        for (const auto& [w, value] : changes) words[w] = value;
      }));
      // Flags may reach the disk early: their refcounts are durable already.
      DMCOW_RETURN_IF_ERROR(MaybeFlush());
    }
    bool only_one = false;
    DMCOW_RETURN_IF_ERROR(exclusive(l2, &only_one));
    (*l1)[i] = only_one ? (*l1)[i] | kCopied : (*l1)[i] & ~kCopied;
  }
  return Status::OK();
}

Status Qcow2Image::WriteSnapshotTable(const std::vector<SnapshotInfo>& snapshots,
                                      const std::vector<std::vector<uint8_t>>& unknown_extra) {
  std::vector<uint8_t> table;
  for (size_t i = 0; i < snapshots.size(); i++) {
    AppendSnapshotEntry(snapshots[i], unknown_extra[i], info_.virtual_size, &table);
    if (table.size() > kMaxSnapshotTableBytes) {
      return Status::NoSpace(filename() + ": the snapshot table would be larger than " +
                             std::to_string(kMaxSnapshotTableBytes) + " bytes");
    }
  }
  uint64_t old_bytes = 0;
  DMCOW_RETURN_IF_ERROR(Qcow2SnapshotTableBytes(file_.get(), header_, &old_bytes));
  const uint64_t old_offset = header_.snapshots_offset;
  uint64_t fresh = 0;
  if (!table.empty()) {
    DMCOW_RETURN_IF_ERROR(refcounts_->Allocate(DivRoundUp(table.size(), header_.cluster_size), &fresh));
    DMCOW_RETURN_IF_ERROR(overlap_->CheckWrite(fresh, table.size(), 0, "snapshot table write"));
    DMCOW_RETURN_IF_ERROR(file_->Write(fresh, table.data(), table.size()));
    DMCOW_RETURN_IF_ERROR(file_->Sync());
  }
  DMCOW_RETURN_IF_ERROR(refcounts_->Flush());  // (S1), and rule 1 for the table's own clusters
  uint8_t fields[12];                          // (S3): nb_snapshots and snapshots_offset, one write
  StoreBE32(fields, static_cast<uint32_t>(snapshots.size()));
  StoreBE64(fields + 4, fresh);
  DMCOW_RETURN_IF_ERROR(file_->Write(60, fields, sizeof(fields)));
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  if (old_offset != 0 && old_bytes != 0) {
    refcounts_->FreeLater(old_offset, old_bytes);
    overlap_->Remove(old_offset, old_bytes, Qcow2Metadata::kSnapshotTable);
  }
  if (!table.empty()) overlap_->Add(fresh, table.size(), Qcow2Metadata::kSnapshotTable);
  header_.nb_snapshots = static_cast<uint32_t>(snapshots.size());
  header_.snapshots_offset = fresh;
  info_.snapshots = snapshots;
  return Status::OK();
}

Status Qcow2Image::CreateSnapshotLocked(SnapshotInfo* snapshot) {
  DMCOW_RETURN_IF_ERROR(FlushLocked());
  std::vector<SnapshotInfo> snapshots;
  std::vector<std::vector<uint8_t>> unknown_extra;
  DMCOW_RETURN_IF_ERROR(ReadQcow2Snapshots(file_.get(), header_, &snapshots, &unknown_extra));
  // QEMU's find_new_snapshot_id: one past the largest numeric id.
  uint64_t max_id = 0;
  for (const SnapshotInfo& s : snapshots) max_id = std::max<uint64_t>(max_id, std::strtoull(s.id.c_str(), nullptr, 10));
  SnapshotInfo sn = *snapshot;
  sn.id = std::to_string(max_id + 1);
  for (const SnapshotInfo& s : snapshots) {
    if (s.id == sn.id) return Status::InvalidArgument(filename() + ": snapshot id " + sn.id + " is taken");
  }
  sn.has_disk_size = true;
  sn.disk_size = info_.virtual_size;
  sn.l1_size = static_cast<uint32_t>(l1_.size());
  sn.l1_table_offset = 0;

  // (S1) The tree's new counts first (checked for overflow before any).
  std::vector<uint64_t> l1 = ActiveL1Entries();
  DMCOW_RETURN_IF_ERROR(AdjustTreeRefcounts(l1, +1));
  const uint64_t l1_bytes = l1.size() * 8;
  if (!l1.empty()) {
    DMCOW_RETURN_IF_ERROR(refcounts_->Allocate(DivRoundUp(l1_bytes, header_.cluster_size), &sn.l1_table_offset));
    std::vector<uint8_t> raw(l1_bytes);
    for (uint64_t i = 0; i < l1.size(); i++) StoreBE64(&raw[i * 8], l1[i] & ~kCopied);  // shared from now on
    DMCOW_RETURN_IF_ERROR(overlap_->CheckWrite(sn.l1_table_offset, l1_bytes, 0, "snapshot L1 table write"));
    DMCOW_RETURN_IF_ERROR(file_->Write(sn.l1_table_offset, raw.data(), raw.size()));
    DMCOW_RETURN_IF_ERROR(file_->Sync());
    overlap_->Add(sn.l1_table_offset, l1_bytes, Qcow2Metadata::kSnapshotL1);
  }
  DMCOW_RETURN_IF_ERROR(refcounts_->Flush());
  // Every cluster of the tree now counts two: no COPIED flag stays.
  DMCOW_RETURN_IF_ERROR(SyncCopiedFlags(&l1));
  SetActiveL1Entries(l1);
  DMCOW_RETURN_IF_ERROR(FlushLocked());

  // (S3) The snapshot exists from this write on.
  snapshots.push_back(sn);
  unknown_extra.emplace_back();
  DMCOW_RETURN_IF_ERROR(WriteSnapshotTable(snapshots, unknown_extra));
  DMCOW_RETURN_IF_ERROR(FlushLocked());  // frees the old table
  *snapshot = sn;
  return Status::OK();
}

Status Qcow2Image::DeleteSnapshotLocked(const std::string& id) {
  DMCOW_RETURN_IF_ERROR(FlushLocked());
  std::vector<SnapshotInfo> snapshots;
  std::vector<std::vector<uint8_t>> unknown_extra;
  DMCOW_RETURN_IF_ERROR(ReadQcow2Snapshots(file_.get(), header_, &snapshots, &unknown_extra));
  size_t index = 0;
  while (index < snapshots.size() && snapshots[index].id != id) index++;
  if (index == snapshots.size()) return Status::NotFound(filename() + ": no snapshot with id '" + id + "'");
  const SnapshotInfo gone = snapshots[index];
  DMCOW_RETURN_IF_ERROR(file_->Size(&header_.file_size));  // the file grew since the open
  DMCOW_RETURN_IF_ERROR(
      ValidateL1Table(header_, filename(), "snapshot L1 table", gone.l1_table_offset, gone.l1_size, 0));
  std::vector<uint64_t> l1;
  DMCOW_RETURN_IF_ERROR(ReadL1Entries(gone.l1_table_offset, gone.l1_size, &l1));
  // A hostile tree is refused before the table changes.
  DMCOW_RETURN_IF_ERROR(VisitTree(l1, [](uint64_t, bool) { return Status::OK(); }));

  // (S2) The snapshot leaves the table, then its counts go.
  snapshots.erase(snapshots.begin() + static_cast<ptrdiff_t>(index));
  unknown_extra.erase(unknown_extra.begin() + static_cast<ptrdiff_t>(index));
  DMCOW_RETURN_IF_ERROR(WriteSnapshotTable(snapshots, unknown_extra));
  const uint64_t l1_bytes = l1.size() * 8;
  if (gone.l1_table_offset != 0 && l1_bytes != 0) {
    overlap_->Remove(gone.l1_table_offset, l1_bytes, Qcow2Metadata::kSnapshotL1);
    refcounts_->FreeLater(gone.l1_table_offset, l1_bytes);
  }
  DMCOW_RETURN_IF_ERROR(AdjustTreeRefcounts(l1, -1));
  DMCOW_RETURN_IF_ERROR(FlushLocked());  // applies the frees, refcounts written

  // What only the snapshot shared is the active state's alone again.
  std::vector<uint64_t> active = ActiveL1Entries();
  DMCOW_RETURN_IF_ERROR(SyncCopiedFlags(&active));
  SetActiveL1Entries(active);
  return FlushLocked();
}

Status Qcow2Image::ApplySnapshotLocked(const std::string& id) {
  DMCOW_RETURN_IF_ERROR(FlushLocked());
  const SnapshotInfo* found = nullptr;
  for (const SnapshotInfo& s : info_.snapshots) {
    if (s.id == id) found = &s;
  }
  if (found == nullptr) return Status::NotFound(filename() + ": no snapshot with id '" + id + "'");
  const SnapshotInfo target = *found;
  // A version 2 entry without a disk size has the current one (QEMU).
  const uint64_t disk_size = target.has_disk_size ? target.disk_size : info_.virtual_size;
  if (disk_size % 512 != 0 || disk_size > static_cast<uint64_t>(INT64_MAX)) {
    return Status::Corrupt(filename() + ": snapshot '" + target.name + "' has an invalid disk size");
  }
  DMCOW_RETURN_IF_ERROR(file_->Size(&header_.file_size));  // the file grew since the open
  DMCOW_RETURN_IF_ERROR(
      ValidateL1Table(header_, filename(), "snapshot L1 table", target.l1_table_offset, target.l1_size, disk_size));
  std::vector<uint64_t> next;
  DMCOW_RETURN_IF_ERROR(ReadL1Entries(target.l1_table_offset, target.l1_size, &next));
  // Both trees are walked again once the switch is made: hostile ones are
  // refused before anything changes.
  DMCOW_RETURN_IF_ERROR(VisitTree(ActiveL1Entries(), [](uint64_t, bool) { return Status::OK(); }));

  // (S1) The snapshot's tree gains the active state's reference; every
  // cluster of it is then shared, so its flags are cleared before the
  // active state can reach them.
  DMCOW_RETURN_IF_ERROR(AdjustTreeRefcounts(next, +1));
  const uint64_t cs = header_.cluster_size;
  const uint64_t l1_bytes = next.size() * 8;
  uint64_t fresh = 0;
  if (!next.empty()) DMCOW_RETURN_IF_ERROR(refcounts_->Allocate(DivRoundUp(l1_bytes, cs), &fresh));
  DMCOW_RETURN_IF_ERROR(refcounts_->Flush());
  DMCOW_RETURN_IF_ERROR(SyncCopiedFlags(&next));
  DMCOW_RETURN_IF_ERROR(l2_cache_->Flush());
  if (!next.empty()) {
    std::vector<uint8_t> raw(l1_bytes);
    for (uint64_t i = 0; i < next.size(); i++) StoreBE64(&raw[i * 8], next[i]);
    DMCOW_RETURN_IF_ERROR(overlap_->CheckWrite(fresh, l1_bytes, 0, "L1 table write"));
    DMCOW_RETURN_IF_ERROR(file_->Write(fresh, raw.data(), raw.size()));
    DMCOW_RETURN_IF_ERROR(file_->Sync());
  }

  // (S3) size, crypt_method (unchanged), l1_size, l1_table_offset: one write.
  uint8_t fields[24];
  StoreBE64(fields, disk_size);
  StoreBE32(fields + 8, header_.crypt_method);
  StoreBE32(fields + 12, static_cast<uint32_t>(next.size()));
  StoreBE64(fields + 16, fresh);
  DMCOW_RETURN_IF_ERROR(file_->Write(24, fields, sizeof(fields)));
  DMCOW_RETURN_IF_ERROR(file_->Sync());

  const std::vector<uint64_t> old = ActiveL1Entries();
  const uint64_t old_offset = header_.l1_table_offset;
  const uint64_t old_bytes = old.size() * 8;
  overlap_->Remove(old_offset, old_bytes, Qcow2Metadata::kActiveL1);
  for (uint64_t entry : old) {
    if (entry & kOffsetMask) overlap_->Remove(entry & kOffsetMask, cs, Qcow2Metadata::kActiveL2);
  }
  if (!next.empty()) overlap_->Add(fresh, l1_bytes, Qcow2Metadata::kActiveL1);
  for (uint64_t entry : next) {
    if (entry & kOffsetMask) overlap_->Add(entry & kOffsetMask, cs, Qcow2Metadata::kActiveL2);
  }
  header_.size = disk_size;
  header_.l1_size = static_cast<uint32_t>(next.size());
  header_.l1_table_offset = fresh;
  info_.virtual_size = disk_size;
  l1_.Clear();
  l1_.Resize(next.size());
  for (uint64_t i = 0; i < next.size(); i++) {
    if (next[i] != 0) l1_.Set(i, next[i]);
  }

  // (S2) The old active tree is unreachable: its counts go, then flags are
  // set where the new active state is alone.
  if (old_offset != 0 && old_bytes != 0) refcounts_->FreeLater(old_offset, old_bytes);
  DMCOW_RETURN_IF_ERROR(AdjustTreeRefcounts(old, -1));
  DMCOW_RETURN_IF_ERROR(FlushLocked());
  std::vector<uint64_t> active = ActiveL1Entries();
  DMCOW_RETURN_IF_ERROR(SyncCopiedFlags(&active));
  SetActiveL1Entries(active);
  return FlushLocked();
}

}  // namespace dmcow
