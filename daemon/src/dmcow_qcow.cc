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
#include <fcntl.h>
#include <getopt.h>
#include <linux/fs.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "attach_keys.h"
#include "attach_levels.h"
#include "attach_state.h"
#include "chain_files.h"
#include "dm.h"
#include "dmcow/image.h"
#include "dmcowtab.h"
#include "partition_maps.h"
#include "partition_table.h"
#include "qcow_commands.h"
#include "size_arg.h"

namespace dmcow_qcow {

using dmcowd::DaemonState;
using dmcowd::kStateDir;
using dmcowd::Level;
using dmcowd::LevelRecord;
using dmcowd::ParseLevels;
using dmcowd::ParsePartitions;
using dmcowd::ReadState;
using dmcowd::StartDaemon;
using dmcowd::StatePath;
using dmcowd::StopLevels;

const char* const kUuidPrefix = "DMCOW-QCOW-";

int Fail(const std::string& msg, int code) {
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

const char* const kAttachUsage =
    "usage: dmcow-qcow attach [--name NAME] [--read-only] [--no-backing] [--allow-device-backing]\n"
    "                         [--scratch-max SIZE] [--key-file [N=]FILE]... [--no-partitions] IMAGE\n"
    "       dmcow-qcow attach --tab NAME";

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

int ParseAttach(int argc, char** argv, const char* usage, AttachRequest* req, uint32_t* partition,
                std::vector<std::string>* positional) {
  req->policy.real_image_name = true;
  enum { kNoBacking = 1000, kAllowDeviceBacking, kKeyFile, kNoPartitions, kPartition };
  static const option kLong[] = {{"name", required_argument, nullptr, 'n'},
                                 {"read-only", no_argument, nullptr, 'r'},
                                 {"scratch-max", required_argument, nullptr, 's'},
                                 {"no-backing", no_argument, nullptr, kNoBacking},
                                 {"allow-device-backing", no_argument, nullptr, kAllowDeviceBacking},
                                 {"key-file", required_argument, nullptr, kKeyFile},
                                 {"no-partitions", no_argument, nullptr, kNoPartitions},
                                 {"partition", required_argument, nullptr, kPartition},
                                 {nullptr, 0, nullptr, 0}};
  int c;
  optind = 1;
  opterr = 0;
  while ((c = getopt_long(argc, argv, "+n:r", kLong, nullptr)) != -1) {
    uint64_t bytes;
    if (c == 'n')
      req->name = optarg;
    else if (c == 'r')
      req->read_only = true;
    else if (c == kNoBacking)
      req->policy.follow_backing = false;
    else if (c == kAllowDeviceBacking)
      req->policy.allow_device_backing = true;
    else if (c == kNoPartitions)
      req->partitions = false;
    else if (c == kPartition && partition) {
      char* end = nullptr;
      errno = 0;
      const unsigned long n = std::strtoul(optarg, &end, 10);
      if (!std::isdigit(static_cast<unsigned char>(optarg[0])) || *end || errno || n < 1 ||
          n > dmcowd::kMaxPartitions) {
        return Fail(std::string("bad --partition ") + optarg + " (a partition number, 1 to " +
                        std::to_string(dmcowd::kMaxPartitions) + ")",
                    2);
      }
      *partition = static_cast<uint32_t>(n);
    } else if (c == kKeyFile) {
      if (dmcow::Status s = req->keys.AddKeyFile(optarg); !s.ok()) return Fail(s.ToString(), 2);
    } else if (c == 's' && dmcowd::ParseSizeArg(optarg, &bytes))
      req->scratch_max = std::to_string(bytes);
    else if (c == 's')
      return Fail(std::string("bad --scratch-max ") + optarg + " (a size: 512M, 2G, 0 for no limit)", 2);
    else
      return Fail(usage, 2);
  }
  positional->assign(argv + optind, argv + argc);
  if (!req->name.empty() && !ValidName(req->name)) {
    return Fail("name '" + req->name + "': 1-28 characters of A-Z a-z 0-9 _ . -", 2);
  }
  req->policy.writable = !req->read_only;
  return 0;
}

int AttachImage(AttachRequest& req, json* recorded) {
  dmcowd::ChainPolicy& policy = req.policy;
  const bool read_only = req.read_only;
  std::string& name = req.name;
  dmcowd::KeySet& keys = req.keys;
  // The chain, top first: each file opened once, here, and only what may be
  // followed (chain_files.h); the daemons get these descriptors.
  std::vector<dmcowd::ChainFile> chain;
  if (dmcow::Status s = dmcowd::OpenChain(req.image, policy, &chain); !s.ok()) return Fail(s.ToString());
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
    // The top device is the one people use; udev leaves the levels below alone.
    if (i == 0) args.insert(args.end(), {"--uuid", kUuidPrefix + name});
    if (i > 0) args.push_back("--udev-private");
    if (i > 0 || read_only) args.insert(args.end(), {"--opt", "read_only=1"});
    if (!policy.follow_backing) args.insert(args.end(), {"--opt", "no_backing=1"});
    if (!below.empty()) args.insert(args.end(), {"--opt", "backing=" + below});
    if (!req.scratch_max.empty()) args.insert(args.end(), {"--opt", "scratch_max=" + req.scratch_max});
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
  if (req.partitions) {
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
                                   {"sectors", m.sectors},
                                   {"extended", m.extended}});
    }
  }
  state = json{{"name", name},
               {"image", image},
               {"device", device},
               {"uuid", kUuidPrefix + name},
               {"read_only", read_only},
               {"levels", levels},
               {"partitions", partition_records}};
  if (!dmcowd::WriteState(name, state)) {
    std::fprintf(stderr, "dmcow-qcow: warning: cannot record %s in %s\n", name.c_str(), kStateDir);
  }
  *recorded = state;
  return 0;
}

int Attach(int argc, char** argv);

// attach --tab NAME: NAME's line of /etc/dmcowtab ($DMCOWTAB) as attach's options.
int AttachFromTab(const std::string& name) {
  const char* env = std::getenv("DMCOWTAB");
  const std::string path = env && *env ? env : dmcowd::kDmcowtab;
  dmcowd::TabEntry entry;
  if (dmcow::Status s = dmcowd::FindTabEntry(path, name, &entry); !s.ok()) return Fail(s.message());
  std::vector<std::string> args = {"attach", "--name", name};
  args.insert(args.end(), entry.attach_args.begin(), entry.attach_args.end());
  args.push_back(entry.image);
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  return Attach(static_cast<int>(args.size()), argv.data());
}

int Attach(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "--tab") {
    if (argc != 3) return Fail(kAttachUsage, 2);
    return AttachFromTab(argv[2]);
  }
  AttachRequest req;
  std::vector<std::string> positional;
  if (int rc = ParseAttach(argc, argv, kAttachUsage, &req, nullptr, &positional); rc != 0) return rc;
  if (positional.size() != 1) return Fail(kAttachUsage, 2);
  req.image = positional[0];
  json state;
  if (int rc = AttachImage(req, &state); rc != 0) return rc;
  std::printf("%s\n", state["device"].get<std::string>().c_str());
  return 0;
}

int Detach(int argc, char** argv) {
  if (argc != 2) return Fail("usage: dmcow-qcow detach NAME", 2);
  return DetachName(argv[1]);
}

int DetachName(const std::string& name) {
  dmcowd::dm::InitSyncedWithUdev();
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
  for (const std::string& name : dmcowd::RecordedNames()) {
    json st;
    std::string error;
    std::vector<Level> levels;
    if (!ReadState(name, &st, &error) || !ParseLevels(name, st, &levels, &error)) {
      all.push_back(json{{"name", name}, {"pid", 0}, {"state", "damaged state file: " + error}});
      continue;
    }
    // What detach would find: the daemon attach started, or not.
    struct stat sb;
    const bool dev =
        st.contains("device") && st["device"].is_string() && ::stat(st["device"].get<std::string>().c_str(), &sb) == 0;
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
    std::string state = str(st, "state");
    if (st.contains("mount") && st["mount"].is_object() && st["mount"].value("dir", json()).is_string()) {
      state += ", mounted on " + st["mount"]["dir"].get<std::string>();
    }
    std::printf("%-20s %-8d %-8s %-24s %s (%s)\n", str(st, "name").c_str(), st["pid"].get<int>(), ro ? "ro" : "rw",
                str(st, "device").c_str(), str(st, "image").c_str(), state.c_str());
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
      "       dmcow-qcow attach --tab NAME\n"
      "       dmcow-qcow detach NAME\n"
      "       dmcow-qcow list [--output human|json]\n"
      "       dmcow-qcow mount [--partition N] [--read-only] [attach options] IMAGE DIR\n"
      "       dmcow-qcow umount DIR\n"
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
      "attach --tab NAME attaches what NAME's line of /etc/dmcowtab says (NAME IMAGE\n"
      "OPTIONS: attach's long options without dashes, comma-separated; dmcowtab(5));\n"
      "the unit dmcow-qcow@NAME.service runs it at boot, and detach NAME at shutdown.\n"
      "\n"
      "mount attaches IMAGE (with any attach option) and mounts a file system of it on\n"
      "DIR: partition N, else its only partition, else the whole device (several\n"
      "partitions: say which); --read-only mounts read-only. If the mount fails, the\n"
      "image is detached again. umount DIR unmounts what mount mounted there (only if\n"
      "it is still that device's file system) and detaches the image.\n"
      "\n"
      "Needs root (device-mapper, loop devices) and the dm-cow kernel module. Each level\n"
      "is served by a dmcowd process (found next to dmcow-qcow, or $DMCOWD), logging to\n"
      "syslog once the device is up (DMCOW_QCOW_VERBOSE=1: debug messages). State:\n"
      "%s/NAME.json.\n",
      kStateDir);
}

}  // namespace dmcow_qcow

int main(int argc, char** argv) {
  using namespace dmcow_qcow;
  signal(SIGPIPE, SIG_IGN);
  if (argc < 2) {
    Help();
    return 2;
  }
  const std::string cmd = argv[1];
  if (cmd == "attach") return Attach(argc - 1, argv + 1);
  if (cmd == "detach") return Detach(argc - 1, argv + 1);
  if (cmd == "list") return List(argc - 1, argv + 1);
  if (cmd == "mount") return Mount(argc - 1, argv + 1);
  if (cmd == "umount") return Umount(argc - 1, argv + 1);
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    Help();
    return 0;
  }
  return Fail("unknown command '" + cmd + "' (attach, detach, list, mount, umount)", 2);
}
