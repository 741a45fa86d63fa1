// Lays out a qcow2 header cluster as QEMU writes it (qcow2_update_header),
// for create and for changing the backing file. The rules for when and how
// it reaches the disk are with its callers (qcow2_backing.cc).
#include <cstring>

#include "qcow2/qcow2_header.h"
#include "util.h"

namespace dmcow {

using namespace qcow2;

namespace {

constexpr size_t kV3HeaderBytes = 112;  // sizeof(QCowHeader): with compression_type and its padding

// Appends one extension (8 bytes of type and length, data padded to 8);
// false when it does not fit.
bool AddExtension(std::vector<uint8_t>* buf, size_t* pos, uint32_t type, const void* data, size_t len) {
  const size_t ext_len = 8 + ((len + 7) & ~size_t{7});
  if (buf->size() - *pos < ext_len) return false;
  StoreBE32(buf->data() + *pos, type);
  StoreBE32(buf->data() + *pos + 4, static_cast<uint32_t>(len));
  if (len) std::memcpy(buf->data() + *pos + 8, data, len);
  *pos += ext_len;
  return true;
}

// QEMU 7.2's feature name table: every feature it knows, 48 bytes each.
std::vector<uint8_t> FeatureNameTable() {
  static const struct {
    uint8_t type, bit;
    const char* name;
  } kFeatures[] = {
      {0, 0, "dirty bit"},        {0, 1, "corrupt bit"},         {0, 2, "external data file"},
      {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
      {2, 0, "bitmaps"},          {2, 1, "raw external data"},
  };
  std::vector<uint8_t> table(sizeof(kFeatures) / sizeof(kFeatures[0]) * 48, 0);
  for (size_t i = 0; i < sizeof(kFeatures) / sizeof(kFeatures[0]); i++) {
    table[i * 48] = kFeatures[i].type;
    table[i * 48 + 1] = kFeatures[i].bit;
    std::memcpy(&table[i * 48 + 2], kFeatures[i].name, std::strlen(kFeatures[i].name));
  }
  return table;
}

}  // namespace

Status BuildHeaderCluster(const Qcow2Header& h, const std::vector<uint8_t>& unknown_fields, bool feature_table,
                          std::vector<uint8_t>* cluster, size_t* used) {
  const uint64_t cs = uint64_t{1} << h.cluster_bits;
  cluster->assign(cs, 0);
  uint8_t* b = cluster->data();
  StoreBE32(b + 0, kMagic);
  StoreBE32(b + 4, h.version);
  StoreBE32(b + 20, h.cluster_bits);
  StoreBE64(b + 24, h.DiskSize());
  StoreBE32(b + 32, h.crypt_method);
  StoreBE32(b + 36, h.l1_size);
  StoreBE64(b + 40, h.l1_table_offset);
  StoreBE64(b + 48, h.refcount_table_offset);
  StoreBE32(b + 56, h.refcount_table_clusters);
  StoreBE32(b + 60, h.nb_snapshots);
  StoreBE64(b + 64, h.snapshots_offset);
  size_t pos = kV2HeaderLength;
  if (h.version >= 3) {
    StoreBE64(b + 72, h.incompatible_features);
    StoreBE64(b + 80, h.compatible_features);
    StoreBE64(b + 88, h.autoclear_features);
    StoreBE32(b + 96, h.refcount_order);
    StoreBE32(b + 100, static_cast<uint32_t>(kV3HeaderBytes + unknown_fields.size()));
    b[104] = h.compression_type;
    pos = kV3HeaderBytes;
    if (cs - pos < unknown_fields.size()) return Status::NoSpace("header fields do not fit in the first cluster");
    if (!unknown_fields.empty()) std::memcpy(b + pos, unknown_fields.data(), unknown_fields.size());
    pos += unknown_fields.size();
  }
  bool fits = true;
  auto add = [&](uint32_t type, const void* data, size_t len) {
    fits = fits && AddExtension(cluster, &pos, type, data, len);
  };
  if (!h.backing_format.empty()) add(kExtBackingFormat, h.backing_format.data(), h.backing_format.size());
  if (h.HasDataFile() && !h.data_file.empty()) add(kExtDataFile, h.data_file.data(), h.data_file.size());
  if (h.has_crypto_ext) {
    uint8_t crypto[16];
    StoreBE64(crypto, h.crypto_header_offset);
    StoreBE64(crypto + 8, h.crypto_header_length);
    add(kExtCryptoHeader, crypto, sizeof(crypto));
  }
  if (feature_table) {
    const std::vector<uint8_t> table = FeatureNameTable();
    add(kExtFeatureTable, table.data(), table.size());
  }
  if (h.has_bitmaps_ext && h.nb_bitmaps > 0 && (h.autoclear_features & kAutoclearBitmaps)) {
    uint8_t bitmaps[24] = {};
    StoreBE32(bitmaps, h.nb_bitmaps);
    StoreBE64(bitmaps + 8, h.bitmap_directory_size);
    StoreBE64(bitmaps + 16, h.bitmap_directory_offset);
    add(kExtBitmaps, bitmaps, sizeof(bitmaps));
  }
  for (const HeaderExtension& ext : h.unknown_extensions) add(ext.type, ext.data.data(), ext.data.size());
  add(kExtEnd, nullptr, 0);
  if (!fits) return Status::NoSpace("header extensions do not fit in the first cluster");
  if (!h.backing_file.empty()) {
    if (cs - pos < h.backing_file.size()) return Status::NoSpace("backing file name does not fit in the first cluster");
    std::memcpy(b + pos, h.backing_file.data(), h.backing_file.size());
    StoreBE64(b + 8, pos);
    StoreBE32(b + 16, static_cast<uint32_t>(h.backing_file.size()));
    pos += h.backing_file.size();
  }
  *used = pos;
  return Status::OK();
}

}  // namespace dmcow
