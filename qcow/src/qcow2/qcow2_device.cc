// Block-device serving for qcow2 (dmcowd's qcow2 plugin): where guest
// clusters live, and reserving, filling and linking host clusters that the
// kernel writes into directly. The ordering rules are those at the top of
// qcow2_write.cc; what is particular here is that data reaches a reserved
// cluster without the engine seeing it, so the caller links a cluster only
// once its data is durable (for kernel writes: after the device's flush
// round trip), and Link itself only edits tables in the cache.
#include <algorithm>
#include <cstring>

#include "qcow2/qcow2_image.h"
#include "util.h"

namespace dmcow {

using namespace qcow2;

Status Qcow2Image::DescribeCluster(uint64_t cluster, ClusterPlace* out) {
  *out = ClusterPlace();
  const Qcow2Header& h = header_;
  const uint64_t vsize = info_.virtual_size;
  if (cluster >= DivRoundUp(vsize, h.cluster_size)) {
    return Status::InvalidArgument(filename() + ": guest cluster " + std::to_string(cluster) +
                                   " is past the end of the disk");
  }
  const uint64_t guest = cluster << h.cluster_bits;
  const uint64_t span = std::min<uint64_t>(h.cluster_size, vsize - guest);
  WriterLock lock(&rw_mu_);
  uint64_t entry = 0, bitmap = 0;
  if (cluster / h.l2_entries < l1_.size()) DMCOW_RETURN_IF_ERROR(GetL2Entry(cluster, &entry, &bitmap));
  uint64_t len = span;
  Mapping m;
  DMCOW_RETURN_IF_ERROR(Classify(guest, entry, bitmap, &len, &m));
  out->state = m.extent.state;
  out->partial = m.extent.state != ClusterState::kCompressed && len < span;
  if (out->state == ClusterState::kData && !out->partial) {
    out->host_offset = m.extent.host_offset;
    out->exclusive = (entry & kCopied) != 0 && !h.HasDataFile();
    // Data past the end of the file reads as zeros (as in QEMU), which a
    // mapping onto the file cannot give: partial, so it is assembled. The
    // file only grows while served: its size is asked again only when a
    // cluster lies past the last size seen. (No overflow: host offsets are
    // under 2^56, clusters at most 2 MiB.)
    const uint64_t end = out->host_offset + h.cluster_size;
    if (!h.HasDataFile() && end > file_end_seen_) {
      DMCOW_RETURN_IF_ERROR(file_->Size(&file_end_seen_));
      if (end > file_end_seen_) {
        out->partial = true;
        out->exclusive = false;
      }
    }
    // An exclusive cluster becomes a writable linear segment: never metadata.
    if (out->exclusive && writable_) {
      DMCOW_RETURN_IF_ERROR(CheckDataWrite(out->host_offset, h.cluster_size, "in-place cluster for the device"));
    }
  }
  return Status::OK();
}

Status Qcow2Image::ReserveClusters(uint64_t count, uint64_t* host_offset) {
  if (!writable_ || header_.HasDataFile()) return NotServable();
  if (count == 0 || count > 1024)
    return Status::InvalidArgument(filename() + ": reserving " + std::to_string(count) + " clusters");
  return WriteStep([&]() REQUIRES(rw_mu_) { return refcounts_->Allocate(count, host_offset); });
}

Status Qcow2Image::FillClusters(uint64_t first, uint64_t count, uint64_t host_offset) {
  if (!writable_ || header_.HasDataFile()) return NotServable();
  DMCOW_RETURN_IF_ERROR(CheckClusterRange(first, count, "filling"));
  return WriteStep(
      [&]() REQUIRES(rw_mu_) -> Status {
        DMCOW_RETURN_IF_ERROR(CheckDataWrite(host_offset, count * header_.cluster_size, "cluster fill"));
        return CopyGuestClustersLocked(first, count, host_offset, data_file());
      },
      OnFailure::kKeepGoing);
}

Status Qcow2Image::LinkClusters(uint64_t first, uint64_t count, uint64_t host_offset) {
  if (!writable_ || header_.HasDataFile()) return NotServable();
  const uint64_t cs = header_.cluster_size;
  DMCOW_RETURN_IF_ERROR(CheckClusterRange(first, count, "linking"));
  if (host_offset & (cs - 1)) {
    return Status::InvalidArgument(filename() + ": linking guest clusters to unaligned host offset " +
                                   Hex(host_offset));
  }
  return WriteStep([&]() REQUIRES(rw_mu_) -> Status {
    DMCOW_RETURN_IF_ERROR(CheckDataWrite(host_offset, count * cs, "cluster link"));
    for (uint64_t i = 0; i < count; i++) {
      uint64_t old = 0, old_bitmap = 0;
      DMCOW_RETURN_IF_ERROR(GetL2Entry(first + i, &old, &old_bitmap));
      DMCOW_RETURN_IF_ERROR(
          SetL2Entry(first + i, (host_offset + i * cs) | kCopied, header_.extended_l2 ? kAllSubclustersAllocated : 0));
      ReleaseClusterOf(old);  // after: a failed SetL2Entry must not free a cluster still mapped
    }
    return MaybeFlush();
  });
}

Status Qcow2Image::UnreserveClusters(uint64_t count, uint64_t host_offset) {
  if (!writable_ || header_.HasDataFile()) return NotServable();
  return WriteStep([&]() REQUIRES(rw_mu_) {
    refcounts_->FreeLater(host_offset, count * header_.cluster_size);
    return Status::OK();
  });
}

uint64_t Qcow2Image::AllocationEnd() const { return refcounts_ ? refcounts_->allocation_end() : 0; }

}  // namespace dmcow
