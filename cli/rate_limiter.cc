#include "rate_limiter.h"

#include <chrono>
#include <thread>

namespace dmcow::cli {

RateLimiter::RateLimiter(uint64_t bytes_per_second, Clock clock, Sleep sleep)
    : rate_(bytes_per_second),
      clock_(clock ? std::move(clock) : Clock([] {
        return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
      })),
      sleep_(sleep ? std::move(sleep) : Sleep([](double seconds) {
        std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
      })) {}

void RateLimiter::Account(uint64_t bytes) {
  if (rate_ == 0 || bytes == 0) return;
  double due;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (total_ == 0) start_ = clock_();
    total_ += bytes;
    // The first `rate_` bytes go at once, as QEMU's first slice does.
    due = start_ + static_cast<double>(total_ - std::min(total_, rate_)) / static_cast<double>(rate_);
  }
  const double now = clock_();
  if (due > now) sleep_(due - now);
}

}  // namespace dmcow::cli
