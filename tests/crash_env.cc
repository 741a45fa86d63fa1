#include "crash_env.h"

#include <algorithm>
#include <cstring>

namespace dmcow_test {

using dmcow::Status;

namespace {

class CrashFile final : public dmcow::File {
 public:
  CrashFile(std::string name, std::shared_ptr<CrashEnv::Node> node, CrashEnv* env)
      : name_(std::move(name)), node_(std::move(node)), env_(env) {}

  const std::string& name() const override { return name_; }

  Status Read(uint64_t offset, size_t len, void* buf, size_t* bytes_read) override {
    const auto& data = node_->current;
    size_t n = offset >= data.size() ? 0 : std::min<size_t>(len, data.size() - offset);
    if (n) std::memcpy(buf, data.data() + offset, n);
    *bytes_read = n;
    return Status::OK();
  }

  Status Write(uint64_t offset, const void* buf, size_t len) override {
    if (!env_->Tick()) return Status::IOError(name_ + ": simulated power failure");
    auto& data = node_->current;
    if (data.size() < offset + len) data.resize(offset + len, 0);
    std::memcpy(data.data() + offset, buf, len);
    const auto* p = static_cast<const uint8_t*>(buf);
    node_->pending.emplace_back(offset, std::vector<uint8_t>(p, p + len));
    return Status::OK();
  }

  Status Sync() override {
    if (!env_->Tick()) return Status::IOError(name_ + ": simulated power failure");
    node_->durable = node_->current;
    node_->pending.clear();
    return Status::OK();
  }

  Status Size(uint64_t* size) override {
    *size = node_->current.size();
    return Status::OK();
  }

  // The node is the inode, as in MemEnv.
  Status Identity(dmcow::FileIdentity* id) override {
    id->device = 0;
    id->inode = reinterpret_cast<uintptr_t>(node_.get());
    return Status::OK();
  }

  Status Truncate(uint64_t size) override {
    if (!env_->Tick()) return Status::IOError(name_ + ": simulated power failure");
    node_->current.resize(size, 0);
    node_->durable = node_->current;  // treated as synchronous; the engine never truncates
    node_->pending.clear();
    return Status::OK();
  }

 private:
  const std::string name_;
  std::shared_ptr<CrashEnv::Node> node_;
  CrashEnv* const env_;
};

}  // namespace

Status CrashEnv::OpenFile(const std::string& path, dmcow::OpenMode mode, std::unique_ptr<dmcow::File>* file) {
  auto it = nodes_.find(path);
  if (it == nodes_.end()) {
    if (mode != dmcow::OpenMode::kCreateTruncate) return Status::NotFound(path + ": open: No such file or directory");
    it = nodes_.emplace(path, std::make_shared<Node>()).first;
  }
  file->reset(new CrashFile(path, it->second, this));
  return Status::OK();
}

void CrashEnv::PutFile(const std::string& path, std::vector<uint8_t> bytes) {
  auto node = std::make_shared<Node>();
  node->durable = bytes;
  node->current = std::move(bytes);
  nodes_[path] = node;
}

std::vector<uint8_t> CrashEnv::CrashedContent(const std::string& path, std::mt19937_64& rng) const {
  const Node& node = *nodes_.at(path);
  std::vector<uint8_t> disk = node.durable;
  for (const auto& [offset, bytes] : node.pending) {
    const uint64_t choice = rng() % 3;
    if (choice == 1) continue;  // dropped
    for (size_t pos = 0; pos < bytes.size(); pos += 512) {
      const size_t n = std::min<size_t>(512, bytes.size() - pos);
      if (choice == 2 && rng() % 2) continue;  // torn: this sector never made it
      if (disk.size() < offset + pos + n) disk.resize(offset + pos + n, 0);
      std::memcpy(disk.data() + offset + pos, bytes.data() + pos, n);
    }
  }
  return disk;
}

}  // namespace dmcow_test
