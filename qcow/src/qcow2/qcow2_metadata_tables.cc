#include "qcow2/qcow2_metadata_tables.h"

#include <algorithm>

#include "util.h"

namespace dmcow {

using namespace qcow2;

namespace {

struct BitmapTableRef {
  uint64_t offset = 0;
  uint64_t bytes = 0;
  const std::string* name = nullptr;
};

// QEMU's bitmap_table_load and check_table_entry (block/qcow2-bitmap.c),
// which load_bitmap runs at every open for each bitmap not in use: an entry
// with reserved bits set (1-8, 56-63), or with an offset that is not cluster
// aligned or carries the all-ones flag (bit 0), fails the open ("Could not
// read bitmap_table table from image for bitmap ..."). Each stretch of the
// file is read once however many tables share it, and bytes past the end of
// the file read as zeros (valid entries), so the work is bounded by the file
// size, a chunk at a time.
Status ValidateBitmapTables(File* file, const Qcow2Header& h, std::vector<BitmapTableRef> tables) {
  constexpr uint64_t kEntryReserved = 0xff000000000001feULL;  // BME_TABLE_ENTRY_RESERVED_MASK
  constexpr uint64_t kAllOnes = 1;                            // BME_TABLE_ENTRY_FLAG_ALL_ONES
  constexpr uint64_t kChunkBytes = 64 << 10;
  std::sort(tables.begin(), tables.end(),
            [](const BitmapTableRef& a, const BitmapTableRef& b) { return a.offset < b.offset; });
  const uint64_t readable_end = (h.file_size + 7) & ~uint64_t{7};  // a partial last entry reads zero-padded
  uint64_t done = 0;                                               // entries below this file offset are validated
  std::vector<uint8_t> buf;
  for (const BitmapTableRef& t : tables) {
    if (t.offset >= readable_end) continue;                           // all zeros: valid
    const uint64_t end = std::min(t.offset + t.bytes, readable_end);  // no overflow: offset < 2^63, bytes < 2^31
    for (uint64_t from = std::max(t.offset, done); from < end;) {
      const size_t n = static_cast<size_t>(std::min(kChunkBytes, end - from));
      buf.assign(n, 0);
      size_t got = 0;
      DMCOW_RETURN_IF_ERROR(file->Read(from, n, buf.data(), &got));
      for (size_t i = 0; i < n; i += 8) {
        const uint64_t entry = LoadBE64(&buf[i]);
        const uint64_t offset = entry & kOffsetMask;
        const char* why = (entry & kEntryReserved)                    ? "reserved bits set"
                          : offset && (entry & kAllOnes)              ? "the all-ones flag set with a data offset"
                          : offset && (offset & (h.cluster_size - 1)) ? "a data offset that is not cluster aligned"
                                                                      : nullptr;
        if (why) {
          return Status::Corrupt(file->name() + ": bitmap '" + *t.name +
                                 "' has an invalid bitmap table entry at offset " + Hex(from + i) + " (" + Hex(entry) +
                                 "): " + why);
        }
      }
      from += n;
    }
    done = std::max(done, end);
  }
  return Status::OK();
}

}  // namespace

Status ReadQcow2Snapshots(File* file, const Qcow2Header& h, std::vector<SnapshotInfo>* snapshots) {
  const std::string& name = file->name();
  uint64_t offset = h.snapshots_offset;
  const uint64_t table_end_limit = h.snapshots_offset + kMaxSnapshotTableBytes;
  snapshots->clear();
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
    snapshots->push_back(std::move(s));
  }
  return Status::OK();
}

Status ReadQcow2Bitmaps(File* file, const Qcow2Header& h, std::vector<BitmapInfo>* bitmaps) {
  bitmaps->clear();
  if (!h.has_bitmaps_ext) return Status::OK();
  const std::string& name = file->name();
  // The checks of QEMU's bitmap_list_load and check_dir_entry (block/qcow2-bitmap.c),
  // which QEMU applies on every open, then those of its bitmap_table_load.
  constexpr uint64_t kMaxTableEntries = 0x8000000;  // BME_MAX_TABLE_SIZE
  constexpr uint64_t kMaxPhysBytes = 0x20000000;    // BME_MAX_PHYS_SIZE
  constexpr uint32_t kReservedFlags = 0xfffffffc;
  constexpr uint32_t kFlagInUse = 1;
  if (h.bitmap_directory_size == 0) return Status::Corrupt(name + ": bitmap directory is empty");
  // Size bounded at open (<= 64 MiB) and known to lie inside the file.
  std::vector<uint8_t> dir(h.bitmap_directory_size);
  DMCOW_RETURN_IF_ERROR(file->ReadExact(h.bitmap_directory_offset, dir.size(), dir.data(), "bitmap directory"));
  uint64_t pos = 0;
  uint32_t count = 0;
  std::vector<uint64_t> table_offsets;  // per bitmap, beside *bitmaps
  std::vector<uint32_t> table_sizes;
  while (pos < dir.size()) {
    if (dir.size() - pos < 24) return Status::Corrupt(name + ": bitmap directory is truncated");
    if (++count > h.nb_bitmaps) {
      return Status::Corrupt(name + ": bitmap directory holds more bitmaps than the " + std::to_string(h.nb_bitmaps) +
                             " its header extension gives");
    }
    const uint8_t* e = &dir[pos];
    const uint64_t table_offset = LoadBE64(e);
    const uint32_t table_entries = LoadBE32(e + 8);
    const uint32_t flags = LoadBE32(e + 12);
    const uint8_t type = e[16];
    const uint8_t granularity_bits = e[17];
    const uint16_t name_size = LoadBE16(e + 18);
    const uint32_t extra_size = LoadBE32(e + 20);
    const uint64_t entry_size = (24 + uint64_t{extra_size} + name_size + 7) & ~uint64_t{7};
    if (entry_size > dir.size() - pos)
      return Status::Corrupt(name + ": bitmap directory entry overflows the directory");
    BitmapInfo b;
    b.name.assign(reinterpret_cast<const char*>(e + 24 + extra_size), name_size);
    const std::string what = name + ": bitmap '" + b.name + "'";
    if (extra_size != 0) return Status::NotSupported(what + " has extra data, which is not supported");
    if (granularity_bits < 9 || granularity_bits > 31) {
      return Status::Corrupt(name + ": bitmap granularity 2^" + std::to_string(granularity_bits) + " is out of range");
    }
    if (table_entries == 0 || table_offset == 0 || (table_offset & (h.cluster_size - 1)) ||
        table_entries > kMaxTableEntries || uint64_t{table_entries} * h.cluster_size > kMaxPhysBytes) {
      return Status::Corrupt(what + " has an invalid bitmap table (" + std::to_string(table_entries) +
                             " entries at offset " + Hex(table_offset) + ")");
    }
    if (flags & kReservedFlags) return Status::Corrupt(what + " has reserved flags set (" + Hex(flags) + ")");
    if (name_size > 1023) return Status::Corrupt(what + " has a name longer than 1023 bytes");
    if (type != 1) return Status::Corrupt(what + " has unknown type " + std::to_string(type));
    if (!(flags & kFlagInUse)) {
      // A bitmap in use is stale and skipped; a clean one must cover the disk
      // with exactly the table QEMU would serialise it to (64-bit words).
      const uint64_t covered = (uint64_t{table_entries} * h.cluster_size * 8) << granularity_bits;  // < 2^63
      // QEMU sizes bitmaps by the disk's length in whole sectors.
      const uint64_t disk = h.DiskSize();
      const uint64_t words = disk == 0 ? 0 : ((disk - 1) >> granularity_bits >> 6) + 1;
      const uint64_t expected = DivRoundUp(words * 8, h.cluster_size);
      if (disk > covered || table_entries != expected) {
        return Status::Corrupt(what + " has " + std::to_string(table_entries) + " bitmap table entries where " +
                               std::to_string(expected) + " are needed");
      }
    }
    table_offsets.push_back(table_offset);
    table_sizes.push_back(table_entries);
    b.granularity = uint32_t{1} << granularity_bits;
    b.in_use = flags & kFlagInUse;
    b.auto_flag = flags & 2;
    bitmaps->push_back(std::move(b));
    pos += entry_size;
  }
  if (count != h.nb_bitmaps) {
    return Status::Corrupt(name + ": bitmap directory holds " + std::to_string(count) +
                           " bitmaps where its header extension gives " + std::to_string(h.nb_bitmaps));
  }
  // Then, as QEMU's qcow2_load_dirty_bitmaps does, each table of a bitmap not in use.
  std::vector<BitmapTableRef> tables;
  for (size_t i = 0; i < bitmaps->size(); i++) {
    if (!(*bitmaps)[i].in_use) tables.push_back({table_offsets[i], uint64_t{table_sizes[i]} * 8, &(*bitmaps)[i].name});
  }
  return ValidateBitmapTables(file, h, std::move(tables));
}

}  // namespace dmcow
