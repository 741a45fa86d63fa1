#include "dmcow/mem_env.h"

#include <algorithm>
#include <cstring>
#include <new>

#include "util.h"

namespace dmcow {
namespace {

// Growing a file beyond this is refused (IOError "file too large"), as a real
// file system refuses offsets past its maximum file size, rather than
// attempting an allocation that cannot succeed.
constexpr uint64_t kMaxFileSize = uint64_t{1} << 40;

class MemFile final : public File {
 public:
  MemFile(std::string name, std::shared_ptr<MemEnv::Node> node, bool writable)
      : name_(std::move(name)), node_(std::move(node)), writable_(writable) {}

  const std::string& name() const override { return name_; }

  Status Read(uint64_t offset, size_t len, void* buf, size_t* bytes_read) override {
    MutexLock lock(&node_->mu);
    size_t n = 0;
    if (offset < node_->data.size()) n = static_cast<size_t>(std::min<uint64_t>(len, node_->data.size() - offset));
    if (n > 0) std::memcpy(buf, node_->data.data() + offset, n);
    *bytes_read = n;
    return Status::OK();
  }

  Status Write(uint64_t offset, const void* buf, size_t len) override {
    if (!writable_) return Status::IOError(name_ + ": write: file is open read-only");
    uint64_t end;
    if (!CheckedAdd(offset, len, &end) || end > kMaxFileSize) {
      return Status::IOError(name_ + ": write of " + std::to_string(len) + " bytes at offset " + Hex(offset) +
                             ": file too large");
    }
    MutexLock lock(&node_->mu);
    std::vector<uint8_t>& data = node_->data;
    if (end > data.size()) DMCOW_RETURN_IF_ERROR(Resize(&data, end));
    if (len > 0) std::memcpy(data.data() + offset, buf, len);
    return Status::OK();
  }

  Status Sync() override { return Status::OK(); }

  Status Size(uint64_t* size) override {
    MutexLock lock(&node_->mu);
    *size = node_->data.size();
    return Status::OK();
  }

  Status Truncate(uint64_t size) override {
    if (!writable_) return Status::IOError(name_ + ": truncate: file is open read-only");
    if (size > kMaxFileSize)
      return Status::IOError(name_ + ": truncate to " + std::to_string(size) + ": file too large");
    MutexLock lock(&node_->mu);
    return Resize(&node_->data, size);
  }

  uint64_t AllocatedBytes() override {
    MutexLock lock(&node_->mu);
    return node_->data.size();
  }

  // The node is the inode: paths linked to one node share it.
  Status Identity(FileIdentity* id) override {
    id->device = 0;
    id->inode = reinterpret_cast<uintptr_t>(node_.get());
    return Status::OK();
  }

 private:
  Status Resize(std::vector<uint8_t>* data, uint64_t size) {
    try {
      data->resize(static_cast<size_t>(size));
    } catch (const std::bad_alloc&) {
      return Status::IOError(name_ + ": out of memory growing the file to " + std::to_string(size) + " bytes");
    }
    return Status::OK();
  }

  const std::string name_;
  const std::shared_ptr<MemEnv::Node> node_;
  const bool writable_;
};

}  // namespace

Status MemEnv::OpenFile(const std::string& path, OpenMode mode, std::unique_ptr<File>* file) {
  std::shared_ptr<Node> node;
  {
    MutexLock lock(&mu_);
    auto it = files_.find(path);
    if (it != files_.end()) {
      node = it->second;
    } else if (mode == OpenMode::kCreateTruncate) {
      node = std::make_shared<Node>();
      files_[path] = node;
    } else {
      return Status::NotFound(path + ": open: No such file or directory");
    }
  }
  if (mode == OpenMode::kCreateTruncate) {
    MutexLock lock(&node->mu);
    node->data.clear();
  }
  file->reset(new MemFile(path, std::move(node), mode != OpenMode::kReadOnly));
  return Status::OK();
}

bool MemEnv::FileExists(const std::string& path) {
  MutexLock lock(&mu_);
  return files_.count(path) != 0;
}

void MemEnv::PutFile(const std::string& path, std::vector<uint8_t> bytes) {
  std::shared_ptr<Node> node;
  {
    MutexLock lock(&mu_);
    std::shared_ptr<Node>& slot = files_[path];
    if (!slot) slot = std::make_shared<Node>();
    node = slot;
  }
  MutexLock lock(&node->mu);
  node->data = std::move(bytes);
}

void MemEnv::PutFile(const std::string& path, const std::string& bytes) {
  PutFile(path, std::vector<uint8_t>(bytes.begin(), bytes.end()));
}

bool MemEnv::GetFile(const std::string& path, std::vector<uint8_t>* bytes) const {
  std::shared_ptr<Node> node;
  {
    MutexLock lock(&mu_);
    auto it = files_.find(path);
    if (it == files_.end()) return false;
    node = it->second;
  }
  MutexLock lock(&node->mu);
  *bytes = node->data;
  return true;
}

bool MemEnv::LinkFile(const std::string& existing, const std::string& path) {
  MutexLock lock(&mu_);
  auto it = files_.find(existing);
  if (it == files_.end()) return false;
  files_[path] = it->second;
  return true;
}

bool MemEnv::DeleteFile(const std::string& path) {
  MutexLock lock(&mu_);
  return files_.erase(path) != 0;
}

std::vector<std::string> MemEnv::ListFiles() const {
  MutexLock lock(&mu_);
  std::vector<std::string> out;
  for (const auto& entry : files_) out.push_back(entry.first);
  return out;
}

std::unique_ptr<Env> NewMemEnv() { return std::make_unique<MemEnv>(); }

}  // namespace dmcow
