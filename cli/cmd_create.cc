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

namespace dmcow::cli {
namespace {

enum class OptType { kString, kSize, kNumber, kBool };

struct OptDesc {
  const char* name;
  OptType type;
  const char* def;  // printed when not set; nullptr: not printed
  const char* help;
  bool protocol;    // file-posix's option, listed in help only with a FILE
};

const char kEncryptionHelp[] = "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)";

// In qemu-img's order for the "Formatting" line: the format's options, then
// the protocol's that the format does not have.
const OptDesc kQcow2Opts[] = {
    {"encryption", OptType::kBool, nullptr, kEncryptionHelp, false},
    {"encrypt.format", OptType::kString, nullptr, "Encrypt the image, format choices: 'aes', 'luks'", false},
    {"encrypt.key-secret", OptType::kString, nullptr, "ID of secret providing qcow AES key or LUKS passphrase", false},
    {"encrypt.cipher-alg", OptType::kString, nullptr, "Name of encryption cipher algorithm", false},
    {"encrypt.cipher-mode", OptType::kString, nullptr, "Name of encryption cipher mode", false},
    {"encrypt.ivgen-alg", OptType::kString, nullptr, "Name of IV generator algorithm", false},
    {"encrypt.ivgen-hash-alg", OptType::kString, nullptr, "Name of IV generator hash algorithm", false},
    {"encrypt.hash-alg", OptType::kString, nullptr, "Name of encryption hash algorithm", false},
    {"encrypt.iter-time", OptType::kNumber, nullptr, "Time to spend in PBKDF in milliseconds", false},
    {"cluster_size", OptType::kSize, "65536", "qcow2 cluster size", false},
    {"extended_l2", OptType::kBool, "off", "Extended L2 tables", false},
    {"preallocation", OptType::kString, nullptr, "Preallocation mode (allowed values: off, metadata, falloc, full)",
     false},
    {"compression_type", OptType::kString, "zlib", "Compression method used for image cluster compression", false},
    {"size", OptType::kSize, nullptr, "Virtual disk size", false},
    {"compat", OptType::kString, nullptr, "Compatibility level (v2 [0.10] or v3 [1.1])", false},
    {"backing_file", OptType::kString, nullptr, "File name of a base image", false},
    {"backing_fmt", OptType::kString, nullptr, "Image format of the base image", false},
    {"data_file", OptType::kString, nullptr, "File name of an external data file", false},
    {"data_file_raw", OptType::kBool, nullptr, "The external data file must stay valid as a raw image", false},
    {"lazy_refcounts", OptType::kBool, "off", "Postpone refcount updates", false},
    {"refcount_bits", OptType::kNumber, "16", "Width of a reference count entry in bits", false},
    {"nocow", OptType::kBool, nullptr, "Turn off copy-on-write (valid only on btrfs)", true},
    {"extent_size_hint", OptType::kSize, nullptr, "Extent size hint for the image file, 0 to disable", true},
};

const OptDesc kQcowOpts[] = {
    {"size", OptType::kSize, nullptr, "Virtual disk size", false},
    {"backing_file", OptType::kString, nullptr, "File name of a base image", false},
    {"backing_fmt", OptType::kString, nullptr, "Format of the backing image", false},
    {"encryption", OptType::kBool, nullptr, kEncryptionHelp, false},
    {"encrypt.format", OptType::kString, nullptr, "Encrypt the image, format choices: 'aes'", false},
    {"encrypt.key-secret", OptType::kString, nullptr, "ID of the secret that provides the AES encryption key", false},
    {"nocow", OptType::kBool, nullptr, "Turn off copy-on-write (valid only on btrfs)", true},
    {"preallocation", OptType::kString, nullptr, "Preallocation mode (allowed values: off, falloc, full)", true},
    {"extent_size_hint", OptType::kSize, nullptr, "Extent size hint for the image file, 0 to disable", true},
};

const OptDesc kRawOpts[] = {
    {"size", OptType::kSize, nullptr, "Virtual disk size", false},
    {"nocow", OptType::kBool, nullptr, "Turn off copy-on-write (valid only on btrfs)", true},
    {"preallocation", OptType::kString, nullptr, "Preallocation mode (allowed values: off, falloc, full)", true},
    {"extent_size_hint", OptType::kSize, nullptr, "Extent size hint for the image file, 0 to disable", true},
};

struct OptList {
  const OptDesc* begin;
  const OptDesc* end;
};

bool FindFormat(const std::string& fmt, OptList* list) {
  if (fmt == "qcow2") *list = {std::begin(kQcow2Opts), std::end(kQcow2Opts)};
  else if (fmt == "qcow") *list = {std::begin(kQcowOpts), std::end(kQcowOpts)};
  else if (fmt == "raw") *list = {std::begin(kRawOpts), std::end(kRawOpts)};
  else return false;
  return true;
}

const char* TypeName(OptType t) {
  switch (t) {
    case OptType::kString: return "str";
    case OptType::kSize: return "size";
    case OptType::kNumber: return "num";
    default: return "bool (on/off)";
  }
}

// qemu-img's print_block_option_help.
int PrintOptionHelp(const char* filename, const std::string& fmt) {
  OptList list;
  if (!FindFormat(fmt, &list)) {
    PrintError("Unknown file format '" + fmt + "'");
    return 1;
  }
  std::vector<const OptDesc*> opts;
  for (const OptDesc* d = list.begin; d != list.end; d++) {
    if (!d->protocol || filename) opts.push_back(d);
  }
  if (filename) {
    // The protocol's size and preallocation, where the format has none.
    static const OptDesc kProtoPrealloc = {"preallocation", OptType::kString, nullptr,
                                           "Preallocation mode (allowed values: off, falloc, full)", true};
    bool has_prealloc = std::any_of(opts.begin(), opts.end(),
                                    [](const OptDesc* d) { return std::strcmp(d->name, "preallocation") == 0; });
    if (!has_prealloc) opts.push_back(&kProtoPrealloc);
  }
  std::sort(opts.begin(), opts.end(), [](const OptDesc* a, const OptDesc* b) { return std::strcmp(a->name, b->name) < 0; });
  if (filename) {
    std::printf("Supported options:\n");
  } else {
    std::printf("Supported %s options:\n", fmt.c_str());
  }
  for (const OptDesc* d : opts) {
    std::string line = std::string("  ") + d->name + "=<" + TypeName(d->type) + ">";
    if (line.size() < 24) line.append(24 - line.size(), ' ');
    line += std::string(" - ") + d->help;
    std::printf("%s\n", line.c_str());
  }
  if (!filename) {
    std::printf("\nThe protocol level may support further options.\n"
                "Specify the target filename to include those options.\n");
  }
  return 0;
}

// qemu-img's is_valid_option_list.
bool IsValidOptionList(const char* s) {
  size_t len = std::strlen(s);
  if (len == 0 || s[0] == ',') return false;
  size_t i = len;
  while (i > 0 && s[i - 1] == ',') i--;
  return (len - i) % 2 == 0;
}

// Splits "a=1,b=x,,y" into {a,1},{b,"x,y"}; a name without '=' gets "on".
std::vector<std::pair<std::string, std::string>> SplitOptions(const std::string& list) {
  std::vector<std::pair<std::string, std::string>> out;
  size_t pos = 0;
  while (pos < list.size()) {
    size_t end = pos;
    std::string name;
    while (end < list.size() && list[end] != '=' && list[end] != ',') name += list[end++];
    std::string value = "on";
    if (end < list.size() && list[end] == '=') {
      value.clear();
      end++;
      while (end < list.size()) {
        if (list[end] == ',') {
          if (end + 1 < list.size() && list[end + 1] == ',') {
            value += ',';
            end += 2;
            continue;
          }
          break;
        }
        value += list[end++];
      }
    }
    out.emplace_back(name, value);
    pos = end + 1;
  }
  return out;
}

bool HasHelpOption(const std::string& list) {
  for (const auto& [name, value] : SplitOptions(list)) {
    if (name == "help" || name == "?") return true;
  }
  return false;
}

bool ParseBool(const std::string& v, bool* out) {
  if (v == "on" || v == "yes" || v == "true" || v == "y") {
    *out = true;
  } else if (v == "off" || v == "no" || v == "false" || v == "n") {
    *out = false;
  } else {
    return false;
  }
  return true;
}

bool ParseNumber(const std::string& v, uint64_t* out) {
  if (v.empty()) return false;
  errno = 0;
  char* end = nullptr;
  unsigned long long n = std::strtoull(v.c_str(), &end, 0);
  if (errno != 0 || *end != '\0') return false;
  *out = n;
  return true;
}

// True if `text` is written as a size (digits, optional fraction or hex,
// optional suffix) even if out of range: tells cvtnum's two messages apart.
bool LooksLikeSize(const std::string& text) {
  size_t i = 0;
  if (text.rfind("0x", 0) == 0 || text.rfind("0X", 0) == 0) {
    i = 2;
    size_t digits = 0;
    while (i < text.size() && std::isxdigit(static_cast<unsigned char>(text[i]))) i++, digits++;
    return digits > 0 && i == text.size();
  }
  size_t digits = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) i++, digits++;
  if (i < text.size() && text[i] == '.') {
    i++;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) i++;
  }
  if (i < text.size() && std::strchr("BbKkMmGgTtPpEe", text[i])) i++;
  return digits > 0 && i == text.size();
}

struct SetOption {
  std::string raw;     // as given
  uint64_t number = 0; // parsed, for size and number options
};

std::string Escaped(const std::string& v) {
  std::string out;
  for (char c : v) {
    out += c;
    if (c == ',') out += ',';
  }
  return out;
}

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
  std::map<std::string, SetOption> set;
  for (const auto& [name, value] : SplitOptions(options)) {
    const OptDesc* d = std::find_if(list.begin, list.end, [&](const OptDesc& o) { return name == o.name; });
    if (d == list.end) return fail("Invalid parameter '" + name + "'");
    SetOption opt{value, 0};
    bool flag;
    switch (d->type) {
      case OptType::kBool:
        if (!ParseBool(value, &flag)) return fail("Parameter '" + name + "' expects 'on' or 'off'");
        break;
      case OptType::kSize:
        if (!ParseSize(value, &opt.number)) {
          return fail("Parameter '" + name + "' expects a non-negative number below 2^64");
        }
        break;
      case OptType::kNumber:
        if (!ParseNumber(value, &opt.number)) return fail("Parameter '" + name + "' expects a number");
        break;
      case OptType::kString:
        break;
    }
    set[name] = opt;
  }
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
  auto str = [&](const char* name, std::string* out) {
    auto it = set.find(name);
    if (it != set.end()) *out = it->second.raw;
  };
  auto flag = [&](const char* name, bool* out) {
    auto it = set.find(name);
    if (it != set.end()) ParseBool(it->second.raw, out);
  };
  if (set.count("size")) co.size = set["size"].number;
  str("backing_file", &co.backing_file);
  str("backing_fmt", &co.backing_fmt);
  str("preallocation", &co.preallocation);
  str("compat", &co.compat);
  str("compression_type", &co.compression_type);
  str("data_file", &co.data_file);
  flag("lazy_refcounts", &co.lazy_refcounts);
  flag("extended_l2", &co.extended_l2);
  flag("data_file_raw", &co.data_file_raw);
  if (set.count("cluster_size")) co.cluster_size = set["cluster_size"].number;
  if (set.count("refcount_bits")) {
    uint64_t bits = set["refcount_bits"].number;
    co.refcount_bits = bits > 0xffffffffULL ? 3 : static_cast<uint32_t>(bits);  // 3: any invalid width
  }

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
