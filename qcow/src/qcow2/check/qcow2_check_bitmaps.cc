// Qcow2Check and persistent bitmaps: a repair that changes what the guest
// reads (-r all dropping a table entry) owes every enabled bitmap the bits
// of the changed ranges (qcow2/qcow2_bitmaps.h). Steps (0) and (7) of the
// REPAIR ORDERING in qcow2_check_repair.cc:
//  (0) Before any table is written, each enabled bitmap is marked in use
//      (its directory flags, 4 bytes in one sector), synced. From then on
//      QEMU treats it as inconsistent, never as a stale truth.
//  (7) After the repair and the double check found the image clean (so the
//      stored refcounts are exact), the bits are set: in place in a data
//      cluster only the bitmap references (refcount 1), otherwise the table
//      entry becomes "all ones". Synced, and only then is in use cleared,
//      synced. A crash before that leaves the bitmap in use: a backup tool
//      then takes a full backup instead of trusting it.
// A bitmap that cannot be updated safely (its table shared or over other
// metadata) is left in use, with a note.
#include <algorithm>

#include "qcow2/check/qcow2_check.h"
#include "qcow2/qcow2_bitmaps.h"

namespace dmcow {

using Kind = CheckFinding::Kind;

Status Qcow2Check::MarkBitmapsInUse(const std::vector<MetaRange>& list) {
  std::vector<Qcow2Bitmap> bitmaps;
  DMCOW_RETURN_IF_ERROR(ReadQcow2BitmapDirectory(file_, h_, &bitmaps));
  const uint64_t dir = h_.bitmap_directory_offset;
  const bool dir_writable =
      !bitmaps.empty() && !OverlapsOther(list, dir, h_.bitmap_directory_size, dir >> h_.cluster_bits);
  bool wrote = false;
  for (const Qcow2Bitmap& b : bitmaps) {
    if (!b.enabled()) continue;
    if (!dir_writable) {
      // The directory lies over other metadata: the header's autoclear bit
      // then marks every bitmap inconsistent (QEMU drops them).
      h_.autoclear_features &= ~qcow2::kAutoclearBitmaps;
      uint8_t raw[8];
      StoreBE64(raw, h_.autoclear_features);
      DMCOW_RETURN_IF_ERROR(file_->Write(88, raw, sizeof(raw)));
      Report(Kind::kNote, 88, "The bitmap directory overlaps other metadata: bitmaps marked inconsistent");
      bitmaps_in_use_.clear();
      wrote = true;
      break;
    }
    DMCOW_RETURN_IF_ERROR(WriteQcow2BitmapFlags(file_, b, b.flags | Qcow2Bitmap::kInUse));
    bitmaps_in_use_.push_back(b.name);
    wrote = true;
  }
  return wrote ? file_->Sync() : Status::OK();
}

Status Qcow2Check::SetBitmapBits(const Ranges& guest_ranges, const std::vector<std::string>& names) {
  if (names.empty()) return Status::OK();
  DMCOW_RETURN_IF_ERROR(Load());
  std::vector<Qcow2Bitmap> bitmaps;
  DMCOW_RETURN_IF_ERROR(ReadQcow2BitmapDirectory(file_, h_, &bitmaps));
  // Referenced once, by the bitmap itself (the image is clean now).
  auto only_ours = [&](uint64_t offset) {
    uint64_t refcount = 0;
    return offset + cs() <= file_size_ && stored_.Get(offset >> h_.cluster_bits, &refcount) && refcount == 1;
  };
  std::vector<const Qcow2Bitmap*> done;
  for (const Qcow2Bitmap& b : bitmaps) {
    if (!b.in_use() || !(b.flags & Qcow2Bitmap::kAuto)) continue;
    if (std::find(names.begin(), names.end(), b.name) == names.end()) continue;
    bool table_ours = true;
    for (uint64_t at = b.table_offset; at < b.table_offset + uint64_t{b.table_entries} * 8; at += cs()) {
      table_ours = table_ours && only_ours(at & ~(cs() - 1));
    }
    if (!table_ours) {
      Report(
          Kind::kNote, b.entry_offset,
          "Bitmap '" + b.name + "' left in use (inconsistent): its table is shared or lies past the end of the file");
      continue;
    }
    DMCOW_RETURN_IF_ERROR(SetQcow2BitmapBits(file_, h_, b, guest_ranges, only_ours));
    done.push_back(&b);
  }
  if (done.empty()) return Status::OK();
  DMCOW_RETURN_IF_ERROR(file_->Sync());  // the bits before the flag that vouches for them
  for (const Qcow2Bitmap* b : done) {
    DMCOW_RETURN_IF_ERROR(WriteQcow2BitmapFlags(file_, *b, b->flags & ~Qcow2Bitmap::kInUse));
  }
  return file_->Sync();
}

}  // namespace dmcow
