#include "qcow2/qcow2_image.h"

#include <algorithm>
#include <cstring>

#include "dmcow/fail_stop_file.h"
#include "qcow2/qcow2_metadata_tables.h"
#include "util.h"

namespace dmcow {

using namespace qcow2;

namespace {
constexpr size_t kMaxSliceBytes = 4096;

// Stands for an external data file that was deliberately not opened
// (OpenOptions::open_data_file): every access fails, so no cluster is ever
// read from the image file in its place.
class UnopenedDataFile final : public File {
 public:
  explicit UnopenedDataFile(std::string name) : name_(std::move(name)) {}
  const std::string& name() const override { return name_; }
  Status Read(uint64_t, size_t, void*, size_t* bytes_read) override {
    *bytes_read = 0;
    return Refused();
  }
  Status Write(uint64_t, const void*, size_t) override { return Refused(); }
  Status Sync() override { return Refused(); }
  Status Size(uint64_t*) override { return Refused(); }
  Status Truncate(uint64_t) override { return Refused(); }

 private:
  Status Refused() const { return Status::NotSupported(name_ + ": external data file was not opened"); }
  const std::string name_;
};
}  // namespace

Qcow2Image::Qcow2Image(std::unique_ptr<File> file) : TableImage(std::move(file)) {}

Status Qcow2Image::Open(std::unique_ptr<File> file, const OpenOptions& options, const std::string* key,
                        const std::string& snapshot, std::unique_ptr<Image>* image) {
  std::unique_ptr<Qcow2Image> img(new Qcow2Image(std::move(file)));
  Qcow2Header& h = img->header_;
  DMCOW_RETURN_IF_ERROR(ParseQcow2Header(img->file_.get(), &h));
  const std::string& name = img->filename();
  if (h.crypt_method == 1) DMCOW_RETURN_IF_ERROR(img->SetUpEncryption(key, options.allow_missing_keys, nullptr, 0));
  if (h.crypt_method == 2) {
    if (!h.has_crypto_ext) return Status::Corrupt(name + ": LUKS encryption without its header extension");
    if (h.crypto_header_offset % h.cluster_size != 0) {
      return Status::Corrupt(name + ": LUKS header offset " + Hex(h.crypto_header_offset) +
                             " is not a multiple of the cluster size");
    }
    LuksHeader luks;
    DMCOW_RETURN_IF_ERROR(
        ReadLuksHeader(img->file_.get(), h.crypto_header_offset, h.crypto_header_length, name, &luks));
    DMCOW_RETURN_IF_ERROR(img->SetUpEncryption(key, options.allow_missing_keys, &luks, h.crypto_header_offset));
  }

  ImageInfo& info = img->info_;
  info.format = "qcow2";
  info.virtual_size = h.DiskSize();
  info.cluster_size = h.cluster_size;
  info.dirty = h.incompatible_features & kIncompatDirty;
  info.corrupt = h.incompatible_features & kIncompatCorrupt;
  info.backing_filename = h.backing_file;
  info.full_backing_filename = ResolveRelativeTo(name, h.backing_file);
  info.backing_format = h.backing_format;
  info.version = h.version;
  info.lazy_refcounts = h.compatible_features & kCompatLazyRefcounts;
  info.extended_l2 = h.extended_l2;
  info.refcount_bits = 1u << h.refcount_order;
  info.compression_type = h.compression_type == 1 ? "zstd" : "zlib";
  info.data_file = h.data_file;
  info.data_file_raw = h.HasDataFile() && (h.autoclear_features & kAutoclearDataFileRaw);
  info.incompatible_features = h.incompatible_features;
  info.compatible_features = h.compatible_features;
  info.autoclear_features = h.autoclear_features;
  info.feature_names = h.feature_names;
  info.unknown_extensions = h.unknown_extensions;
  DMCOW_RETURN_IF_ERROR(ReadQcow2Snapshots(img->file_.get(), h, &info.snapshots));
  DMCOW_RETURN_IF_ERROR(ReadQcow2Bitmaps(img->file_.get(), h, &info.bitmaps));

  if (h.HasDataFile()) {
    // A relative name is looked up beside the image first, then (as QEMU 7.2
    // does) relative to the working directory.
    Env* env = options.env;
    std::string path = ResolveRelativeTo(name, h.data_file);
    if (!env->FileExists(path) && env->FileExists(h.data_file)) path = h.data_file;
    if (!options.open_data_file) {
      if (options.writable) return Status::InvalidArgument(name + ": opened for writing without its data file");
      img->data_file_ = std::make_unique<UnopenedDataFile>(path);
    } else {
      Status s = env->OpenFile(path, options.writable ? OpenMode::kReadWrite : OpenMode::kReadOnly, &img->data_file_);
      if (s.IsNotFound()) return Status::NotFound(name + ": could not open external data file '" + h.data_file + "'");
      if (!s.ok()) {
        // A FIFO, socket or character device (refused by the Env), no
        // permission: named with the image that names the file.
        std::string msg = s.message();
        if (msg.rfind(path + ": ", 0) == 0) msg = msg.substr(path.size() + 2);
        return Status::InvalidArgument(name + ": could not open external data file '" + h.data_file + "': " + msg);
      }
      if (options.writable) img->data_file_ = std::make_unique<FailStopFile>(std::move(img->data_file_));
    }
  }

  size_t slice = static_cast<size_t>(std::min<uint64_t>(kMaxSliceBytes, h.cluster_size));
  img->l2_cache_ = std::make_unique<TableCache>(img->file_.get(), slice, options.l2_cache_bytes);
  img->compressed_ = std::make_unique<CompressedClusterReader>(
      img->file_.get(), h.cluster_size, h.compression_type == 1 ? CompressionType::kZstd : CompressionType::kDeflate);
  if (options.writable && !snapshot.empty()) {
    return Status::InvalidArgument(name + ": a snapshot view cannot be opened for writing");
  }
  img->snapshot_ = snapshot;
  *image = std::move(img);
  return Status::OK();
}

Status Qcow2Image::LoadTables(const OpenOptions& options, uint64_t* chain_table_bytes) {
  DMCOW_RETURN_IF_ERROR(LoadL1(options, chain_table_bytes));
  if (options.writable && options.header_only) {
    DMCOW_RETURN_IF_ERROR(CheckWritable());
    header_writable_ = true;
  } else if (options.writable) {
    DMCOW_RETURN_IF_ERROR(PrepareForWriting(options));
  }
  return Status::OK();
}

Status Qcow2Image::LoadL1(const OpenOptions& options, uint64_t* chain_table_bytes) {
  const std::string& snapshot = snapshot_;
  const Qcow2Header& h = header_;
  uint64_t l1_offset = h.l1_table_offset;
  uint64_t l1_entries = h.l1_size;
  if (!snapshot.empty()) {
    const SnapshotInfo* found = FindSnapshot(info_.snapshots, snapshot);
    if (!found) return Status::NotFound(filename() + ": no snapshot with id or name '" + snapshot + "'");
    l1_offset = found->l1_table_offset;
    l1_entries = found->l1_size;
    if (found->has_disk_size) info_.virtual_size = found->disk_size & ~uint64_t{511};  // whole sectors, as above
    std::string what = "L1 table of snapshot '" + found->name + "'";
    if (info_.virtual_size > static_cast<uint64_t>(INT64_MAX)) {
      return Status::Corrupt(filename() + ": snapshot '" + found->name + "' has an invalid disk size");
    }
    DMCOW_RETURN_IF_ERROR(ValidateL1Table(h, filename(), what.c_str(), l1_offset, l1_entries, info_.virtual_size));
  }
  // Bounded by kMaxL1Bytes and known to lie inside the file; held as sparse
  // as it really is.
  return l1_.Load(file_.get(), l1_offset, l1_entries, "L1 table", chain_table_bytes, options.max_chain_table_bytes,
                  /*skip_holes=*/!options.writable);
}

Status Qcow2Image::L2TableOffset(uint64_t l1_index, uint64_t* l2_offset) const {
  *l2_offset = l1_[l1_index] & kOffsetMask;
  if (*l2_offset & (header_.cluster_size - 1)) {
    return Status::Corrupt(filename() + ": L2 table offset " + Hex(*l2_offset) + " is not cluster aligned (L1 index " +
                           std::to_string(l1_index) + ")");
  }
  return Status::OK();
}

Status Qcow2Image::CheckZeroFlagAllowed(uint64_t cluster, uint64_t entry) const {
  const Qcow2Header& h = header_;
  // Bit 0 of a standard entry is the zero flag in v3; in v2 it is reserved,
  // and QEMU's qcow2_get_host_offset (block/qcow2-cluster.c) refuses it as
  // "Zero cluster entry found in pre-v3 image" (it does not read as zeros).
  if (h.version >= 3 || (entry & kCompressed) || !(entry & kZeroFlag)) return Status::OK();
  const uint64_t l1_index = cluster / h.l2_entries;
  const uint64_t l2_offset = l1_[l1_index] & kOffsetMask;
  const uint64_t l2_index = cluster % h.l2_entries;
  return Status::Corrupt(filename() + ": zero cluster entry in a version 2 (compat=0.10) image for guest offset " +
                         Hex(cluster << h.cluster_bits) + " (L2 table at offset " + Hex(l2_offset) + ", entry at " +
                         Hex(l2_offset + l2_index * h.l2_entry_bytes) + ")");
}

Status Qcow2Image::Classify(uint64_t pos, uint64_t entry, uint64_t bitmap, uint64_t* len, Mapping* m) const {
  const Qcow2Header& h = header_;
  const uint64_t in_cluster = pos & (h.cluster_size - 1);
  DMCOW_RETURN_IF_ERROR(CheckZeroFlagAllowed(pos >> h.cluster_bits, entry));
  LayerExtent& e = m->extent;
  e.has_host_offset = false;

  if (entry & kCompressed) {
    if (h.HasDataFile()) {
      return Status::Corrupt(filename() + ": compressed cluster at guest offset " + Hex(pos - in_cluster) +
                             " in an image with an external data file");
    }
    const CompressedExtent c = DecodeCompressed(entry, h.cluster_bits);
    const uint64_t coffset = c.offset;
    if (coffset >> 56) {
      return Status::Corrupt(filename() + ": compressed cluster offset " + Hex(coffset) + " for guest offset " +
                             Hex(pos - in_cluster) + " is out of range");
    }
    e.state = ClusterState::kCompressed;
    m->compressed_offset = coffset;
    m->compressed_bytes = c.bytes();
    return Status::OK();
  }

  const uint64_t host = entry & kOffsetMask;
  if (host & (h.cluster_size - 1)) {
    return Status::Corrupt(filename() + ": data cluster offset " + Hex(host) + " for guest offset " +
                           Hex(pos - in_cluster) + " is not cluster aligned");
  }
  // Offset 0 means unallocated except in an external data file, where
  // COPIED marks guest cluster 0 stored at host offset 0; a zero flag is
  // tested first, as in QEMU's qcow2_get_cluster_type.
  const bool zero_flag = !h.extended_l2 && (entry & kZeroFlag);
  const bool allocated = host != 0 || (!zero_flag && h.HasDataFile() && (entry & kCopied));
  if (allocated && h.HasDataFile() && host != pos - in_cluster) {
    return Status::Corrupt(filename() + ": external data file offset " + Hex(host) + " for guest offset " +
                           Hex(pos - in_cluster) + " differs from the guest offset");
  }

  if (!h.extended_l2) {
    if (zero_flag) {
      e.state = ClusterState::kZero;
    } else {
      e.state = allocated ? ClusterState::kData : ClusterState::kUnallocated;
    }
    if (allocated) {
      e.has_host_offset = true;
      e.host_offset = host + in_cluster;
    }
    return Status::OK();
  }

  // Extended L2: 32 subclusters, each allocated, zero or unallocated.
  const uint32_t alloc_bits = static_cast<uint32_t>(bitmap);
  const uint32_t zero_bits = static_cast<uint32_t>(bitmap >> 32);
  if ((alloc_bits & zero_bits) || (!allocated && alloc_bits)) {
    return Status::Corrupt(filename() + ": invalid subcluster bitmap " + Hex(bitmap) + " for guest offset " +
                           Hex(pos - in_cluster));
  }
  const uint64_t sc_size = h.cluster_size / 32;
  const uint32_t sc = static_cast<uint32_t>(in_cluster / sc_size);
  auto kind = [&](uint32_t i) { return ((alloc_bits >> i) & 1) ? 1 : ((zero_bits >> i) & 1) ? 2 : 0; };
  uint32_t last = sc;
  while (last + 1 < 32 && kind(last + 1) == kind(sc)) last++;
  *len = std::min<uint64_t>(*len, (uint64_t{last} + 1) * sc_size - in_cluster);
  switch (kind(sc)) {
    case 1: e.state = ClusterState::kData; break;
    case 2: e.state = ClusterState::kZero; break;
    default: e.state = ClusterState::kUnallocated; break;
  }
  // Unallocated subclusters of an allocated cluster still have host space.
  if (allocated) {
    e.has_host_offset = true;
    e.host_offset = host + in_cluster;
  }
  return Status::OK();
}

Status Qcow2Image::Lookup(uint64_t offset, uint64_t max_len, Mapping* m) {
  const Qcow2Header& h = header_;
  const uint64_t end = offset + std::min(max_len, info_.virtual_size - offset);
  const uint64_t words_per_entry = h.l2_entry_bytes / 8;
  const uint64_t slice_bytes = l2_cache_->slice_bytes();
  uint64_t pos = offset;
  bool first = true;

  while (pos < end) {
    const uint64_t cluster = pos >> h.cluster_bits;
    const uint64_t l1_index = cluster / h.l2_entries;
    const uint64_t l2_index = cluster % h.l2_entries;
    uint64_t l2_offset = 0;
    if (l1_index < l1_.size()) DMCOW_RETURN_IF_ERROR(L2TableOffset(l1_index, &l2_offset));

    Mapping piece;
    uint64_t piece_len;
    if (l2_offset == 0) {
      // No L2 table: the whole L1 entry's range is unallocated.
      piece.extent.state = ClusterState::kUnallocated;
      uint64_t range_end = (l1_index + 1) * h.l2_entries * h.cluster_size;
      piece_len = std::min(end, range_end) - pos;
      if (first) {
        *m = piece;
      } else if (m->extent.state != ClusterState::kUnallocated) {
        break;
      }
      pos += piece_len;
      first = false;
      continue;
    }
    const uint64_t byte_in_table = l2_index * h.l2_entry_bytes;
    const uint64_t slice_start = byte_in_table & ~(slice_bytes - 1);
    TableCache::Slice slice;
    DMCOW_RETURN_IF_ERROR(l2_cache_->Get(l2_offset + slice_start, "L2 table", &slice));
    const uint64_t entries_in_slice = slice_bytes / h.l2_entry_bytes;
    bool stop = false;
    for (uint64_t i = (byte_in_table - slice_start) / h.l2_entry_bytes; i < entries_in_slice && pos < end; i++) {
      const uint64_t entry = (*slice)[i * words_per_entry];
      const uint64_t bitmap = words_per_entry == 2 ? (*slice)[i * 2 + 1] : 0;
      // Subcluster runs may split a cluster into several pieces.
      const uint64_t cluster_end = ((pos >> h.cluster_bits) + 1) << h.cluster_bits;
      while (pos < cluster_end && pos < end) {
        piece_len = std::min(cluster_end, end) - pos;
        DMCOW_RETURN_IF_ERROR(Classify(pos, entry, bitmap, &piece_len, &piece));
        if (first) {
          *m = piece;
        } else {
          const LayerExtent& a = m->extent;
          const LayerExtent& b = piece.extent;
          bool same = a.state == b.state && a.state != ClusterState::kCompressed &&
                      a.has_host_offset == b.has_host_offset &&
                      (!a.has_host_offset || a.host_offset + a.length == b.host_offset);
          if (!same) {
            stop = true;
            break;
          }
        }
        m->extent.length = pos + piece_len - offset;
        pos += piece_len;
        first = false;
        if (m->extent.state == ClusterState::kCompressed) {
          stop = true;
          break;
        }
      }
      if (stop) break;
    }
    if (stop) break;
  }
  m->extent.length = pos - offset;
  return Status::OK();
}

}  // namespace dmcow
