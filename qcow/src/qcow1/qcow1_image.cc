#include "qcow1/qcow1_image.h"

#include <algorithm>
#include <climits>
#include <cstring>

#include "util.h"

namespace dmcow {

using namespace qcow1;

namespace {
// QEMU allows L1 tables up to 2 GiB; we stop at 32 MiB (as qcow2 does), which
// still covers 8 TiB with the smallest tables. Larger is refused, not allocated.
constexpr uint64_t kMaxL1Bytes = 32 << 20;
}  // namespace

Status Qcow1Image::Open(std::unique_ptr<File> file, const OpenOptions& options, const std::string* key,
                        std::unique_ptr<Image>* image) {
  std::unique_ptr<Qcow1Image> img(new Qcow1Image(std::move(file)));
  const std::string& name = img->filename();
  auto bad = [&](const std::string& what) { return Status::Corrupt(name + ": " + what); };

  uint64_t file_size = 0;
  DMCOW_RETURN_IF_ERROR(img->file_->Size(&file_size));
  uint8_t h[kHeaderSize];
  size_t got = 0;
  DMCOW_RETURN_IF_ERROR(img->file_->Read(0, sizeof(h), h, &got));
  if (got < kHeaderSize) return bad("file is too short to hold a qcow header");
  if (LoadBE32(h) != kMagic) return bad("not a qcow image (bad magic)");
  uint32_t version = LoadBE32(h + 4);
  if (version != 1) return Status::NotSupported(name + ": unsupported qcow version " + std::to_string(version));
  uint64_t backing_offset = LoadBE64(h + 8);
  uint32_t backing_size = LoadBE32(h + 16);
  uint64_t size = LoadBE64(h + 24);
  img->cluster_bits_ = h[32];
  img->l2_bits_ = h[33];
  uint32_t crypt_method = LoadBE32(h + 36);
  uint64_t l1_offset = LoadBE64(h + 40);

  if (size <= 1) return bad("virtual size " + std::to_string(size) + " is too small (must be at least 2 bytes)");
  if (img->cluster_bits_ < kMinClusterBits || img->cluster_bits_ > kMaxClusterBits) {
    return bad("cluster size 2^" + std::to_string(img->cluster_bits_) + " is out of range (512 to 64k)");
  }
  if (img->l2_bits_ < kMinL2Bits || img->l2_bits_ > kMaxL2Bits) {
    return bad("L2 table size 2^" + std::to_string(img->l2_bits_ + 3) + " bytes is out of range (512 to 64k)");
  }
  if (crypt_method > 1) return bad("unknown encryption method " + std::to_string(crypt_method));
  if (crypt_method == 1) DMCOW_RETURN_IF_ERROR(img->SetUpEncryption(key, options.allow_missing_keys, nullptr, 0));
  const uint32_t shift = img->cluster_bits_ + img->l2_bits_;
  if (size > UINT64_MAX - (1ULL << shift) || size > static_cast<uint64_t>(INT64_MAX)) {
    return bad("virtual size " + std::to_string(size) + " is too large");
  }
  const uint64_t l1_entries = (size + (1ULL << shift) - 1) >> shift;
  if (l1_entries * 8 > kMaxL1Bytes)
    return bad("image is too large: L1 table of " + std::to_string(l1_entries) + " entries");
  uint64_t l1_end;
  if (!CheckedAdd(l1_offset, l1_entries * 8, &l1_end) || l1_end > file_size) {
    return bad("L1 table at offset " + Hex(l1_offset) + " (" + std::to_string(l1_entries * 8) +
               " bytes) lies beyond the end of the file");
  }
  img->l1_offset_ = l1_offset;
  img->file_size_ = file_size;
  img->header_end_ = kHeaderSize;
  if (backing_offset != 0) {
    if (backing_size > kMaxBackingNameSize)
      return bad("backing file name is too long (" + std::to_string(backing_size) + " bytes)");
    uint64_t backing_end;
    if (!CheckedAdd(backing_offset, backing_size, &backing_end) || backing_end > file_size) {
      // Checked here so that an offset past INT64_MAX is Corrupt, not an I/O error from pread.
      return bad("backing file name at offset " + Hex(backing_offset) + " (" + std::to_string(backing_size) +
                 " bytes) lies beyond the end of the file");
    }
    std::string backing(backing_size, '\0');
    DMCOW_RETURN_IF_ERROR(img->file_->ReadExact(backing_offset, backing_size, backing.data(), "backing file name"));
    backing.resize(std::strlen(backing.c_str()));
    img->header_end_ = std::max<uint64_t>(img->header_end_, backing_end);
    img->info_.backing_filename = backing;
    img->info_.full_backing_filename = ResolveRelativeTo(name, backing);
  }

  img->l1_entries_ = l1_entries;

  const uint64_t cluster_size = 1ULL << img->cluster_bits_;
  img->info_.format = "qcow";
  img->info_.virtual_size = size & ~uint64_t{511};  // whole sectors, as QEMU's qcow_open (total_sectors = size / 512)
  img->info_.cluster_size = cluster_size;
  img->info_.version = 1;
  size_t slice = static_cast<size_t>(std::min<uint64_t>(4096, 8ULL << img->l2_bits_));
  img->l2_cache_ = std::make_unique<TableCache>(img->file_.get(), slice, options.l2_cache_bytes);
  img->compressed_ =
      std::make_unique<CompressedClusterReader>(img->file_.get(), cluster_size, CompressionType::kDeflate);
  *image = std::move(img);
  return Status::OK();
}

Status Qcow1Image::LoadTables(const OpenOptions& options, uint64_t* chain_table_bytes) {
  DMCOW_RETURN_IF_ERROR(l1_.Load(file_.get(), l1_offset_, l1_entries_, "L1 table", chain_table_bytes,
                                 options.max_chain_table_bytes,
                                 /*skip_holes=*/!options.writable));
  if (options.writable) DMCOW_RETURN_IF_ERROR(PrepareForWriting(options));
  return Status::OK();
}

Status Qcow1Image::GetL2Entry(uint64_t cluster, uint64_t* entry) {
  const uint64_t l2_offset = l1_[cluster >> l2_bits_];
  *entry = 0;
  if (l2_offset == 0) return Status::OK();
  const uint64_t slice_bytes = l2_cache_->slice_bytes();
  const uint64_t byte_in_table = (cluster & (l2_entries() - 1)) * 8;
  const uint64_t slice_start = byte_in_table & ~(slice_bytes - 1);
  uint64_t slice_offset, slice_end;
  if (!CheckedAdd(l2_offset, slice_start, &slice_offset) || !CheckedAdd(slice_offset, slice_bytes, &slice_end) ||
      slice_end > static_cast<uint64_t>(INT64_MAX)) {
    return Status::Corrupt(filename() + ": L2 table offset " + Hex(l2_offset) + " is out of range");
  }
  TableCache::Slice slice;
  DMCOW_RETURN_IF_ERROR(l2_cache_->Get(slice_offset, "L2 table", &slice));
  *entry = (*slice)[(byte_in_table - slice_start) / 8];
  return Status::OK();
}

Status Qcow1Image::CheckDataEntry(uint64_t entry, uint64_t cluster) const {
  const uint64_t guest = cluster << cluster_bits_;
  if (entry & 511) {  // QEMU refuses these reads (-EIO)
    return Status::Corrupt(filename() + ": data cluster offset " + Hex(entry) + " for guest offset " + Hex(guest) +
                           " is not sector aligned");
  }
  uint64_t host_end;
  if (!CheckedAdd(entry, cluster_size(), &host_end) || host_end > static_cast<uint64_t>(INT64_MAX)) {
    return Status::Corrupt(filename() + ": data cluster offset " + Hex(entry) + " for guest offset " + Hex(guest) +
                           " is out of range");
  }
  return Status::OK();
}

Status Qcow1Image::Lookup(uint64_t offset, uint64_t max_len, Mapping* m) {
  const uint64_t cluster_size = 1ULL << cluster_bits_;
  const uint64_t end = offset + std::min(max_len, info_.virtual_size - offset);
  uint64_t pos = offset;
  bool first = true;
  while (pos < end) {
    const uint64_t cluster = pos >> cluster_bits_;
    const uint64_t l1_index = cluster >> l2_bits_;
    const uint64_t in_cluster = pos & (cluster_size - 1);
    Mapping piece;
    uint64_t piece_len;
    if (l1_[l1_index] == 0) {
      piece_len = std::min(end, (l1_index + 1) << shift()) - pos;
    } else {
      uint64_t entry;
      DMCOW_RETURN_IF_ERROR(GetL2Entry(cluster, &entry));
      piece_len = std::min(end, pos - in_cluster + cluster_size) - pos;
      if (entry & kCompressed) {
        const CompressedRef c = DecodeCompressed(entry, cluster_bits_);
        piece.extent.state = ClusterState::kCompressed;
        piece.compressed_offset = c.offset;
        piece.compressed_bytes = c.bytes;
      } else if (entry != 0) {
        DMCOW_RETURN_IF_ERROR(CheckDataEntry(entry, cluster));
        piece.extent.state = ClusterState::kData;
        piece.extent.has_host_offset = true;
        piece.extent.host_offset = entry + in_cluster;
      }
    }
    if (first) {
      *m = piece;
    } else {
      const LayerExtent& a = m->extent;
      const LayerExtent& b = piece.extent;
      if (a.state != b.state || a.state == ClusterState::kCompressed ||
          (a.has_host_offset && a.host_offset + (pos - offset) != b.host_offset)) {
        break;
      }
    }
    first = false;
    pos += piece_len;
    if (m->extent.state == ClusterState::kCompressed) break;
  }
  m->extent.length = pos - offset;
  return Status::OK();
}

}  // namespace dmcow
