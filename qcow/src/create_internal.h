// Shared between the image creation drivers (create_image.cc, create_qcow2.cc).
#ifndef DMCOW_QCOW_CREATE_INTERNAL_H_
#define DMCOW_QCOW_CREATE_INTERNAL_H_

#include <cstdint>
#include <string>

#include "dmcow/create.h"
#include "dmcow/env.h"
#include "dmcow/status.h"

namespace dmcow::create_internal {

enum class Prealloc { kOff, kMetadata, kFalloc, kFull };

// Validated qcow2 parameters (see CreateQcow2Validated).
struct Qcow2Params {
  uint32_t version = 3;
  uint32_t cluster_bits = 16;
  uint32_t refcount_order = 4;
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  bool zstd = false;
  std::string data_file;
  bool data_file_raw = false;
  Prealloc prealloc = Prealloc::kOff;
  std::string backing_file;
  std::string backing_fmt;  // stored in the backing format extension when not empty
  uint64_t size = 0;        // multiple of 512
};

// Writes a qcow2 image (and its external data file) for already validated
// parameters. Error messages are QEMU's, without the "PATH: " prefix.
Status WriteQcow2(Env* env, const std::string& path, const Qcow2Params& params);

// Extends `file` from its current length to `end` as QEMU's file-posix does
// for preallocation falloc (posix_fallocate) or full (written zeros). `path`
// is the file's name in the default Env: falloc only applies there.
Status PreallocateFileRange(Env* env, File* file, const std::string& path, uint64_t start, uint64_t end,
                            Prealloc mode);

}  // namespace dmcow::create_internal

#endif  // DMCOW_QCOW_CREATE_INTERNAL_H_
