// dmcow-img dd: qemu-img dd.
//
//   dd [--image-opts] [-U] [-f FMT] [-O FMT] [bs=BYTES] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT
//
// Creates OUTPUT (format -O, default raw) and copies INPUT into it from
// block `skip`, as qemu-img 7.2 does, quirks included: `count` limits the
// input to its first count * bs bytes counted from the start, not from
// `skip`; a skip past that end warns and leaves OUTPUT empty (exit 0).
// The command line, checks, messages and exit codes are qemu-img's.
//
// Beyond qemu-img: ranges that read as zeros are not written (OUTPUT is
// new, so they read as zeros already): a raw OUTPUT stays sparse and a
// qcow2 one allocates only clusters with data, where qemu-img writes
// every byte. OUTPUT must be a new or regular file; a block device is
// refused (convert -n writes into devices).
#include <getopt.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "cli_common.h"
#include "dmcow/create.h"
#include "image_options.h"
#include "locking_env.h"
#include "object_option.h"

namespace dmcow::cli {
namespace {

constexpr uint64_t kChunk = 1 << 20;  // bytes read at a time, whatever bs is

struct DdArgs {
  std::string input, output;  // if=, of=
  std::string format;         // -f
  std::string out_format = "raw";
  uint64_t block_size = 512;            // bs=
  std::optional<uint64_t> count, skip;  // count=, skip= (blocks)
  bool image_opts = false;
  bool force_share = false;  // -U
};

void PrintUsage() {
  std::printf(
      "usage: %s dd [--image-opts] [-U] [-f FMT] [-O FMT] [bs=BYTES] [count=BLOCKS] [skip=BLOCKS] if=INPUT "
      "of=OUTPUT\n\n"
      "Creates OUTPUT (format FMT, default raw) holding INPUT from block SKIP on, in blocks of BYTES\n"
      "(default 512); COUNT limits INPUT to its first COUNT blocks.\n",
      kProgName);
}

// One "name=value" operand; false (message printed) for a bad one.
bool ParseOperand(const std::string& operand, DdArgs* args, bool* have_if, bool* have_of) {
  const size_t eq = operand.find('=');
  const std::string name = operand.substr(0, eq);
  if (eq == std::string::npos || (name != "bs" && name != "count" && name != "if" && name != "of" && name != "skip")) {
    PrintError("unrecognized operand " + name);
    return false;
  }
  const std::string value = operand.substr(eq + 1);
  uint64_t n = 0;
  if (name == "bs") {
    if (!ParseQemuNumber("bs", value, 1, INT32_MAX, &n)) return false;
    args->block_size = n;
  } else if (name == "count" || name == "skip") {
    if (!ParseQemuNumber(name, value, 0, INT64_MAX, &n)) return false;
    (name == "count" ? args->count : args->skip) = n;
  } else {
    (name == "if" ? args->input : args->output) = value;
    (name == "if" ? *have_if : *have_of) = true;
  }
  return true;
}

std::optional<int> ParseDd(int argc, char** argv, DdArgs* args) {
  enum { kImageOpts = 256 };
  static const struct option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                        {"image-opts", no_argument, nullptr, kImageOpts},
                                        {"object", required_argument, nullptr, kObjectOption},
                                        {"force-share", no_argument, nullptr, 'U'},
                                        {nullptr, 0, nullptr, 0}};
  std::vector<std::string> operands;
  auto on_option = [&](int c, const char* arg) -> std::optional<int> {
    switch (c) {
      case 'h': PrintUsage(); return 0;
      case 'f': args->format = arg; break;
      case 'O': args->out_format = arg; break;
      case 'U': args->force_share = true; break;
      case kImageOpts: args->image_opts = true; break;
    }
    return std::nullopt;
  };
  if (auto rc = ParseGetopt(argc, argv, ":hf:O:U", kLong, on_option, &operands)) return rc;
  bool have_if = false, have_of = false;
  for (const std::string& operand : operands) {
    if (!ParseOperand(operand, args, &have_if, &have_of)) return 1;
  }
  if (!have_if || !have_of) {
    PrintError("Must specify both input and output files");
    return 1;
  }
  return std::nullopt;
}

// Copies input [from, end) to output offset 0; ranges that read as zeros
// (by block status, or read and found so) are left unwritten.
Status CopyRange(Image* input, Image* output, uint64_t from, uint64_t end) {
  std::vector<uint8_t> buf(static_cast<size_t>(std::min(kChunk, end - from)));
  for (uint64_t offset = from; offset < end;) {
    MapExtent e;
    DMCOW_RETURN_IF_ERROR(GetMapExtent(input, offset, end - offset, &e));
    const uint64_t extent_end = offset + e.length;
    if (e.zero) {
      offset = extent_end;
      continue;
    }
    for (; offset < extent_end;) {
      const size_t n = static_cast<size_t>(std::min(kChunk, extent_end - offset));
      Status s = input->Read(offset, buf.data(), n);
      if (!s.ok()) return Status::IOError("error while reading from input image file: " + s.message());
      if (!IsZero(buf.data(), n)) {
        s = output->Write(offset - from, buf.data(), n);
        if (!s.ok()) return Status::IOError("error while writing to output image file: " + s.message());
      }
      offset += n;
    }
  }
  return Status::OK();
}

int RunDd(const DdArgs& args) {
  if (ImageOptsWithFormat(args.image_opts, args.format)) return 1;
  OpenOptions in_options;
  in_options.format = args.format;
  std::string in_path;
  if (!ImageArgument(args.input, args.image_opts, &in_path, &in_options)) return 1;
  LockingEnv in_env(Env::Default(), {in_path, LockingEnv::ReadMode(args.force_share)});
  in_options.env = &in_env;
  std::unique_ptr<Image> input;
  if (!OpenImageOrReport(args.input, in_path, in_options, &input).ok()) return 1;

  OptList list;
  if (!FindFormat(args.out_format, &list)) {
    PrintError("Unknown file format");
    return 1;
  }
  struct stat st;
  if (stat(args.output.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    PrintError(args.output + ": not a regular file; dd creates image files (convert -n writes into a device)");
    return 1;
  }

  // img_dd's arithmetic, in its signed 64-bit range (all three are bounded).
  const uint64_t bs = args.block_size;
  uint64_t size = input->virtual_size();
  if (args.count && *args.count <= INT64_MAX / bs && *args.count * bs < size) size = *args.count * bs;
  const uint64_t skip = args.skip.value_or(0);
  const bool skip_past_end = args.skip && (skip > INT64_MAX / bs || size < skip * bs);
  const uint64_t start = skip_past_end ? size : skip * bs;

  LockingEnv create_env(Env::Default(), {args.output, ImageLock::Mode::kReadOnlyShared});
  CreateOptions co;
  co.format = args.out_format;
  co.size = size - start;
  co.env = &create_env;
  Status s = CreateImage(args.output, co);
  if (!s.ok()) {
    PrintError(args.output + ": error while creating output image: " + MessageWithoutPath(args.output, s));
    return 1;
  }
  LockingEnv out_env(Env::Default(), {args.output, ImageLock::Mode::kReadOnly});
  OpenOptions out_options;
  out_options.format = args.out_format;
  out_options.writable = true;
  out_options.env = &out_env;
  std::unique_ptr<Image> output;
  if (!OpenImageOrReport(args.output, out_options, &output).ok()) return 1;
  // qemu-img warns and leaves the output empty, and succeeds.
  if (skip_past_end) PrintError(args.input + ": cannot skip to specified offset");

  s = CopyRange(input.get(), output.get(), start, size);
  if (s.ok()) s = output->Flush();
  if (!s.ok()) {
    PrintError(s.message());
    return 1;
  }
  return 0;
}

}  // namespace

int CmdDd(int argc, char** argv) { return ParseAndRun(argc, argv, ParseDd, RunDd); }

}  // namespace dmcow::cli
