// dmcow-qcow: QEMU images as kernel block devices.
//
//   dmcow-qcow attach [--name NAME] [--read-only] [--no-backing] [--allow-device-backing]
//                     [--scratch-max SIZE] [--key-file [N=]FILE]... [--no-partitions] IMAGE
//                                                       prints /dev/mapper/NAME
//   dmcow-qcow detach NAME
//   dmcow-qcow list [--output human|json]
//
// attach starts one dmcowd (qcow2 plugin) per qcow2 or qcow (v1) image of
// the chain, deepest first: backing images are served read-only as NAME-b1, NAME-b2...,
// each the base of the one above; a raw backing file is the deepest base.
// It returns once the top device is usable (each dmcowd reports readiness on
// a pipe), and records the attachment in /run/dmcow-qcow/NAME.json. detach
// stops the daemons top first; each flushes, removes its device and closes
// its image clean (qemu-img check: no errors, no leaks; qcow v1, which
// qemu-img cannot check: dmcow-img check finds no errors).
//
// Every file of the chain is opened once, here (chain_files.h: type checked
// before it is opened, each backing name resolved once), and the daemons
// inherit the descriptors (--opt image_fd=4, chainK=FD:NAME): they open no
// file of the chain by name, their loop devices sit on these descriptors and
// their QEMU locks on the same open file descriptions.
//
// Encrypted images (LUKS) are attached with the kernel's dm-crypt doing the
// cryptography (daemon/src/qcow2/qcow2_plugin.cc). Passphrases: --key-file
// FILE for the image, --key-file N=FILE for the N-th file below it, else
// asked on the terminal; each daemon gets those of its level and below on
// inherited memfds (attach_keys.h). Legacy AES images are refused.
//
// The top device has the DM UUID DMCOW-QCOW-NAME; the partitions of its
// table are mapped as kpartx maps them (partition_maps.h) once it is up,
// and removed first by detach.
#include <dirent.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/fs.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "attach_keys.h"
#include "chain_files.h"
#include "dm.h"
#include "dmcow/image.h"
#include "partition_maps.h"
#include "partition_table.h"
#include "size_arg.h"

namespace {

using json = nlohmann::json;

const char* const kStateDir = "/run/dmcow-qcow";
const char* const kUuidPrefix = "DMCOW-QCOW-";

int Fail(const std::string& msg, int code = 1) {
  std::fprintf(stderr, "dmcow-qcow: %s\n", msg.c_str());
  return code;
}

std::string SelfDir() {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  buf[n] = 0;
  std::string p(buf);
  return p.substr(0, p.rfind('/'));
}

std::string FindDaemon() {
  if (const char* env = std::getenv("DMCOWD")) return env;
  for (const std::string& cand : {SelfDir() + "/dmcowd", SelfDir() + "/../sbin/dmcowd"}) {
    if (::access(cand.c_str(), X_OK) == 0) return cand;
  }
  return "dmcowd";  // from PATH
}

bool ValidName(const std::string& s) {
  if (s.empty() || s.size() > 28 || s == "." || s == "..") return false;  // leaves room for -bN / -store
  for (char c : s) {
    if (!isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '.' && c != '-') return false;
  }
  return true;
}

std::string DefaultName(const std::string& image) {
  std::string base = image.substr(image.rfind('/') + 1);
  if (size_t dot = base.find('.'); dot != std::string::npos && dot > 0) base.resize(dot);
  std::string out;
  for (char c : base) out += (isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-') ? c : '_';
  if (out.size() > 28) out.resize(28);
  return out.empty() ? "qcow" : out;
}

// A daemon that has exited is not alive, even while it waits as a zombie
// for its parent (init, once dmcow-qcow attach has returned) to reap it: an
// init that reaps late (a shell as PID 1 in a VM or container) must not make
// detach wait for a daemon that is gone.
bool Alive(pid_t pid) {
  if (pid <= 0 || (::kill(pid, 0) != 0 && errno != EPERM)) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return true;  // no /proc: trust kill()
  const size_t paren = line.rfind(')');        // the state follows "(comm)"
  return paren == std::string::npos || line.size() < paren + 3 || line[paren + 2] != 'Z';
}

// Which process a recorded pid meant: a pid alone names whatever process
// has it now, and after the daemon died that may be any other process. So
// attach records, with each daemon's pid, its start time (field 22 of
// /proc/PID/stat, clock ticks since boot) and the boot it started in
// (/proc/sys/kernel/random/boot_id); nothing is signalled unless both still
// match. State files from before these fields carry no identity: their
// daemons are never signalled (detach says so and stops).
struct DaemonId {
  pid_t pid = 0;
  std::string start_time;  // decimal; empty: not recorded (older state file)
  std::string boot_id;
};

std::string BootId() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(in, id);
  return id;
}

// Field 22 of /proc/PID/stat; false if there is no such (live) process.
bool StartTime(pid_t pid, std::string* start_time) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (pid <= 0 || !std::getline(stat, line)) return false;
  const size_t paren = line.rfind(')');  // comm may hold spaces and parentheses
  if (paren == std::string::npos) return false;
  std::istringstream fields(line.substr(paren + 1));
  std::string field;
  for (int i = 3; i <= 22; i++) {  // fields 3 (state) .. 22 (starttime)
    if (!(fields >> field)) return false;
    if (i == 3 && field == "Z") return false;  // exited, not yet reaped
  }
  *start_time = field;
  return true;
}

enum class DaemonState {
  kRunning,      // the very process attach started
  kGone,         // exited, or its pid now belongs to another process
  kUnconfirmed,  // a process has the pid; the record cannot tell whose it is
};

DaemonState State(const DaemonId& d) {
  if (!Alive(d.pid)) return DaemonState::kGone;
  if (d.start_time.empty()) return DaemonState::kUnconfirmed;
  std::string now;
  if (!StartTime(d.pid, &now)) return Alive(d.pid) ? DaemonState::kUnconfirmed : DaemonState::kGone;
  if (now != d.start_time) return DaemonState::kGone;
  if (!d.boot_id.empty() && d.boot_id != BootId()) return DaemonState::kGone;
  return DaemonState::kRunning;
}

// Starts dmcowd and waits until it reports the device usable. On failure,
// *error holds what the daemon said. The daemon inherits `fds` as 4, 5...
bool StartDaemon(const std::vector<std::string>& args, const std::vector<int>& fds, pid_t* pid, std::string* error) {
  int ready[2], err[2];
  if (::pipe2(ready, O_CLOEXEC) != 0 || ::pipe2(err, O_CLOEXEC) != 0) {
    *error = std::string("pipe: ") + std::strerror(errno);
    return false;
  }
  const pid_t child = ::fork();
  if (child < 0) {
    *error = std::string("fork: ") + std::strerror(errno);
    return false;
  }
  if (child == 0) {
    ::setsid();
    const int null_fd = ::open("/dev/null", O_RDWR);
    ::dup2(null_fd, 0);
    ::dup2(null_fd, 1);
    if (!std::getenv("DMCOW_QCOW_DAEMON_STDERR")) ::dup2(err[1], 2);
    // Out of the way first (a source may sit where another goes), then into
    // place: dup2 clears O_CLOEXEC on the copy; everything else closes at exec.
    const int past = static_cast<int>(4 + fds.size());  // above every target
    std::vector<int> from = {::fcntl(ready[1], F_DUPFD_CLOEXEC, past)};
    for (int fd : fds) from.push_back(::fcntl(fd, F_DUPFD_CLOEXEC, past));
    for (size_t i = 0; i < from.size(); i++) {
      if (from[i] < 0 || ::dup2(from[i], static_cast<int>(3 + i)) < 0) {
        std::fprintf(stderr, "cannot pass descriptors to dmcowd: %s\n", std::strerror(errno));
        ::_exit(126);
      }
    }
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execvp(argv[0], argv.data());
    std::fprintf(stderr, "cannot run %s: %s\n", argv[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(ready[1]);
  ::close(err[1]);
  std::string said, out;
  bool ok = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (bool ready_open = true, err_open = true; ready_open || err_open;) {
    pollfd p[2] = {{ready_open ? ready[0] : -1, POLLIN, 0}, {err_open ? err[0] : -1, POLLIN, 0}};
    const int left = static_cast<int>(
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count());
    if (left <= 0 || ::poll(p, 2, left) <= 0) {
      if (errno == EINTR) continue;
      said += "(no answer within 60 s)";
      ::kill(child, SIGKILL);
      break;
    }
    char buf[4096];
    if (p[0].revents) {
      const ssize_t n = ::read(ready[0], buf, sizeof(buf));
      if (n > 0) out.append(buf, static_cast<size_t>(n));
      if (out.find("ready") != std::string::npos) {
        ok = true;
        break;
      }
      if (n <= 0) ready_open = false;
    }
    if (p[1].revents) {
      const ssize_t n = ::read(err[0], buf, sizeof(buf));
      if (n > 0)
        said.append(buf, std::min<size_t>(static_cast<size_t>(n), 65536 - std::min<size_t>(said.size(), 65536)));
      if (n <= 0) err_open = false;
    }
  }
  ::close(ready[0]);
  ::close(err[0]);  // the daemon switches to syslog once ready
  if (!ok) {
    int status = 0;
    ::waitpid(child, &status, 0);
    *error = said.empty() ? "dmcowd exited before the device was ready" : said;
    while (!error->empty() && error->back() == '\n') error->pop_back();
    return false;
  }
  *pid = child;
  return true;
}

bool WaitGone(const DaemonId& d, int seconds) {
  for (int i = 0; i < seconds * 20; i++) {
    int status;
    if (::waitpid(d.pid, &status, WNOHANG) == d.pid || State(d) == DaemonState::kGone) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

std::string StatePath(const std::string& name) { return std::string(kStateDir) + "/" + name + ".json"; }

// One level of an attachment as recorded: its device name and its daemon.
struct Level {
  std::string name;
  DaemonId daemon;
};

// The record attach writes for a level it started.
json LevelRecord(const std::string& name, pid_t pid, const std::string& image) {
  json level = {{"name", name}, {"pid", pid}, {"image", image}};
  std::string start_time;
  if (StartTime(pid, &start_time)) {
    level["start_time"] = start_time;
    level["boot_id"] = BootId();
  }
  return level;
}

// NAME.json: false with *error when it cannot be read or parsed; *missing
// tells whether it does not exist at all.
bool ReadState(const std::string& name, json* out, std::string* error = nullptr, bool* missing = nullptr) {
  std::ifstream in(StatePath(name));
  if (missing) *missing = !in;
  if (!in) {
    if (error) *error = StatePath(name) + ": " + std::strerror(errno);
    return false;
  }
  try {
    *out = json::parse(in);
  } catch (const std::exception& e) {
    if (error) *error = StatePath(name) + ": not valid JSON (" + e.what() + ")";
    return false;
  }
  if (!out->is_object() || !out->contains("levels") || !(*out)["levels"].is_array()) {
    if (error) *error = StatePath(name) + ": no \"levels\" list";
    return false;
  }
  return true;
}

// The levels of a state file, checked field by field: a damaged or edited
// file must give a clear error, never a crash or a signal sent to a pid
// read from garbage. Device names must be NAME or NAME-bN, as attach makes.
bool ParseLevels(const std::string& name, const json& state, std::vector<Level>* levels, std::string* error) {
  levels->clear();
  const json& list = state["levels"];
  if (list.empty()) {
    *error = StatePath(name) + ": no levels recorded";
    return false;
  }
  for (size_t i = 0; i < list.size(); i++) {
    const json& l = list[i];
    const std::string where = StatePath(name) + ": level " + std::to_string(i) + ": ";
    if (!l.is_object()) {
      *error = where + "not an object";
      return false;
    }
    Level level;
    if (!l.contains("name") || !l["name"].is_string()) {
      *error = where + "no \"name\" string";
      return false;
    }
    level.name = l["name"].get<std::string>();
    const std::string want = i == 0 ? name : name + "-b" + std::to_string(i);
    if (level.name != want && !(i > 0 && level.name.rfind(name + "-b", 0) == 0 && level.name.size() > name.size() + 2 &&
                                level.name.find_first_not_of("0123456789", name.size() + 2) == std::string::npos)) {
      *error = where + "device name '" + level.name + "' is not " + name + " or " + name + "-bN";
      return false;
    }
    if (!l.contains("pid") || !l["pid"].is_number_integer() || l["pid"].get<int64_t>() <= 0 ||
        l["pid"].get<int64_t>() > INT_MAX) {
      *error = where + "no valid \"pid\"";
      return false;
    }
    level.daemon.pid = static_cast<pid_t>(l["pid"].get<int64_t>());
    if (l.contains("start_time")) {
      const json& t = l["start_time"];
      if (!t.is_string() || t.get<std::string>().empty() ||
          t.get<std::string>().find_first_not_of("0123456789") != std::string::npos) {
        *error = where + "\"start_time\" is not a decimal string";
        return false;
      }
      level.daemon.start_time = t.get<std::string>();
      if (l.contains("boot_id")) {
        if (!l["boot_id"].is_string()) {
          *error = where + "\"boot_id\" is not a string";
          return false;
        }
        level.daemon.boot_id = l["boot_id"].get<std::string>();
      }
    }
    levels->push_back(level);
  }
  return true;
}

// The partition mappings a state file records: names as attach makes them
// (kpartx's, from NAME and the number), so that an edited file cannot make
// detach remove another device.
bool ParsePartitions(const std::string& name, const json& state, std::vector<std::string>* names, std::string* error) {
  names->clear();
  if (!state.contains("partitions")) return true;  // none, or an older dmcow-qcow
  const json& list = state["partitions"];
  if (!list.is_array() || list.size() > dmcowd::kMaxPartitions) {
    *error = StatePath(name) + ": \"partitions\" is not a list of at most " + std::to_string(dmcowd::kMaxPartitions);
    return false;
  }
  for (size_t i = 0; i < list.size(); i++) {
    const json& p = list[i];
    const std::string where = StatePath(name) + ": partition " + std::to_string(i) + ": ";
    if (!p.is_object() || !p.contains("number") || !p["number"].is_number_unsigned() ||
        p["number"].get<uint64_t>() < 1 || p["number"].get<uint64_t>() > dmcowd::kMaxPartitions) {
      *error = where + "no \"number\" from 1 to " + std::to_string(dmcowd::kMaxPartitions);
      return false;
    }
    const std::string want = dmcowd::PartitionName(name, static_cast<uint32_t>(p["number"].get<uint64_t>()));
    if (!p.contains("name") || !p["name"].is_string() || p["name"].get<std::string>() != want) {
      *error = where + "\"name\" is not " + want;
      return false;
    }
    names->push_back(want);
  }
  return true;
}

// Removes what a dead daemon left of its level: the devices themselves
// (loops go with them).
bool RemoveDeadLevel(const std::string& name, std::string* error) {
  for (const std::string& n : {name, name + "-store", name + "-base"}) {
    bool busy = false;
    if (!dmcowd::dm::Exists(n)) continue;
    dmcow::Status s = dmcowd::dm::Remove(n, &busy);
    if (!s.ok()) {
      *error = busy ? "/dev/mapper/" + n + " (its daemon died) is in use; close it first" : s.ToString();
      return false;
    }
  }
  return true;
}

// Stops daemons in the given order (top first). Returns false if one
// refused (device busy) or would not stop, or if a recorded pid cannot be
// confirmed to be the daemon (then nothing is signalled).
bool StopLevels(const std::vector<Level>& levels, std::string* error) {
  // Confirm every level before stopping any: a half-stopped chain helps nobody.
  for (const Level& level : levels) {
    if (State(level.daemon) != DaemonState::kUnconfirmed) continue;
    const std::string pid = std::to_string(level.daemon.pid);
    *error = "/dev/mapper/" + level.name + ": process " + pid +
             " is running, but the state file (from an older dmcow-qcow) does not record which process its "
             "daemon was, so it was not signalled; if " +
             pid + " is the daemon (see /proc/" + pid + "/cmdline), stop it (kill " + pid + ") and run detach again";
    return false;
  }
  for (const Level& level : levels) {
    const std::string dev = "/dev/mapper/" + level.name;
    if (State(level.daemon) != DaemonState::kRunning) {
      // Its daemon died (killed), whatever process has its pid now: the
      // kernel fails the device's I/O; nothing is signalled.
      if (!RemoveDeadLevel(level.name, error)) return false;
      continue;
    }
    // An open or mounted device cannot be removed: say so instead of waiting.
    const int fd = ::open(dev.c_str(), O_RDONLY | O_EXCL | O_CLOEXEC);
    if (fd < 0 && errno == EBUSY) {
      *error = dev + " is in use (mounted or open); unmount or close it first";
      return false;
    }
    if (fd >= 0) ::close(fd);
    // Confirmed again right before the signal: the daemon may have died
    // since the check above, and its pid been reused.
    if (State(level.daemon) != DaemonState::kRunning) {
      if (!RemoveDeadLevel(level.name, error)) return false;
      continue;
    }
    ::kill(level.daemon.pid, SIGTERM);
    if (!WaitGone(level.daemon, 120)) {
      *error = "dmcowd " + std::to_string(level.daemon.pid) + " serving " + dev + " did not stop";
      return false;
    }
  }
  return true;
}

const char* const kAttachUsage =
    "usage: dmcow-qcow attach [--name NAME] [--read-only] [--no-backing] [--allow-device-backing]\n"
    "                         [--scratch-max SIZE] [--key-file [N=]FILE]... [--no-partitions] IMAGE";

// Every encrypted file of the chain has its passphrase (asked for on the
// terminal where --key-file gave none), and every key names an encrypted
// file. Returns the exit code of a refusal, else 0.
int GatherKeys(const std::vector<dmcowd::ChainFile>& chain, dmcowd::KeySet* keys) {
  for (const auto& [depth, key] : keys->keys()) {
    const std::string arg = depth == 0 ? "--key-file" : "--key-file " + std::to_string(depth) + "=";
    if (depth >= chain.size()) {
      return Fail(arg + ": the chain has " + std::to_string(chain.size()) + " file(s) (" +
                      (depth == 0 ? "" : "N counts backing files from 1, ") + "--no-backing attaches the image alone)",
                  2);
    }
    if (chain[depth].encryption.empty()) return Fail(arg + ": " + chain[depth].name + " is not encrypted", 2);
  }
  for (size_t depth = 0; depth < chain.size(); depth++) {
    const dmcowd::ChainFile& f = chain[depth];
    if (f.encryption == "aes") {
      return Fail(f.name + dmcowd::kLegacyAesRefusal);
    }
    if (f.encryption.empty() || keys->Has(depth)) continue;
    dmcow::Status s = keys->Prompt(depth, f.name);
    if (s.code() == dmcow::Status::Code::kNotFound) {
      return Fail(f.name + ": image is encrypted: give its passphrase with --key-file " +
                  (depth == 0 ? "FILE" : std::to_string(depth) + "=FILE") + " (or run attach on a terminal)");
    }
    if (!s.ok()) return Fail(s.ToString());
  }
  return 0;
}

int Attach(int argc, char** argv) {
  std::string name, scratch_max;
  dmcowd::ChainPolicy policy;
  policy.real_image_name = true;
  bool read_only = false, partitions = true;
  dmcowd::KeySet keys;
  enum { kNoBacking = 1000, kAllowDeviceBacking, kKeyFile, kNoPartitions };
  static const option kLong[] = {{"name", required_argument, nullptr, 'n'},
                                 {"read-only", no_argument, nullptr, 'r'},
                                 {"scratch-max", required_argument, nullptr, 's'},
                                 {"no-backing", no_argument, nullptr, kNoBacking},
                                 {"allow-device-backing", no_argument, nullptr, kAllowDeviceBacking},
                                 {"key-file", required_argument, nullptr, kKeyFile},
                                 {"no-partitions", no_argument, nullptr, kNoPartitions},
                                 {nullptr, 0, nullptr, 0}};
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "+n:r", kLong, nullptr)) != -1) {
    uint64_t bytes;
    if (c == 'n')
      name = optarg;
    else if (c == 'r')
      read_only = true;
    else if (c == kNoBacking)
      policy.follow_backing = false;
    else if (c == kAllowDeviceBacking)
      policy.allow_device_backing = true;
    else if (c == kNoPartitions)
      partitions = false;
    else if (c == kKeyFile) {
      if (dmcow::Status s = keys.AddKeyFile(optarg); !s.ok()) return Fail(s.ToString(), 2);
    } else if (c == 's' && dmcowd::ParseSizeArg(optarg, &bytes))
      scratch_max = std::to_string(bytes);
    else if (c == 's')
      return Fail(std::string("bad --scratch-max ") + optarg + " (a size: 512M, 2G, 0 for no limit)", 2);
    else
      return Fail(kAttachUsage, 2);
  }
  if (optind + 1 != argc) return Fail(kAttachUsage, 2);
  if (!name.empty() && !ValidName(name)) return Fail("name '" + name + "': 1-28 characters of A-Z a-z 0-9 _ . -", 2);
  policy.writable = !read_only;

  // The chain, top first: each file opened once, here, and only what may be
  // followed (chain_files.h); the daemons get these descriptors.
  std::vector<dmcowd::ChainFile> chain;
  if (dmcow::Status s = dmcowd::OpenChain(argv[optind], policy, &chain); !s.ok()) return Fail(s.ToString());
  const std::string image = chain[0].name;
  if (name.empty()) name = DefaultName(image);
  if (!ValidName(name)) return Fail("name '" + name + "': 1-28 characters of A-Z a-z 0-9 _ . -", 2);
  auto served = [](const std::string& format) { return format == "qcow2" || format == "qcow"; };
  if (!served(chain[0].format)) {
    return Fail(image + ": is " + chain[0].format +
                "; attach serves qcow2 and qcow images (qemu-img convert -O qcow2 first)");
  }
  for (size_t i = 1; i < chain.size(); i++) {
    if (!served(chain[i].format) && !(chain[i].format == "raw" && i + 1 == chain.size())) {
      return Fail(chain[i].name + ": backing images must be qcow2 or qcow (or a raw file at the bottom), not " +
                  chain[i].format);
    }
  }
  ::mkdir(kStateDir, 0755);
  json state;
  std::string ignored_error;
  if (std::vector<Level> old; ReadState(name, &state) && ParseLevels(name, state, &old, &ignored_error) &&
                              State(old[0].daemon) != DaemonState::kGone) {
    const bool has_image = state.contains("image") && state["image"].is_string();
    return Fail(name + " is attached already (" + (has_image ? state["image"].get<std::string>() : StatePath(name)) +
                ")");
  }

  if (int rc = GatherKeys(chain, &keys); rc != 0) return rc;

  // Deepest qcow2 first; each level's base is the level below.
  const std::string daemon = FindDaemon();
  size_t qcow2_levels = chain.size();
  if (chain.back().format == "raw") qcow2_levels--;
  json levels = json::array();
  auto stop_all = [&levels, &ignored_error] {
    std::vector<Level> started;  // the records just made (LevelRecord), top first
    for (const json& r : levels) {
      started.push_back(
          {r["name"].get<std::string>(),
           {r["pid"].get<pid_t>(), r.value("start_time", std::string()), r.value("boot_id", std::string())}});
    }
    StopLevels(started, &ignored_error);
  };
  std::string below;  // base of the next level up: a device (a raw bottom is found through chainK)
  for (size_t i = qcow2_levels; i-- > 0;) {
    const std::string level_name = i == 0 ? name : name + "-b" + std::to_string(i);
    std::vector<std::string> args = {daemon,  "--plugin",           "qcow2",      "--name", level_name,
                                     "--opt", "name=" + level_name, "--ready-fd", "3"};
    if (std::getenv("DMCOW_QCOW_VERBOSE")) args.push_back("-v");
    if (i == 0) args.insert(args.end(), {"--uuid", kUuidPrefix + name});
    if (i > 0 || read_only) args.insert(args.end(), {"--opt", "read_only=1"});
    if (!policy.follow_backing) args.insert(args.end(), {"--opt", "no_backing=1"});
    if (!below.empty()) args.insert(args.end(), {"--opt", "backing=" + below});
    if (!scratch_max.empty()) args.insert(args.end(), {"--opt", "scratch_max=" + scratch_max});
    // This level's image and every file below it, as descriptors 4, 5...
    std::vector<int> fds = {chain[i].fd.get()};
    args.insert(args.end(), {"--opt", "image_fd=4"});
    for (size_t k = 1; i + k < chain.size(); k++) {
      fds.push_back(chain[i + k].fd.get());
      args.insert(args.end(), {"--opt", "chain" + std::to_string(k) + "=" + std::to_string(3 + fds.size()) + ":" +
                                            chain[i + k].name});
    }
    // The passphrases of this level and those below it, by depth from it.
    std::vector<dmcowd::UniqueFd> secrets;
    for (const auto& [depth, key] : keys.keys()) {
      if (depth < i) continue;
      dmcowd::UniqueFd fd;
      if (dmcow::Status s = keys.SecretFd(depth, &fd); !s.ok()) return Fail(s.ToString());
      fds.push_back(fd.get());
      args.insert(args.end(), {"--opt", "secret" + std::to_string(depth - i) + "=" + std::to_string(3 + fds.size())});
      secrets.push_back(std::move(fd));
    }
    args.push_back(chain[i].name);
    pid_t pid = 0;
    std::string error;
    if (!StartDaemon(args, fds, &pid, &error)) {
      stop_all();
      return Fail("attaching " + chain[i].name + ": " + error);
    }
    levels.insert(levels.begin(), LevelRecord(level_name, pid, chain[i].name));
    below = "/dev/mapper/" + level_name;
  }
  const std::string device = "/dev/mapper/" + name;
  if (read_only) {
    const int fd = ::open(device.c_str(), O_RDONLY | O_CLOEXEC);
    int on = 1;
    if (fd < 0 || ::ioctl(fd, BLKROSET, &on) != 0)
      std::fprintf(stderr, "dmcow-qcow: warning: %s: BLKROSET: %s\n", device.c_str(), std::strerror(errno));
    if (fd >= 0) ::close(fd);
  }
  json partition_records = json::array();
  if (partitions) {
    dmcowd::dm::InitSyncedWithUdev();
    std::vector<dmcowd::PartitionMap> maps;
    std::vector<std::string> warnings;
    if (dmcow::Status s = dmcowd::MapPartitions(name, read_only, &maps, &warnings); !s.ok()) {
      stop_all();
      return Fail("mapping the partitions of " + device + ": " + s.ToString() + " (--no-partitions attaches without)");
    }
    for (const std::string& w : warnings)
      std::fprintf(stderr, "dmcow-qcow: warning: %s: %s\n", device.c_str(), w.c_str());
    for (const dmcowd::PartitionMap& m : maps) {
      partition_records.push_back({{"name", m.name},
                                   {"number", m.number},
                                   {"device", "/dev/mapper/" + m.name},
                                   {"start_sector", m.start_sector},
                                   {"sectors", m.sectors}});
    }
  }
  state = json{{"name", name},
               {"image", image},
               {"device", device},
               {"uuid", kUuidPrefix + name},
               {"read_only", read_only},
               {"levels", levels},
               {"partitions", partition_records}};
  {
    const std::string tmp = StatePath(name) + ".tmp";
    std::ofstream out(tmp);
    out << state.dump(2) << "\n";
    out.close();
    if (!out || ::rename(tmp.c_str(), StatePath(name).c_str()) != 0) {
      std::fprintf(stderr, "dmcow-qcow: warning: cannot record %s in %s\n", name.c_str(), kStateDir);
    }
  }
  std::printf("%s\n", device.c_str());
  return 0;
}

int Detach(int argc, char** argv) {
  dmcowd::dm::InitSyncedWithUdev();
  if (argc != 2) return Fail("usage: dmcow-qcow detach NAME", 2);
  const std::string name = argv[1];
  if (!ValidName(name)) return Fail("name '" + name + "' is not valid", 2);
  json state;
  std::string error;
  bool missing = false;
  if (!ReadState(name, &state, &error, &missing)) {
    if (missing) return Fail(name + ": not attached (no " + StatePath(name) + ")");
    return Fail("damaged state file, nothing was stopped: " + error);
  }
  std::vector<Level> levels;
  std::vector<std::string> partitions;
  if (!ParseLevels(name, state, &levels, &error) || !ParsePartitions(name, state, &partitions, &error)) {
    return Fail("damaged state file, nothing was stopped: " + error);
  }
  // Partitions first, as they sit on the device; nothing is removed while
  // any of it is in use.
  if (dmcow::Status s = dmcowd::CheckUnused(name, partitions); !s.ok())
    return Fail(s.message() + "; unmount or close it first");
  if (dmcow::Status s = dmcowd::UnmapPartitions(partitions); !s.ok()) return Fail(s.ToString());
  if (!StopLevels(levels, &error)) return Fail(error);
  ::unlink(StatePath(name).c_str());
  return 0;
}

int List(int argc, char** argv) {
  bool as_json = argc == 3 && std::string(argv[1]) == "--output" && std::string(argv[2]) == "json";
  if (argc != 1 && !as_json && !(argc == 3 && std::string(argv[1]) == "--output" && std::string(argv[2]) == "human")) {
    return Fail("usage: dmcow-qcow list [--output human|json]", 2);
  }
  json all = json::array();
  if (DIR* d = ::opendir(kStateDir)) {
    while (dirent* e = ::readdir(d)) {
      std::string f = e->d_name;
      if (f.size() < 6 || f.substr(f.size() - 5) != ".json") continue;
      const std::string name = f.substr(0, f.size() - 5);
      json st;
      std::string error;
      std::vector<Level> levels;
      if (!ReadState(name, &st, &error) || !ParseLevels(name, st, &levels, &error)) {
        all.push_back(json{{"name", name}, {"pid", 0}, {"state", "damaged state file: " + error}});
        continue;
      }
      // What detach would find: the daemon attach started, or not.
      struct stat sb;
      const bool dev = st.contains("device") && st["device"].is_string() &&
                       ::stat(st["device"].get<std::string>().c_str(), &sb) == 0;
      st["name"] = name;
      st["pid"] = levels[0].daemon.pid;
      switch (State(levels[0].daemon)) {
        case DaemonState::kRunning: st["state"] = dev ? "attached" : "stale (device gone)"; break;
        case DaemonState::kGone: st["state"] = "stale (daemon gone)"; break;
        case DaemonState::kUnconfirmed:
          st["state"] = "unknown (older state file: pid not confirmed as its daemon)";
          break;
      }
      all.push_back(st);
    }
    ::closedir(d);
  }
  std::sort(all.begin(), all.end(), [](const json& a, const json& b) { return a["name"] < b["name"]; });
  if (as_json) {
    std::printf("%s\n", all.dump(4).c_str());
    return 0;
  }
  std::printf("%-20s %-8s %-8s %-24s %s\n", "NAME", "PID", "MODE", "DEVICE", "IMAGE / STATE");
  // Fields of a state file are printed only when they have the right type.
  auto str = [](const json& st, const char* key) {
    return st.contains(key) && st[key].is_string() ? st[key].get<std::string>() : std::string();
  };
  for (const json& st : all) {
    const bool ro = st.contains("read_only") && st["read_only"].is_boolean() && st["read_only"].get<bool>();
    std::printf("%-20s %-8d %-8s %-24s %s (%s)\n", str(st, "name").c_str(), st["pid"].get<int>(), ro ? "ro" : "rw",
                str(st, "device").c_str(), str(st, "image").c_str(), str(st, "state").c_str());
    std::vector<std::string> partitions;
    std::string error;
    if (!ParsePartitions(str(st, "name"), st, &partitions, &error)) continue;
    for (const std::string& p : partitions) {
      std::printf("%-20s %-8s %-8s %-24s partition of %s\n", p.c_str(), "-", ro ? "ro" : "rw",
                  ("/dev/mapper/" + p).c_str(), str(st, "name").c_str());
    }
  }
  return 0;
}

void Help() {
  std::printf(
      "usage: dmcow-qcow attach [--name NAME] [--read-only] [--no-backing] [--allow-device-backing]\n"
      "                         [--scratch-max SIZE] [--key-file [N=]FILE]... [--no-partitions] IMAGE\n"
      "       dmcow-qcow detach NAME\n"
      "       dmcow-qcow list [--output human|json]\n"
      "\n"
      "attach makes a qcow2 image (v2 or v3) or a legacy qcow (v1) image, with its\n"
      "backing chain, a block device,\n"
      "/dev/mapper/NAME (NAME defaults to the image's file name without extension), and\n"
      "prints its path once it is usable. Writes land in the image as QEMU would write\n"
      "them; a flush of the device makes them durable. Backing qcow2/qcow images are attached\n"
      "read-only as NAME-b1, NAME-b2...; a raw backing file is read directly. The image\n"
      "is locked as QEMU locks images: a QEMU writing it refuses us, and QEMU refuses an\n"
      "image attached read-write, for as long as the device exists (even if its daemon\n"
      "is killed). --read-only attaches without ever writing the image (it may belong\n"
      "to someone else): no file is opened for writing, and the device is read-only.\n"
      "\n"
      "Files named inside an image are followed as qemu-img follows them, but each file\n"
      "of the chain is opened once, here, and nothing else is used: the daemons, their\n"
      "loop devices and the locks all get these open files, so a name swapped after\n"
      "the open (a symbolic link, a directory) changes nothing. A backing file that is\n"
      "not a regular file is refused, with the image and the file named: FIFOs,\n"
      "sockets, character devices always (they are never opened), block devices unless\n"
      "--allow-device-backing (backing images on LVM volumes). External data files are\n"
      "not served. --no-backing attaches the image alone: its unallocated clusters read\n"
      "zeros (a write to part of one fills the rest with zeros, not backing data).\n"
      "Vet an image first with dmcow-img info --backing-chain.\n"
      "\n"
      "Compressed and partly allocated clusters are decompressed once into an unlinked\n"
      "scratch file (in the image's directory, else /var/tmp) and read from there;\n"
      "--scratch-max bounds it per level (default 1G, 0: no bound): past it the oldest\n"
      "copies are dropped, under a brief suspend of the device, and decompressed again\n"
      "when read again.\n"
      "\n"
      "The device's partitions (GPT, or MBR with logical partitions) are mapped as\n"
      "kpartx maps them, before attach returns: /dev/mapper/NAME1, NAME2... (NAMEp1...\n"
      "when NAME ends in a digit), with DM UUIDs partN-DMCOW-QCOW-NAME under the\n"
      "device's DMCOW-QCOW-NAME; where udev runs, attach returns once its rules ran\n"
      "(/dev/disk/by-id/dm-uuid-*, by-uuid, by-label). Partitions that do not fit\n"
      "the device are not mapped (a warning says why). --no-partitions maps none.\n"
      "\n"
      "Encrypted (LUKS) images are decrypted by the kernel's dm-crypt, with the image's\n"
      "cipher and each sector's IV its sector in the file, as QEMU encrypts it; the\n"
      "master key reaches dm-crypt through the kernel keyring, never a table line.\n"
      "--key-file FILE gives the image's passphrase (the file's bytes, as qemu-img's\n"
      "--object secret,file=FILE; - reads standard input), --key-file N=FILE that of\n"
      "the N-th backing file; on a terminal, attach asks for those not given.\n"
      "Scratch copies of encrypted images stay in memory. Legacy AES images are\n"
      "refused (their IV is the guest sector; QEMU's emulators refuse them too).\n"
      "\n"
      "detach removes the partition mappings, flushes, removes the devices, stops their\n"
      "daemons and leaves the image clean (qemu-img check: no errors, no leaks). It\n"
      "refuses while the device or a partition is open or mounted.\n"
      "list shows what is attached: name, daemon pid, mode, device, image, state, and\n"
      "a line per partition.\n"
      "\n"
      "Needs root (device-mapper, loop devices) and the dm-cow kernel module. Each level\n"
      "is served by a dmcowd process (found next to dmcow-qcow, or $DMCOWD), logging to\n"
      "syslog once the device is up (DMCOW_QCOW_VERBOSE=1: debug messages). State:\n"
      "%s/NAME.json.\n",
      kStateDir);
}

}  // namespace

int main(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);
  if (argc < 2) {
    Help();
    return 2;
  }
  const std::string cmd = argv[1];
  if (cmd == "attach") return Attach(argc - 1, argv + 1);
  if (cmd == "detach") return Detach(argc - 1, argv + 1);
  if (cmd == "list") return List(argc - 1, argv + 1);
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    Help();
    return 0;
  }
  return Fail("unknown command '" + cmd + "' (attach, detach, list)", 2);
}
