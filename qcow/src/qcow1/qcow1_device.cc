// Block-device serving for legacy qcow (version 1) images (dmcowd's qcow2
// plugin serves both formats): where guest clusters live, and reserving,
// filling and linking host clusters that the kernel writes into directly.
//
// The ordering rules are those at the top of qcow1_write.cc, and the
// allocation is QEMU's (block/qcow.c): the format has no refcounts, so new
// data clusters are appended at the end of the file (cluster aligned; here
// also 4 KiB aligned, so that a device chunk of small clusters can be
// mapped in place: any cluster-aligned offset is valid for QEMU), new L2
// tables too (appended and written as zeros when a link first needs them),
// and space that stops being referenced is never reused.
//
// What is particular to the device: data reaches a reserved cluster without
// the engine seeing it. The caller links a cluster only once its data is
// durable (for kernel writes: after the device's flush round trip), and Link
// only edits L2 entries in the table cache; the next Flush syncs the file
// (data, and new tables' zeros) before it writes any L2 slice, and the L2
// slices before any L1 entry (rules 1 and 2).
//
// Unreserve: with no refcounts there is nothing to give back. A reserved
// cluster that is never linked is dead space in the file, exactly like a
// compressed cluster QEMU replaces; it is never handed out again (the file
// end only grows), and only a convert reclaims it. What a linked cluster
// replaces (a compressed cluster, a cluster overlapping metadata) is leaked
// the same way.
//
// Hostile images: every offset is checked for overflow before use; a data
// cluster over the header, the L1 table or an L2 table is never reported
// writable in place; a data cluster reaching past the end of the file (it
// reads as zeros there, as in QEMU) is reported partial, so that the caller
// assembles it instead of mapping bytes the file does not hold. Such an
// entry may alias clusters appended later, as it would in QEMU, which
// appends at the file's end too; `dmcow-img check` reports it.
#include <algorithm>
#include <cstring>

#include "qcow1/qcow1_image.h"
#include "util.h"

namespace dmcow {

using namespace qcow1;

namespace {
constexpr uint64_t kMaxReserve = 1024;   // clusters per call, as qcow2
constexpr uint64_t kDeviceAlign = 4096;  // the kernel's smallest chunk
}  // namespace

Status Qcow1Image::DescribeCluster(uint64_t cluster, ClusterPlace* out) {
  *out = ClusterPlace();
  const uint64_t cs = cluster_size();
  if (cluster >= DivRoundUp(info_.virtual_size, cs)) {
    return Status::InvalidArgument(filename() + ": guest cluster " + std::to_string(cluster) +
                                   " is past the end of the disk");
  }
  // Exclusive: GetL2Entry may fill the table cache.
  WriterLock lock(&rw_mu_);
  uint64_t entry = 0;
  DMCOW_RETURN_IF_ERROR(GetL2Entry(cluster, &entry));
  if (entry == 0) return Status::OK();  // kUnallocated: the backing file (or zeros)
  if (entry & kCompressed) {
    out->state = ClusterState::kCompressed;
    return Status::OK();
  }
  // Misaligned or overflowing: QEMU refuses to read it; so do we (names the offset).
  DMCOW_RETURN_IF_ERROR(CheckDataEntry(entry, cluster));
  out->state = ClusterState::kData;
  out->host_offset = entry;
  const uint64_t known_end = std::max(file_size_, writable_ ? file_end_ : 0);
  if (entry + cs > known_end) {  // no overflow: CheckDataEntry
    out->partial = true;
    return Status::OK();
  }
  // qcow v1 never shares clusters: every data cluster is the guest's own,
  // writable in place unless a hostile table puts it over metadata.
  out->exclusive = !OverlapsMetadata(entry, cs);
  return Status::OK();
}

Status Qcow1Image::ReserveClusters(uint64_t count, uint64_t* host_offset) {
  if (!writable_) return NotServable();
  if (count == 0 || count > kMaxReserve) {
    return Status::InvalidArgument(filename() + ": reserving " + std::to_string(count) + " clusters");
  }
  const uint64_t cs = cluster_size();
  WriterLock lock(&rw_mu_);
  // As QEMU: at the end of the file. Append checks the end against INT64_MAX.
  return Append(count * cs, std::max(cs, kDeviceAlign), "reserved data clusters", host_offset);
}

Status Qcow1Image::CheckReserved(uint64_t count, uint64_t host_offset, const char* what) const {
  const uint64_t cs = cluster_size();
  uint64_t end;
  if (count == 0 || count > kMaxReserve || (host_offset & (cs - 1)) != 0 ||
      !CheckedAdd(host_offset, count * cs, &end) || end > file_end_ || end > static_cast<uint64_t>(INT64_MAX) ||
      host_offset < file_size_ || OverlapsMetadata(host_offset, count * cs)) {
    return Status::InvalidArgument(filename() + ": " + what + " " + std::to_string(count) +
                                   " clusters at host offset " + Hex(host_offset) +
                                   ": not clusters this image appended (file end " + Hex(file_end_) + ")");
  }
  return Status::OK();
}

Status Qcow1Image::FillClusters(uint64_t first, uint64_t count, uint64_t host_offset) {
  if (!writable_) return NotServable();
  DMCOW_RETURN_IF_ERROR(CheckClusterRange(first, count, "filling"));
  WriterLock lock(&rw_mu_);
  DMCOW_RETURN_IF_ERROR(CheckReserved(count, host_offset, "filling"));
  // Synced by the next Flush before any table is written (rule 1).
  unsynced_ = true;
  return CopyGuestClustersLocked(first, count, host_offset, file_.get());
}

Status Qcow1Image::LinkClusters(uint64_t first, uint64_t count, uint64_t host_offset) {
  if (!writable_) return NotServable();
  const uint64_t cs = cluster_size();
  DMCOW_RETURN_IF_ERROR(CheckClusterRange(first, count, "linking"));
  WriterLock lock(&rw_mu_);
  DMCOW_RETURN_IF_ERROR(CheckReserved(count, host_offset, "linking"));
  for (uint64_t i = 0; i < count; i++) {
    // A new L2 table is appended past the reserved clusters and zeroed now;
    // Flush syncs it before the L1 entry (rule 2). What the entry pointed
    // at before is left as dead space: v1 never reuses space.
    DMCOW_RETURN_IF_ERROR(SetL2Entry(first + i, host_offset + i * cs));
  }
  return MaybeFlush();
}

Status Qcow1Image::UnreserveClusters(uint64_t count, uint64_t host_offset) {
  if (!writable_) return NotServable();
  // No refcounts: the clusters stay dead space past the last table (see the
  // top of this file). Only the arguments are checked.
  WriterLock lock(&rw_mu_);
  return CheckReserved(count, host_offset, "unreserving");
}

uint64_t Qcow1Image::AllocationEnd() const { return std::max(file_size_, file_end_); }

}  // namespace dmcow
