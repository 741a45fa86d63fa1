#include "dmcow/rebase.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "util.h"

namespace dmcow {

namespace {

constexpr uint64_t kRangeBytes = 2 << 20;  // qemu-img's IO_BUF_SIZE
constexpr uint64_t kSector = 512;

// True when `chain` (nullptr: none) reads as zeros over [offset, offset+len)
// by its metadata alone, so neither side needs reading.
Status ReadsAsZeros(Image* chain, uint64_t offset, uint64_t len, bool* zeros) {
  *zeros = true;
  if (chain == nullptr || offset >= chain->virtual_size()) return Status::OK();
  len = std::min(len, chain->virtual_size() - offset);
  for (uint64_t pos = offset; pos < offset + len && *zeros;) {
    MapExtent e;
    DMCOW_RETURN_IF_ERROR(GetMapExtent(chain, pos, offset + len - pos, &e));
    if (e.length == 0) return Status::Corrupt(chain->filename() + ": empty block status");
    *zeros = e.zero && !e.data;
    pos += e.length;
  }
  return Status::OK();
}

// Reads [offset, offset+len) of `chain` into buf; zeros past its end.
Status ReadOrZeros(Image* chain, uint64_t offset, uint64_t len, uint8_t* buf) {
  const uint64_t size = chain == nullptr ? 0 : chain->virtual_size();
  const uint64_t n = offset < size ? std::min(len, size - offset) : 0;
  if (n > 0) DMCOW_RETURN_IF_ERROR(chain->Read(offset, buf, n));
  std::memset(buf + n, 0, len - n);
  return Status::OK();
}

}  // namespace

Status Rebase(Image* image, const RebaseOptions& options) {
  Image* old_backing = image->backing();
  Image* new_backing = options.new_backing;
  const uint64_t size = image->virtual_size();
  const uint64_t old_size = old_backing ? old_backing->virtual_size() : 0;
  const uint64_t new_size = new_backing ? new_backing->virtual_size() : 0;
  std::vector<uint8_t> old_buf, new_buf;
  for (uint64_t offset = 0, n = 0; offset < size; offset += n) {
    LayerExtent e;
    DMCOW_RETURN_IF_ERROR(image->GetLayerStatus(offset, std::min(kRangeBytes, size - offset), &e));
    if (e.length == 0) return Status::Corrupt(image->filename() + ": empty block status");
    n = e.length;
    if (e.state != ClusterState::kUnallocated) continue;
    if (offset < old_size) n = std::min(n, old_size - offset);
    if (offset < new_size) n = std::min(n, new_size - offset);
    bool old_zeros = false, new_zeros = false;
    DMCOW_RETURN_IF_ERROR(ReadsAsZeros(old_backing, offset, n, &old_zeros));
    DMCOW_RETURN_IF_ERROR(ReadsAsZeros(new_backing, offset, n, &new_zeros));
    if (!(old_zeros && new_zeros)) {
      old_buf.resize(n);
      new_buf.resize(n);
      DMCOW_RETURN_IF_ERROR(ReadOrZeros(old_backing, offset, n, old_buf.data()));
      DMCOW_RETURN_IF_ERROR(ReadOrZeros(new_backing, offset, n, new_buf.data()));
      // Runs of sectors that differ are written, with the old content; each
      // sector is compared once.
      uint64_t run = n;  // where the run of differing sectors began; n: no run
      for (uint64_t pos = 0; pos < n;) {
        const uint64_t next = std::min(pos + kSector, n);
        const bool differs = std::memcmp(&old_buf[pos], &new_buf[pos], next - pos) != 0;
        if (differs && run == n) run = pos;
        const uint64_t run_end = differs ? next : pos;
        if (run != n && (!differs || next == n)) {
          DMCOW_RETURN_IF_ERROR(image->Write(offset + run, &old_buf[run], run_end - run));
          run = n;
        }
        pos = next;
      }
    }
    if (options.on_range) options.on_range();
  }
  return image->ChangeBackingFile(options.backing, options.backing_format);
}

}  // namespace dmcow
