// dmcow-img measure: qemu-img measure.
//
//   measure [--output=human|json] [-O FMT] [-o OPTIONS] [-f FMT] [--image-opts] [-l SNAPSHOT] [-U]
//           (--size SIZE | FILE)
//
// How large a file `create -f FMT -o OPTIONS` (with --size) or `convert -O
// FMT -o OPTIONS FILE` would make: "required size" (the data FILE holds,
// zeros left out, plus a full image's metadata: an upper bound), "fully
// allocated size" and, for qcow2 v3 from a qcow2 v3 source, "bitmaps size".
// The figures are the engine's (dmcow/measure.h); the command line,
// checks, messages, output and exit codes are qemu-img 7.2's.
#include <getopt.h>

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "cli_common.h"
#include "dmcow/measure.h"
#include "image_options.h"
#include "locking_env.h"
#include "object_option.h"
#include "qemu_json.h"

namespace dmcow::cli {
namespace {

struct MeasureArgs {
  std::string filename;  // empty with --size
  std::optional<uint64_t> size;
  std::string format;              // -f, of FILE
  std::string out_format = "raw";  // -O
  std::string options;             // the -o lists, joined
  std::string snapshot;            // -l
  bool json = false;
  bool image_opts = false;
  bool force_share = false;  // -U
};

void PrintUsage() {
  std::printf(
      "usage: %s measure [--output=human|json] [-O FMT] [-o OPTIONS] [-f FMT] [--image-opts] [-l SNAPSHOT] [-U]\n"
      "                  (--size SIZE | FILE)\n\n"
      "Prints the file size an image of format FMT (default raw) made with OPTIONS needs: empty and SIZE\n"
      "bytes large, or holding the content of FILE.\n",
      kProgName);
}

std::optional<int> ParseMeasure(int argc, char** argv, MeasureArgs* args) {
  enum { kImageOpts = 256, kOutput, kSize };
  static const struct option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                        {"image-opts", no_argument, nullptr, kImageOpts},
                                        {"object", required_argument, nullptr, kObjectOption},
                                        {"output", required_argument, nullptr, kOutput},
                                        {"size", required_argument, nullptr, kSize},
                                        {"force-share", no_argument, nullptr, 'U'},
                                        {nullptr, 0, nullptr, 0}};
  std::vector<std::string> operands;
  auto on_option = [&](int c, const char* arg) -> std::optional<int> {
    switch (c) {
      case 'h': PrintUsage(); return 0;
      case 'f': args->format = arg; break;
      case 'O': args->out_format = arg; break;
      case 'o':
        if (!AppendOptionList(arg, &args->options)) return 1;
        break;
      case 'l': args->snapshot = arg; break;
      case 'U': args->force_share = true; break;
      case kImageOpts: args->image_opts = true; break;
      case kOutput:
        if (!ParseOutputFormat(arg, &args->json)) return 1;
        break;
      case kSize: {
        uint64_t size = 0;
        if (!ParseQemuNumber("image size", arg, 0, INT64_MAX, &size)) return 1;
        args->size = size;
        break;
      }
    }
    return std::nullopt;
  };
  if (auto rc = ParseGetopt(argc, argv, ":hf:o:O:l:U", kLong, on_option, &operands)) return rc;
  // img_measure's checks, in its order.
  if (operands.size() > 1) {
    PrintError("At most one filename argument is allowed.");
    return 1;
  }
  if (operands.size() == 1) args->filename = operands[0];
  if (operands.empty() && (args->image_opts || !args->format.empty() || !args->snapshot.empty())) {
    PrintError("--image-opts, -f, and -l require a filename argument.");
    return 1;
  }
  if (!operands.empty() && args->size) {
    PrintError("--size N cannot be used together with a filename.");
    return 1;
  }
  if (operands.empty() && !args->size) {
    PrintError("Either --size N or one filename must be specified.");
    return 1;
  }
  return std::nullopt;
}

// Opens FILE read-only (its -l snapshot if given), locked as qemu-img
// measure locks it; prints the error and returns false on failure.
bool OpenSource(const MeasureArgs& args, std::unique_ptr<LockingEnv>* env, std::unique_ptr<Image>* image) {
  if (ImageOptsWithFormat(args.image_opts, args.format)) return false;
  OpenOptions options;
  options.format = args.format;
  std::string path;
  if (!ImageArgument(args.filename, args.image_opts, &path, &options)) return false;
  *env = std::make_unique<LockingEnv>(Env::Default(), LockingEnv::Policy{path, LockingEnv::ReadMode(args.force_share)});
  options.env = env->get();
  if (!OpenImageOrReport(args.filename, path, options, image).ok()) return false;
  if (args.snapshot.empty()) return true;
  if (!ResolveSnapshot(args.snapshot, (*image)->info(), &options.snapshot)) return false;
  image->reset();
  return OpenImageOrReport(args.filename, path, options, image).ok();
}

int RunMeasure(const MeasureArgs& args) {
  std::unique_ptr<LockingEnv> env;
  std::unique_ptr<Image> source;
  if (!args.filename.empty() && !OpenSource(args, &env, &source)) return 1;

  CreateOptions co;
  co.format = args.out_format;
  co.size = args.size.value_or(0);  // with FILE, its size (a -o size is not used, as in qemu-img)
  MeasureResult result;
  OptList list;
  if (!FindFormat(args.out_format, &list)) {
    // Formats dmcow-img does not make: the engine says which, in qemu-img's words.
    PrintError(MeasureImage(co, source.get(), &result).message());
    return 1;
  }
  OptionSet set;
  if (std::string error = ParseOptionList(list, {}, args.options, &set); !error.empty()) {
    PrintError(error);
    PrintError("Invalid options for file format '" + args.out_format + "'");
    return 1;
  }
  if (const std::string missing = MissingSecret(set); !missing.empty()) {
    PrintError(missing);
    return 1;
  }
  FillCreateOptions(set, &co);
  Status s = MeasureImage(co, source.get(), &result);
  if (!s.ok()) {
    PrintError(s.message());
    return 1;
  }
  if (args.json) {
    Json j = Json::object();
    j["required"] = result.required;
    j["fully-allocated"] = result.fully_allocated;
    if (result.has_bitmaps) j["bitmaps"] = result.bitmaps;
    std::printf("%s\n", QemuJsonPretty(j).c_str());
  } else {
    std::printf("required size: %llu\n", static_cast<unsigned long long>(result.required));
    std::printf("fully allocated size: %llu\n", static_cast<unsigned long long>(result.fully_allocated));
    if (result.has_bitmaps) std::printf("bitmaps size: %llu\n", static_cast<unsigned long long>(result.bitmaps));
  }
  return 0;
}

}  // namespace

int CmdMeasure(int argc, char** argv) { return ParseAndRun(argc, argv, ParseMeasure, RunMeasure); }

}  // namespace dmcow::cli
