// dmcow-img commit: qemu-img commit.
//
//   commit [-f FMT] [-t CACHE] [-b BASE] [-r RATE] [-d] [-p] [-q] FILE
//
// Copies into BASE (default: FILE's backing image) what FILE, and every
// layer between FILE and BASE, stores: only the ranges those layers
// allocate, data as data and zero clusters as zero writes, read through FILE
// so the newest layer wins. A BASE shorter than FILE is grown first, as
// qemu-img's commit job does. Then, unless -d (which -b implies), FILE is
// emptied so that it reads through to its backing image again.
//
// Order: FILE (and its chain, read-only) is opened first, BASE a second time
// for writing. The ranges copied are allocated above BASE, so FILE's view of
// them never consults its stale read-only copy of BASE. BASE is flushed and
// closed before FILE is emptied: a crash loses no data FILE held.
//
// Output and exit codes as qemu-img 7.2: "Image committed." on stdout
// (not with -q), -p progress, errors as one line on stderr and exit 1.
#include <climits>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli_common.h"
#include "locking_env.h"
#include "rate_limiter.h"

namespace dmcow::cli {
namespace {

constexpr uint64_t kChunk = 2 << 20;

enum class RunKind { kSkip, kZero, kData };

// What the layers above `base` (the first `depth` layers of the chain from
// `top`) hold at `offset`, for at most `max_len` bytes: nothing (kSkip), or
// what to copy. A range past the end of a shorter intermediate layer reads
// as zeros through `top`; qemu-img copies those zeros too.
Status AboveBase(Image* top, int depth, uint64_t offset, uint64_t max_len, RunKind* kind, uint64_t* len) {
  uint64_t n = max_len;
  Image* layer = top;
  for (int i = 0; i < depth && layer != nullptr; i++, layer = layer->backing()) {
    if (offset >= layer->virtual_size()) {
      *kind = RunKind::kZero;
      *len = n;
      return Status::OK();
    }
    LayerExtent e;
    DMCOW_RETURN_IF_ERROR(layer->GetLayerStatus(offset, std::min(n, layer->virtual_size() - offset), &e));
    if (e.length == 0) return Status::Corrupt(layer->filename() + ": empty block status");
    n = std::min(n, e.length);
    if (e.state != ClusterState::kUnallocated) {
      *kind = e.state == ClusterState::kZero ? RunKind::kZero : RunKind::kData;
      *len = n;
      return Status::OK();
    }
  }
  *kind = RunKind::kSkip;
  *len = n;
  return Status::OK();
}

// qemu's path_has_protocol: "proto:..." with no slash before the colon.
bool HasProtocol(const std::string& path) {
  size_t colon = path.find(':');
  return colon != std::string::npos && path.find('/') > colon;
}

std::string RealPath(const std::string& path) {
  char buf[PATH_MAX];
  if (realpath(path.c_str(), buf) == nullptr) return "";
  return buf;
}

// The image -b names, found as qemu's bdrv_find_backing_image finds it: for
// each layer that has a backing file, `name` (made absolute against that
// layer's directory) and the layer's resolved backing file name must be the
// same file. Returns the backing image and its depth below `top`.
Image* FindBackingImage(Image* top, const std::string& name, int* depth) {
  int d = 0;
  for (Image* layer = top; layer != nullptr && layer->backing() != nullptr; layer = layer->backing(), d++) {
    const ImageInfo& info = layer->info();
    bool match = false;
    if (HasProtocol(name) || HasProtocol(info.backing_filename)) {
      match = name == info.backing_filename || name == info.full_backing_filename;
    } else {
      std::string wanted = RealPath(ResolveNameBesideImage(layer->filename(), name));
      std::string backing = RealPath(info.full_backing_filename);
      match = !wanted.empty() && wanted == backing;
    }
    if (match) {
      *depth = d + 1;
      return layer->backing();
    }
  }
  return nullptr;
}

class Committer {
 public:
  Committer(Image* top, int depth, Image* base, Progress* progress, RateLimiter* limiter)
      : top_(top), depth_(depth), base_(base), progress_(progress), limiter_(limiter) {}

  // Copies; on failure returns false with the one-line message in *error.
  bool Run(std::string* error) {
    auto failed = [&](const std::string& what, uint64_t offset, const Status& s) {
      *error = what + " at offset " + std::to_string(offset) + ": " + s.ToString();
      return false;
    };
    const uint64_t size = top_->virtual_size();
    // First the map (metadata only): what to copy, and so the progress total.
    uint64_t total = 0;
    for (uint64_t offset = 0; offset < size;) {
      RunKind kind = RunKind::kSkip;
      uint64_t len = 0;
      Status s = AboveBase(top_, depth_, offset, size - offset, &kind, &len);
      if (!s.ok()) return failed("error while reading block status", offset, s);
      if (kind != RunKind::kSkip) {
        if (!runs_.empty() && runs_.back().kind == kind && runs_.back().offset + runs_.back().len == offset) {
          runs_.back().len += len;
        } else {
          runs_.push_back({offset, len, kind});
        }
        total += len;
      }
      offset += len;
    }
    std::vector<char> buf;
    uint64_t done = 0;
    for (const Span& r : runs_) {
      for (uint64_t pos = r.offset; pos < r.offset + r.len;) {
        const uint64_t n = std::min(kChunk, r.offset + r.len - pos);
        if (r.kind == RunKind::kZero) {
          Status s = base_->WriteZeroesMayUnmap(pos, n);  // as qemu-img: a raw base gets a hole
          if (!s.ok()) return failed("error while writing zeros", pos, s);
        } else {
          buf.resize(n);
          Status s = top_->Read(pos, buf.data(), n);
          if (!s.ok()) return failed("error while reading", pos, s);
          limiter_->Account(n);
          s = base_->Write(pos, buf.data(), n);
          if (!s.ok()) return failed("error while writing", pos, s);
        }
        pos += n;
        done += n;
        progress_->Set(static_cast<float>(static_cast<double>(done) / static_cast<double>(total) * 100.0));
      }
    }
    return true;
  }

 private:
  struct Span {
    uint64_t offset;
    uint64_t len;
    RunKind kind;
  };

  Image* top_;
  int depth_;
  Image* base_;
  Progress* progress_;
  RateLimiter* limiter_;  // -r
  std::vector<Span> runs_;
};

// commit's command line, as ParseCommit reads it.
struct CommitArgs {
  std::string format;               // -f
  std::string cache = "writeback";  // -t
  std::string base_name;            // -b
  std::string rate;                 // -r
  bool drop = false;                // -d
  bool progress_flag = false;       // -p
  bool quiet = false;               // -q
  bool image_opts = false;          // --image-opts
  std::vector<std::string> files;   // FILE
};

// Reads commit's command line into *args (CLI11, ParseCommandLine): an exit
// code when the command ends there (--help, a bad command line).
std::optional<int> ParseCommit(int argc, char** argv, CommitArgs* args) {
  CLI::App app{"Commit the changes recorded in FILE in its base image.", "dmcow-img commit"};
  app.add_option("-f", args->format, "Format of FILE; probed if omitted");
  app.add_option("-t", args->cache, "Cache mode for FILE and the base (accepted for compatibility)");
  app.add_option("-b", args->base_name, "Image in FILE's backing chain to commit into (implies -d)");
  app.add_option("-r", args->rate, "Rate limit: at most this many bytes written per second");
  app.add_flag("-d", args->drop, "Leave FILE as it is after committing");
  app.add_flag("-p", args->progress_flag, "Show progress");
  app.add_flag("-q", args->quiet, "Quiet mode (no progress, no message)");
  app.add_flag("--image-opts", args->image_opts, "FILE is an option list: driver=qcow2,file.filename=F,...");
  app.add_option("FILE", args->files, "The image to commit");
  return ParseCommandLine(app, argc, argv);
}

// Runs commit as args says; returns the exit code.
int RunCommit(const CommitArgs& args) {
  uint64_t limit = 0;
  if (!args.rate.empty()) {
    if (!ParseSize(args.rate, &limit)) {
      PrintError("Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for");
      PrintError("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
      return 1;
    }
  }
  if (args.files.size() != 1) return UsageError("Expecting one image file name");
  if (!ValidCacheMode(args.cache)) {
    PrintError("Invalid cache option: " + args.cache);
    return 1;
  }
  const bool drop = args.drop || !args.base_name.empty();  // as in qemu-img: -b implies -d
  const std::string& filename = args.files[0];             // as given: an option list with --image-opts
  if (ImageOptsWithFormat(args.image_opts, args.format)) return 1;
  OpenOptions options;
  std::string path;
  if (!ImageArgument(filename, args.image_opts, &path, &options)) return 1;
  if (!args.image_opts) options.format = args.format;

  // Locks as qemu-img commit takes them (locking_env.h): FILE read-write,
  // even with -d (qemu-img opens it so), the chain below read-only, and
  // BASE raised to read-write on the same open file description when it is
  // opened for writing below. No -U: qemu-img commit has none.
  LockingEnv env(Env::Default(), {path, ImageLock::Mode::kReadOnly, /*top_read_write=*/true});

  // FILE is written only to empty it; with -d it is only read.
  options.writable = !drop;
  options.env = &env;
  std::unique_ptr<Image> top;
  if (!OpenImageOrReport(filename, path, options, &top).ok()) return 1;

  Progress progress(args.progress_flag && !args.quiet, 1.0f);
  progress.Set(0);
  auto fail = [&](const std::string& msg) {
    progress.End();
    PrintError(msg);
    return 1;
  };

  Image* base_in_chain;
  int depth = 1;
  if (!args.base_name.empty()) {
    base_in_chain = FindBackingImage(top.get(), args.base_name, &depth);
    if (base_in_chain == nullptr) {
      return fail("Did not find '" + args.base_name + "' in the backing chain of '" + filename + "'");
    }
  } else {
    base_in_chain = top->backing();
    if (base_in_chain == nullptr) return fail("Image does not have a backing file");
  }

  // The chain opened BASE read-only; it is opened again, by the name and
  // format the chain resolved, for writing.
  OpenOptions base_options;
  base_options.format = base_in_chain->info().format;
  base_options.writable = true;
  base_options.maintain_bitmaps = true;  // the base's bitmaps learn what is committed, as in qemu-img
  base_options.env = &env;
  // The keys of BASE and the layers below it: those --image-opts gave them.
  if (options.layer_secrets.size() > static_cast<size_t>(depth)) {
    base_options.layer_secrets.assign(options.layer_secrets.begin() + depth, options.layer_secrets.end());
  }
  const std::string base_file = base_in_chain->filename();
  std::unique_ptr<Image> base;
  Status s = OpenImage(base_file, base_options, &base);
  if (s.IsBusy()) return fail(s.ToString());  // qemu-img's words alone, as it prints them
  if (!s.ok()) return fail("Could not open '" + base_file + "' for writing: " + s.ToString());

  // As qemu-img's commit job: a shorter base is grown to FILE's size first.
  if (base->virtual_size() < top->virtual_size()) {
    s = base->Grow(top->virtual_size());
    if (!s.ok()) {
      return fail("Could not grow '" + base_file + "' to " + std::to_string(top->virtual_size()) +
                  " bytes: " + s.ToString());
    }
  }

  std::string error;
  RateLimiter limiter(limit);
  if (!Committer(top.get(), depth, base.get(), &progress, &limiter).Run(&error)) return fail(error);
  s = base->Flush();
  base.reset();
  if (!s.ok()) return fail("error while flushing '" + base_file + "': " + s.ToString());

  if (!drop) {
    s = top->MakeEmpty();
    if (s.ok()) s = top->Flush();
    if (!s.ok()) return fail("Could not empty " + filename + ": " + s.ToString());
  }

  progress.Set(100);
  progress.End();
  if (!args.quiet) std::printf("Image committed.\n");
  return 0;
}

}  // namespace

int CmdCommit(int argc, char** argv) { return ParseAndRun(argc, argv, ParseCommit, RunCommit); }

}  // namespace dmcow::cli
