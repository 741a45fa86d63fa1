// Qcow2Image::ChangeBitmap: qemu-img bitmap's add, remove, clear, enable,
// disable and merge of persistent dirty bitmaps.
//
// The actions of one call are planned in memory (QEMU's checks, in QEMU's
// order, each against the state the earlier ones left), then written as one
// change. ORDERING, so that a crash leaves every bitmap as before or as
// after:
//  (D1) Nothing reachable is written in place. A bitmap whose bits change
//       gets new data clusters and a new table; every call writes a new
//       directory. All of them go into freshly allocated clusters and are
//       durable, with their refcounts, before the header names them.
//  (D2) One switch: the header's bitmaps extension (count, directory size
//       and offset) and autoclear bit, written by WriteHeaderLocked (rules
//       B2 and B3 of qcow2_backing.cc). Until it is durable the old
//       directory and its tables are the bitmaps; after it the new ones.
//  (D3) The old directory, and the tables and data clusters of bitmaps
//       removed or rewritten, are freed only after the switch is durable.
//       A crash in between leaks them (qemu-img check reports the leak,
//       check -r all frees it).
// A bitmap whose bits do not change keeps its table, shared by the old and
// new directories, so it is neither written nor freed.
//
// MAINTAINED BITMAPS (OpenOptions::maintain_bitmaps: convert -n, commit,
// rebase write guest data and keep the bitmaps true, as QEMU does):
//  (M1) Before the open returns, each enabled bitmap's in-use flag is set
//       and durable: from the first guest write on, a crash leaves it
//       visibly inconsistent, never enabled and stale.
//  (M2) Every guest write (data, zeroes, discard, compressed, emptying) is
//       noted in memory before it is made.
//  (M3) When the image closes, after a flush, each bitmap marked in M1 is
//       written anew with the bits of the noted writes set and its old
//       flags (rules D1-D3: one directory switch); with nothing noted, its
//       flags alone are restored in place. A resize instead clears the
//       bitmaps' autoclear bit: all of them inconsistent, as before M1.
//
// Resizing an image with bitmaps (Grow, Shrink: ResizeBitmapsLocked) is one
// such change too: QEMU loads a bitmap only if its table has exactly the
// entries the image's size needs, so every bitmap gets a table for the new
// size (its bits kept, a grown range clean, as QEMU's truncate leaves them)
// and the size field moves in the same header write as the directory (D2).
#include <algorithm>
#include <set>

#include "qcow2/qcow2_bitmaps.h"
#include "qcow2/qcow2_image.h"
#include "qcow2/qcow2_metadata_tables.h"
#include "util.h"

namespace dmcow {

using namespace qcow2;

namespace {

constexpr uint64_t kMaxDirectoryBytes = 64 << 20;  // QCOW2_MAX_BITMAP_DIRECTORY_SIZE
constexpr size_t kMaxNameBytes = 1023;             // BME_MAX_NAME_SIZE

// Reads the bits of a stored bitmap, one data cluster cached. Its table was
// validated when its image was opened (entries and offsets).
class Qcow2StoredBitmapReader {
 public:
  explicit Qcow2StoredBitmapReader(const Qcow2StoredBitmap& b) : b_(b), bits_per_cluster_(b.cluster_size * 8) {}

  Status Load() {
    std::vector<uint8_t> raw(uint64_t{b_.table_entries} * 8);  // at most 1 GiB / cluster size: bounded at open
    DMCOW_RETURN_IF_ERROR(b_.file->ReadExact(b_.table_offset, raw.size(), raw.data(), "bitmap table"));
    table_.resize(b_.table_entries);
    for (size_t i = 0; i < table_.size(); i++) table_[i] = LoadBE64(&raw[i * 8]);
    return Status::OK();
  }

  uint8_t granularity_bits() const { return b_.granularity_bits; }

  // The first set bit in [from, to), or `to` when none.
  Status FindSet(uint64_t from, uint64_t to, uint64_t* found) {
    uint64_t k = from;
    while (k < to) {
      const uint64_t index = k / bits_per_cluster_;
      const uint64_t entry_end = std::min(to, (index + 1) * bits_per_cluster_);
      const uint64_t entry = index < table_.size() ? table_[index] : 0;
      const uint64_t offset = entry & kOffsetMask;
      if (entry == kBitmapAllOnesEntry) break;
      if (offset == 0) {
        k = entry_end;
        continue;
      }
      if (cached_ != offset) {
        cluster_.resize(b_.cluster_size);
        DMCOW_RETURN_IF_ERROR(b_.file->ReadExact(offset, cluster_.size(), cluster_.data(), "bitmap data cluster"));
        cached_ = offset;
      }
      const uint64_t base = index * bits_per_cluster_;
      for (; k < entry_end; k++) {
        const uint64_t bit = k - base;
        if (cluster_[bit / 8] == 0 && bit % 8 == 0 && k + 8 <= entry_end) {
          k += 7;
          continue;
        }
        if (cluster_[bit / 8] & (1u << (bit % 8))) break;
      }
      if (k < entry_end) break;
    }
    *found = std::min(k, to);
    return Status::OK();
  }

 private:
  const Qcow2StoredBitmap b_;
  const uint64_t bits_per_cluster_;
  std::vector<uint64_t> table_;
  std::vector<uint8_t> cluster_;
  uint64_t cached_ = 0;
};

// QEMU's calc_dir_entry_size with no extra data.
uint64_t DirectoryEntryBytes(size_t name_bytes) { return (24 + uint64_t{name_bytes} + 7) & ~uint64_t{7}; }

void AppendDirectoryEntry(const Qcow2Bitmap& b, std::vector<uint8_t>* dir) {
  const size_t at = dir->size();
  dir->resize(at + DirectoryEntryBytes(b.name.size()), 0);
  uint8_t* e = dir->data() + at;
  StoreBE64(e, b.table_offset);
  StoreBE32(e + 8, b.table_entries);
  StoreBE32(e + 12, b.flags);
  e[16] = 1;  // dirty tracking bitmap
  e[17] = b.granularity_bits;
  StoreBE16(e + 18, static_cast<uint16_t>(b.name.size()));
  std::copy(b.name.begin(), b.name.end(), e + 24);
}

uint64_t BitsFor(uint64_t disk, uint8_t granularity_bits) {
  return disk == 0 ? 0 : ((disk - 1) >> granularity_bits) + 1;
}

}  // namespace

Status Qcow2Image::ChangeBitmap(const std::string& name, const std::vector<BitmapAction>& actions, size_t* failed) {
  if (!writable_ || !metadata_only_) {
    if (failed) *failed = 0;
    return Status::NotSupported(filename() + ": bitmaps change only through a writable metadata_only open");
  }
  return WriteStep([&]() REQUIRES(rw_mu_) { return ChangeBitmapLocked(name, actions, failed); });
}

Status Qcow2Image::ChangeBitmapLocked(const std::string& name, const std::vector<BitmapAction>& actions,
                                      size_t* failed) {
  DMCOW_RETURN_IF_ERROR(FlushLocked());
  std::vector<Qcow2Bitmap> old;
  DMCOW_RETURN_IF_ERROR(ReadQcow2BitmapDirectory(file_.get(), header_, &old));
  const uint64_t disk = header_.DiskSize();
  auto stored = [this](const Qcow2Bitmap& b) {
    return Qcow2StoredBitmap{file_.get(), header_.cluster_size, b.table_offset, b.table_entries, b.granularity_bits};
  };
  std::vector<Qcow2PlannedBitmap> plan;
  for (const Qcow2Bitmap& b : old) plan.push_back({b, false, {stored(b)}});
  auto find = [&plan](const std::string& n) -> Qcow2PlannedBitmap* {
    for (Qcow2PlannedBitmap& p : plan) {
      if (p.meta.name == n) return &p;
    }
    return nullptr;
  };
  const std::string& path = filename();
  auto not_found = [&](const std::string& n) {
    return Status::NotFound(path + ": Dirty bitmap '" + n + "' not found");
  };
  auto inconsistent = [&](const std::string& n) {
    return Status::InvalidArgument(path + ": Bitmap '" + n + "' is inconsistent and cannot be used");
  };
  // The bitmap an action other than add acts on: present and consistent.
  auto existing = [&](bool may_be_in_use, Qcow2PlannedBitmap** out) -> Status {
    *out = find(name);
    if (*out == nullptr) return not_found(name);
    if ((*out)->meta.in_use() && !may_be_in_use) return inconsistent(name);
    return Status::OK();
  };

  Status refused;
  size_t done = 0;
  for (; done < actions.size() && refused.ok(); done++) {
    const BitmapAction& a = actions[done];
    Qcow2PlannedBitmap* p = nullptr;
    switch (a.kind) {
      case BitmapAction::Kind::kAdd: {
        refused = CheckBitmapAddRequest(path, name, a.granularity);
        if (!refused.ok()) break;
        // QEMU's default (bdrv_get_default_bitmap_granularity).
        const uint64_t granularity =
            a.granularity != 0 ? a.granularity : std::clamp<uint64_t>(header_.cluster_size, 4096, 65536);
        const std::string cannot = path + ": Can't make bitmap '" + name + "' persistent in '" + path + "': ";
        if (header_.version < 3) {
          refused = Status::InvalidArgument(cannot + "Cannot store dirty bitmaps in qcow2 v2 files");
        } else if (Qcow2BitmapTooLarge(disk, granularity, header_.cluster_size)) {
          refused =
              Status::InvalidArgument(cannot + "Too much space will be occupied by the bitmap. Use larger granularity");
        } else if (disk == 0) {
          // QEMU accepts it, then fails to store it when the image closes.
          refused = Status::InvalidArgument(cannot + "a 0-byte disk has no bits to keep");
        } else if (name.size() > kMaxNameBytes) {
          refused = Status::InvalidArgument(cannot + "Name length exceeds maximum (1023 characters)");
        } else if (old.size() >= kMaxBitmaps) {
          refused = Status::InvalidArgument(cannot + "Maximum number of persistent bitmaps is already reached");
        } else if ((old.empty() ? 0 : header_.bitmap_directory_size) + DirectoryEntryBytes(name.size()) >
                   kMaxDirectoryBytes) {
          refused = Status::InvalidArgument(cannot + "Not enough space in the bitmap directory");
        } else if (find(name)) {
          refused = Status::InvalidArgument(path + ": Bitmap already exists: " + name);
        } else {
          Qcow2PlannedBitmap added;
          added.meta.name = name;
          added.meta.flags = Qcow2Bitmap::kAuto;
          added.meta.granularity_bits = static_cast<uint8_t>(__builtin_ctzll(granularity));
          added.rewrite = true;  // all bits clear
          plan.push_back(std::move(added));
        }
        break;
      }
      case BitmapAction::Kind::kRemove:
        refused = existing(true, &p);
        if (refused.ok()) plan.erase(plan.begin() + (p - plan.data()));
        break;
      case BitmapAction::Kind::kClear:
        refused = existing(false, &p);
        if (refused.ok()) {
          p->rewrite = true;
          p->bits_from.clear();
        }
        break;
      case BitmapAction::Kind::kEnable:
      case BitmapAction::Kind::kDisable:
        refused = existing(false, &p);
        if (refused.ok()) {
          p->meta.flags = a.kind == BitmapAction::Kind::kEnable ? (p->meta.flags | Qcow2Bitmap::kAuto)
                                                                : (p->meta.flags & ~Qcow2Bitmap::kAuto);
        }
        break;
      case BitmapAction::Kind::kMerge: {
        refused = existing(false, &p);
        if (!refused.ok()) break;
        std::vector<Qcow2StoredBitmap> source;
        uint64_t source_disk = disk;
        Qcow2Image* other = a.source == nullptr || a.source == this ? nullptr : dynamic_cast<Qcow2Image*>(a.source);
        if (a.source == nullptr || a.source == this) {
          const Qcow2PlannedBitmap* s = find(a.source_name);
          if (s == nullptr) {
            refused = not_found(a.source_name);
          } else if (s->meta.in_use()) {
            refused = inconsistent(a.source_name);
          } else {
            source = s->bits_from;
          }
        } else if (other == nullptr) {
          refused = not_found(a.source_name);
        } else {
          std::vector<Qcow2Bitmap> theirs;
          refused = ReadQcow2BitmapDirectory(other->file_.get(), other->header_, &theirs);
          auto it =
              std::find_if(theirs.begin(), theirs.end(), [&](const Qcow2Bitmap& b) { return b.name == a.source_name; });
          if (!refused.ok()) {
          } else if (it == theirs.end()) {
            refused = not_found(a.source_name);
          } else if (it->in_use()) {
            refused = inconsistent(a.source_name);
          } else {
            source.push_back({other->file_.get(), other->header_.cluster_size, it->table_offset, it->table_entries,
                              it->granularity_bits});
            source_disk = other->header_.DiskSize();
          }
        }
        if (refused.ok() && source_disk != disk) {
          refused = Status::InvalidArgument(path + ": Bitmaps are of different sizes (destination size is " +
                                            std::to_string(disk) + ", source size is " + std::to_string(source_disk) +
                                            ") and can't be merged");
        }
        if (!refused.ok()) break;
        p->rewrite = true;
        p->bits_from.insert(p->bits_from.end(), source.begin(), source.end());
        break;
      }
    }
  }
  if (!refused.ok()) {
    if (failed) *failed = done - 1;
    if (done == 1) return refused;  // nothing planned
  }
  const Status written = WriteBitmapDirectoryLocked(old, plan, header_.size);
  return written.ok() ? refused : written;
}

bool Qcow2Image::BitmapsKept() const {
  return metadata_only_ && header_.has_bitmaps_ext && header_.nb_bitmaps > 0 &&
         (header_.autoclear_features & kAutoclearBitmaps);
}

Status Qcow2Image::CheckBitmapsResizable(uint64_t new_size) const {
  if (!BitmapsKept()) return RefuseIfMetadataOnly("resizing");
  const uint64_t disk = new_size & ~uint64_t{511};
  for (const BitmapInfo& b : info_.bitmaps) {
    if (b.in_use) {
      // QEMU's words (qcow2_truncate_bitmaps_check), before anything is written.
      return Status::InvalidArgument(filename() + ": Bitmap '" + b.name + "' is inconsistent and cannot be used");
    }
    if (Qcow2BitmapTooLarge(disk, b.granularity, header_.cluster_size)) {
      // QEMU resizes it in memory, then fails to store it when it closes
      // the image and leaves it in use; refused here before any write.
      return Status::InvalidArgument(filename() + ": Can't resize: bitmap '" + b.name +
                                     "' would take too much space at the new size. Use larger granularity");
    }
  }
  return Status::OK();
}

Status Qcow2Image::ResizeBitmapsLocked(uint64_t new_size) {
  std::vector<Qcow2Bitmap> old;
  DMCOW_RETURN_IF_ERROR(ReadQcow2BitmapDirectory(file_.get(), header_, &old));
  std::vector<Qcow2PlannedBitmap> plan;
  for (const Qcow2Bitmap& b : old) {
    plan.push_back(
        {b, true, {{file_.get(), header_.cluster_size, b.table_offset, b.table_entries, b.granularity_bits}}});
  }
  DMCOW_RETURN_IF_ERROR(WriteBitmapDirectoryLocked(old, plan, new_size));
  info_.virtual_size = new_size;
  return Status::OK();
}

Status Qcow2Image::StartMaintainingBitmaps() {
  std::vector<Qcow2Bitmap> bitmaps;
  DMCOW_RETURN_IF_ERROR(ReadQcow2BitmapDirectory(file_.get(), header_, &bitmaps));
  for (const Qcow2Bitmap& b : bitmaps) {
    if (!b.enabled()) continue;  // disabled ones do not track writes; those in use stay so
    DMCOW_RETURN_IF_ERROR(WriteQcow2BitmapFlags(file_.get(), b, b.flags | Qcow2Bitmap::kInUse));
    maintained_bitmaps_.push_back(b);
  }
  if (maintained_bitmaps_.empty()) return Status::OK();
  DMCOW_RETURN_IF_ERROR(file_->Sync());  // M1
  return ReadQcow2Bitmaps(file_.get(), header_, &info_.bitmaps);
}

void Qcow2Image::NoteGuestWriteLocked(uint64_t offset, uint64_t len) {
  if (maintained_bitmaps_.empty() || len == 0) return;
  uint64_t start = offset, end = offset + len;
  // Merged with every range it touches, so the map stays disjoint.
  auto it = noted_writes_.upper_bound(start);
  if (it != noted_writes_.begin() && std::prev(it)->second >= start) it = std::prev(it);
  while (it != noted_writes_.end() && it->first <= end) {
    start = std::min(start, it->first);
    end = std::max(end, it->second);
    it = noted_writes_.erase(it);
  }
  noted_writes_.emplace(start, end);
}

Status Qcow2Image::StoreMaintainedBitmapsLocked() {
  if (maintained_bitmaps_.empty()) return Status::OK();
  std::vector<Qcow2Bitmap> old;
  DMCOW_RETURN_IF_ERROR(ReadQcow2BitmapDirectory(file_.get(), header_, &old));
  auto marked = [this](const Qcow2Bitmap& b) -> const Qcow2Bitmap* {
    for (const Qcow2Bitmap& m : maintained_bitmaps_) {
      if (m.entry_offset == b.entry_offset && m.table_offset == b.table_offset && m.name == b.name) return &m;
    }
    return nullptr;
  };
  if (noted_writes_.empty()) {
    for (const Qcow2Bitmap& b : old) {
      if (const Qcow2Bitmap* m = marked(b)) DMCOW_RETURN_IF_ERROR(WriteQcow2BitmapFlags(file_.get(), b, m->flags));
    }
    DMCOW_RETURN_IF_ERROR(file_->Sync());
    DMCOW_RETURN_IF_ERROR(ReadQcow2Bitmaps(file_.get(), header_, &info_.bitmaps));
  } else {
    std::vector<Qcow2PlannedBitmap> plan;
    for (const Qcow2Bitmap& b : old) {
      Qcow2PlannedBitmap p{b, false, {}};
      if (const Qcow2Bitmap* m = marked(b)) {
        p.meta.flags = m->flags;
        p.rewrite = true;
        // Its table was validated when the image was opened, before M1.
        p.bits_from.push_back({file_.get(), header_.cluster_size, b.table_offset, b.table_entries, b.granularity_bits});
        p.also_dirty = &noted_writes_;
      }
      plan.push_back(std::move(p));
    }
    DMCOW_RETURN_IF_ERROR(WriteBitmapDirectoryLocked(old, plan, header_.size));  // info_.bitmaps reread there
  }
  maintained_bitmaps_.clear();
  noted_writes_.clear();
  return Status::OK();
}

Status Qcow2Image::DropMaintainedBitmapsLocked() {
  if (maintained_bitmaps_.empty()) return Status::OK();
  Qcow2Header next = header_;
  next.autoclear_features &= ~kAutoclearBitmaps;
  DMCOW_RETURN_IF_ERROR(WriteHeaderLocked(std::move(next)));
  maintained_bitmaps_.clear();
  noted_writes_.clear();
  return ReadQcow2Bitmaps(file_.get(), header_, &info_.bitmaps);
}

Status Qcow2Image::StoreBitmapBitsLocked(const Qcow2PlannedBitmap& p, uint64_t disk, Qcow2Bitmap* b) {
  const std::vector<Qcow2StoredBitmap>& sources = p.bits_from;
  const uint64_t cs = header_.cluster_size;
  const uint8_t g = b->granularity_bits;
  const uint64_t bits = BitsFor(disk, g);
  const uint64_t entries = Qcow2BitmapTableEntries(disk, g, cs);
  if (entries == 0) {
    return Status::NotSupported(filename() + ": a bitmap of a 0-byte disk has no table to store, so '" + b->name +
                                "' is not stored (QEMU loses it too)");
  }
  std::vector<Qcow2StoredBitmapReader> readers;
  for (const Qcow2StoredBitmap& s : sources) {
    readers.emplace_back(s);
    DMCOW_RETURN_IF_ERROR(readers.back().Load());
  }
  const uint64_t bits_per_cluster = cs * 8;
  std::vector<uint64_t> table(entries, 0);
  std::vector<uint8_t> chunk(cs);
  for (uint64_t i = 0; i < entries; i++) {
    std::fill(chunk.begin(), chunk.end(), 0);
    bool any = false;
    const uint64_t first = i * bits_per_cluster, last = std::min(bits, first + bits_per_cluster);  // [first, last)
    const uint64_t guest_start = first << g, guest_end = std::min(disk, last << g);
    for (Qcow2StoredBitmapReader& r : readers) {
      const uint8_t sg = r.granularity_bits();
      const uint64_t to = ((guest_end - 1) >> sg) + 1;
      for (uint64_t k = guest_start >> sg; k < to; k++) {
        DMCOW_RETURN_IF_ERROR(r.FindSet(k, to, &k));
        if (k >= to) break;
        // Source bit k covers guest [k << sg, (k + 1) << sg): every bit of
        // ours it touches is set (QEMU's merge at another granularity).
        const uint64_t from_byte = std::max(k << sg, guest_start);
        const uint64_t to_byte = std::min((k + 1) << sg, guest_end);
        for (uint64_t bit = (from_byte >> g) - first; bit <= ((to_byte - 1) >> g) - first; bit++) {
          chunk[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
        }
        any = true;
      }
    }
    if (p.also_dirty != nullptr) {
      // The noted ranges over [guest_start, guest_end): the first that ends
      // past guest_start, then on while they start before guest_end.
      auto it = p.also_dirty->upper_bound(guest_start);
      if (it != p.also_dirty->begin() && std::prev(it)->second > guest_start) it = std::prev(it);
      for (; it != p.also_dirty->end() && it->first < guest_end; ++it) {
        const uint64_t from_byte = std::max(it->first, guest_start), to_byte = std::min(it->second, guest_end);
        if (from_byte >= to_byte) continue;
        for (uint64_t bit = (from_byte >> g) - first; bit <= ((to_byte - 1) >> g) - first; bit++) {
          chunk[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
        }
        any = true;
      }
    }
    if (!any) continue;
    uint64_t offset = 0;
    DMCOW_RETURN_IF_ERROR(refcounts_->Allocate(1, &offset));
    DMCOW_RETURN_IF_ERROR(overlap_->CheckWrite(offset, cs, 0, "bitmap data write"));
    DMCOW_RETURN_IF_ERROR(file_->Write(offset, chunk.data(), chunk.size()));
    table[i] = offset;
  }
  std::vector<uint8_t> raw(RoundUp(entries * 8, cs), 0);
  for (uint64_t i = 0; i < entries; i++) StoreBE64(&raw[i * 8], table[i]);
  DMCOW_RETURN_IF_ERROR(refcounts_->Allocate(raw.size() / cs, &b->table_offset));
  DMCOW_RETURN_IF_ERROR(overlap_->CheckWrite(b->table_offset, raw.size(), 0, "bitmap table write"));
  DMCOW_RETURN_IF_ERROR(file_->Write(b->table_offset, raw.data(), raw.size()));
  b->table_entries = static_cast<uint32_t>(entries);  // <= kMaxBitmapTableEntries: checked at add
  return Status::OK();
}

Status Qcow2Image::WriteBitmapDirectoryLocked(const std::vector<Qcow2Bitmap>& old,
                                              const std::vector<Qcow2PlannedBitmap>& plan, uint64_t virtual_size) {
  const uint64_t cs = header_.cluster_size;
  const uint64_t disk = virtual_size & ~uint64_t{511};  // Qcow2Header::DiskSize
  // (D1) New bits, tables and directory, into fresh clusters.
  std::vector<uint8_t> dir;
  std::set<uint64_t> kept_tables;
  for (const Qcow2PlannedBitmap& p : plan) {
    Qcow2Bitmap b = p.meta;
    if (p.rewrite) DMCOW_RETURN_IF_ERROR(StoreBitmapBitsLocked(p, disk, &b));
    if (!p.rewrite) kept_tables.insert(b.table_offset);
    AppendDirectoryEntry(b, &dir);
    if (dir.size() > kMaxDirectoryBytes) {
      return Status::InvalidArgument(filename() + ": the bitmap directory would be larger than 64 MiB");
    }
  }
  const uint64_t dir_bytes = dir.size();  // before rounding up to clusters
  uint64_t dir_offset = 0;
  if (!dir.empty()) {
    dir.resize(RoundUp(dir.size(), cs), 0);
    DMCOW_RETURN_IF_ERROR(refcounts_->Allocate(dir.size() / cs, &dir_offset));
    DMCOW_RETURN_IF_ERROR(overlap_->CheckWrite(dir_offset, dir.size(), 0, "bitmap directory write"));
    DMCOW_RETURN_IF_ERROR(file_->Write(dir_offset, dir.data(), dir.size()));
  }
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  DMCOW_RETURN_IF_ERROR(refcounts_->Flush());

  // (D2) The switch.
  const uint64_t old_dir_offset = old.empty() ? 0 : header_.bitmap_directory_offset;
  const uint64_t old_dir_bytes = old.empty() ? 0 : header_.bitmap_directory_size;
  Qcow2Header next = header_;
  next.size = virtual_size;
  next.has_bitmaps_ext = !plan.empty();
  next.nb_bitmaps = static_cast<uint32_t>(plan.size());
  next.bitmap_directory_offset = plan.empty() ? 0 : dir_offset;
  next.bitmap_directory_size = plan.empty() ? 0 : dir_bytes;
  next.autoclear_features =
      plan.empty() ? (next.autoclear_features & ~kAutoclearBitmaps) : (next.autoclear_features | kAutoclearBitmaps);
  DMCOW_RETURN_IF_ERROR(WriteHeaderLocked(std::move(next)));

  // (D3) What only the old directory named.
  std::vector<Qcow2Bitmap> gone;
  for (const Qcow2Bitmap& b : old) {
    if (!kept_tables.count(b.table_offset)) gone.push_back(b);
  }
  DMCOW_RETURN_IF_ERROR(FreeBitmapClustersLocked(gone, old_dir_offset, old_dir_bytes));
  // Every refcount durable (with lazy refcounts too): the reload below
  // starts from what is on disk.
  DMCOW_RETURN_IF_ERROR(FlushLocked(/*closing=*/true));
  DMCOW_RETURN_IF_ERROR(ReloadRefcountsLocked());  // the overlap map learns the new layout
  return ReadQcow2Bitmaps(file_.get(), header_, &info_.bitmaps);
}

}  // namespace dmcow
