// The qcow2 header and its extensions, parsed and validated.
//
// Every rule QEMU applies when opening an image is applied here, before any
// field is used to size an allocation or compute an offset (see
// docs/format-rules.md for the list and the message each rule gives).
#ifndef DMCOW_QCOW_QCOW2_HEADER_H_
#define DMCOW_QCOW_QCOW2_HEADER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "dmcow/env.h"
#include "dmcow/image.h"

namespace dmcow {

namespace qcow2 {
constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
constexpr uint32_t kV2HeaderLength = 72;
constexpr uint32_t kV3HeaderLength = 104;
constexpr uint32_t kMinClusterBits = 9;
constexpr uint32_t kMaxClusterBits = 21;
constexpr uint32_t kMaxRefcountOrder = 6;
constexpr uint32_t kMaxBackingNameSize = 1023;
constexpr uint64_t kMaxL1Bytes = 32 << 20;       // QCOW_MAX_L1_SIZE
constexpr uint64_t kMaxRefTableBytes = 8 << 20;  // QCOW_MAX_REFTABLE_SIZE
constexpr uint32_t kMaxSnapshots = 65536;
constexpr uint64_t kMaxSnapshotTableBytes = 64 << 20;
constexpr uint32_t kMaxSnapshotExtraData = 1024;
constexpr uint32_t kKnownSnapshotExtraData = 24;  // vm_state_size_large, disk_size, icount
constexpr uint32_t kMaxBitmaps = 65535;
constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ULL;  // bits 9-55 of L1/L2 entries
// L1/L2 entry flags.
constexpr uint64_t kCopied = 1ULL << 63;                      // refcount exactly 1: writable in place
constexpr uint64_t kCompressed = 1ULL << 62;                  // L2: compressed cluster descriptor
constexpr uint64_t kZeroFlag = 1ULL << 0;                     // L2 (standard entries): reads as zeros
constexpr uint64_t kAllSubclustersAllocated = 0xffffffffULL;  // extended L2 bitmap: every subcluster has data

// Where a compressed cluster's data lies, from its L2 descriptor.
struct CompressedExtent {
  uint64_t offset;   // first byte (not aligned)
  uint64_t sectors;  // 512-byte sectors it touches, counting the first
  uint64_t bytes() const { return sectors * 512 - (offset & 511); }
};
inline CompressedExtent DecodeCompressed(uint64_t entry, uint32_t cluster_bits) {
  const uint64_t shift = 62 - (cluster_bits - 8);
  return CompressedExtent{entry & ((1ULL << shift) - 1), ((entry >> shift) & ((1ULL << (cluster_bits - 8)) - 1)) + 1};
}
// The L2 entry for `bytes` (<= cluster size) of compressed data at byte `offset`.
inline uint64_t EncodeCompressed(uint64_t offset, uint64_t bytes, uint32_t cluster_bits) {
  const uint64_t shift = 62 - (cluster_bits - 8);
  const uint64_t extra_sectors = (offset + bytes - 1) / 512 - offset / 512;
  return kCompressed | (extra_sectors << shift) | offset;
}

// Incompatible feature bits.
constexpr uint64_t kIncompatDirty = 1ULL << 0;
constexpr uint64_t kIncompatibleFeaturesOffset = 72;  // header field, big-endian
constexpr uint64_t kIncompatCorrupt = 1ULL << 1;
constexpr uint64_t kIncompatDataFile = 1ULL << 2;
constexpr uint64_t kIncompatCompression = 1ULL << 3;
constexpr uint64_t kIncompatExtendedL2 = 1ULL << 4;
constexpr uint64_t kIncompatKnown = 0x1f;
// Compatible and autoclear feature bits.
constexpr uint64_t kCompatLazyRefcounts = 1ULL << 0;
constexpr uint64_t kAutoclearBitmaps = 1ULL << 0;
constexpr uint64_t kAutoclearDataFileRaw = 1ULL << 1;

// Header extension types.
constexpr uint32_t kExtEnd = 0;
constexpr uint32_t kExtBackingFormat = 0xe2792aca;
constexpr uint32_t kExtFeatureTable = 0x6803f857;
constexpr uint32_t kExtBitmaps = 0x23852875;
constexpr uint32_t kExtCryptoHeader = 0x0537be77;
constexpr uint32_t kExtDataFile = 0x44415441;
}  // namespace qcow2

struct Qcow2Header {
  uint32_t version = 0;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 0;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = 0;
  uint8_t compression_type = 0;  // 0 deflate, 1 zstd

  std::string backing_file;
  std::string backing_format;
  std::string data_file;
  bool has_bitmaps_ext = false;
  uint32_t nb_bitmaps = 0;
  uint64_t bitmap_directory_size = 0;
  uint64_t bitmap_directory_offset = 0;
  bool has_crypto_ext = false;
  uint64_t crypto_header_offset = 0;
  uint64_t crypto_header_length = 0;
  std::vector<FeatureName> feature_names;
  std::vector<HeaderExtension> unknown_extensions;

  // Derived.
  uint64_t cluster_size = 0;
  bool extended_l2 = false;
  uint32_t l2_entry_bytes = 8;  // 16 with extended L2
  uint64_t l2_entries = 0;      // per L2 table
  uint64_t file_size = 0;       // of the image file when opened
  bool check_mode = false;      // parsed for a check: see ParseQcow2Header

  bool HasDataFile() const { return incompatible_features & qcow2::kIncompatDataFile; }
  // The guest-visible size: QEMU rounds `size` down to whole 512-byte
  // sectors (qcow2_do_open: bs->total_sectors = header.size / 512).
  uint64_t DiskSize() const { return size & ~uint64_t{511}; }
};

// Reads and validates the header of `file`. On error the message names the
// file and the rule broken.
//
// With `check_mode`, the rules are those QEMU applies when it opens an image
// for `qemu-img check` (BDRV_O_CHECK): tables may lie past the end of the
// file (they read as zeros there and the check reports them), the refcount
// table may be empty, and the snapshot table is left to the check.
Status ParseQcow2Header(File* file, Qcow2Header* header, bool check_mode = false);

// Checks an L1 table (active or a snapshot's) given by offset and entry count
// against the image: alignment, overflow, size limit, end of file, and that
// it covers `virtual_size`. `what` is e.g. "active L1 table".
Status ValidateL1Table(const Qcow2Header& header, const std::string& file, const char* what, uint64_t l1_offset,
                       uint64_t l1_entries, uint64_t virtual_size);

// The first cluster of an image laid out as QEMU's qcow2_update_header lays
// it out from `h`: the header fields (72 bytes for version 2; 112 for
// version 3, followed by `unknown_fields`, the bytes a longer header holds
// past 112, which QEMU keeps), then the extensions in QEMU's order (backing
// format, external data file, encryption header, the feature name table
// when `feature_table`, bitmaps while their autoclear bit is set, unknown
// extensions as read), the end marker and the backing file name.
// *cluster is h.cluster_size bytes; *used is where its trailing zeros
// begin. NoSpace when it does not fit in one cluster (QEMU's ENOSPC).
Status BuildHeaderCluster(const Qcow2Header& h, const std::vector<uint8_t>& unknown_fields, bool feature_table,
                          std::vector<uint8_t>* cluster, size_t* used);

// Names of incompatible feature bits that are set but unknown to us, using
// the image's feature name table where it has one.
std::string UnknownIncompatibleFeatures(const Qcow2Header& header);

}  // namespace dmcow

#endif  // DMCOW_QCOW_QCOW2_HEADER_H_
