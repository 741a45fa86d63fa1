// RateLimiter: qemu-img's -r (convert, commit). Keeps the bytes a command
// copies at or below a rate: Account(n) returns once n more bytes fit the
// budget of bytes_per_second since the limiter started (QEMU's ratelimit
// does the same in 100 ms slices). Only the bytes really written count:
// holes and zero ranges cost no I/O worth throttling.
//
// Thread safety: Account may be called from several threads at once.
#ifndef DMCOW_CLI_RATE_LIMITER_H_
#define DMCOW_CLI_RATE_LIMITER_H_

#include <cstdint>
#include <functional>
#include <mutex>

namespace dmcow::cli {

class RateLimiter {
 public:
  using Clock = std::function<double()>;      // seconds, monotonic
  using Sleep = std::function<void(double)>;  // sleeps that many seconds
  // bytes_per_second 0: no limit. Tests pass a clock and a sleep of their own.
  explicit RateLimiter(uint64_t bytes_per_second, Clock clock = {}, Sleep sleep = {});

  void Account(uint64_t bytes);

 private:
  const uint64_t rate_;
  const Clock clock_;
  const Sleep sleep_;
  std::mutex mu_;
  double start_ = 0;    // when the first bytes were accounted
  uint64_t total_ = 0;  // bytes accounted so far
};

}  // namespace dmcow::cli

#endif  // DMCOW_CLI_RATE_LIMITER_H_
