// Device-mapper operations through libdevmapper. The daemon creates
// /dev/mapper nodes itself, as `dmsetup --noudevsync` does, so that its
// table reloads never wait on udev; only a device's first activation (its
// cookie handed to dmcow-qcow) and dmcow-qcow's partition mappings are
// waited for, where udev runs, until udev's rules finish (libdevmapper's
// udev cookie), so that /dev/disk/by-* links exist when attach returns.
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
// Init, but with udev sync where udev runs (dmcow-qcow's partition mappings).
void InitSyncedWithUdev();

bool Exists(const std::string& name);
// A device with no table; `uuid` may be empty.
Status Create(const std::string& name, const std::string& uuid = "");
// Loads `segments` as the inactive table.
Status Load(const std::string& name, const std::vector<Segment>& segments, const TableDevices& devices);
// A plain table (linear, zero...) for helper devices.
struct Target {
  uint64_t start = 0, len = 0;  // sectors
  std::string type, params;
};
Status LoadTargets(const std::string& name, const std::vector<Target>& targets);
// A device created, loaded and activated in one step (as kpartx makes its
// mappings), waiting for udev where it is synced (InitSyncedWithUdev).
Status CreateActive(const std::string& name, const std::string& uuid, const std::vector<Target>& targets,
                    bool read_only);
struct Info {
  std::string uuid;    // "" if it has none
  int open_count = 0;  // openers, mappings over it included
  uint32_t major = 0, minor = 0;
};
// NotFound if there is no such device.
Status GetInfo(const std::string& name, Info* info);
// noflush + skip lockfs: does not wait for I/O held for the daemon.
Status Suspend(const std::string& name);
// What udev's rules do with a device's events (carried as udev flags, with
// or without udev sync). kNoDisk: a device for our own use (backing levels,
// helper devices): no /dev/disk links, no blkid and no other scanner, as
// LVM marks its private devices, so that a file system's by-uuid or
// by-label link never points at a backing image's copy of it.
enum class UdevRules { kAll, kNoDisk };
// The DM_UDEV_* flags a resume carries for `rules`.
uint16_t UdevFlags(UdevRules rules);
// udev_cookie: where udev runs, the resume carries a udev cookie, returned
// in *udev_cookie (0 elsewhere) for WaitForUdev, in this process or another
// (the daemon cannot wait itself: udev's rules read the device, which it
// serves only once it has started).
Status Resume(const std::string& name, UdevRules rules, uint32_t* udev_cookie = nullptr);
// Returns once udev's rules for the cookie's event ran (at once for 0).
// Needs InitSyncedWithUdev.
void WaitForUdev(uint32_t cookie);
// *busy tells whether it failed because the device is open.
Status Remove(const std::string& name, bool* busy);

}  // namespace dmcowd::dm

#endif  // DMCOWD_DM_H_
