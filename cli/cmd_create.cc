// dmcow-img create: qemu-img create.
//
//   create [-f FMT] [-o OPTIONS] [-b BACKING [-F BACKING_FMT]] [-u] [-q] FILE [SIZE]
//
// The command line is read as qemu-img 7.2 reads it (getopt, -o lists that
// accumulate, ",," for a comma in a value, "-o help"), the option values are
// checked by type before anything else, then the backing file, then the
// "Formatting ..." line is printed (same options, same order, same values
// as qemu-img's), then the format's own checks run and the image is made.
// Exit status: 0, or 1 with a one-line message on stderr.
#include <getopt.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
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

void PrintUsage() {
  std::printf(
      "usage: %s create [-f FMT] [-o OPTIONS] [-b BACKING_FILE [-F BACKING_FMT]] [-u] [-q] FILE [SIZE]\n\n"
      "Create the image FILE of format FMT (raw by default, qcow or qcow2) and size SIZE\n"
      "(suffixes k, M, G, T, P, E; taken from BACKING_FILE if omitted).\n"
      "'-o help' lists the options of FMT. -u does not open BACKING_FILE (then -F and SIZE\n"
      "are required). -q prints nothing on success.\n",
      kProgName);
}

// create's command line, as ParseCreate reads it.
struct CreateArgs {
  std::string fmt = "raw";                   // -f
  std::string options;                       // the -o lists, joined (AppendOptionList)
  std::optional<std::string> base_filename;  // -b
  std::optional<std::string> base_fmt;       // -F
  bool quiet = false;                        // -q
  bool no_backing = false;                   // -u
  std::string filename;                      // FILE
  std::optional<uint64_t> size;              // SIZE
};

// Reads create's command line into *args as qemu-img create reads it
// (getopt: ParseGetopt says why not CLI11). Returns an exit code when the
// command ends here: 0 after -h or "-o help", 1 after a bad command line
// (message printed).
std::optional<int> ParseCreate(int argc, char** argv, CreateArgs* args) {
  static const struct option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                        {"object", required_argument, nullptr, kObjectOption},
                                        {nullptr, 0, nullptr, 0}};
  std::vector<std::string> operands;
  auto on_option = [&](int c, const char* arg) -> std::optional<int> {
    switch (c) {
      case 'h': PrintUsage(); return 0;
      case 'F': args->base_fmt = arg; break;
      case 'b': args->base_filename = arg; break;
      case 'f': args->fmt = arg; break;
      case 'o':
        if (!AppendOptionList(arg, &args->options)) return 1;
        break;
      case 'q': args->quiet = true; break;
      case 'u': args->no_backing = true; break;
    }
    return std::nullopt;
  };
  if (auto rc = ParseGetopt(argc, argv, ":F:b:f:ho:qu", kLong, on_option, &operands)) return rc;

  const char* filename_or_null = operands.empty() ? nullptr : operands[0].c_str();
  if (!args->options.empty() && HasHelpOption(args->options)) return PrintOptionHelp(filename_or_null, args->fmt);
  if (operands.empty()) return UsageError("Expecting image file name");
  args->filename = operands[0];
  if (operands.size() > 1) {
    const std::string& text = operands[1];
    uint64_t size = 0;
    if (!ParseQemuNumber("image size", text, 0, INT64_MAX, &size)) return 1;
    args->size = size;
  }
  if (operands.size() > 2) return UsageError("Unexpected argument: " + operands[2]);
  return std::nullopt;
}

// Makes the image args describes; returns the exit code.
int RunCreate(const CreateArgs& args) {
  const std::string& filename = args.filename;
  const std::string& fmt = args.fmt;
  auto fail = [&](const std::string& msg) {
    PrintError(filename + ": " + msg);
    return 1;
  };
  OptList list;
  if (!FindFormat(fmt, &list)) return fail("Unknown file format '" + fmt + "'");

  // -o, as qemu_opts_do_parse: names and value types; the last value wins.
  OptionSet set;
  if (std::string error = ParseOptionList(list, {}, args.options, &set); !error.empty()) return fail(error);
  // bdrv_img_create: the size once, then -b and -F over -o.
  if (set.count("size")) {
    if (args.size) return fail("The image size must be specified only once");
  } else if (args.size) {
    set["size"] = SetOption{std::to_string(*args.size), *args.size};
  }
  if (args.base_filename) {
    if (fmt == "raw") return fail("Backing file not supported for file format 'raw'");
    set["backing_file"] = SetOption{*args.base_filename, 0};
  }
  if (args.base_fmt) {
    if (fmt == "raw") return fail("Backing file format not supported for file format 'raw'");
    set["backing_fmt"] = SetOption{*args.base_fmt, 0};
  }
  if (set.count("backing_file") && set["backing_file"].raw.empty()) {
    return fail("Expected backing file name, got empty string");
  }

  // The image is locked as qemu-img create locks it (locking_env.h): a file
  // another process has open is refused before it is emptied. The backing
  // file is only read for its size, as qemu-img does with force-share.
  LockingEnv env(Env::Default(), {filename, ImageLock::Mode::kReadOnlyShared});
  CreateOptions co;
  co.format = fmt;
  co.open_backing = !args.no_backing;
  co.env = &env;
  if (set.count("size")) co.size = set["size"].number;
  FillCreateOptions(set, &co);

  Status s = PrepareCreateOptions(filename, &co);
  if (!s.ok()) {
    PrintError(s.ToString());
    // qemu-img's hint, on a line of its own, when the backing file (opened
    // only here) would not open: PrepareCreateOptions says "Could not open".
    if (s.message().find(": Could not open '") != std::string::npos)
      std::fprintf(stderr, "Could not open backing image.\n");
    return 1;
  }
  if (!set.count("size")) set["size"] = SetOption{std::to_string(co.size), co.size};

  if (!args.quiet) {
    std::string line = "Formatting '" + filename + "', fmt=" + fmt + " ";
    const char* sep = "";
    for (const OptDesc* d = list.begin; d != list.end; d++) {
      auto it = set.find(d->name);
      std::string value;
      if (it == set.end()) {
        if (!d->def) continue;
        value = d->def;
      } else if (d->type == OptType::kSize || d->type == OptType::kNumber) {
        value = std::to_string(static_cast<int64_t>(it->second.number));
      } else if (d->type == OptType::kString) {
        value = Escaped(it->second.raw);
      } else {
        value = it->second.raw;
      }
      line += std::string(sep) + d->name + "=" + value;
      sep = " ";
    }
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  }

  if (const std::string missing = MissingSecret(set); !missing.empty()) return fail(missing);

  s = CreateImage(filename, co);
  if (!s.ok()) {
    PrintError(s.ToString());
    return 1;
  }
  return 0;
}

}  // namespace

int CmdCreate(int argc, char** argv) { return ParseAndRun(argc, argv, ParseCreate, RunCreate); }

}  // namespace dmcow::cli
