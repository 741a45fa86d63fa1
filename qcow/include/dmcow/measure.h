// Image measurement: how large a file `qemu-img create` or `convert` would
// make for the given creation options, empty or holding another image's
// content (QEMU 7.2's qcow2_measure in block/qcow2.c, raw_measure in
// block/raw-format.c), for `dmcow-img measure`.
//
// Thread safety: MeasureImage reads `source` (Image's rules apply) and
// nothing else.
#ifndef DMCOW_MEASURE_H_
#define DMCOW_MEASURE_H_

#include <cstdint>

#include "dmcow/create.h"
#include "dmcow/image.h"
#include "dmcow/status.h"

namespace dmcow {

struct MeasureResult {
  // File size for the content: the data clusters a copy writes plus all
  // the metadata a fully allocated image has (an upper bound, as QEMU's).
  uint64_t required = 0;
  uint64_t fully_allocated = 0;  // every cluster of the virtual disk allocated
  // qcow2 v3 output from a qcow2 v3 source: the bytes its persistent
  // bitmaps would take (bits, bitmap tables, directory), as if all set.
  bool has_bitmaps = false;
  uint64_t bitmaps = 0;
};

// `options.format` "qcow2" or "raw"; other formats are InvalidArgument,
// with QEMU's "does not support size measurement" for those QEMU knows
// (the luks format, which QEMU measures, is not made by dmcow; qcow2 with LUKS encryption is). With `source` null the
// image is empty, of `options.size` bytes; else it holds source's content
// (its whole backing chain, zeros not counted) and options.size is not
// used. Options are checked with qemu-img measure's messages (which differ
// from create's: compat is "0.10" or "1.1" only).
Status MeasureImage(const CreateOptions& options, Image* source, MeasureResult* out);

}  // namespace dmcow

#endif  // DMCOW_MEASURE_H_
