#include "suspend_guard.h"

#include <fcntl.h>
#include <linux/dm-ioctl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include <libdevmapper.h>  // DM_UDEV_* flags and their place in event_nr

namespace dmcowd {

namespace {

constexpr int kAliveFd = 3;  // where the guard keeps its end of the pipe

// A request with no payload for our device (DM_DEV_STATUS, and
// DM_DEV_SUSPEND without DM_SUSPEND_FLAG, which resumes). By uuid where it
// has one (unique, unlike a name, which a new device may take); the kernel
// refuses a name and a uuid together.
dm_ioctl Request(const std::string& name, const std::string& uuid) {
  dm_ioctl io;
  std::memset(&io, 0, sizeof(io));
  io.version[0] = DM_VERSION_MAJOR;
  io.data_size = sizeof(io);
  io.data_start = sizeof(io);
  if (uuid.empty()) {
    std::memcpy(io.name, name.data(), std::min(name.size(), sizeof(io.name) - 1));
  } else {
    std::memcpy(io.uuid, uuid.data(), std::min(uuid.size(), sizeof(io.uuid) - 1));
  }
  return io;
}

void Say(const char* text, size_t len) {
  const int fd = ::open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return;
  ssize_t ignored = ::write(fd, text, len);
  (void)ignored;
  ::close(fd);
}

// Reads exactly `len` bytes; false at EOF or an error.
bool ReadAll(int fd, void* buf, size_t len) {
  for (size_t got = 0; got < len;) {
    const ssize_t n = ::read(fd, static_cast<char*>(buf) + got, len - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    got += static_cast<size_t>(n);
  }
  return true;
}

struct GuardText {
  char resumed[512], failed[512];
  size_t resumed_len, failed_len;
};

// The guard's whole life; only async-signal-safe calls.
[[noreturn]] void Guard(const dm_ioctl& status, const dm_ioctl& resume, const GuardText& text) {
  ::prctl(PR_SET_NAME, "dmcowd-guard", 0, 0, 0);
  struct sigaction ignore;
  std::memset(&ignore, 0, sizeof(ignore));
  ignore.sa_handler = SIG_IGN;
  // It lives exactly as long as dmcowd: a terminal's ^C or systemd's
  // SIGTERM stops dmcowd, whose exit ends the guard.
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGPIPE}) ::sigaction(sig, &ignore, nullptr);
  // The OOM killer, which may take dmcowd, is what it is there for.
  const int oom = ::open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
  if (oom >= 0) {
    ssize_t ignored = ::write(oom, "-1000", 5);
    (void)ignored;
    ::close(oom);
  }
  uint64_t dev;
  if (!ReadAll(kAliveFd, &dev, sizeof(dev))) ::_exit(0);  // gone before its device was made
  for (;;) {                                              // until the pipe closes
    char byte;
    const ssize_t n = ::read(kAliveFd, &byte, 1);
    if (n == 0 || (n < 0 && errno != EINTR)) break;
  }
  const int ctl = ::open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
  if (ctl < 0) ::_exit(1);
  dm_ioctl io = status;
  if (::ioctl(ctl, DM_DEV_STATUS, &io) != 0) ::_exit(0);           // removed: nothing to do
  if (io.dev != dev || !(io.flags & DM_SUSPEND_FLAG)) ::_exit(0);  // another device by now, or running
  io = resume;
  if (::ioctl(ctl, DM_DEV_SUSPEND, &io) != 0) {
    if (errno == ENXIO) ::_exit(0);  // removed meanwhile (detach of a dead daemon's levels)
    Say(text.failed, text.failed_len);
    ::_exit(1);
  }
  Say(text.resumed, text.resumed_len);
  ::_exit(0);
}

}  // namespace

Status SuspendGuard::Start(const std::string& name, const std::string& uuid, uint16_t udev_flags) {
  name_ = name;
  uuid_ = uuid;
  const std::string where = "/dev/mapper/" + name;
  const dm_ioctl status = Request(name, uuid);
  dm_ioctl resume = Request(name, uuid);
  resume.event_nr = static_cast<uint32_t>(udev_flags | DM_UDEV_PRIMARY_SOURCE_FLAG) << DM_UDEV_FLAGS_SHIFT;
  GuardText text;
  const int self = static_cast<int>(::getpid());
  const int resumed_len = std::snprintf(text.resumed, sizeof(text.resumed),
                                        "<4>dmcowd-guard: dmcowd (pid %d) ended with %s suspended: resumed it, "
                                        "so that I/O held for the daemon fails instead of waiting\n",
                                        self, where.c_str());
  const int failed_len = std::snprintf(text.failed, sizeof(text.failed),
                                       "<3>dmcowd-guard: dmcowd (pid %d) ended with %s suspended and it could not "
                                       "be resumed: its I/O waits until `dmsetup resume %s` or `dmsetup remove -f`\n",
                                       self, where.c_str(), name.c_str());
  text.resumed_len = std::min(static_cast<size_t>(std::max(resumed_len, 0)), sizeof(text.resumed) - 1);
  text.failed_len = std::min(static_cast<size_t>(std::max(failed_len, 0)), sizeof(text.failed) - 1);
  int alive[2];
  if (::pipe2(alive, O_CLOEXEC) != 0) return Status::IOError(where + ": suspend guard: pipe: " + std::strerror(errno));
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int e = errno;
    ::close(alive[0]);
    ::close(alive[1]);
    return Status::IOError(where + ": suspend guard: fork: " + std::strerror(e));
  }
  if (pid == 0) {
    // Nothing of ours stays open in the guard (image locks, loops, the
    // launcher's pipes), only the pipe's read end; its write end above all,
    // or the guard would never see the pipe close.
    if (alive[1] != kAliveFd) ::close(alive[1]);
    if (::dup2(alive[0], kAliveFd) < 0) ::_exit(1);
    ::close_range(0, kAliveFd - 1, 0);
    ::close_range(kAliveFd + 1, ~0U, 0);
    Guard(status, resume, text);
  }
  ::close(alive[0]);
  alive_fd_ = alive[1];
  pid_ = pid;
  return Status::OK();
}

Status SuspendGuard::Watch() {
  const std::string where = "/dev/mapper/" + name_;
  if (pid_ < 0) return Status::IOError(where + ": suspend guard not started");
  dm_ioctl io = Request(name_, uuid_);
  const int ctl = ::open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
  if (ctl < 0) return Status::IOError("/dev/mapper/control: " + std::string(std::strerror(errno)));
  const int r = ::ioctl(ctl, DM_DEV_STATUS, &io);
  const int e = errno;
  ::close(ctl);
  if (r != 0) return Status::IOError(where + ": status for its suspend guard: " + std::strerror(e));
  const uint64_t dev = io.dev;  // tells our device from a later one of the same name
  if (::write(alive_fd_, &dev, sizeof(dev)) != static_cast<ssize_t>(sizeof(dev))) {
    return Status::IOError(where + ": suspend guard: " + std::strerror(errno));
  }
  return Status::OK();
}

void SuspendGuard::Stop() {
  if (pid_ < 0) return;
  ::close(alive_fd_);
  alive_fd_ = -1;
  while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
  }
  pid_ = -1;
}

}  // namespace dmcowd
