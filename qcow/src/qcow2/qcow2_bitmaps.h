// Persistent dirty bitmaps (the qcow2 bitmaps extension): where each
// bitmap's directory entry and table lie, its flags, and setting its bits.
//
// An enabled bitmap promises incremental backup tools that every guest
// cluster written since it was enabled has its bit set. A writer that
// changes guest content either sets those bits or makes the bitmap visibly
// inconsistent (the in_use flag, or the header's autoclear bit): never
// enabled, consistent and stale. Setting bits is always safe (a backup
// copies a little more); clearing one is never done here.
#ifndef DMCOW_QCOW_QCOW2_BITMAPS_H_
#define DMCOW_QCOW_QCOW2_BITMAPS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "qcow2/qcow2_header.h"

namespace dmcow {

struct Qcow2Bitmap {
  static constexpr uint32_t kInUse = 1;  // being modified, or left inconsistent
  static constexpr uint32_t kAuto = 2;   // enabled: tracks every write

  std::string name;
  uint64_t entry_offset = 0;  // of its directory entry in the file
  uint64_t table_offset = 0;
  uint32_t table_entries = 0;
  uint32_t flags = 0;
  uint8_t granularity_bits = 0;

  bool in_use() const { return flags & kInUse; }
  bool enabled() const { return (flags & kAuto) && !in_use(); }
};

// QEMU's bounds (block/qcow2-bitmap.c) and the table entry flag.
constexpr uint64_t kBitmapAllOnesEntry = 1;             // BME_TABLE_ENTRY_FLAG_ALL_ONES: every bit of the cluster set
constexpr uint64_t kMaxBitmapTableEntries = 0x8000000;  // BME_MAX_TABLE_SIZE
constexpr uint64_t kMaxBitmapBytes = 0x20000000;        // BME_MAX_PHYS_SIZE

// The table entries QEMU serialises a bitmap of a `disk`-byte disk into
// (64-bit words of bits, in clusters of `cluster_size`); 0 for 0 bytes.
uint64_t Qcow2BitmapTableEntries(uint64_t disk, uint8_t granularity_bits, uint64_t cluster_size);

// QEMU's "Too much space will be occupied by the bitmap": the bits of a
// `disk`-byte disk at `granularity` exceed what QEMU stores.
bool Qcow2BitmapTooLarge(uint64_t disk, uint64_t granularity, uint64_t cluster_size);

// A bitmap as stored: its table, in the file of the image that holds it
// (a merge reads bitmaps of another image).
struct Qcow2StoredBitmap {
  File* file = nullptr;
  uint64_t cluster_size = 0;
  uint64_t table_offset = 0;
  uint32_t table_entries = 0;
  uint8_t granularity_bits = 0;
};

// A bitmap of a directory being planned (qcow2_bitmap_change.cc).
struct Qcow2PlannedBitmap {
  Qcow2Bitmap meta;      // name, flags, granularity; its stored table while !rewrite
  bool rewrite = false;  // its bits change: written anew as the union of `bits_from`
  std::vector<Qcow2StoredBitmap> bits_from;
  // And of these guest byte ranges (start -> end), when not null: the
  // writes noted while the bitmap was maintained (OpenOptions).
  const std::map<uint64_t, uint64_t>* also_dirty = nullptr;
};

// QEMU's first checks of a new bitmap (qmp_block_dirty_bitmap_add): a
// name, and a granularity (0: the default) that is a power of two from 512
// bytes to 2 GiB. InvalidArgument with qemu's words after "PATH: ".
Status CheckBitmapAddRequest(const std::string& path, const std::string& name, uint64_t granularity);

// The bitmap directory with every check QEMU makes when it opens an image
// (each table of a bitmap not in use is validated too). Empty without the
// extension (or with its autoclear bit clear: QEMU ignores it then).
Status ReadQcow2BitmapDirectory(File* file, const Qcow2Header& header, std::vector<Qcow2Bitmap>* bitmaps);

// Writes the flags of one directory entry: 4 bytes inside one sector.
Status WriteQcow2BitmapFlags(File* file, const Qcow2Bitmap& bitmap, uint32_t flags);

// Sets the bits of `bitmap` covering the guest byte ranges (start, length).
// A table entry whose data cluster `may_write` allows is updated in place;
// any other entry (all zeros, or a cluster that may not be written) becomes
// "all ones" (bit 0, no cluster), which sets more bits than asked but
// allocates nothing. The table must be writable (the caller checks). Only
// sets bits: after a crash every bit is as before or set. Not synced.
Status SetQcow2BitmapBits(File* file, const Qcow2Header& header, const Qcow2Bitmap& bitmap,
                          const std::vector<std::pair<uint64_t, uint64_t>>& guest_ranges,
                          const std::function<bool(uint64_t offset)>& may_write_cluster);

}  // namespace dmcow

#endif  // DMCOW_QCOW_QCOW2_BITMAPS_H_
