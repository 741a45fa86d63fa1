// Table planning for reloads (pure functions, no I/O): which mapped runs go
// into dm-linear segments, and the device's table as segments.
#ifndef DMCOWD_TABLE_H_
#define DMCOWD_TABLE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "dmcowd/plugin.h"

namespace dmcowd {

// device-mapper's limit on targets in one table (DM_MAX_TARGETS).
inline constexpr uint64_t kDmMaxTargets = 1048576;

// Merges extents (sorted by chunk, not overlapping) that are adjacent in
// both device and cow space.
std::vector<Extent> Coalesce(const std::vector<Extent>& extents, uint32_t chunk_sectors);

// Chooses the runs to route through linear segments so that the table has at
// most max_targets targets (>= 1): the longest runs first (ties: lower chunk),
// returned sorted by chunk. k linear runs need at most 2k + 1 targets.
std::vector<Extent> ChooseLinear(const std::vector<Extent>& runs, uint64_t max_targets);

// The parts of `a` that `b` does not cover, with their cow sectors (both
// sorted by chunk, not overlapping).
std::vector<Extent> Subtract(const std::vector<Extent>& a, const std::vector<Extent>& b, uint32_t chunk_sectors);

struct Segment {
  uint64_t start = 0;       // device sector
  uint64_t len = 0;         // sectors
  bool linear = false;      // else a cow target
  uint64_t cow_sector = 0;  // linear: where `start` lives on the cow device
};

// The table: linear segments for `linear` (sorted), cow targets between
// them, covering [0, dev_sectors). The last chunk may be short.
std::vector<Segment> BuildSegments(const std::vector<Extent>& linear, uint64_t dev_sectors, uint32_t chunk_sectors);

// dm table parameters of a segment.
struct TableDevices {
  std::string ident, base, cow;  // device paths as the kernel opens them
  uint32_t chunk_sectors = 0;
  bool read_to_daemon = false;
  std::string direct;        // optional: DeviceSpec::direct_path
  uint64_t direct_from = 0;  // DeviceSpec::direct_from_sector
};
std::string SegmentParams(const Segment& s, const TableDevices& d);
const char* SegmentType(const Segment& s);

}  // namespace dmcowd

#endif  // DMCOWD_TABLE_H_
