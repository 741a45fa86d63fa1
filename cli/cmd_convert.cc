// dmcow-img convert: qemu-img convert, into raw, qcow or qcow2.
//
//   convert [-c] [-p] [-q] [-n] [-W] [-C] [-U] [-f FMT] [-O FMT] [-o OPTIONS]
//           [-B|-b BACKING -F FMT] [-l SNAPSHOT] [-S SIZE] [-m N] [-t CACHE]
//           [-T CACHE] [--target-is-zero] SRC... DST
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
#include <string>
#include <thread>
#include <vector>

#include "cli_common.h"
#include "convert_job.h"
#include "dmcow/compress.h"
#include "dmcow/create.h"
#include "image_options.h"
#include "no_sync_env.h"

namespace dmcow::cli {
namespace {

constexpr uint64_t kSector = 512;
constexpr uint64_t kMaxSparse = 16 << 20;
constexpr int kMaxCoroutines = 16;

// -l: "snapshot.id=ID[,snapshot.name=NAME]" or a bare id or name. Finds the
// snapshot in `info` and returns its id, or prints qemu's error.
bool ResolveSnapshot(const std::string& arg, const ImageInfo& info, std::string* id) {
  std::string want_id, want_name;
  bool either = false;
  if (arg.rfind("snapshot.", 0) == 0) {
    size_t pos = 0;
    while (pos <= arg.size()) {
      size_t comma = arg.find(',', pos);
      if (comma == std::string::npos) comma = arg.size();
      std::string item = arg.substr(pos, comma - pos);
      size_t eq = item.find('=');
      std::string key = item.substr(0, eq), value = eq == std::string::npos ? "" : item.substr(eq + 1);
      if (key == "snapshot.id") {
        want_id = value;
      } else if (key == "snapshot.name") {
        want_name = value;
      } else {
        PrintError("Invalid parameter '" + key + "'");
        PrintError("Failed in parsing snapshot param '" + arg + "'");
        return false;
      }
      pos = comma + 1;
    }
  } else {
    want_id = want_name = arg;
    either = true;
  }
  for (int pass = 0; pass < 2; pass++) {  // qemu tries the id before the name
    for (const SnapshotInfo& sn : info.snapshots) {
      bool match = either ? (pass == 0 ? sn.id == want_id : sn.name == want_name)
                          : (want_id.empty() || sn.id == want_id) && (want_name.empty() || sn.name == want_name);
      if (match) {
        *id = sn.id;
        return true;
      }
    }
  }
  PrintError("Failed to load snapshot: Can't find snapshot");
  return false;
}


void PrintUsage() {
  std::printf("usage: %s convert [-c] [-p] [-q] [-n] [-W] [-f FMT] [-O FMT] [-o OPTIONS] [-B BACKING -F FMT]\n"
              "         [-l SNAPSHOT] [-S SIZE] [-m N] [-t CACHE] [--target-is-zero] SRC... DST\n\n"
              "Convert (and concatenate) the images SRC into DST of format FMT (raw by default, qcow or\n"
              "qcow2). -c compresses clusters (-o compression_level=1..9, zlib's scale; zstd with\n"
              "-o compression_type=zstd). The same sources and options always give a byte-identical DST.\n",
              kProgName);
}

bool IsBlockDevice(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISBLK(st.st_mode);
}

}  // namespace

int CmdConvert(int argc, char** argv) {
  std::string fmt, out_fmt = "raw", options, backing, backing_fmt, snapshot, cache = "unsafe";
  bool compress = false, progress_flag = false, quiet = false, skip_create = false, target_is_zero = false;
  uint64_t min_sparse = 4096;
  int coroutines = 0;
  enum { kOptTargetIsZero = 256 };
  static const struct option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                        {"force-share", no_argument, nullptr, 'U'},
                                        {"target-is-zero", no_argument, nullptr, kOptTargetIsZero},
                                        {nullptr, 0, nullptr, 0}};
  optind = 0;
  opterr = 0;
  for (;;) {
    int c = getopt_long(argc, argv, ":hf:O:B:b:F:Cco:l:S:pt:T:qnm:WUr:", kLong, nullptr);
    if (c == -1) break;
    switch (c) {
      case ':':
        return UsageError(std::string("missing argument for option '") + argv[optind - 1] + "'");
      case '?':
        return UsageError(std::string("unrecognized option '") + argv[optind - 1] + "'");
      case 'h':
        PrintUsage();
        return 0;
      case 'f': fmt = optarg; break;
      case 'O': out_fmt = optarg; break;
      case 'B':
      case 'b': backing = optarg; break;
      case 'F': backing_fmt = optarg; break;
      case 'c': compress = true; break;
      case 'o':
        if (!IsValidOptionList(optarg)) {
          PrintError(std::string("Invalid option list: ") + optarg);
          return 1;
        }
        options = options.empty() ? std::string(optarg) : options + "," + optarg;
        break;
      case 'l': snapshot = optarg; break;
      case 'S':
        if (!ParseSize(optarg, &min_sparse)) {
          PrintError("Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E suffixes for");
          PrintError("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
          return 1;
        }
        if (min_sparse % kSector != 0 || min_sparse > kMaxSparse) {
          PrintError("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
                     "16777216. Select 0 to disable sparse detection (fully allocates output).");
          return 1;
        }
        break;
      case 'p': progress_flag = true; break;
      case 't': cache = optarg; break;
      case 'q': quiet = true; break;
      case 'n': skip_create = true; break;
      case 'm': {
        uint64_t m = 0;
        if (!ParseNumber(optarg, &m) || m < 1 || m > kMaxCoroutines) {
          PrintError("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16");
          return 1;
        }
        coroutines = static_cast<int>(m);
        break;
      }
      case kOptTargetIsZero: target_is_zero = true; break;
      default: break;  // -C, -W, -U, -T, -r: accepted; our writes are ordered and never throttled
    }
  }
  if (cache != "unsafe" && cache != "writeback" && cache != "none" && cache != "directsync" &&
      cache != "writethrough") {
    PrintError("Invalid cache option: " + cache);
    return 1;
  }
  std::vector<std::string> files(argv + optind, argv + argc);
  OptList list;
  if (!FindFormat(out_fmt, &list)) {
    PrintError("Unknown file format '" + out_fmt + "'");
    return 1;
  }
  if (!options.empty() && HasHelpOption(options)) {
    return PrintOptionHelp(files.empty() ? nullptr : files.back().c_str(), out_fmt);
  }
  if (files.size() < 2) return UsageError("Must specify image file name");
  const std::string dst = files.back();
  files.pop_back();
  if (target_is_zero && !skip_create) {
    PrintError("--target-is-zero requires use of -n flag");
    return 1;
  }
  if (skip_create && !options.empty()) {
    PrintError("-o has no effect when skipping image creation");
    return 1;
  }
  if (compress && out_fmt == "raw") {
    PrintError("Compression not supported for this file format");
    return 1;
  }
  if (!snapshot.empty() && files.size() > 1) {
    PrintError("No support for concatenating multiple snapshot");
    return 1;
  }
  if (!backing.empty() && files.size() > 1) {
    PrintError("Having a backing file for the target makes no sense when concatenating multiple input images");
    return 1;
  }
  const std::vector<OptDesc> extra = {
      {"compression_level", OptType::kNumber, nullptr, "Level for -c: 1-9 (zlib scale), 1-19 for zstd", false}};
  OptionSet set;
  if (std::string error = ParseOptionList(list, extra, options, &set); !error.empty()) {
    PrintError(error);
    return 1;
  }

  // Sources.
  std::vector<std::unique_ptr<Image>> sources;
  uint64_t total_size = 0;
  for (const std::string& name : files) {
    OpenOptions oo;
    oo.format = fmt;
    std::unique_ptr<Image> src;
    if (!OpenImageOrReport(name, oo, &src).ok()) return 1;
    if (!snapshot.empty()) {
      if (!ResolveSnapshot(snapshot, src->info(), &oo.snapshot)) return 1;
      src.reset();
      if (!OpenImageOrReport(name, oo, &src).ok()) return 1;
    }
    total_size += src->virtual_size();
    sources.push_back(std::move(src));
  }

  // Target.
  NoSyncEnv unsafe_env(Env::Default());
  Env* env = cache == "unsafe" ? static_cast<Env*>(&unsafe_env) : Env::Default();
  const bool device = out_fmt == "raw" && IsBlockDevice(dst);
  if (!skip_create && !device) {
    CreateOptions co;
    co.format = out_fmt;
    co.size = total_size;
    co.env = env;
    FillCreateOptions(set, &co);
    if (!backing.empty()) co.backing_file = backing;
    if (!backing_fmt.empty()) co.backing_fmt = backing_fmt;
    if (!co.backing_file.empty() && co.backing_fmt.empty()) {
      PrintError("Use of backing file requires explicit backing format");
      PrintError("Could not open '" + dst + "': Could not open '" + dst + "': No such file or directory");
      return 1;
    }
    Status st = CreateImage(dst, co);
    if (!st.ok()) {
      std::string msg = st.message();
      if (msg.rfind(dst + ": ", 0) == 0) msg = msg.substr(dst.size() + 2);
      PrintError(dst + ": error while converting " + out_fmt + ": " + msg);
      return 1;
    }
  }
  OpenOptions to;
  to.format = out_fmt;
  to.writable = true;
  to.env = env;
  std::unique_ptr<Image> target;
  if (!OpenImageOrReport(dst, to, &target).ok()) return 1;
  if (target->virtual_size() < total_size) {
    PrintError("Output image is too small (" + std::to_string(target->virtual_size()) + " bytes, " +
               std::to_string(total_size) + " needed)");
    return 1;
  }

  ConvertSettings cs;
  for (auto& src : sources) cs.sources.push_back(src.get());
  cs.target = target.get();
  cs.ordered_writes = out_fmt != "raw";
  cs.cluster_size = out_fmt == "raw" ? kSector : target->info().cluster_size;
  cs.compress = compress;
  cs.compression.type = target->info().compression_type.empty() ? "zlib" : target->info().compression_type;
  if (auto it = set.find("compression_level"); it != set.end()) {
    cs.compression.level = static_cast<int>(std::min<uint64_t>(it->second.number, 1000));
    if (cs.compression.level == 0) cs.compression.level = -1;  // 0 is not a level the user may ask for
  }
  if (Status st = CheckCompressionSettings(cs.compression); !st.ok()) {
    PrintError(st.ToString());
    return 1;
  }
  cs.min_sparse = device && !skip_create ? 0 : min_sparse;
  cs.zero_init = skip_create ? target_is_zero : !device && target->backing() == nullptr;
  cs.top_layer_only = !backing.empty();
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  cs.threads = std::min(coroutines > 0 ? coroutines : kMaxCoroutines, cores);
  Progress progress(progress_flag && !quiet, 1.0f);
  cs.progress = &progress;

  progress.Set(0);
  std::string error;
  bool ok = ConvertJob(cs).Run(&error);
  if (ok) progress.Set(100);
  progress.End();
  if (!ok) PrintError(error);
  return ok ? 0 : 1;
}

}  // namespace dmcow::cli
