// CreateImage: option checks as qemu-img 7.2 makes them (block.c
// bdrv_img_create, then the format driver's create) and the raw and qcow
// (version 1) formats; qcow2 (its options and its layout) is create_qcow2.cc.
#include <algorithm>
#include <memory>
#include <vector>

#include "create/create_internal.h"
#include "dmcow/create.h"
#include "dmcow/image.h"
#include "image/probe.h"
#include "qcow2/qcow2_header.h"
#include "util.h"

namespace dmcow {

using create_internal::Bad;
using create_internal::IsBlockdevDriver;
using create_internal::kSector;
using create_internal::ParsePrealloc;
using create_internal::Prealloc;

namespace create_internal {

Status CreateFile(Env* env, const std::string& image_path, const std::string& path, std::unique_ptr<File>* file) {
  Status s = env->OpenFile(path, OpenMode::kCreateTruncate, file);
  // The system's refusal in qemu-img's words; others (a lock held) as they are.
  const std::string prefix = path + ": open: ";
  if (s.ok() || s.message().rfind(prefix, 0) != 0) return s;
  const std::string msg = image_path + ": Could not create '" + path + "': " + s.message().substr(prefix.size());
  return s.IsNotFound() ? Status::NotFound(msg) : Status::IOError(msg);
}

Status PreallocateFileRange(File* file, uint64_t start, uint64_t end, Prealloc mode) {
  if (end <= start) return Status::OK();
  if (mode == Prealloc::kFull) {
    std::vector<uint8_t> zeros(std::min<uint64_t>(end - start, 1 << 20), 0);
    for (uint64_t off = start; off < end;) {
      uint64_t n = std::min<uint64_t>(zeros.size(), end - off);
      DMCOW_RETURN_IF_ERROR(file->Write(off, zeros.data(), n));
      off += n;
    }
    return Status::OK();
  }
  if (mode == Prealloc::kFalloc) {
    // The content is zeros either way; this only reserves the space, as
    // QEMU's posix_fallocate does. Where the file system (or the Env)
    // cannot, the file stays sparse.
    Status s = file->Allocate(start, end - start);
    if (!s.ok() && !s.IsNotSupported()) return s;
  }
  return Status::OK();
}

bool IsBlockdevDriver(const std::string& name) {
  static const char* const kDrivers[] = {"blkdebug",
                                         "blklogwrites",
                                         "blkreplay",
                                         "blkverify",
                                         "bochs",
                                         "cloop",
                                         "compress",
                                         "copy-before-write",
                                         "copy-on-read",
                                         "dmg",
                                         "file",
                                         "snapshot-access",
                                         "ftp",
                                         "ftps",
                                         "gluster",
                                         "host_cdrom",
                                         "host_device",
                                         "http",
                                         "https",
                                         "io_uring",
                                         "iscsi",
                                         "luks",
                                         "nbd",
                                         "nfs",
                                         "null-aio",
                                         "null-co",
                                         "nvme",
                                         "nvme-io_uring",
                                         "parallels",
                                         "preallocate",
                                         "qcow",
                                         "qcow2",
                                         "qed",
                                         "quorum",
                                         "raw",
                                         "rbd",
                                         "replication",
                                         "ssh",
                                         "throttle",
                                         "vdi",
                                         "vhdx",
                                         "virtio-blk-vfio-pci",
                                         "virtio-blk-vhost-user",
                                         "virtio-blk-vhost-vdpa",
                                         "vmdk",
                                         "vpc",
                                         "vvfat"};
  for (const char* d : kDrivers) {
    if (name == d) return true;
  }
  return false;
}

bool ParsePrealloc(const std::string& s, Prealloc* out) {
  if (s == "off")
    *out = Prealloc::kOff;
  else if (s == "metadata")
    *out = Prealloc::kMetadata;
  else if (s == "falloc")
    *out = Prealloc::kFalloc;
  else if (s == "full")
    *out = Prealloc::kFull;
  else
    return false;
  return true;
}

}  // namespace create_internal

bool IsQemuDriverName(const std::string& name) { return IsBlockdevDriver(name); }

namespace {

// file-posix's part of a create: the protocol-level preallocation option.
Status CheckProtocolPrealloc(const std::string& path, const std::string& value, Prealloc* mode) {
  if (!ParsePrealloc(value, mode)) return Bad(path, "invalid parameter value: " + value);
  if (*mode == Prealloc::kMetadata) return Bad(path, "Unsupported preallocation mode: metadata");
  return Status::OK();
}

Status CreateRaw(Env* env, const std::string& path, const CreateOptions& o) {
  Prealloc mode;
  DMCOW_RETURN_IF_ERROR(CheckProtocolPrealloc(path, o.preallocation, &mode));
  uint64_t size = DivRoundUp(o.size, kSector) * kSector;
  std::unique_ptr<File> file;
  DMCOW_RETURN_IF_ERROR(create_internal::CreateFile(env, path, path, &file));
  Status s = file->Truncate(size);
  if (!s.ok()) {
    if (s.message().find("File too large") != std::string::npos) {
      return Bad(path, "The image size is too large for file format 'raw'");
    }
    return s;
  }
  DMCOW_RETURN_IF_ERROR(create_internal::PreallocateFileRange(file.get(), 0, size, mode));
  return file->Sync();
}

// qcow_co_create: a 48-byte header, the backing file name, then a zeroed L1
// table written in 512-byte sectors. 4 KiB clusters and 512-entry L2 tables,
// or 512-byte clusters and 4096-entry L2 tables with a backing file.
Status CreateQcow1(Env* env, const std::string& path, const CreateOptions& o) {
  Prealloc mode;
  DMCOW_RETURN_IF_ERROR(CheckProtocolPrealloc(path, o.preallocation, &mode));  // then ignored, as QEMU does
  const uint64_t size = DivRoundUp(o.size, kSector) * kSector;                 // qcow_co_create_opts rounds up too
  if (size == 0) return Bad(path, "Image size is too small, cannot be zero length");
  std::string backing = o.backing_file;
  if (backing == "fat:") backing.clear();  // QEMU's special name for vvfat
  if (backing.size() > qcow2::kMaxBackingNameSize) return Bad(path, "Backing file name too long");
  uint8_t header[48] = {};
  StoreBE32(header + 0, qcow2::kMagic);
  StoreBE32(header + 4, 1);
  uint64_t header_size = sizeof(header);
  if (!backing.empty()) {
    StoreBE64(header + 8, header_size);
    StoreBE32(header + 16, static_cast<uint32_t>(backing.size()));
    header_size += backing.size();
  }
  StoreBE64(header + 24, size);
  if (!o.encrypt_format.empty()) {
    if (o.encrypt_format != "aes") return Bad(path, "Unsupported encryption format");
    if (o.encrypt_secret == nullptr) return Bad(path, "Parameter 'encrypt.key-secret' is required for cipher");
    StoreBE32(header + 36, 1);  // crypt_method: AES
  }
  uint32_t cluster_bits = o.backing_file.empty() ? 12 : 9;
  uint32_t l2_bits = o.backing_file.empty() ? 9 : 12;
  header[32] = static_cast<uint8_t>(cluster_bits);
  header[33] = static_cast<uint8_t>(l2_bits);
  header_size = (header_size + 7) & ~uint64_t{7};
  uint32_t shift = cluster_bits + l2_bits;
  uint64_t l1_size = (size >> shift) + ((size & ((uint64_t{1} << shift) - 1)) != 0);
  StoreBE64(header + 40, header_size);
  uint64_t file_size = header_size + DivRoundUp(8 * l1_size, kSector) * kSector;

  std::unique_ptr<File> file;
  DMCOW_RETURN_IF_ERROR(create_internal::CreateFile(env, path, path, &file));
  DMCOW_RETURN_IF_ERROR(file->Write(0, header, sizeof(header)));
  if (!backing.empty()) DMCOW_RETURN_IF_ERROR(file->Write(sizeof(header), backing.data(), backing.size()));
  DMCOW_RETURN_IF_ERROR(file->Truncate(std::max<uint64_t>(file_size, sizeof(header) + backing.size())));
  return file->Sync();
}

}  // namespace

Status PrepareCreateOptions(const std::string& path, CreateOptions* o) {
  const std::string& fmt = o->format;
  if (!IsSupportedFormat(fmt)) return Bad(path, "Unknown file format '" + fmt + "'");
  if (!o->backing_file.empty() && fmt == "raw") {
    return Bad(path, "Backing file not supported for file format 'raw'");
  }
  if (!o->backing_fmt.empty() && fmt == "raw") {
    return Bad(path, "Backing file format not supported for file format 'raw'");
  }
  if (o->backing_file.empty()) {
    if (o->size == CreateOptions::kSizeUnset) return Bad(path, "Image creation needs a size parameter");
    return Status::OK();
  }
  if (o->backing_file == path) {
    return Bad(path, "Error: Trying to create an image with the same filename as the backing file");
  }
  if (!o->open_backing) {
    if (o->backing_fmt.empty()) return Bad(path, "Backing file specified without backing format");
    if (o->size == CreateOptions::kSizeUnset) return Bad(path, "Image creation needs a size parameter");
    return Status::OK();
  }
  // Open the backing file (and its own chain) as qemu-img does: it must
  // exist, its format must be given, and it gives the size if none was.
  const std::string full = ResolveRelativeTo(path, o->backing_file);
  if (!o->backing_fmt.empty() && !IsSupportedFormat(o->backing_fmt)) {
    if (!IsBlockdevDriver(o->backing_fmt)) {
      return Bad(path, "Unknown driver '" + o->backing_fmt + "' (could not open backing image)");
    }
    return Bad(path, "Could not open '" + full + "': backing format '" + o->backing_fmt +
                         "' is not supported by dmcow (use -u to skip opening it)");
  }
  OpenOptions open;
  open.format = o->backing_fmt;
  open.env = o->env;
  open.allow_missing_keys = true;  // only its size is needed, as QEMU's no-I/O open
  std::unique_ptr<Image> backing;
  Status s = OpenImage(full, open, &backing);
  if (!s.ok()) {
    if (s.IsNotFound()) return Bad(path, "Could not open '" + full + "': No such file or directory");
    return Bad(path, "Could not open '" + full + "': " + s.message());
  }
  if (o->backing_fmt.empty()) {
    return Bad(path,
               "Backing file specified without backing format. Detected format of " + backing->info().format + ".");
  }
  if (o->size == CreateOptions::kSizeUnset) o->size = DivRoundUp(backing->virtual_size(), kSector) * kSector;
  return Status::OK();
}

Status CreateImage(const std::string& path, const CreateOptions& options) {
  CreateOptions o = options;
  DMCOW_RETURN_IF_ERROR(PrepareCreateOptions(path, &o));
  if (o.size > static_cast<uint64_t>(INT64_MAX)) {
    return Bad(path, "The image size is too large for file format '" + o.format + "'");
  }
  Env* env = o.env;
  if (o.format == "raw") return CreateRaw(env, path, o);
  if (o.format == "qcow") return CreateQcow1(env, path, o);
  return create_internal::CreateQcow2(env, path, o);
}

}  // namespace dmcow
