#include "qcow2/qcow2_metadata_tables.h"

#include <algorithm>

#include "qcow2/qcow2_bitmaps.h"
#include "util.h"

namespace dmcow {

using namespace qcow2;

Status ReadQcow2Snapshots(File* file, const Qcow2Header& h, std::vector<SnapshotInfo>* snapshots,
                          std::vector<std::vector<uint8_t>>* unknown_extra) {
  const std::string& name = file->name();
  uint64_t offset = h.snapshots_offset;
  const uint64_t table_end_limit = h.snapshots_offset + kMaxSnapshotTableBytes;
  snapshots->clear();
  if (unknown_extra != nullptr) unknown_extra->clear();
  snapshots->reserve(h.nb_snapshots);  // bounded by kMaxSnapshots, checked at open
  for (uint32_t i = 0; i < h.nb_snapshots; i++) {
    uint8_t fixed[40];
    DMCOW_RETURN_IF_ERROR(file->ReadExact(offset, sizeof(fixed), fixed, "snapshot table entry"));
    SnapshotInfo s;
    s.l1_table_offset = LoadBE64(fixed);
    s.l1_size = LoadBE32(fixed + 8);
    uint16_t id_size = LoadBE16(fixed + 12);
    uint16_t name_size = LoadBE16(fixed + 14);
    s.date_sec = LoadBE32(fixed + 16);
    s.date_nsec = LoadBE32(fixed + 20);
    s.vm_clock_nsec = LoadBE64(fixed + 24);
    s.vm_state_size = LoadBE32(fixed + 32);
    uint32_t extra_size = LoadBE32(fixed + 36);
    if (extra_size > kMaxSnapshotExtraData) {
      return Status::Corrupt(name + ": snapshot " + std::to_string(i) + " has too much extra data (" +
                             std::to_string(extra_size) + " bytes)");
    }
    uint64_t variable = uint64_t{extra_size} + id_size + name_size;  // at most 1024 + 2 * 65535
    std::vector<uint8_t> rest(variable);
    DMCOW_RETURN_IF_ERROR(file->ReadExact(offset + 40, rest.size(), rest.data(), "snapshot table entry"));
    const uint8_t* extra = rest.data();
    if (extra_size >= 8) s.vm_state_size = LoadBE64(extra);
    if (extra_size >= 16) {
      s.has_disk_size = true;
      s.disk_size = LoadBE64(extra + 8);
    }
    if (extra_size >= 24) {
      uint64_t icount = LoadBE64(extra + 16);
      s.has_icount = icount != UINT64_MAX;
      s.icount = icount;
    }
    if (h.version >= 3 && extra_size < 16) {
      return Status::Corrupt(name + ": snapshot " + std::to_string(i) + " lacks the extra data version 3 requires");
    }
    s.id.assign(reinterpret_cast<const char*>(extra + extra_size), id_size);
    s.name.assign(reinterpret_cast<const char*>(extra + extra_size + id_size), name_size);
    if (s.l1_size > kMaxL1Bytes / 8) {
      return Status::Corrupt(name + ": snapshot '" + s.name + "' L1 table is too large (" + std::to_string(s.l1_size) +
                             " entries)");
    }
    if (s.l1_table_offset & (h.cluster_size - 1)) {
      return Status::Corrupt(name + ": snapshot '" + s.name + "' L1 table offset " + Hex(s.l1_table_offset) +
                             " is not cluster aligned");
    }
    offset += 40 + variable;
    offset = (offset + 7) & ~uint64_t{7};
    if (offset > table_end_limit) {
      return Status::Corrupt(name + ": snapshot table is larger than " + std::to_string(kMaxSnapshotTableBytes) +
                             " bytes");
    }
    if (unknown_extra != nullptr) {
      unknown_extra->emplace_back(extra + std::min<uint32_t>(extra_size, kKnownSnapshotExtraData), extra + extra_size);
    }
    snapshots->push_back(std::move(s));
  }
  return Status::OK();
}

Status Qcow2SnapshotTableBytes(File* file, const Qcow2Header& h, uint64_t* bytes) {
  uint64_t offset = h.snapshots_offset;
  for (uint32_t i = 0; i < h.nb_snapshots; i++) {  // nb_snapshots bounded at open
    uint8_t fixed[40];
    DMCOW_RETURN_IF_ERROR(file->ReadExact(offset, sizeof(fixed), fixed, "snapshot table entry"));
    const uint64_t variable = uint64_t{LoadBE32(fixed + 36)} + LoadBE16(fixed + 12) + LoadBE16(fixed + 14);
    offset = (offset + 40 + variable + 7) & ~uint64_t{7};
    if (offset - h.snapshots_offset > kMaxSnapshotTableBytes) {
      return Status::Corrupt(file->name() + ": snapshot table is larger than " +
                             std::to_string(kMaxSnapshotTableBytes) + " bytes");
    }
  }
  *bytes = offset - h.snapshots_offset;
  return Status::OK();
}

Status ReadQcow2Bitmaps(File* file, const Qcow2Header& h, std::vector<BitmapInfo>* bitmaps) {
  std::vector<Qcow2Bitmap> directory;
  DMCOW_RETURN_IF_ERROR(ReadQcow2BitmapDirectory(file, h, &directory));
  bitmaps->clear();
  for (const Qcow2Bitmap& b : directory) {
    BitmapInfo info;
    info.name = b.name;
    info.granularity = uint32_t{1} << b.granularity_bits;
    info.in_use = b.in_use();
    info.auto_flag = b.flags & Qcow2Bitmap::kAuto;
    bitmaps->push_back(std::move(info));
  }
  return Status::OK();
}

}  // namespace dmcow
