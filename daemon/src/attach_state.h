// The record of an attachment, /run/dmcow-qcow/NAME.json, written by
// dmcow-qcow attach and read by detach, list and umount: its levels (device
// and daemon of each), partition mappings and mount. A record is input: a
// damaged or edited one gives a clear error, never a signal sent to a pid
// read from garbage or the removal of a device attach did not make.
#ifndef DMCOWD_ATTACH_STATE_H_
#define DMCOWD_ATTACH_STATE_H_

#include <sys/types.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace dmcowd {

using json = nlohmann::json;

inline constexpr const char* kStateDir = "/run/dmcow-qcow";

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

enum class DaemonState {
  kRunning,      // the very process attach started
  kGone,         // exited, or its pid now belongs to another process
  kUnconfirmed,  // a process has the pid; the record cannot tell whose it is
};

// What the recorded daemon is now.
DaemonState State(const DaemonId& d);
// Waits up to `seconds` for the daemon to be gone.
bool WaitGone(const DaemonId& d, int seconds);

// One level of an attachment as recorded: its device name and its daemon.
struct Level {
  std::string name;
  DaemonId daemon;
};

std::string StatePath(const std::string& name);
// The names that have a record (NAME.json in kStateDir), in no order.
std::vector<std::string> RecordedNames();
// The record attach writes for a level it started.
json LevelRecord(const std::string& name, pid_t pid, const std::string& image);
// NAME.json: false with *error when it cannot be read or parsed; *missing
// tells whether it does not exist at all.
bool ReadState(const std::string& name, json* out, std::string* error = nullptr, bool* missing = nullptr);
// Replaces NAME.json atomically (a temporary file renamed over it).
bool WriteState(const std::string& name, const json& state);
// The levels of a record, checked field by field. Device names must be
// NAME or NAME-bN, as attach makes them.
bool ParseLevels(const std::string& name, const json& state, std::vector<Level>* levels, std::string* error);
// The partition mappings a record names, as attach names them.
bool ParsePartitions(const std::string& name, const json& state, std::vector<std::string>* names, std::string* error);

}  // namespace dmcowd

#endif  // DMCOWD_ATTACH_STATE_H_
