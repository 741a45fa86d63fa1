#include "attach_keys.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "sys_error.h"

namespace dmcowd {

Status ReadPassphrase(int fd, const std::string& what, std::string* out) {
  ReservePassphrase(out);
  char buf[4096];
  Status s;
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      s = Errno(what, errno);
      break;
    }
    if (n == 0) break;
    if (out->size() + static_cast<size_t>(n) > kMaxPassphrase) {
      s = Status::InvalidArgument(what + ": longer than " + std::to_string(kMaxPassphrase) + " bytes");
      break;
    }
    out->append(buf, static_cast<size_t>(n));
  }
  ::explicit_bzero(buf, sizeof(buf));
  return s;
}

void ReservePassphrase(std::string* s) {
  s->reserve(kMaxPassphrase + 1);
  (void)::mlock(s->data(), s->capacity());  // best effort: RLIMIT_MEMLOCK may refuse
}

void WipePassphrase(std::string* s) {
  ::explicit_bzero(s->data(), s->capacity());
  s->clear();
}

KeySet::~KeySet() {
  for (auto& [depth, key] : keys_) WipePassphrase(&key);
}

Status KeySet::AddKeyFile(const std::string& arg) {
  size_t depth = 0;
  std::string path = arg;
  const size_t eq = arg.find('=');
  if (eq != std::string::npos && eq > 0 && eq <= 2 && arg.find_first_not_of("0123456789") == eq) {
    depth = std::stoul(arg.substr(0, eq));
    path = arg.substr(eq + 1);
    if (depth == 0) return Status::InvalidArgument("--key-file " + arg + ": N=FILE is for backing files, N from 1");
  }
  if (path.empty()) return Status::InvalidArgument("--key-file " + arg + ": no file named");
  if (Has(depth)) return Status::InvalidArgument("--key-file " + arg + ": a second key for the same image");
  const bool stdin_key = path == "-";
  // O_NONBLOCK: a FIFO with no writer must not hang the open.
  UniqueFd fd(stdin_key ? ::fcntl(0, F_DUPFD_CLOEXEC, 3)
                        : ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
  if (fd.get() < 0) return Errno("--key-file " + path, errno);
  struct stat st;
  if (!stdin_key) {
    if (::fstat(fd.get(), &st) != 0) return Errno("--key-file " + path, errno);
    if (!S_ISREG(st.st_mode)) return Status::InvalidArgument("--key-file " + path + ": not a regular file");
  }
  std::string key;
  Status s = ReadPassphrase(fd.get(), "--key-file " + path, &key);
  if (s.ok() && key.empty()) s = Status::InvalidArgument("--key-file " + path + ": empty");
  if (!s.ok()) {
    WipePassphrase(&key);
    return s;
  }
  keys_[depth] = std::move(key);  // moved: the buffer itself, no copy
  return Status::OK();
}

Status KeySet::Prompt(size_t depth, const std::string& image) {
  if (!::isatty(0)) return Status::NotFound("no terminal to ask on");
  termios saved;
  if (::tcgetattr(0, &saved) != 0) return Errno("terminal", errno);
  termios quiet = saved;
  quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
  quiet.c_lflag |= ECHONL;
  std::fprintf(stderr, "Enter passphrase for %s: ", image.c_str());
  std::fflush(stderr);
  if (::tcsetattr(0, TCSAFLUSH, &quiet) != 0) return Errno("terminal", errno);
  std::string key;
  ReservePassphrase(&key);
  Status s;
  for (char c;;) {
    const ssize_t n = ::read(0, &c, 1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) s = Errno("reading the passphrase", errno);
    if (n <= 0 || c == '\n') break;
    if (key.size() == kMaxPassphrase) {
      s = Status::InvalidArgument("passphrase longer than " + std::to_string(kMaxPassphrase) + " bytes");
      break;
    }
    key.push_back(c);
  }
  ::tcsetattr(0, TCSAFLUSH, &saved);
  if (s.ok() && key.empty()) s = Status::InvalidArgument(image + ": an empty passphrase");
  if (!s.ok()) {
    WipePassphrase(&key);
    return s;
  }
  keys_[depth] = std::move(key);
  return Status::OK();
}

Status KeySet::SecretFd(size_t depth, UniqueFd* out) const {
  const std::string& key = keys_.at(depth);
  UniqueFd fd(::memfd_create("dmcow-secret", MFD_CLOEXEC));
  if (fd.get() < 0) return Errno("memfd for a passphrase", errno);
  for (size_t done = 0; done < key.size();) {
    const ssize_t n = ::write(fd.get(), key.data() + done, key.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return Errno("memfd for a passphrase", n < 0 ? errno : EIO);
    done += static_cast<size_t>(n);
  }
  if (::lseek(fd.get(), 0, SEEK_SET) != 0) return Errno("memfd for a passphrase", errno);
  *out = std::move(fd);
  return Status::OK();
}

}  // namespace dmcowd
