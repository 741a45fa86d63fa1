// Qcow2Image::ChangeBackingFile: the header names another backing file;
// and WriteHeaderLocked, which every header change (amend's too) goes
// through.
//
// ORDERING AND ATOMICITY. The header names the backing file that gives
// every unallocated byte its content, so a half-written change would make
// the guest read another file. The rules:
//  (B1) Everything written through this open (a safe rebase's copies, and
//       the tables mapping them) is durable before the new header is
//       written: Flush first. A crash then leaves the old name over the
//       copies (which hold what the old backing file held: same content) or
//       the new name.
//  (B2) The new header is one write that a disk cannot tear: the first
//       512-byte sector alone. QEMU writes the whole cluster, whose header,
//       extensions and name often reach past 512 bytes (its feature name
//       table alone is 392 bytes), so a 512-byte-sector disk losing power
//       mid-write can pair the new name's length with the old name's
//       bytes. When QEMU's layout does not fit in 512 bytes, the feature
//       name table (descriptive only: names for feature bits, which QEMU
//       writes again at its next header update) is left out. Only when even
//       that does not fit (unknown extensions, a long name or data file
//       name) is the header written as QEMU writes it, one write of the
//       bytes in use: atomic on 4 KiB-sector disks, not on 512-byte ones.
//  (B3) Bytes of the old header past the new one are zeroed only after the
//       new header is durable: until then the old header may still be the
//       one on disk, and it needs them. Nothing refers to them afterwards.
#include <algorithm>

#include "qcow2/qcow2_image.h"
#include "util.h"

namespace dmcow {

using namespace qcow2;

namespace {
constexpr size_t kSectorBytes = 512;
constexpr size_t kMaxFormatName = 15;  // QEMU's backing_format[16], with its NUL
}  // namespace

Status Qcow2Image::ChangeBackingFile(const std::string& backing, const std::string& backing_format) {
  if (!writable_ && !header_writable_) return Image::ChangeBackingFile(backing, backing_format);
  const std::string& name = filename();
  if (backing.empty() && !backing_format.empty()) {
    return Status::InvalidArgument(name + ": a backing format without a backing file");
  }
  if (backing.find('\0') != std::string::npos || backing_format.find('\0') != std::string::npos) {
    return Status::InvalidArgument(name + ": a backing file name or format with a NUL byte");
  }
  if (backing.size() > kMaxBackingNameSize) {
    return Status::InvalidArgument(name + ": backing file name longer than " + std::to_string(kMaxBackingNameSize) +
                                   " bytes");
  }
  if (backing_format.size() > kMaxFormatName) {
    return Status::InvalidArgument(name + ": backing format name longer than " + std::to_string(kMaxFormatName) +
                                   " bytes");
  }
  if (!backing.empty() && info_.data_file_raw) {
    // The raw data file alone would no longer say what the guest reads.
    return Status::InvalidArgument(name +
                                   ": an image whose external data file is raw (data_file_raw) cannot have "
                                   "a backing file");
  }
  return WriteStep([&]() REQUIRES(rw_mu_) -> Status {
    if (writable_) DMCOW_RETURN_IF_ERROR(FlushLocked());  // (B1)
    Qcow2Header next = header_;
    next.backing_file = backing;
    next.backing_format = backing.empty() ? "" : backing_format;
    DMCOW_RETURN_IF_ERROR(WriteHeaderLocked(std::move(next)));
    info_.backing_filename = backing;
    info_.full_backing_filename = ResolveRelativeTo(name, backing);
    info_.backing_format = header_.backing_format;
    return Status::OK();
  });
}

Status Qcow2Image::WriteHeaderLocked(Qcow2Header next) {
  const std::string& name = filename();
  // What the old header holds: its extra fields are kept, its end found.
  const size_t cs = static_cast<size_t>(header_.cluster_size);
  std::vector<uint8_t> old(cs, 0);
  size_t got = 0;
  DMCOW_RETURN_IF_ERROR(file_->Read(0, cs, old.data(), &got));
  std::vector<uint8_t> unknown_fields;
  if (header_.version >= 3 && header_.header_length > 112) {
    unknown_fields.assign(old.begin() + 112, old.begin() + std::min<size_t>(header_.header_length, cs));
  }
  size_t old_used = got;
  while (old_used > 0 && old[old_used - 1] == 0) old_used--;

  std::vector<uint8_t> cluster;
  size_t used = 0;
  Status built = BuildHeaderCluster(next, unknown_fields, next.version >= 3 && cs > 4096, &cluster, &used);
  if (built.ok() && used > kSectorBytes) {  // (B2): try for one sector
    std::vector<uint8_t> small;
    size_t small_used = 0;
    if (BuildHeaderCluster(next, unknown_fields, false, &small, &small_used).ok() && small_used <= kSectorBytes) {
      cluster.swap(small);
      used = small_used;
    }
  }
  if (!built.ok()) return built.WithMessage(name + ": No space left in the file header (" + built.message() + ")");
  const size_t write_bytes = used <= kSectorBytes ? kSectorBytes : RoundUp(std::max(used, old_used), kSectorBytes);
  DMCOW_RETURN_IF_ERROR(file_->Write(0, cluster.data(), write_bytes));
  DMCOW_RETURN_IF_ERROR(file_->Sync());
  if (write_bytes < old_used) {  // (B3)
    const size_t stale = RoundUp(old_used, kSectorBytes) - write_bytes;
    DMCOW_RETURN_IF_ERROR(file_->Write(write_bytes, cluster.data() + write_bytes, stale));
    DMCOW_RETURN_IF_ERROR(file_->Sync());
  }
  next.backing_file_offset = LoadBE64(cluster.data() + 8);
  next.backing_file_size = LoadBE32(cluster.data() + 16);
  next.header_length = next.version >= 3 ? static_cast<uint32_t>(112 + unknown_fields.size()) : kV2HeaderLength;
  header_ = std::move(next);
  return Status::OK();
}

}  // namespace dmcow
