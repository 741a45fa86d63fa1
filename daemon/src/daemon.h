// Daemon: one device served by one plugin (daemon/DESIGN.md). Start builds
// the stack and starts serving on a thread; the caller's thread runs the
// signal/timer loop (Run) with its reloads and the shutdown.
#ifndef DMCOWD_DAEMON_H_
#define DMCOWD_DAEMON_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "channel.h"
#include "dm.h"
#include "dmcowd/plugin.h"
#include "loopdev.h"
#include "server.h"
#include "suspend_guard.h"
#include "table.h"

namespace dmcowd {

// What device-mapper takes as a UUID without mangling it (libdevmapper
// rewrites other characters); empty: none.
bool ValidUuid(const std::string& uuid);
inline constexpr const char* kUuidRule = "up to 128 characters of A-Z a-z 0-9 _ . - : +";

struct DaemonOptions {
  std::string name;              // /dev/mapper/NAME
  std::string ident;             // channel ident; empty = name
  std::string uuid;              // the device's DM UUID; empty: none
  bool udev_private = false;     // no /dev/disk links or scanners (dm::UdevRules::kNoDisk)
  int reload_interval_s = 10;    // 0: no periodic reloads
  uint64_t max_targets = 65536;  // table size bound (<= kDmMaxTargets)
  bool lock_memory = true;       // PR_SET_IO_FLUSHER + mlockall
};

struct ReloadStats {
  uint64_t reloads = 0;
  uint64_t targets = 0;          // in the current table
  uint64_t linear_chunks = 0;    // chunks routed through linear segments
  double last_ms = 0;            // whole reload
  double last_suspended_ms = 0;  // suspend .. resume
};

class Daemon {
 public:
  Daemon(DaemonOptions options, std::unique_ptr<Plugin> plugin);
  ~Daemon();
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // Builds the device and starts serving. On failure everything built so
  // far is taken down again.
  Status Start();

  // Where udev runs, the cookie of the device's first activation: whoever
  // started the daemon waits on it (dm::WaitForUdev) once the daemon
  // serves; 0 elsewhere.
  uint32_t udev_cookie() const { return udev_cookie_; }
  dm::UdevRules udev_rules() const { return options_.udev_private ? dm::UdevRules::kNoDisk : dm::UdevRules::kAll; }

  // Waits for SIGTERM/SIGINT, reloading periodically; then shuts down.
  // Returns the process exit code.
  int Run();

  // Folds stable extents into linear segments now.
  Status Reload();
  // One slice of the plugin's scan; true when the scan just ended.
  bool ScanSlice();

  // Lets the kernel forget the RO mappings the plugin wants back (under a
  // suspend, with every request read so far answered), if it wants any.
  Status Reclaim();

  // Flush, remove the device, stop. *busy: the device is open, nothing
  // was stopped.
  Status Shutdown(bool* busy);

  const ReloadStats& reload_stats() const { return reload_stats_; }

 private:
  Status LoadTable(const std::vector<Extent>& linear);
  Status FlushDevice();
  void StopServing();
  void TearDown();

  DaemonOptions options_;
  std::unique_ptr<Plugin> plugin_;
  std::mutex plugin_mu_;
  DeviceSpec spec_;
  BlockDev base_, cow_, direct_;
  TableDevices devices_;
  Channel chan_;
  std::unique_ptr<Server> server_;
  std::thread server_thread_;
  int server_done_fd_ = -1;  // eventfd: the serving thread ended
  int reclaim_fd_ = -1;      // eventfd: the plugin wants a reclaim
  bool created_ = false;
  SuspendGuard guard_;  // resumes the device if we die while it is suspended
  bool plugin_open_ = false;
  uint32_t udev_cookie_ = 0;
  std::vector<Extent> linear_;  // chunks in linear segments now
  uint64_t folded_generation_ = ~uint64_t{0};
  bool scan_pending_ = false;  // Plugin::ScanStable has more to look at
  ReloadStats reload_stats_;
};

}  // namespace dmcowd

#endif  // DMCOWD_DAEMON_H_
