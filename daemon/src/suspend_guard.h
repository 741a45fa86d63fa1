// SuspendGuard: a device dmcowd suspended must not stay suspended when
// dmcowd dies.
//
// A reload or reclaim suspends the device for a few milliseconds. If dmcowd
// is killed in that window (SIGKILL, the OOM killer), nobody resumes it:
// device-mapper holds every I/O to the device, and every writer sleeps
// uninterruptibly, for good (seen: daemon_killed_repeatedly in CI, the
// suite stuck for 7 minutes). docs/abi.md promises that no I/O waits for a
// dead daemon; a suspended device would break that promise.
//
// So a small process is forked, early (before images are opened and caches
// filled: it keeps a copy of our memory as it was), that holds nothing but
// the read end of a pipe whose write end only dmcowd holds; once the device
// exists, its number is sent down the pipe. When the
// pipe closes, dmcowd has gone (every thread of it: the kernel closes the
// descriptors last, after any ioctl in progress returned). If the device is
// still the one dmcowd made (same device number) and is suspended, the
// guard resumes it: without a daemon, I/O held for it fails with EIO at
// once and the rest is served as mapped (abi.md section 7). An inactive
// table left by a reload cut short goes live with the resume; it is the
// table that reload would have resumed, built from durable metadata only.
// The guard says what it did in the kernel log (/dev/kmsg), since dmcowd's
// own log may be gone.
//
// Thread safety: Start, Watch and Stop from one thread. The child uses only
// async-signal-safe calls (the parent may have threads).
#ifndef DMCOWD_SUSPEND_GUARD_H_
#define DMCOWD_SUSPEND_GUARD_H_

#include <sys/types.h>

#include <string>

#include "dmcow/status.h"

namespace dmcowd {

using dmcow::Status;

class SuspendGuard {
 public:
  SuspendGuard() = default;
  SuspendGuard(const SuspendGuard&) = delete;
  SuspendGuard& operator=(const SuspendGuard&) = delete;
  ~SuspendGuard() { Stop(); }

  // Forks the guard of /dev/mapper/`name` (by `uuid` where not empty), to
  // be made later. `udev_flags`: the DM_UDEV_* flags dmcowd's own resumes
  // carry. Call before opening images or loading caches.
  Status Start(const std::string& name, const std::string& uuid, uint16_t udev_flags);
  // The device exists now: the guard watches it from here on.
  Status Watch();
  // Our exit is no death: the guard checks once (the device is removed or
  // running by then), exits, and is waited for.
  void Stop();

  pid_t pid() const { return pid_; }

 private:
  std::string name_, uuid_;
  pid_t pid_ = -1;
  int alive_fd_ = -1;  // the write end; closing it wakes the guard
};

}  // namespace dmcowd

#endif  // DMCOWD_SUSPEND_GUARD_H_
