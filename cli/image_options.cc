#include "image_options.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cli_common.h"
#include "object_option.h"

namespace dmcow::cli {
namespace {

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

}  // namespace

bool FindFormat(const std::string& fmt, OptList* list) {
  if (fmt == "qcow2")
    *list = {std::begin(kQcow2Opts), std::end(kQcow2Opts)};
  else if (fmt == "qcow")
    *list = {std::begin(kQcowOpts), std::end(kQcowOpts)};
  else if (fmt == "raw")
    *list = {std::begin(kRawOpts), std::end(kRawOpts)};
  else
    return false;
  return true;
}

static const char* TypeName(OptType t) {
  switch (t) {
    case OptType::kString: return "str";
    case OptType::kSize: return "size";
    case OptType::kNumber: return "num";
    default: return "bool (on/off)";
  }
}

// qemu-img's print_block_option_help.
// qemu's qemu_opts_print_help: the options sorted by name, one line each.
static void PrintOptionLines(std::vector<const OptDesc*> opts) {
  std::sort(opts.begin(), opts.end(),
            [](const OptDesc* a, const OptDesc* b) { return std::strcmp(a->name, b->name) < 0; });
  for (const OptDesc* d : opts) {
    std::string line = std::string("  ") + d->name + "=<" + TypeName(d->type) + ">";
    if (line.size() < 24) line.append(24 - line.size(), ' ');
    std::printf("%s - %s\n", line.c_str(), d->help);
  }
}

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
  if (filename) {
    std::printf("Supported options:\n");
  } else {
    std::printf("Supported %s options:\n", fmt.c_str());
  }
  PrintOptionLines(opts);
  if (!filename) {
    std::printf(
        "\nThe protocol level may support further options.\n"
        "Specify the target filename to include those options.\n");
  }
  return 0;
}

// QEMU 7.2's qcow2 amend options, in its table order (the order amend
// validates them in); help lists them sorted by name.
const OptDesc kQcow2AmendOpts[] = {
    {"encrypt.state", OptType::kString, nullptr, "Select new state of affected keyslots (active/inactive)", false},
    {"encrypt.keyslot", OptType::kNumber, nullptr, "Select a single keyslot to modify explicitly", false},
    {"encrypt.old-secret", OptType::kString, nullptr, "Select all keyslots that match this password", false},
    {"encrypt.new-secret", OptType::kString, nullptr,
     "New secret to set in the matching keyslots. Empty string to erase", false},
    {"encrypt.iter-time", OptType::kNumber, nullptr, "Time to spend in PBKDF in milliseconds", false},
    {"size", OptType::kSize, nullptr, "Virtual disk size", false},
    {"compat", OptType::kString, nullptr, "Compatibility level (v2 [0.10] or v3 [1.1])", false},
    {"backing_file", OptType::kString, nullptr, "File name of a base image", false},
    {"backing_fmt", OptType::kString, nullptr, "Image format of the base image", false},
    {"data_file", OptType::kString, nullptr, "File name of an external data file", false},
    {"data_file_raw", OptType::kBool, nullptr, "The external data file must stay valid as a raw image", false},
    {"lazy_refcounts", OptType::kBool, nullptr, "Postpone refcount updates", false},
    {"refcount_bits", OptType::kNumber, nullptr, "Width of a reference count entry in bits", false},
};

OptList Qcow2AmendOptions() { return {std::begin(kQcow2AmendOpts), std::end(kQcow2AmendOpts)}; }

int PrintAmendHelp(const std::string& fmt) {
  OptList list;
  if (!FindFormat(fmt, &list)) {
    PrintError("Unknown file format '" + fmt + "'");
    return 1;
  }
  if (fmt != "qcow2") {
    PrintError("Format driver '" + fmt + "' does not support option amendment");
    return 1;
  }
  std::vector<const OptDesc*> opts;
  for (const OptDesc& d : kQcow2AmendOpts) opts.push_back(&d);
  std::printf("Amend options for '%s':\n", fmt.c_str());
  PrintOptionLines(opts);
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

bool AppendOptionList(const char* list, std::string* options) {
  if (!IsValidOptionList(list)) {
    PrintError(std::string("Invalid option list: ") + list);
    return false;
  }
  *options = options->empty() ? std::string(list) : *options + "," + list;
  return true;
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
std::string BadSizeParameter(const std::string& name, const std::string& value) {
  if (LooksLikeSize(value)) return "Value '" + value + "' is out of range for parameter '" + name + "'";
  return "Parameter '" + name +
         "' expects a non-negative number below 2^64\n"
         "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
         "and exabytes, respectively.";
}

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

std::string Escaped(const std::string& v) {
  std::string out;
  for (char c : v) {
    out += c;
    if (c == ',') out += ',';
  }
  return out;
}

std::string ParseOptionList(const OptList& list, const std::vector<OptDesc>& extra, const std::string& options,
                            OptionSet* set) {
  for (const auto& option : SplitOptions(options)) {
    // Not a structured binding: clang 14 cannot capture one in a lambda.
    const std::string& name = option.first;
    const std::string& value = option.second;
    const OptDesc* d = std::find_if(list.begin, list.end, [&](const OptDesc& o) { return name == o.name; });
    if (d == list.end) {
      auto it = std::find_if(extra.begin(), extra.end(), [&](const OptDesc& o) { return name == o.name; });
      if (it == extra.end()) return "Invalid parameter '" + name + "'";
      d = &*it;
    }
    SetOption opt{value, 0};
    bool flag;
    switch (d->type) {
      case OptType::kBool:
        if (!ParseBool(value, &flag)) return "Parameter '" + name + "' expects 'on' or 'off'";
        break;
      case OptType::kSize:
        if (!ParseSize(value, &opt.number)) return BadSizeParameter(name, value);
        break;
      case OptType::kNumber:
        if (!ParseNumber(value, &opt.number)) return "Parameter '" + name + "' expects a number";
        break;
      case OptType::kString: break;
    }
    (*set)[name] = opt;
  }
  return "";
}

void FillCreateOptions(const OptionSet& set, CreateOptions* co) {
  auto str = [&](const char* name, std::string* out) {
    auto it = set.find(name);
    if (it != set.end()) *out = it->second.raw;
  };
  auto flag = [&](const char* name, bool* out) {
    auto it = set.find(name);
    if (it != set.end()) ParseBool(it->second.raw, out);
  };
  str("backing_file", &co->backing_file);
  str("backing_fmt", &co->backing_fmt);
  str("preallocation", &co->preallocation);
  str("compat", &co->compat);
  str("compression_type", &co->compression_type);
  str("data_file", &co->data_file);
  flag("lazy_refcounts", &co->lazy_refcounts);
  flag("extended_l2", &co->extended_l2);
  flag("data_file_raw", &co->data_file_raw);
  bool legacy_encryption = false;
  flag("encryption", &legacy_encryption);
  if (legacy_encryption) co->encrypt_format = "aes";
  str("encrypt.format", &co->encrypt_format);
  str("encrypt.cipher-alg", &co->encrypt_cipher_alg);
  str("encrypt.cipher-mode", &co->encrypt_cipher_mode);
  str("encrypt.ivgen-alg", &co->encrypt_ivgen_alg);
  str("encrypt.ivgen-hash-alg", &co->encrypt_ivgen_hash_alg);
  str("encrypt.hash-alg", &co->encrypt_hash_alg);
  if (auto it = set.find("encrypt.iter-time"); it != set.end()) co->encrypt_iter_time_ms = it->second.number;
  if (auto it = set.find("encrypt.key-secret"); it != set.end()) co->encrypt_secret = FindSecret(it->second.raw);
  if (auto it = set.find("cluster_size"); it != set.end()) co->cluster_size = it->second.number;
  if (auto it = set.find("refcount_bits"); it != set.end()) {
    const uint64_t bits = it->second.number;
    co->refcount_bits = bits > 0xffffffffULL ? 3 : static_cast<uint32_t>(bits);  // 3: any invalid width
  }
}

std::string MissingSecret(const OptionSet& set) {
  auto it = set.find("encrypt.key-secret");
  if (it == set.end() || FindSecret(it->second.raw) != nullptr) return "";
  return "No secret with id '" + it->second.raw + "'";
}

bool QemuHasDriver(const std::string& driver) {
  static const char* const kQemuDrivers[] = {"vmdk", "vdi",   "vpc",   "vhdx", "qed",         "parallels", "luks",
                                             "dmg",  "cloop", "bochs", "file", "host_device", "nbd"};
  for (const char* known : kQemuDrivers) {
    if (driver == known) return true;
  }
  return false;
}

namespace {
constexpr char kKeySecret[] = "encrypt.key-secret";
constexpr int kMaxKeyDepth = 64;

// "encrypt.key-secret" is the key of the image itself (depth 0),
// "backing.encrypt.key-secret" its backing file's (1), and so on; -1 for
// another name.
int KeySecretDepth(const std::string& name) {
  int depth = 0;
  size_t at = 0;
  while (name.compare(at, 8, "backing.") == 0 && depth < kMaxKeyDepth) at += 8, depth++;
  return name.compare(at, std::string::npos, kKeySecret) == 0 ? depth : -1;
}
}  // namespace

std::string ParseImageOpts(const std::string& opts, std::string* filename, OpenOptions* options) {
  if (opts.empty()) return "Must specify either driver or file";
  std::string driver, file, file_driver, backing;
  bool has_file = false, has_backing = false;
  std::vector<std::pair<std::string, std::string>> unknown;
  std::vector<std::pair<int, std::string>> key_secrets;  // (chain depth, secret id)
  const auto list = SplitOptions(opts);
  // As qemu's parser: a first item without '=' is the value of "file".
  const bool implied_file = opts.substr(0, opts.find(',')).find('=') == std::string::npos;
  for (size_t i = 0; i < list.size(); i++) {
    auto [name, value] = list[i];
    if (i == 0 && implied_file) {
      value = name;
      name = "file";
    }
    if (name == "driver")
      driver = value;
    else if (name == "file.filename")
      file = value, has_file = true;
    else if (name == "file.driver")
      file_driver = value;
    else if (name == "backing")
      backing = value, has_backing = true;
    else if (KeySecretDepth(name) >= 0)
      key_secrets.emplace_back(KeySecretDepth(name), value);
    else
      unknown.emplace_back(name, value);
  }
  // A key for a raw image is an option its driver does not have.
  if (driver == "raw" && !key_secrets.empty()) unknown.emplace_back(kKeySecret, key_secrets.front().second);
  for (const auto& [name, value] : unknown) {
    // "file=NAME" names a block node; qemu-img has none to name.
    if (name == "file") {
      if (has_file) return "Cannot reference an existing block device with additional options or a new filename";
      return "Cannot find device='" + value + "' nor node-name='" + value + "'";
    }
  }
  if (!driver.empty() && driver != "raw" && driver != "qcow" && driver != "qcow2") {
    if (QemuHasDriver(driver)) return "unsupported image format '" + driver + "'";
    return "Unknown driver '" + driver + "'";
  }
  if (!file_driver.empty() && file_driver != "file") return "unsupported protocol driver '" + file_driver + "'";
  for (const auto& [name, value] : unknown) {
    if (name.rfind("file.", 0) == 0) return "Block protocol 'file' doesn't support the option '" + name.substr(5) + "'";
    if (driver.empty()) return "Invalid parameter '" + name + "'";
    return "Block format '" + driver + "' does not support the option '" + name + "'";
  }
  if (!has_file) return "A block device must be specified for \"file\"";
  if (file.empty()) return "The 'file' block driver requires a file name";
  if (has_backing && !backing.empty() && backing != "null") {
    return "Could not open backing file: Cannot find device='" + backing + "' nor node-name='" + backing + "'";
  }
  for (const auto& [depth, id] : key_secrets) {
    const std::string* secret = FindSecret(id);
    // qemu-img info never loads a key, so it never looks the secret up.
    if (secret == nullptr && !options->allow_missing_keys) return "No secret with id '" + id + "'";
    if (options->layer_secrets.size() <= static_cast<size_t>(depth)) options->layer_secrets.resize(depth + 1);
    options->layer_secrets[depth] = secret;
  }
  *filename = file;
  options->format = driver;
  if (has_backing) options->open_backing = false;
  return "";
}

}  // namespace dmcow::cli
