// dmcow-img check: qemu-img check (qemu-img.c img_check) on the dmcow
// engine (dmcow/check.h): the same options, counts, JSON (the ImageCheck
// QAPI type), human summary and exit codes:
//   0 consistent (after a repair: now consistent)   1 check not completed
//   2 corruptions                                   3 leaked clusters only
//   63 the format cannot be checked (raw)
// What the check finds is printed to stderr as it goes, as qemu-img does.
// Beyond qemu-img: qcow (version 1) images are checked too.
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli_common.h"
#include "dmcow/check.h"
#include "locking_env.h"
#include "qemu_json.h"

namespace dmcow::cli {
namespace {

// ImageCheck members in schema order; optional ones only when non-zero.
Json CheckJson(const std::string& filename, const CheckResult& r) {
  Json j = Json::object();
  j["filename"] = filename;
  j["format"] = r.format;
  j["check-errors"] = r.check_errors;
  auto optional = [&](const char* key, uint64_t value) {
    if (value != 0) j[key] = value;
  };
  optional("image-end-offset", r.image_end_offset);
  optional("corruptions", r.corruptions);
  optional("leaks", r.leaks);
  optional("corruptions-fixed", r.corruptions_fixed);
  optional("leaks-fixed", r.leaks_fixed);
  optional("total-clusters", r.total_clusters);
  optional("allocated-clusters", r.allocated_clusters);
  optional("fragmented-clusters", r.fragmented_clusters);
  optional("compressed-clusters", r.compressed_clusters);
  return j;
}

// dump_human_image_check
void PrintHuman(const CheckResult& r) {
  if (!(r.corruptions || r.leaks || r.check_errors)) {
    std::printf("No errors were found on the image.\n");
  } else {
    if (r.corruptions) {
      std::printf(
          "\n%llu errors were found on the image.\n"
          "Data may be corrupted, or further writes to the image may corrupt it.\n",
          static_cast<unsigned long long>(r.corruptions));
    }
    if (r.leaks) {
      std::printf(
          "\n%llu leaked clusters were found on the image.\n"
          "This means waste of disk space, but no harm to data.\n",
          static_cast<unsigned long long>(r.leaks));
    }
    if (r.check_errors) {
      std::printf("\n%llu internal errors have occurred during the check.\n",
                  static_cast<unsigned long long>(r.check_errors));
    }
  }
  if (r.total_clusters != 0 && r.allocated_clusters != 0) {
    std::printf("%llu/%llu = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
                static_cast<unsigned long long>(r.allocated_clusters),
                static_cast<unsigned long long>(r.total_clusters),
                static_cast<double>(r.allocated_clusters) * 100.0 / static_cast<double>(r.total_clusters),
                static_cast<double>(r.fragmented_clusters) * 100.0 / static_cast<double>(r.allocated_clusters),
                static_cast<double>(r.compressed_clusters) * 100.0 / static_cast<double>(r.allocated_clusters));
  }
  if (r.image_end_offset) {
    std::printf("Image end offset: %llu\n", static_cast<unsigned long long>(r.image_end_offset));
  }
}

// check's command line, as ParseCheck reads it.
struct CheckArgs {
  std::string format;              // -f, --format
  std::string repair;              // -r, --repair
  std::string output;              // --output
  std::string cache;               // -T
  bool quiet = false;              // -q
  bool force_share = false;        // -U, --force-share
  bool image_opts = false;         // --image-opts
  std::vector<std::string> files;  // FILE
};

// Reads check's command line into *args (CLI11, ParseCommandLine): an exit
// code when the command ends there (--help, a bad command line).
std::optional<int> ParseCheck(int argc, char** argv, CheckArgs* args) {
  CLI::App app{"Check FILE for consistency, and optionally repair it.", "dmcow-img check"};
  app.add_option("-f,--format", args->format, "Image format (qcow2, qcow, raw); probed if omitted");
  app.add_option("-r,--repair", args->repair, "Repair: 'leaks' (leaked clusters) or 'all' (everything it can)");
  app.add_option("--output", args->output, "Output format: human (default) or json");
  app.add_option("-T", args->cache, "Cache mode (accepted for compatibility, ignored)");
  app.add_flag("-q", args->quiet, "Quiet: print nothing on stdout");
  AddImageArguments(app, &args->force_share, &args->image_opts, &args->files);
  return ParseCommandLine(app, argc, argv);
}

// Runs check as args says; returns the exit code.
int RunCheck(const CheckArgs& args) {
  CheckOptions options;
  options.format = args.format;
  if (!args.repair.empty()) {
    if (args.repair == "leaks") {
      options.repair = RepairMode::kLeaks;
    } else if (args.repair == "all") {
      options.repair = RepairMode::kAll;
    } else {
      return UsageError("Unknown option value for -r (expecting 'leaks' or 'all'): " + args.repair);
    }
  }
  if (args.files.size() != 1) return UsageError("Expecting one image file name");
  if (ImageOptsWithFormat(args.image_opts, args.format)) return 1;
  const std::string& shown = args.files[0];  // as given: a name or an --image-opts list
  std::string filename;
  OpenOptions parsed;
  if (!ImageArgument(shown, args.image_opts, &filename, &parsed)) return 1;
  if (args.image_opts) options.format = parsed.format;  // the check reads no backing file
  bool json = false;
  if (!args.output.empty() && !ParseOutputFormat(args.output, &json)) return 1;

  // Findings go to stderr as they are made; the result keeps none.
  options.max_findings = 0;
  options.on_finding = [](const CheckFinding& f) {
    std::fflush(stdout);
    std::fprintf(stderr, "%s\n", f.message.c_str());
  };
  // Locked as qemu-img check locks it (locking_env.h): a repair writes and
  // refuses an image another process has open; a plain check reads, and
  // refuses one another process writes, unless -U. As in qemu-img, -U is
  // for reading only.
  if (args.force_share && options.repair != RepairMode::kNone) {
    PrintError("Could not open '" + shown + "': force-share=on can only be used with read-only images");
    return 1;
  }
  LockingEnv env(Env::Default(), {filename, LockingEnv::ReadMode(args.force_share)});
  options.env = &env;
  CheckResult result;
  Status s = CheckImage(filename, options, &result);
  if (!s.ok() && !result.opened) {
    PrintError("Could not open '" + shown + "': " + s.ToString());
    return 1;
  }
  if (s.IsNotSupported()) {
    PrintError(s.message());
    return 63;
  }
  if (!s.ok()) {
    PrintError("Check failed: " + s.ToString());
    return 1;
  }
  if (!args.quiet) {
    if (result.corruptions_fixed || result.leaks_fixed) {
      if (!json) {
        std::printf(
            "The following inconsistencies were found and repaired:\n\n"
            "    %llu leaked clusters\n    %llu corruptions\n\n"
            "Double checking the fixed image now...\n",
            static_cast<unsigned long long>(result.leaks_fixed),
            static_cast<unsigned long long>(result.corruptions_fixed));
      }
    }
    if (json) {
      std::printf("%s\n", QemuJsonPretty(CheckJson(filename, result)).c_str());
    } else {
      PrintHuman(result);
    }
  }
  if (result.check_errors) {
    PrintError("Check failed");
    return 1;
  }
  if (result.corruptions) return 2;
  if (result.leaks) return 3;
  return 0;
}

}  // namespace

int CmdCheck(int argc, char** argv) { return ParseAndRun(argc, argv, ParseCheck, RunCheck); }

}  // namespace dmcow::cli
