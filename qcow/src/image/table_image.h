// TableImage: the read path shared by the table-based formats (qcow v1 and
// qcow2). A driver supplies Lookup, which maps a guest range to one run of
// uniform state; reads and block status follow from it.
#ifndef DMCOW_QCOW_TABLE_IMAGE_H_
#define DMCOW_QCOW_TABLE_IMAGE_H_

#include <memory>
#include "dmcow/device_image.h"
#include "dmcow/mutex.h"

#include "crypto/luks.h"
#include "crypto/sector_cipher.h"
#include "image/decompress.h"
#include "image/image_base.h"

namespace dmcow {

// QEMU's words for an encrypted image opened without its key.
inline constexpr char kNoKeyMessage[] = "Parameter 'encrypt.key-secret' is required for cipher";

class TableImage : public ImageBase {
 public:
  Status Read(uint64_t offset, void* buf, size_t len) final;
  Status GetLayerStatus(uint64_t offset, uint64_t max_len, LayerExtent* out) final;

 protected:
  struct Mapping {
    LayerExtent extent;
    uint64_t compressed_offset = 0;  // kCompressed: first byte of the compressed data
    uint64_t compressed_bytes = 0;   // kCompressed: bytes to read (sector-rounded)
  };

  using ImageBase::ImageBase;

  // One run of uniform state starting at `offset` (inside the disk), at most
  // `max_len` bytes; a compressed run never extends past its cluster.
  virtual Status Lookup(uint64_t offset, uint64_t max_len, Mapping* m) REQUIRES_SHARED(rw_mu_) = 0;

  // The file kData offsets refer to.
  virtual File* data_file() const { return file_.get(); }

  // Whether GetLayerStatus looks into the data file for holes under kData
  // runs (LayerExtent::host_hole). May read metadata the first time.
  virtual bool HostHolesReadAsZero() { return false; }

  // Read without taking rw_mu_, which the caller holds (shared or exclusive).
  Status ReadLocked(uint64_t offset, void* buf, size_t len) REQUIRES_SHARED(rw_mu_);

  // Block-device serving (DeviceImage, dmcow/device_image.h) for both table
  // formats. The answer of its calls where this image cannot serve (not open
  // for writing; qcow2 with an external data file).
  Status NotServable() const;
  // Rejects guest cluster ranges [first, first + count) that are empty or
  // leave the disk; `what` names the operation in the message.
  Status CheckClusterRange(uint64_t first, uint64_t count, const char* what) const;
  // Writes the current guest content of clusters [first, first + count),
  // zeros past the disk's end, to `dest` at host_offset + i * cluster size.
  // Clusters known to read zeros (zero clusters, unallocated without a
  // backing image) are zeroed with File::WriteZeroes: no data moves, so a
  // small first write into an empty image costs no cluster-sized copy.
  // Encrypted images get every cluster encrypted (zeros too: a hole would
  // decrypt to noise).
  // REQUIRES: the range checked.
  Status CopyGuestClustersLocked(uint64_t first, uint64_t count, uint64_t host_offset, File* dest)
      REQUIRES_SHARED(rw_mu_);

  // Encrypted images: data clusters' sectors are decrypted after reading
  // (and encrypted before writing) by cipher_, each sector's IV from its
  // host sector (LUKS) or its guest sector (legacy AES). Without a key
  // (OpenOptions::layer_secrets) cipher_ is null and reading a data
  // cluster fails, as it must: the bytes are not the guest's.
  std::unique_ptr<SectorCipher> cipher_;
  bool iv_from_host_ = false;
  std::unique_ptr<LuksHeader> luks_;  // LUKS: the header as read (key slots change it)
  uint64_t luks_offset_ = 0;
  Status NoKey() const;
  // DeviceImage::WithKernelCipher for the table formats.
  Status KernelCipher(const DeviceImage::KernelCipherUse& use) const;
  // Makes this layer encrypted: with LUKS (`luks`, read from file_ at
  // `luks_offset`) or legacy AES (`luks` null); unlocked with `key` if
  // given, else NoKey() unless allow_missing.
  Status SetUpEncryption(const std::string* key, bool allow_missing, const LuksHeader* luks, uint64_t luks_offset);
  // Reads `n` guest bytes at `guest` stored from `host` in data_file(),
  // decrypted; the sectors around an unaligned range are read whole.
  Status ReadEncrypted(uint64_t guest, uint64_t host, uint8_t* out, size_t n) const;
  // What writing `n` guest bytes at `guest`, stored from `host`, puts in
  // the file: *sealed, encrypted, to be written at *sealed_host; whole
  // sectors, those the range covers only in part read back and merged.
  Status SealForWrite(uint64_t guest, uint64_t host, const uint8_t* data, size_t n, std::vector<uint8_t>* sealed,
                      uint64_t* sealed_host) const;

  std::unique_ptr<CompressedClusterReader> compressed_;
  // Readers share it; a writable driver takes it exclusively to change tables.
  SharedMutex rw_mu_;
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_TABLE_IMAGE_H_
