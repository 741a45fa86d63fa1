// The daemons of an attachment: one dmcowd per level of the chain, started
// deepest first and stopped top first.
#ifndef DMCOWD_ATTACH_LEVELS_H_
#define DMCOWD_ATTACH_LEVELS_H_

#include <sys/types.h>

#include <string>
#include <vector>

#include "attach_state.h"

namespace dmcowd {

// Starts dmcowd (`args`, argv[0] first) and waits until it reports the
// device usable, and where udev runs, until udev's rules for it ran. On
// failure, *error holds what the daemon said. The daemon inherits `fds` as
// 4, 5...
bool StartDaemon(const std::vector<std::string>& args, const std::vector<int>& fds, pid_t* pid, std::string* error);

// Stops the levels' daemons in the given order (top first); each flushes
// and removes its devices. What a dead daemon left is removed without
// signalling anything. Fails, saying why, if a device is in use, a daemon
// does not stop, or a recorded pid cannot be confirmed as its daemon (then
// nothing is signalled).
bool StopLevels(const std::vector<Level>& levels, std::string* error);

}  // namespace dmcowd

#endif  // DMCOWD_ATTACH_LEVELS_H_
