// dm-cow in-guest test driver.  Runs inside the test VM (tests/vm/run.sh):
//
//   vmtest list            names of all tests, one per line
//   vmtest run [name...]   run tests (all by default), each in a child
//                          process with a time limit, printing one line
//                          "DMCOW-TEST <name> PASS|FAIL <detail>" per test
//
// Every test builds its own stack: a base image and a cow image on tmpfs,
// loop devices over them, a dm-cow device over those, and (mostly) an
// in-process responder.  Data checks compare the whole device against a
// model of what it must contain: base pattern, written tags, zeros.

#include <fcntl.h>
#include <linux/capability.h>
#include <linux/loop.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "responder.h"
#include "vm_harness.h"

namespace {

using namespace dmcow_vm;
using dmcow::Channel;
using dmcow::Responder;

constexpr uint64_t kSectorBytes = 512;
constexpr unsigned kWordsPerSector = kSectorBytes / 8;
const char* const kDmsetup = "/sbin/dmsetup";

// ---- data patterns ----------------------------------------------------------

uint64_t BaseWord(uint64_t sector, unsigned w) { return 0xBA5E000000000000ULL | (sector << 8) | w; }

uint64_t TagWord(uint32_t tag, uint64_t sector, unsigned w) {
  return 0x5700000000000000ULL | (static_cast<uint64_t>(tag & 0xffff) << 40) | (sector << 8) | w;
}

// ---- processes --------------------------------------------------------------

void Dmsetup(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {kDmsetup};
  argv.insert(argv.end(), args.begin(), args.end());
  std::string out;
  int st = Run(argv, &out);
  std::string cmd;
  for (auto& a : args) cmd += a + " ";
  CHECK(st == 0, "dmsetup %s failed (%d): %s", cmd.c_str(), st, out.c_str());
}

// ---- loop devices -----------------------------------------------------------

std::string LoopAttach(const std::string& file) {
  int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
  CHECK(ctl >= 0, "open loop-control: %s", strerror(errno));
  int n = ioctl(ctl, LOOP_CTL_GET_FREE);
  close(ctl);
  CHECK(n >= 0, "LOOP_CTL_GET_FREE: %s", strerror(errno));
  std::string path = "/dev/loop" + std::to_string(n);
  for (int i = 0; i < 200 && access(path.c_str(), F_OK); i++) SleepMs(10);
  int lfd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  CHECK(lfd >= 0, "open %s: %s", path.c_str(), strerror(errno));
  int ffd = open(file.c_str(), O_RDWR | O_CLOEXEC);
  CHECK(ffd >= 0, "open %s: %s", file.c_str(), strerror(errno));
  int r = ioctl(lfd, LOOP_SET_FD, ffd);
  int e = errno;
  close(ffd);
  close(lfd);
  CHECK(r == 0, "LOOP_SET_FD %s: %s", path.c_str(), strerror(e));
  return path;
}

void LoopDetach(const std::string& path) {
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return;
  ioctl(fd, LOOP_CLR_FD, 0);
  close(fd);
}

// ---- device I/O ---------------------------------------------------------------

int OpenDirect(const std::string& path, int extra_flags = 0) {
  int fd = open(path.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC | extra_flags);
  CHECK(fd >= 0, "open %s: %s", path.c_str(), strerror(errno));
  return fd;
}

// Returns 0 or -errno.
int PRead(int fd, Buf* buf, uint64_t sector, uint64_t nsect) {
  ssize_t n = pread(fd, buf->data(), nsect * kSectorBytes, sector * kSectorBytes);
  if (n < 0) return -errno;
  return n == static_cast<ssize_t>(nsect * kSectorBytes) ? 0 : -EIO;
}

int PWrite(int fd, Buf* buf, uint64_t sector, uint64_t nsect) {
  ssize_t n = pwrite(fd, buf->data(), nsect * kSectorBytes, sector * kSectorBytes);
  if (n < 0) return -errno;
  return n == static_cast<ssize_t>(nsect * kSectorBytes) ? 0 : -EIO;
}

void FillTag(Buf* buf, uint32_t tag, uint64_t sector, uint64_t nsect) {
  for (uint64_t s = 0; s < nsect; s++)
    for (unsigned w = 0; w < kWordsPerSector; w++) buf->words()[s * kWordsPerSector + w] = TagWord(tag, sector + s, w);
}

// ---- the device under test ----------------------------------------------------

struct Status {
  uint64_t mapped = 0, outstanding = 0, requests = 0, copies = 0, zero_fills = 0, skipped = 0, flushes = 0, errors = 0;
  std::string daemon;
  uint64_t cached = 0, cache_max = 0, dropped = 0;
};

class Env {
 public:
  // A device of `sectors` over a base of the same size and a cow of
  // `cow_sectors`, chunk size `cs` sectors.
  explicit Env(std::string name, uint32_t cs = 128, uint64_t sectors = 8192, uint64_t cow_sectors = 16384)
      : name(std::move(name)),
        ident(this->name),
        cs(cs),
        sectors(sectors),
        cow_sectors(cow_sectors),
        model(sectors * kWordsPerSector) {
    for (uint64_t s = 0; s < sectors; s++)
      for (unsigned w = 0; w < kWordsPerSector; w++) model[s * kWordsPerSector + w] = BaseWord(s, w);
    dev = "/dev/mapper/" + this->name;
  }
  ~Env() { Teardown(); }

  // Images, loops and the device.  With cow_write_delay_ms, cow_dev is a
  // dm-delay device over the cow loop that delays writes and flushes.
  void Setup(const std::string& features = "", int cow_write_delay_ms = 0) {
    base_file = "/tmp/" + name + "-base.img";
    cow_file = "/tmp/" + name + "-cow.img";
    WriteFile(base_file, sectors, true);
    WriteFile(cow_file, cow_sectors, false);
    base_loop = LoopAttach(base_file);
    cow_loop = LoopAttach(cow_file);
    cow_dev = cow_loop;
    if (cow_write_delay_ms) {
      delay_name = name + "-cowdelay";
      Dmsetup({"create", delay_name, "--noudevsync", "--verifyudev", "--table",
               Fmt("0 %llu delay %s 0 0 %s 0 %d", (unsigned long long)cow_sectors, cow_loop.c_str(), cow_loop.c_str(),
                   cow_write_delay_ms)});
      cow_dev = "/dev/mapper/" + delay_name;
    }
    Create(Table(features));
  }

  std::string CowLine(uint64_t start, uint64_t len, const std::string& features = "") const {
    std::string t = Fmt("%llu %llu cow %s %s %s %u", (unsigned long long)start, (unsigned long long)len, ident.c_str(),
                        base_loop.c_str(), cow_dev.c_str(), cs);
    if (!features.empty()) t += " 1 " + features;
    return t;
  }
  std::string Table(const std::string& features = "") const { return CowLine(0, sectors, features); }

  void Create(const std::string& table) {
    Dmsetup({"create", name, "--noudevsync", "--verifyudev", "--table", table});
    created = true;
    for (int i = 0; i < 200 && access(dev.c_str(), F_OK); i++) SleepMs(10);
    CHECK(access(dev.c_str(), F_OK) == 0, "%s did not appear", dev.c_str());
    for (int i = 0; i < 200 && access(dmcow::ChannelPath(ident).c_str(), F_OK); i++) SleepMs(10);
  }

  void Reload(const std::string& table) {
    Dmsetup({"suspend", name});
    Dmsetup({"reload", name, "--table", table});
    Dmsetup({"resume", name, "--noudevsync"});
  }

  void Teardown() {
    if (created) {
      std::string out;
      for (int i = 0; i < 20; i++) {
        if (Run({kDmsetup, "remove", name, "--noudevsync", "--verifyudev"}, &out) == 0) break;
        SleepMs(100);
      }
      created = false;
    }
    if (!delay_name.empty()) Run({kDmsetup, "remove", delay_name, "--noudevsync", "--verifyudev"});
    delay_name.clear();
    if (!cow_loop.empty()) LoopDetach(cow_loop);
    if (!base_loop.empty()) LoopDetach(base_loop);
    cow_loop.clear();
    base_loop.clear();
    if (!base_file.empty()) unlink(base_file.c_str());
    if (!cow_file.empty()) unlink(cow_file.c_str());
  }

  Status GetStatus() const {
    std::string out;
    int st = Run({kDmsetup, "status", name}, &out);
    CHECK(st == 0, "dmsetup status: %s", out.c_str());
    std::istringstream in(out);
    unsigned long long start, len;
    std::string type;
    Status s;
    in >> start >> len >> type >> s.mapped >> s.outstanding >> s.requests >> s.copies >> s.zero_fills >> s.skipped >>
        s.flushes >> s.errors >> s.daemon >> s.cached >> s.cache_max >> s.dropped;
    CHECK(type == "cow" && !in.fail(), "unexpected status line: %s", out.c_str());
    return s;
  }

  // Writes `nsect` sectors tagged `tag` at `sector`; updates the model on
  // success.  Returns 0 or -errno.
  int Write(int fd, uint64_t sector, uint64_t nsect, uint32_t tag) {
    Buf buf(nsect * kSectorBytes);
    FillTag(&buf, tag, sector, nsect);
    int r = PWrite(fd, &buf, sector, nsect);
    if (!r) SetModel(sector, nsect, tag);
    return r;
  }
  void SetModel(uint64_t sector, uint64_t nsect, uint32_t tag) {
    for (uint64_t s = sector; s < sector + nsect; s++)
      for (unsigned w = 0; w < kWordsPerSector; w++) model[s * kWordsPerSector + w] = TagWord(tag, s, w);
  }
  void SetModelZero(uint64_t sector, uint64_t nsect) {
    for (uint64_t s = sector; s < sector + nsect; s++)
      for (unsigned w = 0; w < kWordsPerSector; w++) model[s * kWordsPerSector + w] = 0;
  }
  void SetModelBase(uint64_t sector, uint64_t nsect) {
    for (uint64_t s = sector; s < sector + nsect; s++)
      for (unsigned w = 0; w < kWordsPerSector; w++) model[s * kWordsPerSector + w] = BaseWord(s, w);
  }

  // Compares [sector, sector + nsect) of the device with the model.
  void Verify(uint64_t sector = 0, uint64_t nsect = ~0ULL) {
    if (nsect == ~0ULL) nsect = sectors - sector;
    int fd = OpenDirect(dev);
    const uint64_t step = 256;
    Buf buf(step * kSectorBytes);
    for (uint64_t s = sector; s < sector + nsect; s += step) {
      uint64_t n = std::min(step, sector + nsect - s);
      int r = PRead(fd, &buf, s, n);
      if (r) close(fd);
      CHECK(r == 0, "read sector %llu: %s", (unsigned long long)s, strerror(-r));
      for (uint64_t i = 0; i < n * kWordsPerSector; i++) {
        uint64_t want = model[s * kWordsPerSector + i];
        if (buf.words()[i] != want) {
          close(fd);
          CHECK(false, "sector %llu word %llu: got %016llx want %016llx", (unsigned long long)(s + i / kWordsPerSector),
                (unsigned long long)(i % kWordsPerSector), (unsigned long long)buf.words()[i],
                (unsigned long long)want);
        }
      }
    }
    close(fd);
  }

  // Writes tag data straight into cow_dev (as a daemon filling a chunk
  // itself would); `dev_sector` is the device sector the data stands for.
  void WriteCow(uint64_t cow_sector, uint64_t nsect, uint32_t tag, uint64_t dev_sector) {
    int fd = OpenDirect(cow_loop);
    Buf buf(nsect * kSectorBytes);
    FillTag(&buf, tag, dev_sector, nsect);
    int r = PWrite(fd, &buf, cow_sector, nsect);
    close(fd);
    CHECK(r == 0, "write cow: %s", strerror(-r));
  }

  std::string name, ident;
  uint32_t cs;
  uint64_t sectors, cow_sectors;
  std::vector<uint64_t> model;
  std::string dev, base_file, cow_file, base_loop, cow_loop;
  std::string cow_dev;     // what the table names as cow_dev
  std::string delay_name;  // dm-delay device under cow_dev, if any
  bool created = false;

 private:
  static void WriteFile(const std::string& path, uint64_t nsect, bool base) {
    int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    CHECK(fd >= 0, "create %s: %s", path.c_str(), strerror(errno));
    const uint64_t step = 256;
    std::vector<uint64_t> buf(step * kWordsPerSector);
    for (uint64_t s = 0; s < nsect; s += step) {
      uint64_t n = std::min(step, nsect - s);
      for (uint64_t i = 0; i < n * kWordsPerSector; i++)
        buf[i] = base ? BaseWord(s + i / kWordsPerSector, i % kWordsPerSector)
                      : 0xEEEEEEEEEEEEEEEEULL;  // garbage: never valid data
      ssize_t w = write(fd, buf.data(), n * kSectorBytes);
      CHECK(w == static_cast<ssize_t>(n * kSectorBytes), "write %s", path.c_str());
    }
    close(fd);
  }
};

// Waits until the status line shows `daemon` (bounded).
void WaitDaemonState(const Env& env, const std::string& daemon, int ms = 5000) {
  auto t0 = Clock::now();
  while (env.GetStatus().daemon != daemon) {
    CHECK(MsSince(t0) < ms, "daemon state never became %s", daemon.c_str());
    SleepMs(20);
  }
}

// Runs fn on a thread; Join() waits at most ms and reports whether it ended.
class Async {
 public:
  explicit Async(std::function<int()> fn)
      : thread_([this, fn] {
          result_ = fn();
          done_ = true;
        }) {}
  ~Async() {
    if (thread_.joinable()) {
      if (done_)
        thread_.join();
      else
        thread_.detach();  // stuck in the kernel: the test already failed
    }
  }
  bool Wait(int ms) {
    auto t0 = Clock::now();
    while (!done_ && MsSince(t0) < ms) SleepMs(5);
    if (done_ && thread_.joinable()) thread_.join();
    return done_;
  }
  bool done() const { return done_; }
  int result() const { return result_; }

 private:
  std::atomic<bool> done_{false};
  std::atomic<int> result_{0};
  std::thread thread_;
};

// ---- tests --------------------------------------------------------------------

// Without a daemon: unmapped reads come from base, writes that need the
// daemon fail with EIO at once (the documented no-daemon policy).
void TestUnmappedRead() {
  Env env("unmapped");
  env.Setup();
  env.Verify();
  Status s = env.GetStatus();
  CHECK(s.daemon == "none" && s.mapped == 0 && s.requests == 0, "fresh status: daemon=%s mapped=%llu", s.daemon.c_str(),
        (unsigned long long)s.mapped);
  int fd = OpenDirect(env.dev);
  int r = env.Write(fd, 0, 8, 1);
  close(fd);
  CHECK(r == -EIO, "write without daemon: %d", r);
}

// A write covering part of an unmapped chunk: one request, one kcopyd copy;
// the rest of the chunk keeps base data.
void TestPartialWrite() {
  Env env("partial");
  env.Setup();
  Responder resp(env.ident, env.cs);
  CHECK(resp.Start() == 0, "responder start");
  int fd = OpenDirect(env.dev);
  uint64_t chunk = 3;
  int r = env.Write(fd, chunk * env.cs + 16, 8, 7);  // 4 KiB at offset 8 KiB
  CHECK(r == 0, "write: %s", strerror(-r));
  // Mapped now: more writes and reads in that chunk go without requests.
  r = env.Write(fd, chunk * env.cs + 64, 16, 8);
  CHECK(r == 0, "second write: %s", strerror(-r));
  close(fd);
  env.Verify();
  Status s = env.GetStatus();
  CHECK(resp.Count(DMCOW_REQ_MAP_WRITE) == 1, "requests: %zu", resp.Count(DMCOW_REQ_MAP_WRITE));
  CHECK(resp.CountChunk(DMCOW_REQ_MAP_WRITE, chunk) == 1, "request chunk");
  CHECK(s.copies == 1 && s.skipped == 0 && s.mapped == 1, "copies=%llu skipped=%llu mapped=%llu",
        (unsigned long long)s.copies, (unsigned long long)s.skipped, (unsigned long long)s.mapped);
  CHECK(resp.Error().empty(), "responder: %s", resp.Error().c_str());
}

// A write covering the whole chunk: no copy.
void TestFullChunkWrite() {
  Env env("fullchunk");
  env.Setup();
  Responder resp(env.ident, env.cs);
  CHECK(resp.Start() == 0, "responder start");
  int fd = OpenDirect(env.dev);
  int r = env.Write(fd, 5 * env.cs, env.cs, 9);
  CHECK(r == 0, "write: %s", strerror(-r));
  close(fd);
  env.Verify();
  Status s = env.GetStatus();
  CHECK(s.copies == 0 && s.skipped == 1 && s.mapped == 1, "copies=%llu skipped=%llu mapped=%llu",
        (unsigned long long)s.copies, (unsigned long long)s.skipped, (unsigned long long)s.mapped);
  auto log = resp.Log();
  CHECK(log.size() == 1 && (log[0].flags & DMCOW_REQ_F_FULL_CHUNK), "FULL_CHUNK flag missing");
}

// Writers on one chunk and on different chunks at once: each chunk is
// requested exactly once, every write lands, the rest keeps base data.
void TestConcurrentWriters() {
  Env env("concurrent");
  env.Setup();
  Responder resp(env.ident, env.cs);
  resp.SetReplyDelayMs(30);  // let bios pile up behind the chunk locks
  CHECK(resp.Start() == 0, "responder start");
  const int kThreads = 8;
  const uint64_t kBlock = 8;  // 4 KiB
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; t++) {
    threads.emplace_back([&, t] {
      int fd = open(env.dev.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
      if (fd < 0) {
        errors++;
        return;
      }
      for (int i = 0; i < 4; i++) {
        uint64_t sector;
        if (t < 4)  // chunk 10: blocks t, t+4, t+8, t+12
          sector = 10 * env.cs + (t + 4 * i) * kBlock;
        else  // chunks 20..27, two per thread
          sector = (20 + 2 * (t - 4) + i % 2) * env.cs + (i / 2) * 3 * kBlock;
        if (env.Write(fd, sector, kBlock, 0x100 + t * 16 + i)) errors++;
      }
      close(fd);
    });
  }
  for (auto& th : threads) th.join();
  CHECK(errors == 0, "%d writes failed", errors.load());
  env.Verify();
  CHECK(resp.CountChunk(DMCOW_REQ_MAP_WRITE, 10) == 1, "chunk 10 requested %zu times",
        resp.CountChunk(DMCOW_REQ_MAP_WRITE, 10));
  CHECK(resp.Count(DMCOW_REQ_MAP_WRITE) == 9, "requests: %zu", resp.Count(DMCOW_REQ_MAP_WRITE));
  Status s = env.GetStatus();
  CHECK(s.mapped == 9 && s.outstanding == 0, "mapped=%llu outstanding=%llu", (unsigned long long)s.mapped,
        (unsigned long long)s.outstanding);
  CHECK(resp.Error().empty(), "responder: %s", resp.Error().c_str());
}

// A MAP reply may map an extent: one request maps four chunks (each filled
// from base); two requests answered with the same extent are harmless.
void TestExtentReply() {
  Env env("extent");
  env.Setup();
  Responder resp(env.ident, env.cs);
  uint64_t ext1 = resp.AllocCow(4), ext2 = resp.AllocCow(2);
  resp.SetHook([&](const dmcow_request& req, std::vector<dmcow_reply>* out) {
    if (req.kind != DMCOW_REQ_MAP_WRITE) return false;
    if (req.chunk >= 30 && req.chunk < 34)
      out->push_back(dmcow::MapReply(req.seq, DMCOW_MAP_RW, 30, 4, ext1));
    else if (req.chunk == 40 || req.chunk == 41)
      out->push_back(dmcow::MapReply(req.seq, DMCOW_MAP_RW, 40, 2, ext2));
    else
      return false;
    return true;
  });
  resp.SetReplyDelayMs(30);
  CHECK(resp.Start() == 0, "responder start");
  int fd = OpenDirect(env.dev);
  CHECK(env.Write(fd, 30 * env.cs + 8, 8, 0x30) == 0, "write chunk 30");
  for (uint64_t c = 31; c < 34; c++)
    CHECK(env.Write(fd, c * env.cs, 8, 0x30 + c) == 0, "write chunk %llu", (unsigned long long)c);
  CHECK(resp.Count(DMCOW_REQ_MAP_WRITE) == 1, "extent chunks asked again: %zu", resp.Count(DMCOW_REQ_MAP_WRITE));
  Status s = env.GetStatus();
  CHECK(s.copies == 4 && s.mapped == 4, "copies=%llu mapped=%llu", (unsigned long long)s.copies,
        (unsigned long long)s.mapped);
  // Concurrent writes to chunks 40 and 41: both requests get the same extent.
  Async a([&] {
    int fd2 = open(env.dev.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
    int r = env.Write(fd2, 41 * env.cs + 16, 8, 0x41);
    close(fd2);
    return r;
  });
  CHECK(env.Write(fd, 40 * env.cs + 32, 8, 0x40) == 0, "write chunk 40");
  CHECK(a.Wait(10000) && a.result() == 0, "write chunk 41: %d", a.result());
  close(fd);
  env.Verify();
  CHECK(resp.Error().empty(), "responder: %s", resp.Error().c_str());
}

// Mappings pushed before any I/O: FILLED_RW, RO, ZERO, BASE and RW (kernel
// fill); then writes to each, then INVALIDATE.
void TestPushedMappings() {
  Env env("push");
  env.Setup();
  Responder resp(env.ident, env.cs);
  CHECK(resp.Start() == 0, "responder start");
  const uint64_t cs = env.cs;
  const ssize_t kOk = sizeof(dmcow_reply);

  uint64_t filled = resp.AllocCow(1);
  env.WriteCow(filled, cs, 0x40, 40 * cs);
  CHECK(resp.Send(dmcow::PushReply(DMCOW_MAP_FILLED_RW, 40, 1, filled)) == kOk, "push filled");
  env.SetModel(40 * cs, cs, 0x40);

  uint64_t ro = resp.AllocCow(1);
  env.WriteCow(ro, cs, 0x41, 41 * cs);
  CHECK(resp.Send(dmcow::PushReply(DMCOW_MAP_RO, 41, 1, ro)) == kOk, "push ro");
  env.SetModel(41 * cs, cs, 0x41);

  CHECK(resp.Send(dmcow::PushReply(DMCOW_MAP_ZERO, 42, 1, 0)) == kOk, "push zero");
  env.SetModelZero(42 * cs, cs);
  CHECK(resp.Send(dmcow::PushReply(DMCOW_MAP_BASE, 43, 1, 0)) == kOk, "push base");
  uint64_t rw = resp.AllocCow(1);
  CHECK(resp.Send(dmcow::PushReply(DMCOW_MAP_RW, 44, 1, rw)) == kOk, "push rw");

  env.Verify();
  CHECK(resp.Log().empty(), "pushed chunks caused %zu requests", resp.Log().size());
  Status s = env.GetStatus();
  CHECK(s.mapped == 5 && s.copies == 1, "after push: mapped=%llu copies=%llu", (unsigned long long)s.mapped,
        (unsigned long long)s.copies);

  // The kernel filled the RW push from base.
  {
    int cfd = OpenDirect(env.cow_loop);
    Buf buf(cs * kSectorBytes);
    CHECK(PRead(cfd, &buf, rw, cs) == 0, "read cow");
    close(cfd);
    for (uint64_t i = 0; i < cs * kWordsPerSector; i++)
      CHECK(buf.words()[i] == BaseWord(44 * cs + i / kWordsPerSector, i % kWordsPerSector),
            "RW push not filled from base at word %llu", (unsigned long long)i);
  }

  int fd = OpenDirect(env.dev);
  for (uint64_t c = 40; c <= 44; c++)
    CHECK(env.Write(fd, c * cs + 24, 8, 0x50 + c) == 0, "write chunk %llu", (unsigned long long)c);
  close(fd);
  env.Verify();
  // FILLED_RW and RW take writes directly; RO, ZERO and BASE ask.
  CHECK(resp.Count(DMCOW_REQ_MAP_WRITE) == 3 && resp.CountChunk(DMCOW_REQ_MAP_WRITE, 41) == 1 &&
            resp.CountChunk(DMCOW_REQ_MAP_WRITE, 42) == 1 && resp.CountChunk(DMCOW_REQ_MAP_WRITE, 43) == 1,
        "write requests: %zu", resp.Count(DMCOW_REQ_MAP_WRITE));
  s = env.GetStatus();
  // RO is copied from its cow location, ZERO is zero-filled, BASE copied.
  CHECK(s.copies == 3 && s.zero_fills == 1, "copies=%llu zero_fills=%llu", (unsigned long long)s.copies,
        (unsigned long long)s.zero_fills);

  // Invalidate: chunk 40 reads base again.
  CHECK(resp.Send(dmcow::InvalidateReply(40, 1)) == kOk, "invalidate");
  env.SetModelBase(40 * cs, cs);
  env.Verify();
  s = env.GetStatus();
  CHECK(s.mapped == 4, "mapped after invalidate: %llu", (unsigned long long)s.mapped);
  CHECK(resp.Error().empty(), "responder: %s", resp.Error().c_str());
}

// read_to_daemon: reads of unmapped chunks ask; replies of every kind are
// remembered (a second pass asks nothing).
void TestReadToDaemon() {
  Env env("rtd");
  env.Setup("read_to_daemon");
  Responder resp(env.ident, env.cs);
  const uint64_t cs = env.cs;
  uint64_t ext = resp.AllocCow(2);
  env.WriteCow(ext, 2 * cs, 0x50, 50 * cs);
  env.SetModel(50 * cs, 2 * cs, 0x50);
  env.SetModelZero(52 * cs, cs);
  resp.SetHook([&](const dmcow_request& req, std::vector<dmcow_reply>* out) {
    if (req.kind != DMCOW_REQ_MAP_READ) return false;
    if (req.chunk == 50 || req.chunk == 51)
      out->push_back(dmcow::MapReply(req.seq, DMCOW_MAP_FILLED_RW, 50, 2, ext));
    else if (req.chunk == 52)
      out->push_back(dmcow::MapReply(req.seq, DMCOW_MAP_ZERO, 52, 1, 0));
    else
      return false;  // BASE
    return true;
  });
  CHECK(resp.Start() == 0, "responder start");
  env.Verify();
  size_t reads = resp.Count(DMCOW_REQ_MAP_READ);
  CHECK(reads >= 63 && reads <= 64, "read requests: %zu", reads);
  env.Verify();
  CHECK(resp.Count(DMCOW_REQ_MAP_READ) == reads, "second pass asked again");
  CHECK(resp.Log().size() == reads, "unexpected requests");
  int fd = OpenDirect(env.dev);
  CHECK(env.Write(fd, 54 * cs, 8, 0x54) == 0, "write");
  close(fd);
  CHECK(resp.CountChunk(DMCOW_REQ_MAP_WRITE, 54) == 1, "write request");
  env.Verify();
  CHECK(resp.Error().empty(), "responder: %s", resp.Error().c_str());
}

// A flush, and a FUA write, complete only after the daemon's FLUSH_ACK.
void TestFlushWaitsForAck() {
  Env env("flush");
  env.Setup();
  Responder resp(env.ident, env.cs);
  resp.HoldFlushes(true);
  CHECK(resp.Start() == 0, "responder start");
  int fd = OpenDirect(env.dev);
  CHECK(env.Write(fd, env.cs, 8, 0x11) == 0, "write");

  Async sync([&] { return fdatasync(fd) ? -errno : 0; });
  CHECK(!sync.Wait(600), "fdatasync returned before FLUSH_ACK (%d)", sync.result());
  CHECK(resp.HeldFlushes() >= 1, "no FLUSH request reached the daemon");
  resp.ReleaseFlushes();
  CHECK(sync.Wait(10000), "fdatasync still blocked after FLUSH_ACK");
  CHECK(sync.result() == 0, "fdatasync: %s", strerror(-sync.result()));

  int dfd = OpenDirect(env.dev, O_DSYNC);
  Async fua([&] { return env.Write(dfd, 2 * env.cs, 8, 0x12); });
  CHECK(!fua.Wait(600), "O_DSYNC write returned before FLUSH_ACK (%d)", fua.result());
  for (int i = 0; i < 100 && !resp.HeldFlushes(); i++) SleepMs(20);
  CHECK(resp.HeldFlushes() >= 1, "no FLUSH for the O_DSYNC write");
  // The FUA write waits for one FLUSH round trip, then O_DSYNC adds a flush.
  for (int i = 0; i < 500 && !fua.done(); i++) {
    resp.ReleaseFlushes();
    SleepMs(20);
  }
  CHECK(fua.Wait(100), "O_DSYNC write still blocked after FLUSH_ACK");
  CHECK(fua.result() == 0, "O_DSYNC write: %s", strerror(-fua.result()));
  close(dfd);

  // Unheld flushes just work, and the FLUSH came after the map replies.
  resp.HoldFlushes(false);
  CHECK(fdatasync(fd) == 0, "fdatasync: %s", strerror(errno));
  close(fd);
  Status s = env.GetStatus();
  CHECK(s.flushes >= 3, "flush acks: %llu", (unsigned long long)s.flushes);
  env.Verify();
  CHECK(resp.Error().empty(), "responder: %s", resp.Error().c_str());
}

// Table reloads (same table, split into two targets of one ident, a mapped
// chunk moved to a linear segment) while writers run: no write fails, the
// mappings and the channel survive, no chunk is requested twice.
void TestReloadUnderIo() {
  Env env("reload");
  env.Setup();
  Responder resp(env.ident, env.cs);
  CHECK(resp.Start() == 0, "responder start");
  const uint64_t cs = env.cs;
  int fd = OpenDirect(env.dev);
  CHECK(env.Write(fd, 3 * cs, 8, 0x3) == 0, "write chunk 3");
  close(fd);
  uint64_t loc3 = resp.CowOf(3);
  CHECK(loc3 != ~0ULL, "no mapping for chunk 3");

  std::atomic<bool> stop{false};
  std::atomic<int> errors{0}, writes{0};
  std::vector<std::thread> writers;
  for (int t = 0; t < 3; t++) {
    writers.emplace_back([&, t] {
      int wfd = open(env.dev.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
      if (wfd < 0) {
        errors++;
        return;
      }
      uint32_t x = 12345 + t;
      for (int i = 0; !stop && i < 400; i++) {
        x = x * 1103515245 + 12345;
        uint64_t block = (x >> 8) % (env.sectors / 8);
        block = block - block % 3 + t;  // disjoint blocks per thread
        if (block >= env.sectors / 8) continue;
        if (env.Write(wfd, block * 8, 8, 0x1000 + t * 0x400 + i)) errors++;
        writes++;
      }
      close(wfd);
    });
  }
  std::string split = env.CowLine(0, 4096) + "\n" + env.CowLine(4096, env.sectors - 4096);
  std::string linear = env.CowLine(0, 3 * cs) + "\n" +
                       Fmt("%llu %llu linear %s %llu", (unsigned long long)(3 * cs), (unsigned long long)cs,
                           env.cow_loop.c_str(), (unsigned long long)loc3) +
                       "\n" + env.CowLine(4 * cs, env.sectors - 4 * cs);
  for (const std::string& table : {env.Table(), split, env.Table(), linear}) {
    SleepMs(150);
    env.Reload(table);
  }
  SleepMs(150);
  stop = true;
  for (auto& th : writers) th.join();
  CHECK(errors == 0, "%d of %d writes failed", errors.load(), writes.load());
  CHECK(writes > 20, "only %d writes", writes.load());
  env.Verify();
  for (const auto& req : resp.Log())
    CHECK(resp.CountChunk(DMCOW_REQ_MAP_WRITE, req.chunk) <= 1, "chunk %llu requested twice: mapping lost in a reload",
          (unsigned long long)req.chunk);
  Status s = env.GetStatus();
  CHECK(s.daemon == "ready" && s.mapped == resp.Count(DMCOW_REQ_MAP_WRITE),
        "after reloads: daemon=%s mapped=%llu requests=%zu", s.daemon.c_str(), (unsigned long long)s.mapped,
        resp.Count(DMCOW_REQ_MAP_WRITE));
  CHECK(resp.Error().empty(), "responder: %s", resp.Error().c_str());
}

// Daemon death: a hung daemon is killed with held I/O; the held write and
// flush fail with EIO within a bound, unmapped writes and flushes fail at
// once, reads and mapped chunks keep working, a new daemon resumes service.
void TestDaemonKilled() {
  Env env("killed");
  env.Setup();
  const uint64_t cs = env.cs;
  int fd = OpenDirect(env.dev);
  {
    Responder first(env.ident, cs);
    CHECK(first.Start() == 0, "responder start");
    CHECK(env.Write(fd, 1 * cs, 8, 0x1) == 0, "write chunk 1");
  }
  WaitDaemonState(env, "none");

  pid_t pid = fork();
  if (pid == 0) {
    execl("/bin/responder", "responder", env.ident.c_str(), std::to_string(cs).c_str(), "--no-reply", (char*)nullptr);
    _exit(127);
  }
  CHECK(pid > 0, "fork");
  WaitDaemonState(env, "ready");
  Async held([&] { return env.Write(fd, 10 * cs, 8, 0x10); });
  int ffd = OpenDirect(env.dev);
  Async flush([&] { return fdatasync(ffd) ? -errno : 0; });
  bool early = held.Wait(500);
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  auto t0 = Clock::now();
  CHECK(!early, "write completed without a reply (%d)", held.result());
  CHECK(held.Wait(5000), "held write still blocked 5 s after the daemon died");
  CHECK(flush.Wait(5000), "flush still blocked 5 s after the daemon died");
  long ms = MsSince(t0);
  CHECK(held.result() == -EIO, "held write: %d", held.result());
  CHECK(flush.result() == -EIO, "held flush: %d", flush.result());
  close(ffd);
  WaitDaemonState(env, "none");

  // No daemon: unmapped writes and flushes fail at once, the rest works.
  t0 = Clock::now();
  CHECK(env.Write(fd, 11 * cs, 8, 0x11) == -EIO, "unmapped write without daemon");
  CHECK(fdatasync(fd) == -1 && errno == EIO, "flush without daemon");
  CHECK(MsSince(t0) < 2000, "no-daemon errors took %ld ms", MsSince(t0));
  CHECK(env.Write(fd, 1 * cs + 8, 8, 0x2) == 0, "write to mapped chunk");
  env.Verify();
  Dmsetup({"suspend", env.name});
  Dmsetup({"resume", env.name, "--noudevsync"});

  // A new daemon takes over.
  Responder second(env.ident, cs, 100);
  CHECK(second.Start() == 0, "second responder start");
  CHECK(env.Write(fd, 11 * cs, 8, 0x11) == 0, "write with new daemon");
  CHECK(fdatasync(fd) == 0, "flush with new daemon: %s", strerror(errno));
  close(fd);
  env.Verify();
  fprintf(stderr, "daemon_killed: held I/O failed %ld ms after SIGKILL\n", ms);
}

// Malformed and out-of-protocol replies are rejected with an error from
// write(); the channel keeps working afterwards.
void TestGarbageReplies() {
  Env env("garbage");
  env.Setup();
  const uint64_t cs = env.cs;
  const ssize_t kOk = sizeof(dmcow_reply);
  Channel ch;
  CHECK(ch.Open(env.ident) == 0, "open channel");
  Channel other;
  CHECK(other.Open(env.ident) == -EBUSY, "second open not EBUSY");

  pid_t pid = fork();
  if (pid == 0) {  // root, but without CAP_SYS_ADMIN
    __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct caps[2] = {};
    if (syscall(SYS_capget, &hdr, caps)) _exit(2);
    caps[CAP_SYS_ADMIN / 32].effective &= ~(1U << (CAP_SYS_ADMIN % 32));
    caps[CAP_SYS_ADMIN / 32].permitted &= ~(1U << (CAP_SYS_ADMIN % 32));
    if (syscall(SYS_capset, &hdr, caps)) _exit(3);
    int r = open(dmcow::ChannelPath(env.ident).c_str(), O_RDWR);
    _exit(r < 0 && errno == EPERM ? 0 : 1);
  }
  int st = 0;
  waitpid(pid, &st, 0);
  CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "unprivileged open not EPERM");

  // Handshake.
  CHECK(ch.Write(dmcow::PushReply(DMCOW_MAP_ZERO, 1, 1, 0)) == -EPROTO, "reply before handshake");
  CHECK(ch.Poll(2000) > 0, "no HELLO");
  std::vector<dmcow_request> reqs;
  CHECK(ch.Read(&reqs) == 1 && reqs[0].kind == DMCOW_REQ_HELLO, "HELLO");
  dmcow_request hello = reqs[0];
  CHECK(hello.version == DMCOW_ABI_VERSION && hello.chunk_sectors == cs && hello.nr_chunks == env.sectors / cs &&
            hello.cow_sectors == env.cow_sectors && hello.features == 0 && hello.max_requests > 0,
        "HELLO contents");
  dmcow_reply h{};
  h.kind = DMCOW_REP_HELLO;
  h.seq = hello.seq;
  h.version = DMCOW_ABI_VERSION + 1;
  CHECK(ch.Write(h) == -EPROTONOSUPPORT, "wrong version accepted");
  h.version = DMCOW_ABI_VERSION;
  h.seq = hello.seq + 1;
  CHECK(ch.Write(h) == -EINVAL, "wrong HELLO seq accepted");
  h.seq = hello.seq;
  CHECK(ch.Write(h) == kOk, "HELLO");
  CHECK(ch.Write(h) == -EPROTO, "second HELLO accepted");

  // Static garbage.
  char raw[3 * sizeof(dmcow_reply)] = {};
  CHECK(ch.WriteRaw(raw, 0) == -EINVAL, "empty write");
  CHECK(ch.WriteRaw(raw, 63) == -EINVAL, "short message");
  CHECK(ch.WriteRaw(raw, 65) == -EINVAL, "long message");
  CHECK(ch.WriteRaw(raw, 64) == -EINVAL, "all-zero message");
  struct Bad {
    const char* what;
    dmcow_reply rep;
  };
  auto push = [](uint32_t map, uint64_t chunk, uint64_t nr, uint64_t sector) {
    return dmcow::PushReply(map, chunk, nr, sector);
  };
  std::vector<Bad> bad = {
      {"unknown kind",
       [] {
         dmcow_reply r{};
         r.kind = 99;
         return r;
       }()},
      {"unknown seq", dmcow::MapReply(424242, DMCOW_MAP_RW, 1, 1, 0)},
      {"map without seq", dmcow::MapReply(0, DMCOW_MAP_RW, 1, 1, 0)},
      {"push with seq",
       [] {
         auto r = dmcow::PushReply(DMCOW_MAP_ZERO, 1, 1, 0);
         r.seq = 5;
         return r;
       }()},
      {"chunk out of range", push(DMCOW_MAP_ZERO, env.sectors / cs, 1, 0)},
      {"extent out of range", push(DMCOW_MAP_ZERO, env.sectors / cs - 1, 2, 0)},
      {"extent overflow", push(DMCOW_MAP_ZERO, 1, ~0ULL, 0)},
      {"empty extent", push(DMCOW_MAP_ZERO, 1, 0, 0)},
      {"cow out of range", push(DMCOW_MAP_FILLED_RW, 1, 1, env.cow_sectors - cs / 2)},
      {"cow overflow", push(DMCOW_MAP_RO, 1, 1, ~0ULL - 3)},
      {"fill extent too long", push(DMCOW_MAP_RW, 0, DMCOW_MAX_FILL_EXTENT + 1, 0)},
      {"map kind 0", push(0, 1, 1, 0)},
      {"map kind 99", push(99, 1, 1, 0)},
      {"zero with cow sector", push(DMCOW_MAP_ZERO, 1, 1, 8)},
      {"reserved set",
       [&] {
         auto r = push(DMCOW_MAP_ZERO, 1, 1, 0);
         r.reserved[1] = 1;
         return r;
       }()},
      {"version set",
       [&] {
         auto r = push(DMCOW_MAP_ZERO, 1, 1, 0);
         r.version = 1;
         return r;
       }()},
      {"invalidate with map",
       [] {
         auto r = dmcow::InvalidateReply(1, 1);
         r.map = DMCOW_MAP_RW;
         return r;
       }()},
      {"flush ack unknown seq", dmcow::FlushAck(777)},
      {"flush ack seq 0", dmcow::FlushAck(0)},
      {"error without errno", dmcow::ErrorReply(777, 0)},
      {"error unknown seq", dmcow::ErrorReply(777, EIO)},
  };
  for (const auto& b : bad) {
    ssize_t r = ch.Write(b.rep);
    CHECK(r == -EINVAL, "%s: write returned %zd", b.what, r);
  }
  // A batch is applied up to the first bad message.
  dmcow_reply batch[2] = {push(DMCOW_MAP_ZERO, 60, 1, 0), bad[0].rep};
  CHECK(ch.WriteRaw(batch, sizeof(batch)) == kOk, "partial batch");
  env.SetModelZero(60 * cs, cs);

  // Replies to a real request.
  int fd = OpenDirect(env.dev);
  Async w([&] { return env.Write(fd, 7 * cs, 8, 0x7); });
  CHECK(ch.Poll(5000) > 0, "no request");
  CHECK(ch.Read(&reqs) == 1 && reqs[0].kind == DMCOW_REQ_MAP_WRITE && reqs[0].chunk == 7, "MAP_WRITE for chunk 7");
  uint64_t seq = reqs[0].seq;
  CHECK(ch.Write(dmcow::FlushAck(seq)) == -EINVAL, "FLUSH_ACK for a MAP request");
  CHECK(ch.Write(dmcow::MapReply(seq, DMCOW_MAP_RW, 8, 1, 0)) == -EINVAL, "extent without the requested chunk");
  CHECK(ch.Write(dmcow::MapReply(seq, DMCOW_MAP_RO, 7, 1, 0)) == -EINVAL, "RO answer to a write");
  CHECK(ch.Write(dmcow::MapReply(seq, DMCOW_MAP_ZERO, 7, 1, 0)) == -EINVAL, "ZERO answer to a write");
  CHECK(!w.Wait(100), "write completed before a valid reply");
  CHECK(ch.Write(dmcow::MapReply(seq, DMCOW_MAP_RW, 7, 1, 0)) == kOk, "valid reply");
  CHECK(w.Wait(10000) && w.result() == 0, "write: %d", w.result());
  CHECK(ch.Write(dmcow::MapReply(seq, DMCOW_MAP_RW, 7, 1, 0)) == -EINVAL, "second reply to one request");
  close(fd);
  env.Verify();

  // Random messages: rejected or applied, never a crash.
  uint32_t x = 99;
  auto rnd = [&x] { return x = x * 1664525 + 1013904223; };
  for (int i = 0; i < 300; i++) {
    dmcow_reply r{};
    r.seq = rnd() % 4 ? rnd() : 0;
    r.kind = rnd() % 8;
    r.map = rnd() % 7;
    r.chunk = rnd() % 80;
    r.nr_chunks = rnd() % 5;
    r.cow_sector = (rnd() % 3) ? (rnd() % 20000) : rnd();
    r.error = rnd() % 2 ? rnd() % 200 : 0;
    ssize_t n = ch.Write(r);
    CHECK(n == kOk || n == -EINVAL || n == -EBUSY || n == -EPROTO, "random message %d: %zd", i, n);
  }
  CHECK(env.GetStatus().daemon == "ready", "channel state after garbage");
}

// An ERROR reply fails the write with that errno.
void TestErrorReply() {
  Env env("errreply");
  env.Setup();
  Responder resp(env.ident, env.cs);
  resp.SetHook([](const dmcow_request& req, std::vector<dmcow_reply>* out) {
    if (req.kind != DMCOW_REQ_MAP_WRITE || req.chunk != 9) return false;
    out->push_back(dmcow::ErrorReply(req.seq, ENOSPC));
    return true;
  });
  CHECK(resp.Start() == 0, "responder start");
  int fd = OpenDirect(env.dev);
  int r = env.Write(fd, 9 * env.cs, 8, 0x9);
  CHECK(r == -ENOSPC, "write: %d", r);
  CHECK(env.Write(fd, 8 * env.cs, 8, 0x8) == 0, "write to another chunk");
  close(fd);
  env.Verify();
  CHECK(env.GetStatus().errors == 1, "errors");
}

// Table arguments: two targets of one ident share the mapping store and the
// channel (chunks are device-wide); bad arguments are refused.
void TestSharedIdentAndArgs() {
  Env env("shared");
  env.Setup();
  const uint64_t cs = env.cs;
  env.Reload(env.CowLine(0, 4096) + "\n" + env.CowLine(4096, env.sectors - 4096));
  Responder resp(env.ident, cs);
  CHECK(resp.Start() == 0, "responder start");
  int fd = OpenDirect(env.dev);
  CHECK(env.Write(fd, 2 * cs, 8, 0x2) == 0, "write in target 1");
  CHECK(env.Write(fd, 40 * cs, 8, 0x40) == 0, "write in target 2");
  close(fd);
  CHECK(resp.CountChunk(DMCOW_REQ_MAP_WRITE, 2) == 1 && resp.CountChunk(DMCOW_REQ_MAP_WRITE, 40) == 1,
        "requests are not in device-wide chunks");
  CHECK(env.GetStatus().mapped == 2, "shared mapping store");
  env.Verify();

  // Each bad table must be refused for the expected reason (kernel log).
  auto refused = [&](const std::string& table, const char* reason) {
    std::string before = KernelLog(), out;
    int st = Run({kDmsetup, "create", "shared-bad", "--noudevsync", "--verifyudev", "--table", table}, &out);
    if (st == 0) Run({kDmsetup, "remove", "shared-bad", "--noudevsync"});
    CHECK(st != 0, "table accepted: %s", table.c_str());
    std::string log = KernelLog();
    std::string added = log.size() > before.size() ? log.substr(before.size()) : log;
    CHECK(added.find(reason) != std::string::npos, "refused without \"%s\": %s", reason, added.c_str());
  };
  std::string dev2 = env.base_loop + " " + env.cow_loop;
  refused(Fmt("0 8192 cow %s %s 256", env.ident.c_str(), dev2.c_str()), "Ident in use with different");
  refused(Fmt("0 8192 cow other %s 100", dev2.c_str()), "Invalid chunk size");
  refused(Fmt("0 8 linear %s 0\n8 8184 cow other %s 128", env.base_loop.c_str(), dev2.c_str()),
          "Target start is not chunk aligned");
  refused(Fmt("0 8192 cow other %s 128 1 frobnicate", dev2.c_str()), "Unknown feature");
  refused(Fmt("0 8192 cow bad/ident %s 128", dev2.c_str()), "Invalid ident");
  refused(Fmt("0 8192 cow .. %s 128", dev2.c_str()), "Invalid ident");  // /dev/dm-cow/..
  refused(Fmt("0 16384 cow other %s 128", dev2.c_str()), "too small");
  refused(Fmt("0 8192 cow other %s", dev2.c_str()), "Invalid argument count");
}

// With max_requests = 2, many writers on different chunks still complete
// (the rest wait in order) and no more than 2 requests are outstanding.
void TestBoundedRequests() {
  const char* param = "/sys/module/dm_cow/parameters/max_requests";
  auto set = [&](const char* v) {
    int pfd = open(param, O_WRONLY | O_CLOEXEC);
    CHECK(pfd >= 0, "open %s", param);
    CHECK(write(pfd, v, strlen(v)) > 0, "set max_requests");
    close(pfd);
  };
  set("2");
  struct Restore {
    std::function<void()> f;
    ~Restore() { f(); }
  } restore{[&] {
    int pfd = open(param, O_WRONLY | O_CLOEXEC);
    if (pfd >= 0) {
      (void)!write(pfd, "256", 3);
      close(pfd);
    }
  }};
  Env env("bounded");
  env.Setup();
  Responder resp(env.ident, env.cs);
  std::atomic<size_t> max_outstanding{0};
  resp.SetReplyDelayMs(20);
  CHECK(resp.Start() == 0, "responder start");
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; t++) {
    threads.emplace_back([&, t] {
      int fd = open(env.dev.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
      for (int i = 0; i < 3; i++)
        if (fd < 0 || env.Write(fd, (t * 3 + i) * env.cs, 8, 0x200 + t * 3 + i)) errors++;
      if (fd >= 0) close(fd);
    });
  }
  std::atomic<bool> done{false};
  std::thread sampler([&] {
    while (!done) {
      max_outstanding = std::max<size_t>(max_outstanding, env.GetStatus().outstanding);
      SleepMs(10);
    }
  });
  for (auto& th : threads) th.join();
  done = true;
  sampler.join();
  CHECK(errors == 0, "%d writes failed", errors.load());
  CHECK(max_outstanding <= 2, "outstanding requests reached %zu", max_outstanding.load());
  CHECK(resp.Count(DMCOW_REQ_MAP_WRITE) == 24, "requests: %zu", resp.Count(DMCOW_REQ_MAP_WRITE));
  env.Verify();
}

// A noflush suspend with an unanswered request completes without the daemon
// (the held write is pushed back to dm core), a reload goes through, and
// after the resume the write waits for the reply again and then lands.
void TestNoflushSuspend() {
  Env env("noflush");
  env.Setup();
  Channel ch;
  CHECK(ch.Open(env.ident) == 0, "open channel");
  CHECK(ch.Handshake() == 0, "handshake");
  int fd = OpenDirect(env.dev);
  Async w([&] { return env.Write(fd, 5 * env.cs + 8, 8, 0x5); });
  std::vector<dmcow_request> reqs;
  CHECK(ch.Poll(5000) > 0 && ch.Read(&reqs) == 1 && reqs[0].kind == DMCOW_REQ_MAP_WRITE && reqs[0].chunk == 5,
        "MAP_WRITE for chunk 5");
  uint64_t seq = reqs[0].seq;
  Async suspend([&] { return Run({kDmsetup, "suspend", "--noflush", env.name}); });
  CHECK(suspend.Wait(10000), "noflush suspend waited for the daemon");
  CHECK(suspend.result() == 0, "dmsetup suspend --noflush: %d", suspend.result());
  CHECK(!w.done(), "held write completed during the suspend (%d)", w.result());
  Dmsetup({"reload", env.name, "--table", env.Table()});
  Dmsetup({"resume", env.name, "--noudevsync"});
  CHECK(!w.Wait(300), "write completed without a reply (%d)", w.result());
  CHECK(ch.Poll(0) == 0, "the reissued write caused a second request");
  CHECK(ch.Write(dmcow::MapReply(seq, DMCOW_MAP_RW, 5, 1, 0)) == sizeof(dmcow_reply), "reply");
  CHECK(w.Wait(10000) && w.result() == 0, "write after resume: %d", w.result());
  close(fd);
  env.Verify();
}

// Flush ordering: a FLUSH is readable only when every fill started before
// the read is complete (and flushed).  cow_dev delays writes by 400 ms, so a
// FLUSH read during a fill would see the chunk still unmapped.
void TestFlushOrdering() {
  Env env("flushorder");
  env.Setup("", 400);
  const uint64_t cs = env.cs;
  Channel ch;
  CHECK(ch.Open(env.ident) == 0, "open channel");
  CHECK(ch.Handshake() == 0, "handshake");
  std::vector<dmcow_request> reqs;
  auto read_one = [&](uint32_t kind) {
    CHECK(ch.Poll(10000) > 0, "no request of kind %u", kind);
    CHECK(ch.Read(&reqs, 1) == 1 && reqs[0].kind == kind, "expected kind %u, got %u", kind,
          reqs.empty() ? 0 : reqs[0].kind);
    return reqs[0];
  };
  int fd = OpenDirect(env.dev);

  // 1. Fill started, then a flush arrives: its FLUSH waits for the fill.
  Async w1([&] { return env.Write(fd, 1 * cs + 8, 8, 0x1); });
  dmcow_request r1 = read_one(DMCOW_REQ_MAP_WRITE);
  CHECK(ch.Write(dmcow::MapReply(r1.seq, DMCOW_MAP_RW, 1, 1, 0)) == 64, "reply 1");
  int ffd = OpenDirect(env.dev);
  Async f1([&] { return fdatasync(ffd) ? -errno : 0; });
  dmcow_request fl1 = read_one(DMCOW_REQ_FLUSH);
  CHECK(env.GetStatus().mapped == 1, "FLUSH delivered while the fill of chunk 1 ran");
  CHECK(ch.Write(dmcow::FlushAck(fl1.seq)) == 64, "ack 1");
  CHECK(f1.Wait(10000) && f1.result() == 0, "flush 1: %d", f1.result());
  CHECK(w1.Wait(10000) && w1.result() == 0, "write 1: %d", w1.result());

  // 2. FLUSH queued and readable, then a reply starts a fill: the FLUSH is
  //    held back until that fill is done too.
  int fd2 = OpenDirect(env.dev);
  Async w2([&] { return env.Write(fd2, 2 * cs + 8, 8, 0x2); });
  dmcow_request r2 = read_one(DMCOW_REQ_MAP_WRITE);
  Async f2([&] { return fdatasync(ffd) ? -errno : 0; });
  CHECK(ch.Poll(10000) > 0, "FLUSH never became readable");
  CHECK(ch.Write(dmcow::MapReply(r2.seq, DMCOW_MAP_RW, 2, 1, cs)) == 64, "reply 2");
  dmcow_request fl2 = read_one(DMCOW_REQ_FLUSH);
  CHECK(env.GetStatus().mapped == 2, "FLUSH delivered while the fill of chunk 2 ran");
  CHECK(ch.Write(dmcow::FlushAck(fl2.seq)) == 64, "ack 2");
  CHECK(f2.Wait(10000) && f2.result() == 0, "flush 2: %d", f2.result());
  CHECK(w2.Wait(10000) && w2.result() == 0, "write 2: %d", w2.result());
  close(fd2);
  close(ffd);
  close(fd);
  env.Verify();
}

// Channel opens of one ident while tables of another ident are created and
// removed.  open() runs under the misc device lock and creating an ident
// registers a misc device: neither may wait for the other's lock (AB-BA).
void TestOpenDuringCreate() {
  Env env("openrace");
  env.Setup();
  std::atomic<bool> stop{false};
  std::atomic<int> opens{0}, bad{0};
  std::thread opener([&] {
    while (!stop) {
      int fd = open(dmcow::ChannelPath(env.ident).c_str(), O_RDWR | O_CLOEXEC);
      if (fd >= 0) {
        opens++;
        close(fd);
      } else if (errno != EBUSY) {
        bad++;
      }
    }
  });
  const std::string other = "openrace-b";
  std::string table = Fmt("0 %llu cow %s %s %s %u", (unsigned long long)env.sectors, other.c_str(),
                          env.base_loop.c_str(), env.cow_loop.c_str(), env.cs);
  Async churn([&] {
    for (int i = 0; i < 8; i++) {
      if (Run({kDmsetup, "create", other, "--noudevsync", "--verifyudev", "--table", table})) return 1000 + i;
      if (Run({kDmsetup, "remove", other, "--noudevsync", "--verifyudev"})) return 2000 + i;
    }
    return 0;
  });
  bool done = churn.Wait(20000);
  stop = true;
  if (!done) {
    opener.detach();  // stuck in the kernel
    CHECK(false, "create/remove of another ident hung while channels opened");
  }
  opener.join();
  CHECK(churn.result() == 0, "dmsetup create/remove failed (%d)", churn.result());
  CHECK(bad == 0 && opens > 0, "channel opens: %d ok, %d failed", opens.load(), bad.load());
}

// Sets a module parameter for the scope.
class ParamGuard {
 public:
  ParamGuard(std::string path, const std::string& value) : path_(std::move(path)), old_(ReadText(path_)) {
    CHECK(!old_.empty(), "no %s", path_.c_str());
    WriteText(path_, value + "\n");
  }
  ~ParamGuard() { WriteText(path_, old_); }

 private:
  std::string path_, old_;
};

// The kernel keeps at most cache_chunks mappings the daemon can give again
// (BASE, and ZERO with read_to_daemon) and drops older ones to make room;
// RW mappings, and ZERO without read_to_daemon, are never dropped. A MAP
// reply bigger than what fits is cut to the part from the requested chunk
// on; a PUSH bigger than the whole cache is refused with E2BIG, and the
// device goes on serving.
void TestCacheBound() {
  const uint64_t cap = 8;
  ParamGuard guard("/sys/module/dm_cow/parameters/cache_chunks", std::to_string(cap));
  const ssize_t kOk = sizeof(dmcow_reply);
  {
    Env env("cache");  // 64 chunks
    env.Setup("read_to_daemon");
    const uint64_t cs = env.cs, chunks = env.sectors / cs;
    Responder resp(env.ident, cs);
    const uint64_t ext = resp.AllocCow(4);
    env.WriteCow(ext, 4 * cs, 0x20, 20 * cs);
    env.SetModel(20 * cs, 4 * cs, 0x20);
    env.SetModelZero(40 * cs, 24 * cs);
    // Whole-device answers: FILLED_RW for 20..23, ZERO from 40 on (but for
    // chunk 60 once written), BASE extents up to the next of those.
    std::atomic<bool> written{false};
    resp.SetHook([&](const dmcow_request& req, std::vector<dmcow_reply>* out) {
      if (req.kind != DMCOW_REQ_MAP_READ) return false;
      const uint64_t c = req.chunk;
      if (c >= 20 && c < 24) {
        out->push_back(dmcow::MapReply(req.seq, DMCOW_MAP_FILLED_RW, 20, 4, ext));
      } else if (c >= 40) {
        const uint64_t lo = written && c > 60 ? 61 : 40, hi = written && c < 60 ? 60 : chunks;
        out->push_back(dmcow::MapReply(req.seq, DMCOW_MAP_ZERO, lo, hi - lo, 0));
      } else {
        out->push_back(dmcow::MapReply(req.seq, DMCOW_MAP_BASE, c, (c < 20 ? 20 : 40) - c, 0));
      }
      return true;
    });
    CHECK(resp.Start() == 0, "responder start");
    for (int pass = 0; pass < 3; pass++) {
      env.Verify();
      const Status st = env.GetStatus();
      CHECK(st.cached <= cap && st.cache_max == cap && st.mapped == st.cached + 4,
            "pass %d: %llu mapped, %llu cached of %llu", pass, (unsigned long long)st.mapped,
            (unsigned long long)st.cached, (unsigned long long)st.cache_max);
    }
    Status st = env.GetStatus();
    CHECK(st.dropped >= 3 * (chunks - 4 - cap), "dropped %llu", (unsigned long long)st.dropped);
    // Bad input: more than the cache in one PUSH; the largest that fits.
    for (uint32_t kind : {DMCOW_MAP_ZERO, DMCOW_MAP_BASE}) {
      ssize_t r = resp.Send(dmcow::PushReply(kind, 30, cap + 1, 0));
      CHECK(r == -E2BIG, "push of %llu chunks of kind %u: %zd", (unsigned long long)cap + 1, kind, r);
    }
    CHECK(resp.Send(dmcow::PushReply(DMCOW_MAP_ZERO, 40, cap, 0)) == kOk, "push of a full cache");
    st = env.GetStatus();
    CHECK(st.cached == cap && st.mapped == cap + 4, "after push: %llu mapped, %llu cached",
          (unsigned long long)st.mapped, (unsigned long long)st.cached);
    // A write over a dropped ZERO chunk: the whole chunk, so no fill copies.
    written = true;
    int fd = OpenDirect(env.dev);
    CHECK(env.Write(fd, 60 * cs, cs, 0x60) == 0, "write chunk 60");
    close(fd);
    env.Verify();
    CHECK(env.GetStatus().daemon == "ready", "daemon state");
    CHECK(resp.Error().empty(), "responder: %s", resp.Error().c_str());
  }
  {
    // Without read_to_daemon an unmapped chunk reads base_dev: ZERO is the
    // daemon's word and stays, however many.
    Env env("cachepin");
    env.Setup();
    const uint64_t cs = env.cs;
    Responder resp(env.ident, cs);
    CHECK(resp.Start() == 0, "responder start");
    CHECK(resp.Send(dmcow::PushReply(DMCOW_MAP_ZERO, 0, 32, 0)) == kOk, "push of 32 ZERO");
    env.SetModelZero(0, 32 * cs);
    CHECK(resp.Send(dmcow::PushReply(DMCOW_MAP_BASE, 40, cap + 1, 0)) == -E2BIG, "push of BASE");
    CHECK(resp.Send(dmcow::PushReply(DMCOW_MAP_BASE, 40, cap, 0)) == kOk, "push of BASE");
    env.Verify();
    const Status st = env.GetStatus();
    CHECK(st.mapped == 32 + cap && st.cached == cap, "%llu mapped, %llu cached", (unsigned long long)st.mapped,
          (unsigned long long)st.cached);
    CHECK(resp.Error().empty(), "responder: %s", resp.Error().c_str());
  }
}

const TestCase kTests[] = {
    {"unmapped_read", TestUnmappedRead},
    {"partial_write", TestPartialWrite},
    {"full_chunk_write", TestFullChunkWrite},
    {"concurrent_writers", TestConcurrentWriters},
    {"extent_reply", TestExtentReply},
    {"pushed_mappings", TestPushedMappings},
    {"read_to_daemon", TestReadToDaemon},
    {"flush_waits_for_ack", TestFlushWaitsForAck},
    {"flush_ordering", TestFlushOrdering},
    {"reload_under_io", TestReloadUnderIo},
    {"noflush_suspend", TestNoflushSuspend},
    {"daemon_killed", TestDaemonKilled},
    {"garbage_replies", TestGarbageReplies},
    {"error_reply", TestErrorReply},
    {"shared_ident_and_args", TestSharedIdentAndArgs},
    {"bounded_requests", TestBoundedRequests},
    {"open_during_create", TestOpenDuringCreate},
    {"cache_bound", TestCacheBound},
};

}  // namespace

int main(int argc, char** argv) {
  return dmcow_vm::TestMain(argc, argv, "vmtest", kTests, sizeof(kTests) / sizeof(kTests[0]), "DMCOW_TEST_TIMEOUT", 60);
}
