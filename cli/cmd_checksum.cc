// dmcow-img checksum: a digest of the guest-visible content, printed like
// sha256sum ("<hex>  FILE"). Equal for equal content in any format.
//   --algorithm blk-sha256 (default): the block digest of docs/checksum.md,
//                in time proportional to the data;
//   --algorithm sha256: SHA-256 of every byte, what sha256sum prints for the
//                raw conversion, in time proportional to the virtual size.
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli_common.h"
#include "locking_env.h"

namespace dmcow::cli {

namespace {

// checksum's command line, as ParseChecksum reads it.
struct ChecksumArgs {
  std::string format;                    // -f, --format
  std::string snapshot;                  // -l, --snapshot
  std::string algorithm = "blk-sha256";  // -a, --algorithm
  bool force_share = false;              // -U, --force-share
  bool image_opts = false;               // --image-opts
  std::vector<std::string> files;        // FILE
};

// Reads checksum's command line into *args (CLI11, ParseCommandLine): an exit
// code when the command ends there (--help, a bad command line).
std::optional<int> ParseChecksum(int argc, char** argv, ChecksumArgs* args) {
  CLI::App app{"Print a digest of the guest-visible content of FILE.", "dmcow-img checksum"};
  app.add_option("-a,--algorithm", args->algorithm,
                 "blk-sha256 (default; docs/checksum.md) or sha256 (of every byte, as sha256sum of the raw image)");
  app.add_option("-f,--format", args->format, "Image format (raw, qcow, qcow2); probed if omitted");
  app.add_option("-l,--snapshot", args->snapshot, "Internal snapshot id or name to checksum");
  AddImageArguments(app, &args->force_share, &args->image_opts, &args->files);
  return ParseCommandLine(app, argc, argv);
}

// Runs checksum as args says; returns the exit code.
int RunChecksum(const ChecksumArgs& args) {
  if (args.files.size() != 1) return UsageError("Expecting one image file name");
  if (args.algorithm != "blk-sha256" && args.algorithm != "sha256") {
    PrintError("Unknown checksum algorithm '" + args.algorithm + "': use blk-sha256 or sha256");
    return 1;
  }

  if (ImageOptsWithFormat(args.image_opts, args.format)) return 1;
  OpenOptions options;
  options.format = args.format;
  options.snapshot = args.snapshot;
  std::string path;
  if (!ImageArgument(args.files[0], args.image_opts, &path, &options)) return 1;
  LockingEnv env(Env::Default(), {path, LockingEnv::ReadMode(args.force_share)});
  options.env = &env;
  std::unique_ptr<Image> image;
  if (!OpenImageOrReport(args.files[0], path, options, &image).ok()) return 1;
  std::string hex;
  Status s =
      args.algorithm == "sha256" ? ComputeContentSha256(image.get(), &hex) : ComputeBlockDigest(image.get(), &hex);
  if (!s.ok()) {
    PrintError("Error while reading '" + args.files[0] + "': " + s.ToString());
    return 1;
  }
  std::printf("%s  %s\n", hex.c_str(), args.files[0].c_str());
  return 0;
}

}  // namespace

int CmdChecksum(int argc, char** argv) { return ParseAndRun(argc, argv, ParseChecksum, RunChecksum); }

}  // namespace dmcow::cli
