// convert --bitmaps: copying a qcow2 source's persistent dirty bitmaps into
// the target, as qemu-img 7.2's convert_check_bitmaps and
// convert_copy_bitmaps do, through the engine's Image::ChangeBitmap.
#ifndef DMCOW_CLI_CONVERT_BITMAPS_H_
#define DMCOW_CLI_CONVERT_BITMAPS_H_

#include <string>

#include "dmcow/image.h"

namespace dmcow::cli {

// Before the target is made: the source must hold bitmaps (qcow2 version 3)
// and, unless `skip_broken`, none in use. Prints qemu-img's message and
// returns false otherwise.
bool CheckSourceBitmaps(const Image& source, bool skip_broken);

// Before the copy: the target (as opened) can hold bitmaps; else qemu-img's
// message, false.
bool CheckTargetTakesBitmaps(const Image& target);

// After the copy, with the target closed: every consistent bitmap of
// `source` added to the target at `target_path` (opened through `env`) with
// its granularity, enabled or disabled as in the source, and its bits;
// those in use are skipped with qemu-img's warning (CheckSourceBitmaps
// refused them unless `skip_broken`). `target_had` lists the bitmaps the
// target held before (convert -n): a name among them is qemu-img's
// "already exists" failure. Prints qemu-img's messages; false on failure.
bool CopyBitmaps(Image* source, const std::string& target_path, Env* env, const std::vector<BitmapInfo>& target_had);

}  // namespace dmcow::cli

#endif  // DMCOW_CLI_CONVERT_BITMAPS_H_
