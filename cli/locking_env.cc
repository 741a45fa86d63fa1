#include "locking_env.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <utility>
#include <vector>

#include "dmcow/mutex.h"

namespace dmcow::cli {
namespace {

using Mode = ImageLock::Mode;

// Each mode's bytes include the weaker modes' (see image_lock.h).
int Strength(Mode mode) {
  switch (mode) {
    case Mode::kReadOnlyShared: return 0;
    case Mode::kReadOnly: return 1;
    case Mode::kReadWrite: return 2;
  }
  return 2;
}

// The locks of one file (by identity) open through the Env: all on one open
// file description, that of the first open, kept by `fd` (a duplicate).
struct Slot {
  int fd = -1;
  Mode mode = Mode::kReadOnlyShared;
  std::vector<std::unique_ptr<ImageLock>> locks;  // the first, then each raise
  ~Slot() {
    locks.clear();
    if (fd >= 0) ::close(fd);
  }
};

Mutex hint_mu;
std::string hint GUARDED_BY(hint_mu);

}  // namespace

std::string LockingEnv::TakeHint() {
  MutexLock l(&hint_mu);
  return std::exchange(hint, std::string());
}

struct LockingEnv::Shared {
  Mutex mu;
  std::map<std::pair<uint64_t, uint64_t>, std::weak_ptr<Slot>> slots GUARDED_BY(mu);
};

class LockingEnv::LockedFile final : public File {
 public:
  LockedFile(std::unique_ptr<File> file, std::shared_ptr<Slot> slot, std::shared_ptr<Shared> shared)
      : file_(std::move(file)), slot_(std::move(slot)), shared_(std::move(shared)) {}
  ~LockedFile() override {
    file_.reset();  // closed first, unlocked second, as QEMU does
    MutexLock l(&shared_->mu);
    slot_.reset();
  }

  const std::string& name() const override { return file_->name(); }
  Status Read(uint64_t offset, size_t len, void* buf, size_t* bytes_read) override {
    return file_->Read(offset, len, buf, bytes_read);
  }
  Status Write(uint64_t offset, const void* buf, size_t len) override { return file_->Write(offset, buf, len); }
  Status WriteZeroes(uint64_t offset, uint64_t len) override { return file_->WriteZeroes(offset, len); }
  Status Deallocate(uint64_t offset, uint64_t len) override { return file_->Deallocate(offset, len); }
  Status Allocate(uint64_t offset, uint64_t len) override { return file_->Allocate(offset, len); }
  Status Sync() override { return file_->Sync(); }
  Status Size(uint64_t* size) override { return file_->Size(size); }
  Status Truncate(uint64_t size) override { return file_->Truncate(size); }
  uint64_t AllocatedBytes() override { return file_->AllocatedBytes(); }
  Status GetAllocation(uint64_t offset, uint64_t max_len, bool* is_data, uint64_t* len) override {
    return file_->GetAllocation(offset, max_len, is_data, len);
  }
  Status Identity(FileIdentity* id) override { return file_->Identity(id); }
  int NativeFd() const override { return file_->NativeFd(); }

 private:
  std::unique_ptr<File> file_;
  std::shared_ptr<Slot> slot_;
  std::shared_ptr<Shared> shared_;
};

LockingEnv::LockingEnv(Env* base, Policy policy)
    : base_(base), policy_(std::move(policy)), shared_(std::make_shared<Shared>()) {}

LockingEnv::~LockingEnv() = default;

Status LockingEnv::OpenFile(const std::string& path, OpenMode mode, std::unique_ptr<File>* file) {
  std::unique_ptr<File> inner;
  bool existed = true;
  if (mode == OpenMode::kCreateTruncate) {
    // As QEMU's raw_co_create: open without emptying, lock, then empty. A
    // file that does not exist yet is made empty; nobody can hold it.
    Status s = base_->OpenFile(path, OpenMode::kReadWrite, &inner);
    if (s.IsNotFound()) {
      existed = false;
      s = base_->OpenFile(path, OpenMode::kCreateTruncate, &inner);
    }
    if (!s.ok()) return s;
  } else {
    DMCOW_RETURN_IF_ERROR(base_->OpenFile(path, mode, &inner));
  }

  const bool is_top = path == policy_.top;
  const bool writing = mode != OpenMode::kReadOnly || (is_top && policy_.top_read_write);
  const Mode want = writing ? Mode::kReadWrite : policy_.read_mode;
  const int fd = inner->NativeFd();
  std::shared_ptr<Slot> slot;
  if (fd >= 0) {  // else a file the Env cannot lock: nothing to lock on
    FileIdentity id;
    const bool has_id = inner->Identity(&id).ok();
    MutexLock l(&shared_->mu);
    if (has_id) slot = shared_->slots[{id.device, id.inode}].lock();
    std::string qemu_error;
    Status s;
    if (slot == nullptr) {
      slot = std::make_shared<Slot>();
      slot->fd = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
      if (slot->fd < 0) return Status::IOError(path + ": dup for locking: " + std::strerror(errno));
      std::unique_ptr<ImageLock> lock;
      s = ImageLock::AcquireFd(slot->fd, path, want, &lock, &qemu_error);
      if (s.ok()) {
        slot->mode = want;
        slot->locks.push_back(std::move(lock));
        if (has_id) shared_->slots[{id.device, id.inode}] = slot;
      }
    } else if (Strength(want) > Strength(slot->mode)) {
      // Raised on the first open's description: no conflict with ourselves,
      // and never a moment without the weaker lock.
      std::unique_ptr<ImageLock> lock;
      s = ImageLock::AcquireFd(slot->fd, path, want, &lock, &qemu_error);
      if (s.ok()) {
        slot->mode = want;
        slot->locks.push_back(std::move(lock));
      }
    }
    if (!s.ok()) {
      if (!s.IsBusy() || qemu_error.empty()) return s;
      if (qemu_error.rfind("Failed to get ", 0) == 0) {  // raw_handle_perm_lock's hint
        MutexLock h(&hint_mu);
        hint = "Is another process using the image [" + path + "]?";
      }
      if (mode == OpenMode::kCreateTruncate) return Status::Busy(path + ": " + qemu_error);
      // A backing file's conflict gets QEMU's "Could not open backing
      // file: " per level from the engine (OpenLayer), which knows the depth.
      return Status::Busy(qemu_error);
    }
  }

  if (mode == OpenMode::kCreateTruncate && existed) {
    // What O_TRUNC would have done: regular files only (a block device keeps
    // its size).
    struct stat st;
    uint64_t size = 0;
    const bool regular = fd < 0 || (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode));
    if (regular) DMCOW_RETURN_IF_ERROR(inner->Size(&size));
    if (size != 0) DMCOW_RETURN_IF_ERROR(inner->Truncate(0));
  }
  *file = std::make_unique<LockedFile>(std::move(inner), std::move(slot), shared_);
  return Status::OK();
}

}  // namespace dmcow::cli
