// blkio: the I/O generator of the VM benchmarks (bench/vm_bench.sh).
//
//   blkio fill FILE BYTES
//       writes a non-zero pattern into FILE (buffered; the base image).
//   blkio fill-half FILE BYTES
//       the same pattern in the first half of every 4 KiB block, zeros in
//       the second: data that deflate halves (compressed images)
//   blkio scratch-cost DIR
//       what 64 KiB written into an unlinked file in DIR costs, in us:
//       fresh pages at scattered offsets of a 1 GiB sparse file, fresh
//       pages in order, then over the existing pages (the copy alone).
//       Prints "SCRATCH-COST <case> <us per 64 KiB>" lines on stdout.
//   blkio time CMD ARGS...
//       runs CMD, prints "TIME <seconds>" (fork to exit) on stderr and
//       exits with CMD's status
//   blkio DEV read|write PATTERN [options]
//       O_DIRECT I/O on DEV; prints "RESULT <seconds> <MB/s> <IOPS>" and
//       exits 0, or names what failed and exits 1.
//
// PATTERN:
//   seq          the region in order, BS at a time (--passes times)
//   rand         --ops I/Os at uniformly random BS-aligned offsets
//   chunks-seq   one BS write at the start of every --chunk, in chunk order
//   chunks-rand  the same, chunks in a random order (each exactly once)
// Options:
//   --bs BYTES       I/O size (default 4096)
//   --threads N      I/Os in flight: N threads, each with one synchronous
//                    I/O at a time, taking the next I/O from a shared list
//   --offset BYTES   region start in DEV (default 0)
//   --size BYTES     region length (default: DEV's size - offset)
//   --ops N          rand: number of I/Os (default size / bs)
//   --passes N       seq: times over the region (default 1)
//   --chunk BYTES    chunks-*: chunk size
//   --seed N         offsets and order (same seed, same list)
//   --fsync          fdatasync(DEV) after the last I/O, inside the timing
//
// Sizes take K, M, G suffixes. The whole I/O list is built before the
// clock starts; the timed span is from the threads' start to the last
// completion (and the fdatasync).

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "blkio: %s\n", what.c_str());
  std::exit(1);
}

uint64_t ParseSize(const char* s) {
  char* end = nullptr;
  errno = 0;
  uint64_t v = std::strtoull(s, &end, 10);
  if (errno || end == s) Fail(std::string("bad number ") + s);
  switch (*end) {
    case 'K':
      v <<= 10;
      end++;
      break;
    case 'M':
      v <<= 20;
      end++;
      break;
    case 'G':
      v <<= 30;
      end++;
      break;
    default: break;
  }
  if (*end) Fail(std::string("bad number ") + s);
  return v;
}

void FillPattern(std::vector<uint64_t>* buf, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (auto& w : *buf) w = rng() | 1;  // never a zero page
}

int Fill(const char* path, uint64_t bytes, bool half) {
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) Fail(std::string("create ") + path + ": " + strerror(errno));
  std::vector<uint64_t> buf((1 << 20) / 8);
  for (uint64_t at = 0; at < bytes; at += buf.size() * 8) {
    FillPattern(&buf, at);
    if (half) {
      for (size_t w = 0; w < buf.size(); w++) {
        if (w % 512 >= 256) buf[w] = 0;  // second 2 KiB of each 4 KiB
      }
    }
    const size_t n = std::min<uint64_t>(buf.size() * 8, bytes - at);
    if (write(fd, buf.data(), n) != static_cast<ssize_t>(n))
      Fail(std::string("write ") + path + ": " + strerror(errno));
  }
  if (close(fd)) Fail(std::string("close ") + path);
  return 0;
}

int ScratchCost(const char* dir) {
  constexpr uint64_t kChunk = 65536, kSlots = (uint64_t{1} << 30) / kChunk;
  constexpr int kWrites = 512;
  std::vector<uint8_t> buf(kChunk, 0x5a);
  auto run = [&](int fd, bool scattered) {
    const auto t0 = std::chrono::steady_clock::now();
    for (uint64_t i = 0; i < kWrites; i++) {
      const uint64_t slot = scattered ? i * 7919 % kSlots : i;  // 7919: prime, spreads the slots
      if (pwrite(fd, buf.data(), kChunk, static_cast<off_t>(slot * kChunk)) != static_cast<ssize_t>(kChunk)) {
        Fail(std::string("scratch-cost: write: ") + strerror(errno));
      }
    }
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / kWrites;
  };
  for (bool scattered : {true, false}) {
    const int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate(fd, kSlots * kChunk) != 0)
      Fail(std::string("scratch-cost: ") + dir + ": " + strerror(errno));
    const char* order = scattered ? "scattered" : "in-order";
    std::printf("SCRATCH-COST fresh-pages-%s %.1f\n", order, run(fd, scattered));
    std::printf("SCRATCH-COST existing-pages-%s %.1f\n", order, run(fd, scattered));
    close(fd);
  }
  return 0;
}

int Time(char** argv) {
  const auto t0 = std::chrono::steady_clock::now();
  const pid_t pid = fork();
  if (pid < 0) Fail(std::string("fork: ") + strerror(errno));
  if (pid == 0) {
    execvp(argv[0], argv);
    std::fprintf(stderr, "blkio: cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) Fail(std::string("waitpid: ") + strerror(errno));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "TIME %.4f\n", secs);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && !strcmp(argv[1], "fill")) return Fill(argv[2], ParseSize(argv[3]), false);
  if (argc == 4 && !strcmp(argv[1], "fill-half")) return Fill(argv[2], ParseSize(argv[3]), true);
  if (argc >= 3 && !strcmp(argv[1], "time")) return Time(argv + 2);
  if (argc == 3 && !strcmp(argv[1], "scratch-cost")) return ScratchCost(argv[2]);
  if (argc < 4)
    Fail(
        "usage: blkio fill|fill-half FILE BYTES | blkio time CMD... | blkio DEV read|write "
        "seq|rand|chunks-seq|chunks-rand [options]");
  const std::string dev = argv[1], op = argv[2], pattern = argv[3];
  const bool write_op = op == "write";
  if (!write_op && op != "read") Fail("operation must be read or write, not " + op);
  uint64_t bs = 4096, threads = 1, offset = 0, size = 0, ops = 0, chunk = 0, seed = 1, passes = 1;
  bool fsync_end = false;
  for (int i = 4; i < argc; i++) {
    const std::string a = argv[i];
    auto value = [&]() -> uint64_t {
      if (i + 1 >= argc) Fail(a + " needs a value");
      return ParseSize(argv[++i]);
    };
    if (a == "--bs")
      bs = value();
    else if (a == "--threads")
      threads = value();
    else if (a == "--offset")
      offset = value();
    else if (a == "--size")
      size = value();
    else if (a == "--ops")
      ops = value();
    else if (a == "--passes")
      passes = value();
    else if (a == "--chunk")
      chunk = value();
    else if (a == "--seed")
      seed = value();
    else if (a == "--fsync")
      fsync_end = true;
    else
      Fail("unknown option " + a);
  }

  const int fd = open(dev.c_str(), (write_op ? O_RDWR : O_RDONLY) | O_DIRECT | O_CLOEXEC);
  if (fd < 0) Fail("open " + dev + ": " + strerror(errno));
  uint64_t dev_bytes = 0;
  struct stat st;
  if (fstat(fd, &st)) Fail("stat " + dev + ": " + strerror(errno));
  if (S_ISREG(st.st_mode))
    dev_bytes = st.st_size;  // a file: for trying blkio out
  else if (ioctl(fd, BLKGETSIZE64, &dev_bytes))
    Fail("BLKGETSIZE64 " + dev + ": " + strerror(errno));
  if (offset > dev_bytes) Fail("offset beyond the device");
  if (!size) size = dev_bytes - offset;
  if (offset + size > dev_bytes) Fail("region beyond the device");
  if (!bs || bs % 512 || offset % 512 || threads < 1 || threads > 64) Fail("bad --bs, --offset or --threads");

  // The I/O list: offsets inside the region.
  std::vector<uint64_t> list;
  std::mt19937_64 rng(seed);
  if (pattern == "seq") {
    for (uint64_t p = 0; p < passes; p++)
      for (uint64_t at = 0; at + bs <= size; at += bs) list.push_back(at);
  } else if (pattern == "rand") {
    const uint64_t slots = size / bs;
    if (!slots) Fail("region smaller than --bs");
    if (!ops) ops = slots;
    for (uint64_t i = 0; i < ops; i++) list.push_back((rng() % slots) * bs);
  } else if (pattern == "chunks-seq" || pattern == "chunks-rand") {
    if (!write_op) Fail(pattern + " is for writes");
    if (!chunk || chunk % bs || size % chunk) Fail("--chunk must be a multiple of --bs and divide the region");
    for (uint64_t at = 0; at < size; at += chunk) list.push_back(at);
    if (pattern == "chunks-rand") std::shuffle(list.begin(), list.end(), rng);
  } else {
    Fail("unknown pattern " + pattern);
  }
  if (list.empty()) Fail("nothing to do");

  std::vector<void*> bufs(threads);
  for (uint64_t t = 0; t < threads; t++) {
    if (posix_memalign(&bufs[t], 4096, bs)) Fail("posix_memalign");
    std::vector<uint64_t> pattern_words(bs / 8);
    FillPattern(&pattern_words, seed * 1000 + t);
    std::memcpy(bufs[t], pattern_words.data(), bs);
  }

  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::string error;
  std::atomic_flag error_set = ATOMIC_FLAG_INIT;
  auto worker = [&](uint64_t t) {
    for (;;) {
      const uint64_t i = next.fetch_add(1);
      if (i >= list.size() || failed) return;
      const off_t at = static_cast<off_t>(offset + list[i]);
      const ssize_t r = write_op ? pwrite(fd, bufs[t], bs, at) : pread(fd, bufs[t], bs, at);
      if (r != static_cast<ssize_t>(bs)) {
        if (!error_set.test_and_set())
          error = std::string(write_op ? "pwrite" : "pread") + " at " + std::to_string(at) + ": " +
                  (r < 0 ? strerror(errno) : "short");
        failed = true;
        return;
      }
    }
  };
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (uint64_t t = 0; t < threads; t++) pool.emplace_back(worker, t);
  for (auto& th : pool) th.join();
  if (failed) Fail(dev + ": " + error);
  if (fsync_end && fdatasync(fd)) Fail("fdatasync " + dev + ": " + strerror(errno));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  close(fd);
  const double bytes = static_cast<double>(list.size()) * bs;
  std::printf("RESULT %.4f %.2f %.0f\n", secs, bytes / secs / 1e6, list.size() / secs);
  return 0;
}
