// Persistent dirty bitmaps: reading the directory as QEMU validates it, and
// setting bits. See qcow2_bitmaps.h for what a writer owes an enabled bitmap.
#include "qcow2/qcow2_bitmaps.h"

#include <algorithm>

#include "util.h"

namespace dmcow {

using namespace qcow2;

namespace {

constexpr uint64_t kEntryReserved = 0xff000000000001feULL;  // BME_TABLE_ENTRY_RESERVED_MASK

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
                          : offset && (entry & kBitmapAllOnesEntry)   ? "the all-ones flag set with a data offset"
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

Status ReadQcow2BitmapDirectory(File* file, const Qcow2Header& h, std::vector<Qcow2Bitmap>* bitmaps) {
  bitmaps->clear();
  if (!h.has_bitmaps_ext) return Status::OK();
  const std::string& name = file->name();
  // The checks of QEMU's bitmap_list_load and check_dir_entry (block/qcow2-bitmap.c),
  // which QEMU applies on every open, then those of its bitmap_table_load.
  constexpr uint32_t kReservedFlags = 0xfffffffc;
  if (h.bitmap_directory_size == 0) return Status::Corrupt(name + ": bitmap directory is empty");
  // Size bounded at open (<= 64 MiB) and known to lie inside the file.
  std::vector<uint8_t> dir(h.bitmap_directory_size);
  DMCOW_RETURN_IF_ERROR(file->ReadExact(h.bitmap_directory_offset, dir.size(), dir.data(), "bitmap directory"));
  uint64_t pos = 0;
  uint32_t count = 0;
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
    Qcow2Bitmap b;
    b.name.assign(reinterpret_cast<const char*>(e + 24 + extra_size), name_size);
    const std::string what = name + ": bitmap '" + b.name + "'";
    if (extra_size != 0) return Status::NotSupported(what + " has extra data, which is not supported");
    if (granularity_bits < 9 || granularity_bits > 31) {
      return Status::Corrupt(name + ": bitmap granularity 2^" + std::to_string(granularity_bits) + " is out of range");
    }
    if (table_entries == 0 || table_offset == 0 || (table_offset & (h.cluster_size - 1)) ||
        table_entries > kMaxBitmapTableEntries || uint64_t{table_entries} * h.cluster_size > kMaxBitmapBytes) {
      return Status::Corrupt(what + " has an invalid bitmap table (" + std::to_string(table_entries) +
                             " entries at offset " + Hex(table_offset) + ")");
    }
    if (flags & kReservedFlags) return Status::Corrupt(what + " has reserved flags set (" + Hex(flags) + ")");
    if (name_size > 1023) return Status::Corrupt(what + " has a name longer than 1023 bytes");
    if (type != 1) return Status::Corrupt(what + " has unknown type " + std::to_string(type));
    if (!(flags & Qcow2Bitmap::kInUse)) {
      // A bitmap in use is stale and skipped; a clean one must cover the disk
      // with exactly the table QEMU would serialise it to (64-bit words).
      const uint64_t covered = (uint64_t{table_entries} * h.cluster_size * 8) << granularity_bits;  // < 2^63
      // QEMU sizes bitmaps by the disk's length in whole sectors.
      const uint64_t disk = h.DiskSize();
      const uint64_t expected = Qcow2BitmapTableEntries(disk, granularity_bits, h.cluster_size);
      if (disk > covered || table_entries != expected) {
        return Status::Corrupt(what + " has " + std::to_string(table_entries) + " bitmap table entries where " +
                               std::to_string(expected) + " are needed");
      }
    }
    b.entry_offset = h.bitmap_directory_offset + pos;
    b.table_offset = table_offset;
    b.table_entries = table_entries;
    b.flags = flags;
    b.granularity_bits = granularity_bits;
    bitmaps->push_back(std::move(b));
    pos += entry_size;
  }
  if (count != h.nb_bitmaps) {
    return Status::Corrupt(name + ": bitmap directory holds " + std::to_string(count) +
                           " bitmaps where its header extension gives " + std::to_string(h.nb_bitmaps));
  }
  // Then, as QEMU's qcow2_load_dirty_bitmaps does, each table of a bitmap not in use.
  std::vector<BitmapTableRef> tables;
  for (const Qcow2Bitmap& b : *bitmaps) {
    if (!b.in_use()) tables.push_back({b.table_offset, uint64_t{b.table_entries} * 8, &b.name});
  }
  return ValidateBitmapTables(file, h, std::move(tables));
}

uint64_t Qcow2BitmapTableEntries(uint64_t disk, uint8_t granularity_bits, uint64_t cluster_size) {
  const uint64_t words = disk == 0 ? 0 : ((disk - 1) >> granularity_bits >> 6) + 1;
  return DivRoundUp(words * 8, cluster_size);
}

bool Qcow2BitmapTooLarge(uint64_t disk, uint64_t granularity, uint64_t cluster_size) {
  const uint64_t bytes = DivRoundUp(DivRoundUp(disk, granularity), 8);
  return bytes > kMaxBitmapBytes || bytes > kMaxBitmapTableEntries * cluster_size;
}

Status CheckBitmapAddRequest(const std::string& path, const std::string& name, uint64_t granularity) {
  if (name.empty()) return Status::InvalidArgument(path + ": Bitmap name cannot be empty");
  if (granularity != 0 &&
      (granularity < 512 || granularity > (uint64_t{1} << 31) || (granularity & (granularity - 1)))) {
    return Status::InvalidArgument(path + ": Granularity must be power of 2 and at least 512");
  }
  return Status::OK();
}

Status WriteQcow2BitmapFlags(File* file, const Qcow2Bitmap& bitmap, uint32_t flags) {
  uint8_t raw[4];
  StoreBE32(raw, flags);
  return file->Write(bitmap.entry_offset + 12, raw, sizeof(raw));
}

Status SetQcow2BitmapBits(File* file, const Qcow2Header& h, const Qcow2Bitmap& bitmap,
                          const std::vector<std::pair<uint64_t, uint64_t>>& guest_ranges,
                          const std::function<bool(uint64_t offset)>& may_write_cluster) {
  const uint64_t disk = h.DiskSize();
  const uint64_t bits_per_cluster = h.cluster_size * 8;
  std::vector<uint8_t> cluster(h.cluster_size);
  for (const auto& [start, length] : guest_ranges) {
    if (length == 0 || start >= disk) continue;
    const uint64_t end = std::min(disk, start + std::min(length, disk - start));
    const uint64_t first_bit = start >> bitmap.granularity_bits;
    const uint64_t last_bit = (end - 1) >> bitmap.granularity_bits;
    for (uint64_t index = first_bit / bits_per_cluster; index <= last_bit / bits_per_cluster; index++) {
      // Validated at open: a bitmap not in use covers the whole disk.
      if (index >= bitmap.table_entries) {
        return Status::Corrupt(file->name() + ": bitmap '" + bitmap.name + "' table is too short for the disk");
      }
      uint8_t raw[8];
      const uint64_t entry_at = bitmap.table_offset + index * 8;
      DMCOW_RETURN_IF_ERROR(file->ReadExact(entry_at, sizeof(raw), raw, "bitmap table entry"));
      const uint64_t entry = LoadBE64(raw);
      if (entry == kBitmapAllOnesEntry) continue;
      const uint64_t offset = entry & kOffsetMask;
      if (offset != 0 && may_write_cluster(offset)) {
        DMCOW_RETURN_IF_ERROR(file->ReadExact(offset, cluster.size(), cluster.data(), "bitmap data cluster"));
        const uint64_t base = index * bits_per_cluster;
        const uint64_t from = std::max(first_bit, base) - base;
        const uint64_t to = std::min(last_bit, base + bits_per_cluster - 1) - base;
        for (uint64_t bit = from; bit <= to; bit++) cluster[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
        DMCOW_RETURN_IF_ERROR(file->Write(offset, cluster.data(), cluster.size()));
        continue;
      }
      StoreBE64(raw, kBitmapAllOnesEntry);
      DMCOW_RETURN_IF_ERROR(file->Write(entry_at, raw, sizeof(raw)));
    }
  }
  return Status::OK();
}

}  // namespace dmcow
