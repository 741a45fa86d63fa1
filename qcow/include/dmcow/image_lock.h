// ImageLock: the image-file lock QEMU takes, so that we and QEMU (qemu-system,
// qemu-io, qemu-img, qemu-nbd, qemu-storage-daemon) refuse to open an image
// the other has open in a conflicting way, exactly as two QEMUs refuse each
// other.
//
// QEMU 7.2 (block/file-posix.c: raw_apply_lock_bytes, raw_check_lock_bytes,
// raw_handle_perm_lock) takes a shared (read) Linux OFD lock on one byte per
// block permission: byte 100+i while it USES permission bit i, byte 200+i
// while it does NOT SHARE bit i with other users. Bits: 0 consistent read,
// 1 write, 2 write unchanged, 3 resize (bit 4, "graph mod", left QEMU in 7.0).
// A conflict is found by testing (F_OFD_GETLK) for a write lock on the
// opposite byte: 200+i for each bit used, 100+i for each bit not shared.
// Nobody ever holds a write lock, so the tests see exactly the other opens'
// read locks. Locks are taken first and tested second, so two processes
// racing each other both see the other and both fail, never both succeed.
//
// What QEMU takes on a qcow2 image file (seen in /proc/locks with the real
// tools, see tests/image_lock_test.cc), and so what each Mode takes:
//   kReadWrite        writable open (qemu-system -drive, qemu-io, qemu-nbd,
//                     qemu-img commit/convert's target/check -r):
//                     uses consistent read + write + resize (100, 101, 103),
//                     shares neither write nor resize (201, 203).
//   kReadOnly         read-only open (qemu-io -r, qemu-img info/check/map):
//                     uses consistent read (100), still shares neither write
//                     nor resize (201, 203): the qcow2 metadata it read must
//                     not change under it.
//   kReadOnlyShared   -U / force-share=on: uses consistent read (100), shares
//                     everything; QEMU allows it on read-only opens only.
// So: a writer excludes every other open but -U ones; a reader excludes
// writers; readers coexist.
//
// A lock lives in an open file description, not in a process: the object
// keeps its own descriptor open while it lives, and a second ImageLock on the
// same file in this process conflicts with the first as another process
// would. Destruction (or the process's death) releases it.
//
// Locking unavailable: when the kernel has no OFD locks (before Linux 3.15:
// fcntl says EINVAL), QEMU's default locking=auto silently skips locking; so
// does Acquire (held() is then false). A file system that refuses the lock
// itself (e.g. ENOLCK on NFSv3 without lockd) fails QEMU's open ("Failed to
// lock byte 100: ..."); Acquire fails the same way (NotSupported), and a
// caller that wants QEMU's locking=off simply does not call it.
//
// Thread safety: an ImageLock is immutable once acquired.
#ifndef DMCOW_IMAGE_LOCK_H_
#define DMCOW_IMAGE_LOCK_H_

#include <cstdint>
#include <memory>
#include <string>

#include "dmcow/status.h"

namespace dmcow {

class ImageLock {
 public:
  enum class Mode {
    kReadWrite,
    kReadOnly,
    kReadOnlyShared,  // QEMU's -U / force-share
  };

  // Opens `path` (read-only: a read lock needs no more) and takes the bytes
  // QEMU takes for an open of the given mode. A conflict with another open
  // is Busy, with a one-line message naming the file, the permission and the
  // lock byte, e.g.
  //   a.qcow2: Failed to get "write" lock: another process has the image
  //   open and does not share write (QEMU lock byte 201); is another process
  //   using the image?
  // A missing file is NotFound; a file system that refuses locks NotSupported.
  //
  // With `qemu_error`, a conflict also sets *qemu_error to the words QEMU
  // 7.2 uses in its place (block/file-posix.c), for tools that print QEMU's
  // messages (dmcow-img): `Failed to get shared "write" lock`, or
  // `Failed to lock byte 100` (a non-QEMU write lock). QEMU adds the hint
  // "Is another process using the image [NAME]?" to the first kind.
  static Status Acquire(const std::string& path, Mode mode, std::unique_ptr<ImageLock>* out,
                        std::string* qemu_error = nullptr);

  // The same on a descriptor the caller opened (readable; the image's own fd
  // is best: the lock is then on the very file the image was opened from).
  // The descriptor is duplicated, so the caller may close its own; note that
  // the duplicate shares the open file description, so the locks are the
  // caller's fd's too until this object releases them. `name` is for
  // messages.
  static Status AcquireFd(int fd, const std::string& name, Mode mode, std::unique_ptr<ImageLock>* out,
                          std::string* qemu_error = nullptr);

  ImageLock(const ImageLock&) = delete;
  ImageLock& operator=(const ImageLock&) = delete;
  ~ImageLock();

  Mode mode() const { return mode_; }
  const std::string& name() const { return name_; }

  // False when the kernel has no OFD locks and nothing is locked (see above).
  bool held() const { return locked_bytes_ != 0; }

  // "read-write", "read-only", "read-only, force-share".
  static const char* ModeName(Mode mode);

 private:
  ImageLock(int fd, std::string name, Mode mode) : fd_(fd), name_(std::move(name)), mode_(mode) {}

  // Takes this mode's bytes on fd_, then checks for conflicts.
  Status Lock(std::string* qemu_error);
  void Unlock();

  int fd_;
  std::string name_;
  Mode mode_;
  // Bit b set: byte 100 + b (b < 32) or 200 + (b - 32) is locked by us.
  uint64_t locked_bytes_ = 0;
};

}  // namespace dmcow

#endif  // DMCOW_IMAGE_LOCK_H_
