// Shared between the image creation drivers (create_image.cc, create_qcow2.cc).
#ifndef DMCOW_QCOW_CREATE_INTERNAL_H_
#define DMCOW_QCOW_CREATE_INTERNAL_H_

#include <cstdint>
#include <memory>
#include <string>

#include "crypto/luks.h"
#include "dmcow/create.h"
#include "dmcow/env.h"
#include "dmcow/status.h"

namespace dmcow::create_internal {

enum class Prealloc { kOff, kMetadata, kFalloc, kFull };

constexpr uint64_t kSector = 512;

// "PATH: msg" as InvalidArgument, the shape of qemu-img create's errors.
inline Status Bad(const std::string& path, const std::string& msg) {
  return Status::InvalidArgument(path + ": " + msg);
}

// QEMU 7.2's BlockdevDriver enumeration: the values a qcow2 backing format
// may take (checked when the backing file is not opened, as with -u).
bool IsBlockdevDriver(const std::string& name);

// "off", "metadata", "falloc", "full"; false for anything else.
bool ParsePrealloc(const std::string& s, Prealloc* out);

// qcow2_co_create_opts and qcow2_co_create: checks qcow2's options (with
// QEMU's messages, "PATH: " first) and writes the image (create_qcow2.cc).
// `o` has been through PrepareCreateOptions.
Status CreateQcow2(Env* env, const std::string& path, const CreateOptions& o);

// LUKS options (encrypt_format "luks") checked as QEMU checks them (the
// QAPI enums, then the key secret): "" and *lo filled, or QEMU's message.
std::string CheckLuksOptions(const CreateOptions& o, LuksCreateOptions* lo);

// qcow2_refcount_metadata_size: the bytes of refcount table and blocks
// that count `clusters` clusters and themselves (the fixed point; with
// `generous_increase`, room for half the table again); *refblock_count, if
// given, gets the number of blocks.
int64_t RefcountMetadataSize(int64_t clusters, uint64_t cluster_size, uint32_t refcount_order, bool generous_increase,
                             uint64_t* refblock_count);

// Creates (or truncates) the file at `path` (the image at `image_path` or
// its data file) for writing; on failure qemu-img's words:
// "IMAGE_PATH: Could not create 'PATH': <why>".
Status CreateFile(Env* env, const std::string& image_path, const std::string& path, std::unique_ptr<File>* file);

// Extends `file` from its current length to `end` as QEMU's file-posix does
// for preallocation falloc (File::Allocate, posix_fallocate; where the Env or
// file system cannot, the file stays sparse) or full (written zeros).
Status PreallocateFileRange(File* file, uint64_t start, uint64_t end, Prealloc mode);

}  // namespace dmcow::create_internal

#endif  // DMCOW_QCOW_CREATE_INTERNAL_H_
