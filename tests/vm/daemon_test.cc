// dmcowd in the test VM (tests/vm/run.sh): the real daemon (/bin/dmcowd)
// serving real dm-cow devices over files on tmpfs.
//
//   daemontest list            names of all tests
//   daemontest run [name...]   run tests, printing "DMCOW-TEST <name> PASS|FAIL"
//
// Data checks compare the whole device with a model: base pattern or the
// tag last written. The base file is checked against its pattern too: it is
// never written.

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "vm_harness.h"

namespace {

using namespace dmcow_vm;

constexpr uint64_t kSector = 512;
constexpr unsigned kWords = kSector / 8;
const char* const kDmsetup = "/sbin/dmsetup";
const char* const kDmcowd = "/bin/dmcowd";

uint64_t BaseWord(uint64_t sector, unsigned w) { return 0xBA5E000000000000ULL | (sector << 8) | w; }
uint64_t TagWord(uint32_t tag, uint64_t sector, unsigned w) {
  return 0x5700000000000000ULL | (static_cast<uint64_t>(tag & 0xffff) << 40) | (sector << 8) | w;
}

// ---- processes ----------------------------------------------------------------

// ---- a dmcowd process ---------------------------------------------------------

class Daemon {
 public:
  Daemon(std::string name, std::vector<std::string> args) : name_(std::move(name)), args_(std::move(args)) {
    log_ = "/tmp/dmcowd-" + name_ + ".log";
  }
  ~Daemon() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  void Start() {
    std::vector<std::string> argv = {kDmcowd, "--name", name_};
    argv.insert(argv.end(), args_.begin(), args_.end());
    std::vector<char*> cargv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    pid_ = fork();
    if (pid_ == 0) {
      int fd = open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      dup2(fd, 2);
      dup2(fd, 1);
      execv(cargv[0], cargv.data());
      _exit(127);
    }
    CHECK(pid_ > 0, "fork");
    // Ready once the kernel reports a daemon that completed the handshake
    // and the node exists.
    auto t0 = Clock::now();
    for (;;) {
      int st;
      if (waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        CHECK(false, "dmcowd exited at start (%d): %s", st, Tail(ReadText(log_)).c_str());
      }
      std::string out;
      if (access(("/dev/mapper/" + name_).c_str(), F_OK) == 0 && Run({kDmsetup, "status", name_}, &out) == 0 &&
          out.find(" ready") != std::string::npos)
        break;
      CHECK(MsSince(t0) < 20000, "dmcowd not ready after 20 s: %s", Tail(ReadText(log_)).c_str());
      SleepMs(20);
    }
  }

  // SIGTERM and wait; returns the exit status.
  int Stop(int timeout_ms = 20000) {
    CHECK(pid_ > 0, "dmcowd not running");
    kill(pid_, SIGTERM);
    return Wait(timeout_ms);
  }
  void Kill() {
    kill(pid_, SIGKILL);
    Wait(5000);
  }
  int Wait(int timeout_ms) {
    auto t0 = Clock::now();
    int st = 0;
    while (waitpid(pid_, &st, WNOHANG) != pid_) {
      CHECK(MsSince(t0) < timeout_ms, "dmcowd did not exit: %s", Tail(ReadText(log_)).c_str());
      SleepMs(20);
    }
    pid_ = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }
  pid_t pid() const { return pid_; }
  std::string Log() const { return ReadText(log_); }

 private:
  std::string name_;
  std::vector<std::string> args_;
  std::string log_;
  pid_t pid_ = -1;
};

// ---- device and model -----------------------------------------------------------

void WriteBaseFile(const std::string& path, uint64_t sectors) {
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  CHECK(fd >= 0, "create %s: %s", path.c_str(), strerror(errno));
  std::vector<uint64_t> buf(256 * kWords);
  for (uint64_t s = 0; s < sectors; s += 256) {
    const uint64_t n = std::min<uint64_t>(256, sectors - s);
    for (uint64_t i = 0; i < n * kWords; i++) buf[i] = BaseWord(s + i / kWords, i % kWords);
    CHECK(write(fd, buf.data(), n * kSector) == static_cast<ssize_t>(n * kSector), "write %s", path.c_str());
  }
  close(fd);
}

void CheckBaseFile(const std::string& path, uint64_t sectors) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  CHECK(fd >= 0, "open %s", path.c_str());
  std::vector<uint64_t> buf(256 * kWords);
  for (uint64_t s = 0; s < sectors; s += 256) {
    const uint64_t n = std::min<uint64_t>(256, sectors - s);
    CHECK(pread(fd, buf.data(), n * kSector, s * kSector) == static_cast<ssize_t>(n * kSector), "read base");
    for (uint64_t i = 0; i < n * kWords; i++) {
      if (buf[i] != BaseWord(s + i / kWords, i % kWords)) {
        close(fd);
        CHECK(false, "base file modified at sector %llu", (unsigned long long)(s + i / kWords));
      }
    }
  }
  close(fd);
}

// What a device must hold: base pattern, or the tag last written.
struct Model {
  explicit Model(uint64_t sectors) : sectors(sectors), data(sectors * kWords) {
    for (uint64_t s = 0; s < sectors; s++)
      for (unsigned w = 0; w < kWords; w++) data[s * kWords + w] = BaseWord(s, w);
  }
  void Set(uint64_t sector, uint64_t n, uint32_t tag) {
    for (uint64_t s = sector; s < sector + n; s++)
      for (unsigned w = 0; w < kWords; w++) data[s * kWords + w] = TagWord(tag, s, w);
  }
  uint64_t sectors;
  std::vector<uint64_t> data;
};

int OpenDev(const std::string& name) {
  const std::string path = "/dev/mapper/" + name;
  int fd = open(path.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  CHECK(fd >= 0, "open %s: %s", path.c_str(), strerror(errno));
  return fd;
}

// Writes tag data; 0 or -errno. The model follows on success.
int WriteTag(int fd, Model* m, uint64_t sector, uint64_t n, uint32_t tag) {
  Buf buf(n * kSector);
  for (uint64_t s = 0; s < n; s++)
    for (unsigned w = 0; w < kWords; w++) buf.words()[s * kWords + w] = TagWord(tag, sector + s, w);
  ssize_t r = pwrite(fd, buf.data(), n * kSector, sector * kSector);
  if (r < 0) return -errno;
  if (r != static_cast<ssize_t>(n * kSector)) return -EIO;
  m->Set(sector, n, tag);
  return 0;
}

void Verify(const std::string& name, const Model& m) {
  int fd = OpenDev(name);
  const uint64_t step = 256;
  Buf buf(step * kSector);
  for (uint64_t s = 0; s < m.sectors; s += step) {
    const uint64_t n = std::min(step, m.sectors - s);
    ssize_t r = pread(fd, buf.data(), n * kSector, s * kSector);
    if (r != static_cast<ssize_t>(n * kSector)) {
      close(fd);
      CHECK(false, "%s: read sector %llu: %s", name.c_str(), (unsigned long long)s, strerror(errno));
    }
    for (uint64_t i = 0; i < n * kWords; i++) {
      if (buf.words()[i] != m.data[s * kWords + i]) {
        close(fd);
        CHECK(false, "%s: sector %llu word %llu: got %016llx want %016llx", name.c_str(),
              (unsigned long long)(s + i / kWords), (unsigned long long)(i % kWords),
              (unsigned long long)buf.words()[i], (unsigned long long)m.data[s * kWords + i]);
      }
    }
  }
  close(fd);
}

bool DeviceExists(const std::string& name) {
  std::string out;
  return Run({kDmsetup, "info", name}, &out) == 0;
}

// Loop devices still bound to `file`.
int LoopsOn(const std::string& file) {
  int n = 0;
  for (int i = 0; i < 64; i++) {
    std::string bf = ReadText(Fmt("/sys/block/loop%d/loop/backing_file", i));
    if (!bf.empty() && bf.compare(0, file.size(), file) == 0) n++;
  }
  return n;
}

// Random writes: partial and whole chunks, some crossing chunk boundaries.
void RandomWrites(int fd, Model* m, uint32_t cs, std::mt19937_64& rng, int count, uint32_t first_tag) {
  for (int i = 0; i < count; i++) {
    const uint64_t chunks = m->sectors / cs;
    uint64_t sector, n;
    switch (rng() % 3) {
      case 0:  // whole chunk
        sector = (rng() % chunks) * cs;
        n = cs;
        break;
      case 1:  // a few sectors inside a chunk
        sector = rng() % (m->sectors - 8);
        n = 1 + rng() % 8;
        break;
      default:  // across a chunk boundary
        sector = (1 + rng() % (chunks - 1)) * cs - 4;
        n = 8;
        break;
    }
    n = std::min(n, m->sectors - sector);
    int r = WriteTag(fd, m, sector, n, first_tag + i);
    CHECK(r == 0, "write at %llu: %s", (unsigned long long)sector, strerror(-r));
  }
}

// ---- tests --------------------------------------------------------------------

// Writes through the device, detach, reattach: every byte as written, the
// rest equal to base; the base file never modified; loops released.
void TestAttachReattach() {
  const std::string name = "dc-reattach", base = "/tmp/ra-base.img", cow = "/tmp/ra-cow.img";
  const uint64_t sectors = 16384 + 24;  // 8 MiB and a short last chunk
  const uint32_t cs = 128;
  WriteBaseFile(base, sectors);
  unlink(cow.c_str());
  Model m(sectors);
  std::mt19937_64 rng(7);

  Daemon d1(name, {"--chunk-size", "64K", "--reload-interval", "0", base, cow});
  d1.Start();
  int fd = OpenDev(name);
  RandomWrites(fd, &m, cs, rng, 60, 1);
  CHECK(WriteTag(fd, &m, sectors - 3, 3, 900) == 0, "write at the end");
  CHECK(fdatasync(fd) == 0, "flush: %s", strerror(errno));
  close(fd);
  Verify(name, m);
  int rc = d1.Stop();
  CHECK(rc == 0, "dmcowd exit %d: %s", rc, Tail(d1.Log()).c_str());
  CHECK(!DeviceExists(name), "device still exists after SIGTERM");
  CHECK(LoopsOn(base) == 0 && LoopsOn(cow) == 0, "loop devices left behind");
  CheckBaseFile(base, sectors);

  // Reattach (chunk size from the COW), check, write more without an
  // explicit flush: the shutdown flushes.
  Daemon d2(name, {"--reload-interval", "0", base, cow});
  d2.Start();
  Verify(name, m);
  fd = OpenDev(name);
  RandomWrites(fd, &m, cs, rng, 40, 100);
  close(fd);
  rc = d2.Stop();
  CHECK(rc == 0, "dmcowd exit %d: %s", rc, Tail(d2.Log()).c_str());

  Daemon d3(name, {"--reload-interval", "0", base, cow});
  d3.Start();
  Verify(name, m);
  CHECK(d3.Stop() == 0, "dmcowd exit");
  CheckBaseFile(base, sectors);
  CHECK(LoopsOn(base) == 0 && LoopsOn(cow) == 0, "loop devices left behind");
  unlink(cow.c_str());
  unlink(base.c_str());
}

// Lines of `dmsetup table NAME`: the number of targets.
int TableTargets(const std::string& name) {
  std::string out;
  CHECK(Run({kDmsetup, "table", name}, &out) == 0, "dmsetup table: %s", out.c_str());
  int n = 0;
  for (char c : out) n += c == '\n';
  return n;
}

// The last "reload: ..." line dmcowd logged.
std::string LastReload(const Daemon& d) {
  std::string log = d.Log();
  size_t at = log.rfind("reload: ");
  if (at == std::string::npos) return "";
  return log.substr(at, log.find('\n', at) - at);
}

// How many reloads dmcowd has logged.
int ReloadsLogged(const std::string& log) {
  int n = 0;
  for (size_t at = 0; (at = log.find("reload: ", at)) != std::string::npos; at++) n++;
  return n;
}

// Waits until dmcowd logged more than `count` reloads.
int WaitReloads(const Daemon& d, int count, int timeout_ms) {
  auto t0 = Clock::now();
  for (;;) {
    std::string log = d.Log();
    const int n = ReloadsLogged(log);
    if (n > count) return n;
    CHECK(MsSince(t0) < timeout_ms, "no reload within %d ms: %s", timeout_ms, Tail(log).c_str());
    SleepMs(50);
  }
}

// Table reloads with thousands of scattered chunks, under I/O, and bounded
// by --max-targets: the rest stays in the kernel's store. Then a reattach
// builds the same kind of table at once.
void TestReloadScattered() {
  const std::string name = "dc-reload", base = "/tmp/rl-base.img", cow = "/tmp/rl-cow.img";
  const uint32_t cs = 8;                // 4 KiB chunks
  const uint64_t sectors = 16384 * cs;  // 64 MiB
  const int max_targets = 4001;
  WriteBaseFile(base, sectors);
  unlink(cow.c_str());
  Model m(sectors);
  std::mt19937_64 rng(11);
  Daemon d(name,
           {"--chunk-size", "4K", "--reload-interval", "1", "--max-targets", std::to_string(max_targets), base, cow});
  d.Start();
  int fd = OpenDev(name);
  // Whole chunks in random order: each its own run in cow space.
  std::vector<uint64_t> chunks(sectors / cs);
  for (uint64_t i = 0; i < chunks.size(); i++) chunks[i] = i;
  std::shuffle(chunks.begin(), chunks.end(), rng);
  for (int i = 0; i < 3000; i++) {
    int r = WriteTag(fd, &m, chunks[i] * cs, cs, 1 + i);
    CHECK(r == 0, "write chunk %llu: %s", (unsigned long long)chunks[i], strerror(-r));
  }
  CHECK(fdatasync(fd) == 0, "flush: %s", strerror(errno));
  int reloads = WaitReloads(d, 0, 30000);
  int targets = TableTargets(name);
  CHECK(targets > 1000 && targets <= max_targets, "%d targets after reload (%s)", targets, LastReload(d).c_str());
  Verify(name, m);
  std::fprintf(stderr, "reload_scattered: %d targets; %s\n", targets, LastReload(d).c_str());

  // I/O during reloads: new chunks, rewrites, partial writes.
  std::atomic<bool> stop{false};
  std::string error;
  std::thread writer([&] {
    std::mt19937_64 wr(12);
    int i = 0;
    while (!stop) {
      const uint64_t sector = wr() % 2 ? chunks[3000 + i % 4000] * cs : wr() % (sectors - 4);
      const uint64_t n = wr() % 2 ? cs - sector % cs : 1 + wr() % 4;
      int r = WriteTag(fd, &m, sector, std::min<uint64_t>(n, sectors - sector), 10000 + i);
      if (r) {
        error = Fmt("write at %llu during reloads: %s", (unsigned long long)sector, strerror(-r));
        return;
      }
      if (++i % 200 == 0 && fdatasync(fd)) {
        error = Fmt("flush during reloads: %s", strerror(errno));
        return;
      }
    }
  });
  WaitReloads(d, reloads + 2, 60000);
  stop = true;
  writer.join();
  CHECK(error.empty(), "%s", error.c_str());
  CHECK(fdatasync(fd) == 0, "flush: %s", strerror(errno));
  close(fd);
  kill(d.pid(), SIGHUP);
  WaitReloads(d, reloads + 2, 30000);
  Verify(name, m);
  CHECK(d.Stop() == 0, "dmcowd exit: %s", Tail(d.Log()).c_str());

  Daemon again(name, {"--reload-interval", "0", "--max-targets", std::to_string(max_targets), base, cow});
  again.Start();
  targets = TableTargets(name);
  CHECK(targets > 1000 && targets <= max_targets, "%d targets at attach", targets);
  Verify(name, m);
  CHECK(again.Stop() == 0, "dmcowd exit");
  CheckBaseFile(base, sectors);
  unlink(cow.c_str());
  unlink(base.c_str());
}

// SIGKILL while writes are in flight: nothing hangs, the device is removed
// and re-created by a new dmcowd, which shows every flushed write, and for
// the rest either the old or a newer content of each sector.
void TestKilledMidWrite() {
  const std::string name = "dc-killed", base = "/tmp/kl-base.img", cow = "/tmp/kl-cow.img";
  const uint32_t cs = 16;
  const uint64_t sectors = 4096 * cs / 4;  // 8 MiB
  WriteBaseFile(base, sectors);
  unlink(cow.c_str());
  Model m(sectors);
  std::mt19937_64 rng(5);
  Daemon d(name, {"--chunk-size", "8K", "--reload-interval", "0", base, cow});
  d.Start();
  int fd = OpenDev(name);
  RandomWrites(fd, &m, cs, rng, 80, 1);
  CHECK(fdatasync(fd) == 0, "flush: %s", strerror(errno));
  const Model flushed = m;

  // Later writes, tracked per sector: any of them may survive.
  std::map<uint64_t, std::set<uint32_t>> later;
  std::atomic<int> done{0};
  std::atomic<int> last_error{0};
  std::thread writer([&] {
    std::mt19937_64 wr(6);
    for (int i = 0; i < 100000; i++) {
      const uint64_t sector = wr() % (sectors - 8);
      const uint64_t n = 1 + wr() % 8;
      for (uint64_t s = sector; s < sector + n; s++) later[s].insert(1000 + i);
      int r = WriteTag(fd, &m, sector, n, 1000 + i);
      if (r) {
        last_error = r;
        return;
      }
      done++;
    }
  });
  while (done < 50) SleepMs(5);
  d.Kill();
  auto t0 = Clock::now();
  writer.join();  // a write needing the dead daemon fails at once
  CHECK(last_error == -EIO, "writer ended with %d after %d writes", last_error.load(), done.load());
  CHECK(MsSince(t0) < 10000, "writer took %ld ms to fail", MsSince(t0));
  close(fd);

  // The kernel keeps the device; remove it and start over from the COW.
  for (int i = 0; i < 50 && DeviceExists(name); i++) {
    Run({kDmsetup, "remove", name, "--noudevsync", "--verifyudev"});
    if (DeviceExists(name)) SleepMs(100);
  }
  CHECK(!DeviceExists(name), "cannot remove %s", name.c_str());
  for (int i = 0; i < 50 && (LoopsOn(base) || LoopsOn(cow)); i++) SleepMs(100);
  CHECK(LoopsOn(base) == 0 && LoopsOn(cow) == 0, "loop devices left behind");

  Daemon d2(name, {"--reload-interval", "0", base, cow});
  d2.Start();
  fd = OpenDev(name);
  Buf buf(kSector);
  int changed = 0;
  for (uint64_t s = 0; s < sectors; s++) {
    CHECK(pread(fd, buf.data(), kSector, s * kSector) == kSector, "read %llu", (unsigned long long)s);
    const uint64_t* want = &flushed.data[s * kWords];
    if (std::equal(want, want + kWords, buf.words())) continue;
    // Not the flushed content: then one later write, whole.
    auto it = later.find(s);
    CHECK(it != later.end(), "sector %llu lost its flushed content (got %016llx)", (unsigned long long)s,
          (unsigned long long)buf.words()[0]);
    const uint32_t tag = static_cast<uint32_t>((buf.words()[0] >> 40) & 0xffff);
    bool ok = false;
    for (uint32_t t : it->second) ok |= (t & 0xffff) == tag;
    for (unsigned w = 0; ok && w < kWords; w++) ok = buf.words()[w] == TagWord(tag, s, w);
    CHECK(ok, "sector %llu holds neither flushed nor a later write (%016llx)", (unsigned long long)s,
          (unsigned long long)buf.words()[0]);
    changed++;
  }
  close(fd);
  std::fprintf(stderr, "killed_mid_write: %d writes after the flush, %d sectors show them\n", done.load(), changed);
  CHECK(d2.Stop() == 0, "dmcowd exit");
  CheckBaseFile(base, sectors);
  unlink(cow.c_str());
  unlink(base.c_str());
}

std::vector<std::string> ListDir(const std::string& path) {
  std::vector<std::string> names;
  DIR* dir = opendir(path.c_str());
  CHECK(dir, "opendir %s: %s", path.c_str(), strerror(errno));
  while (dirent* e = readdir(dir))
    if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) names.push_back(e->d_name);
  closedir(dir);
  return names;
}

// Joins a thread doing I/O on /dev/mapper/`name` once it set `done`; if it
// has not within 10 s of dmcowd's death, its I/O is held (a device left
// suspended): the device is resumed so that the thread and the test end,
// and the test fails saying so.
void JoinWithin(std::thread* t, const std::atomic<bool>& done, const std::string& name, const std::string& who) {
  const auto t0 = Clock::now();
  while (!done && MsSince(t0) < 10000) SleepMs(20);
  if (done) {
    t->join();
    return;
  }
  std::string info;
  Run({kDmsetup, "info", name}, &info);
  Run({kDmsetup, "resume", name});
  Run({kDmsetup, "remove", "-f", name, "--noudevsync"});
  t->join();
  CHECK(false, "%s: I/O still held 10 s after dmcowd died: %s", who.c_str(), info.c_str());
}

// Whether thread `tid` of this process sleeps uninterruptibly (state D),
// as a thread waiting for its I/O does.
bool InKernelSleep(pid_t tid) {
  if (tid <= 0) return false;
  const std::string stat = ReadText(Fmt("/proc/self/task/%d/stat", static_cast<int>(tid)));
  const size_t close = stat.rfind(')');
  return close != std::string::npos && close + 2 < stat.size() && stat[close + 2] == 'D';
}

// The live processes named `comm` whose parent is `parent` (0: any).
std::vector<pid_t> ChildrenNamed(pid_t parent, const std::string& comm) {
  std::vector<pid_t> found;
  for (const std::string& entry : ListDir("/proc")) {
    if (entry.empty() || !isdigit(static_cast<unsigned char>(entry[0]))) continue;
    const std::string stat = ReadText("/proc/" + entry + "/stat");
    const size_t open = stat.find('('), close = stat.rfind(')');
    if (open == std::string::npos || close == std::string::npos || close + 4 >= stat.size()) continue;
    int ppid = 0;
    char state = 0;
    if (std::sscanf(stat.c_str() + close + 2, "%c %d", &state, &ppid) != 2 || state == 'Z') continue;
    if ((parent <= 0 || ppid == parent) && stat.substr(open + 1, close - open - 1) == comm)
      found.push_back(static_cast<pid_t>(std::stoi(entry)));
  }
  return found;
}

// Found by daemon_killed_repeatedly in CI: dmcowd killed while its device
// was suspended (a reload's few milliseconds) left it suspended, and the
// writer waited in the kernel for good. Here that window is held open:
// the device is suspended as a reload suspends it, a write waits on it,
// dmcowd is killed. Its guard resumes the device: the write fails (it
// needs the daemon), the kernel log says why, the flushed data reads back
// through the device. (A new dmcowd on the same COW, and the clean stop
// that leaves no guard behind: TestKilledSuspended.)
void KillSuspended(const std::string& name, const std::string& uuid, const std::string& base, const std::string& cow,
                   Model* model) {
  const uint32_t cs = 128;  // 64 KiB chunks
  Model& m = *model;
  const uint64_t sectors = m.sectors;
  std::vector<std::string> args = {"--reload-interval", "0", base, cow};
  if (access(cow.c_str(), F_OK) != 0) args.insert(args.begin(), {"--chunk-size", "64K"});  // a new COW
  if (!uuid.empty()) args.insert(args.begin(), {"--uuid", uuid});
  Daemon d(name, args);
  d.Start();
  CHECK(ChildrenNamed(d.pid(), "dmcowd-guard").size() == 1, "dmcowd has no guard (or several)");
  int fd = OpenDev(name);
  CHECK(WriteTag(fd, &m, 0, cs, 5) == 0, "write chunk 0");
  CHECK(fdatasync(fd) == 0, "flush: %s", strerror(errno));
  Must({kDmsetup, "suspend", "--noflush", "--nolockfs", name});

  std::atomic<bool> done{false};
  std::atomic<int> result{0};
  std::atomic<pid_t> writer_tid{0};
  std::thread writer([&] {
    Model scratch(sectors);
    writer_tid = gettid();
    result = WriteTag(fd, &scratch, 4 * cs, cs, 6);  // a new chunk: a MAP_WRITE for the daemon
    done = true;
  });
  // The write must be waiting in the kernel when dmcowd dies.
  for (int i = 0; i < 250 && !done && !InKernelSleep(writer_tid); i++) SleepMs(20);
  const bool passed_suspended = done, waiting = InKernelSleep(writer_tid);
  const pid_t pid = d.pid();
  d.Kill();
  JoinWithin(&writer, done, name, "a write to the suspended device");
  CHECK(!passed_suspended, "the write passed a suspended device");
  CHECK(waiting, "the write was not waiting in the kernel when dmcowd was killed");
  CHECK(result == -EIO, "the held write ended with %d, not -EIO", result.load());
  std::string info;
  CHECK(Run({kDmsetup, "info", name}, &info) == 0 && info.find("ACTIVE") != std::string::npos, "device not active: %s",
        info.c_str());
  const std::string said = Fmt("dmcowd (pid %d) ended with /dev/mapper/%s suspended: resumed it", pid, name.c_str());
  for (int i = 0; i < 100 && KernelLog().find(said) == std::string::npos; i++) SleepMs(20);
  CHECK(KernelLog().find(said) != std::string::npos, "the kernel log lacks \"%s\"", said.c_str());
  Verify(name, m);
  close(fd);
  Must({kDmsetup, "remove", name, "--noudevsync"});
  for (int i = 0; i < 50 && (LoopsOn(base) || LoopsOn(cow)); i++) SleepMs(100);
}

// The guard finds the device by uuid where it has one, else by name: the
// kill is done once each way, on the same COW.
void TestKilledSuspended() {
  const std::string name = "dc-ksusp", base = "/tmp/ks-base.img", cow = "/tmp/ks-cow.img";
  const uint64_t sectors = 8 * 2048;
  WriteBaseFile(base, sectors);
  unlink(cow.c_str());
  Model m(sectors);
  for (const char* uuid : {"", "DMCOW-TEST-ksusp"}) KillSuspended(name, uuid, base, cow, &m);
  Daemon d2(name, {base, cow});
  d2.Start();
  Verify(name, m);
  CHECK(d2.Stop() == 0, "dmcowd exit");
  // Stopped cleanly, dmcowd waited for its guard (a guard left running
  // would have been handed to init by now).
  CHECK(ChildrenNamed(0, "dmcowd-guard").empty(), "a guard outlived its dmcowd");
  CHECK(!DeviceExists(name), "device left after a clean stop");
  CheckBaseFile(base, sectors);
  unlink(cow.c_str());
  unlink(base.c_str());
}

// Issue 14's report, run many times: a flushed 64 KiB write at 2 MiB, a
// writer of 64 KiB blocks from 19 MiB, SIGKILL at a different moment each
// round while table reloads (every second, each with a suspend) may be in
// progress, then a new dmcowd on the same COW: the flushed write reads back
// in every round, and so does everything else flushed before the kill.
void TestKilledRepeatedly() {
  const std::string name = "dc-rekill", base = "/tmp/rk-base.img", cow = "/tmp/rk-cow.img";
  const uint32_t cs = 128;             // 64 KiB chunks
  const uint64_t sectors = 64 * 2048;  // 64 MiB: the writer's 45 MiB outlast every kill moment below
  const uint64_t at = 2 * 2048, writer_from = 19 * 2048;
  WriteBaseFile(base, sectors);
  const int rounds = 8;
  for (int round = 0; round < rounds; round++) {
    unlink(cow.c_str());
    Model m(sectors);
    Daemon d(name, {"--chunk-size", "64K", "--reload-interval", "1", base, cow});
    d.Start();
    int fd = OpenDev(name);
    CHECK(WriteTag(fd, &m, at, cs, 7 + round) == 0, "round %d: write at 2 MiB", round);
    CHECK(fdatasync(fd) == 0, "round %d: flush: %s", round, strerror(errno));
    // Some scattered flushed writes too, so reloads have runs to fold.
    std::mt19937_64 rng(round);
    for (int i = 0; i < 12; i++) {
      const uint64_t sector = (rng() % (writer_from / cs - 1)) * cs;
      if (sector != at) CHECK(WriteTag(fd, &m, sector, cs, 100 + i) == 0, "round %d: write %d", round, i);
    }
    CHECK(fdatasync(fd) == 0, "round %d: flush: %s", round, strerror(errno));
    const Model flushed = m;
    Verify(name, flushed);

    // Sequential 64 KiB blocks, each a new chunk (a MAP_WRITE to the
    // daemon), until one fails or the end.
    std::atomic<int> written{0};
    std::atomic<bool> stopped{false};
    std::thread writer([&] {
      Buf buf(cs * kSector);
      for (uint64_t s = writer_from; s + cs <= sectors; s += cs) {
        for (uint64_t k = 0; k < cs * kWords; k++) buf.words()[k] = TagWord(900, s + k / kWords, k % kWords);
        if (pwrite(fd, buf.data(), cs * kSector, s * kSector) != static_cast<ssize_t>(cs * kSector)) break;
        written++;
      }
      stopped = true;
    });
    SleepMs(100 + 80 * round);  // mid-write, at a different moment each round
    std::fprintf(stderr, "killed_repeatedly: round %d: kill after %d writer blocks\n", round, written.load());
    try {
      d.Kill();
    } catch (const std::exception& e) {  // the writer is still joinable: say why before the process ends
      std::fprintf(stderr, "killed_repeatedly: round %d: %s\n", round, e.what());
      throw;
    }
    JoinWithin(&writer, stopped, name, Fmt("round %d: the writer", round));
    std::fprintf(stderr, "killed_repeatedly: round %d: writer stopped\n", round);
    close(fd);
    for (int i = 0; i < 50 && DeviceExists(name); i++) {
      Run({kDmsetup, "remove", "-f", name, "--noudevsync", "--verifyudev"});
      if (DeviceExists(name)) SleepMs(100);
    }
    CHECK(!DeviceExists(name), "round %d: cannot remove %s", round, name.c_str());
    for (int i = 0; i < 50 && (LoopsOn(base) || LoopsOn(cow)); i++) SleepMs(100);

    Daemon d2(name, {"--reload-interval", "1", base, cow});
    d2.Start();
    std::fprintf(stderr, "killed_repeatedly: round %d: restarted\n", round);
    fd = OpenDev(name);
    Buf buf(kSector);
    for (uint64_t s = 0; s < writer_from; s++) {
      CHECK(pread(fd, buf.data(), kSector, s * kSector) == kSector, "round %d: read %llu", round,
            (unsigned long long)s);
      const uint64_t* want = &flushed.data[s * kWords];
      CHECK(std::equal(want, want + kWords, buf.words()),
            "round %d (killed after %d writer blocks): sector %llu lost its flushed content: %016llx, want %016llx",
            round, written.load(), (unsigned long long)s, (unsigned long long)buf.words()[0],
            (unsigned long long)want[0]);
    }
    close(fd);
    CHECK(d2.Stop() == 0, "round %d: dmcowd exit", round);
    std::fprintf(stderr, "killed_repeatedly: round %d killed after %d writer blocks; %d reloads logged so far\n", round,
                 written.load(), ReloadsLogged(d.Log()));
  }
  CheckBaseFile(base, sectors);
  unlink(cow.c_str());
  unlink(base.c_str());
}

// Two devices over one base at the same time, each with its own COW.
void TestSharedBase() {
  const std::string base = "/tmp/sh-base.img";
  const uint64_t sectors = 8192;
  const uint32_t cs = 64;
  WriteBaseFile(base, sectors);
  Model m1(sectors), m2(sectors);
  unlink("/tmp/sh-cow1.img");
  unlink("/tmp/sh-cow2.img");
  Daemon d1("dc-share1", {"--chunk-size", "32K", base, "/tmp/sh-cow1.img"});
  Daemon d2("dc-share2", {"--chunk-size", "32K", base, "/tmp/sh-cow2.img"});
  d1.Start();
  d2.Start();
  std::mt19937_64 r1(1), r2(2);
  int f1 = OpenDev("dc-share1"), f2 = OpenDev("dc-share2");
  std::thread t([&] { RandomWrites(f1, &m1, cs, r1, 50, 1); });
  RandomWrites(f2, &m2, cs, r2, 50, 500);
  t.join();
  close(f1);
  close(f2);
  Verify("dc-share1", m1);
  Verify("dc-share2", m2);
  CHECK(d1.Stop() == 0 && d2.Stop() == 0, "dmcowd exit");
  CheckBaseFile(base, sectors);
  Daemon again("dc-share1", {base, "/tmp/sh-cow1.img"});
  again.Start();
  Verify("dc-share1", m1);
  CHECK(again.Stop() == 0, "dmcowd exit");
  unlink("/tmp/sh-cow1.img");
  unlink("/tmp/sh-cow2.img");
  unlink(base.c_str());
}

uint64_t Fnv(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
  return h;
}

// Deterministic file content of `len` bytes.
std::string FileContent(int i, size_t len) {
  std::string s(len, '\0');
  std::mt19937_64 rng(1000 + i);
  for (size_t k = 0; k < len; k++) s[k] = static_cast<char>('a' + rng() % 26);
  return s;
}

// `debugfs -R "dump PATH OUT"` and compare.
void CheckFsFile(const std::string& dev, const std::string& path, const std::string& want) {
  unlink("/tmp/fs-dump");
  Must({"/sbin/debugfs", "-R", "dump " + path + " /tmp/fs-dump", dev});
  CHECK(ReadText("/tmp/fs-dump") == want, "%s on %s differs", path.c_str(), dev.c_str());
}

// ext4 (userspace e2fsprogs, no mount): a base image holding a file system,
// changed through a cow device, fsck-clean on the device and after a
// reattach; the base keeps its own file system. And mkfs.ext4 onto a cow
// device, fsck-clean after reattach.
void TestFilesystem() {
  const std::string base = "/tmp/fs-base.img", cow = "/tmp/fs-cow.img", cow2 = "/tmp/fs-cow2.img";
  const std::string name = "dc-fs", dev = "/dev/mapper/dc-fs";
  mkdir("/tmp/fs-src", 0755);
  std::vector<std::string> files;
  for (int i = 0; i < 12; i++) {
    files.push_back(FileContent(i, 1 + (size_t(i) * 97531) % (600 * 1024)));
    WriteText(Fmt("/tmp/fs-src/f%d", i), files.back());
  }
  WriteText(base, "");
  CHECK(truncate(base.c_str(), 32 << 20) == 0, "truncate");
  Must({"/sbin/mke2fs", "-q", "-F", "-t", "ext4", "-d", "/tmp/fs-src", base});
  Must({"/sbin/e2fsck", "-fn", base});
  const uint64_t base_sum = Fnv(ReadText(base));
  unlink(cow.c_str());
  unlink(cow2.c_str());

  // Change the file system through the device.
  const std::string extra = FileContent(99, 300000);
  WriteText("/tmp/fs-extra", extra);
  {
    Daemon d(name, {"--chunk-size", "16K", base, cow});
    d.Start();
    Must({"/sbin/debugfs", "-w", "-R", "write /tmp/fs-extra extra", dev});
    Must({"/sbin/debugfs", "-w", "-R", "rm f3", dev});
    Must({"/sbin/debugfs", "-w", "-R", "mkdir newdir", dev});
    Must({"/sbin/e2fsck", "-fn", dev});
    CHECK(d.Stop() == 0, "dmcowd exit");
  }
  {
    Daemon d(name, {base, cow});
    d.Start();
    Must({"/sbin/e2fsck", "-fn", dev});
    CheckFsFile(dev, "/extra", extra);
    CheckFsFile(dev, "/f7", files[7]);
    std::string out;
    Run({"/sbin/debugfs", "-R", "stat /f3", dev}, &out);
    CHECK(out.find("not found") != std::string::npos, "f3 still there: %s", Tail(out).c_str());
    CHECK(d.Stop() == 0, "dmcowd exit");
  }
  CHECK(Fnv(ReadText(base)) == base_sum, "base image changed");
  Must({"/sbin/e2fsck", "-fn", base});
  CheckFsFile(base, "/f3", files[3]);

  // mkfs.ext4 onto a cow device over the same base, while the other COW is
  // attached too.
  {
    Daemon other("dc-fs-other", {base, cow});
    other.Start();
    Daemon d(name, {"--chunk-size", "64K", base, cow2});
    d.Start();
    Must({"/sbin/mke2fs", "-q", "-F", "-t", "ext4", "-E", "nodiscard", "-d", "/tmp/fs-src", dev});
    Must({"/sbin/e2fsck", "-fn", dev});
    Must({"/sbin/e2fsck", "-fn", "/dev/mapper/dc-fs-other"});
    CHECK(d.Stop() == 0 && other.Stop() == 0, "dmcowd exit");
  }
  {
    Daemon d(name, {base, cow2});
    d.Start();
    Must({"/sbin/e2fsck", "-fn", dev});
    for (int i = 0; i < 12; i++) CheckFsFile(dev, Fmt("/f%d", i), files[i]);
    CHECK(d.Stop() == 0, "dmcowd exit");
  }
  CHECK(Fnv(ReadText(base)) == base_sum, "base image changed");
  for (const char* f : {"/tmp/fs-extra", "/tmp/fs-dump"}) unlink(f);
  for (int i = 0; i < 12; i++) unlink(Fmt("/tmp/fs-src/f%d", i).c_str());
  rmdir("/tmp/fs-src");
  unlink(cow.c_str());
  unlink(cow2.c_str());
  unlink(base.c_str());
}

// ext4 mounted on a cow device (the kernel's file system, not e2fsprogs):
// files written through the mount, a SIGTERM while mounted leaves the
// device serving, unmount, detach, reattach, fsck clean, mount again and
// every file as written; the base image untouched.
void TestMount() {
  const std::string base = "/tmp/mt-base.img", cow = "/tmp/mt-cow.img", name = "dc-mount";
  const std::string dev = "/dev/mapper/" + name, mnt = "/tmp/mt-mnt";
  mkdir("/tmp/mt-src", 0755);
  const std::string seed = FileContent(50, 200000);
  WriteText("/tmp/mt-src/seed", seed);
  WriteText(base, "");
  CHECK(truncate(base.c_str(), 24 << 20) == 0, "truncate");
  Must({"/sbin/mke2fs", "-q", "-F", "-t", "ext4", "-d", "/tmp/mt-src", base});
  const uint64_t base_sum = Fnv(ReadText(base));
  unlink(cow.c_str());
  mkdir(mnt.c_str(), 0755);

  std::map<std::string, std::string> files;  // path under the mount -> content
  files["seed"] = seed;
  {
    Daemon d(name, {"--chunk-size", "16K", "--reload-interval", "1", base, cow});
    d.Start();
    CHECK(mount(dev.c_str(), mnt.c_str(), "ext4", 0, nullptr) == 0, "mount %s: %s", dev.c_str(), strerror(errno));
    CHECK(ReadText(mnt + "/seed") == seed, "seed file differs on the mounted base");
    mkdir((mnt + "/dir").c_str(), 0755);
    for (int i = 0; i < 8; i++) {
      const std::string path = Fmt(i % 2 ? "dir/f%d" : "f%d", i);
      files[path] = FileContent(60 + i, 1000 + (size_t(i) * 123457) % (900 * 1024));
      WriteText(mnt + "/" + path, files[path]);
    }
    files["seed"] = FileContent(51, 150000);  // rewritten in place (truncated, shorter)
    WriteText(mnt + "/seed", files["seed"]);
    sync();
    // Detaching a mounted device is refused: dmcowd keeps serving.
    kill(d.pid(), SIGTERM);
    auto t0 = Clock::now();
    while (d.Log().find("is in use; still serving") == std::string::npos) {
      CHECK(MsSince(t0) < 20000, "no 'in use' message after SIGTERM: %s", Tail(d.Log()).c_str());
      SleepMs(50);
    }
    CHECK(waitpid(d.pid(), nullptr, WNOHANG) == 0 && DeviceExists(name), "dmcowd left while mounted");
    files["dir/late"] = FileContent(70, 50000);  // still served after the refused detach
    WriteText(mnt + "/dir/late", files["dir/late"]);
    CHECK(umount(mnt.c_str()) == 0, "umount: %s", strerror(errno));
    CHECK(d.Stop() == 0, "dmcowd exit: %s", Tail(d.Log()).c_str());
    CHECK(!DeviceExists(name), "device left after SIGTERM");
  }
  {
    Daemon d(name, {base, cow});
    d.Start();
    Must({"/sbin/e2fsck", "-fn", dev});
    CHECK(mount(dev.c_str(), mnt.c_str(), "ext4", MS_RDONLY, nullptr) == 0, "mount again: %s", strerror(errno));
    for (const auto& [path, content] : files)
      CHECK(ReadText(mnt + "/" + path) == content, "%s differs after reattach", path.c_str());
    CHECK(ListDir(mnt + "/dir").size() == 5, "dir/ holds %zu entries, not 5", ListDir(mnt + "/dir").size());
    CHECK(umount(mnt.c_str()) == 0, "umount: %s", strerror(errno));
    CHECK(d.Stop() == 0, "dmcowd exit");
  }
  CHECK(Fnv(ReadText(base)) == base_sum, "base image changed");
  Must({"/sbin/e2fsck", "-fn", base});
  rmdir(mnt.c_str());
  unlink("/tmp/mt-src/seed");
  rmdir("/tmp/mt-src");
  unlink(cow.c_str());
  unlink(base.c_str());
}

const TestCase kTests[] = {
    {"daemon_attach_reattach", TestAttachReattach},
    {"daemon_shared_base", TestSharedBase},
    {"daemon_filesystem", TestFilesystem},
    {"daemon_mount", TestMount},
    {"daemon_killed_mid_write", TestKilledMidWrite},
    {"daemon_killed_repeatedly", TestKilledRepeatedly},
    {"daemon_killed_suspended", TestKilledSuspended},
    {"daemon_reload_scattered", TestReloadScattered},
};

}  // namespace

int main(int argc, char** argv) {
  return dmcow_vm::TestMain(argc, argv, "daemontest", kTests, sizeof(kTests) / sizeof(kTests[0]),
                            "DMCOW_DAEMON_TEST_TIMEOUT", 120);
}
