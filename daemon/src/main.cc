// dmcowd: serves one dm-cow device (see daemon/DESIGN.md and `dmcowd --help`).
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "daemon.h"
#include "log.h"
#include "size_arg.h"

namespace {

using dmcowd::DaemonOptions;
using dmcowd::ParseSizeArg;
using dmcowd::PluginOptions;

void PrintHelp() {
  std::string plugins;
  for (const auto& p : dmcowd::PluginNames()) plugins += (plugins.empty() ? "" : ", ") + p;
  std::printf(
      "usage: dmcowd --name NAME [--plugin PLUGIN] [options] ARGS...\n"
      "\n"
      "Creates /dev/mapper/NAME, a dm-cow device, and serves it: the kernel target asks\n"
      "where chunks live, the plugin decides and persists, dmcowd answers. It runs in the\n"
      "foreground until SIGTERM or SIGINT, then flushes, removes the device and exits.\n"
      "\n"
      "Plugins (%s):\n"
      "  cow   dmcowd --plugin cow --name NAME [--chunk-size SIZE] [--format] BASE COW\n"
      "        BASE (file or block device) is read-only and never written; a chunk's first\n"
      "        write copies it into COW (file or block device), where its mapping persists.\n"
      "        A missing or empty COW file is created sparse and formatted; an existing COW\n"
      "        must carry a dmcow header (attach again later: every write is still there)\n"
      "        unless --format is given. Files are set up on loop devices, released on exit.\n"
      "        Settings: --opt alloc_step=N (chunks reserved per header update, default 4096).\n"
      "  qcow2 dmcowd --plugin qcow2 --name NAME [--opt KEY=VALUE...] IMAGE\n"
      "        A qcow2 image (v2, v3) as a block device: writes land in the image with the\n"
      "        metadata QEMU writes (refcounts, L2, COPIED), durable at each flush; chunks\n"
      "        are clusters (4K for smaller clusters). Settings: read_only=1; backing=DEV\n"
      "        (the backing chain's content as a device; a raw backing file at the bottom\n"
      "        of the chain is found through the image); image_fd=N and chainK=FD:NAME\n"
      "        (the image and the K-th file below it, opened by the caller: IMAGE is\n"
      "        then only a name, and no file of the chain is opened by name; without\n"
      "        them IMAGE and its chain are opened once each, backing files only if\n"
      "        regular files); no_backing=1 (the image alone, unallocated clusters read\n"
      "        zeros); name=PREFIX (helper devices PREFIX-store, PREFIX-base);\n"
      "        scratch_dir=DIR (unlinked file for decompressed chunks; default the\n"
      "        image's directory). Use dmcow-qcow attach rather than this directly.\n"
      "\n"
      "Options:\n"
      "  --name NAME            device name (/dev/mapper/NAME); required\n"
      "  --plugin PLUGIN        allocation plugin (default cow)\n"
      "  --ident IDENT          channel ident (/dev/dm-cow/IDENT); default NAME\n"
      "  --uuid UUID            the device's device-mapper UUID (udev's\n"
      "                         /dev/disk/by-id/dm-uuid-UUID); default none\n"
      "  --udev-private         udev makes no /dev/disk links for the device and runs\n"
      "                         no scanner on it (a backing level: its file systems'\n"
      "                         by-uuid links must not point at it)\n"
      "  --chunk-size SIZE      chunk size, 4K..32M, power of two (suffix K, M; default:\n"
      "                         the COW's, 64K for a new one)\n"
      "  --format               initialise the COW, destroying what it holds\n"
      "  --opt KEY=VALUE        plugin setting (repeatable)\n"
      "  --reload-interval SEC  fold mapped chunks into dm-linear segments every SEC\n"
      "                         seconds when there are new ones (default 10; 0: never;\n"
      "                         SIGHUP folds at once)\n"
      "  --max-targets N        most targets in the device's table (default 65536, at most\n"
      "                         1048576, device-mapper's limit); mappings beyond stay in\n"
      "                         the kernel's remap store\n"
      "  --no-mlock             skip PR_SET_IO_FLUSHER and mlockall (tests only: without\n"
      "                         them memory pressure can deadlock the device)\n"
      "  -v, --verbose          debug messages too: every request, libdevmapper's words\n"
      "  --syslog               log to syslog (daemon facility) instead of stderr\n"
      "  --ready-fd FD          write \"ready\" to FD and close it once the device is usable\n"
      "  -h, --help             this text\n"
      "\n"
      "Logging goes to stderr or syslog only, never to a file (a file may live on the\n"
      "device being served). Needs CAP_SYS_ADMIN (device-mapper, the channel) and\n"
      "CAP_SYS_RESOURCE (PR_SET_IO_FLUSHER).\n"
      "\n"
      "Signals: SIGTERM, SIGINT: flush (every mapping made durable), remove the device,\n"
      "exit 0; if the device is in use it keeps serving and says so (signal again to\n"
      "retry). SIGHUP: reload the table now. SIGKILL: the kernel fails I/O that waits for\n"
      "the daemon; everything flushed before is on disk.\n"
      "\n"
      "Exit status: 0 after a clean shutdown, 1 on errors, 2 on bad usage.\n",
      plugins.c_str());
}

int Usage(const std::string& msg) {
  std::fprintf(stderr, "dmcowd: %s\nTry 'dmcowd --help'.\n", msg.c_str());
  return 2;
}

bool ParseUint(const char* text, uint64_t* out) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(text, &end, 10);
  if (errno || end == text || *end || text[0] == '-') return false;
  *out = v;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  enum {
    kName = 1000,
    kPlugin,
    kIdent,
    kUuid,
    kUdevPrivate,
    kChunk,
    kFormat,
    kOpt,
    kReload,
    kMaxTargets,
    kNoMlock,
    kSyslog,
    kReadyFd
  };
  static const option kLong[] = {
      {"name", required_argument, nullptr, kName},
      {"plugin", required_argument, nullptr, kPlugin},
      {"ident", required_argument, nullptr, kIdent},
      {"uuid", required_argument, nullptr, kUuid},
      {"udev-private", no_argument, nullptr, kUdevPrivate},
      {"chunk-size", required_argument, nullptr, kChunk},
      {"format", no_argument, nullptr, kFormat},
      {"opt", required_argument, nullptr, kOpt},
      {"reload-interval", required_argument, nullptr, kReload},
      {"max-targets", required_argument, nullptr, kMaxTargets},
      {"no-mlock", no_argument, nullptr, kNoMlock},
      {"verbose", no_argument, nullptr, 'v'},
      {"syslog", no_argument, nullptr, kSyslog},
      {"ready-fd", required_argument, nullptr, kReadyFd},
      {"help", no_argument, nullptr, 'h'},
      {nullptr, 0, nullptr, 0},
  };
  DaemonOptions d;
  PluginOptions p;
  std::string plugin = "cow";
  int verbose = 0;
  bool use_syslog = false;
  int ready_fd = -1;
  int c;
  uint64_t v;
  opterr = 0;
  while ((c = getopt_long(argc, argv, "+vh", kLong, nullptr)) != -1) {
    switch (c) {
      case kName: d.name = optarg; break;
      case kPlugin: plugin = optarg; break;
      case kReadyFd:
        if (!ParseUint(optarg, &v) || v < 3 || v > 65535) return Usage(std::string("bad --ready-fd ") + optarg);
        ready_fd = static_cast<int>(v);
        break;
      case kIdent: d.ident = optarg; break;
      case kUuid:
        if (!dmcowd::ValidUuid(optarg)) return Usage(std::string("--uuid '") + optarg + "': " + dmcowd::kUuidRule);
        d.uuid = optarg;
        break;
      case kUdevPrivate: d.udev_private = true; break;
      case kChunk:
        if (!ParseSizeArg(optarg, &v) || v > (uint64_t{1} << 40) || v % 512 || v / 512 > UINT32_MAX)
          return Usage(std::string("bad --chunk-size ") + optarg);
        p.chunk_sectors = static_cast<uint32_t>(v / 512);
        break;
      case kFormat: p.format = true; break;
      case kOpt: {
        const char* eq = std::strchr(optarg, '=');
        if (!eq || eq == optarg) return Usage(std::string("--opt wants KEY=VALUE, not ") + optarg);
        p.params[std::string(optarg, static_cast<size_t>(eq - optarg))] = eq + 1;
        break;
      }
      case kReload:
        if (!ParseUint(optarg, &v) || v > 86400) return Usage(std::string("bad --reload-interval ") + optarg);
        d.reload_interval_s = static_cast<int>(v);
        break;
      case kMaxTargets:
        if (!ParseUint(optarg, &v) || v < 3 || v > dmcowd::kDmMaxTargets)
          return Usage(std::string("--max-targets must be 3..1048576, not ") + optarg);
        d.max_targets = v;
        break;
      case kNoMlock: d.lock_memory = false; break;
      case 'v': verbose++; break;
      case kSyslog: use_syslog = true; break;
      case 'h': PrintHelp(); return 0;
      default: return Usage(std::string("unknown or incomplete option ") + (optind > 0 ? argv[optind - 1] : ""));
    }
  }
  for (int i = optind; i < argc; i++) p.args.push_back(argv[i]);
  if (d.name.empty()) return Usage("--name is required");
  dmcowd::LogInit(verbose >= 1 ? dmcowd::LogLevel::kDebug : dmcowd::LogLevel::kInfo, use_syslog);

  std::unique_ptr<dmcowd::Plugin> plug;
  dmcowd::Status s = dmcowd::MakePlugin(plugin, p, &plug);
  if (!s.ok()) return Usage(s.ToString());

  // Signals are taken by the signalfd in Daemon::Run; every thread blocks them.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);

  dmcowd::Daemon daemon(d, std::move(plug));
  s = daemon.Start();
  if (!s.ok()) {
    LOG_ERROR("%s", s.ToString().c_str());
    return 1;
  }
  if (ready_fd >= 0) {
    // The device is live: whoever started us may hand it out now, once
    // udev (where it runs) has seen it: it waits on the cookie, since we
    // cannot (udev reads the device, and we serve it only from here on).
    char ready[64];
    const int len = daemon.udev_cookie() != 0
                        ? std::snprintf(ready, sizeof(ready), "ready udev-cookie=%u\n", daemon.udev_cookie())
                        : std::snprintf(ready, sizeof(ready), "ready\n");
    ssize_t ignored = ::write(ready_fd, ready, static_cast<size_t>(len));
    (void)ignored;
    ::close(ready_fd);
    // Started by a launcher that reads our stderr only until we are ready
    // (dmcow-qcow attach): from now on, syslog.
    struct stat st;
    if (!use_syslog && ::fstat(2, &st) == 0 && S_ISFIFO(st.st_mode)) {
      dmcowd::LogInit(verbose >= 1 ? dmcowd::LogLevel::kDebug : dmcowd::LogLevel::kInfo, true);
      const int null_fd = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
      if (null_fd >= 0) ::dup2(null_fd, 2), ::close(null_fd);
    }
  }
  return daemon.Run();
}
