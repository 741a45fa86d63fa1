// dmcow-img compare: qemu-img compare (qemu-img.c img_compare).
// Exit codes: 0 identical, 1 different, 2 open error, 3 block status error,
// 4 read error; command line errors exit with 1 as in qemu-img.
#include <algorithm>
#include <cassert>
#include <cstdio>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli_common.h"
#include "locking_env.h"
#include "range_compare.h"

namespace dmcow::cli {
namespace {

// Runs are queued until this much is (zero runs count), then compared: one
// start of the threads per 64-128 MiB walked, sooner where a long zero run
// follows data. A run with data is cut to it (a multiple of qemu-img's
// 2 MiB chunk).
constexpr uint64_t kBatch = 64 << 20;

// Threads that read at once, at most: each holds up to 512 KiB of buffers,
// 4 MiB once it has read a compressed run (a whole chunk of each image).
constexpr unsigned kMaxThreads = 8;

bool g_quiet = false;  // -q: no messages on stdout (qemu's qprintf)

// A message with arguments is formatted; one without is printed as it is
// (never passed as a format: -Wformat-security, which Debian's build flags
// make an error).
template <typename... Args>
void Say(const char* fmt, Args... args) {
  if (g_quiet) return;
  if constexpr (sizeof...(args) == 0) {
    std::fputs(fmt, stdout);
  } else {
    std::printf(fmt, args...);
  }
}

// The block status bits qemu compares in strict mode.
struct BlockStatus {
  bool allocated, zero, data, offset_valid, eof;
  bool operator==(const BlockStatus&) const = default;
};

struct Side {
  std::string name;
  std::unique_ptr<Image> image;
  uint64_t size = 0;

  dmcow::Status BlockStatusAt(uint64_t offset, uint64_t end, MapExtent* e, BlockStatus* bs) {
    dmcow::Status s = GetMapExtent(image.get(), offset, end - offset, e);
    if (s.ok() && e->length == 0) s = dmcow::Status::Corrupt("empty map extent");
    if (s.ok()) *bs = {e->present, e->zero, e->data, e->has_offset, offset + e->length >= size};
    return s;
  }
};

// The data check of compare's walk: runs are queued and compared kBatch at
// a time, on every core (range_compare.h). Whatever ends the walk early (a
// block status error, a strict-mode difference) is reported only after
// what is queued before it compared equal: qemu-img meets it later.
class Checker {
 public:
  // `second` null: `first` against zeros (the longer image's tail).
  Checker(const Side& first, const Side* second, Progress& progress, float base)
      : first_(first),
        second_(second),
        comparer_(first.image.get(), second ? second->image.get() : nullptr,
                  std::clamp(std::thread::hardware_concurrency(), 1u, kMaxThreads)),
        progress_(progress),
        base_(base) {}

  // [offset, offset + len), where the images read as zeros as flagged;
  // `compressed`: one of them stores it compressed. Returns 0 or the exit
  // code, its message printed.
  int Add(uint64_t offset, uint64_t len, bool first_zero, bool second_zero, bool compressed) {
    walked_ += len;
    if (first_zero && second_zero && comparer_.queued() == 0) {
      ShowProgress();  // nothing to wait for
      return 0;
    }
    comparer_.Add(offset, len, first_zero, second_zero, compressed);
    return comparer_.queued() >= kBatch ? Flush() : 0;
  }

  // Compares what is queued; returns 0 or the exit code, its message printed.
  int Flush() {
    RangeOutcome r = comparer_.Flush();
    switch (r.kind) {
      case RangeOutcome::Kind::kSame: ShowProgress(); return 0;
      case RangeOutcome::Kind::kMismatch:
        Say("Content mismatch at offset %llu!\n", static_cast<unsigned long long>(r.offset));
        return 1;
      case RangeOutcome::Kind::kReadErrorFirst:
      case RangeOutcome::Kind::kReadErrorSecond: break;
    }
    assert(r.kind == RangeOutcome::Kind::kReadErrorFirst || second_ != nullptr);
    const Side& side = r.kind == RangeOutcome::Kind::kReadErrorFirst ? first_ : *second_;
    PrintError("Error while reading offset " + std::to_string(r.offset) + " of " + side.name + ": " +
               r.error.ToString());
    return 4;
  }

  // A block status error of `side`: reported after what is queued.
  int StatusError(const Side& side, const dmcow::Status& s) {
    if (int rc = Flush()) return rc;
    PrintError("Sector allocation test failed for " + side.name + ": " + s.ToString());
    return 3;
  }

 private:
  void ShowProgress() {
    if (walked_ > 0) progress_.Advance(static_cast<float>(walked_) / base_ * 100);
    walked_ = 0;
  }

  const Side& first_;
  const Side* second_;
  RangeComparer comparer_;
  Progress& progress_;
  const float base_;
  uint64_t walked_ = 0;  // bytes walked and not yet shown in the progress
};

int Compare(Side& a, Side& b, bool strict, Progress& progress) {
  const uint64_t total = std::min(a.size, b.size);
  const float base = static_cast<float>(std::max(a.size, b.size));
  progress.Set(0);
  if (strict && a.size != b.size) {
    Say("Strict mode: Image size mismatch!\n");
    return 1;
  }
  uint64_t offset = 0;
  {  // its buffers are freed before the tail's are made
    Checker both(a, &b, progress, base);
    while (offset < total) {
      MapExtent ea, eb;
      BlockStatus sa, sb;
      if (dmcow::Status s = a.BlockStatusAt(offset, a.size, &ea, &sa); !s.ok()) return both.StatusError(a, s);
      if (dmcow::Status s = b.BlockStatusAt(offset, b.size, &eb, &sb); !s.ok()) return both.StatusError(b, s);
      if (strict && !(sa == sb)) {
        if (int rc = both.Flush()) return rc;
        Say("Strict mode: Offset %llu block status mismatch!\n", static_cast<unsigned long long>(offset));
        return 1;
      }
      // Chunks count from each run's start (qemu-img asks for block status
      // again after each): a long run with data is cut at a multiple of them.
      const uint64_t run = std::min({ea.length, eb.length, ea.zero && eb.zero ? UINT64_MAX : kBatch});
      if (int rc = both.Add(offset, run, ea.zero, eb.zero, ea.compressed || eb.compressed)) return rc;
      offset += run;
    }
    if (int rc = both.Flush()) return rc;
  }

  if (a.size != b.size) {
    Say("Warning: Image size mismatch!\n");
    Side& over = a.size > b.size ? a : b;
    Checker tail(over, nullptr, progress, base);
    while (offset < over.size) {
      MapExtent e;
      BlockStatus st;
      if (dmcow::Status s = over.BlockStatusAt(offset, over.size, &e, &st); !s.ok()) return tail.StatusError(over, s);
      const uint64_t run = e.zero ? e.length : std::min(e.length, kBatch);
      if (int rc = tail.Add(offset, run, e.zero, true, e.compressed)) return rc;
      offset += run;
    }
    if (int rc = tail.Flush()) return rc;
  }
  Say("Images are identical.\n");
  return 0;
}

// compare's command line, as ParseCompare reads it.
struct CompareArgs {
  std::string fmt1;                     // -f
  std::string fmt2;                     // -F
  bool strict = false;                  // -s
  std::string src_cache = "writeback";  // -T
  bool progress_flag = false;           // -p
  bool quiet = false;                   // -q
  bool force_share = false;             // -U, --force-share
  bool image_opts = false;              // --image-opts
  std::vector<std::string> files;       // FILE1 FILE2
};

// Reads compare's command line into *args (CLI11, ParseCommandLine): an exit
// code when the command ends there (--help, a bad command line).
std::optional<int> ParseCompare(int argc, char** argv, CompareArgs* args) {
  CLI::App app{"Check if two images have the same content.", "dmcow-img compare"};
  app.add_option("-f", args->fmt1, "Format of FILE1; probed if omitted");
  app.add_option("-F", args->fmt2, "Format of FILE2; probed if omitted");
  app.add_flag("-s", args->strict, "Strict mode: fail on different size or block status");
  app.add_option("-T", args->src_cache, "Cache mode of the images (accepted; the page cache is used)");
  app.add_flag("-p", args->progress_flag, "Show progress");
  app.add_flag("-q", args->quiet, "Quiet mode (no progress)");
  app.add_flag("-U,--force-share", args->force_share, kForceShareHelp);
  app.add_flag("--image-opts", args->image_opts,
               "FILE1 and FILE2 are option lists: driver=qcow2,file.filename=F[,backing=null]");
  app.add_option("FILES", args->files, "FILE1 FILE2");
  return ParseCommandLine(app, argc, argv);
}

// Runs compare as args says; returns the exit code.
int RunCompare(const CompareArgs& args) {
  if (args.files.size() != 2) return UsageError("Expecting two image file names");
  if (ImageOptsWithFormat(args.image_opts, args.fmt1 + args.fmt2)) return 1;
  if (!ValidCacheMode(args.src_cache)) {
    PrintError("Invalid source cache option: " + args.src_cache);
    return 2;
  }

  g_quiet = args.quiet;
  Progress progress(args.progress_flag && !args.quiet, 2.0f);
  OpenOptions o1, o2;
  o1.format = args.fmt1;
  o2.format = args.fmt2;
  std::string path1, path2;
  if (!ImageArgument(args.files[0], args.image_opts, &path1, &o1) ||
      !ImageArgument(args.files[1], args.image_opts, &path2, &o2)) {
    return 2;
  }
  LockingEnv env1(Env::Default(), {path1, LockingEnv::ReadMode(args.force_share)});
  LockingEnv env2(Env::Default(), {path2, LockingEnv::ReadMode(args.force_share)});
  o1.env = &env1;
  o2.env = &env2;
  Side a{args.files[0]}, b{args.files[1]};
  int rc = 2;
  if (OpenImageOrReport(a.name, path1, o1, &a.image).ok() && OpenImageOrReport(b.name, path2, o2, &b.image).ok()) {
    a.size = a.image->virtual_size();
    b.size = b.image->virtual_size();
    rc = Compare(a, b, args.strict, progress);
  }
  progress.End();
  return rc;
}

}  // namespace

int CmdCompare(int argc, char** argv) { return ParseAndRun(argc, argv, ParseCompare, RunCompare); }

}  // namespace dmcow::cli
