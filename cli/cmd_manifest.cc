// dmcow-img manifest: what a CI check pins about golden images, and the
// check itself (the workflow of the project's own fixtures/).
//
//   dmcow-img manifest [--output human|json] [-U] FILE...
//       for each image: format, virtual size, cluster size, compression
//       type, backing chain (each layer's stored name and format), what
//       `check` finds, and the blk-sha256 checksum of the guest-visible
//       content (docs/checksum.md), the backing chain included;
//   dmcow-img manifest --verify MANIFEST [-U]
//       the images a JSON manifest names (relative names from the current
//       directory, as they were given) against it: one line per
//       difference, exit 0 when none, 1 otherwise (a manifest that cannot
//       be read included). Members an entry leaves out are not checked
//       (`manifest` writes them all, an empty backing chain included).
//
// Encrypted images are refused (manifest takes no keys).
//
// A manifest is hostile input like any image: its size is bounded, every
// entry must be an object with known members of the right types, and an
// image it names is opened as `info` would open it (read-only, QEMU's
// shared lock unless -U).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli_common.h"
#include "dmcow/check.h"
#include "locking_env.h"
#include "qemu_json.h"

namespace dmcow::cli {

namespace {

constexpr uint64_t kMaxManifestBytes = 16 << 20;

struct ManifestArgs {
  std::string output = "human";  // --output
  std::string verify;            // --verify MANIFEST
  bool force_share = false;      // -U, --force-share
  std::vector<std::string> files;
};

std::optional<int> ParseManifest(int argc, char** argv, ManifestArgs* args) {
  CLI::App app{"Print what a CI check pins about each FILE, or check images against a manifest.", "dmcow-img manifest"};
  app.add_option("--output", args->output, "human (default) or json (the form --verify reads)");
  app.add_option("--verify", args->verify, "Check the images a JSON manifest names against it");
  app.add_flag("-U,--force-share", args->force_share, "Open the images with QEMU's shared lock (force-share)");
  app.add_option("FILE", args->files, "Image files");
  return ParseCommandLine(app, argc, argv);
}

// What is pinned about `file`, as a manifest entry; an error Status when it
// cannot be described (the message names the file).
Status Describe(const std::string& file, bool force_share, Json* out) {
  LockingEnv env(Env::Default(), {file, LockingEnv::ReadMode(force_share)});
  OpenOptions options;
  options.env = &env;
  std::unique_ptr<Image> image;
  Status s = OpenImage(file, options, &image);
  if (!s.ok()) {
    std::string message = OpenFailure(file, s);
    if (message.find(file) == std::string::npos) message = file + ": " + message;  // key errors name no file
    return Status::InvalidArgument(message);
  }
  const ImageInfo& info = image->info();
  Json j = Json::object();
  j["filename"] = file;
  j["format"] = info.format;
  j["virtual-size"] = info.virtual_size;
  if (info.cluster_size != 0) j["cluster-size"] = info.cluster_size;
  if (!info.compression_type.empty()) j["compression-type"] = info.compression_type;
  Json chain = Json::array();
  for (const Image* layer = image.get(); layer != nullptr && !layer->info().backing_filename.empty();
       layer = layer->backing()) {
    const Image* below = layer->backing();
    chain.push_back(Json{{"filename", layer->info().backing_filename},
                         {"format", below != nullptr ? below->info().format : std::string()}});
  }
  j["backing-chain"] = chain;
  std::string digest;
  s = ComputeBlockDigest(image.get(), &digest);
  if (!s.ok()) return Status::IOError(file + ": reading its content: " + s.ToString());
  CheckOptions check;
  check.format = info.format;  // before the reset: info is the image's
  image.reset();               // the check opens the file itself
  check.env = &env;
  check.max_findings = 0;
  CheckResult result;
  s = CheckImage(file, check, &result);
  if (s.code() == Status::Code::kNotSupported) {
    j["check"] = "not checked";  // raw: nothing to check
  } else if (!s.ok() || result.check_errors != 0) {
    j["check"] = "check failed";
  } else if (result.corruptions != 0) {
    j["check"] = "corrupt";
  } else {
    j["check"] = result.leaks != 0 ? "leaks" : "clean";
  }
  j["blk-sha256"] = digest;
  *out = std::move(j);
  return Status::OK();
}

std::string HumanLine(const Json& j) {
  std::ostringstream o;
  o << j["filename"].get<std::string>() << ": " << j["format"].get<std::string>() << ", "
    << j["virtual-size"].get<uint64_t>() << " bytes";
  if (j.contains("cluster-size")) o << ", clusters of " << j["cluster-size"].get<uint64_t>();
  if (j.contains("compression-type")) o << ", " << j["compression-type"].get<std::string>();
  for (const Json& b : j["backing-chain"]) {
    o << ", over " << b["filename"].get<std::string>() << " (" << b["format"].get<std::string>() << ")";
  }
  o << ", check " << j["check"].get<std::string>() << ", blk-sha256 " << j["blk-sha256"].get<std::string>();
  return o.str();
}

const char* const kMembers[] = {"filename",         "format",        "virtual-size", "cluster-size",
                                "compression-type", "backing-chain", "check",        "blk-sha256"};

bool IsMember(const std::string& key) {
  for (const char* m : kMembers) {
    if (key == m) return true;
  }
  return false;
}

// Whether `value` has the JSON type manifest member `key` must have.
bool KnownMember(const std::string& key, const Json& value) {
  if (key == "filename" || key == "format" || key == "compression-type" || key == "check" || key == "blk-sha256")
    return value.is_string();
  if (key == "virtual-size" || key == "cluster-size") return value.is_number_unsigned();
  if (key == "backing-chain") {
    if (!value.is_array()) return false;
    for (const Json& b : value) {
      if (!b.is_object() || b.size() != 2 || !b.contains("filename") || !b.contains("format") ||
          !b["filename"].is_string() || !b["format"].is_string()) {
        return false;
      }
    }
    return true;
  }
  return false;
}

// Reads and checks the manifest's shape; prints what is wrong and returns
// false.
bool ReadManifest(const std::string& path, Json* entries) {
  // O_NONBLOCK and a regular file only: a FIFO named by mistake must not
  // hang a CI job.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  struct stat st;
  if (fd < 0 || ::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    PrintError("Could not open '" + path + "': " + (fd < 0 ? std::strerror(errno) : "not a regular file"));
    if (fd >= 0) ::close(fd);
    return false;
  }
  if (static_cast<uint64_t>(st.st_size) > kMaxManifestBytes) {
    ::close(fd);
    PrintError(path + ": larger than " + std::to_string(kMaxManifestBytes) + " bytes: not a manifest");
    return false;
  }
  std::string text(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < text.size()) {
    const ssize_t n = ::read(fd, text.data() + got, text.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  text.resize(got);
  *entries = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (entries->is_discarded()) {
    PrintError(path + ": not JSON (write it with dmcow-img manifest --output json)");
    return false;
  }
  if (!entries->is_array()) {
    PrintError(path + ": not a manifest: expected a JSON array of images");
    return false;
  }
  for (size_t i = 0; i < entries->size(); i++) {
    const Json& e = (*entries)[i];
    const std::string where = path + ": entry " + std::to_string(i + 1);
    if (!e.is_object() || !e.contains("filename") || !e["filename"].is_string() ||
        e["filename"].get<std::string>().empty()) {
      PrintError(where + ": expected an object with a \"filename\"");
      return false;
    }
    for (const auto& [key, value] : e.items()) {
      if (!KnownMember(key, value)) {
        PrintError(where + " (" + e["filename"].get<std::string>() + "): member \"" + key + "\" " +
                   (IsMember(key) ? "has the wrong type" : "is not a manifest field"));
        return false;
      }
    }
  }
  return true;
}

int Verify(const ManifestArgs& args) {
  if (!args.files.empty()) return UsageError("--verify takes no FILE: the manifest names the images");
  Json entries;
  if (!ReadManifest(args.verify, &entries)) return 1;
  int differences = 0;
  for (const Json& want : entries) {
    const std::string file = want["filename"].get<std::string>();
    Json got;
    if (Status s = Describe(file, args.force_share, &got); !s.ok()) {
      std::printf("%s: %s\n", file.c_str(), s.message().c_str());
      differences++;
      continue;
    }
    for (const auto& [key, value] : want.items()) {
      if (key == "filename") continue;
      const Json found = got.contains(key) ? got[key] : Json();
      // Compared unordered: a hand-edited manifest may order members otherwise.
      if (nlohmann::json::parse(found.dump()) != nlohmann::json::parse(value.dump())) {
        std::printf("%s: %s: expected %s, found %s\n", file.c_str(), key.c_str(), value.dump().c_str(),
                    found.is_null() ? "none" : found.dump().c_str());
        differences++;
      }
    }
  }
  if (differences == 0) std::printf("%zu image(s) as the manifest says\n", entries.size());
  return differences == 0 ? 0 : 1;
}

int RunManifest(const ManifestArgs& args) {
  bool json = false;
  if (!ParseOutputFormat(args.output, &json)) return 1;
  if (!args.verify.empty()) return Verify(args);
  if (args.files.empty()) return UsageError("Expecting image file names (or --verify MANIFEST)");
  Json all = Json::array();
  for (const std::string& file : args.files) {
    Json entry;
    if (Status s = Describe(file, args.force_share, &entry); !s.ok()) {
      PrintError(s.message());
      return 1;
    }
    all.push_back(std::move(entry));
  }
  if (json) {
    std::printf("%s\n", all.dump(4).c_str());
  } else {
    for (const Json& entry : all) std::printf("%s\n", HumanLine(entry).c_str());
  }
  return 0;
}

}  // namespace

int CmdManifest(int argc, char** argv) { return ParseAndRun(argc, argv, ParseManifest, RunManifest); }

}  // namespace dmcow::cli
