// CrashEnv: an in-memory Env that models what a disk may hold after power
// loss, in the manner of SQLite's crash tests (src/test6.c).
//
// Each file keeps its durable bytes and the changes issued since its last
// Sync: writes, and truncations (ftruncate is no more durable than a write
// until a sync). After `crash_after` Write/Truncate/Sync calls (counted
// across all files) the "power fails": that call and every later one fails
// and changes nothing. Then:
//  - CrashStates() lists the states the disk could be in: no pending change,
//    all of them, each one dropped alone, each one applied alone, each one
//    torn (its first half of 512-byte sectors applied, the rest not) with
//    the others applied, and `random_subsets` seeded mixes (each change
//    applied, dropped or torn sector by sector). Identical states are listed
//    once.
//  - CrashedContent() builds one seeded random state, as before.
//
// InjectReadFault fails one Read. InjectFault makes one call fail without a
// power failure, as a disk or
// file system can: kEio fails that call (a failed Sync also loses the
// file's pending changes while reads still see them, and the next Sync
// succeeds, as Linux reports a writeback error once); kEnospc fails that
// call and every later Write that would grow a file.
#ifndef DMCOW_TESTS_CRASH_ENV_H_
#define DMCOW_TESTS_CRASH_ENV_H_

#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "dmcow/env.h"
#include "dmcow/image.h"

namespace dmcow_test {

class CrashEnv final : public dmcow::Env {
 public:
  explicit CrashEnv(uint64_t crash_after) : crash_after_(crash_after) {}

  enum class Fault { kEio, kEnospc };
  void InjectFault(uint64_t at_op, Fault fault) {
    fault_at_ = at_op;
    fault_ = fault;
  }
  // Makes the `at_read`-th Read (counted across all files, from 1) fail
  // with EIO, once: a transient read error in the middle of a change.
  void InjectReadFault(uint64_t at_read) { read_fault_at_ = at_read; }
  // Counts one Read; false for the one an injected fault fails.
  bool ReadTick() { return ++reads_ != read_fault_at_; }
  uint64_t reads() const { return reads_; }

  // The error the call counted as `op` gets from an injected fault (OK if
  // none). `grows`: a Write past the file's end.
  dmcow::Status FaultFor(uint64_t op, const std::string& name, bool grows) const;

  dmcow::Status OpenFile(const std::string& path, dmcow::OpenMode mode, std::unique_ptr<dmcow::File>* file) override;
  bool FileExists(const std::string& path) override { return nodes_.count(path) != 0; }

  void PutFile(const std::string& path, std::vector<uint8_t> bytes);
  std::vector<uint8_t> CrashedContent(const std::string& path, std::mt19937_64& rng) const;

  struct State {
    std::string label;  // which pending changes it applies, for failure messages
    std::vector<uint8_t> bytes;
  };
  std::vector<State> CrashStates(const std::string& path, uint64_t seed, int random_subsets) const;
  // The changes of `path` pending when the power failed, one per line
  // ("write 0x1000+512", "truncate 0x2000"), for failure messages.
  std::string DescribePending(const std::string& path) const;

  bool crashed() const { return ops_ >= crash_after_; }
  uint64_t ops() const { return ops_; }

  // A change not yet synced: bytes written at `offset`, or (truncate) the
  // file's size set to `offset`.
  struct Change {
    uint64_t offset;
    std::vector<uint8_t> bytes;
    bool truncate = false;
  };
  struct Node {
    std::vector<uint8_t> durable;
    std::vector<uint8_t> current;  // what reads see: durable plus pending
    std::vector<Change> pending;
  };

  // Counts one Write, Truncate or Sync; false once the power has failed.
  bool Tick() { return ++ops_ <= crash_after_; }

 private:
  const uint64_t crash_after_;
  uint64_t ops_ = 0;
  uint64_t fault_at_ = UINT64_MAX;
  uint64_t reads_ = 0;
  uint64_t read_fault_at_ = 0;
  Fault fault_ = Fault::kEio;
  std::map<std::string, std::shared_ptr<Node>> nodes_;
};

// The crash or fault points a replay tries, of first..last. CI (the
// default) takes about `ci_sample` evenly spread points plus `ci_sample / 3`
// at each end (where opening and closing write); DMCOW_CRASH_SAMPLE=N takes
// N instead (the sanitizer pass); DMCOW_CRASH_FULL=1 (scripts/crash-replay.sh,
// run before a change to the write ordering is called done) takes every one.
std::vector<uint64_t> CrashPointsToTry(uint64_t first, uint64_t last, uint64_t ci_sample);
// True under DMCOW_CRASH_FULL=1.
bool CrashReplayFull();

// Options for a writable open through a crash or fault environment: small
// caches, so that metadata is written (and crash points fall) often.
inline dmcow::OpenOptions CrashTestOptions(dmcow::Env* env) {
  dmcow::OpenOptions options;
  options.env = env;
  options.writable = true;
  options.l2_cache_bytes = 16 << 10;
  options.refcount_cache_bytes = 8 << 10;
  return options;
}

// qemu-img check's verdict on crashed images, remembered by content: many
// crash points leave the same bytes, and each check is a process.
class QemuCheckVerdicts {
 public:
  // `scratch`: a file path the image is written to for checking. With
  // `allow_copied_flags`, errors that are only COPIED flags disagreeing with
  // refcounts are allowed too: the window a snapshot operation leaves
  // (qcow2_snapshot.cc), which check -r all repairs; the caller shows
  // separately that no data depends on them.
  explicit QemuCheckVerdicts(std::string scratch, bool allow_copied_flags = false)
      : scratch_(std::move(scratch)), allow_copied_flags_(allow_copied_flags) {}

  // Empty when qemu-img check finds no corruption (leaks are allowed), else
  // its output.
  std::string Judge(const std::vector<uint8_t>& bytes);
  uint64_t checks() const { return checks_; }

 private:
  const std::string scratch_;
  const bool allow_copied_flags_;
  std::unordered_map<size_t, std::string> cache_;
  uint64_t checks_ = 0;
};

}  // namespace dmcow_test

#endif  // DMCOW_TESTS_CRASH_ENV_H_
