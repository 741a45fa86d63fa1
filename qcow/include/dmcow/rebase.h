// Rebase: gives an image another backing file without changing what the
// guest reads (qemu-img rebase in its safe mode).
#ifndef DMCOW_REBASE_H_
#define DMCOW_REBASE_H_

#include <functional>
#include <string>

#include "dmcow/image.h"
#include "dmcow/status.h"

namespace dmcow {

struct RebaseOptions {
  std::string backing;         // the name to record (Image::ChangeBackingFile); empty: no backing file
  std::string backing_format;  // recorded with it; may be empty
  // The new backing chain, opened read-only; its content is what the image
  // will read through. nullptr: none (unallocated ranges will read as zeros).
  Image* new_backing = nullptr;
  // Called once per range compared, as qemu-img rebase advances -p.
  std::function<void()> on_range;
};

// `image`, open for writing through its current backing chain, first gets,
// in every range it does not allocate, the 512-byte sectors whose content
// differs between its current backing chain and `new_backing` (qemu-img
// 7.2's compare_buffers: ranges of at most 2 MiB, cut where this layer's
// allocation changes and where either backing image ends; beyond a backing
// image's end it reads zeros). Those sectors are written with the current
// content, so the guest still reads it. Then the header records the new
// backing file (Image::ChangeBackingFile, which makes the copies durable
// first: a crash leaves the old or the new backing file named, and the same
// guest content either way).
Status Rebase(Image* image, const RebaseOptions& options);

}  // namespace dmcow

#endif  // DMCOW_REBASE_H_
