// dmcow-qcow: QEMU images as kernel block devices.
//
//   dmcow-qcow attach [--name NAME] [--read-only] [--scratch-max SIZE] IMAGE
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
#include <string>
#include <thread>
#include <vector>

#include "dm.h"
#include "size_arg.h"
#include "dmcow/image.h"

namespace {

using json = nlohmann::json;

const char* const kStateDir = "/run/dmcow-qcow";

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

std::string AbsPath(const std::string& p) {
  char buf[PATH_MAX];
  return ::realpath(p.c_str(), buf) ? std::string(buf) : p;
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
  const size_t paren = line.rfind(')');  // the state follows "(comm)"
  return paren == std::string::npos || line.size() < paren + 3 || line[paren + 2] != 'Z';
}

// Starts dmcowd and waits until it reports the device usable. On failure,
// *error holds what the daemon said.
bool StartDaemon(const std::vector<std::string>& args, pid_t* pid, std::string* error) {
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
    ::dup2(ready[1], 3);  // dup2 clears O_CLOEXEC on the copy
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
    const int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                          deadline - std::chrono::steady_clock::now()).count());
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
      if (n > 0) said.append(buf, std::min<size_t>(static_cast<size_t>(n), 65536 - std::min<size_t>(said.size(), 65536)));
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

bool WaitGone(pid_t pid, int seconds) {
  for (int i = 0; i < seconds * 20; i++) {
    int status;
    if (::waitpid(pid, &status, WNOHANG) == pid || !Alive(pid)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

std::string StatePath(const std::string& name) { return std::string(kStateDir) + "/" + name + ".json"; }

bool ReadState(const std::string& name, json* out) {
  std::ifstream in(StatePath(name));
  if (!in) return false;
  try {
    *out = json::parse(in);
  } catch (const std::exception&) {
    return false;
  }
  return out->is_object() && (*out)["levels"].is_array();
}

// Stops daemons in the given order (top first). Returns false if one
// refused (device busy) or would not stop.
bool StopLevels(const json& levels, std::string* error) {
  for (const json& level : levels) {
    const pid_t pid = level.value("pid", 0);
    const std::string name = level.value("name", std::string());
    const std::string dev = "/dev/mapper/" + name;
    if (!Alive(pid)) {
      // Its daemon died (killed): the kernel fails the device's I/O; what is
      // left are the devices themselves, removed here (loops go with them).
      for (const std::string& n : {name, name + "-store", name + "-base"}) {
        bool busy = false;
        if (!dmcowd::dm::Exists(n)) continue;
        dmcow::Status s = dmcowd::dm::Remove(n, &busy);
        if (!s.ok()) {
          *error = busy ? "/dev/mapper/" + n + " (its daemon died) is in use; close it first" : s.ToString();
          return false;
        }
      }
      continue;
    }
    // An open or mounted device cannot be removed: say so instead of waiting.
    const int fd = ::open(dev.c_str(), O_RDONLY | O_EXCL | O_CLOEXEC);
    if (fd < 0 && errno == EBUSY) {
      *error = dev + " is in use (mounted or open); unmount or close it first";
      return false;
    }
    if (fd >= 0) ::close(fd);
    ::kill(pid, SIGTERM);
    if (!WaitGone(pid, 120)) {
      *error = "dmcowd " + std::to_string(pid) + " serving " + dev + " did not stop";
      return false;
    }
  }
  return true;
}

int Attach(int argc, char** argv) {
  std::string name, scratch_max;
  bool read_only = false;
  static const option kLong[] = {{"name", required_argument, nullptr, 'n'},
                                 {"read-only", no_argument, nullptr, 'r'},
                                 {"scratch-max", required_argument, nullptr, 's'},
                                 {nullptr, 0, nullptr, 0}};
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "+n:r", kLong, nullptr)) != -1) {
    uint64_t bytes;
    if (c == 'n') name = optarg;
    else if (c == 'r') read_only = true;
    else if (c == 's' && dmcowd::ParseSizeArg(optarg, &bytes)) scratch_max = std::to_string(bytes);
    else if (c == 's') return Fail(std::string("bad --scratch-max ") + optarg + " (a size: 512M, 2G, 0 for no limit)", 2);
    else return Fail("usage: dmcow-qcow attach [--name NAME] [--read-only] [--scratch-max SIZE] IMAGE", 2);
  }
  if (optind + 1 != argc) return Fail("usage: dmcow-qcow attach [--name NAME] [--read-only] [--scratch-max SIZE] IMAGE", 2);
  const std::string image = AbsPath(argv[optind]);
  if (name.empty()) name = DefaultName(image);
  if (!ValidName(name)) return Fail("name '" + name + "': 1-28 characters of A-Z a-z 0-9 _ . -", 2);

  // The chain, top first, as the engine resolves it.
  std::vector<std::pair<std::string, std::string>> chain;  // (path, format)
  {
    dmcow::OpenOptions o;
    std::unique_ptr<dmcow::Image> top;
    dmcow::Status s = dmcow::OpenImage(image, o, &top);
    if (!s.ok()) return Fail(s.ToString());
    for (dmcow::Image* i = top.get(); i; i = i->backing()) chain.emplace_back(AbsPath(i->filename()), i->info().format);
  }
  auto served = [](const std::string& format) { return format == "qcow2" || format == "qcow"; };
  if (!served(chain[0].second)) {
    return Fail(image + ": is " + chain[0].second + "; attach serves qcow2 and qcow images (qemu-img convert -O qcow2 first)");
  }
  for (size_t i = 1; i < chain.size(); i++) {
    if (!served(chain[i].second) && !(chain[i].second == "raw" && i + 1 == chain.size())) {
      return Fail(chain[i].first + ": backing images must be qcow2 or qcow (or a raw file at the bottom), not " +
                  chain[i].second);
    }
  }
  ::mkdir(kStateDir, 0755);
  json state;
  if (ReadState(name, &state) && Alive(state["levels"][0].value("pid", 0))) {
    return Fail(name + " is attached already (" + state.value("image", std::string()) + ")");
  }

  // Deepest qcow2 first; each level's base is the level below.
  const std::string daemon = FindDaemon();
  size_t qcow2_levels = chain.size();
  if (chain.back().second == "raw") qcow2_levels--;
  json levels = json::array();
  std::string below;  // base of the next level up: a device, or the raw file
  if (qcow2_levels < chain.size()) below = chain.back().first;
  for (size_t i = qcow2_levels; i-- > 0;) {
    const std::string level_name = i == 0 ? name : name + "-b" + std::to_string(i);
    std::vector<std::string> args = {daemon, "--plugin", "qcow2", "--name", level_name, "--opt", "name=" + level_name,
                                     "--ready-fd", "3"};
    if (std::getenv("DMCOW_QCOW_VERBOSE")) args.push_back("-v");
    if (i > 0 || read_only) args.insert(args.end(), {"--opt", "read_only=1"});
    if (!below.empty()) args.insert(args.end(), {"--opt", "backing=" + below});
    if (!scratch_max.empty()) args.insert(args.end(), {"--opt", "scratch_max=" + scratch_max});
    args.push_back(chain[i].first);
    pid_t pid = 0;
    std::string error;
    if (!StartDaemon(args, &pid, &error)) {
      std::string ignored;
      StopLevels(levels, &ignored);
      return Fail("attaching " + chain[i].first + ": " + error);
    }
    levels.insert(levels.begin(), json{{"name", level_name}, {"pid", pid}, {"image", chain[i].first}});
    below = "/dev/mapper/" + level_name;
  }
  const std::string device = "/dev/mapper/" + name;
  if (read_only) {
    const int fd = ::open(device.c_str(), O_RDONLY | O_CLOEXEC);
    int on = 1;
    if (fd < 0 || ::ioctl(fd, BLKROSET, &on) != 0) std::fprintf(stderr, "dmcow-qcow: warning: %s: BLKROSET: %s\n", device.c_str(), std::strerror(errno));
    if (fd >= 0) ::close(fd);
  }
  state = json{{"name", name}, {"image", image}, {"device", device}, {"read_only", read_only}, {"levels", levels}};
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
  dmcowd::dm::Init();
  if (argc != 2) return Fail("usage: dmcow-qcow detach NAME", 2);
  const std::string name = argv[1];
  if (!ValidName(name)) return Fail("name '" + name + "' is not valid", 2);
  json state;
  if (!ReadState(name, &state)) return Fail(name + ": not attached (no " + StatePath(name) + ")");
  std::string error;
  if (!StopLevels(state["levels"], &error)) return Fail(error);
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
      json st;
      if (!ReadState(f.substr(0, f.size() - 5), &st)) continue;
      const pid_t pid = st["levels"].empty() ? 0 : st["levels"][0].value("pid", 0);
      struct stat sb;
      const bool dev = ::stat(st.value("device", std::string()).c_str(), &sb) == 0;
      st["pid"] = pid;
      st["state"] = Alive(pid) && dev ? "attached" : "stale (daemon gone)";
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
  for (const json& st : all) {
    std::printf("%-20s %-8d %-8s %-24s %s (%s)\n", st.value("name", std::string()).c_str(), st.value("pid", 0),
                st.value("read_only", false) ? "ro" : "rw", st.value("device", std::string()).c_str(),
                st.value("image", std::string()).c_str(), st.value("state", std::string()).c_str());
  }
  return 0;
}

void Help() {
  std::printf(
      "usage: dmcow-qcow attach [--name NAME] [--read-only] IMAGE\n"
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
      "image attached read-write. --read-only attaches without ever writing the image\n"
      "(it may belong to someone else); the device is then read-only.\n"
      "Compressed and partly allocated clusters are decompressed once into an unlinked\n"
      "scratch file (in the image's directory, else /var/tmp) and read from there;\n"
      "--scratch-max bounds it per level (default 1G, 0: no bound): past it the oldest\n"
      "copies are dropped, under a brief suspend of the device, and decompressed again\n"
      "when read again.\n"
      "detach flushes, removes the devices, stops their daemons and leaves the image\n"
      "clean (qemu-img check: no errors, no leaks). It refuses while the device is open.\n"
      "list shows what is attached: name, daemon pid, mode, device, image, state.\n"
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
