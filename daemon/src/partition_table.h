// The partition table of an attached image's device, read as kpartx reads
// it (multipath-tools: GPT first, then an MS-DOS table with its extended
// and logical partitions), so that the mappings attach makes have kpartx's
// names, numbers and UUIDs and a host's scripts and fstab find them where
// kpartx would have put them.
//
// The table is guest data, hence hostile: every entry is checked against the
// device's size, chains of extended boot records are bounded, the GPT entry
// array is bounded before it is read, and nothing is allocated in
// proportion to a field before its bound is checked.
#ifndef DMCOWD_PARTITION_TABLE_H_
#define DMCOWD_PARTITION_TABLE_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dmcow/status.h"

namespace dmcowd {

// kpartx's bound on the partitions of one device (MAXSLICES).
constexpr uint32_t kMaxPartitions = 256;

struct Partition {
  uint32_t number = 0;        // kpartx's: GPT entry index + 1; MBR 1-4, logical 5...
  uint64_t start_sector = 0;  // 512-byte sectors from the start of the device
  uint64_t sectors = 0;
  bool extended = false;  // an MBR extended partition: kpartx maps its first 1 KiB
};

struct PartitionTable {
  std::string kind;                   // "gpt", "dos", or empty: none found
  std::vector<Partition> partitions;  // the ones to map, by number
  std::vector<std::string> warnings;  // what was found but is not mapped, and why
};

// Reads `len` bytes at byte offset `offset` of the device; false on error.
using ReadAt = std::function<bool(uint64_t offset, void* buf, size_t len)>;

// Reads the table of a device of `device_sectors` 512-byte sectors. A
// device without a table (a bare file system) gives an empty kind; a table
// whose entries lie outside the device maps the others and says why in
// `warnings`. Fails only when the device cannot be read.
dmcow::Status ReadPartitionTable(const ReadAt& read_at, uint64_t device_sectors, PartitionTable* out);

// kpartx's names: NAME, "p" when NAME ends in a digit, the number
// ("disk" -> "disk1", "vm0" -> "vm0p1").
std::string PartitionName(const std::string& whole, uint32_t number);
// kpartx's UUIDs: "partN-" and the whole device's UUID.
std::string PartitionUuid(const std::string& whole_uuid, uint32_t number);

}  // namespace dmcowd

#endif  // DMCOWD_PARTITION_TABLE_H_
