#include "qcow2/qcow2_header.h"

#include <algorithm>
#include <climits>
#include <cstring>

#include "util.h"

namespace dmcow {
namespace {

using namespace qcow2;

Status Bad(const std::string& file, const std::string& what) { return Status::Corrupt(file + ": " + what); }

// Checks a table given by offset and byte length: cluster aligned, no
// overflow, inside the file.
Status ValidateTableOffset(const Qcow2Header& h, const std::string& file, const char* what, uint64_t offset,
                           uint64_t bytes) {
  if (offset & (h.cluster_size - 1))
    return Bad(file, std::string(what) + " offset " + Hex(offset) + " is not cluster aligned");
  uint64_t end;
  if (!CheckedAdd(offset, bytes, &end) || end > static_cast<uint64_t>(INT64_MAX)) {
    return Bad(file, std::string(what) + " at offset " + Hex(offset) + " with " + std::to_string(bytes) +
                         " bytes overflows the file offset range");
  }
  if (bytes > 0 && end > h.file_size && !h.check_mode) {
    return Bad(file, std::string(what) + " at offset " + Hex(offset) + " (" + std::to_string(bytes) +
                         " bytes) lies beyond the end of the file (" + std::to_string(h.file_size) + " bytes)");
  }
  return Status::OK();
}

std::string CString(const uint8_t* p, size_t len) {
  const void* nul = std::memchr(p, 0, len);
  return std::string(reinterpret_cast<const char*>(p), nul ? static_cast<const uint8_t*>(nul) - p : len);
}

Status ParseExtensions(const std::string& file, const std::vector<uint8_t>& cluster0, uint64_t start, uint64_t end,
                       Qcow2Header* h) {
  uint64_t offset = start;
  while (offset < end) {
    if (end - offset < 8) return Bad(file, "header extension at offset " + Hex(offset) + " is truncated");
    uint32_t type = LoadBE32(&cluster0[offset]);
    uint32_t len = LoadBE32(&cluster0[offset + 4]);
    offset += 8;
    // The length is checked before the type, even for the end marker, as QEMU does.
    if (len > end - offset) {
      return Bad(file, "header extension " + Hex(type) + " at offset " + Hex(offset - 8) + " is too large (" +
                           std::to_string(len) + " bytes)");
    }
    if (type == kExtEnd) return Status::OK();
    const uint8_t* data = &cluster0[offset];
    switch (type) {
      case kExtBackingFormat:
        if (len >= 16) return Bad(file, "backing format name is too long (" + std::to_string(len) + " bytes)");
        h->backing_format = CString(data, len);
        break;
      case kExtFeatureTable:
        for (uint32_t i = 0; i + 48 <= len; i += 48) {
          h->feature_names.push_back(FeatureName{data[i], data[i + 1], CString(data + i + 2, 46)});
        }
        break;
      case kExtBitmaps:
        if (len != 24) return Bad(file, "bitmaps extension has invalid length " + std::to_string(len));
        if (!(h->autoclear_features & kAutoclearBitmaps)) break;  // stale: QEMU ignores it too
        if (LoadBE32(data + 4) != 0) return Bad(file, "bitmaps extension reserved field is not zero");
        h->has_bitmaps_ext = true;
        h->nb_bitmaps = LoadBE32(data);
        h->bitmap_directory_size = LoadBE64(data + 8);
        h->bitmap_directory_offset = LoadBE64(data + 16);
        break;
      case kExtCryptoHeader:
        if (len != 16) return Bad(file, "encryption header extension has invalid length " + std::to_string(len));
        h->has_crypto_ext = true;
        h->crypto_header_offset = LoadBE64(data);
        h->crypto_header_length = LoadBE64(data + 8);
        break;
      case kExtDataFile: h->data_file = CString(data, len); break;
      default: h->unknown_extensions.push_back(HeaderExtension{type, std::vector<uint8_t>(data, data + len)}); break;
    }
    offset += (uint64_t{len} + 7) & ~uint64_t{7};
  }
  return Status::OK();
}

Status ValidateBitmapsExtension(const std::string& file, Qcow2Header* h) {
  if (!h->has_bitmaps_ext) return Status::OK();
  if (h->nb_bitmaps == 0) return Bad(file, "bitmaps extension lists zero bitmaps");
  if (h->nb_bitmaps > kMaxBitmaps) {
    return Bad(file, "image has " + std::to_string(h->nb_bitmaps) + " bitmaps, more than the maximum of " +
                         std::to_string(kMaxBitmaps));
  }
  if (h->bitmap_directory_size > uint64_t{1024} * kMaxBitmaps) {
    return Bad(file, "bitmap directory is too large (" + std::to_string(h->bitmap_directory_size) + " bytes)");
  }
  return ValidateTableOffset(*h, file, "bitmap directory", h->bitmap_directory_offset, h->bitmap_directory_size);
}

}  // namespace

std::string UnknownIncompatibleFeatures(const Qcow2Header& h) {
  std::string out;
  uint64_t unknown = h.incompatible_features & ~kIncompatKnown;
  for (int bit = 0; bit < 64; bit++) {
    if (!(unknown & (1ULL << bit))) continue;
    std::string name = "bit " + std::to_string(bit);
    for (const FeatureName& f : h.feature_names) {
      if (f.type == 0 && f.bit == bit && !f.name.empty()) name = f.name;
    }
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

Status ValidateL1Table(const Qcow2Header& h, const std::string& file, const char* what, uint64_t l1_offset,
                       uint64_t l1_entries, uint64_t virtual_size) {
  if (l1_entries > kMaxL1Bytes / 8) {
    return Bad(file, std::string(what) + " is too large (" + std::to_string(l1_entries) + " entries)");
  }
  uint64_t bytes_per_l1_entry = h.cluster_size * h.l2_entries;
  uint64_t needed = DivRoundUp(virtual_size, bytes_per_l1_entry);
  if (l1_entries < needed) {
    return Bad(file, std::string(what) + " is too small: " + std::to_string(l1_entries) + " entries for " +
                         std::to_string(virtual_size) + " bytes need " + std::to_string(needed));
  }
  // Alignment and range are checked even for an empty table, as QEMU does.
  return ValidateTableOffset(h, file, what, l1_offset, l1_entries * 8);
}

Status ParseQcow2Header(File* file, Qcow2Header* h, bool check_mode) {
  const std::string& name = file->name();
  h->check_mode = check_mode;
  DMCOW_RETURN_IF_ERROR(file->Size(&h->file_size));
  uint8_t fixed[kV3HeaderLength] = {};
  size_t got = 0;
  DMCOW_RETURN_IF_ERROR(file->Read(0, sizeof(fixed), fixed, &got));
  if (got < kV2HeaderLength) return Bad(name, "file is too short to hold a qcow2 header");
  if (LoadBE32(fixed) != kMagic) return Bad(name, "not a qcow2 image (bad magic)");

  h->version = LoadBE32(fixed + 4);
  if (h->version != 2 && h->version != 3) {
    return Status::NotSupported(name + ": unsupported qcow2 version " + std::to_string(h->version));
  }
  h->backing_file_offset = LoadBE64(fixed + 8);
  h->backing_file_size = LoadBE32(fixed + 16);
  h->cluster_bits = LoadBE32(fixed + 20);
  h->size = LoadBE64(fixed + 24);
  h->crypt_method = LoadBE32(fixed + 32);
  h->l1_size = LoadBE32(fixed + 36);
  h->l1_table_offset = LoadBE64(fixed + 40);
  h->refcount_table_offset = LoadBE64(fixed + 48);
  h->refcount_table_clusters = LoadBE32(fixed + 56);
  h->nb_snapshots = LoadBE32(fixed + 60);
  h->snapshots_offset = LoadBE64(fixed + 64);

  if (h->cluster_bits < kMinClusterBits || h->cluster_bits > kMaxClusterBits) {
    return Bad(name, "unsupported cluster size 2^" + std::to_string(h->cluster_bits) + " (must be 2^9 to 2^21)");
  }
  h->cluster_size = uint64_t{1} << h->cluster_bits;

  if (h->version == 2) {
    h->header_length = kV2HeaderLength;
    h->refcount_order = 4;
  } else {
    if (got < kV3HeaderLength) return Bad(name, "file is too short to hold a qcow2 version 3 header");
    h->incompatible_features = LoadBE64(fixed + 72);
    h->compatible_features = LoadBE64(fixed + 80);
    h->autoclear_features = LoadBE64(fixed + 88);
    h->refcount_order = LoadBE32(fixed + 96);
    h->header_length = LoadBE32(fixed + 100);
    if (h->header_length < kV3HeaderLength) {
      return Bad(name, "qcow2 header length " + std::to_string(h->header_length) + " is too short (minimum 104)");
    }
    if (h->header_length % 8 != 0) {
      return Bad(name, "qcow2 header length " + std::to_string(h->header_length) + " is not a multiple of 8");
    }
    if (h->header_length > h->cluster_size) {
      return Bad(name, "qcow2 header length " + std::to_string(h->header_length) + " exceeds the cluster size");
    }
  }
  if (h->refcount_order > kMaxRefcountOrder) {
    return Bad(name, "refcount width 2^" + std::to_string(h->refcount_order) + " bits is too large (max 64 bits)");
  }

  // Cluster 0 holds the header, the extensions and the backing file name.
  // Bytes past the end of a short file read as zeros, as in QEMU.
  std::vector<uint8_t> cluster0(h->cluster_size, 0);
  DMCOW_RETURN_IF_ERROR(file->Read(0, cluster0.size(), cluster0.data(), &got));

  if (h->header_length > kV3HeaderLength) h->compression_type = cluster0[kV3HeaderLength];

  uint64_t ext_end = h->cluster_size;
  if (h->backing_file_offset != 0) {
    if (h->backing_file_offset > h->cluster_size) {
      return Bad(name, "backing file name offset " + Hex(h->backing_file_offset) + " is outside the first cluster");
    }
    if (h->backing_file_size > kMaxBackingNameSize || h->backing_file_size > h->cluster_size - h->backing_file_offset) {
      return Bad(name, "backing file name is too long (" + std::to_string(h->backing_file_size) + " bytes)");
    }
    ext_end = h->backing_file_offset;
    h->backing_file =
        CString(cluster0.data() + h->backing_file_offset, h->backing_file_size);  // offset may equal the size
  }
  DMCOW_RETURN_IF_ERROR(ParseExtensions(name, cluster0, h->header_length, ext_end, h));

  if (h->incompatible_features & ~kIncompatKnown) {
    return Status::NotSupported(name + ": unsupported qcow2 feature(s): " + UnknownIncompatibleFeatures(*h));
  }
  if (h->crypt_method > 2) {
    return Bad(name, "unknown encryption method " + std::to_string(h->crypt_method));
  }
  if (h->has_crypto_ext && h->crypt_method != 2) {
    return Bad(name, "encryption header extension present but the image is not LUKS encrypted");
  }
  // An unknown type is refused as such first, whatever the feature bit says (as QEMU does).
  if (h->compression_type > 1) {
    return Status::NotSupported(name + ": unknown compression type " + std::to_string(h->compression_type));
  }
  bool compression_bit = h->incompatible_features & kIncompatCompression;
  if (compression_bit != (h->compression_type != 0)) {
    return Bad(name, "compression type " + std::to_string(h->compression_type) +
                         " disagrees with the compression type feature bit");
  }
  h->extended_l2 = h->incompatible_features & kIncompatExtendedL2;
  if (h->extended_l2 && h->cluster_bits < 14) {
    return Bad(name, "extended L2 entries need clusters of at least 16 KiB");
  }
  h->l2_entry_bytes = h->extended_l2 ? 16 : 8;
  h->l2_entries = h->cluster_size / h->l2_entry_bytes;
  if (h->HasDataFile() && h->data_file.empty()) {
    return Bad(name, "image uses an external data file but does not name it");
  }
  if (!h->HasDataFile()) h->data_file.clear();
  // QEMU's qcow2_do_open: "data-file-raw requires a data file" (also for a check).
  if (!h->HasDataFile() && (h->autoclear_features & kAutoclearDataFileRaw)) {
    return Bad(name, "data-file-raw (autoclear feature bit 1) is set but the image has no external data file");
  }

  if (h->size > static_cast<uint64_t>(INT64_MAX)) {
    return Bad(name, "virtual size " + std::to_string(h->size) + " is too large");
  }
  if (DivRoundUp(h->size, h->cluster_size * h->l2_entries) > INT_MAX) {
    return Bad(name, "image is too big: virtual size " + std::to_string(h->size));
  }
  DMCOW_RETURN_IF_ERROR(ValidateL1Table(*h, name, "active L1 table", h->l1_table_offset, h->l1_size, h->size));

  if (h->refcount_table_clusters == 0 && !check_mode) return Bad(name, "image has no reference count table");
  if (h->refcount_table_clusters > kMaxRefTableBytes / h->cluster_size) {
    return Bad(name,
               "reference count table is too large (" + std::to_string(h->refcount_table_clusters) + " clusters)");
  }
  DMCOW_RETURN_IF_ERROR(ValidateTableOffset(*h, name, "reference count table", h->refcount_table_offset,
                                            uint64_t{h->refcount_table_clusters} * h->cluster_size));

  if (check_mode) return ValidateBitmapsExtension(name, h);
  if (h->nb_snapshots > kMaxSnapshots) {
    return Bad(name, "too many snapshots (" + std::to_string(h->nb_snapshots) + ")");
  }
  // Each entry is at least 40 bytes; the full bound is checked while reading.
  // The offset is checked even with no snapshots, as QEMU does.
  DMCOW_RETURN_IF_ERROR(
      ValidateTableOffset(*h, name, "snapshot table", h->snapshots_offset, uint64_t{h->nb_snapshots} * 40));
  return ValidateBitmapsExtension(name, h);
}

}  // namespace dmcow
