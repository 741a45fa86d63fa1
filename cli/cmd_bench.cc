// dmcow-img bench: qemu-img bench.
//
//   bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=N [--no-drain]] [-i AIO] [-n] [-o OFFSET]
//         [--pattern=BYTE] [-q] [-s BUFFER_SIZE] [-S STEP] [-t CACHE] [-w] [-U] [--image-opts] FILE
//
// COUNT requests of BUFFER_SIZE bytes, the first at OFFSET and each next
// STEP (default BUFFER_SIZE) further on, wrapping at the virtual size, as
// qemu-img 7.2 issues them; writes (-w) carry the byte --pattern, and with
// --flush-interval=N a flush follows each N-th request. A request crossing
// the end of the image fails, as in qemu-img ("Failed request:
// Input/output error", exit 1). Output, checks and messages are
// qemu-img's; only the time differs.
//
// How the requests run: reads come from DEPTH threads at once (at most
// kMaxReadThreads), each taking the next request, so DEPTH measures what
// concurrent readers get from the engine. Writes are issued one after
// another (the engine orders writes to one image: more threads would only
// queue), so DEPTH only bounds what qemu-img's drain would have had in
// flight; --no-drain is accepted and changes nothing then. Deliberate
// difference: DEPTH 0 is refused (qemu-img 7.2 waits forever).
#include <getopt.h>
#include <sys/time.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cli_common.h"
#include "locking_env.h"
#include "object_option.h"

namespace dmcow::cli {
namespace {

constexpr unsigned kMaxReadThreads = 16;

struct BenchArgs {
  std::string filename;
  std::string format;  // -f
  uint64_t count = 75000;
  uint64_t depth = 64;
  uint64_t offset = 0;
  uint64_t buffer_size = 4096;
  uint64_t step = 0;  // 0: buffer_size
  uint64_t flush_interval = 0;
  uint8_t pattern = 0;
  std::string cache = "writeback";
  std::string aio = "threads";
  bool native_aio = false;   // -n
  bool write = false;        // -w
  bool quiet = false;        // -q
  bool force_share = false;  // -U
  bool image_opts = false;
};

void PrintUsage() {
  std::printf(
      "usage: %s bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=N [--no-drain]] [-i AIO] [-n] "
      "[-o OFFSET] [--pattern=BYTE] [-q] [-s BUFFER_SIZE] [-S STEP] [-t CACHE] [-w] [-U] [--image-opts] FILE\n\n"
      "Times COUNT reads (or writes, -w) of BUFFER_SIZE bytes, from OFFSET on in steps of STEP.\n",
      kProgName);
}

// qemu_strtoul(text, NULL, 0) into *out when it is at most `max`.
bool ParseUnsigned(const char* text, uint64_t max, uint64_t* out) {
  if (*text == '\0') return false;
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(text, &end, 0);
  if (errno != 0 || *end != '\0' || value > max) return false;
  *out = value;
  return true;
}

std::optional<int> ParseBench(int argc, char** argv, BenchArgs* args) {
  enum { kFlushInterval = 256, kImageOpts, kPattern, kNoDrain };
  static const struct option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                        {"object", required_argument, nullptr, kObjectOption},
                                        {"flush-interval", required_argument, nullptr, kFlushInterval},
                                        {"image-opts", no_argument, nullptr, kImageOpts},
                                        {"pattern", required_argument, nullptr, kPattern},
                                        {"no-drain", no_argument, nullptr, kNoDrain},
                                        {"force-share", no_argument, nullptr, 'U'},
                                        {nullptr, 0, nullptr, 0}};
  std::vector<std::string> operands;
  auto invalid = [](const char* what) -> std::optional<int> {
    PrintError(std::string("Invalid ") + what + " specified");
    return 1;
  };
  auto on_option = [&](int c, const char* arg) -> std::optional<int> {
    switch (c) {
      case 'h': PrintUsage(); return 0;
      case 'c':
        if (!ParseUnsigned(arg, INT_MAX, &args->count)) return invalid("request count");
        break;
      case 'd':
        if (!ParseUnsigned(arg, INT_MAX, &args->depth) || args->depth == 0) return invalid("queue depth");
        break;
      case 'f': args->format = arg; break;
      case 'n': args->native_aio = true; break;
      case 'i': {
        const std::string aio = arg;
        if (aio != "threads" && aio != "native" && aio != "io_uring") {
          PrintError("Invalid aio option: " + aio);
          return 1;
        }
        args->aio = aio;
        break;
      }
      case 'o':
        if (!ParseQemuNumber("offset", arg, 0, INT64_MAX, &args->offset)) return 1;
        break;
      case 'q': args->quiet = true; break;
      case 's':
        if (!ParseQemuNumber("buffer size", arg, 0, INT_MAX, &args->buffer_size)) return 1;
        break;
      case 'S':
        if (!ParseQemuNumber("step_size", arg, 0, INT_MAX, &args->step)) return 1;
        break;
      case 't':
        if (!ValidCacheMode(arg)) {
          PrintError("Invalid cache mode");
          return 1;
        }
        args->cache = arg;
        break;
      case 'w': args->write = true; break;
      case 'U': args->force_share = true; break;
      case kPattern: {
        uint64_t pattern = 0;
        if (!ParseUnsigned(arg, 0xff, &pattern)) return invalid("pattern byte");
        args->pattern = static_cast<uint8_t>(pattern);
        break;
      }
      case kFlushInterval:
        if (!ParseUnsigned(arg, INT_MAX, &args->flush_interval)) return invalid("flush interval");
        break;
      case kNoDrain: break;  // writes are issued one at a time: nothing to drain
      case kImageOpts: args->image_opts = true; break;
    }
    return std::nullopt;
  };
  if (auto rc = ParseGetopt(argc, argv, ":hc:d:f:ni:o:qs:S:t:wU", kLong, on_option, &operands)) return rc;
  if (operands.size() != 1) return UsageError("Expecting one image file name");
  args->filename = operands[0];
  return std::nullopt;
}

double Now() {
  struct timeval tv;
  gettimeofday(&tv, nullptr);
  return static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / 1e6;
}

// Where request `i` goes: the first at `start`, each next `step` further,
// modulo the image size (qemu-img's b->offset += step; b->offset %= size).
uint64_t RequestOffset(uint64_t start, uint64_t step, uint64_t size, uint64_t i) {
  if (i == 0 || size == 0) return start;
  const unsigned __int128 at = static_cast<unsigned __int128>(start) + static_cast<unsigned __int128>(step) * i;
  return static_cast<uint64_t>(at % size);
}

// One request; a range past the end is qemu's EIO.
Status Request(Image* image, bool write, uint64_t offset, uint8_t* buf, uint64_t len) {
  const uint64_t size = image->virtual_size();
  if (offset > size || len > size - offset) return Status::IOError("Input/output error");
  if (len == 0) return Status::OK();
  return write ? image->Write(offset, buf, len) : image->Read(offset, buf, len);
}

int RunBench(const BenchArgs& args) {
  if (args.flush_interval != 0 && !args.write) {
    PrintError("--flush-interval is only available in write tests");
    return 1;
  }
  if (args.flush_interval != 0 && args.flush_interval < args.depth) {
    PrintError("Flush interval can't be smaller than depth");
    return 1;
  }
  if (ImageOptsWithFormat(args.image_opts, args.format)) return 1;
  OpenOptions options;
  options.format = args.format;
  std::string path;
  if (!ImageArgument(args.filename, args.image_opts, &path, &options)) return 1;
  if ((args.native_aio || args.aio == "native") && args.cache != "none" && args.cache != "off" &&
      args.cache != "directsync") {
    PrintError("Could not open '" + args.filename +
               "': aio=native was specified, but it requires cache.direct=on, which was not specified.");
    return 1;
  }
  if (args.write && args.force_share) {
    PrintError("Could not open '" + args.filename + "': force-share=on can only be used with read-only images");
    return 1;
  }
  LockingEnv env(Env::Default(), {path, LockingEnv::ReadMode(args.force_share)});
  options.env = &env;
  options.writable = args.write;
  std::unique_ptr<Image> image;
  if (!OpenImageOrReport(args.filename, path, options, &image).ok()) return 1;
  if (args.write && options.format.empty()) WarnIfProbedRaw(*image, path);

  const uint64_t size = image->virtual_size();
  const uint64_t step = args.step != 0 ? args.step : args.buffer_size;
  std::printf("Sending %d %s requests, %d bytes each, %d in parallel (starting at offset %lld, step size %d)\n",
              static_cast<int>(args.count), args.write ? "write" : "read", static_cast<int>(args.buffer_size),
              static_cast<int>(args.depth), static_cast<long long>(args.offset), static_cast<int>(step));
  if (args.flush_interval != 0) std::printf("Sending flush every %d requests\n", static_cast<int>(args.flush_interval));
  std::fflush(stdout);

  const double start = Now();
  Status failed;
  std::string failed_what;  // what failed, when it was not a request itself
  if (args.write) {
    std::vector<uint8_t> buf(args.buffer_size, args.pattern);
    for (uint64_t i = 0; i < args.count && failed.ok(); i++) {
      failed = Request(image.get(), true, RequestOffset(args.offset, step, size, i), buf.data(), buf.size());
      // qemu-img flushes when the requests left are a multiple of the interval.
      if (failed.ok() && args.flush_interval != 0 && (args.count - i - 1) % args.flush_interval == 0) {
        failed = image->Flush();
        if (!failed.ok()) failed_what = "flush: ";
      }
    }
  } else {
    std::atomic<uint64_t> next{0};
    std::mutex mu;
    const unsigned threads = static_cast<unsigned>(std::min<uint64_t>({args.depth, kMaxReadThreads, args.count}));
    auto reader = [&] {
      std::vector<uint8_t> buf(args.buffer_size);
      for (uint64_t i = next++; i < args.count; i = next++) {
        Status s = Request(image.get(), false, RequestOffset(args.offset, step, size, i), buf.data(), buf.size());
        if (!s.ok()) {
          std::lock_guard<std::mutex> lock(mu);
          if (failed.ok()) failed = s;
          next = args.count;  // no more requests
          return;
        }
      }
    };
    std::vector<std::thread> pool;
    for (unsigned t = 1; t < threads; t++) pool.emplace_back(reader);
    if (threads > 0) reader();
    for (std::thread& t : pool) t.join();
  }
  // As qemu-img's, the time leaves out the flush that closing the image makes.
  const double elapsed = Now() - start;
  if (failed.ok() && args.write) failed = image->Flush();
  if (!failed.ok()) {
    PrintError("Failed request: " + failed_what + MessageWithoutPath(path, failed));
    return 1;
  }
  std::printf("Run completed in %3.3f seconds.\n", elapsed);
  return 0;
}

}  // namespace

int CmdBench(int argc, char** argv) { return ParseAndRun(argc, argv, ParseBench, RunBench); }

}  // namespace dmcow::cli
