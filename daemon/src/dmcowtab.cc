#include "dmcowtab.h"

#include <cctype>
#include <fstream>
#include <sstream>

namespace dmcowd {

using dmcow::Status;

namespace {

// The table is configuration, but bounded all the same.
constexpr size_t kMaxLine = 4096;
constexpr int kMaxLines = 100000;

const char* const kFlags[] = {"read-only", "no-backing", "allow-device-backing", "no-partitions"};
const char* const kValued[] = {"scratch-max", "key-file"};

Status OptionArgs(const std::string& options, const std::string& where, std::vector<std::string>* args) {
  if (options == "-" || options == "defaults") return Status::OK();
  std::istringstream in(options);
  std::string option;
  while (std::getline(in, option, ',')) {
    const size_t eq = option.find('=');
    const std::string key = option.substr(0, eq);
    bool known = false;
    for (const char* flag : kFlags) {
      if (key != flag) continue;
      if (eq != std::string::npos) return Status::InvalidArgument(where + "option " + key + " takes no value");
      args->push_back("--" + key);
      known = true;
    }
    for (const char* valued : kValued) {
      if (key != valued) continue;
      if (eq == std::string::npos || eq + 1 == option.size()) {
        return Status::InvalidArgument(where + "option " + key + " needs a value (" + key + "=...)");
      }
      args->push_back("--" + key);
      args->push_back(option.substr(eq + 1));
      known = true;
    }
    if (!known) {
      return Status::InvalidArgument(where + "unknown option '" + key +
                                     "' (read-only, no-backing, allow-device-backing, no-partitions, scratch-max=SIZE, "
                                     "key-file=FILE, key-file=N=FILE)");
    }
  }
  return Status::OK();
}

}  // namespace

bool UnescapeOctal(const std::string& field, std::string* out) {
  out->clear();
  for (size_t i = 0; i < field.size(); i++) {
    if (field[i] != '\\') {
      *out += field[i];
      continue;
    }
    int value = 0;
    for (size_t k = 1; k <= 3; k++) {
      if (i + k >= field.size() || field[i + k] < '0' || field[i + k] > '7') return false;
      value = value * 8 + (field[i + k] - '0');
    }
    if (value == 0 || value > 255) return false;
    *out += static_cast<char>(value);
    i += 3;
  }
  return true;
}

Status FindTabEntry(const std::string& path, const std::string& name, TabEntry* out) {
  std::ifstream in(path);
  if (!in) return Status::NotFound(path + ": cannot be read");
  std::string line;
  int number = 0, found_at = 0;
  while (std::getline(in, line)) {
    if (++number > kMaxLines) return Status::InvalidArgument(path + ": more than 100000 lines");
    if (line.size() > kMaxLine) {
      return Status::InvalidArgument(path + ":" + std::to_string(number) + ": line longer than 4096 bytes");
    }
    std::istringstream fields(line);
    std::string first, image, options, extra;
    if (!(fields >> first) || first[0] == '#' || first != name) continue;
    const std::string where = path + ":" + std::to_string(number) + ": ";
    if (found_at != 0) {
      return Status::InvalidArgument(where + name + " is defined twice (first on line " + std::to_string(found_at) +
                                     ")");
    }
    found_at = number;
    if (!(fields >> image)) return Status::InvalidArgument(where + name + " has no image");
    if (fields >> options && fields >> extra && extra[0] != '#') {
      return Status::InvalidArgument(where + "more than three fields (NAME IMAGE OPTIONS)");
    }
    if (!options.empty() && options[0] == '#') options.clear();
    TabEntry entry;
    entry.line = number;
    if (!UnescapeOctal(image, &entry.image)) return Status::InvalidArgument(where + "bad escape in '" + image + "'");
    if (entry.image.empty() || entry.image[0] != '/') {
      return Status::InvalidArgument(where + "image '" + entry.image + "' is not an absolute path");
    }
    if (!options.empty()) DMCOW_RETURN_IF_ERROR(OptionArgs(options, where, &entry.attach_args));
    *out = entry;
  }
  if (found_at == 0) return Status::NotFound(path + ": no line for " + name);
  return Status::OK();
}

}  // namespace dmcowd
