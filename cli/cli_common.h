// Helpers shared by the dmcow-img commands: qemu-img compatible formatting,
// error printing, option parsing and image opening.
#ifndef DMCOW_CLI_CLI_COMMON_H_
#define DMCOW_CLI_CLI_COMMON_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dmcow/image.h"

namespace CLI {
class App;
}

struct option;  // <getopt.h>

namespace dmcow::cli {

inline constexpr const char kProgName[] = "dmcow-img";

// -U / --force-share, on the commands where qemu-img accepts it (those that
// only read the image); locks: locking_env.h.
inline constexpr const char kForceShareHelp[] =
    "Open the image in shared mode: read it even while another process (a QEMU) writes it";

// The commands (main.cc dispatches to them). Each takes its own argv,
// argv[0] being the command name, and returns the exit status.
int CmdInfo(int argc, char** argv);      // info: what the image is (cmd_info.cc)
int CmdMap(int argc, char** argv);       // map: where its data lies (cmd_map.cc)
int CmdCreate(int argc, char** argv);    // create: makes an image (cmd_create.cc)
int CmdCommit(int argc, char** argv);    // commit: writes an overlay into its backing file (cmd_commit.cc)
int CmdConvert(int argc, char** argv);   // convert: copies images into a new one (cmd_convert.cc)
int CmdCheck(int argc, char** argv);     // check: checks, and repairs, an image (cmd_check.cc)
int CmdCompare(int argc, char** argv);   // compare: are two images' contents equal (cmd_compare.cc)
int CmdChecksum(int argc, char** argv);  // checksum: SHA-256 of the guest-visible content (cmd_checksum.cc)
int CmdResize(int argc, char** argv);    // resize: changes the virtual size (cmd_resize.cc)
int CmdMeasure(int argc, char** argv);   // measure: the file size an image needs (cmd_measure.cc)
int CmdDd(int argc, char** argv);        // dd: copies part of an image into a new one (cmd_dd.cc)
int CmdRebase(int argc, char** argv);    // rebase: gives an image another backing file (cmd_rebase.cc)
int CmdBench(int argc, char** argv);     // bench: times reads or writes (cmd_bench.cc)
int CmdSnapshot(int argc, char** argv);  // snapshot: internal snapshots (cmd_snapshot.cc)
int CmdAmend(int argc, char** argv);     // amend: changes a qcow2 image's options (cmd_amend.cc)
int CmdBitmap(int argc, char** argv);    // bitmap: changes persistent dirty bitmaps (cmd_bitmap.cc)
int CmdManifest(int argc, char** argv);  // manifest: what CI pins about images, and the check (cmd_manifest.cc)

// Every command has one shape (issue 16): an options struct Args that a
// parse step fills from the command line, returning an exit code when the
// command ends there (help, a bad command line: its message printed), and
// a run step that does the work and returns the exit status. Each Cmd*
// function is this, with its command's own two steps.
template <typename Args>
int ParseAndRun(int argc, char** argv, std::optional<int> (*parse)(int argc, char** argv, Args* args),
                int (*run)(const Args& args)) {
  Args args;
  if (std::optional<int> rc = parse(argc, argv, &args)) return *rc;
  return run(args);
}

// "dmcow-img: <msg>" on stderr.
void PrintError(const std::string& msg);

// PrintError(msg) plus the "Try 'dmcow-img --help'" hint; returns 1 (qemu's error_exit).
int UsageError(const std::string& msg);

// qemu-img's cvtnum_full(name, text, min, max): a size (ParseSize) from
// min to max, else false with qemu-img's two lines on suffixes, or its
// "Must be between" line when `text` is a size out of range.
bool ParseQemuNumber(const std::string& name, const std::string& text, uint64_t min, uint64_t max, uint64_t* out);

// qemu's size_to_str(): "64 MiB", "1.46 GiB", "0 B".
std::string SizeToStr(uint64_t bytes);

// A cache mode qemu's bdrv_parse_cache_mode takes (-t, -T): none/off,
// directsync, writeback, unsafe, writethrough. dmcow-img goes through the
// page cache whatever the mode, and flushes where qemu-img would.
bool ValidCacheMode(const std::string& mode);

// qemu's cvtnum(): "4096", "0x1000", "4k", "1.5M" (binary suffixes B k M G T P E).
bool ParseSize(const std::string& text, uint64_t* out);

// Parses argv with CLI11. Returns an exit code when the command must stop
// (--help: 0 after printing help; parse error: 1 after printing it), or
// nullopt when parsing succeeded.
std::optional<int> ParseCommandLine(CLI::App& app, int argc, char** argv);

// Reads argv as qemu-img's own getopt_long loop does, for the commands
// whose command line CLI11 cannot read as qemu-img does (create and
// convert): GNU getopt_long(argc, argv, optstring, long_options), with
// optstring beginning with ':' as qemu-img's do. Options and operands in
// any order, "--" ending the options, values glued or apart, flags glued
// together, long options by an unambiguous prefix, the first error in
// command-line order reported, naming argv[optind - 1] as qemu-img does:
// "unrecognized option '...'" or "missing argument for option '...'"
// (UsageError's words, exit 1). Each option goes to on_option(c, optarg)
// in command-line order (optarg null for a flag); an exit code it returns
// stops the scan (-h, a bad value). Otherwise *operands gets the
// non-option arguments, in order, and nullopt is returned. A long option
// whose code is kObjectOption (object_option.h) is --object, created where
// it is met and not passed on.
std::optional<int> ParseGetopt(int argc, char** argv, const char* optstring, const struct ::option* long_options,
                               const std::function<std::optional<int>(int c, const char* optarg)>& on_option,
                               std::vector<std::string>* operands);

// The last arguments of info, map, check and checksum, in this order:
// -U/--force-share, --image-opts and the FILE operands.
void AddImageArguments(CLI::App& app, bool* force_share, bool* image_opts, std::vector<std::string>* files);

// "Snapshot list:" and a line per snapshot, as qemu-img info and snapshot -l
// print them (block/qapi.c bdrv_snapshot_dump); nothing when there are none.
void PrintSnapshotList(const std::vector<SnapshotInfo>& snapshots);

// Checks the value of --output; prints qemu's message on a bad one.
bool ParseOutputFormat(const std::string& value, bool* json);

// Opens an image; on failure prints "Could not open 'PATH': <message>".
Status OpenImageOrReport(const std::string& path, const OpenOptions& options, std::unique_ptr<Image>* image);

// Opens an image named on the command line as `shown` (a file name, or an
// --image-opts list) and stored at `path`; on failure prints
// "Could not open 'SHOWN': <message>".
Status OpenImageOrReport(const std::string& shown, const std::string& path, const OpenOptions& options,
                         std::unique_ptr<Image>* image);

// An engine message without the "PATH: " it starts with when it is about
// `path`: for the commands whose messages name the file themselves, or not
// at all, as qemu-img's do.
std::string MessageWithoutPath(const std::string& path, const Status& s);

// `message` followed, when it says a persistent bitmap is in use
// ("is inconsistent and cannot be used"), by the hint qemu-img prints on
// the next line (a Status holds one line).
std::string WithInUseBitmapHint(std::string message);

// Why OpenImage(path) failed, in qemu-img's words (what follows
// "Could not open 'FILE': ").
std::string OpenFailure(const std::string& path, const Status& s);

// An image argument: with image_opts, `arg` is an --image-opts list
// (image_options.h ParseImageOpts) giving *path, the format and whether to
// open the backing file; else *path = arg. False, with qemu-img's message
// printed, for a bad list.
bool ImageArgument(const std::string& arg, bool image_opts, std::string* path, OpenOptions* options);

// -l of convert and measure: "snapshot.id=ID[,snapshot.name=NAME]" or a
// bare id or name (an id first, as qemu tries). Finds the snapshot in
// `info` and sets *id, or prints qemu-img's message and returns false.
bool ResolveSnapshot(const std::string& arg, const ImageInfo& info, std::string* id);

// QEMU's warning when a writable open probed the format and found raw
// (three lines on stderr), if `image` is raw.
void WarnIfProbedRaw(const Image& image, const std::string& path);

// "--image-opts and --format are mutually exclusive", as qemu-img; true if so.
bool ImageOptsWithFormat(bool image_opts, const std::string& format);

// qemu-img's progress line "    (12.34/100%)\r" (util/qemu-progress.c).
class Progress {
 public:
  Progress(bool enabled, float min_skip) : enabled_(enabled), min_skip_(min_skip) {}
  // Advances by `delta` percent (qemu_progress_print(delta, 100)).
  void Advance(float delta);
  // Sets the absolute percentage (qemu_progress_print(value, 0)).
  void Set(float value);
  // Ends the line (qemu_progress_end).
  void End();

 private:
  void Update(float current);

  bool enabled_;
  float min_skip_;
  float current_ = 0;
  float last_print_ = 0;
};

// True if `len` bytes at `p` are all zero.
bool IsZero(const void* p, size_t len);

}  // namespace dmcow::cli

#endif  // DMCOW_CLI_CLI_COMMON_H_
