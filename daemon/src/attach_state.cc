#include "attach_state.h"

#include <dirent.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "partition_table.h"

namespace dmcowd {

namespace {

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

}  // namespace

DaemonState State(const DaemonId& d) {
  if (!Alive(d.pid)) return DaemonState::kGone;
  if (d.start_time.empty()) return DaemonState::kUnconfirmed;
  std::string now;
  if (!StartTime(d.pid, &now)) return Alive(d.pid) ? DaemonState::kUnconfirmed : DaemonState::kGone;
  if (now != d.start_time) return DaemonState::kGone;
  if (!d.boot_id.empty() && d.boot_id != BootId()) return DaemonState::kGone;
  return DaemonState::kRunning;
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

json LevelRecord(const std::string& name, pid_t pid, const std::string& image) {
  json level = {{"name", name}, {"pid", pid}, {"image", image}};
  std::string start_time;
  if (StartTime(pid, &start_time)) {
    level["start_time"] = start_time;
    level["boot_id"] = BootId();
  }
  return level;
}

bool ReadState(const std::string& name, json* out, std::string* error, bool* missing) {
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

std::vector<std::string> RecordedNames() {
  std::vector<std::string> names;
  DIR* d = ::opendir(kStateDir);
  if (!d) return names;
  while (dirent* e = ::readdir(d)) {
    const std::string f = e->d_name;
    if (f.size() > 5 && f.compare(f.size() - 5, 5, ".json") == 0) names.push_back(f.substr(0, f.size() - 5));
  }
  ::closedir(d);
  return names;
}

bool WriteState(const std::string& name, const json& state) {
  const std::string tmp = StatePath(name) + ".tmp";
  std::ofstream out(tmp);
  out << state.dump(2) << "\n";
  out.close();
  return out && ::rename(tmp.c_str(), StatePath(name).c_str()) == 0;
}

}  // namespace dmcowd
