// Format detection from an image's first bytes (and, for dmg, its name),
// decided as QEMU's probes decide it (block.c bdrv_probe_all and each
// driver's .bdrv_probe): one function for every open and for check.
#ifndef DMCOW_QCOW_SRC_PROBE_H_
#define DMCOW_QCOW_SRC_PROBE_H_

#include <string>

#include "dmcow/env.h"
#include "dmcow/status.h"

namespace dmcow {

// "qcow2", "qcow", "raw", or QEMU's name of a format dmcow does not read
// ("vmdk", "vdi", "vpc", "vhdx", "qed", "parallels", "luks", "dmg",
// "cloop", "bochs"): such a file is not raw, and reading its container as
// the guest's disk would be wrong.
Status ProbeImageFormat(File* file, std::string* format);

// True for the formats this engine reads: raw, qcow, qcow2.
bool IsSupportedFormat(const std::string& format);

// "<path>: unsupported image format 'vmdk'" (only -f raw reads it, as raw).
Status UnsupportedFormat(const std::string& path, const std::string& format);

}  // namespace dmcow

#endif  // DMCOW_QCOW_SRC_PROBE_H_
