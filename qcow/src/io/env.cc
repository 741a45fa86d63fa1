#include "dmcow/env.h"

#include <algorithm>
#include <vector>

#include "util.h"

namespace dmcow {

Status File::ReadExact(uint64_t offset, size_t len, void* buf, const char* what) {
  size_t got = 0;
  DMCOW_RETURN_IF_ERROR(Read(offset, len, buf, &got));
  if (got != len) {
    return Status::Corrupt(name() + ": " + what + " at offset " + Hex(offset) + " (" + std::to_string(len) +
                           " bytes) lies beyond the end of the file");
  }
  return Status::OK();
}

Status File::WriteZeroes(uint64_t offset, uint64_t len) { return WriteZeroBytes(offset, len); }

Status File::WriteZeroBytes(uint64_t offset, uint64_t len) {
  static const std::vector<uint8_t> zeros(1 << 20, 0);
  while (len > 0) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(len, zeros.size()));
    DMCOW_RETURN_IF_ERROR(Write(offset, zeros.data(), n));
    offset += n;
    len -= n;
  }
  return Status::OK();
}

Status File::Deallocate(uint64_t offset, uint64_t len) {
  uint64_t size = 0;
  DMCOW_RETURN_IF_ERROR(Size(&size));
  if (offset >= size) return Status::OK();  // past the end reads zeros already
  return WriteZeroes(offset, std::min(len, size - offset));
}

Status File::Allocate(uint64_t /*offset*/, uint64_t /*len*/) {
  return Status::NotSupported(name() + ": cannot preallocate here");
}

}  // namespace dmcow
