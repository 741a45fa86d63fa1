#include "range_compare.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <system_error>
#include <thread>
#include <tuple>

#include "cli_common.h"

namespace dmcow::cli {
namespace {

constexpr uint64_t kSector = 512;

// Offset within `a` of the first 512-byte block that differs from `b` (b
// null: from zeros), or -1. Whole pieces are compared at once first: almost
// every piece is equal.
int64_t FirstDifference(const char* a, const char* b, uint64_t len) {
  if (b == nullptr ? IsZero(a, len) : std::memcmp(a, b, len) == 0) return -1;
  for (uint64_t i = 0; i < len; i += kSector) {
    uint64_t n = std::min(kSector, len - i);
    if (b == nullptr ? !IsZero(a + i, n) : std::memcmp(a + i, b + i, n) != 0) return static_cast<int64_t>(i);
  }
  return -1;
}

// Where an event stands in qemu-img's order: its chunk, then read errors
// of the first image, of the second, then the mismatch's offset.
int Rank(RangeOutcome::Kind kind) {
  switch (kind) {
    case RangeOutcome::Kind::kReadErrorFirst: return 0;
    case RangeOutcome::Kind::kReadErrorSecond: return 1;
    case RangeOutcome::Kind::kMismatch: return 2;
    case RangeOutcome::Kind::kSame: break;
  }
  return 3;
}

// One thread's first event, with the chunk it lies in.
struct Found {
  uint64_t chunk = UINT64_MAX;
  RangeOutcome outcome;
  auto Key() const { return std::make_tuple(chunk, Rank(outcome.kind), outcome.offset); }
};

}  // namespace

RangeComparer::RangeComparer(unsigned threads) : buffers_(std::max(1u, threads)) {
  for (Buffers& b : buffers_) {
    b.first.resize(kPiece);
    b.second.resize(kPiece);
  }
}

RangeOutcome RangeComparer::Compare(Image* first, Image* second, uint64_t offset, uint64_t len) {
  const uint64_t pieces = (len + kPiece - 1) / kPiece;
  const size_t threads = static_cast<size_t>(std::min<uint64_t>(buffers_.size(), pieces));
  // The earliest chunk an event was found in: pieces of later chunks cannot
  // change the outcome and are not read.
  std::atomic<uint64_t> decided{UINT64_MAX};
  std::vector<Found> found(threads);

  auto work = [&](size_t t) {
    Buffers& buf = buffers_[t];
    Found& mine = found[t];
    auto record = [&](uint64_t chunk, RangeOutcome::Kind kind, uint64_t at, Status error) {
      Found f{chunk, {kind, at, std::move(error)}};
      if (f.Key() < mine.Key()) mine = std::move(f);
      uint64_t seen = decided.load();
      while (chunk < seen && !decided.compare_exchange_weak(seen, chunk)) {
      }
    };
    for (uint64_t piece = t; piece < pieces; piece += threads) {
      const uint64_t at = offset + piece * kPiece;
      const uint64_t n = std::min(kPiece, offset + len - at);
      const uint64_t chunk = (at - offset) / kChunk;
      if (chunk > decided.load(std::memory_order_relaxed)) break;
      // After an event in this chunk only what qemu-img meets before it
      // can change the outcome: read errors before a mismatch, a read
      // error of the first image before one of the second.
      const int rank_to_beat = mine.chunk == chunk ? Rank(mine.outcome.kind) : 3;
      if (mine.chunk < chunk || rank_to_beat == 0) break;
      const uint64_t chunk_start = offset + chunk * kChunk;
      Status st = first->Read(at, buf.first.data(), static_cast<size_t>(n));
      if (!st.ok()) {
        record(chunk, RangeOutcome::Kind::kReadErrorFirst, chunk_start, std::move(st));
        continue;
      }
      if (second != nullptr && rank_to_beat > 1) {
        st = second->Read(at, buf.second.data(), static_cast<size_t>(n));
        if (!st.ok()) {
          record(chunk, RangeOutcome::Kind::kReadErrorSecond, chunk_start, std::move(st));
          continue;
        }
      }
      if (rank_to_beat < 3) continue;
      const int64_t diff = FirstDifference(buf.first.data(), second ? buf.second.data() : nullptr, n);
      if (diff >= 0) record(chunk, RangeOutcome::Kind::kMismatch, at + static_cast<uint64_t>(diff), Status::OK());
    }
  };

  std::vector<std::thread> helpers;
  std::vector<size_t> inline_work;  // where no thread could be started
  for (size_t t = 1; t < threads; t++) {
    try {
      helpers.emplace_back(work, t);
    } catch (const std::system_error&) {
      inline_work.push_back(t);
    }
  }
  work(0);
  for (size_t t : inline_work) work(t);
  for (std::thread& h : helpers) h.join();

  Found* best = &found[0];
  for (Found& f : found) {
    if (f.Key() < best->Key()) best = &f;
  }
  return best->outcome;
}

}  // namespace dmcow::cli
