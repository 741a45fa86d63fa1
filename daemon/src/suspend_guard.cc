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

// A request with no payload for /dev/mapper/`name` (DM_DEV_STATUS, and
// DM_DEV_SUSPEND without DM_SUSPEND_FLAG, which resumes).
dm_ioctl Request(const std::string& name) {
  dm_ioctl io;
  std::memset(&io, 0, sizeof(io));
  io.version[0] = DM_VERSION_MAJOR;
  io.data_size = sizeof(io);
  io.data_start = sizeof(io);
  std::memcpy(io.name, name.data(), std::min(name.size(), sizeof(io.name) - 1));
  return io;
}

void Say(const char* text, size_t len) {
  const int fd = ::open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return;
  ssize_t ignored = ::write(fd, text, len);
  (void)ignored;
  ::close(fd);
}

// The guard's whole life; only async-signal-safe calls.
[[noreturn]] void Guard(const dm_ioctl& status, uint64_t dev, const dm_ioctl& resume, const char* resumed,
                        size_t resumed_len, const char* failed, size_t failed_len) {
  ::prctl(PR_SET_NAME, "dmcowd-guard", 0, 0, 0);
  struct sigaction ignore;
  std::memset(&ignore, 0, sizeof(ignore));
  ignore.sa_handler = SIG_IGN;
  // It lives exactly as long as dmcowd: a terminal's ^C or systemd's
  // SIGTERM stops dmcowd, whose exit ends the guard.
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGPIPE}) ::sigaction(sig, &ignore, nullptr);
  char byte;
  while (::read(kAliveFd, &byte, 1) < 0 && errno == EINTR) {
  }
  const int ctl = ::open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
  if (ctl < 0) ::_exit(1);
  dm_ioctl io = status;
  if (::ioctl(ctl, DM_DEV_STATUS, &io) != 0) ::_exit(0);           // removed: nothing to do
  if (io.dev != dev || !(io.flags & DM_SUSPEND_FLAG)) ::_exit(0);  // another device by now, or running
  io = resume;
  if (::ioctl(ctl, DM_DEV_SUSPEND, &io) != 0) {
    Say(failed, failed_len);
    ::_exit(1);
  }
  Say(resumed, resumed_len);
  ::_exit(0);
}

}  // namespace

Status SuspendGuard::Start(const std::string& name, uint16_t udev_flags) {
  const std::string where = "/dev/mapper/" + name;
  // A request names the device by name alone (the kernel refuses a name
  // and a number together); the answer's number tells it apart from a
  // later device of the same name.
  const dm_ioctl status = Request(name);
  uint64_t dev;
  {
    dm_ioctl io = status;
    const int ctl = ::open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
    if (ctl < 0) return Status::IOError("/dev/mapper/control: " + std::string(std::strerror(errno)));
    const int r = ::ioctl(ctl, DM_DEV_STATUS, &io);
    const int e = errno;
    ::close(ctl);
    if (r != 0) return Status::IOError(where + ": status for its suspend guard: " + std::strerror(e));
    dev = io.dev;
  }
  dm_ioctl resume = Request(name);
  resume.event_nr = static_cast<uint32_t>(udev_flags | DM_UDEV_PRIMARY_SOURCE_FLAG) << DM_UDEV_FLAGS_SHIFT;
  char resumed[512], failed[512];
  const pid_t self = ::getpid();
  const int resumed_len = std::snprintf(resumed, sizeof(resumed),
                                        "<4>dmcowd-guard: dmcowd (pid %d) ended with %s suspended: resumed it, "
                                        "so that I/O held for the daemon fails instead of waiting\n",
                                        static_cast<int>(self), where.c_str());
  const int failed_len = std::snprintf(failed, sizeof(failed),
                                       "<3>dmcowd-guard: dmcowd (pid %d) ended with %s suspended and it could not "
                                       "be resumed: its I/O waits until `dmsetup resume %s` or `dmsetup remove -f`\n",
                                       static_cast<int>(self), where.c_str(), name.c_str());
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
    // launcher's pipes), only the pipe's read end.
    if (::dup2(alive[0], kAliveFd) < 0) ::_exit(1);
    ::close_range(0, kAliveFd - 1, 0);
    ::close_range(kAliveFd + 1, ~0U, 0);
    auto fit = [](int len, size_t size) { return std::min(static_cast<size_t>(std::max(len, 0)), size - 1); };
    Guard(status, dev, resume, resumed, fit(resumed_len, sizeof(resumed)), failed, fit(failed_len, sizeof(failed)));
  }
  ::close(alive[0]);
  alive_fd_ = alive[1];
  pid_ = pid;
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
