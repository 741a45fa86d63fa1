#include "attach_levels.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "dm.h"

namespace dmcowd {

bool StartDaemon(const std::vector<std::string>& args, const std::vector<int>& fds, pid_t* pid, std::string* error) {
  int ready[2], err[2];
  if (::pipe2(ready, O_CLOEXEC) != 0 || ::pipe2(err, O_CLOEXEC) != 0) {
    *error = std::string("pipe: ") + std::strerror(errno);
    return false;
  }
  const pid_t child = ::fork();
  if (child < 0) {
    *error = std::string("fork: ") + std::strerror(errno);
    return false;
  }
  if (child == 0) {
    ::setsid();
    const int null_fd = ::open("/dev/null", O_RDWR);
    ::dup2(null_fd, 0);
    ::dup2(null_fd, 1);
    if (!std::getenv("DMCOW_QCOW_DAEMON_STDERR")) ::dup2(err[1], 2);
    // Out of the way first (a source may sit where another goes), then into
    // place: dup2 clears O_CLOEXEC on the copy; everything else closes at exec.
    const int past = static_cast<int>(4 + fds.size());  // above every target
    std::vector<int> from = {::fcntl(ready[1], F_DUPFD_CLOEXEC, past)};
    for (int fd : fds) from.push_back(::fcntl(fd, F_DUPFD_CLOEXEC, past));
    for (size_t i = 0; i < from.size(); i++) {
      if (from[i] < 0 || ::dup2(from[i], static_cast<int>(3 + i)) < 0) {
        std::fprintf(stderr, "cannot pass descriptors to dmcowd: %s\n", std::strerror(errno));
        ::_exit(126);
      }
    }
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execvp(argv[0], argv.data());
    std::fprintf(stderr, "cannot run %s: %s\n", argv[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(ready[1]);
  ::close(err[1]);
  std::string said, out;
  bool ok = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (bool ready_open = true, err_open = true; ready_open || err_open;) {
    pollfd p[2] = {{ready_open ? ready[0] : -1, POLLIN, 0}, {err_open ? err[0] : -1, POLLIN, 0}};
    const int left = static_cast<int>(
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count());
    if (left <= 0 || ::poll(p, 2, left) <= 0) {
      if (errno == EINTR) continue;
      said += "(no answer within 60 s)";
      ::kill(child, SIGKILL);
      break;
    }
    char buf[4096];
    if (p[0].revents) {
      const ssize_t n = ::read(ready[0], buf, sizeof(buf));
      if (n > 0) out.append(buf, std::min<size_t>(static_cast<size_t>(n), 256 - std::min<size_t>(out.size(), 256)));
      // "ready\n", or "ready udev-cookie=N\n" where udev runs.
      if (out.rfind("ready", 0) == 0 && out.find('\n') != std::string::npos) {
        ok = true;
        break;
      }
      if (n <= 0) ready_open = false;
    }
    if (p[1].revents) {
      const ssize_t n = ::read(err[0], buf, sizeof(buf));
      if (n > 0)
        said.append(buf, std::min<size_t>(static_cast<size_t>(n), 65536 - std::min<size_t>(said.size(), 65536)));
      if (n <= 0) err_open = false;
    }
  }
  ::close(ready[0]);
  ::close(err[0]);  // the daemon switches to syslog once ready
  if (!ok) {
    int status = 0;
    ::waitpid(child, &status, 0);
    *error = said.empty() ? "dmcowd exited before the device was ready" : said;
    while (!error->empty() && error->back() == '\n') error->pop_back();
    return false;
  }
  *pid = child;
  // The daemon serves now: udev's rules can read the device.
  unsigned long cookie = 0;
  if (std::sscanf(out.c_str(), "ready udev-cookie=%lu", &cookie) == 1 && cookie <= UINT32_MAX) {
    dm::InitSyncedWithUdev();
    dm::WaitForUdev(static_cast<uint32_t>(cookie));
  }
  return true;
}

namespace {

// Removes what a dead daemon left of its level: the devices themselves
// (loops go with them).
bool RemoveDeadLevel(const std::string& name, std::string* error) {
  for (const std::string& n : {name, name + "-store", name + "-base"}) {
    bool busy = false;
    if (!dmcowd::dm::Exists(n)) continue;
    dmcow::Status s = dmcowd::dm::Remove(n, &busy);
    if (!s.ok()) {
      *error = busy ? "/dev/mapper/" + n + " (its daemon died) is in use; close it first" : s.ToString();
      return false;
    }
  }
  return true;
}

}  // namespace

bool StopLevels(const std::vector<Level>& levels, std::string* error) {
  // Confirm every level before stopping any: a half-stopped chain helps nobody.
  for (const Level& level : levels) {
    if (State(level.daemon) != DaemonState::kUnconfirmed) continue;
    const std::string pid = std::to_string(level.daemon.pid);
    *error = "/dev/mapper/" + level.name + ": process " + pid +
             " is running, but the state file (from an older dmcow-qcow) does not record which process its "
             "daemon was, so it was not signalled; if " +
             pid + " is the daemon (see /proc/" + pid + "/cmdline), stop it (kill " + pid + ") and run detach again";
    return false;
  }
  for (const Level& level : levels) {
    const std::string dev = "/dev/mapper/" + level.name;
    if (State(level.daemon) != DaemonState::kRunning) {
      // Its daemon died (killed), whatever process has its pid now: the
      // kernel fails the device's I/O; nothing is signalled.
      if (!RemoveDeadLevel(level.name, error)) return false;
      continue;
    }
    // An open or mounted device cannot be removed: say so instead of waiting.
    const int fd = ::open(dev.c_str(), O_RDONLY | O_EXCL | O_CLOEXEC);
    if (fd < 0 && errno == EBUSY) {
      *error = dev + " is in use (mounted or open); unmount or close it first";
      return false;
    }
    if (fd >= 0) ::close(fd);
    // Confirmed again right before the signal: the daemon may have died
    // since the check above, and its pid been reused.
    if (State(level.daemon) != DaemonState::kRunning) {
      if (!RemoveDeadLevel(level.name, error)) return false;
      continue;
    }
    ::kill(level.daemon.pid, SIGTERM);
    if (!WaitGone(level.daemon, 120)) {
      *error = "dmcowd " + std::to_string(level.daemon.pid) + " serving " + dev + " did not stop";
      return false;
    }
  }
  return true;
}

}  // namespace dmcowd
