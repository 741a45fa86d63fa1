// What the in-VM test programs (daemon_test.cc, qcow_test.cc) share: the
// failure type and CHECK, running programs, and the runner that prints the
// "DMCOW-TEST <name> PASS|FAIL" lines run.sh parses (each test in its own
// process, with a timeout).
#ifndef DMCOW_TESTS_VM_VM_HARNESS_H_
#define DMCOW_TESTS_VM_VM_HARNESS_H_

#include <fcntl.h>
#include <signal.h>
#include <sys/klog.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace dmcow_vm {

using Clock = std::chrono::steady_clock;

struct TestFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline std::string Fmt(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline std::string Fmt(const char* fmt, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  return buf;
}

#define CHECK(cond, ...)                                                                                               \
  do {                                                                                                                 \
    if (!(cond))                                                                                                       \
      throw dmcow_vm::TestFailure(dmcow_vm::Fmt(__VA_ARGS__) + " [line " + std::to_string(__LINE__) + ": " #cond "]"); \
  } while (0)

inline long MsSince(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t).count();
}
inline void SleepMs(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

// ---- processes ----------------------------------------------------------------

inline int Run(const std::vector<std::string>& args, std::string* out = nullptr) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC)) return -1;
  std::vector<std::string> copy = args;
  std::vector<char*> argv;
  for (auto& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(fds[1]);
  std::string text;
  char buf[4096];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof(buf))) > 0) text.append(buf, n);
  close(fds[0]);
  int st = 0;
  waitpid(pid, &st, 0);
  if (out) *out = text;
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

inline std::string ReadText(const std::string& path) {
  std::string text;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return text;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) text.append(buf, n);
  close(fd);
  return text;
}

// The kernel log (dmesg) as text.
inline std::string KernelLog() {
  std::vector<char> buf(1 << 20);
  int n = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, buf.data(), static_cast<int>(buf.size()));
  return n > 0 ? std::string(buf.data(), n) : std::string();
}

inline std::string Tail(const std::string& s, size_t n = 600) { return s.size() > n ? s.substr(s.size() - n) : s; }

inline void WriteText(const std::string& path, const std::string& text) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  CHECK(fd >= 0, "create %s", path.c_str());
  CHECK(write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()), "write %s", path.c_str());
  close(fd);
}

inline void Must(const std::vector<std::string>& args) {
  std::string out;
  int st = Run(args, &out);
  std::string cmd;
  for (auto& a : args) cmd += a + " ";
  CHECK(st == 0, "%s: exit %d: %s", cmd.c_str(), st, Tail(out).c_str());
}

struct TestCase {
  const char* name;
  void (*fn)();
};

inline int RunOne(const TestCase& t, int timeout_s) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC)) return 1;
  auto t0 = Clock::now();
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    std::string result;
    try {
      t.fn();
      result = "PASS";
    } catch (const std::exception& e) {
      result = std::string("FAIL ") + e.what();
    }
    (void)!write(fds[1], result.data(), result.size());
    _exit(0);
  }
  close(fds[1]);
  std::string result;
  bool timed_out = false, unkillable = false;
  for (;;) {
    int st;
    if (waitpid(pid, &st, WNOHANG) == pid) break;
    if (MsSince(t0) > timeout_s * 1000L) {
      kill(pid, SIGKILL);
      // A thread waiting on held I/O cannot die: say so and go on with
      // the next test rather than wait with it.
      const auto killed = Clock::now();
      while (waitpid(pid, nullptr, WNOHANG) != pid && !(unkillable = MsSince(killed) > 10000)) SleepMs(20);
      timed_out = true;
      break;
    }
    SleepMs(20);
  }
  if (!timed_out) {
    char buf[4096];
    ssize_t n;
    while ((n = read(fds[0], buf, sizeof(buf))) > 0) result.append(buf, n);
  }
  close(fds[0]);
  if (timed_out)
    result = Fmt("FAIL timed out after %d s%s", timeout_s,
                 unkillable ? "; its process cannot die (I/O held in the kernel)" : "");
  else if (result.empty())
    result = "FAIL test process died";
  for (char& c : result)
    if (c == '\n') c = ' ';
  std::printf("DMCOW-TEST %s %s (%ld ms)\n", t.name, result.c_str(), MsSince(t0));
  std::fflush(stdout);
  return result.rfind("PASS", 0) == 0 ? 0 : 1;
}

// `timeout_env` names the variable that overrides `default_timeout_s`, the
// limit per test.
inline int TestMain(int argc, char** argv, const char* program, const TestCase* tests, size_t n,
                    const char* timeout_env, int default_timeout_s) {
  std::string cmd = argc > 1 ? argv[1] : "run";
  if (cmd == "list") {
    for (size_t i = 0; i < n; i++) std::printf("%s\n", tests[i].name);
    return 0;
  }
  if (cmd != "run") {
    std::fprintf(stderr, "usage: %s list | run [name...]\n", program);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  int timeout_s = default_timeout_s;
  if (const char* e = getenv(timeout_env)) timeout_s = atoi(e);
  int failed = 0;
  for (size_t t = 0; t < n; t++) {
    bool selected = argc <= 2;
    for (int i = 2; i < argc; i++) selected |= !strcmp(argv[i], tests[t].name);
    if (selected) failed += RunOne(tests[t], timeout_s);
  }
  return failed ? 1 : 0;
}

// A page-aligned buffer for O_DIRECT.
class Buf {
 public:
  explicit Buf(size_t bytes) : bytes_(bytes) {
    if (posix_memalign(&p_, 4096, bytes)) throw TestFailure("posix_memalign");
  }
  ~Buf() { free(p_); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  uint64_t* words() { return static_cast<uint64_t*>(p_); }
  uint8_t* bytes() { return static_cast<uint8_t*>(p_); }
  void* data() { return p_; }
  size_t size() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_;
};

}  // namespace dmcow_vm

#endif  // DMCOW_TESTS_VM_VM_HARNESS_H_
