// dmcow-img checksum: SHA-256 of the guest-visible content, printed like
// sha256sum ("<hex>  FILE"). Equal for equal content in any format.
#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli_common.h"

namespace dmcow::cli {

int CmdChecksum(int argc, char** argv) {
  CLI::App app{"Print the SHA-256 of the guest-visible content of FILE.", "dmcow-img checksum"};
  std::string format, snapshot;
  std::vector<std::string> files;
  bool force_share = false;
  app.add_option("-f,--format", format, "Image format (raw, qcow, qcow2); probed if omitted");
  app.add_option("-l,--snapshot", snapshot, "Internal snapshot id or name to checksum");
  app.add_flag("-U,--force-share", force_share, "Open the image in shared mode (always the case)");
  app.add_option("FILE", files, "Image file");
  if (auto rc = ParseCommandLine(app, argc, argv)) return *rc;
  if (files.size() != 1) return UsageError("Expecting one image file name");

  OpenOptions options;
  options.format = format;
  options.snapshot = snapshot;
  std::unique_ptr<Image> image;
  if (!OpenImageOrReport(files[0], options, &image).ok()) return 1;
  std::string hex;
  Status s = ComputeContentSha256(image.get(), &hex);
  if (!s.ok()) {
    PrintError("Error while reading '" + files[0] + "': " + s.ToString());
    return 1;
  }
  std::printf("%s  %s\n", hex.c_str(), files[0].c_str());
  return 0;
}

}  // namespace dmcow::cli
