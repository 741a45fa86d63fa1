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
#include <string>
#include <vector>

#include "cli_common.h"
#include "dmcow/create.h"
#include "image_options.h"

namespace dmcow::cli {
namespace {

void PrintUsage() {
  std::printf("usage: %s create [-f FMT] [-o OPTIONS] [-b BACKING_FILE [-F BACKING_FMT]] [-u] [-q] FILE [SIZE]\n\n"
              "Create the image FILE of format FMT (raw by default, qcow or qcow2) and size SIZE\n"
              "(suffixes k, M, G, T, P, E; taken from BACKING_FILE if omitted).\n"
              "'-o help' lists the options of FMT. -u does not open BACKING_FILE (then -F and SIZE\n"
              "are required). -q prints nothing on success.\n",
              kProgName);
}

}  // namespace

int CmdCreate(int argc, char** argv) {
  std::string fmt = "raw", options, base_filename, base_fmt;
  bool have_base = false, have_base_fmt = false, quiet = false, no_backing = false;
  static const struct option kLong[] = {{"help", no_argument, nullptr, 'h'}, {nullptr, 0, nullptr, 0}};
  optind = 0;  // full reset of GNU getopt
  opterr = 0;
  for (;;) {
    int c = getopt_long(argc, argv, ":F:b:f:ho:qu", kLong, nullptr);
    if (c == -1) break;
    switch (c) {
      case ':':
        return UsageError(std::string("missing argument for option '") + argv[optind - 1] + "'");
      case '?':
        return UsageError(std::string("unrecognized option '") + argv[optind - 1] + "'");
      case 'h':
        PrintUsage();
        return 0;
      case 'F':
        base_fmt = optarg;
        have_base_fmt = true;
        break;
      case 'b':
        base_filename = optarg;
        have_base = true;
        break;
      case 'f':
        fmt = optarg;
        break;
      case 'o':
        if (!IsValidOptionList(optarg)) {
          PrintError(std::string("Invalid option list: ") + optarg);
          return 1;
        }
        options = options.empty() ? std::string(optarg) : options + "," + optarg;
        break;
      case 'q':
        quiet = true;
        break;
      case 'u':
        no_backing = true;
        break;
    }
  }

  const char* filename_or_null = optind < argc ? argv[optind] : nullptr;
  if (!options.empty() && HasHelpOption(options)) return PrintOptionHelp(filename_or_null, fmt);
  if (optind >= argc) return UsageError("Expecting image file name");
  const std::string filename = argv[optind++];

  bool have_size_arg = false;
  uint64_t size_arg = 0;
  if (optind < argc) {
    std::string text = argv[optind++];
    if (!ParseSize(text, &size_arg)) {
      if (LooksLikeSize(text)) {
        PrintError("Invalid image size specified. Must be between 0 and 9223372036854775807.");
      } else {
        PrintError("Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, "
                   "megabytes, gigabytes, terabytes, petabytes and exabytes.");
      }
      return 1;
    }
    have_size_arg = true;
  }
  if (optind != argc) return UsageError(std::string("Unexpected argument: ") + argv[optind]);

  auto fail = [&](const std::string& msg) {
    PrintError(filename + ": " + msg);
    return 1;
  };
  OptList list;
  if (!FindFormat(fmt, &list)) return fail("Unknown file format '" + fmt + "'");

  // -o, as qemu_opts_do_parse: names and value types; the last value wins.
  OptionSet set;
  if (std::string error = ParseOptionList(list, {}, options, &set); !error.empty()) return fail(error);
  // bdrv_img_create: the size once, then -b and -F over -o.
  if (set.count("size")) {
    if (have_size_arg) return fail("The image size must be specified only once");
  } else if (have_size_arg) {
    set["size"] = SetOption{std::to_string(size_arg), size_arg};
  }
  if (have_base) {
    if (fmt == "raw") return fail("Backing file not supported for file format 'raw'");
    set["backing_file"] = SetOption{base_filename, 0};
  }
  if (have_base_fmt) {
    if (fmt == "raw") return fail("Backing file format not supported for file format 'raw'");
    set["backing_fmt"] = SetOption{base_fmt, 0};
  }
  if (set.count("backing_file") && set["backing_file"].raw.empty()) {
    return fail("Expected backing file name, got empty string");
  }

  CreateOptions co;
  co.format = fmt;
  co.open_backing = !no_backing;
  if (set.count("size")) co.size = set["size"].number;
  FillCreateOptions(set, &co);

  Status s = PrepareCreateOptions(filename, &co);
  if (!s.ok()) {
    PrintError(s.ToString());
    return 1;
  }
  if (!set.count("size")) set["size"] = SetOption{std::to_string(co.size), co.size};

  if (!quiet) {
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

  bool encrypted = false;
  for (const auto& [name, opt] : set) {
    bool on = false;
    if (name == "encryption") encrypted |= ParseBool(opt.raw, &on) && on;
    if (name.rfind("encrypt.", 0) == 0) encrypted = true;
  }
  if (encrypted) return fail("Encryption is not supported by dmcow-img");

  s = CreateImage(filename, co);
  if (!s.ok()) {
    PrintError(s.ToString());
    return 1;
  }
  return 0;
}

}  // namespace dmcow::cli
