#include "dmcow/env.h"

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

}  // namespace dmcow
