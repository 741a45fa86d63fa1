// dmcow-img resize: qemu-img resize.
//
//   resize [--image-opts] [-f FMT] [--preallocation=MODE] [-q] [--shrink] FILE [+|-]SIZE
//
// SIZE is the last argument, taken out before the options are read (as
// qemu-img does) so that "-1G" is a size, not an option. Growing is
// Image::Grow, shrinking (only with --shrink) Image::Shrink; raw files grow
// with preallocation off, falloc or full. Output, messages and exit codes
// as qemu-img 7.2: "Image resized." on stdout (not with -q), one line on
// stderr and exit 1 on any error.
//
// Persistent bitmaps are resized with the image, their bits kept. Growing
// preallocates the new range in qemu-img's modes (Image::Preallocate).
#include <getopt.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "cli_common.h"
#include "image_options.h"
#include "locking_env.h"
#include "object_option.h"

namespace dmcow::cli {
namespace {

struct ResizeArgs {
  std::string filename;
  std::string format;  // -f
  std::string size;    // the last argument, as given
  std::string preallocation = "off";
  bool image_opts = false;  // --image-opts
  bool quiet = false;       // -q
  bool shrink = false;      // --shrink
};

void PrintUsage() {
  std::printf(
      "usage: %s resize [--image-opts] [-f FMT] [--preallocation=off|metadata|falloc|full] [-q] [--shrink] FILE "
      "[+|-]SIZE\n\n"
      "Changes the virtual size of FILE to SIZE, or by +SIZE / -SIZE. Shrinking needs --shrink and drops\n"
      "everything past the new end.\n",
      kProgName);
}

std::optional<int> ParseResize(int argc, char** argv, ResizeArgs* args) {
  // The size comes off the end first, so that a negative one is not an option.
  if (argc < 3) {
    if (argc == 2 && (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help")) {
      PrintUsage();
      return 0;
    }
    return UsageError("Not enough arguments");
  }
  args->size = argv[--argc];
  enum { kImageOpts = 256, kPreallocation, kShrink };
  static const struct option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                        {"object", required_argument, nullptr, kObjectOption},
                                        {"image-opts", no_argument, nullptr, kImageOpts},
                                        {"preallocation", required_argument, nullptr, kPreallocation},
                                        {"shrink", no_argument, nullptr, kShrink},
                                        {nullptr, 0, nullptr, 0}};
  std::vector<std::string> operands;
  auto on_option = [&](int c, const char* arg) -> std::optional<int> {
    switch (c) {
      case 'h': PrintUsage(); return 0;
      case 'f': args->format = arg; break;
      case 'q': args->quiet = true; break;
      case kImageOpts: args->image_opts = true; break;
      case kPreallocation: {
        const std::string mode = arg;
        if (mode != "off" && mode != "metadata" && mode != "falloc" && mode != "full") {
          PrintError("Invalid preallocation mode '" + mode + "'");
          return 1;
        }
        args->preallocation = mode;
        break;
      }
      case kShrink: args->shrink = true; break;
    }
    return std::nullopt;
  };
  if (auto rc = ParseGetopt(argc, argv, ":f:hq", kLong, on_option, &operands)) return rc;
  if (operands.size() != 1) return UsageError("Expecting image file name and size");
  args->filename = operands[0];
  return std::nullopt;
}

// qemu-img's size parameter: "+N", "-N" or "N", N a qemu size.
bool ParseResizeSize(const std::string& text, int* relative, uint64_t* n) {
  std::string number = text;
  *relative = 0;
  if (!number.empty() && (number[0] == '+' || number[0] == '-')) {
    *relative = number[0] == '+' ? 1 : -1;
    number.erase(0, 1);
  }
  if (ParseSize(number, n)) return true;
  // qemu takes any size below 2^64 here (then wraps it negative past 2^63).
  if (!number.empty() && number.find_first_not_of("0123456789") == std::string::npos) {
    errno = 0;
    *n = std::strtoull(number.c_str(), nullptr, 10);
    if (errno == 0) return true;
  }
  PrintError(BadSizeParameter("size", number));
  return false;
}

int RunResize(const ResizeArgs& args) {
  int relative = 0;
  uint64_t n = 0;
  if (!ParseResizeSize(args.size, &relative, &n)) return 1;
  if (ImageOptsWithFormat(args.image_opts, args.format)) return 1;

  OpenOptions options;
  options.format = args.format;
  std::string path;
  if (!ImageArgument(args.filename, args.image_opts, &path, &options)) return 1;
  LockingEnv env(Env::Default(), {path, ImageLock::Mode::kReadOnly});
  options.env = &env;
  options.writable = true;
  // Guest content does not change, so persistent bitmaps stay valid: they
  // are resized with the image (Qcow2Image::ResizeBitmapsLocked), as
  // qemu-img resizes them.
  options.metadata_only = true;
  std::unique_ptr<Image> image;
  if (!OpenImageOrReport(args.filename, path, options, &image).ok()) return 1;
  if (args.format.empty()) WarnIfProbedRaw(*image, path);

  const uint64_t current = image->virtual_size();
  // As qemu-img's int64_t arithmetic: a result past 2^63 wraps negative.
  const int64_t total = static_cast<int64_t>(relative == 0 ? n : current + static_cast<uint64_t>(relative) * n);
  if (total <= 0) {
    PrintError("New image size must be positive");
    return 1;
  }
  const uint64_t new_size = static_cast<uint64_t>(total);
  if (new_size <= current && args.preallocation != "off") {
    PrintError("Preallocation can only be used for growing images");
    return 1;
  }
  if (new_size < current && !args.shrink) {
    PrintError("Use the --shrink option to perform a shrink operation.");
    PrintError(
        "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such "
        "an operation, make sure there is no important data there.");
    return 1;
  }
  const std::string& format = image->info().format;
  if (format != "raw" && format != "qcow2") {
    PrintError("Image format driver does not support resize");
    return 1;
  }
  if (format == "raw" && args.preallocation == "metadata") {
    PrintError("Unsupported preallocation mode: metadata");  // qemu-img's (raw_co_truncate), before any change
    return 1;
  }

  Status s = new_size < current ? image->Shrink(new_size) : image->Grow(new_size);
  if (s.ok() && new_size > current && args.preallocation != "off") {
    const Image::Preallocation mode = args.preallocation == "metadata" ? Image::Preallocation::kMetadata
                                      : args.preallocation == "falloc" ? Image::Preallocation::kFalloc
                                                                       : Image::Preallocation::kFull;
    s = image->Preallocate(current, new_size - current, mode);
  }
  if (s.ok()) s = image->Flush();
  if (!s.ok()) {
    PrintError(WithInUseBitmapHint(MessageWithoutPath(path, s)));
    return 1;
  }
  if (!args.quiet) std::printf("Image resized.\n");
  return 0;
}

}  // namespace

int CmdResize(int argc, char** argv) { return ParseAndRun(argc, argv, ParseResize, RunResize); }

}  // namespace dmcow::cli
