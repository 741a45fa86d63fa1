// The snapshot table as the check reads it: QEMU does not read it when it
// opens an image for a check, so that a broken table can be examined and,
// with -r all, repaired (qcow2_check_read_snapshot_table,
// qcow2_do_read_snapshots and qcow2_check_fix_snapshot_table in QEMU 7.2).
#include <algorithm>
#include <climits>
#include <cstring>

#include "qcow2/check/qcow2_check.h"

namespace dmcow {

using namespace qcow2;
using Kind = CheckFinding::Kind;

namespace {
constexpr uint64_t kExtraKnown = 24;  // vm_state_size_large, disk_size, icount
}  // namespace

// Reads nb_snapshots entries from h_.snapshots_offset. With `repair`,
// entries with too much extra data are truncated and a table that is too
// large loses its overhanging entries (counted in *reduced), instead of
// failing. Bytes past the end of the file read as zeros.
Status Qcow2Check::ReadSnapshots(bool repair, uint32_t* reduced, uint32_t* extra_dropped, std::string* error) {
  snapshots_.clear();
  snapshots_size_ = 0;
  const uint64_t start = h_.snapshots_offset;
  uint64_t offset = start;
  uint64_t table_length = 0;
  const uint32_t count = h_.nb_snapshots;
  for (uint32_t i = 0; i < count; i++) {
    const uint64_t entry_start = offset;
    table_length = (table_length + 7) & ~uint64_t{7};
    offset = (offset + 7) & ~uint64_t{7};
    Snapshot sn;
    sn.fixed.resize(40);
    DMCOW_RETURN_IF_ERROR(ReadPadded(file_, offset, 40, sn.fixed.data()));
    offset += 40;
    sn.l1_offset = LoadBE64(&sn.fixed[0]);
    sn.l1_size = LoadBE32(&sn.fixed[8]);
    const uint16_t id_size = LoadBE16(&sn.fixed[12]);
    const uint16_t name_size = LoadBE16(&sn.fixed[14]);
    uint32_t extra_size = LoadBE32(&sn.fixed[36]);
    const uint64_t extra_end = offset + extra_size;
    if (extra_size > kMaxSnapshotExtraData) {
      if (!repair) {
        *error = Format("Too much extra metadata in snapshot table entry %u", i);
        Report(Kind::kNote, entry_start, "You can force-remove this extra metadata with qemu-img check -r all");
        return Status::Corrupt(name() + ": " + *error);
      }
      Report(Kind::kRepaired, entry_start,
             Format("Discarding too much extra metadata in snapshot table entry %u (%u > %u)", i, extra_size,
                    kMaxSnapshotExtraData));
      (*extra_dropped)++;
      extra_size = kMaxSnapshotExtraData;
    }
    sn.extra_size = extra_size;
    sn.extra.resize(extra_size);
    DMCOW_RETURN_IF_ERROR(ReadPadded(file_, offset, extra_size, sn.extra.data()));
    offset = extra_end;
    std::string strings(uint64_t{id_size} + name_size, '\0');
    DMCOW_RETURN_IF_ERROR(ReadPadded(file_, offset, strings.size(), strings.data()));
    offset += strings.size();
    sn.id = strings.substr(0, id_size);
    sn.name = strings.substr(id_size);
    // QEMU stops these strings at a NUL.
    sn.id.resize(std::strlen(sn.id.c_str()));
    sn.name.resize(std::strlen(sn.name.c_str()));

    table_length += 40 + uint64_t{extra_size} + id_size + name_size;
    if (table_length > kMaxSnapshotTableBytes || offset - start > INT_MAX) {
      if (!repair) {
        *error = "Snapshot table is too big";
        Report(Kind::kNote, start,
               Format("You can force-remove all %u overhanging snapshots with qemu-img check -r all", count - i));
        return Status::Corrupt(name() + ": " + *error);
      }
      Report(Kind::kRepaired, entry_start,
             Format("Discarding %u overhanging snapshots (snapshot table is too big)", count - i));
      *reduced += count - i;
      offset = entry_start;
      break;
    }
    snapshots_.push_back(std::move(sn));
  }
  snapshots_size_ = offset - start;
  return Status::OK();
}

Status Qcow2Check::ReadSnapshotTable(Qcow2CheckCounts* res) {
  uint32_t reduced = 0, extra_dropped = 0;
  const bool repair = fix_ & kFixErrors;
  if (h_.nb_snapshots > kMaxSnapshots && repair) {
    Report(Kind::kRepaired, 60, Format("Discarding %u overhanging snapshots", h_.nb_snapshots - kMaxSnapshots));
    reduced += h_.nb_snapshots - kMaxSnapshots;
    h_.nb_snapshots = kMaxSnapshots;
  }
  // qcow2_validate_table(offset, nb_snapshots, 40 bytes each)
  std::string error;
  if (h_.nb_snapshots > kMaxSnapshots) {
    error = "snapshot table too large";
  } else if (static_cast<uint64_t>(INT64_MAX) - uint64_t{h_.nb_snapshots} * 40 < h_.snapshots_offset ||
             (h_.snapshots_offset & (cs() - 1))) {
    error = "snapshot table offset invalid";
  }
  if (!error.empty()) {
    res->check_errors++;
    Report(Kind::kCheckError, 64, "ERROR " + error);
    if (h_.nb_snapshots > kMaxSnapshots) {
      Report(Kind::kNote, 60,
             Format("You can force-remove all %u overhanging snapshots with qemu-img check -r all",
                    h_.nb_snapshots - kMaxSnapshots));
    }
    return Status::Corrupt(name() + ": " + error);
  }
  Status s = ReadSnapshots(repair, &reduced, &extra_dropped, &error);
  if (!s.ok()) {
    res->check_errors++;
    Report(Kind::kCheckError, h_.snapshots_offset,
           "ERROR failed to read the snapshot table: " + (error.empty() ? s.message() : error));
    snapshots_.clear();
    return s;
  }
  res->corruptions += reduced + extra_dropped;
  if (reduced) {
    // Fewer snapshots only drop references (clusters leak, which the
    // refcount check then frees); written at once, as the refcount check
    // must see the table as the header gives it.
    h_.nb_snapshots = static_cast<uint32_t>(snapshots_.size());
    uint8_t raw[4];
    StoreBE32(raw, h_.nb_snapshots);
    s = file_->Write(60, raw, sizeof(raw));
    if (s.ok()) s = file_->Sync();
    if (!s.ok()) {
      res->check_errors++;
      Report(Kind::kCheckError, 60, "ERROR failed to update the snapshot count in the image header: " + s.message());
      return s;
    }
    res->corruptions_fixed += reduced;
    res->corruptions -= reduced;
  }
  if (repair) {
    // Beyond QEMU: a snapshot whose L1 table cannot be read (misaligned,
    // too large, past the end of the file) is dropped from the table, which
    // is then rewritten (FixSnapshotTable); its clusters become leaks.
    for (size_t i = 0; i < snapshots_.size();) {
      const Snapshot& sn = snapshots_[i];
      const uint64_t end = sn.l1_offset + uint64_t{sn.l1_size} * 8;
      const char* why = (sn.l1_offset & (cs() - 1))                    ? "is not cluster aligned"
                        : sn.l1_size > kMaxL1Bytes / 8                 ? "is too large"
                        : sn.l1_offset > kMaxIoEnd - kMaxL1Bytes       ? "lies past the end of the file"
                        : end > file_size_ && end - file_size_ >= cs() ? "lies past the end of the file"
                                                                       : nullptr;
      if (why == nullptr) {
        i++;
        continue;
      }
      res->corruptions++;
      Report(Kind::kRepaired, h_.snapshots_offset,
             Format("Discarding snapshot %s (%s): its L1 table at %#llx %s", sn.id.c_str(), sn.name.c_str(),
                    static_cast<unsigned long long>(sn.l1_offset), why));
      snapshots_.erase(snapshots_.begin() + i);
    }
  }
  if (h_.version >= 3) {
    for (size_t i = 0; i < snapshots_.size(); i++) {
      if (snapshots_[i].extra_size >= 16) continue;
      res->corruptions++;
      Report(repair ? Kind::kRepaired : Kind::kCorruption, h_.snapshots_offset,
             Format("%s snapshot table entry %zu is incomplete", repair ? "Repairing" : "ERROR", i));
    }
  }
  return Status::OK();
}

Status Qcow2Check::FixSnapshotTable(Qcow2CheckCounts* res) {
  if (!res->corruptions || !(fix_ & kFixErrors)) return Status::OK();
  Status s = WriteSnapshotTable();
  if (!s.ok()) {
    res->check_errors++;
    Report(Kind::kCheckError, h_.snapshots_offset, "ERROR failed to update snapshot table: " + s.message());
    return s;
  }
  res->corruptions_fixed += res->corruptions;
  res->corruptions = 0;
  return Status::OK();
}

// The table as qcow2_write_snapshots lays it out: every entry gets at least
// the 24 bytes of known extra data, filled in where it was missing.
std::vector<uint8_t> Qcow2Check::SerializeSnapshots() const {
  std::vector<uint8_t> out;
  for (const Snapshot& sn : snapshots_) {
    out.resize((out.size() + 7) & ~size_t{7}, 0);
    const size_t at = out.size();
    const uint32_t extra_size = std::max<uint32_t>(kExtraKnown, sn.extra_size);
    out.resize(at + 40 + extra_size + sn.id.size() + sn.name.size(), 0);
    uint8_t* p = &out[at];
    std::memcpy(p, sn.fixed.data(), 40);
    StoreBE16(p + 12, static_cast<uint16_t>(sn.id.size()));
    StoreBE16(p + 14, static_cast<uint16_t>(sn.name.size()));
    StoreBE32(p + 36, extra_size);
    // Known extra data: vm state size (64 bit), disk size, icount.
    uint64_t vm_state = LoadBE32(p + 32);
    if (sn.extra_size >= 8) vm_state = LoadBE64(&sn.extra[0]);
    if (vm_state > UINT32_MAX) StoreBE32(p + 32, 0);
    const uint64_t disk_size = sn.extra_size >= 16 ? LoadBE64(&sn.extra[8]) : h_.size / 512 * 512;
    const uint64_t icount = sn.extra_size >= 24 ? LoadBE64(&sn.extra[16]) : UINT64_MAX;
    StoreBE64(p + 40, vm_state);
    StoreBE64(p + 48, disk_size);
    StoreBE64(p + 56, icount);
    if (sn.extra_size > kExtraKnown)
      std::memcpy(p + 40 + kExtraKnown, &sn.extra[kExtraKnown], sn.extra_size - kExtraKnown);
    std::memcpy(p + 40 + extra_size, sn.id.data(), sn.id.size());
    std::memcpy(p + 40 + extra_size + sn.id.size(), sn.name.data(), sn.name.size());
  }
  return out;
}

}  // namespace dmcow
