// Block devices for the table: a block device is used as it is; a regular
// file gets a loop device with LO_FLAGS_AUTOCLEAR, which the kernel
// detaches once the last user (our fd, then the dm table) closes it.
#ifndef DMCOWD_LOOPDEV_H_
#define DMCOWD_LOOPDEV_H_

#include <string>

#include "dmcow/status.h"

namespace dmcowd {

using dmcow::Status;

class BlockDev {
 public:
  BlockDev() = default;
  ~BlockDev() { Release(); }
  BlockDev(const BlockDev&) = delete;
  BlockDev& operator=(const BlockDev&) = delete;

  // `path` is a block device or a regular file (then a loop device is set
  // up, read-only if asked). Keeps the device open until Release().
  Status Open(const std::string& path, bool read_only);
  // A loop device over an open file (kept by the loop; `file_fd` may be
  // closed afterwards); `label` names it in messages and the loop's info.
  // LOOP_CONFIGURE, or LOOP_SET_FD + LOOP_SET_STATUS64 where the kernel
  // lacks it (before 5.8: EINVAL).
  Status OpenFile(int file_fd, const std::string& label, bool read_only);
  // A descriptor opened already (dmcow-qcow attach's open of a chain file):
  // a block device is used as it is (its device number; `fd` is duplicated),
  // a regular file gets a loop device over that very descriptor.
  Status Adopt(int fd, const std::string& label, bool read_only);
  // Re-reads the backing file's size (after the file grew).
  Status SetCapacity();
  // Closes our fd: a loop device goes away when the dm table no longer
  // holds it either.
  void Release();

  int fd() const { return fd_; }
  const std::string& devnode() const { return devnode_; }  // /dev/loopN or the path
  const std::string& devt() const { return devt_; }        // "major:minor" for tables
  bool is_loop() const { return is_loop_; }

 private:
  int fd_ = -1;
  std::string devnode_;
  std::string devt_;
  bool is_loop_ = false;
};

}  // namespace dmcowd

#endif  // DMCOWD_LOOPDEV_H_
