#include "dmcow/fail_stop_file.h"

namespace dmcow {

Status FailStopFile::Refusal() {
  if (!failed_.load(std::memory_order_acquire)) return Status::OK();
  MutexLock lock(&mu_);
  return Status::IOError(file_->name() + ": no more writes after an earlier failure (" + first_failure_.ToString() +
                         "); what was not flushed before it may be lost: reopen the image once the cause is fixed");
}

Status FailStopFile::Record(Status s) {
  if (s.ok()) return s;
  MutexLock lock(&mu_);
  if (!failed_.load(std::memory_order_relaxed)) {
    first_failure_ = s;
    failed_.store(true, std::memory_order_release);
  }
  return s;
}

Status FailStopFile::Write(uint64_t offset, const void* buf, size_t len) {
  DMCOW_RETURN_IF_ERROR(Refusal());
  return Record(file_->Write(offset, buf, len));
}

Status FailStopFile::WriteZeroes(uint64_t offset, uint64_t len) {
  DMCOW_RETURN_IF_ERROR(Refusal());
  return Record(file_->WriteZeroes(offset, len));
}

Status FailStopFile::Deallocate(uint64_t offset, uint64_t len) {
  DMCOW_RETURN_IF_ERROR(Refusal());
  return Record(file_->Deallocate(offset, len));
}

Status FailStopFile::Allocate(uint64_t offset, uint64_t len) {
  DMCOW_RETURN_IF_ERROR(Refusal());
  Status s = file_->Allocate(offset, len);
  return s.IsNotSupported() ? s : Record(s);  // not possible here is no failure
}

Status FailStopFile::Sync() {
  DMCOW_RETURN_IF_ERROR(Refusal());
  return Record(file_->Sync());
}

Status FailStopFile::Truncate(uint64_t size) {
  DMCOW_RETURN_IF_ERROR(Refusal());
  return Record(file_->Truncate(size));
}

}  // namespace dmcow
