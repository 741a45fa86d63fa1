#include "heap_peak.h"

#include <atomic>
#include <cstdlib>
#include <new>

namespace {
std::atomic<size_t> g_live_bytes{0};
std::atomic<size_t> g_peak_bytes{0};
std::atomic<size_t> g_baseline{0};
constexpr size_t kAllocHeader = 16;  // keeps max_align_t alignment

void* CountedAlloc(size_t n) {
  void* p = std::malloc(n + kAllocHeader);
  if (!p) return nullptr;
  *static_cast<size_t*>(p) = n;
  size_t live = g_live_bytes.fetch_add(n) + n;
  size_t peak = g_peak_bytes.load();
  while (live > peak && !g_peak_bytes.compare_exchange_weak(peak, live)) {
  }
  return static_cast<char*>(p) + kAllocHeader;
}

void CountedFree(void* p) {
  if (!p) return;
  char* base = static_cast<char*>(p) - kAllocHeader;
  g_live_bytes.fetch_sub(*reinterpret_cast<size_t*>(base));
  std::free(base);
}

void* CountedNew(size_t n) {
  void* p = CountedAlloc(n);
  if (!p) throw std::bad_alloc();
  return p;
}
}  // namespace

void* operator new(size_t n) { return CountedNew(n); }
void* operator new[](size_t n) { return CountedNew(n); }
void* operator new(size_t n, const std::nothrow_t&) noexcept { return CountedAlloc(n); }
void* operator new[](size_t n, const std::nothrow_t&) noexcept { return CountedAlloc(n); }
void operator delete(void* p) noexcept { CountedFree(p); }
void operator delete[](void* p) noexcept { CountedFree(p); }
void operator delete(void* p, size_t) noexcept { CountedFree(p); }
void operator delete[](void* p, size_t) noexcept { CountedFree(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { CountedFree(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { CountedFree(p); }

namespace dmcow_test {

void ResetHeapPeak() {
  g_baseline.store(g_live_bytes.load());
  g_peak_bytes.store(g_baseline.load());
}

size_t HeapPeakSinceReset() { return g_peak_bytes.load() - g_baseline.load(); }

}  // namespace dmcow_test
