// dmcow-img bitmap: qemu-img bitmap, changing a qcow2 image's persistent
// dirty bitmaps.
//
//   bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
//          [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--object OBJ] [--image-opts | -f FMT] FILE BITMAP
//
// Options, messages and exit codes as qemu-img 7.2's. The actions apply in
// the order given; like qemu-img, a refused action stops there and the
// actions before it are kept. The engine (Image::ChangeBitmap;
// qcow/src/qcow2/qcow2_bitmap_change.cc) writes them as one crash-safe
// change. The image is opened so that every other bitmap stays valid, and
// its backing file is not opened (bitmaps do not depend on it).
#include <getopt.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cli_common.h"
#include "locking_env.h"
#include "object_option.h"

namespace dmcow::cli {
namespace {

struct BitmapArgs {
  std::vector<BitmapAction> actions;
  std::vector<std::string> operands;  // FILE BITMAP, when exactly two were given
  std::string format;                 // -f
  std::string source_file;            // -b
  std::string source_format;          // -F
  uint64_t granularity = 0;           // -g (0: not given, as in qemu-img)
  bool image_opts = false;
};

void PrintUsage() {
  std::printf(
      "usage: %s bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... "
      "[-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--object OBJ] [--image-opts | -f FMT] FILE BITMAP\n\n"
      "Changes the persistent dirty bitmap BITMAP of a qcow2 image; the actions apply in order.\n",
      kProgName);
}

const char* ActionName(BitmapAction::Kind kind) {
  switch (kind) {
    case BitmapAction::Kind::kAdd: return "add";
    case BitmapAction::Kind::kRemove: return "remove";
    case BitmapAction::Kind::kClear: return "clear";
    case BitmapAction::Kind::kEnable: return "enable";
    case BitmapAction::Kind::kDisable: return "disable";
    case BitmapAction::Kind::kMerge: return "merge";
  }
  return "?";
}

std::optional<int> ParseBitmap(int argc, char** argv, BitmapArgs* args) {
  enum { kImageOpts = 256, kAdd, kRemove, kClear, kEnable, kDisable, kMerge };
  static const struct option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                        {"object", required_argument, nullptr, kObjectOption},
                                        {"image-opts", no_argument, nullptr, kImageOpts},
                                        {"add", no_argument, nullptr, kAdd},
                                        {"remove", no_argument, nullptr, kRemove},
                                        {"clear", no_argument, nullptr, kClear},
                                        {"enable", no_argument, nullptr, kEnable},
                                        {"disable", no_argument, nullptr, kDisable},
                                        {"merge", required_argument, nullptr, kMerge},
                                        {"granularity", required_argument, nullptr, 'g'},
                                        {"source-file", required_argument, nullptr, 'b'},
                                        {"source-format", required_argument, nullptr, 'F'},
                                        {nullptr, 0, nullptr, 0}};
  bool add = false, merge = false;
  auto action = [&](BitmapAction::Kind kind, const char* source = nullptr) {
    BitmapAction a;
    a.kind = kind;
    if (source) a.source_name = source;
    args->actions.push_back(std::move(a));
  };
  auto on_option = [&](int c, const char* arg) -> std::optional<int> {
    switch (c) {
      case 'h': PrintUsage(); return 0;
      case 'f': args->format = arg; break;
      case 'b': args->source_file = arg; break;
      case 'F': args->source_format = arg; break;
      case 'g':
        if (!ParseQemuNumber("granularity", arg, 0, INT64_MAX, &args->granularity)) return 1;
        break;
      case kImageOpts: args->image_opts = true; break;
      case kAdd:
        action(BitmapAction::Kind::kAdd);
        add = true;
        break;
      case kRemove: action(BitmapAction::Kind::kRemove); break;
      case kClear: action(BitmapAction::Kind::kClear); break;
      case kEnable: action(BitmapAction::Kind::kEnable); break;
      case kDisable: action(BitmapAction::Kind::kDisable); break;
      case kMerge:
        action(BitmapAction::Kind::kMerge, arg);
        merge = true;
        break;
    }
    return std::nullopt;
  };
  if (auto rc = ParseGetopt(argc, argv, ":b:f:F:g:h", kLong, on_option, &args->operands)) return rc;
  // qemu-img's checks, in its order; none prints the "Try" hint.
  auto fail = [](const char* msg) {
    PrintError(msg);
    return 1;
  };
  if (args->actions.empty())
    return fail("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
  if (args->granularity != 0 && !add) return fail("granularity only supported with --add");
  if (!args->source_format.empty() && args->source_file.empty()) return fail("-F only supported with -b");
  if (!args->source_file.empty() && !merge) return fail("Merge bitmap source file only supported with --merge");
  if (args->operands.size() != 2) return fail("Expecting filename and bitmap name");
  for (BitmapAction& a : args->actions) {
    if (a.kind == BitmapAction::Kind::kAdd) a.granularity = args->granularity;
  }
  return std::nullopt;
}

int RunBitmap(const BitmapArgs& args) {
  if (ImageOptsWithFormat(args.image_opts, args.format)) return 1;
  const std::string& shown = args.operands[0];
  const std::string& bitmap = args.operands[1];
  OpenOptions options;
  options.format = args.format;
  std::string path;
  if (!ImageArgument(shown, args.image_opts, &path, &options)) return 1;
  LockingEnv env(Env::Default(), {path, ImageLock::Mode::kReadOnly});
  options.env = &env;
  options.writable = true;
  options.metadata_only = true;  // no guest byte changes: the other bitmaps stay valid
  options.open_backing = false;  // as qemu-img's BDRV_O_NO_BACKING
  std::unique_ptr<Image> image;
  if (!OpenImageOrReport(shown, path, options, &image).ok()) return 1;
  if (args.format.empty()) WarnIfProbedRaw(*image, path);

  std::unique_ptr<Image> source;
  std::unique_ptr<LockingEnv> source_env;
  if (!args.source_file.empty()) {
    source_env =
        std::make_unique<LockingEnv>(Env::Default(), LockingEnv::Policy{args.source_file, ImageLock::Mode::kReadOnly});
    OpenOptions source_options;
    source_options.format = args.source_format;
    source_options.env = source_env.get();
    source_options.open_backing = false;
    if (!OpenImageOrReport(args.source_file, source_options, &source).ok()) return 1;
  }
  std::vector<BitmapAction> actions = args.actions;
  for (BitmapAction& a : actions) {
    if (a.kind == BitmapAction::Kind::kMerge) a.source = source.get();
  }
  size_t failed = actions.size();
  const Status s = image->ChangeBitmap(bitmap, actions, &failed);
  if (!s.ok()) {
    if (failed < actions.size()) {
      const std::string why = WithInUseBitmapHint(MessageWithoutPath(path, s));
      PrintError(std::string("Operation ") + ActionName(actions[failed].kind) + " on bitmap " + bitmap +
                 " failed: " + why);
    } else {
      PrintError(MessageWithoutPath(path, s));
    }
    return 1;
  }
  return 0;
}

}  // namespace

int CmdBitmap(int argc, char** argv) { return ParseAndRun(argc, argv, ParseBitmap, RunBitmap); }

}  // namespace dmcow::cli
