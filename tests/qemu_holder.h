// QemuHolder: a real qemu-io holding an image open (writable, -r, or
// -r -U) while a test runs, and the lock bytes /proc/locks shows on a file.
// Shared by image_lock_test and lock_cli_test.
#ifndef DMCOW_TESTS_QEMU_HOLDER_H_
#define DMCOW_TESTS_QEMU_HOLDER_H_

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>

#include "dmcow/image_lock.h"
#include "test_util.h"

namespace dmcow_test {

// qemu-io's options for an open in `mode`.
inline std::string QemuIoFlags(dmcow::ImageLock::Mode mode) {
  switch (mode) {
    case dmcow::ImageLock::Mode::kReadWrite: return "";
    case dmcow::ImageLock::Mode::kReadOnly: return "-r";
    case dmcow::ImageLock::Mode::kReadOnlyShared: return "-r -U";
  }
  return "?";
}

// The lock bytes /proc/locks shows on `path`'s inode, from every process.
inline std::set<int> HeldBytes(const std::string& path) {
  std::set<int> bytes;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return bytes;
  char id[64];
  std::snprintf(id, sizeof(id), "%02x:%02x:%lu", major(st.st_dev), minor(st.st_dev),
                static_cast<unsigned long>(st.st_ino));
  std::ifstream in("/proc/locks");
  std::string line;
  while (std::getline(in, line)) {
    // "1: OFDLCK ADVISORY  READ -1 fe:00:10985668 100 101"; "->" lines are waiters.
    std::istringstream f(line);
    std::string num, kind, adv, access, pid, dev_ino, start, end;
    if (!(f >> num >> kind) || kind == "->") continue;
    if (!(f >> adv >> access >> pid >> dev_ino >> start >> end) || dev_ino != id) continue;
    long first = std::stol(start);
    long last = end == "EOF" ? first + 1000 : std::stol(end);
    for (long b = first; b <= last && b < first + 1000; ++b) bytes.insert(static_cast<int>(b));
  }
  return bytes;
}

inline std::string Show(const std::set<int>& bytes) {
  std::string s;
  for (int b : bytes) s += (s.empty() ? "" : " ") + std::to_string(b);
  return "{" + s + "}";
}

// qemu-io holding `image` open until destroyed: interactive, stdin a pipe we
// keep open. The destructor kills it, whatever happened in the test; and it
// dies with us (PR_SET_PDEATHSIG) if we crash.
class QemuHolder {
 public:
  QemuHolder(const std::string& image, dmcow::ImageLock::Mode mode, const std::string& log) {
    int fds[2];
    REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
    std::string cmd = "exec qemu-io -f qcow2 " + QemuIoFlags(mode) + " '" + image + "' >'" + log + "' 2>&1";
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      ::dup2(fds[0], 0);  // dup2 clears O_CLOEXEC on fd 0
      ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    ::close(fds[0]);
    stdin_ = fds[1];
    // Ready once its locks stop changing (it takes them one byte at a time).
    std::set<int> last;
    int stable = 0;
    bool exited = pid_ < 0;
    for (int i = 0; i < 400 && stable < 6 && !exited; ++i) {  // at most 20 s
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      exited = ::waitpid(pid_, nullptr, WNOHANG) == pid_;
      std::set<int> now = HeldBytes(image);
      stable = (!now.empty() && now == last) ? stable + 1 : 0;
      last = now;
    }
    bytes_ = last;
    if (exited) pid_ = -1;
    if (stable < 6) {
      Stop();  // a throwing constructor runs no destructor
      FAIL("qemu-io " << QemuIoFlags(mode) << (exited ? " exited early: " : " never settled its locks: ")
                      << ReadText(log));
    }
  }
  ~QemuHolder() { Stop(); }
  QemuHolder(const QemuHolder&) = delete;
  QemuHolder& operator=(const QemuHolder&) = delete;

  const std::set<int>& bytes() const { return bytes_; }

 private:
  void Stop() {
    if (stdin_ >= 0) ::close(stdin_);
    stdin_ = -1;
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    pid_ = -1;
  }
  pid_t pid_ = -1;
  int stdin_ = -1;
  std::set<int> bytes_;
};

}  // namespace dmcow_test

#endif  // DMCOW_TESTS_QEMU_HOLDER_H_
