// dmcow-img map: qemu-img map (qemu-img.c img_map, get_block_status,
// entry_mergeable and dump_map_entry).
#include <cinttypes>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli_common.h"
#include "locking_env.h"

namespace dmcow::cli {
namespace {

bool Mergeable(const MapExtent& curr, const MapExtent& next) {
  if (curr.length == 0) return false;
  if (curr.zero != next.zero || curr.data != next.data || curr.depth != next.depth || curr.present != next.present ||
      curr.has_offset != next.has_offset) {
    return false;
  }
  // qemu names the file only when the offset is valid.
  if (curr.has_offset && curr.filename != next.filename) return false;
  if (curr.has_offset && curr.offset + curr.length != next.offset) return false;
  return true;
}

// Prints `e`; `next` (may be null) is adjusted the way qemu's human mode does.
// Returns false on the "compressed clusters" error.
bool DumpEntry(bool json, const MapExtent& e, MapExtent* next) {
  if (!json) {
    if (e.data && !e.has_offset) {
      PrintError("File contains external, encrypted or compressed clusters.");
      return false;
    }
    if (e.data && !e.zero) {
      char start[32], length[32], offset[32];
      std::snprintf(start, sizeof(start), "%#" PRIx64, e.start);
      std::snprintf(length, sizeof(length), "%#" PRIx64, e.length);
      std::snprintf(offset, sizeof(offset), "%#" PRIx64, e.has_offset ? e.offset : 0);
      std::printf("%-16s%-16s%-16s%s\n", start, length, offset, e.has_offset ? e.filename.c_str() : "");
    }
    // Human output does not distinguish unallocated, zero and zero+data:
    // merging them lets more entries coalesce.
    if (next != nullptr && (!next->data || next->zero)) {
      next->data = false;
      next->zero = true;
    }
    return true;
  }
  std::printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
              ", \"depth\": %d, \"present\": %s,"
              " \"zero\": %s, \"data\": %s",
              e.start, e.length, e.depth, e.present ? "true" : "false", e.zero ? "true" : "false",
              e.data ? "true" : "false");
  if (e.has_offset) std::printf(", \"offset\": %" PRIu64, e.offset);
  std::putchar('}');
  if (next != nullptr) std::puts(",");
  return true;
}

// map's command line, as ParseMap reads it.
struct MapArgs {
  std::string format;              // -f, --format
  std::string output = "human";    // --output
  std::string start_text;          // -s, --start-offset
  std::string length_text;         // -l, --max-length
  bool force_share = false;        // -U, --force-share
  bool image_opts = false;         // --image-opts
  std::vector<std::string> files;  // FILE
};

// Reads map's command line into *args (CLI11, ParseCommandLine): an exit
// code when the command ends there (--help, a bad command line).
std::optional<int> ParseMap(int argc, char** argv, MapArgs* args) {
  CLI::App app{"Dump the metadata of image FILE and its backing file chain.", "dmcow-img map"};
  app.add_option("-f,--format", args->format, "Image format (raw, qcow, qcow2); probed if omitted");
  app.add_option("--output", args->output, "human or json");
  app.add_option("-s,--start-offset", args->start_text, "First guest offset to map");
  app.add_option("-l,--max-length", args->length_text, "Map at most this many bytes");
  AddImageArguments(app, &args->force_share, &args->image_opts, &args->files);
  return ParseCommandLine(app, argc, argv);
}

// Runs map as args says; returns the exit code.
int RunMap(const MapArgs& args) {
  bool json = false;
  if (!ParseOutputFormat(args.output, &json)) return 1;
  auto size_error = [](const char* what) {
    PrintError(std::string("Invalid ") + what + " specified. You may use k, M, G, T, P or E suffixes for");
    PrintError("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
    return 1;
  };
  uint64_t start_offset = 0;
  bool has_max_length = false;
  uint64_t max_length = 0;
  if (!args.start_text.empty() && !ParseSize(args.start_text, &start_offset)) return size_error("start offset");
  if (!args.length_text.empty()) {
    if (!ParseSize(args.length_text, &max_length)) return size_error("max length");
    has_max_length = true;
  }
  if (args.files.size() != 1) return UsageError("Expecting one image file name");

  if (ImageOptsWithFormat(args.image_opts, args.format)) return 1;
  OpenOptions options;
  options.format = args.format;
  std::string path;
  if (!ImageArgument(args.files[0], args.image_opts, &path, &options)) return 1;
  LockingEnv env(Env::Default(), {path, LockingEnv::ReadMode(args.force_share)});
  options.env = &env;
  std::unique_ptr<Image> image;
  if (!OpenImageOrReport(args.files[0], path, options, &image).ok()) return 1;

  if (json) {
    std::putchar('[');
  } else {
    std::printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
  }
  uint64_t length = image->virtual_size();
  if (has_max_length && start_offset + max_length < length) length = start_offset + max_length;

  MapExtent curr;
  curr.start = start_offset;
  while (curr.start + curr.length < length) {
    uint64_t offset = curr.start + curr.length;
    MapExtent next;
    Status s = GetMapExtent(image.get(), offset, length - offset, &next);
    if (s.ok() && (next.length == 0 || next.start != offset)) {
      s = Status::Corrupt("GetMapExtent returned an empty or misplaced extent at offset " + std::to_string(offset));
    }
    if (!s.ok()) {
      PrintError("Could not read file metadata: " + s.ToString());
      return 1;
    }
    if (Mergeable(curr, next)) {
      curr.length += next.length;
      continue;
    }
    if (curr.length > 0 && !DumpEntry(json, curr, &next)) return 1;
    curr = next;
  }
  if (!DumpEntry(json, curr, nullptr)) return 1;
  if (json) std::puts("]");
  return 0;
}

}  // namespace

int CmdMap(int argc, char** argv) { return ParseAndRun(argc, argv, ParseMap, RunMap); }

}  // namespace dmcow::cli
