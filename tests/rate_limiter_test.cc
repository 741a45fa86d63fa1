// RateLimiter (qemu-img -r) on a fake clock: tests never measure wall time.
#include <catch2/catch.hpp>
#include <thread>
#include <vector>

#include "rate_limiter.h"

using dmcow::cli::RateLimiter;

TEST_CASE("the rate limiter holds the bytes to the rate, after a first second's worth", "[unit]") {
  double now = 100.0;
  double slept = 0;
  RateLimiter limiter(
      1 << 20, [&] { return now; },
      [&](double s) {
        REQUIRE(s > 0);
        slept += s;
        now += s;
      });
  limiter.Account(1 << 20);  // the first second's worth goes at once
  CHECK(slept == 0);
  limiter.Account(1 << 20);
  CHECK(slept == Approx(1.0));
  limiter.Account(512 << 10);
  CHECK(slept == Approx(1.5));
  now += 10;  // time spent elsewhere counts: no sleep until the budget runs out again
  limiter.Account(4 << 20);
  CHECK(slept == Approx(1.5));
  limiter.Account(8 << 20);
  CHECK(now == Approx(100.0 + 1.5 + 10 + (14.5 - 1 - 11.5)));  // 14.5 MiB sent by t = 13.5
}

TEST_CASE("the rate limiter does nothing without a rate, and is shared by threads", "[unit]") {
  bool slept = false;
  RateLimiter none(
      0, [] { return 0.0; }, [&](double) { slept = true; });
  none.Account(uint64_t{1} << 40);
  CHECK_FALSE(slept);

  double total = 0;
  std::mutex mu;
  RateLimiter shared(
      1000, [] { return 0.0; },
      [&](double s) {
        std::lock_guard<std::mutex> lock(mu);
        total = std::max(total, s);
      });
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&] {
      for (int i = 0; i < 250; i++) shared.Account(10);
    });
  }
  for (auto& t : threads) t.join();
  CHECK(total == Approx(9.0).margin(0.011));  // 10,000 bytes at 1,000/s, the first 1,000 free
}
