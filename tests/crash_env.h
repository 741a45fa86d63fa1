// CrashEnv: an in-memory Env that models what a disk may hold after power
// loss, in the manner of SQLite's crash tests (src/test6.c).
//
// Each file keeps its durable bytes and the writes issued since its last
// Sync. After `crash_after` Write/Sync calls (counted across all files) the
// "power fails": that call and every later Write or Sync fails and changes
// nothing. CrashedContent() then builds one state the disk could be in:
// every pending write, in order, is applied whole, dropped, or torn (each
// 512-byte sector of it applied or not), as a seeded generator decides.
#ifndef DMCOW_TESTS_CRASH_ENV_H_
#define DMCOW_TESTS_CRASH_ENV_H_

#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "dmcow/env.h"

namespace dmcow_test {

class CrashEnv final : public dmcow::Env {
 public:
  explicit CrashEnv(uint64_t crash_after) : crash_after_(crash_after) {}

  dmcow::Status OpenFile(const std::string& path, dmcow::OpenMode mode, std::unique_ptr<dmcow::File>* file) override;
  bool FileExists(const std::string& path) override { return nodes_.count(path) != 0; }

  void PutFile(const std::string& path, std::vector<uint8_t> bytes);
  std::vector<uint8_t> CrashedContent(const std::string& path, std::mt19937_64& rng) const;

  bool crashed() const { return ops_ >= crash_after_; }
  uint64_t ops() const { return ops_; }

  struct Node {
    std::vector<uint8_t> durable;
    std::vector<uint8_t> current;  // what reads see: durable plus pending
    std::vector<std::pair<uint64_t, std::vector<uint8_t>>> pending;
  };

  // Counts one Write or Sync; false once the power has failed.
  bool Tick() { return ++ops_ <= crash_after_; }

 private:
  const uint64_t crash_after_;
  uint64_t ops_ = 0;
  std::map<std::string, std::shared_ptr<Node>> nodes_;
};

}  // namespace dmcow_test

#endif  // DMCOW_TESTS_CRASH_ENV_H_
