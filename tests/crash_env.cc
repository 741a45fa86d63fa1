#include "crash_env.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <set>
#include <string_view>

#include "test_util.h"

namespace dmcow_test {

using dmcow::Status;

namespace {

class CrashFile final : public dmcow::File {
 public:
  CrashFile(std::string name, std::shared_ptr<CrashEnv::Node> node, CrashEnv* env)
      : name_(std::move(name)), node_(std::move(node)), env_(env) {}

  const std::string& name() const override { return name_; }

  Status Read(uint64_t offset, size_t len, void* buf, size_t* bytes_read) override {
    if (!env_->ReadTick()) return Status::IOError(name_ + ": Input/output error (injected read)");
    const auto& data = node_->current;
    size_t n = offset >= data.size() ? 0 : std::min<size_t>(len, data.size() - offset);
    if (n) std::memcpy(buf, data.data() + offset, n);
    *bytes_read = n;
    return Status::OK();
  }

  Status Write(uint64_t offset, const void* buf, size_t len) override {
    if (!env_->Tick()) return Status::IOError(name_ + ": simulated power failure");
    DMCOW_RETURN_IF_ERROR(env_->FaultFor(env_->ops(), name_, offset + len > node_->current.size()));
    auto& data = node_->current;
    if (data.size() < offset + len) data.resize(offset + len, 0);
    std::memcpy(data.data() + offset, buf, len);
    const auto* p = static_cast<const uint8_t*>(buf);
    node_->pending.push_back(CrashEnv::Change{offset, std::vector<uint8_t>(p, p + len)});
    return Status::OK();
  }

  Status Sync() override {
    if (!env_->Tick()) return Status::IOError(name_ + ": simulated power failure");
    Status fault = env_->FaultFor(env_->ops(), name_, false);
    if (!fault.ok()) {
      // Writeback failed: the pending changes never reach the disk, yet
      // reads still see them, and nothing will write them again.
      node_->pending.clear();
      return fault;
    }
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
    DMCOW_RETURN_IF_ERROR(env_->FaultFor(env_->ops(), name_, size > node_->current.size()));
    node_->current.resize(size, 0);
    node_->pending.push_back(CrashEnv::Change{size, {}, true});
    return Status::OK();
  }

 private:
  const std::string name_;
  std::shared_ptr<CrashEnv::Node> node_;
  CrashEnv* const env_;
};

}  // namespace

Status CrashEnv::FaultFor(uint64_t op, const std::string& name, bool grows) const {
  if (op == fault_at_) {
    return Status::IOError(
        name + (fault_ == Fault::kEio ? ": Input/output error (injected)" : ": No space left on device (injected)"));
  }
  if (fault_ == Fault::kEnospc && op > fault_at_ && grows) {
    return Status::IOError(name + ": No space left on device (injected)");
  }
  return Status::OK();
}

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

namespace {

enum class Fate { kApplied, kDropped, kTornHalf, kTornRandom };

// Applies one pending change to `disk` as `fate` says; sectors of a randomly
// torn write are each applied or not by `rng`.
void Apply(const CrashEnv::Change& change, Fate fate, std::mt19937_64& rng, std::vector<uint8_t>* disk) {
  if (fate == Fate::kDropped) return;
  if (change.truncate) {  // a size change is not torn: it happened or not
    disk->resize(change.offset, 0);
    return;
  }
  const size_t sectors = (change.bytes.size() + 511) / 512;
  for (size_t sector = 0; sector < sectors; sector++) {
    if (fate == Fate::kTornHalf && sector >= (sectors + 1) / 2) break;
    if (fate == Fate::kTornRandom && rng() % 2) continue;  // this sector never made it
    const size_t pos = sector * 512;
    const size_t n = std::min<size_t>(512, change.bytes.size() - pos);
    if (disk->size() < change.offset + pos + n) disk->resize(change.offset + pos + n, 0);
    std::memcpy(disk->data() + change.offset + pos, change.bytes.data() + pos, n);
  }
}

}  // namespace

std::vector<uint8_t> CrashEnv::CrashedContent(const std::string& path, std::mt19937_64& rng) const {
  const Node& node = *nodes_.at(path);
  std::vector<uint8_t> disk = node.durable;
  for (const Change& change : node.pending) {
    const uint64_t choice = rng() % 3;
    Apply(change, choice == 0 ? Fate::kApplied : choice == 1 ? Fate::kDropped : Fate::kTornRandom, rng, &disk);
  }
  return disk;
}

std::vector<CrashEnv::State> CrashEnv::CrashStates(const std::string& path, uint64_t seed, int random_subsets) const {
  const Node& node = *nodes_.at(path);
  const size_t n = node.pending.size();
  std::mt19937_64 rng(seed);
  std::vector<State> states;
  std::set<std::vector<uint8_t>> seen;
  auto add = [&](std::string label, const std::vector<Fate>& fates) {
    std::vector<uint8_t> disk = node.durable;
    for (size_t i = 0; i < n; i++) Apply(node.pending[i], fates[i], rng, &disk);
    if (seen.insert(disk).second) states.push_back(State{std::move(label), std::move(disk)});
  };
  add("no pending change applied", std::vector<Fate>(n, Fate::kDropped));
  add("every pending change applied", std::vector<Fate>(n, Fate::kApplied));
  for (size_t i = 0; i < n; i++) {
    std::vector<Fate> fates(n, Fate::kApplied);
    fates[i] = Fate::kDropped;
    add("pending change " + std::to_string(i) + " of " + std::to_string(n) + " dropped alone", fates);
    fates[i] = Fate::kTornHalf;
    add("pending change " + std::to_string(i) + " of " + std::to_string(n) + " torn, the others applied", fates);
    std::fill(fates.begin(), fates.end(), Fate::kDropped);
    fates[i] = Fate::kApplied;
    add("pending change " + std::to_string(i) + " of " + std::to_string(n) + " applied alone", fates);
  }
  for (int r = 0; r < random_subsets && n > 1; r++) {
    std::vector<Fate> fates(n);
    std::string label = "random subset " + std::to_string(r) + ":";
    for (size_t i = 0; i < n; i++) {
      const uint64_t choice = rng() % 3;
      fates[i] = choice == 0 ? Fate::kApplied : choice == 1 ? Fate::kDropped : Fate::kTornRandom;
      label += choice == 0 ? " A" : choice == 1 ? " D" : " T";
    }
    add(std::move(label), fates);
  }
  return states;
}

std::string CrashEnv::DescribePending(const std::string& path) const {
  std::string out;
  char line[96];
  for (const Change& change : nodes_.at(path)->pending) {
    if (change.truncate) {
      std::snprintf(line, sizeof(line), "truncate 0x%llx\n", static_cast<unsigned long long>(change.offset));
    } else {
      std::snprintf(line, sizeof(line), "write 0x%llx+%zu\n", static_cast<unsigned long long>(change.offset),
                    change.bytes.size());
    }
    out += line;
  }
  return out;
}

bool CrashReplayFull() {
  const char* v = std::getenv("DMCOW_CRASH_FULL");
  return v && *v == '1';
}

std::vector<uint64_t> CrashPointsToTry(uint64_t first, uint64_t last, uint64_t ci_sample) {
  const char* forced = std::getenv("DMCOW_CRASH_SAMPLE");
  const uint64_t sample = forced && *forced ? std::strtoull(forced, nullptr, 10) : ci_sample;
  const uint64_t count = last - first + 1;
  const bool every = CrashReplayFull() || sample == 0 || count <= sample + 2 * (sample / 3);
  const uint64_t step = every ? 1 : count / sample, edge = every ? count : sample / 3;
  std::vector<uint64_t> points;
  for (uint64_t k = first; k <= last; k++) {
    if ((k - first) % step == 0 || k - first < edge || last - k < edge) points.push_back(k);
  }
  return points;
}

std::string QemuCheckVerdicts::Judge(const std::vector<uint8_t>& bytes) {
  const size_t key =
      std::hash<std::string_view>()(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
  auto it = cache_.find(key);
  if (it != cache_.end()) return it->second;
  checks_++;
  WriteWholeFile(scratch_, bytes);
  std::string out;
  const int rc = Run("qemu-img check '" + scratch_ + "'", &out);
  bool only_allowed_errors = out.find("ERROR") == std::string::npos;
  if (allow_copied_flags_ && rc == 2) {
    only_allowed_errors = true;
    for (size_t pos = out.find("ERROR"); pos != std::string::npos; pos = out.find("ERROR", pos + 5)) {
      if (out.compare(pos, 19, "ERROR OFLAG_COPIED ") != 0) only_allowed_errors = false;
    }
  }
  const bool allowed_rc = rc == 0 || rc == 3 || (allow_copied_flags_ && rc == 2);
  const std::string verdict = allowed_rc && only_allowed_errors ? "" : out;
  cache_.emplace(key, verdict);
  return verdict;
}

}  // namespace dmcow_test
