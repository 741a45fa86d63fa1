// Device-mapper operations through libdevmapper, without udev (the daemon
// creates /dev/mapper nodes itself, as `dmsetup --noudevsync` does).
// Errors carry libdevmapper's last message.
//
// Thread safety: call from one thread (libdevmapper keeps global state).
#ifndef DMCOWD_DM_H_
#define DMCOWD_DM_H_

#include <cstdint>
#include <string>
#include <vector>

#include "dmcow/status.h"
#include "table.h"

namespace dmcowd::dm {

using dmcow::Status;

// Routes libdevmapper's messages to our log; disables udev sync.
void Init();

bool Exists(const std::string& name);
// A device with no table.
Status Create(const std::string& name);
// Loads `segments` as the inactive table.
Status Load(const std::string& name, const std::vector<Segment>& segments, const TableDevices& devices);
// A plain table (linear, zero...) for helper devices.
struct Target {
  uint64_t start = 0, len = 0;  // sectors
  std::string type, params;
};
Status LoadTargets(const std::string& name, const std::vector<Target>& targets);
// noflush + skip lockfs: does not wait for I/O held for the daemon.
Status Suspend(const std::string& name);
Status Resume(const std::string& name);
// *busy tells whether it failed because the device is open.
Status Remove(const std::string& name, bool* busy);

}  // namespace dmcowd::dm

#endif  // DMCOWD_DM_H_
