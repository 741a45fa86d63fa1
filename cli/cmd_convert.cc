// dmcow-img convert: qemu-img convert, into raw, qcow or qcow2.
//
//   convert [-c] [-p] [-q] [-n] [-W] [-C] [-U] [-f FMT] [-O FMT] [-o OPTIONS]
//           [-B|-b BACKING -F FMT] [-l SNAPSHOT] [-S SIZE] [-m N] [-t CACHE]
//           [-T CACHE] [--target-is-zero] [--bitmaps [--skip-broken-bitmaps]] [--salvage] SRC... DST
//
// Options, messages and exit codes as qemu-img 7.2's; beyond it, -b as an
// alias of -B and `-o compression_level=N` for -c. Several sources are
// concatenated. The copy itself is ConvertJob's (convert_job.h), which also
// states the reproducibility guarantee: same sources and options, same bytes.
// The output is written with cache=unsafe unless -t says otherwise, as
// qemu-img does: nothing is synced until the end, and then only with a safe
// cache mode.
#include <getopt.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cli_common.h"
#include "convert_bitmaps.h"
#include "convert_job.h"
#include "dmcow/compress.h"
#include "dmcow/create.h"
#include "image_options.h"
#include "locking_env.h"
#include "no_sync_env.h"
#include "object_option.h"

namespace dmcow::cli {
namespace {

constexpr uint64_t kSector = 512;
constexpr uint64_t kMaxSparse = 16 << 20;
constexpr int kMaxCoroutines = 16;

void PrintUsage() {
  std::printf(
      "usage: %s convert [-c] [-p] [-q] [-n] [-W] [-f FMT] [-O FMT] [-o OPTIONS] [-B BACKING -F FMT]\n"
      "         [-l SNAPSHOT] [-S SIZE] [-m N] [-t CACHE] [--target-is-zero] [--image-opts] [--salvage] SRC... DST\n\n"
      "Convert (and concatenate) the images SRC into DST of format FMT (raw by default, qcow or\n"
      "qcow2). -c compresses clusters (-o compression_level=1..9, zlib's scale; zstd with\n"
      "-o compression_type=zstd). The same sources and options always give a byte-identical DST.\n"
      "--image-opts: each SRC is an option list, driver=qcow2,file.filename=F[,backing=null].\n"
      "--salvage: a source sector that cannot be read is written as zeros, with a warning.\n",
      kProgName);
}

bool IsBlockDevice(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISBLK(st.st_mode);
}

// convert's command line, as ParseConvert reads it.
struct ConvertArgs {
  std::string fmt;              // -f
  std::string out_fmt = "raw";  // -O
  bool out_fmt_given = false;
  std::string options;                  // the -o lists, joined (AppendOptionList)
  std::string backing;                  // -B, -b
  std::string backing_fmt;              // -F
  std::string snapshot;                 // -l
  std::string cache = "unsafe";         // -t
  std::string src_cache = "writeback";  // -T
  bool compress = false;                // -c
  bool progress = false;                // -p
  bool quiet = false;                   // -q
  bool skip_create = false;             // -n
  uint64_t rate_limit = 0;              // -r, bytes per second (0: none)
  bool target_is_zero = false;          // --target-is-zero
  bool image_opts = false;              // --image-opts
  bool force_share = false;             // -U, --force-share
  bool bitmaps = false;                 // --bitmaps
  bool skip_broken_bitmaps = false;     // --skip-broken-bitmaps
  bool salvage = false;                 // --salvage
  bool copy_range = false;              // -C (accepted; the copy is ours)
  uint64_t min_sparse = 4096;           // -S
  bool min_sparse_given = false;
  int coroutines = 0;                // -m; 0: not given
  std::vector<std::string> sources;  // SRC...
  std::string dst;                   // DST
  bool target_image_opts = false;    // --target-image-opts: DST is an option list (needs -n)
  OptList out_options;               // -O's options (FindFormat)
};

// Reads convert's command line into *args as qemu-img convert reads it
// (getopt: ParseGetopt says why not CLI11). Returns an exit code when the
// command ends here: 0 after -h or "-o help", 1 after a bad command line
// (message printed).
std::optional<int> ParseConvert(int argc, char** argv, ConvertArgs* args) {
  enum { kOptTargetIsZero = 256, kOptImageOpts, kOptBitmaps, kOptSkipBrokenBitmaps, kOptSalvage, kOptTargetImageOpts };
  static const struct option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                        {"object", required_argument, nullptr, kObjectOption},
                                        {"force-share", no_argument, nullptr, 'U'},
                                        {"target-is-zero", no_argument, nullptr, kOptTargetIsZero},
                                        {"image-opts", no_argument, nullptr, kOptImageOpts},
                                        {"bitmaps", no_argument, nullptr, kOptBitmaps},
                                        {"skip-broken-bitmaps", no_argument, nullptr, kOptSkipBrokenBitmaps},
                                        {"salvage", no_argument, nullptr, kOptSalvage},
                                        {"target-image-opts", no_argument, nullptr, kOptTargetImageOpts},
                                        {nullptr, 0, nullptr, 0}};
  std::vector<std::string> files;
  auto on_option = [&](int c, const char* arg) -> std::optional<int> {
    switch (c) {
      case 'h': PrintUsage(); return 0;
      case 'f': args->fmt = arg; break;
      case 'O': args->out_fmt = arg, args->out_fmt_given = true; break;
      case 'B':
      case 'b': args->backing = arg; break;
      case 'F': args->backing_fmt = arg; break;
      case 'c': args->compress = true; break;
      case 'o':
        if (!AppendOptionList(arg, &args->options)) return 1;
        break;
      case 'l': args->snapshot = arg; break;
      case 'S':
        args->min_sparse_given = true;
        if (!ParseSize(arg, &args->min_sparse)) {
          PrintError("Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E suffixes for");
          PrintError("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
          return 1;
        }
        if (args->min_sparse % kSector != 0 || args->min_sparse > kMaxSparse) {
          PrintError(
              "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
              "16777216. Select 0 to disable sparse detection (fully allocates output).");
          return 1;
        }
        break;
      case 'p': args->progress = true; break;
      case 't': args->cache = arg; break;
      case 'T': args->src_cache = arg; break;
      case 'q': args->quiet = true; break;
      case 'n': args->skip_create = true; break;
      case 'm': {
        uint64_t m = 0;
        if (!ParseNumber(arg, &m) || m < 1 || m > kMaxCoroutines) {
          PrintError("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16");
          return 1;
        }
        args->coroutines = static_cast<int>(m);
        break;
      }
      case kOptTargetIsZero: args->target_is_zero = true; break;
      case kOptImageOpts: args->image_opts = true; break;
      case kOptBitmaps: args->bitmaps = true; break;
      case kOptSkipBrokenBitmaps: args->skip_broken_bitmaps = true; break;
      case kOptSalvage: args->salvage = true; break;
      case kOptTargetImageOpts: args->target_image_opts = true; break;
      case 'C': args->copy_range = true; break;
      case 'U': args->force_share = true; break;  // the sources only, as in qemu-img
      case 'r':
        if (!ParseSize(arg, &args->rate_limit)) {
          PrintError("Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for");
          PrintError("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
          return 1;
        }
        break;
      default: break;  // -W: accepted; our writes go in order (reproducible output)
    }
    return std::nullopt;
  };
  if (auto rc = ParseGetopt(argc, argv, ":hf:O:B:b:F:Cco:l:S:pt:T:qnm:WUr:", kLong, on_option, &files)) return rc;

  if (args->skip_broken_bitmaps && !args->bitmaps) {
    PrintError("Use of --skip-broken-bitmaps requires --bitmaps");
    return 1;
  }
  // qemu-img's refusals of -C (copy offloading) beside what it cannot serve.
  if (args->copy_range && args->compress) {
    PrintError("Cannot enable copy offloading when -c is used");
    return 1;
  }
  if (args->copy_range && args->min_sparse_given) {
    PrintError("Cannot enable copy offloading when -S is used");
    return 1;
  }
  if (args->copy_range && args->salvage) {
    PrintError("Cannot use copy offloading in salvaging mode");
    return 1;
  }
  if (!ValidCacheMode(args->cache)) {
    PrintError("Invalid cache option: " + args->cache);
    return 1;
  }
  if (!ValidCacheMode(args->src_cache)) {
    PrintError("Invalid source cache option: " + args->src_cache);
    return 1;
  }
  if (!FindFormat(args->out_fmt, &args->out_options)) {
    PrintError("Unknown file format '" + args->out_fmt + "'");
    return 1;
  }
  if (!args->options.empty() && HasHelpOption(args->options)) {
    return PrintOptionHelp(files.empty() ? nullptr : files.back().c_str(), args->out_fmt);
  }
  if (files.size() < 2) return UsageError("Must specify image file name");
  args->dst = files.back();
  files.pop_back();
  args->sources = std::move(files);
  return std::nullopt;
}

// Converts as args says; returns the exit code.
int RunConvert(const ConvertArgs& args) {
  const std::string& dst = args.dst;
  if (args.target_is_zero && !args.skip_create) {
    PrintError("--target-is-zero requires use of -n flag");
    return 1;
  }
  if (args.target_image_opts && !args.skip_create) {
    PrintError("--target-image-opts requires use of -n flag");
    return 1;
  }
  // The target as an option list (its key among them), or a file name.
  std::string dst_path = dst;
  OpenOptions to;
  if (!ImageArgument(dst, args.target_image_opts, &dst_path, &to)) return 1;
  // The target's format: -O, or with --target-image-opts its driver=
  // (probed when absent; -O is then refused, as qemu-img's img_open does).
  std::string out_fmt = args.out_fmt;
  if (args.target_image_opts) {
    if (args.out_fmt_given) {
      PrintError("--image-opts and --format are mutually exclusive");
      return 1;
    }
    out_fmt = to.format;
    if (out_fmt.empty() && !ProbeFormat(Env::Default(), dst_path, &out_fmt).ok()) out_fmt = "raw";
  }
  if (args.skip_create && !args.options.empty()) {
    PrintError("-o has no effect when skipping image creation");
    return 1;
  }
  if (args.compress && out_fmt == "raw") {
    PrintError("Compression not supported for this file format");
    return 1;
  }
  if (!args.snapshot.empty() && args.sources.size() > 1) {
    PrintError("No support for concatenating multiple snapshot");
    return 1;
  }
  if (!args.backing.empty() && args.sources.size() > 1) {
    PrintError("Having a backing file for the target makes no sense when concatenating multiple input images");
    return 1;
  }
  const std::vector<OptDesc> extra = {
      {"compression_level", OptType::kNumber, nullptr, "Level for -c: 1-9 (zlib scale), 1-19 for zstd", false}};
  OptionSet set;
  if (std::string error = ParseOptionList(args.out_options, extra, args.options, &set); !error.empty()) {
    PrintError(error);
    return 1;
  }

  // Locks as qemu-img convert takes them (locking_env.h): each source
  // read-only (force-share with -U); the target read-write while it is
  // created (its backing file only read for its size, force-share) and
  // while it is written (its backing file read-only, -U or not).
  std::vector<std::unique_ptr<LockingEnv>> source_envs;
  LockingEnv create_env(Env::Default(), {dst_path, ImageLock::Mode::kReadOnlyShared});
  LockingEnv target_env(Env::Default(), {dst_path, ImageLock::Mode::kReadOnly});

  // Sources.
  std::vector<std::unique_ptr<Image>> sources;
  uint64_t total_size = 0;
  if (ImageOptsWithFormat(args.image_opts, args.fmt)) return 1;
  for (const std::string& name : args.sources) {
    OpenOptions oo;
    oo.format = args.fmt;
    std::string path;  // --image-opts: the sources are option lists; the target stays a name
    if (!ImageArgument(name, args.image_opts, &path, &oo)) return 1;
    source_envs.push_back(
        std::make_unique<LockingEnv>(Env::Default(), LockingEnv::Policy{path, LockingEnv::ReadMode(args.force_share)}));
    oo.env = source_envs.back().get();
    std::unique_ptr<Image> src;
    if (!OpenImageOrReport(name, path, oo, &src).ok()) return 1;
    if (!args.snapshot.empty()) {
      if (!ResolveSnapshot(args.snapshot, src->info(), &oo.snapshot)) return 1;
      src.reset();
      if (!OpenImageOrReport(name, path, oo, &src).ok()) return 1;
    }
    total_size += src->virtual_size();
    sources.push_back(std::move(src));
  }

  if (args.bitmaps) {
    if (sources.size() > 1) {
      PrintError("Copying bitmaps only possible with single source");
      return 1;
    }
    if (!CheckSourceBitmaps(*sources[0], args.skip_broken_bitmaps)) return 1;
  }

  // Target.
  NoSyncEnv unsafe_create_env(&create_env), unsafe_env(&target_env);
  const bool unsafe = args.cache == "unsafe";
  Env* env = unsafe ? static_cast<Env*>(&unsafe_env) : &target_env;
  const bool device = out_fmt == "raw" && IsBlockDevice(dst_path);
  const bool encrypt = set.count("encrypt.format") != 0 || set.count("encryption") != 0;
  if (args.compress && encrypt) {
    PrintError("Compression and encryption not supported at the same time");
    return 1;
  }
  if (const std::string missing = MissingSecret(set); !args.skip_create && !missing.empty()) {
    PrintError(dst + ": error while converting " + out_fmt + ": " + missing);
    return 1;
  }
  // -B, or -o backing_file=: qemu-img treats them alike (out_baseimg).
  bool target_has_backing = !args.backing.empty();
  if (!args.skip_create && !device) {
    CreateOptions co;
    co.format = out_fmt;
    co.size = total_size;
    co.env = unsafe ? static_cast<Env*>(&unsafe_create_env) : &create_env;
    FillCreateOptions(set, &co);
    if (!args.backing.empty()) co.backing_file = args.backing;
    if (!args.backing_fmt.empty()) co.backing_fmt = args.backing_fmt;
    target_has_backing = !co.backing_file.empty();
    if (!co.backing_file.empty() && co.backing_fmt.empty()) {
      PrintError("Use of backing file requires explicit backing format");
      PrintError("Could not open '" + dst + "': Could not open '" + dst + "': No such file or directory");
      return 1;
    }
    Status st = CreateImage(dst, co);
    if (!st.ok()) {
      PrintError(dst + ": error while converting " + out_fmt + ": " + MessageWithoutPath(dst, st));
      return 1;
    }
  }
  to.format = out_fmt;
  to.writable = true;
  // A target created encrypted is opened with the key it was made with.
  if (auto it = set.find("encrypt.key-secret"); it != set.end()) to.layer_secrets = {FindSecret(it->second.raw)};
  to.maintain_bitmaps = args.skip_create;  // -n: the target's bitmaps learn what is written, as in qemu-img
  to.env = env;
  std::unique_ptr<Image> target;
  if (!OpenImageOrReport(dst, dst_path, to, &target).ok()) return 1;
  if (args.bitmaps && !CheckTargetTakesBitmaps(*target)) return 1;
  const std::vector<BitmapInfo> target_bitmaps = target->info().bitmaps;  // convert -n: what it held
  if (target->virtual_size() < total_size) {
    PrintError("Output image is too small (" + std::to_string(target->virtual_size()) + " bytes, " +
               std::to_string(total_size) + " needed)");
    return 1;
  }

  ConvertSettings cs;
  for (auto& src : sources) cs.sources.push_back(src.get());
  cs.target = target.get();
  cs.ordered_writes = out_fmt != "raw" || args.salvage;  // --salvage: warnings in guest order
  cs.salvage = args.salvage;
  cs.quiet = args.quiet;
  cs.cluster_size = out_fmt == "raw" ? kSector : target->info().cluster_size;
  cs.compress = args.compress;
  cs.compression.type = target->info().compression_type.empty() ? "zlib" : target->info().compression_type;
  if (auto it = set.find("compression_level"); it != set.end()) {
    cs.compression.level = static_cast<int>(std::min<uint64_t>(it->second.number, 1000));
    if (cs.compression.level == 0) cs.compression.level = -1;  // 0 is not a level the user may ask for
  }
  if (Status st = CheckCompressionSettings(cs.compression); !st.ok()) {
    PrintError(st.ToString());
    return 1;
  }
  cs.min_sparse = device && !args.skip_create ? 0 : args.min_sparse;
  cs.zero_init = args.skip_create ? args.target_is_zero : !device && target->backing() == nullptr;
  cs.top_layer_only = target_has_backing;
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  cs.threads = std::min(args.coroutines > 0 ? args.coroutines : kMaxCoroutines, cores);
  Progress progress(args.progress && !args.quiet, 1.0f);
  cs.progress = &progress;
  RateLimiter limiter(args.rate_limit);
  cs.rate_limiter = &limiter;

  progress.Set(0);
  std::string error;
  bool ok = ConvertJob(cs).Run(&error);
  if (ok) progress.Set(100);
  progress.End();
  if (!ok) PrintError(error);
  if (ok && args.bitmaps) {
    target.reset();  // written and closed: the bitmaps go in through a metadata-only open
    ok = CopyBitmaps(sources[0].get(), dst_path, env, target_bitmaps);
  }
  return ok ? 0 : 1;
}

}  // namespace

int CmdConvert(int argc, char** argv) { return ParseAndRun(argc, argv, ParseConvert, RunConvert); }

}  // namespace dmcow::cli
