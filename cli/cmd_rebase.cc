// dmcow-img rebase: qemu-img rebase.
//
//   rebase [--image-opts] [-U] [-q] [-f FMT] [-t CACHE] [-T SRC_CACHE] [-p] [-u] -b BACKING [-F BACKING_FMT] FILE
//
// Safe mode (the default) copies into FILE the sectors that read
// differently through the new backing file than through the old one, then
// records the new name (dmcow/rebase.h, which states the order that keeps a
// crash harmless). -u only records the name, opening neither backing file;
// persistent bitmaps stay valid then, as nothing the guest reads changes.
// -b "" removes the backing file (safe mode first copies what it held).
//
// Output, messages and exit codes as qemu-img 7.2: nothing on stdout but
// -p's progress, one line on stderr and exit 1 on any error. One
// deliberate difference: where qemu-img would copy and only then refuse to
// record the name (no -F with -b; a format that cannot record a backing
// file, qcow v1), dmcow-img refuses before writing anything, with the same
// message.
#include <getopt.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "cli_common.h"
#include "dmcow/create.h"
#include "dmcow/rebase.h"
#include "locking_env.h"
#include "object_option.h"

namespace dmcow::cli {
namespace {

constexpr uint64_t kRangeBytes = 2 << 20;  // qemu-img's IO_BUF_SIZE: one progress step

struct RebaseArgs {
  std::string filename;
  std::string format;                   // -f
  std::optional<std::string> backing;   // -b (may be "")
  std::string backing_format;           // -F
  std::string cache = "writeback";      // -t
  std::string src_cache = "writeback";  // -T
  bool unsafe = false;                  // -u
  bool progress = false;                // -p
  bool quiet = false;                   // -q
  bool force_share = false;             // -U
  bool image_opts = false;              // --image-opts
};

void PrintUsage() {
  std::printf(
      "usage: %s rebase [--image-opts] [-U] [-q] [-f FMT] [-t CACHE] [-T SRC_CACHE] [-p] [-u] -b BACKING_FILE "
      "[-F BACKING_FMT] FILE\n\n"
      "Makes BACKING_FILE the backing file of FILE. Without -u, first copies into FILE whatever reads\n"
      "differently through BACKING_FILE, so the guest sees the same data; with -u, only the name changes.\n"
      "-b \"\" removes the backing file.\n",
      kProgName);
}

std::optional<int> ParseRebase(int argc, char** argv, RebaseArgs* args) {
  enum { kImageOpts = 256 };
  static const struct option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                        {"object", required_argument, nullptr, kObjectOption},
                                        {"image-opts", no_argument, nullptr, kImageOpts},
                                        {"force-share", no_argument, nullptr, 'U'},
                                        {nullptr, 0, nullptr, 0}};
  std::vector<std::string> operands;
  auto on_option = [&](int c, const char* arg) -> std::optional<int> {
    switch (c) {
      case 'h': PrintUsage(); return 0;
      case 'f': args->format = arg; break;
      case 'F': args->backing_format = arg; break;
      case 'b': args->backing = arg; break;
      case 'u': args->unsafe = true; break;
      case 'p': args->progress = true; break;
      case 't': args->cache = arg; break;
      case 'T': args->src_cache = arg; break;
      case 'q': args->quiet = true; break;
      case 'U': args->force_share = true; break;
      case kImageOpts: args->image_opts = true; break;
    }
    return std::nullopt;
  };
  if (auto rc = ParseGetopt(argc, argv, ":hf:F:b:upt:T:qU", kLong, on_option, &operands)) return rc;
  if (operands.size() != 1) return UsageError("Expecting one image file name");
  if (!args->unsafe && !args->backing) return UsageError("Must specify backing file (-b) or use unsafe mode (-u)");
  args->filename = operands[0];
  return std::nullopt;
}

int RunRebase(const RebaseArgs& args) {
  Progress progress(args.progress && !args.quiet, 2.0f);
  progress.Set(0);
  const int rc = [&]() -> int {
    if (!ValidCacheMode(args.cache)) {
      PrintError("Invalid cache option: " + args.cache);
      return 1;
    }
    if (!ValidCacheMode(args.src_cache)) {
      PrintError("Invalid source cache option: " + args.src_cache);
      return 1;
    }
    if (ImageOptsWithFormat(args.image_opts, args.format)) return 1;
    OpenOptions options;
    options.format = args.format;
    std::string path;
    if (!ImageArgument(args.filename, args.image_opts, &path, &options)) return 1;
    LockingEnv env(Env::Default(), {path, LockingEnv::ReadMode(args.force_share)});
    options.env = &env;
    options.writable = true;
    options.maintain_bitmaps = !args.unsafe;  // the copies are noted in the bitmaps, as in qemu-img
    options.open_backing = !args.unsafe;
    options.header_only = args.unsafe;
    std::unique_ptr<Image> image;
    if (!OpenImageOrReport(args.filename, path, options, &image).ok()) return 1;
    if (options.format.empty()) WarnIfProbedRaw(*image, path);
    if (!args.backing_format.empty() && !IsQemuDriverName(args.backing_format)) {
      PrintError("Invalid format name: '" + args.backing_format + "'");
      return 1;
    }
    const std::string backing = args.backing.value_or("");
    const std::string backing_format = backing.empty() ? "" : args.backing_format;
    auto change_failed = [&](const std::string& why) {
      PrintError("Could not change the backing file to '" + backing + "': " + why);
      return 1;
    };
    std::unique_ptr<Image> new_backing;
    if (!args.unsafe && !backing.empty()) {
      OpenOptions backing_options;
      backing_options.env = &env;
      backing_options.format = args.backing_format;
      const std::string backing_path = ResolveNameBesideImage(path, backing);
      Status s = OpenImage(backing_path, backing_options, &new_backing);
      if (!s.ok()) {
        PrintError("Could not open new backing file '" + backing + "': " + OpenFailure(backing_path, s));
        return 1;
      }
    }
    // Refusals qemu-img makes only after copying, made before anything is written.
    if (!backing.empty() && backing_format.empty()) return change_failed("backing format must be specified");
    if (image->info().format != "qcow2") return change_failed("Operation not supported");

    Status s;
    if (args.unsafe) {
      s = image->ChangeBackingFile(backing, backing_format);
    } else {
      const uint64_t size = image->virtual_size();
      // qemu-img's step: 100 / (size / min(size, 2 MiB)), in its integer division.
      const float step = size == 0 ? 0.0f : 100.0f / static_cast<float>(size / std::min(size, kRangeBytes));
      RebaseOptions rebase;
      rebase.backing = backing;
      rebase.backing_format = backing_format;
      rebase.new_backing = new_backing.get();
      rebase.on_range = [&] { progress.Advance(step); };
      s = Rebase(image.get(), rebase);
    }
    if (s.IsNoSpace()) return change_failed("No space left in the file header");
    if (s.code() == Status::Code::kInvalidArgument) return change_failed("Invalid argument");
    if (s.IsNotSupported()) return change_failed("Operation not supported");
    if (!s.ok()) {
      PrintError(MessageWithoutPath(path, s));
      return 1;
    }
    progress.Set(100);
    return 0;
  }();
  progress.End();
  return rc;
}

}  // namespace

int CmdRebase(int argc, char** argv) { return ParseAndRun(argc, argv, ParseRebase, RunRebase); }

}  // namespace dmcow::cli
