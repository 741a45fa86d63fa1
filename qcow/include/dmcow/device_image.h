// DeviceImage: what serving an image as a block device takes from the
// engine (dmcowd's qcow2 plugin, daemon/src/qcow2/). Only the table formats
// can be served this way, so only they offer it: Image::AsDeviceImage gives
// it for qcow2 and qcow v1 images and nullptr for raw ones, and nothing else
// in the engine needs these calls.
//
// The device writes guest data straight into host clusters of
// Image::data_filename(); these calls only decide where, and keep the
// metadata in the order stated at the top of qcow/src/qcow2/qcow2_write.cc
// (qcow v1: qcow/src/qcow1/qcow1_write.cc). The caller makes the data of a
// reserved cluster durable (its own writes, or the kernel's) before linking
// it: Link only edits tables in memory, and the next Image::Flush writes
// them after syncing the data file. Images open for writing serve
// (DescribeCluster: any qcow2 or qcow v1 image); the rest return
// NotSupported, as does qcow2 with an external data file. qcow v1
// (qcow/src/qcow1/qcow1_device.cc) has no refcounts: clusters are appended
// at the end of the file, every uncompressed cluster is exclusive (unless a
// hostile table puts it over metadata), and unreserved or replaced clusters
// stay dead space.
//
// Thread safety: as the image's writing calls (the daemon serialises them).
#ifndef DMCOW_DEVICE_IMAGE_H_
#define DMCOW_DEVICE_IMAGE_H_

#include <cstdint>
#include <functional>
#include <string>

#include "dmcow/image.h"
#include "dmcow/status.h"

namespace dmcow {

class DeviceImage {
 public:
  struct ClusterPlace {
    ClusterState state = ClusterState::kUnallocated;  // of this layer
    bool partial = false;      // subclusters disagree (extended L2), or (qcow v1) kData reaching past
                               // the end of the file: state is that of the first one
    bool exclusive = false;    // kData with refcount 1 (COPIED; any v1 data): writable in place
    uint64_t host_offset = 0;  // kData: of the cluster in data_filename()
  };
  // `cluster`: guest cluster index (< clusters of virtual_size()).
  virtual Status DescribeCluster(uint64_t cluster, ClusterPlace* out) = 0;
  // `count` contiguous free host clusters, refcount 1, referenced by nothing
  // yet (a crash leaks them at worst).
  virtual Status ReserveClusters(uint64_t count, uint64_t* host_offset) = 0;
  // Writes the current guest content of clusters [first, first + count)
  // into reserved clusters at host_offset (decompressing, copying shared or
  // backing data); durable at the next Flush, before any table.
  virtual Status FillClusters(uint64_t first, uint64_t count, uint64_t host_offset) = 0;
  // Points guest clusters [first, first + count) at reserved clusters from
  // host_offset (COPIED, every subcluster allocated); what they pointed at
  // before is freed after the tables no longer do (rule 4).
  virtual Status LinkClusters(uint64_t first, uint64_t count, uint64_t host_offset) = 0;
  // Gives back reserved clusters that were never linked (after the next
  // Flush; qcow v1: nothing to give back, they stay dead space).
  virtual Status UnreserveClusters(uint64_t count, uint64_t host_offset) = 0;
  // The end of the last host cluster in use (or the file size at open, if
  // larger): a file extended past it holds nothing the image needs.
  // qcow v1: the end of the file as the engine knows it, appends included.
  virtual uint64_t AllocationEnd() const = 0;
  // An encrypted image's data as the kernel's dm-crypt maps it: `cipher` in
  // dm-crypt's words ("aes-xts-plain64", "aes-cbc-essiv:sha256") and the
  // master key, lent to `use` for the call (it stays in the engine's locked
  // memory: copy it nowhere that outlives the call). Served encrypted images
  // are LUKS, whose IV is the host sector, so a dm-crypt target over the
  // whole file with iv_offset 0 reads and writes what the engine does.
  // NotFound for an unencrypted image.
  using KernelCipherUse = std::function<Status(const std::string& cipher, const uint8_t* key, size_t key_len)>;
  virtual Status WithKernelCipher(const KernelCipherUse& use) const = 0;

 protected:
  // Not virtual: a DeviceImage is owned and deleted as the Image that
  // offers it, never through this interface.
  ~DeviceImage() = default;
};

}  // namespace dmcow

#endif  // DMCOW_DEVICE_IMAGE_H_
