// The partitions of an attached image as block devices: one linear mapping
// per partition of the device's table (partition_table.h), named and
// identified as kpartx names them (/dev/mapper/NAME1, or NAMEp1 when NAME
// ends in a digit; DM UUID partN-<the device's UUID>), so udev's rules give
// them /dev/disk/by-* links. They exist when MapPartitions returns (where
// udev runs, its rules have run too) and go before the device does.
#ifndef DMCOWD_PARTITION_MAPS_H_
#define DMCOWD_PARTITION_MAPS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "dmcow/status.h"

namespace dmcowd {

struct PartitionMap {
  std::string name;  // under /dev/mapper
  uint32_t number = 0;
  uint64_t start_sector = 0, sectors = 0;
  bool extended = false;  // an MBR extended partition's first 1 KiB: no file system
};

// Reads the table of /dev/mapper/WHOLE and maps its partitions (read-only
// when asked). What the table holds but is not mapped is in *warnings. On
// failure nothing stays mapped.
dmcow::Status MapPartitions(const std::string& whole, bool read_only, std::vector<PartitionMap>* made,
                            std::vector<std::string>* warnings);

// Fails, naming it, if a mapping is open or mounted, or if /dev/mapper/WHOLE
// is open other than by them: what detach checks before it stops anything.
dmcow::Status CheckUnused(const std::string& whole, const std::vector<std::string>& partitions);

// Removes the mappings that exist, last first.
dmcow::Status UnmapPartitions(const std::vector<std::string>& partitions);

}  // namespace dmcowd

#endif  // DMCOWD_PARTITION_MAPS_H_
