#include "range_compare.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
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

// Where an event stands within its chunk, in qemu-img's order.
int Rank(RangeOutcome::Kind kind) {
  switch (kind) {
    case RangeOutcome::Kind::kReadErrorFirst: return 0;
    case RangeOutcome::Kind::kReadErrorSecond: return 1;
    case RangeOutcome::Kind::kMismatch: return 2;
    case RangeOutcome::Kind::kSame: break;
  }
  return 3;
}

// One thread's first event: its chunk, and where in it (a read error: the
// piece that failed, so that the error's own text does not depend on how
// pieces were dealt; a mismatch: its block).
struct Found {
  uint64_t chunk = UINT64_MAX;
  uint64_t where = 0;
  RangeOutcome outcome;
  std::exception_ptr thrown;  // the read threw: worded after the threads end
  auto Key() const { return std::make_tuple(chunk, Rank(outcome.kind), where); }
};

// A thrown read's error text (out of memory, most likely).
Status ThrownReadError(const std::exception_ptr& thrown) {
  try {
    std::rethrow_exception(thrown);
  } catch (const std::exception& e) {
    return Status::IOError(std::string("cannot read: ") + e.what());
  } catch (...) {
  }
  return Status::IOError("cannot read: unknown failure");
}

}  // namespace

RangeComparer::RangeComparer(Image* first, Image* second, unsigned threads)
    : first_(first), second_(second), buffers_(std::max(1u, threads)) {}

void RangeComparer::Add(uint64_t offset, uint64_t len, bool first_zero, bool second_zero, bool whole_chunks) {
  const bool read_first = !first_zero, read_second = second_ != nullptr && !second_zero;
  queued_ += len;
  if (!read_first && !read_second) return;  // zeros against zeros
  const uint64_t piece = whole_chunks ? kChunk : kPiece;
  for (uint64_t chunk_start = offset; chunk_start < offset + len; chunk_start += kChunk) {
    const uint64_t chunk_end = std::min(offset + len, chunk_start + kChunk);
    for (uint64_t at = chunk_start; at < chunk_end; at += piece) {
      pieces_.push_back({at, std::min(piece, chunk_end - at), chunks_, chunk_start, read_first, read_second});
    }
    chunks_++;
  }
}

RangeOutcome RangeComparer::Flush() {
  const size_t threads = std::min(buffers_.size(), pieces_.size());
  queued_ = 0;
  if (threads == 0) return {};
  // The earliest chunk an event was found in: pieces of later chunks cannot
  // change the outcome and are not read.
  std::atomic<uint64_t> decided{UINT64_MAX};
  std::vector<Found> found(threads);

  // Nothing may leave a thread: a read that throws (out of memory) is that
  // piece's read error, recorded without allocating and worded after the
  // threads end.
  auto work = [&](size_t t) {
    Buffers& buf = buffers_[t];
    Found& mine = found[t];
    auto record = [&](const Piece& p, RangeOutcome::Kind kind, uint64_t where, Status error,
                      std::exception_ptr thrown = nullptr) {
      const uint64_t at = kind == RangeOutcome::Kind::kMismatch ? where : p.chunk_start;
      Found f{p.chunk, where, {kind, at, std::move(error)}, std::move(thrown)};
      if (f.Key() < mine.Key()) mine = std::move(f);
      uint64_t seen = decided.load();
      while (p.chunk < seen && !decided.compare_exchange_weak(seen, p.chunk)) {
      }
    };
    for (size_t i = t; i < pieces_.size(); i += threads) {
      const Piece& p = pieces_[i];
      if (p.chunk > decided.load(std::memory_order_relaxed)) break;
      // After an event in this chunk only what qemu-img meets before it
      // can change the outcome: read errors before a mismatch, a read
      // error of the first image before one of the second.
      const int rank_to_beat = mine.chunk == p.chunk ? Rank(mine.outcome.kind) : 3;
      if (rank_to_beat == 0) break;
      auto kind = RangeOutcome::Kind::kReadErrorFirst;
      try {
        const char* data = nullptr;     // what is checked
        const char* against = nullptr;  // null: zeros
        if (p.read_first) {
          if (buf.first.size() < p.len) buf.first.resize(std::max(p.len, kPiece));
          Status st = first_->Read(p.offset, buf.first.data(), static_cast<size_t>(p.len));
          if (!st.ok()) {
            record(p, kind, p.offset, std::move(st));
            continue;
          }
          data = buf.first.data();
        }
        if (p.read_second && rank_to_beat > 1) {
          kind = RangeOutcome::Kind::kReadErrorSecond;
          if (buf.second.size() < p.len) buf.second.resize(std::max(p.len, kPiece));
          Status st = second_->Read(p.offset, buf.second.data(), static_cast<size_t>(p.len));
          if (!st.ok()) {
            record(p, kind, p.offset, std::move(st));
            continue;
          }
          if (data == nullptr) {
            data = buf.second.data();
          } else {
            against = buf.second.data();
          }
        }
        if (rank_to_beat < 3 || data == nullptr) continue;
        const int64_t diff = FirstDifference(data, against, p.len);
        if (diff >= 0) record(p, RangeOutcome::Kind::kMismatch, p.offset + static_cast<uint64_t>(diff), Status::OK());
      } catch (...) {
        record(p, kind, p.offset, Status::OK(), std::current_exception());
      }
    }
  };

  std::vector<std::thread> helpers;
  std::vector<size_t> inline_work;  // where no thread could be started
  helpers.reserve(threads);
  inline_work.reserve(threads);
  for (size_t t = 1; t < threads; t++) {
    try {
      helpers.emplace_back(work, t);
    } catch (...) {
      inline_work.push_back(t);  // reserved: cannot throw
    }
  }
  work(0);
  for (size_t t : inline_work) work(t);
  for (std::thread& h : helpers) h.join();
  pieces_.clear();
  chunks_ = 0;

  Found* best = &found[0];
  for (Found& f : found) {
    if (f.Key() < best->Key()) best = &f;
  }
  if (best->thrown) best->outcome.error = ThrownReadError(best->thrown);
  return std::move(best->outcome);
}

}  // namespace dmcow::cli
