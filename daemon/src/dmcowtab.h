// /etc/dmcowtab: the images to attach at boot, one per line, in the spirit
// of /etc/crypttab and /etc/nbdtab (dmcowtab(5)):
//
//   # NAME   IMAGE                         OPTIONS
//   vm0      /var/lib/images/vm0.qcow2     read-only,no-partitions
//   web      /srv/web.qcow2                key-file=/etc/dmcow/web.key
//
// NAME is the device name (/dev/mapper/NAME, and the instance of the unit
// dmcow-qcow@NAME.service), IMAGE an absolute path (\040 for a blank, as in
// fstab), OPTIONS attach's long options without their dashes, separated by
// commas ("-" or "defaults": none). `dmcow-qcow attach --tab NAME` attaches
// NAME's line.
#ifndef DMCOWD_DMCOWTAB_H_
#define DMCOWD_DMCOWTAB_H_

#include <string>
#include <vector>

#include "dmcow/status.h"

namespace dmcowd {

inline constexpr const char* kDmcowtab = "/etc/dmcowtab";

struct TabEntry {
  std::string image;
  std::vector<std::string> attach_args;  // "--read-only", "--key-file", "FILE"...
  int line = 0;
};

// NAME's line of the table at `path`, its options as attach's arguments.
// Errors name the file and the line: NAME missing or twice, a relative
// image path, an unknown option, a value missing or given to a flag. Other
// lines are not judged: one bad line does not keep the rest from attaching.
dmcow::Status FindTabEntry(const std::string& path, const std::string& name, TabEntry* out);

// fstab's escapes, which /proc/self/mountinfo uses too: \ooo (three octal
// digits, not 0) stands for that byte. False on a malformed escape.
bool UnescapeOctal(const std::string& field, std::string* out);

}  // namespace dmcowd

#endif  // DMCOWD_DMCOWTAB_H_
