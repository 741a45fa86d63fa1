#include "cli_common.h"

#include <getopt.h>

#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include <CLI/CLI.hpp>

#include "image_options.h"
#include "locking_env.h"
#include "object_option.h"

namespace dmcow::cli {

void PrintError(const std::string& msg) {
  std::fflush(stdout);
  std::fprintf(stderr, "%s: %s\n", kProgName, msg.c_str());
  // A lock refusal's second line, as qemu-img prints it (locking_env.h).
  if (std::string hint = LockingEnv::TakeHint(); !hint.empty()) std::fprintf(stderr, "%s\n", hint.c_str());
}

int UsageError(const std::string& msg) {
  PrintError(msg);
  std::fprintf(stderr, "Try '%s --help' for more information\n", kProgName);
  return 1;
}

std::string SizeToStr(uint64_t val) {
  static const char* const kSuffixes[] = {"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"};
  // Same arithmetic as qemu: switch to the next unit once the integer part
  // reaches 1000.
  int exp = 0;
  std::frexp(static_cast<double>(val) / (1000.0 / 1024.0), &exp);
  int i = (exp - 1) / 10;
  if (i < 0) i = 0;
  if (i > 6) i = 6;
  uint64_t div = uint64_t{1} << (i * 10);
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%0.3g %sB", static_cast<double>(val) / div, kSuffixes[i]);
  return buf;
}

static int64_t SuffixMul(char c) {
  switch (c) {
    case 'B':
    case 'b': return 1;
    case 'K':
    case 'k': return int64_t{1} << 10;
    case 'M':
    case 'm': return int64_t{1} << 20;
    case 'G':
    case 'g': return int64_t{1} << 30;
    case 'T':
    case 't': return int64_t{1} << 40;
    case 'P':
    case 'p': return int64_t{1} << 50;
    case 'E':
    case 'e': return int64_t{1} << 60;
    default: return -1;
  }
}

// block/qapi.c bdrv_snapshot_dump().
static std::string SnapshotLine(const SnapshotInfo& sn) {
  time_t date = static_cast<time_t>(sn.date_sec);
  struct tm tm;
  localtime_r(&date, &tm);
  char date_buf[64];
  std::strftime(date_buf, sizeof(date_buf), "%Y-%m-%d %H:%M:%S", &tm);
  uint64_t secs = sn.vm_clock_nsec / 1000000000;
  char clock_buf[128];
  std::snprintf(clock_buf, sizeof(clock_buf), "%02d:%02d:%02d.%03d", static_cast<int>(secs / 3600),
                static_cast<int>((secs / 60) % 60), static_cast<int>(secs % 60),
                static_cast<int>((sn.vm_clock_nsec / 1000000) % 1000));
  char icount_buf[32] = "";
  if (sn.has_icount) std::snprintf(icount_buf, sizeof(icount_buf), "%" PRId64, static_cast<int64_t>(sn.icount));
  char line[512];
  std::snprintf(line, sizeof(line), "%-9s %-16s %8s%20s%13s%11s", sn.id.c_str(), sn.name.c_str(),
                SizeToStr(sn.vm_state_size).c_str(), date_buf, clock_buf, icount_buf);
  return line;
}

void PrintSnapshotList(const std::vector<SnapshotInfo>& snapshots) {
  if (snapshots.empty()) return;
  std::printf("Snapshot list:\n");
  std::printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
  for (const SnapshotInfo& sn : snapshots) std::printf("%s\n", SnapshotLine(sn).c_str());
}

bool ValidCacheMode(const std::string& mode) {
  return mode == "none" || mode == "off" || mode == "directsync" || mode == "writeback" || mode == "unsafe" ||
         mode == "writethrough";
}

bool ParseSize(const std::string& text, uint64_t* out) {
  const char* s = text.c_str();
  if (*s == '\0' || std::strchr(s, '-') != nullptr) return false;
  char* end = nullptr;
  errno = 0;
  unsigned long long val = std::strtoull(s, &end, 10);
  if (errno != 0 || end == s) return false;
  long double fraction = 0;
  if (val == 0 && (*end == 'x' || *end == 'X')) {
    errno = 0;
    val = std::strtoull(s, &end, 16);
    if (errno != 0 || *end == '.' || SuffixMul(*end) > 0) return false;
  } else if (*end == '.') {
    char* fend = nullptr;
    long double f = std::strtold(s, &fend);
    if (fend == end) return false;
    for (const char* q = end; q < fend; q++) {
      if (*q != '.' && (*q < '0' || *q > '9')) return false;  // no exponents
    }
    fraction = f - static_cast<long double>(val);
    end = fend;
  }
  int64_t mul = SuffixMul(*end);
  if (mul > 0) {
    ++end;
  } else {
    mul = 1;
  }
  if (*end != '\0') return false;
  if (mul == 1) {
    if (fraction != 0) return false;
  } else {
    const uint64_t umul = static_cast<uint64_t>(mul);
    const uint64_t frac = static_cast<uint64_t>(std::floor(fraction * umul + 0.5L));
    if (val > (UINT64_MAX - frac) / umul) return false;
    val = val * umul + frac;
  }
  if (val > static_cast<unsigned long long>(INT64_MAX)) return false;
  *out = val;
  return true;
}

std::optional<int> ParseCommandLine(CLI::App& app, int argc, char** argv) {
  // As with getopt, a repeated option takes its last value.
  for (CLI::Option* opt : app.get_options()) {
    if (opt->nonpositional()) opt->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  }
  // Every command takes --object (object_option.h), each one created in turn.
  std::vector<std::string> objects;
  app.add_option("--object", objects, "A QEMU object: secret,id=ID,data=DATA|file=FILE[,format=raw|base64]")
      ->allow_extra_args(false)  // one value per --object; FILE stays an operand
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
    return 0;
  } catch (const CLI::ExtrasError& e) {
    // An option the command does not have (e.g. -U on commit): getopt's words, as qemu-img.
    for (const std::string& arg : app.remaining()) {
      if (arg.size() > 1 && arg[0] == '-') return UsageError("unrecognized option '" + arg + "'");
    }
    return UsageError(e.what());
  } catch (const CLI::ParseError& e) {
    return UsageError(e.what());
  }
  for (const std::string& object : objects) {
    if (std::optional<int> rc = ProcessObjectOption(object)) return rc;
  }
  return std::nullopt;
}

std::optional<int> ParseGetopt(int argc, char** argv, const char* optstring, const struct ::option* long_options,
                               const std::function<std::optional<int>(int c, const char* optarg)>& on_option,
                               std::vector<std::string>* operands) {
  optind = 0;  // a full reset of GNU getopt
  opterr = 0;
  for (;;) {
    const int c = getopt_long(argc, argv, optstring, long_options, nullptr);
    if (c == -1) break;
    if (c == ':') return UsageError(std::string("missing argument for option '") + argv[optind - 1] + "'");
    if (c == '?') return UsageError(std::string("unrecognized option '") + argv[optind - 1] + "'");
    if (c == kObjectOption) {
      // Created where it is met, as qemu-img does: a bad object ends the
      // command before later options are read.
      if (std::optional<int> rc = ProcessObjectOption(optarg)) return rc;
      continue;
    }
    if (std::optional<int> rc = on_option(c, optarg)) return rc;
  }
  operands->assign(argv + optind, argv + argc);
  return std::nullopt;
}

void AddImageArguments(CLI::App& app, bool* force_share, bool* image_opts, std::vector<std::string>* files) {
  app.add_flag("-U,--force-share", *force_share, kForceShareHelp);
  app.add_flag("--image-opts", *image_opts, "FILE is an option list: driver=qcow2,file.filename=F[,backing=null]");
  app.add_option("FILE", *files, "Image file");
}

bool ParseOutputFormat(const std::string& value, bool* json) {
  if (value == "json") {
    *json = true;
  } else if (value == "human") {
    *json = false;
  } else {
    PrintError("--output must be used with human or json as argument.");
    return false;
  }
  return true;
}

Status OpenImageOrReport(const std::string& path, const OpenOptions& options, std::unique_ptr<Image>* image) {
  return OpenImageOrReport(path, path, options, image);
}

Status OpenImageOrReport(const std::string& shown, const std::string& path, const OpenOptions& options,
                         std::unique_ptr<Image>* image) {
  Status s = OpenImage(path, options, image);
  if (!s.ok()) PrintError("Could not open '" + shown + "': " + OpenFailure(path, s));
  return s;
}

std::string MessageWithoutPath(const std::string& path, const Status& s) {
  const std::string prefix = path + ": ";
  const std::string& msg = s.message();
  return msg.rfind(prefix, 0) == 0 ? msg.substr(prefix.size()) : msg;
}

std::string WithInUseBitmapHint(std::string message) {
  if (message.find("is inconsistent and cannot be used") != std::string::npos) {
    message += "\nTry block-dirty-bitmap-remove to delete this bitmap from disk";
  }
  return message;
}

std::string OpenFailure(const std::string& path, const Status& s) {
  std::string why = s.ToString();
  // The image file itself could not be opened: qemu-img's file-posix words.
  const std::string open_failed = path + ": open: ";
  if (why.rfind(open_failed, 0) == 0) why = "Could not open '" + path + "': " + why.substr(open_failed.size());
  // A missing or wrong key: QEMU's words, which name no file (a layer
  // below the top is "Could not open backing file: " once per level).
  if (s.key_refusal() != Status::KeyRefusal::kNone) why = s.WithoutRefusedLayer();
  // -f naming a format QEMU does not have either: its words.
  const std::string unknown = path + ": unknown image format '";
  if (why.rfind(unknown, 0) == 0 && why.back() == '\'') {
    const std::string format = why.substr(unknown.size(), why.size() - unknown.size() - 1);
    if (!QemuHasDriver(format)) why = "Unknown driver '" + format + "'";
  }
  return why;
}

bool ImageArgument(const std::string& arg, bool image_opts, std::string* path, OpenOptions* options) {
  if (!image_opts) {
    *path = arg;
    return true;
  }
  std::string error = ParseImageOpts(arg, path, options);
  if (error.empty()) return true;
  PrintError("Could not open '" + arg + "': " + error);
  return false;
}

void WarnIfProbedRaw(const Image& image, const std::string& path) {
  if (image.info().format != "raw") return;
  std::fprintf(stderr,
               "WARNING: Image format was not specified for '%s' and probing guessed raw.\n"
               "         Automatically detecting the format is dangerous for raw images, write operations on "
               "block 0 will be restricted.\n"
               "         Specify the 'raw' format explicitly to remove the restrictions.\n",
               path.c_str());
}

bool ImageOptsWithFormat(bool image_opts, const std::string& format) {
  if (!image_opts || format.empty()) return false;
  PrintError("--image-opts and --format are mutually exclusive");
  return true;
}

void Progress::Advance(float delta) { Update(current_ + delta); }

void Progress::Set(float value) { Update(value); }

void Progress::Update(float current) {
  if (current > 100) current = 100;
  current_ = current;
  if (!enabled_) return;
  if (current > last_print_ + min_skip_ || current < last_print_ - min_skip_ || current == 0 || current == 100) {
    last_print_ = current;
    std::printf("    (%3.2f/100%%)\r", current);
    std::fflush(stdout);
  }
}

void Progress::End() {
  if (!enabled_) return;
  std::printf("\n");
  std::fflush(stdout);
}

bool IsZero(const void* p, size_t len) {
  const unsigned char* b = static_cast<const unsigned char*>(p);
  // Check the first 16 bytes cheaply, then compare the buffer with itself shifted.
  size_t head = len < 16 ? len : 16;
  for (size_t i = 0; i < head; i++) {
    if (b[i] != 0) return false;
  }
  return len <= 16 || std::memcmp(b, b + 16, len - 16) == 0;
}

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

bool ParseQemuNumber(const std::string& name, const std::string& text, uint64_t min, uint64_t max, uint64_t* out) {
  const bool parsed = ParseSize(text, out);
  if (!parsed && !LooksLikeSize(text)) {
    PrintError("Invalid " + name + " specified. You may use k, M, G, T, P or E suffixes for");
    PrintError("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
    return false;
  }
  if (!parsed || *out < min || *out > max) {
    PrintError("Invalid " + name + " specified. Must be between " + std::to_string(min) + " and " +
               std::to_string(max) + ".");
    return false;
  }
  return true;
}

}  // namespace dmcow::cli
