// dmcow-qcow mount / umount: attach and mount a file system of the image in
// one command, and the reverse; what people otherwise script around
// qemu-nbd -c, mount, umount and qemu-nbd -d.
#include <limits.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "dmcowtab.h"
#include "qcow_commands.h"

namespace dmcow_qcow {

namespace {

const char* const kMountUsage = "usage: dmcow-qcow mount [--partition N] [--read-only] [attach options] IMAGE DIR";

// DIR resolved once: what is recorded, compared and unmounted.
bool RealDir(const std::string& dir, std::string* real) {
  char buf[PATH_MAX];
  struct stat st;
  if (!::realpath(dir.c_str(), buf)) {
    Fail(dir + ": " + std::strerror(errno));
    return false;
  }
  if (::stat(buf, &st) != 0 || !S_ISDIR(st.st_mode)) {
    Fail(dir + ": not a directory");
    return false;
  }
  *real = buf;
  return true;
}

// The attachment whose record says it is mounted on `dir`, or "".
std::string MountedOn(const std::string& dir, std::string* device) {
  for (const std::string& name : dmcowd::RecordedNames()) {
    json st;
    if (!dmcowd::ReadState(name, &st)) continue;
    const json* m = st.contains("mount") ? &st["mount"] : nullptr;
    if (m && m->is_object() && m->value("dir", json()) == dir && m->value("device", json()).is_string()) {
      *device = (*m)["device"].get<std::string>();
      return name;
    }
  }
  return "";
}

// The device number of the file system mounted last on `dir`; false if
// nothing is mounted there.
bool MountedDevice(const std::string& dir, dev_t* dev) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  bool found = false;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string id, parent, majmin, root, point, unescaped;
    if (!(f >> id >> parent >> majmin >> root >> point) || !dmcowd::UnescapeOctal(point, &unescaped) ||
        unescaped != dir) {
      continue;
    }
    unsigned ma = 0, mi = 0;
    if (std::sscanf(majmin.c_str(), "%u:%u", &ma, &mi) != 2) continue;
    *dev = makedev(ma, mi);
    found = true;  // the last line for a mount point is the one on top
  }
  return found;
}

int RunMount(const std::string& device, const std::string& dir, bool read_only) {
  const pid_t child = ::fork();
  if (child == 0) {
    if (read_only) {
      ::execlp("mount", "mount", "-o", "ro", device.c_str(), dir.c_str(), nullptr);
    } else {
      ::execlp("mount", "mount", device.c_str(), dir.c_str(), nullptr);
    }
    std::fprintf(stderr, "dmcow-qcow: cannot run mount: %s\n", std::strerror(errno));
    ::_exit(127);
  }
  int status = 0;
  if (child < 0 || ::waitpid(child, &status, 0) != child) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Which device of a fresh attachment to mount: partition `number`, else
// the only partition, else the whole device. "" (and a message) if that
// cannot be told.
std::string ChooseDevice(const json& state, uint32_t number) {
  std::vector<std::pair<uint32_t, std::string>> file_systems;
  std::string numbers;
  for (const json& p : state["partitions"]) {
    if (p.value("extended", false)) continue;
    file_systems.emplace_back(p["number"].get<uint32_t>(), p["device"].get<std::string>());
    numbers += (numbers.empty() ? "" : ", ") + std::to_string(file_systems.back().first);
  }
  const std::string image = state["image"].get<std::string>();
  if (number != 0) {
    for (const auto& [n, device] : file_systems) {
      if (n == number) return device;
    }
    Fail(image + " has no partition " + std::to_string(number) +
         (numbers.empty() ? " (no partition table)" : " (its partitions: " + numbers + ")"));
    return "";
  }
  if (file_systems.empty()) return state["device"].get<std::string>();
  if (file_systems.size() == 1) return file_systems[0].second;
  Fail(image + " has partitions " + numbers + ": say which with --partition N");
  return "";
}

}  // namespace

int Mount(int argc, char** argv) {
  AttachRequest req;
  uint32_t partition = 0;
  std::vector<std::string> positional;
  if (int rc = ParseAttach(argc, argv, kMountUsage, &req, &partition, &positional); rc != 0) return rc;
  if (positional.size() != 2) return Fail(kMountUsage, 2);
  if (partition != 0 && !req.partitions) return Fail("--partition N and --no-partitions: choose one", 2);
  std::string dir, other_device;
  if (!RealDir(positional[1], &dir)) return 1;
  if (const std::string other = MountedOn(dir, &other_device); !other.empty()) {
    return Fail(dir + ": " + other + " is mounted there already");
  }
  req.image = positional[0];
  json state;
  if (int rc = AttachImage(req, &state); rc != 0) return rc;
  const std::string name = state["name"].get<std::string>();
  const std::string device = ChooseDevice(state, partition);
  if (device.empty()) {
    DetachName(name);
    return 1;
  }
  if (const int rc = RunMount(device, dir, req.read_only); rc != 0) {
    DetachName(name);
    return Fail("mount " + device + " on " + dir + " failed (exit " + std::to_string(rc) + "); " + name +
                " detached again");
  }
  state["mount"] = {{"dir", dir}, {"device", device}};
  if (!dmcowd::WriteState(name, state)) {
    std::fprintf(stderr, "dmcow-qcow: warning: cannot record the mount in %s\n", dmcowd::StatePath(name).c_str());
  }
  return 0;
}

int Umount(int argc, char** argv) {
  if (argc != 2) return Fail("usage: dmcow-qcow umount DIR", 2);
  std::string dir, device;
  if (!RealDir(argv[1], &dir)) return 1;
  const std::string name = MountedOn(dir, &device);
  if (name.empty()) return Fail(dir + ": nothing dmcow-qcow mount mounted is there (see dmcow-qcow list)");
  // What is mounted there now must be the image's device: never unmount
  // another file system mounted over it since.
  struct stat st;
  dev_t mounted = 0;
  if (MountedDevice(dir, &mounted)) {
    if (::stat(device.c_str(), &st) != 0 || st.st_rdev != mounted) {
      return Fail(dir + ": the file system mounted there is not " + device + "'s (" + std::to_string(major(mounted)) +
                  ":" + std::to_string(minor(mounted)) + "); nothing was unmounted");
    }
    if (::umount2(dir.c_str(), 0) != 0) {
      return Fail("umount " + dir + ": " + std::strerror(errno) + (errno == EBUSY ? " (files open there?)" : ""));
    }
  }
  return DetachName(name);
}

}  // namespace dmcow_qcow
