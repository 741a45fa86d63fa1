#include "table.h"

#include <algorithm>

namespace dmcowd {

std::vector<Extent> Coalesce(const std::vector<Extent>& extents, uint32_t chunk_sectors) {
  std::vector<Extent> out;
  for (const Extent& e : extents) {
    if (!out.empty()) {
      Extent& last = out.back();
      if (last.chunk + last.nr_chunks == e.chunk && last.cow_sector + last.nr_chunks * chunk_sectors == e.cow_sector) {
        last.nr_chunks += e.nr_chunks;
        continue;
      }
    }
    out.push_back(e);
  }
  return out;
}

std::vector<Extent> ChooseLinear(const std::vector<Extent>& runs, uint64_t max_targets) {
  max_targets = std::clamp<uint64_t>(max_targets, 1, kDmMaxTargets);
  const uint64_t k = (max_targets - 1) / 2;
  if (runs.size() <= k) return runs;
  std::vector<size_t> order(runs.size());
  for (size_t i = 0; i < order.size(); i++) order[i] = i;
  std::partial_sort(order.begin(), order.begin() + static_cast<ptrdiff_t>(k), order.end(), [&](size_t a, size_t b) {
    if (runs[a].nr_chunks != runs[b].nr_chunks) return runs[a].nr_chunks > runs[b].nr_chunks;
    return runs[a].chunk < runs[b].chunk;
  });
  order.resize(k);
  std::sort(order.begin(), order.end());
  std::vector<Extent> out;
  out.reserve(k);
  for (size_t i : order) out.push_back(runs[i]);
  return out;
}

std::vector<Extent> Subtract(const std::vector<Extent>& a, const std::vector<Extent>& b, uint32_t chunk_sectors) {
  std::vector<Extent> out;
  size_t j = 0;
  for (const Extent& e : a) {
    uint64_t pos = e.chunk;
    const uint64_t end = e.chunk + e.nr_chunks;
    while (j < b.size() && b[j].chunk + b[j].nr_chunks <= pos) j++;
    for (size_t k = j; pos < end; k++) {
      const uint64_t cut_from = k < b.size() ? std::max(pos, b[k].chunk) : end;
      const uint64_t piece_end = std::min(end, cut_from);
      if (piece_end > pos) out.push_back(Extent{pos, piece_end - pos, e.cow_sector + (pos - e.chunk) * chunk_sectors});
      if (k >= b.size() || b[k].chunk >= end) break;
      pos = std::max(pos, b[k].chunk + b[k].nr_chunks);
    }
  }
  return out;
}

std::vector<Segment> BuildSegments(const std::vector<Extent>& linear, uint64_t dev_sectors, uint32_t chunk_sectors) {
  std::vector<Segment> out;
  uint64_t pos = 0;
  for (const Extent& e : linear) {
    const uint64_t start = e.chunk * chunk_sectors;
    if (start >= dev_sectors) break;
    const uint64_t end = std::min(dev_sectors, (e.chunk + e.nr_chunks) * chunk_sectors);
    if (start > pos) out.push_back(Segment{pos, start - pos, false, 0});
    out.push_back(Segment{start, end - start, true, e.cow_sector});
    pos = end;
  }
  if (pos < dev_sectors) out.push_back(Segment{pos, dev_sectors - pos, false, 0});
  return out;
}

std::string SegmentParams(const Segment& s, const TableDevices& d) {
  if (s.linear && !d.direct.empty() && s.cow_sector >= d.direct_from) {
    return d.direct + " " + std::to_string(s.cow_sector - d.direct_from);
  }
  if (s.linear) return d.cow + " " + std::to_string(s.cow_sector);
  std::string p = d.ident + " " + d.base + " " + d.cow + " " + std::to_string(d.chunk_sectors);
  if (d.read_to_daemon) p += " 1 read_to_daemon";
  return p;
}

const char* SegmentType(const Segment& s) { return s.linear ? "linear" : "cow"; }

}  // namespace dmcowd
