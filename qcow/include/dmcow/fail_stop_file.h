// FailStopFile: a File that stops writing at its first failure.
//
// After fdatasync reports EIO or ENOSPC, Linux may already have dropped the
// dirty pages it could not write, and the next fdatasync on the same file
// reports success ("fsyncgate"). A writer that retried would acknowledge
// data that never reached the disk. So the first failed Write, WriteZeroes,
// Truncate or Sync ends writing through this open: every later one fails
// with an error that names the first failure, and reads keep working. Rule
// (8) at the top of qcow/src/qcow2/qcow2_write.cc; every image opened for
// writing goes through one of these (qcow/src/image/open_image.cc, and the
// external data file), and so does the cow plugin's store (daemon/src/cow/cow_store.cc).
//
// Thread safety: as File; the first failure is recorded under a mutex.
#ifndef DMCOW_FAIL_STOP_FILE_H_
#define DMCOW_FAIL_STOP_FILE_H_

#include <atomic>
#include <memory>
#include <string>
#include "dmcow/mutex.h"

#include "dmcow/env.h"

namespace dmcow {

class FailStopFile final : public File {
 public:
  explicit FailStopFile(std::unique_ptr<File> file) : file_(std::move(file)) {}

  const std::string& name() const override { return file_->name(); }
  Status Read(uint64_t offset, size_t len, void* buf, size_t* bytes_read) override {
    return file_->Read(offset, len, buf, bytes_read);
  }
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status WriteZeroes(uint64_t offset, uint64_t len) override;
  Status Deallocate(uint64_t offset, uint64_t len) override;
  Status Allocate(uint64_t offset, uint64_t len) override;
  Status Sync() override;
  Status Size(uint64_t* size) override { return file_->Size(size); }
  Status Truncate(uint64_t size) override;
  uint64_t AllocatedBytes() override { return file_->AllocatedBytes(); }
  Status GetAllocation(uint64_t offset, uint64_t max_len, bool* is_data, uint64_t* len) override {
    return file_->GetAllocation(offset, max_len, is_data, len);
  }
  Status Identity(FileIdentity* id) override { return file_->Identity(id); }
  int NativeFd() const override { return file_->NativeFd(); }

 private:
  // The error every write returns once one has failed; OK before that.
  Status Refusal();
  // Passes `s` through, remembering it if it is the first failure.
  Status Record(Status s);

  const std::unique_ptr<File> file_;
  std::atomic<bool> failed_{false};
  Mutex mu_;
  Status first_failure_ GUARDED_BY(mu_);
};

}  // namespace dmcow

#endif  // DMCOW_FAIL_STOP_FILE_H_
