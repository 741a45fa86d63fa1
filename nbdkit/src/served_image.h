// ServedImage: one image (and its backing chain) served to every NBD
// connection of an nbdkit process (the dmcow plugin, nbdkit_plugin.cc).
//
// The image is opened once, before nbdkit serves, through the same door as
// dmcow-qcow attach (daemon/src/chain_files.h): each file of the chain is
// opened once, type-checked first (no FIFO, device or directory an image
// names is ever opened), loops and json:/foreign backing names refused, and
// the engine then reads only those descriptors. QEMU's image locks are taken
// on them as qemu-nbd takes them: the image read-write (or read-only), every
// backing file read-only. So a running QEMU that writes the image and this
// server refuse each other.
//
// All connections share the one engine Image: what one connection wrote is
// what the others read, and a flush on any connection makes every write
// acknowledged before it durable (the engine's rule 5, qcow2_write.cc). That
// is what NBD's multi-conn promise needs. The engine serialises writers and
// lets readers run in parallel (its rw lock), so nbdkit's PARALLEL thread
// model is safe.
//
// Thread safety: every method may be called from any thread once Open
// returned.
#ifndef DMCOW_NBDKIT_SERVED_IMAGE_H_
#define DMCOW_NBDKIT_SERVED_IMAGE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "chain_files.h"
#include "dmcow/image.h"
#include "dmcow/image_lock.h"
#include "dmcow/status.h"

namespace dmcow_nbdkit {

using dmcow::Status;

struct ServeOptions {
  std::string path;    // the image
  std::string format;  // "raw", "qcow", "qcow2"; empty: probed as QEMU probes
  bool read_only = false;
  bool no_backing = false;  // backing=null: unallocated ranges read as zeros
  std::string snapshot;     // an internal snapshot, served read-only
};

// NBD block status flags of a run (NBD_STATE_HOLE, NBD_STATE_ZERO).
constexpr uint32_t kExtentHole = 1;
constexpr uint32_t kExtentZero = 2;

class ServedImage {
 public:
  static Status Open(const ServeOptions& options, std::unique_ptr<ServedImage>* out);
  ~ServedImage();

  uint64_t size() const { return image_->virtual_size(); }
  bool writable() const { return writable_; }
  // "qcow2 v3, 64 KiB clusters, backing base.qcow2 (qcow2)": what the
  // client's tools (nbdinfo) show.
  const std::string& description() const { return description_; }
  // NBD block size constraints: the minimum (512 unless the size is not a
  // multiple of it), the preferred (the cluster size, at least 4 KiB, at
  // most 32 MiB).
  uint32_t minimum_block() const;
  uint32_t preferred_block() const;
  // Whether zeroing is metadata only (qcow2 v3 zero clusters, raw holes):
  // NBD's fast-zero asks to fail rather than write zeros.
  bool fast_zero() const { return fast_zero_; }

  Status Read(uint64_t offset, void* buf, uint32_t len);
  // `fua`: durable before returning (a flush of everything: the engine has
  // no narrower one, and it is what QEMU's nbd server does on qcow2).
  Status Write(uint64_t offset, const void* buf, uint32_t len, bool fua);
  Status Flush();
  Status Trim(uint64_t offset, uint32_t len, bool fua);
  // `may_trim`: the range may be deallocated; `fast`: NotSupported unless
  // zeroing is metadata only.
  Status Zero(uint64_t offset, uint32_t len, bool may_trim, bool fast, bool fua);
  // Calls add(offset, length, flags) for the runs from `offset`, at least
  // one, as far as `len` (just one with `one`), as the whole chain reads.
  Status Extents(uint64_t offset, uint32_t len, bool one,
                 const std::function<Status(uint64_t, uint64_t, uint32_t)>& add);

 private:
  ServedImage() = default;

  dmcowd::FdEnv files_;  // outlives image_, which reads through it
  std::vector<std::unique_ptr<dmcow::ImageLock>> locks_;
  std::unique_ptr<dmcow::Image> image_;
  bool writable_ = false;
  bool fast_zero_ = false;
  std::string description_;
};

}  // namespace dmcow_nbdkit

#endif  // DMCOW_NBDKIT_SERVED_IMAGE_H_
