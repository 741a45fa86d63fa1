// An Env whose files never sync: qemu-img's cache=unsafe, the default cache
// mode of convert's output. Writes still reach the kernel in the engine's
// order; only the waits for durability are skipped, since a half-converted
// output is discarded after a crash anyway.
#ifndef DMCOW_CLI_NO_SYNC_ENV_H_
#define DMCOW_CLI_NO_SYNC_ENV_H_

#include <memory>
#include <string>

#include "dmcow/env.h"

namespace dmcow::cli {

class NoSyncEnv final : public Env {
 public:
  explicit NoSyncEnv(Env* base) : base_(base) {}

  Status OpenFile(const std::string& path, OpenMode mode, std::unique_ptr<File>* file) override {
    std::unique_ptr<File> inner;
    Status s = base_->OpenFile(path, mode, &inner);
    if (s.ok()) *file = std::make_unique<NoSyncFile>(std::move(inner));
    return s;
  }
  bool FileExists(const std::string& path) override { return base_->FileExists(path); }

 private:
  class NoSyncFile final : public File {
   public:
    explicit NoSyncFile(std::unique_ptr<File> inner) : inner_(std::move(inner)) {}
    const std::string& name() const override { return inner_->name(); }
    Status Read(uint64_t offset, size_t len, void* buf, size_t* bytes_read) override {
      return inner_->Read(offset, len, buf, bytes_read);
    }
    Status Write(uint64_t offset, const void* buf, size_t len) override { return inner_->Write(offset, buf, len); }
    Status WriteZeroes(uint64_t offset, uint64_t len) override { return inner_->WriteZeroes(offset, len); }
    Status Deallocate(uint64_t offset, uint64_t len) override { return inner_->Deallocate(offset, len); }
    Status Allocate(uint64_t offset, uint64_t len) override { return inner_->Allocate(offset, len); }
    Status Sync() override { return Status::OK(); }
    Status Size(uint64_t* size) override { return inner_->Size(size); }
    Status Truncate(uint64_t size) override { return inner_->Truncate(size); }
    uint64_t AllocatedBytes() override { return inner_->AllocatedBytes(); }
    Status Identity(FileIdentity* id) override { return inner_->Identity(id); }
    Status GetAllocation(uint64_t offset, uint64_t max_len, bool* is_data, uint64_t* len) override {
      return inner_->GetAllocation(offset, max_len, is_data, len);
    }

   private:
    std::unique_ptr<File> inner_;
  };

  Env* const base_;
};

}  // namespace dmcow::cli

#endif  // DMCOW_CLI_NO_SYNC_ENV_H_
