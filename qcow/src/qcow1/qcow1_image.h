// Qcow1Image: legacy qcow (version 1) images: two-level tables of plain
// 64-bit offsets, deflate-compressed clusters, backing files. The format has
// no refcounts and no zero clusters. Reads are in qcow1_image.cc; writes, and
// the order in which they reach the disk, in qcow1_write.cc.
#ifndef DMCOW_QCOW_QCOW1_IMAGE_H_
#define DMCOW_QCOW_QCOW1_IMAGE_H_

#include <memory>
#include <set>
#include <vector>

#include "image/l1_table.h"
#include "image/table_cache.h"
#include "image/table_image.h"

namespace dmcow {

namespace qcow1 {
constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
constexpr uint32_t kHeaderSize = 48;
constexpr uint32_t kMaxBackingNameSize = 1023;
constexpr uint32_t kMinClusterBits = 9, kMaxClusterBits = 16;
constexpr uint32_t kMinL2Bits = 6, kMaxL2Bits = 13;
// L2 entry: 0 (unallocated), a sector-aligned byte offset of an
// uncompressed cluster, or a compressed descriptor: bit 63 set, the
// compressed size in bytes in bits 63-cluster_bits .. 62, the byte offset of
// the compressed data in bits 0 .. 62-cluster_bits.
constexpr uint64_t kCompressed = 1ULL << 63;

struct CompressedRef {
  uint64_t offset;  // first byte of the deflate stream (any byte offset)
  uint64_t bytes;   // its length; always < cluster size
};
inline uint32_t CompressedSizeShift(uint32_t cluster_bits) { return 63 - cluster_bits; }
// The largest offset a compressed descriptor can hold.
inline uint64_t MaxCompressedOffset(uint32_t cluster_bits) { return (1ULL << CompressedSizeShift(cluster_bits)) - 1; }
inline CompressedRef DecodeCompressed(uint64_t entry, uint32_t cluster_bits) {
  const uint32_t shift = CompressedSizeShift(cluster_bits);
  return CompressedRef{entry & MaxCompressedOffset(cluster_bits), (entry >> shift) & ((1ULL << cluster_bits) - 1)};
}
// REQUIRES: offset <= MaxCompressedOffset(cluster_bits), bytes < 2^cluster_bits.
inline uint64_t EncodeCompressed(uint64_t offset, uint64_t bytes, uint32_t cluster_bits) {
  return kCompressed | (bytes << CompressedSizeShift(cluster_bits)) | offset;
}
}  // namespace qcow1

class Qcow1Image final : public TableImage, public DeviceImage {
 public:
  // Opens `file` as qcow up to its L1 table (LoadTables loads it).
  static Status Open(std::unique_ptr<File> file, const OpenOptions& options, const std::string* key,
                     std::unique_ptr<Image>* image);
  Status LoadTables(const OpenOptions& options, uint64_t* chain_table_bytes) override;

  // Write side (see qcow1_write.cc for the ordering rules).
  ~Qcow1Image() override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status WriteZeroes(uint64_t offset, uint64_t len) override;
  Status Discard(uint64_t offset, uint64_t len) override;
  Status WriteCompressedCluster(uint64_t offset, const void* payload, size_t len) override;
  Status Flush() override;
  Status MakeEmpty() override;

  // Serving as a block device (see qcow1_device.cc).
  DeviceImage* AsDeviceImage() override { return info_.encrypted ? nullptr : this; }  // legacy AES: never
  Status WithKernelCipher(const KernelCipherUse& use) const override { return KernelCipher(use); }
  Status DescribeCluster(uint64_t cluster, ClusterPlace* out) override;
  Status ReserveClusters(uint64_t count, uint64_t* host_offset) override;
  Status FillClusters(uint64_t first, uint64_t count, uint64_t host_offset) override;
  Status LinkClusters(uint64_t first, uint64_t count, uint64_t host_offset) override;
  Status UnreserveClusters(uint64_t count, uint64_t host_offset) override;
  uint64_t AllocationEnd() const override;

 private:
  explicit Qcow1Image(std::unique_ptr<File> file) : TableImage(std::move(file)) {}

  Status Lookup(uint64_t offset, uint64_t max_len, Mapping* m) override REQUIRES_SHARED(rw_mu_);

  uint32_t shift() const { return cluster_bits_ + l2_bits_; }
  uint64_t cluster_size() const { return 1ULL << cluster_bits_; }
  uint64_t l2_entries() const { return 1ULL << l2_bits_; }
  uint64_t l2_table_bytes() const { return 8ULL << l2_bits_; }

  // The L2 entry of guest cluster `cluster` (0 when its L1 entry is 0).
  Status GetL2Entry(uint64_t cluster, uint64_t* entry) REQUIRES_SHARED(rw_mu_);
  // Checks an uncompressed entry for guest cluster `cluster`: sector
  // aligned, and the whole cluster addressable.
  Status CheckDataEntry(uint64_t entry, uint64_t cluster) const;

  // Checks that [host_offset, + count clusters) is appended space that the
  // device may fill or link: cluster aligned, past every table, inside what
  // was appended. REQUIRES: rw_mu_ held exclusively, writable_.
  Status CheckReserved(uint64_t count, uint64_t host_offset, const char* what) const;

  // Write side. REQUIRES for all of these: rw_mu_ held exclusively.
  Status PrepareForWriting(const OpenOptions& options);
  Status WriteLocked(uint64_t offset, const uint8_t* buf, size_t len) REQUIRES(rw_mu_);
  Status ZeroLocked(uint64_t offset, uint64_t len) REQUIRES(rw_mu_);
  Status FlushLocked() REQUIRES(rw_mu_);
  Status MaybeFlush() REQUIRES(rw_mu_);  // flushes when too many L2 slices are dirty
  Status SetL2Entry(uint64_t cluster, uint64_t entry);
  // The L2 table for `l1_index`, appended (zeroed) if there is none.
  Status EnsureL2Table(uint64_t l1_index, uint64_t* l2_offset);
  // Reserves `bytes` at the end of the file, starting at a multiple of `align`.
  Status Append(uint64_t bytes, uint64_t align, const char* what, uint64_t* offset);
  // Whether [offset, offset+len) overlaps the header, the backing file name,
  // the L1 table or an L2 table; such places are never written as data.
  bool OverlapsMetadata(uint64_t offset, uint64_t len) const;
  Status WriteFile(uint64_t offset, const void* buf, size_t len);
  // Guest bytes to the file at `host`, encrypted if the image is.
  Status WriteGuestData(uint64_t guest, uint64_t host, const uint8_t* data, size_t n);

  uint32_t cluster_bits_ = 0;
  uint32_t l2_bits_ = 0;
  uint64_t l1_offset_ = 0;
  uint64_t header_end_ = 0;  // end of the header and the backing file name
  uint64_t l1_entries_ = 0;  // from the header, checked against the file
  L1Table l1_;
  std::unique_ptr<TableCache> l2_cache_;
  uint64_t file_size_ = 0;  // at open

  bool writable_ = false;
  uint64_t file_end_ = 0;            // where the next appended cluster or table may start
  std::vector<uint64_t> l2_tables_;  // offsets of every L2 table, sorted (writable only)
  std::set<uint64_t> dirty_l1_;      // L1 indices changed since the last flush
  bool unsynced_ = false;            // something was written since the last flush
  size_t max_dirty_slices_ = 0;
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_QCOW1_IMAGE_H_
