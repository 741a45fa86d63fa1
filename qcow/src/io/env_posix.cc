// Env backed by POSIX file descriptors (pread/pwrite/fdatasync).
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "dmcow/env.h"
#include "dmcow/mutex.h"

namespace dmcow {
namespace {

Status ErrnoStatus(const std::string& name, const char* op, int err) {
  std::string msg = name + ": " + op + ": " + std::strerror(err);
  if (err == ENOENT) return Status::NotFound(msg);
  return Status::IOError(msg);
}

class PosixFile final : public File {
 public:
  PosixFile(std::string name, int fd) : name_(std::move(name)), fd_(fd) {}
  ~PosixFile() override { ::close(fd_); }

  const std::string& name() const override { return name_; }
  int NativeFd() const override { return fd_; }

  Status Read(uint64_t offset, size_t len, void* buf, size_t* bytes_read) override {
    size_t done = 0;
    auto* out = static_cast<char*>(buf);
    while (done < len) {
      ssize_t n = ::pread(fd_, out + done, len - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        *bytes_read = done;
        return ErrnoStatus(name_, "read", errno);
      }
      if (n == 0) break;
      done += static_cast<size_t>(n);
    }
    *bytes_read = done;
    return Status::OK();
  }

  Status Write(uint64_t offset, const void* buf, size_t len) override {
    size_t done = 0;
    const auto* in = static_cast<const char*>(buf);
    while (done < len) {
      ssize_t n = ::pwrite(fd_, in + done, len - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return ErrnoStatus(name_, "write", errno);
      }
      done += static_cast<size_t>(n);
    }
    return Status::OK();
  }

  Status WriteZeroes(uint64_t offset, uint64_t len) override {
    if (len == 0) return Status::OK();
    const HoleMaking may_punch(this);
    // ZERO_RANGE keeps the blocks allocated, so a later write into the range
    // cannot fail for space (QEMU's write-zeroes does the same); a punched
    // hole where that is all the file system has (tmpfs); else written zeros.
    int err = Fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, len);
    if (Unsupported(err)) err = Fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
    if (Unsupported(err)) return File::WriteZeroes(offset, len);
    if (err != 0) return ErrnoStatus(name_, "zeroing", err);
    // KEEP_SIZE leaves a range past the end outside the file: one written
    // zero byte grows it (and, unlike ftruncate, can never shrink it under a
    // concurrent writer).
    uint64_t size = 0;
    DMCOW_RETURN_IF_ERROR(Size(&size));
    if (size < offset + len) {
      static const char zero = 0;
      return Write(offset + len - 1, &zero, 1);
    }
    return Status::OK();
  }

  Status Deallocate(uint64_t offset, uint64_t len) override {
    if (len == 0) return Status::OK();
    const HoleMaking punch(this);
    const int err = Fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
    if (Unsupported(err)) return File::Deallocate(offset, len);
    if (err != 0) return ErrnoStatus(name_, "deallocating", err);
    return Status::OK();
  }

  Status Allocate(uint64_t offset, uint64_t len) override {
    const int err = ::posix_fallocate(fd_, static_cast<off_t>(offset), static_cast<off_t>(len));
    if (err == 0) return Status::OK();
    if (err == EOPNOTSUPP || err == EINVAL) return Status::NotSupported(name_ + ": the file system cannot preallocate");
    return Status::IOError(name_ + ": Could not preallocate new data: " + std::strerror(err));
  }

  Status Sync() override {
    if (::fdatasync(fd_) != 0) return ErrnoStatus(name_, "sync", errno);
    return Status::OK();
  }

  Status Size(uint64_t* size) override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return ErrnoStatus(name_, "stat", errno);
    if (S_ISBLK(st.st_mode)) {
      off_t end = ::lseek(fd_, 0, SEEK_END);
      if (end < 0) return ErrnoStatus(name_, "seek", errno);
      *size = static_cast<uint64_t>(end);
    } else {
      *size = static_cast<uint64_t>(st.st_size);
    }
    return Status::OK();
  }

  Status Truncate(uint64_t size) override {
    const HoleMaking may_shrink(this);
    if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) return ErrnoStatus(name_, "truncate", errno);
    return Status::OK();
  }

  // SEEK_HOLE costs time in proportion to the data it passes on tmpfs (it
  // visits every page up to the hole), and callers walk a long data run a
  // chunk at a time: 5 GiB of data asked 2 MiB at a time spent 75% of a
  // compare in mapping_seek_hole_data. So the last data run found is kept
  // and answers queries inside it. Only data is kept: our own writes never
  // make data a hole, and the calls that can (zeroing, deallocating,
  // truncating) forget it, before and after, and a lookup that ran beside
  // one of them does not keep what it saw; a hole punched by someone else is then read as
  // data, which reads its zeros, never wrong content.
  Status GetAllocation(uint64_t offset, uint64_t max_len, bool* is_data, uint64_t* len) override {
    uint64_t generation;
    {
      MutexLock lock(&data_run_mu_);
      generation = data_run_generation_;
      if (offset >= data_run_start_ && offset < data_run_end_) {
        *is_data = true;
        *len = std::min(max_len, data_run_end_ - offset);
        return Status::OK();
      }
    }
    off_t data = ::lseek(fd_, static_cast<off_t>(offset), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) {  // only a hole (or EOF) from here on
        *is_data = false;
        *len = max_len;
        return Status::OK();
      }
      return File::GetAllocation(offset, max_len, is_data, len);  // not supported here
    }
    if (static_cast<uint64_t>(data) > offset) {
      *is_data = false;
      *len = std::min<uint64_t>(max_len, static_cast<uint64_t>(data) - offset);
      return Status::OK();
    }
    off_t hole = ::lseek(fd_, static_cast<off_t>(offset), SEEK_HOLE);
    *is_data = true;
    *len = hole < 0 ? max_len : std::min<uint64_t>(max_len, static_cast<uint64_t>(hole) - offset);
    if (*len == 0) *len = max_len;
    if (hole > data) {
      MutexLock lock(&data_run_mu_);
      if (data_run_generation_ == generation) {
        data_run_start_ = offset;
        data_run_end_ = static_cast<uint64_t>(hole);
      }
    }
    return Status::OK();
  }

  Status Identity(FileIdentity* id) override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return ErrnoStatus(name_, "stat", errno);
    id->device = static_cast<uint64_t>(st.st_dev);
    id->inode = static_cast<uint64_t>(st.st_ino);
    return Status::OK();
  }

  uint64_t AllocatedBytes() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return 0;
    return static_cast<uint64_t>(st.st_blocks) * 512;
  }

 private:
  int Fallocate(int mode, uint64_t offset, uint64_t len) {
    while (::fallocate(fd_, mode, static_cast<off_t>(offset), static_cast<off_t>(len)) != 0) {
      if (errno != EINTR) return errno;
    }
    return 0;
  }
  // ENODEV: fallocate on a block device before Linux 4.9.
  static bool Unsupported(int err) { return err == EOPNOTSUPP || err == ENOSYS || err == EINVAL || err == ENODEV; }
  void ForgetDataRun() {
    MutexLock lock(&data_run_mu_);
    data_run_start_ = data_run_end_ = 0;
    data_run_generation_++;
  }
  // Around a call that may turn data into a hole.
  class HoleMaking {
   public:
    explicit HoleMaking(PosixFile* file) : file_(file) { file_->ForgetDataRun(); }
    ~HoleMaking() { file_->ForgetDataRun(); }
    HoleMaking(const HoleMaking&) = delete;
    HoleMaking& operator=(const HoleMaking&) = delete;

   private:
    PosixFile* const file_;
  };

  const std::string name_;
  const int fd_;
  Mutex data_run_mu_;
  uint64_t data_run_start_ GUARDED_BY(data_run_mu_) = 0;  // [start, end): data, found by SEEK_HOLE
  uint64_t data_run_end_ GUARDED_BY(data_run_mu_) = 0;
  uint64_t data_run_generation_ GUARDED_BY(data_run_mu_) = 0;  // moves with every ForgetDataRun
};

// What a file that is neither a regular file nor a block device is, for the
// refusal; nullptr for those two (and directories, refused on their own).
const char* UnusableFileKind(mode_t mode) {
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  return nullptr;
}

Status UnusableFile(const std::string& path, const char* kind) {
  return Status::InvalidArgument(path + ": is " + kind + ", not a regular file or block device");
}

class PosixEnv final : public Env {
 public:
  // Images, and the files they name, are untrusted: opening one must never
  // block (a FIFO without a writer would wait for ever, a terminal could
  // become the controlling one), and only regular files and block devices
  // hold an image. The open is non-blocking, the type is checked on the
  // descriptor itself (no window between a stat and the open), and only
  // then does the descriptor become blocking again for ordinary I/O.
  Status OpenFile(const std::string& path, OpenMode mode, std::unique_ptr<File>* file) override {
    int flags = O_CLOEXEC | O_NONBLOCK | O_NOCTTY;
    switch (mode) {
      case OpenMode::kReadOnly: flags |= O_RDONLY; break;
      case OpenMode::kReadWrite: flags |= O_RDWR; break;
      case OpenMode::kCreateTruncate: flags |= O_RDWR | O_CREAT | O_TRUNC; break;
    }
    int fd = ::open(path.c_str(), flags, 0644);
    if (fd < 0) {
      const int err = errno;
      // open(2) of a socket fails with ENXIO: name what it is instead.
      struct stat st;
      if (err == ENXIO && ::stat(path.c_str(), &st) == 0 && UnusableFileKind(st.st_mode)) {
        return UnusableFile(path, UnusableFileKind(st.st_mode));
      }
      return ErrnoStatus(path, "open", err);
    }
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      return ErrnoStatus(path, "stat", err);
    }
    if (S_ISDIR(st.st_mode)) {
      ::close(fd);
      return Status::InvalidArgument(path + ": is a directory");
    }
    if (const char* kind = UnusableFileKind(st.st_mode)) {
      ::close(fd);
      return UnusableFile(path, kind);
    }
    const int fl = ::fcntl(fd, F_GETFL);
    if (fl < 0 || ::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) != 0) {
      const int err = errno;
      ::close(fd);
      return ErrnoStatus(path, "fcntl", err);
    }
    file->reset(new PosixFile(path, fd));
    return Status::OK();
  }

  bool FileExists(const std::string& path) override { return ::access(path.c_str(), F_OK) == 0; }
};

}  // namespace

Env* Env::Default() {
  static PosixEnv* env = new PosixEnv();
  return env;
}

// Kept apart from PosixEnv::OpenFile: the descriptor is the caller's open,
// with its own checks (daemon/src/chain_files.h); only the wrapping is shared.
Status NewPosixFileFromFd(int fd, const std::string& name, std::unique_ptr<File>* file) {
  if (fd < 0) return Status::InvalidArgument(name + ": no open descriptor");
  file->reset(new PosixFile(name, fd));
  return Status::OK();
}

}  // namespace dmcow
