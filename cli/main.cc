// dmcow-img: qemu-img compatible inspection tool for raw, qcow and qcow2
// images, built on the dmcow engine.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "cli_common.h"

namespace dmcow::cli {
namespace {

struct Command {
  const char* name;
  int (*run)(int argc, char** argv);
  const char* summary;
};

const Command kCommands[] = {
    {"info", CmdInfo, "info [-f FMT] [--output human|json] [--backing-chain] [-U] FILE"},
    {"map", CmdMap, "map [-f FMT] [--output human|json] [--start-offset OFF] [--max-length LEN] [-U] FILE"},
    {"create", CmdCreate, "create [-f FMT] [-o OPTIONS] [-b BACKING_FILE [-F BACKING_FMT]] [-u] [-q] FILE [SIZE]"},
    {"commit", CmdCommit, "commit [-f FMT] [-t CACHE] [-b BASE] [-r RATE] [-d] [-p] [-q] FILE"},
    {"convert", CmdConvert,
     "convert [-c] [-p] [-q] [-n] [-U] [-f FMT] [-O FMT] [-o OPTIONS] [-B BACKING -F FMT] [-l SNAPSHOT] [-S SIZE] [-m "
     "N] [-t CACHE] [--target-is-zero] SRC... DST"},
    {"check", CmdCheck, "check [-f FMT] [-r leaks|all] [--output human|json] [-q] [-U] FILE"},
    {"compare", CmdCompare, "compare [-f FMT] [-F FMT] [-s] [-p] [-q] [-U] FILE1 FILE2"},
    {"checksum", CmdChecksum, "checksum [-f FMT] [-l SNAPSHOT] [-U] FILE"},
    {"resize", CmdResize, "resize [-f FMT] [--preallocation=MODE] [-q] [--shrink] FILE [+|-]SIZE"},
};

void PrintHelp() {
  std::printf("%s: disk image utility (qemu-img compatible read commands)\n\n", kProgName);
  std::printf("usage: %s [--help | --version] COMMAND [command options]\n\nCommands:\n", kProgName);
  for (const Command& c : kCommands) std::printf("  %s\n", c.summary);
  std::printf("\n'%s COMMAND --help' describes the options of COMMAND.\n", kProgName);
  std::printf("compare exits with 0 (identical), 1 (different), 2 (open error), 3 or 4 (I/O error).\n");
  std::printf(
      "check exits with 0 (consistent), 1 (check not completed), 2 (corrupted), 3 (leaks only),\n"
      "63 (format cannot be checked).\n");
}

int Run(int argc, char** argv) {
  if (argc < 2) return UsageError("Not enough arguments");
  const char* cmd = argv[1];
  if (std::strcmp(cmd, "-h") == 0 || std::strcmp(cmd, "--help") == 0 || std::strcmp(cmd, "help") == 0) {
    PrintHelp();
    return 0;
  }
  if (std::strcmp(cmd, "-V") == 0 || std::strcmp(cmd, "--version") == 0) {
    std::printf("%s (dmcow)\n", kProgName);
    return 0;
  }
  for (const Command& c : kCommands) {
    if (std::strcmp(cmd, c.name) == 0) return c.run(argc - 1, argv + 1);
  }
  return UsageError(std::string("Command not found: ") + cmd);
}

}  // namespace
}  // namespace dmcow::cli

int main(int argc, char** argv) {
  try {
    int rc = dmcow::cli::Run(argc, argv);
    std::fflush(stdout);
    return rc;
  } catch (const std::exception& e) {
    dmcow::cli::PrintError(e.what());
  } catch (...) {
    dmcow::cli::PrintError("unexpected error");
  }
  return 1;
}
