// QEMU-compatible image locking; the protocol is described in image_lock.h.
#include "dmcow/image_lock.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace dmcow {
namespace {

// block/file-posix.c. QEMU starts at 100 because libvirt's virtlockd may
// lock byte 0 of the same file.
constexpr int kPermBase = 100;    // RAW_LOCK_PERM_BASE
constexpr int kSharedBase = 200;  // RAW_LOCK_SHARED_BASE

// include/block/block-common.h, BlkPermission, as of QEMU 7.0 (BLK_PERM_ALL
// is 0x0f since BLK_PERM_GRAPH_MOD was dropped, so QEMU loops over these
// four bits and never touches byte 104 or 204).
constexpr int kNumPerms = 4;
constexpr uint32_t kConsistentRead = 0x1;
constexpr uint32_t kWrite = 0x2;
[[maybe_unused]] constexpr uint32_t kWriteUnchanged = 0x4;  // never taken or checked by us
constexpr uint32_t kResize = 0x8;
constexpr uint32_t kAllPerms = 0xf;
// bdrv_perm_names(): the words QEMU's messages use.
const char* const kPermNames[kNumPerms] = {"consistent read", "write", "write unchanged", "resize"};

struct Perms {
  uint32_t used;
  uint32_t shared;
};

// The permissions QEMU's qcow2 driver asks of its file child
// (bdrv_default_perms_for_storage): metadata must stay consistent, so even a
// read-only open shares neither write nor resize; force-share overrides that.
Perms PermsFor(ImageLock::Mode mode) {
  switch (mode) {
    case ImageLock::Mode::kReadWrite: return {kConsistentRead | kWrite | kResize, kAllPerms & ~(kWrite | kResize)};
    case ImageLock::Mode::kReadOnly: return {kConsistentRead, kAllPerms & ~(kWrite | kResize)};
    case ImageLock::Mode::kReadOnlyShared: return {kConsistentRead, kAllPerms};
  }
  return {kConsistentRead | kWrite | kResize, 0};  // unreachable; the strictest
}

// Bit positions in ImageLock::locked_bytes_.
uint64_t PermBit(int i) { return uint64_t{1} << i; }
uint64_t SharedBit(int i) { return uint64_t{1} << (32 + i); }

int Fcntl(int fd, int cmd, struct flock* fl) {
  int r;
  do {
    r = ::fcntl(fd, cmd, fl);
  } while (r < 0 && errno == EINTR);
  return r < 0 ? errno : 0;
}

// QEMU's qemu_probe_lock_ops(): whether the kernel has OFD locks at all,
// asked once of /dev/null so that no file system's answer gets in the way.
bool KernelHasOfdLocks() {
  static const bool has = [] {
    int fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (fd < 0) return true;  // cannot tell; let the real lock report
    struct flock fl {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    bool ok = Fcntl(fd, F_OFD_GETLK, &fl) != EINVAL;
    ::close(fd);
    return ok;
  }();
  return has;
}

struct flock ByteLock(short type, int offset) {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = offset;
  fl.l_len = 1;
  return fl;  // l_pid must be 0 for OFD locks
}

// A lock call failed for a reason other than a conflict.
Status LockError(const std::string& name, const char* what, int offset, int err) {
  std::string msg = name + ": " + what + " byte " + std::to_string(offset) + ": " + std::strerror(err);
  if (err == ENOLCK || err == EOPNOTSUPP || err == ENOSYS || err == EINVAL) {
    return Status::NotSupported(msg + " (the file system refuses QEMU-compatible image locks)");
  }
  return Status::IOError(msg);
}

// raw_check_lock_bytes' error.
std::string QemuConflict(const char* shared, const char* perm) {
  return std::string("Failed to get ") + shared + "\"" + perm + "\" lock";
}

}  // namespace

const char* ImageLock::ModeName(Mode mode) {
  switch (mode) {
    case Mode::kReadWrite: return "read-write";
    case Mode::kReadOnly: return "read-only";
    case Mode::kReadOnlyShared: return "read-only, force-share";
  }
  return "?";
}

Status ImageLock::Acquire(const std::string& path, Mode mode, std::unique_ptr<ImageLock>* out,
                          std::string* qemu_error) {
  out->reset();
  // O_NONBLOCK: a hostile "image" that is a FIFO must not hang us; we never
  // read through this descriptor.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) {
    int err = errno;
    std::string msg = path + ": open for locking: " + std::strerror(err);
    return err == ENOENT ? Status::NotFound(msg) : Status::IOError(msg);
  }
  std::unique_ptr<ImageLock> lock(new ImageLock(fd, path, mode));
  DMCOW_RETURN_IF_ERROR(lock->Lock(qemu_error));
  *out = std::move(lock);
  return Status::OK();
}

Status ImageLock::AcquireFd(int fd, const std::string& name, Mode mode, std::unique_ptr<ImageLock>* out,
                            std::string* qemu_error) {
  out->reset();
  int dup = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return Status::IOError(name + ": dup for locking: " + std::strerror(errno));
  std::unique_ptr<ImageLock> lock(new ImageLock(dup, name, mode));
  DMCOW_RETURN_IF_ERROR(lock->Lock(qemu_error));
  *out = std::move(lock);
  return Status::OK();
}

ImageLock::~ImageLock() {
  // Unlock explicitly rather than rely on close(): with AcquireFd the open
  // file description outlives our duplicate.
  Unlock();
  ::close(fd_);
}

void ImageLock::Unlock() {
  for (int i = 0; i < kNumPerms; ++i) {
    for (uint64_t bit : {PermBit(i), SharedBit(i)}) {
      if (!(locked_bytes_ & bit)) continue;
      struct flock fl = ByteLock(F_UNLCK, (bit == PermBit(i) ? kPermBase : kSharedBase) + i);
      Fcntl(fd_, F_OFD_SETLK, &fl);  // unlocking cannot conflict; nothing to do on error
      locked_bytes_ &= ~bit;
    }
  }
}

Status ImageLock::Lock(std::string* qemu_error) {
  if (!KernelHasOfdLocks()) return Status::OK();  // QEMU's locking=auto: no locks at all
  const Perms p = PermsFor(mode_);
  const uint32_t unshared = kAllPerms & ~p.shared;

  // Step one (raw_apply_lock_bytes): announce what we use and what we deny.
  auto take = [&](int offset, uint64_t bit) -> Status {
    struct flock fl = ByteLock(F_RDLCK, offset);
    int err = Fcntl(fd_, F_OFD_SETLK, &fl);
    if (err == EAGAIN || err == EACCES) {
      // Only a write lock blocks a read lock; QEMU never holds one, so this
      // is some other program locking the whole image.
      if (qemu_error) *qemu_error = "Failed to lock byte " + std::to_string(offset);
      return Status::Busy(name_ + ": Failed to lock byte " + std::to_string(offset) +
                          ": another process holds a write lock on it; is another process using the image?");
    }
    if (err != 0) return LockError(name_, "Failed to lock", offset, err);
    locked_bytes_ |= bit;
    return Status::OK();
  };
  Status s;
  for (int i = 0; i < kNumPerms && s.ok(); ++i) {
    if (p.used & (1u << i)) s = take(kPermBase + i, PermBit(i));
  }
  for (int i = 0; i < kNumPerms && s.ok(); ++i) {
    if (unshared & (1u << i)) s = take(kSharedBase + i, SharedBit(i));
  }

  // Step two (raw_check_lock_bytes): does anyone deny what we use, or use
  // what we deny? A test never reports our own description's locks.
  auto held = [&](int offset, bool* is_held) -> Status {
    struct flock fl = ByteLock(F_WRLCK, offset);
    int err = Fcntl(fd_, F_OFD_GETLK, &fl);
    if (err != 0) return LockError(name_, "Failed to test lock", offset, err);
    *is_held = fl.l_type != F_UNLCK;
    return Status::OK();
  };
  for (int i = 0; i < kNumPerms && s.ok(); ++i) {
    if (!(p.used & (1u << i))) continue;
    bool is_held = false;
    s = held(kSharedBase + i, &is_held);
    if (s.ok() && is_held) {
      if (qemu_error) *qemu_error = QemuConflict("", kPermNames[i]);
      s = Status::Busy(name_ + ": Failed to get \"" + kPermNames[i] +
                       "\" lock: another process has the image open and does not share " + kPermNames[i] +
                       " (QEMU lock byte " + std::to_string(kSharedBase + i) +
                       "); is another process using the image?");
    }
  }
  for (int i = 0; i < kNumPerms && s.ok(); ++i) {
    if (!(unshared & (1u << i))) continue;
    bool is_held = false;
    s = held(kPermBase + i, &is_held);
    if (s.ok() && is_held) {
      if (qemu_error) *qemu_error = QemuConflict("shared ", kPermNames[i]);
      std::string msg = name_ + ": Failed to get shared \"" + kPermNames[i] +
                        "\" lock: another process has the image open for " + kPermNames[i] + " (QEMU lock byte " +
                        std::to_string(kPermBase + i) + "); is another process using the image?";
      // Only a reader can get past a user of write/resize, and only by
      // sharing everything, as QEMU's -U does.
      if (mode_ == Mode::kReadOnly) msg += " (force-share / -U opens it read-only anyway)";
      s = Status::Busy(msg);
    }
  }
  if (!s.ok()) Unlock();
  return s;
}

}  // namespace dmcow
