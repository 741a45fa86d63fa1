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

// The qemu-img release dmcow-img is measured against (tests run the real one).
constexpr char kQemuImgVersion[] = "7.2.0";

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
    {"measure", CmdMeasure,
     "measure [--output human|json] [-O FMT] [-o OPTIONS] [-f FMT] [-l SNAPSHOT] [-U] (--size SIZE | FILE)"},
    {"dd", CmdDd, "dd [-U] [-f FMT] [-O FMT] [bs=BYTES] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT"},
    {"bench", CmdBench,
     "bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=N] [-o OFFSET] [--pattern=BYTE] [-s SIZE] [-S STEP] "
     "[-t CACHE] [-w] [-U] FILE"},
    {"rebase", CmdRebase, "rebase [-f FMT] [-t CACHE] [-T SRC_CACHE] [-p] [-q] [-U] [-u] -b BACKING [-F FMT] FILE"},
    {"amend", CmdAmend, "amend [-f FMT] [-t CACHE] [-p] [-q] [--force] -o OPTIONS FILE"},
    {"bitmap", CmdBitmap,
     "bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b SOURCE_FILE [-F "
     "SOURCE_FMT]] [-g GRANULARITY] [--image-opts | -f FMT] FILE BITMAP"},
    {"snapshot", CmdSnapshot, "snapshot [-q] [-U] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILE"},
    {"manifest", CmdManifest, "manifest [--output human|json] [-U] FILE... | manifest --verify MANIFEST [-U]"},
};

void PrintHelp() {
  std::printf("%s: disk image utility (qemu-img compatible)\n\n", kProgName);
  std::printf("usage: %s [--help | --version] COMMAND [command options]\n\nCommands:\n", kProgName);
  for (const Command& c : kCommands) std::printf("  %s\n", c.summary);
  std::printf("\n'%s COMMAND --help' describes the options of COMMAND.\n", kProgName);
  std::printf("compare exits with 0 (identical), 1 (different), 2 (open error), 3 or 4 (I/O error).\n");
  std::printf(
      "check exits with 0 (consistent), 1 (check not completed), 2 (corrupted), 3 (leaks only),\n"
      "63 (format cannot be checked).\n");
}

int Run(int argc, char** argv) {
  // Global options before the command, as qemu-img's: -T/--trace only
  // configures QEMU's tracing, which dmcow-img has none of, so it is
  // accepted (with its value) and ignored.
  int first = 1;
  while (first < argc && argv[first][0] == '-' && argv[first][1] != '\0') {
    const std::string opt = argv[first];
    if (opt == "-h" || opt == "--help" || opt == "-V" || opt == "--version") break;
    if (opt == "-T" || opt == "--trace") {
      if (first + 1 >= argc) return UsageError("missing argument for option '" + opt + "'");
      first += 2;
    } else if ((opt.rfind("-T", 0) == 0 && opt.size() > 2) || opt.rfind("--trace=", 0) == 0) {
      first += 1;
    } else {
      return UsageError("unrecognized option '" + opt + "'");
    }
  }
  argc -= first - 1;
  argv += first - 1;
  if (argc < 2) return UsageError("Not enough arguments");
  const char* cmd = argv[1];
  if (std::strcmp(cmd, "-h") == 0 || std::strcmp(cmd, "--help") == 0 || std::strcmp(cmd, "help") == 0) {
    PrintHelp();
    return 0;
  }
  if (std::strcmp(cmd, "-V") == 0 || std::strcmp(cmd, "--version") == 0) {
    // Shaped as qemu-img's, so a script reading the third word gets the
    // qemu-img release whose commands, output and exit codes we follow.
    std::printf("%s version %s (dmcow, qemu-img %s compatible)\n", kProgName, kQemuImgVersion, kQemuImgVersion);
    std::printf("dmcow: a qemu-img compatible tool on the dmcow engine\n");
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
