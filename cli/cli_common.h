// Helpers shared by the dmcow-img commands: qemu-img compatible formatting,
// error printing, option parsing and image opening.
#ifndef DMCOW_CLI_CLI_COMMON_H_
#define DMCOW_CLI_CLI_COMMON_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "dmcow/image.h"

namespace CLI {
class App;
}

namespace dmcow::cli {

inline constexpr const char kProgName[] = "dmcow-img";

// Each command takes its own argv, argv[0] being the command name.
int CmdInfo(int argc, char** argv);
int CmdMap(int argc, char** argv);
int CmdConvert(int argc, char** argv);
int CmdCompare(int argc, char** argv);
int CmdChecksum(int argc, char** argv);

// "dmcow-img: <msg>" on stderr.
void PrintError(const std::string& msg);

// PrintError(msg) plus the "Try 'dmcow-img --help'" hint; returns 1 (qemu's error_exit).
int UsageError(const std::string& msg);

// qemu's size_to_str(): "64 MiB", "1.46 GiB", "0 B".
std::string SizeToStr(uint64_t bytes);

// qemu's cvtnum(): "4096", "0x1000", "4k", "1.5M" (binary suffixes B k M G T P E).
bool ParseSize(const std::string& text, uint64_t* out);

// Parses argv with CLI11. Returns an exit code when the command must stop
// (--help: 0 after printing help; parse error: 1 after printing it), or
// nullopt when parsing succeeded.
std::optional<int> ParseCommandLine(CLI::App& app, int argc, char** argv);

// Checks the value of --output; prints qemu's message on a bad one.
bool ParseOutputFormat(const std::string& value, bool* json);

// Opens an image; on failure prints "Could not open 'PATH': <message>".
Status OpenImageOrReport(const std::string& path, const OpenOptions& options,
                         std::unique_ptr<Image>* image);

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
