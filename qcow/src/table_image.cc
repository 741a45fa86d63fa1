#include "table_image.h"

#include <cstring>

namespace dmcow {

Status TableImage::GetLayerStatus(uint64_t offset, uint64_t max_len, LayerExtent* out) {
  DMCOW_RETURN_IF_ERROR(CheckGuestRange(offset, 1));
  std::shared_lock<std::shared_mutex> lock(rw_mu_);
  Mapping m;
  DMCOW_RETURN_IF_ERROR(Lookup(offset, max_len, &m));
  *out = m.extent;
  return Status::OK();
}

Status TableImage::Read(uint64_t offset, void* buf, size_t len) {
  DMCOW_RETURN_IF_ERROR(CheckGuestRange(offset, len));
  std::shared_lock<std::shared_mutex> lock(rw_mu_);
  return ReadLocked(offset, buf, len);
}

Status TableImage::ReadLocked(uint64_t offset, void* buf, size_t len) {
  auto* out = static_cast<uint8_t*>(buf);
  const uint64_t cluster_mask = info_.cluster_size - 1;
  while (len > 0) {
    Mapping m;
    DMCOW_RETURN_IF_ERROR(Lookup(offset, len, &m));
    const size_t n = static_cast<size_t>(m.extent.length);
    switch (m.extent.state) {
      case ClusterState::kUnallocated:
        DMCOW_RETURN_IF_ERROR(ReadBacking(offset, out, n));
        break;
      case ClusterState::kZero:
        std::memset(out, 0, n);
        break;
      case ClusterState::kData: {
        size_t got = 0;
        DMCOW_RETURN_IF_ERROR(data_file()->Read(m.extent.host_offset, n, out, &got));
        std::memset(out + got, 0, n - got);  // past the end of the file reads as zeros, as in QEMU
        break;
      }
      case ClusterState::kCompressed:
        DMCOW_RETURN_IF_ERROR(
            compressed_->Read(m.compressed_offset, m.compressed_bytes, offset & cluster_mask, out, n));
        break;
    }
    offset += n;
    out += n;
    len -= n;
  }
  return Status::OK();
}

}  // namespace dmcow
