// Chain-level block status, with qemu-img map's semantics.
#include <algorithm>

#include "dmcow/image.h"

namespace dmcow {

Status GetMapExtent(Image* top, uint64_t offset, uint64_t max_len, MapExtent* out) {
  if (offset >= top->virtual_size()) {
    return Status::InvalidArgument(top->filename() + ": map offset beyond the end of the image");
  }
  uint64_t len = std::min(max_len, top->virtual_size() - offset);
  *out = MapExtent();
  out->start = offset;
  int depth = 0;
  for (Image* layer = top; layer != nullptr; layer = layer->backing(), depth++) {
    if (offset >= layer->virtual_size()) break;  // past the end of a shorter backing image: zeros
    LayerExtent e;
    DMCOW_RETURN_IF_ERROR(layer->GetLayerStatus(offset, std::min(len, layer->virtual_size() - offset), &e));
    len = std::min(len, e.length);
    if (e.state == ClusterState::kUnallocated) continue;
    out->depth = depth;
    out->present = true;
    out->zero = e.state == ClusterState::kZero;
    out->data = !out->zero;
    out->compressed = e.state == ClusterState::kCompressed;
    if (e.has_host_offset) {
      out->has_offset = true;
      out->offset = e.host_offset;
      out->filename = layer->data_filename();
    }
    out->length = len;
    return Status::OK();
  }
  out->depth = depth;
  out->zero = true;
  out->length = len;
  return Status::OK();
}

}  // namespace dmcow
