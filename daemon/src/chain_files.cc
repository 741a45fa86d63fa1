#include "chain_files.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

#include "dmcow/image.h"

namespace dmcowd {

namespace {

enum class Role { kImage, kBacking, kDataFile };

const char* TypeName(mode_t m) {
  if (S_ISREG(m)) return "a regular file";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISDIR(m)) return "a directory";
  return "not a regular file";
}

Status OpenError(const std::string& path, Role role, const std::string& referrer, int err) {
  // strerrordesc_np, not strerror: the same English words in any locale,
  // and no locale lock taken (strerror's, under ASan's interceptor in an
  // nbdkit that loads p11-kit, deadlocked nbdkit's exit after a refusal).
  const std::string msg = path + ": open: " + strerrordesc_np(err);
  if (role == Role::kBacking) {
    const std::string m = referrer + ": could not open backing file '" + path + "': " + msg;
    return err == ENOENT ? Status::NotFound(m) : Status::IOError(m);
  }
  if (role == Role::kDataFile) {
    const std::string m = referrer + ": could not open external data file '" + path + "': " + msg;
    return err == ENOENT ? Status::NotFound(m) : Status::IOError(m);
  }
  return err == ENOENT ? Status::NotFound(msg) : Status::IOError(msg);
}

// Whether a file of this type may be opened in this role; else the refusal.
Status CheckType(const std::string& path, Role role, const std::string& referrer, mode_t mode, bool allow_blk,
                 const std::string& server) {
  if (S_ISREG(mode)) return Status::OK();
  if (role == Role::kImage) {
    if (S_ISBLK(mode)) return Status::OK();
    return Status::InvalidArgument(path + ": is " + TypeName(mode) + "; " + server +
                                   " serves image files (and block devices)");
  }
  if (role == Role::kBacking) {
    if (S_ISBLK(mode) && allow_blk) return Status::OK();
    return Status::InvalidArgument(referrer + ": backing file '" + path + "' is " + TypeName(mode) + ": " + server +
                                   " follows only regular files" +
                                   (S_ISBLK(mode) ? " (--allow-device-backing allows block devices)" : ""));
  }
  return Status::InvalidArgument(referrer + ": external data file '" + path + "' is " + TypeName(mode) + ": " + server +
                                 " follows only regular files");
}

// O_PATH, fstat, type check: nothing is opened for real, nothing blocks.
Status LookAt(const std::string& path, Role role, const std::string& referrer, const ChainPolicy& policy,
              UniqueFd* handle, struct stat* st) {
  handle->reset(::open(path.c_str(), O_PATH | O_CLOEXEC));
  if (handle->get() < 0) return OpenError(path, role, referrer, errno);
  if (::fstat(handle->get(), st) != 0) return OpenError(path, role, referrer, errno);
  return CheckType(path, role, referrer, st->st_mode, policy.allow_device_backing, policy.server);
}

// The one open of a chain file: LookAt, then the same inode opened through
// its O_PATH handle.
Status SafeOpen(const std::string& path, int access, Role role, const std::string& referrer, const ChainPolicy& policy,
                UniqueFd* out, struct stat* st) {
  UniqueFd handle;
  DMCOW_RETURN_IF_ERROR(LookAt(path, role, referrer, policy, &handle, st));
  const int flags = access | O_NONBLOCK | O_CLOEXEC | O_NOCTTY;
  out->reset(::open(("/proc/self/fd/" + std::to_string(handle.get())).c_str(), flags));
  if (out->get() < 0 && errno == ENOENT && ::access("/proc/self/fd", F_OK) != 0) {
    out->reset(::open(path.c_str(), flags));  // no /proc: by name, then checked to be the same file
  }
  if (out->get() < 0) return OpenError(path, role, referrer, errno);
  struct stat now;
  if (::fstat(out->get(), &now) != 0) return OpenError(path, role, referrer, errno);
  if (now.st_dev != st->st_dev || now.st_ino != st->st_ino || (now.st_mode & S_IFMT) != (st->st_mode & S_IFMT)) {
    return Status::InvalidArgument(path + ": changed while it was being opened");
  }
  const int fl = ::fcntl(out->get(), F_GETFL);
  if (fl < 0 || ::fcntl(out->get(), F_SETFL, fl & ~O_NONBLOCK) != 0) return OpenError(path, role, referrer, errno);
  *st = now;
  return Status::OK();
}

}  // namespace

UniqueFd& UniqueFd::operator=(UniqueFd&& o) noexcept {
  if (this != &o) reset(o.release());
  return *this;
}

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

std::string OpenFileName(int fd) {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  const std::string name(buf, static_cast<size_t>(n));
  const std::string deleted = " (deleted)";
  if (name[0] != '/' ||
      (name.size() > deleted.size() && name.compare(name.size() - deleted.size(), deleted.size(), deleted) == 0)) {
    return "";
  }
  return name;
}

Status OpenChain(const std::string& path, const ChainPolicy& policy, std::vector<ChainFile>* out) {
  out->clear();
  std::string open_path = path, name = path, referrer, hint;
  for (int depth = 0;; depth++) {
    if (depth > policy.max_depth) {
      return Status::Corrupt(name + ": backing chain is deeper than " + std::to_string(policy.max_depth) + " images");
    }
    ChainFile f;
    f.name = name;
    const Role role = depth == 0 ? Role::kImage : Role::kBacking;
    const int access = depth == 0 && policy.writable ? O_RDWR : O_RDONLY;
    DMCOW_RETURN_IF_ERROR(SafeOpen(open_path, access, role, referrer, policy, &f.fd, &f.st));
    if (depth == 0 && policy.real_image_name) {
      name = OpenFileName(f.fd.get());
      if (name.empty() && path[0] == '/') name = path;
      if (name.empty()) {
        char cwd[PATH_MAX];
        name = ::getcwd(cwd, sizeof(cwd)) ? std::string(cwd) + "/" + path : path;
      }
      f.name = name;
    }
    // A loop, found by what the file is (as the engine finds it).
    for (const ChainFile& above : *out) {
      if (above.st.st_dev != f.st.st_dev || above.st.st_ino != f.st.st_ino) continue;
      std::string msg = referrer + ": backing file '" + name + "' creates an infinite loop";
      if (above.name != name) msg += " (it is " + above.name + ", already in the backing chain)";
      return Status::Corrupt(msg);
    }
    // The engine reads this layer's header through the descriptor. A data
    // file it names is opened the same way, once (open_data_files), or only
    // looked at (type first) for the refusal.
    FdEnv env;
    UniqueFd dup(::fcntl(f.fd.get(), F_DUPFD_CLOEXEC, 3));
    if (dup.get() < 0) return OpenError(name, role, referrer, errno);
    env.Add(name, std::move(dup));
    env.set_fallback([&](const std::string& data, dmcow::OpenMode mode, std::unique_ptr<dmcow::File>* file) {
      struct stat st;
      if (!policy.open_data_files || !f.data_file_name.empty()) {
        UniqueFd handle;
        DMCOW_RETURN_IF_ERROR(LookAt(data, Role::kDataFile, name, policy, &handle, &st));
        return Status::NotSupported(name + ": external data files are not supported by " + policy.server +
                                    " (data file '" + data + "')");
      }
      DMCOW_RETURN_IF_ERROR(SafeOpen(data, access, Role::kDataFile, name, policy, &f.data_fd, &st));
      f.data_file_name = data;
      FdEnv one;
      one.Add(data, UniqueFd(::fcntl(f.data_fd.get(), F_DUPFD_CLOEXEC, 3)));
      return one.OpenFile(data, mode, file);
    });
    dmcow::OpenOptions o;
    o.format = hint;
    o.open_backing = false;
    o.allow_missing_keys = true;  // only the header's names are read here
    o.env = &env;
    std::unique_ptr<dmcow::Image> image;
    DMCOW_RETURN_IF_ERROR(dmcow::OpenImage(name, o, &image));
    const dmcow::ImageInfo& info = image->info();
    f.format = info.format;
    f.encryption = info.encryption.format;
    out->push_back(std::move(f));
    if (!policy.follow_backing || info.backing_filename.empty()) break;
    if (info.backing_filename.rfind("json:", 0) == 0) {
      return Status::NotSupported(name + ": backing file name '" + info.backing_filename +
                                  "' uses a json: pseudo-protocol, which is not supported");
    }
    const std::string& bf = info.backing_format;
    if (!bf.empty() && bf != "raw" && bf != "qcow2" && bf != "qcow") {
      return Status::NotSupported(name + ": backing format '" + bf + "' is not supported");
    }
    referrer = name;
    name = open_path = info.full_backing_filename;
    hint = bf;
  }
  return Status::OK();
}

void FdEnv::Add(const std::string& name, UniqueFd fd) { files_[name] = std::move(fd); }

int FdEnv::Fd(const std::string& name) const {
  auto it = files_.find(name);
  return it == files_.end() ? -1 : it->second.get();
}

Status FdEnv::OpenFile(const std::string& path, dmcow::OpenMode mode, std::unique_ptr<dmcow::File>* file) {
  auto it = files_.find(path);
  if (it == files_.end()) {
    if (fallback_) return fallback_(path, mode, file);
    return Status::InvalidArgument(path +
                                   ": not one of the files opened for this image (dmcowd opens no file of "
                                   "the chain by name; dmcow-qcow attach passes them)");
  }
  if (mode == dmcow::OpenMode::kCreateTruncate) return Status::InvalidArgument(path + ": is not created here");
  const int fl = ::fcntl(it->second.get(), F_GETFL);
  if (fl < 0) return Status::IOError(path + ": descriptor: " + std::strerror(errno));
  if (mode == dmcow::OpenMode::kReadWrite && (fl & O_ACCMODE) == O_RDONLY) {
    return Status::InvalidArgument(path + ": opened read-only, cannot be written");
  }
  const int fd = ::fcntl(it->second.get(), F_DUPFD_CLOEXEC, 3);
  if (fd < 0) return Status::IOError(path + ": dup: " + std::strerror(errno));
  return dmcow::NewPosixFileFromFd(fd, path, file);
}

}  // namespace dmcowd
