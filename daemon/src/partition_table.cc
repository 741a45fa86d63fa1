#include "partition_table.h"

#include <zlib.h>

#include <cstring>
#include <memory>
#include <set>

namespace dmcowd {

using dmcow::Status;

namespace {

constexpr uint64_t kSector = 512;
constexpr size_t kMbrEntries = 0x1be;
// Bounds on guest fields, checked before anything is read or allocated.
constexpr uint64_t kMaxGptArrayBytes = 1 << 20;  // 8192 entries of 128 bytes
constexpr int kMaxExtendedRecords = 256;         // EBRs followed per extended partition

uint32_t Le32(const uint8_t* p) { return p[0] | p[1] << 8 | p[2] << 16 | static_cast<uint32_t>(p[3]) << 24; }
uint64_t Le64(const uint8_t* p) { return Le32(p) | static_cast<uint64_t>(Le32(p + 4)) << 32; }

struct MbrEntry {
  uint8_t boot, type;
  uint32_t start, sectors;
};

MbrEntry Entry(const uint8_t* sector, int i) {
  const uint8_t* e = sector + kMbrEntries + 16 * i;
  return {e[0], e[4], Le32(e + 8), Le32(e + 12)};
}

bool HasBootSignature(const uint8_t* sector) { return sector[510] == 0x55 && sector[511] == 0xaa; }
bool IsExtended(uint8_t type) { return type == 0x05 || type == 0x0f || type == 0x85; }

class Reader {
 public:
  Reader(const ReadAt& read_at, uint64_t device_sectors, PartitionTable* out)
      : read_at_(read_at), device_sectors_(device_sectors), out_(out) {}

  Status Read() {
    uint8_t mbr[kSector];
    if (device_sectors_ < 2) return Status::OK();  // too small for any table
    DMCOW_RETURN_IF_ERROR(Sector(0, mbr));
    if (!HasBootSignature(mbr)) return Status::OK();
    // As the kernel does: boot flags other than 0 and 0x80 mean sector 0 is
    // not a partition table (a FAT or NTFS boot sector also ends in 55 AA).
    for (int i = 0; i < 4; i++) {
      if (Entry(mbr, i).boot != 0 && Entry(mbr, i).boot != 0x80) return Status::OK();
    }
    for (int i = 0; i < 4; i++) {
      if (Entry(mbr, i).type == 0xee) return ReadGpt();
    }
    return ReadDos(mbr);
  }

 private:
  Status Sector(uint64_t lba, uint8_t* buf) {
    if (!read_at_(lba * kSector, buf, kSector)) {
      return Status::IOError("reading the partition table: sector " + std::to_string(lba) + " of the device");
    }
    return Status::OK();
  }

  void Warn(const std::string& what) { out_->warnings.push_back(what); }

  // Maps the slice if it lies within the device; says why not otherwise.
  void Add(uint32_t number, uint64_t start, uint64_t sectors, bool extended = false) {
    if (sectors == 0) return;  // an unused entry: its number stays taken, as in kpartx
    if (number > kMaxPartitions) {
      Warn("partition " + std::to_string(number) + ": beyond kpartx's " + std::to_string(kMaxPartitions) +
           " partitions, not mapped");
      return;
    }
    if (start >= device_sectors_ || sectors > device_sectors_ - start) {
      Warn("partition " + std::to_string(number) + " (sectors " + std::to_string(start) + "+" +
           std::to_string(sectors) + ") does not lie within the device (" + std::to_string(device_sectors_) +
           " sectors): not mapped");
      return;
    }
    out_->partitions.push_back({number, start, sectors, extended});
  }

  // Primary entries are 1-4; the logical partitions of every extended one
  // follow from 5, one number per non-link entry of each extended boot
  // record, as kpartx counts them.
  Status ReadDos(const uint8_t* mbr) {
    out_->kind = "dos";
    uint32_t next_number = 5;
    for (int i = 0; i < 4; i++) {
      const MbrEntry e = Entry(mbr, i);
      if (!IsExtended(e.type)) {
        Add(static_cast<uint32_t>(i + 1), e.start, e.sectors);
        continue;
      }
      // kpartx maps the first 1 KiB of an extended partition (room for a boot loader).
      if (e.sectors != 0) Add(static_cast<uint32_t>(i + 1), e.start, 2, true);
      DMCOW_RETURN_IF_ERROR(ReadLogical(e.start, &next_number));
    }
    return Status::OK();
  }

  Status ReadLogical(uint64_t extended_start, uint32_t* next_number) {
    std::set<uint64_t> seen;
    uint64_t here = extended_start;
    for (int records = 0;; records++) {
      if (here >= device_sectors_) {
        Warn("extended boot record at sector " + std::to_string(here) + " lies past the end of the device");
        return Status::OK();
      }
      if (!seen.insert(here).second || records == kMaxExtendedRecords) {
        Warn("the chain of extended boot records loops or is longer than " + std::to_string(kMaxExtendedRecords) +
             " (at sector " + std::to_string(here) + "): logical partitions past it are not mapped");
        return Status::OK();
      }
      uint8_t ebr[kSector];
      DMCOW_RETURN_IF_ERROR(Sector(here, ebr));
      if (!HasBootSignature(ebr)) return Status::OK();
      uint64_t next = 0;
      for (int i = 0; i < 2; i++) {
        const MbrEntry e = Entry(ebr, i);
        if (IsExtended(e.type)) {
          if (e.start != 0 && e.sectors != 0 && next == 0) next = extended_start + e.start;
          continue;
        }
        Add((*next_number)++, here + e.start, e.sectors);
      }
      if (next == 0) return Status::OK();
      here = next;
    }
  }

  // The header at `lba`, if valid: signature, CRC, its own position, an
  // entry array within bounds and matching its CRC. *why says what is wrong.
  bool GptHeader(uint64_t lba, std::unique_ptr<uint8_t[]>* entries, uint32_t* count, uint32_t* entry_size,
                 std::string* why) {
    uint8_t h[kSector];
    if (!Sector(lba, h).ok()) {
      *why = "unreadable";
      return false;
    }
    const uint32_t header_size = Le32(h + 12);
    if (std::memcmp(h, "EFI PART", 8) != 0) {
      *why = "no signature";
      return false;
    }
    if (header_size < 92 || header_size > kSector) {
      *why = "header size " + std::to_string(header_size);
      return false;
    }
    const uint32_t header_crc = Le32(h + 16);
    std::memset(h + 16, 0, 4);
    if (crc32(0, h, header_size) != header_crc) {
      *why = "header CRC mismatch";
      return false;
    }
    if (Le64(h + 24) != lba) {
      *why = "header names its own position as sector " + std::to_string(Le64(h + 24));
      return false;
    }
    const uint64_t array_lba = Le64(h + 72);
    *count = Le32(h + 80);
    *entry_size = Le32(h + 84);
    if (*entry_size < 128 || *entry_size % 8 != 0 || uint64_t{*count} * *entry_size > kMaxGptArrayBytes) {
      *why = std::to_string(*count) + " entries of " + std::to_string(*entry_size) + " bytes";
      return false;
    }
    const uint64_t array_sectors = (uint64_t{*count} * *entry_size + kSector - 1) / kSector;
    if (array_lba >= device_sectors_ || array_sectors > device_sectors_ - array_lba) {
      *why = "entry array at sector " + std::to_string(array_lba) + " past the end of the device";
      return false;
    }
    const size_t bytes = static_cast<size_t>(uint64_t{*count} * *entry_size);
    entries->reset(new uint8_t[array_sectors * kSector]);
    for (uint64_t s = 0; s < array_sectors; s++) {
      if (!Sector(array_lba + s, entries->get() + s * kSector).ok()) {
        *why = "entry array unreadable";
        return false;
      }
    }
    if (crc32(0, entries->get(), static_cast<uInt>(bytes)) != Le32(h + 88)) {
      *why = "entry array CRC mismatch";
      return false;
    }
    return true;
  }

  Status ReadGpt() {
    std::unique_ptr<uint8_t[]> entries;
    uint32_t count = 0, entry_size = 0;
    std::string why_primary, why_backup;
    if (!GptHeader(1, &entries, &count, &entry_size, &why_primary)) {
      if (!GptHeader(device_sectors_ - 1, &entries, &count, &entry_size, &why_backup)) {
        Warn("protective MBR, but no valid GPT header (primary: " + why_primary + "; backup: " + why_backup +
             "): no partitions mapped");
        return Status::OK();
      }
      Warn("primary GPT header invalid (" + why_primary + "): the backup header's table is used");
    }
    out_->kind = "gpt";
    for (uint32_t i = 0; i < count; i++) {
      const uint8_t* e = entries.get() + uint64_t{i} * entry_size;
      static const uint8_t kUnused[16] = {};
      if (std::memcmp(e, kUnused, 16) == 0) continue;
      const uint64_t first = Le64(e + 32), last = Le64(e + 40);
      if (last < first) {
        Warn("partition " + std::to_string(i + 1) + ": ends (sector " + std::to_string(last) + ") before it starts (" +
             std::to_string(first) + "): not mapped");
        continue;
      }
      const uint64_t span = last - first;  // sectors - 1: a full-range entry must not wrap to 0
      Add(i + 1, first, span == UINT64_MAX ? span : span + 1);
    }
    return Status::OK();
  }

  const ReadAt& read_at_;
  const uint64_t device_sectors_;
  PartitionTable* out_;
};

}  // namespace

Status ReadPartitionTable(const ReadAt& read_at, uint64_t device_sectors, PartitionTable* out) {
  *out = PartitionTable();
  Status s = Reader(read_at, device_sectors, out).Read();
  if (!s.ok()) *out = PartitionTable();
  return s;
}

std::string PartitionName(const std::string& whole, uint32_t number) {
  const bool ends_in_digit = !whole.empty() && whole.back() >= '0' && whole.back() <= '9';
  return whole + (ends_in_digit ? "p" : "") + std::to_string(number);
}

std::string PartitionUuid(const std::string& whole_uuid, uint32_t number) {
  return "part" + std::to_string(number) + "-" + whole_uuid;
}

}  // namespace dmcowd
