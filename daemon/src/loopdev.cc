#include "loopdev.h"
#include "sys_error.h"

#include <fcntl.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "log.h"

namespace dmcowd {

namespace {

std::string DevT(dev_t d) { return std::to_string(major(d)) + ":" + std::to_string(minor(d)); }

// LOOP_CONFIGURE's work in two steps, for kernels without it. Read-only
// follows from the modes the file and the loop node were opened with.
int SetFdAndStatus(int lfd, const loop_config& cfg) {
  if (::ioctl(lfd, LOOP_SET_FD, cfg.fd) != 0) return -1;
  loop_info64 info = cfg.info;
  info.lo_flags &= LO_FLAGS_AUTOCLEAR;  // the flags LOOP_SET_STATUS64 may set
  if (::ioctl(lfd, LOOP_SET_STATUS64, &info) != 0) {
    const int e = errno;
    ::ioctl(lfd, LOOP_CLR_FD, 0);
    errno = e;
    return -1;
  }
  return 0;
}

}  // namespace

Status BlockDev::Open(const std::string& path, bool read_only) {
  Release();
  const int mode = read_only ? O_RDONLY : O_RDWR;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return Errno(path, errno);
  if (S_ISBLK(st.st_mode)) {
    fd_ = ::open(path.c_str(), mode | O_CLOEXEC);
    if (fd_ < 0) return Errno(path + ": open", errno);
    devnode_ = path;
    devt_ = DevT(st.st_rdev);
    return Status::OK();
  }
  if (!S_ISREG(st.st_mode)) return Status::InvalidArgument(path + ": neither a regular file nor a block device");

  int file_fd = ::open(path.c_str(), mode | O_CLOEXEC);
  if (file_fd < 0) return Errno(path + ": open", errno);
  Status s = OpenFile(file_fd, path, read_only);
  ::close(file_fd);
  return s;
}

Status BlockDev::OpenFile(int file_fd, const std::string& label, bool read_only) {
  Release();
  const std::string& path = label;
  const int mode = read_only ? O_RDONLY : O_RDWR;
  int ctl = ::open("/dev/loop-control", O_RDWR | O_CLOEXEC);
  if (ctl < 0) return Errno("/dev/loop-control", errno);
  Status s;
  for (int attempt = 0; attempt < 20; attempt++) {
    int n = ::ioctl(ctl, LOOP_CTL_GET_FREE);
    if (n < 0) {
      s = Errno("LOOP_CTL_GET_FREE", errno);
      break;
    }
    std::string node = "/dev/loop" + std::to_string(n);
    int lfd = -1;
    for (int i = 0; i < 100 && lfd < 0; i++) {
      lfd = ::open(node.c_str(), mode | O_CLOEXEC);
      if (lfd < 0 && errno == ENOENT)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      else if (lfd < 0)
        break;
    }
    if (lfd < 0) {
      s = Errno(node + ": open", errno);
      break;
    }
    loop_config cfg{};
    cfg.fd = static_cast<uint32_t>(file_fd);
    cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR | (read_only ? LO_FLAGS_READ_ONLY : 0);
    std::strncpy(reinterpret_cast<char*>(cfg.info.lo_file_name), path.c_str(), LO_NAME_SIZE - 1);
    int rc = ::ioctl(lfd, LOOP_CONFIGURE, &cfg);
    if (rc != 0 && errno == EINVAL) rc = SetFdAndStatus(lfd, cfg);
    if (rc == 0) {
      struct stat lst;
      ::fstat(lfd, &lst);
      fd_ = lfd;
      devnode_ = node;
      devt_ = DevT(lst.st_rdev);
      is_loop_ = true;
      s = Status::OK();
      LOG_DEBUG("%s on %s", path.c_str(), node.c_str());
      break;
    }
    const int e = errno;
    ::close(lfd);
    s = Errno(node + ": LOOP_CONFIGURE " + path, e);
    if (e != EBUSY) break;  // somebody took it first: try the next free one
  }
  ::close(ctl);
  return s;
}

Status BlockDev::Adopt(int fd, const std::string& label, bool read_only) {
  Release();
  struct stat st;
  if (::fstat(fd, &st) != 0) return Errno(label + ": stat", errno);
  if (S_ISBLK(st.st_mode)) {
    fd_ = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (fd_ < 0) return Errno(label + ": dup", errno);
    devnode_ = label;
    devt_ = DevT(st.st_rdev);
    is_loop_ = false;
    return Status::OK();
  }
  if (!S_ISREG(st.st_mode)) return Status::InvalidArgument(label + ": neither a regular file nor a block device");
  return OpenFile(fd, label, read_only);
}

Status BlockDev::SetCapacity() {
  if (!is_loop_ || fd_ < 0) return Status::InvalidArgument(devnode_ + ": not a loop device of ours");
  if (::ioctl(fd_, LOOP_SET_CAPACITY, 0) != 0) return Errno(devnode_ + ": LOOP_SET_CAPACITY", errno);
  return Status::OK();
}

void BlockDev::Release() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

}  // namespace dmcowd
