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
  int last_depth = 0;  // qemu-img reports unallocated ranges at the deepest layer consulted
  LayerExtent last;    // and, where that layer has space there, its host offset
  Image* last_layer = top;
  for (Image* layer = top; layer != nullptr; layer = layer->backing(), depth++) {
    if (offset >= layer->virtual_size()) break;  // past the end of a shorter backing image: zeros
    last_depth = depth;
    LayerExtent e;
    DMCOW_RETURN_IF_ERROR(layer->GetLayerStatus(offset, std::min(len, layer->virtual_size() - offset), &e));
    len = std::min(len, e.length);
    last = e;
    last_layer = layer;
    if (e.state == ClusterState::kUnallocated) continue;
    out->depth = depth;
    out->present = true;
    out->zero = e.state == ClusterState::kZero || e.host_hole;
    out->data = e.state != ClusterState::kZero;
    out->compressed = e.state == ClusterState::kCompressed;
    if (e.has_host_offset) {
      out->has_offset = true;
      out->offset = e.host_offset;
      out->filename = layer->data_filename();
    }
    out->length = len;
    return Status::OK();
  }
  out->depth = last_depth;
  out->zero = true;
  out->length = len;
  if (last.has_host_offset && last_depth == depth - 1) {
    out->has_offset = true;
    out->offset = last.host_offset;
    out->filename = last_layer->data_filename();
  }
  return Status::OK();
}

}  // namespace dmcow
