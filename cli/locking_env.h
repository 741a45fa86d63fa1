// LockingEnv: the image locks qemu-img takes, for dmcow-img's commands.
//
// An Env that takes QEMU's lock (dmcow/image_lock.h) on every file the
// engine opens through it, on the engine's own descriptor (File::NativeFd),
// before the engine reads a byte, and holds it while the file is open. So
// what a command opens, it locks as qemu-img 7.2 does:
//   - a file opened for writing: read-write (QEMU's writable open; a file
//     being created too: the lock comes before the file is emptied, so a
//     refused create leaves the file as it was, as raw_co_create does);
//   - a file opened read-only: Policy::read_mode, read-only (consistent
//     read; write and resize not shared) or, with -U, read-only and
//     force-share;
//   - Policy::top with top_read_write: read-write even when only read
//     (qemu-img commit opens FILE read-write, -d or not).
// A second open of a file already open through this Env (same device and
// inode: commit's base, read in the chain and then written) does not lock
// against the first: the lock is raised, where the new open needs more, on
// the first open's file description, and held until the last of them closes.
//
// A refusal is Busy, worded as qemu-img words it (the caller prefixes
// "Could not open 'FILE': " where qemu-img does):
//   created file:  FILE: Failed to get "write" lock
//   any other file: Failed to get ... lock (the engine's OpenLayer adds
//   "Could not open backing file: " once per level for a backing file).
// qemu-img prints a second line, "Is another process using the image
// [FILE]?"; a Status is one line, so that hint waits in TakeHint() (the
// last refusal's, process-wide) and PrintError prints it after the error.
#ifndef DMCOW_CLI_LOCKING_ENV_H_
#define DMCOW_CLI_LOCKING_ENV_H_

#include <memory>
#include <string>

#include "dmcow/env.h"
#include "dmcow/image_lock.h"

namespace dmcow::cli {

class LockingEnv final : public Env {
 public:
  struct Policy {
    std::string top;  // the image the command names, as it was given
    ImageLock::Mode read_mode = ImageLock::Mode::kReadOnly;
    bool top_read_write = false;
  };

  // `base`: where the files come from (Env::Default()); not owned.
  LockingEnv(Env* base, Policy policy);
  ~LockingEnv() override;

  Status OpenFile(const std::string& path, OpenMode mode, std::unique_ptr<File>* file) override;
  bool FileExists(const std::string& path) override { return base_->FileExists(path); }

  // The hint of the last refusal, or ""; cleared.
  static std::string TakeHint();

  // The Policy for -U / --force-share given or not.
  static ImageLock::Mode ReadMode(bool force_share) {
    return force_share ? ImageLock::Mode::kReadOnlyShared : ImageLock::Mode::kReadOnly;
  }

 private:
  struct Shared;
  class LockedFile;

  Env* const base_;
  const Policy policy_;
  std::shared_ptr<Shared> shared_;  // also held by each open file
};

}  // namespace dmcow::cli

#endif  // DMCOW_CLI_LOCKING_ENV_H_
