#include "convert_job.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <system_error>
#include <thread>

namespace dmcow::cli {
namespace {
constexpr uint64_t kMinChunk = 2 << 20;
constexpr uint64_t kSector = 512;
}  // namespace

ConvertJob::ConvertJob(const ConvertSettings& settings) : s_(settings) {
  for (Image* src : s_.sources) total_size_ += src->virtual_size();
  chunk_size_ = std::max(kMinChunk, s_.cluster_size);
}

bool ConvertJob::Run(std::string* error) {
  std::vector<std::thread> threads;
  try {
    for (int i = 0; i < std::max(1, s_.threads); i++) threads.emplace_back([this] { Worker(); });
  } catch (const std::system_error& e) {  // fewer threads: those started do it all
    if (threads.empty()) Fail(std::string("cannot start a thread: ") + e.what());
  }
  for (auto& t : threads) t.join();
  if (error_.empty()) {
    Status st = s_.target->Flush();
    if (!st.ok()) Fail("error while flushing the output: " + st.ToString());
  }
  *error = error_;
  return error_.empty();
}

// Workers plan chunks in parallel. For ordered targets a planned chunk is
// parked until every earlier chunk is applied; whichever worker parks the
// next chunk in order applies it and any that follow, outside the lock, while
// the others keep planning. At most kMaxParked chunks wait, so memory stays
// bounded; a worker whose chunk cannot be parked waits for the applier.
void ConvertJob::Worker() {
  try {
    while (!failed_.load()) {
      Planned p;
      {
        std::lock_guard<std::mutex> lock(plan_mu_);
        if (!PlanNext(&p)) break;
      }
      const uint64_t index = p.index;
      if (!p.hole) {
        {
          std::lock_guard<std::mutex> lock(mu_);
          if (!spare_buffers_.empty()) {
            p.buf = std::move(spare_buffers_.back());
            spare_buffers_.pop_back();
          }
        }
        p.buf.resize(chunk_size_);
      }
      if (!ProcessChunk(&p)) {
        Fail("");
        break;
      }
      if (!s_.ordered_writes) {
        PrintWarnings(p);
        if (!Apply(p.ops, p.buf.data())) break;
        Applied(p);
        if (!p.buf.empty()) {
          std::lock_guard<std::mutex> lock(mu_);
          spare_buffers_.push_back(std::move(p.buf));
        }
        continue;
      }
      std::unique_lock<std::mutex> lock(mu_);
      applied_.wait(lock, [&] { return failed_.load() || parked_.size() < kMaxParked || index == next_to_apply_; });
      if (failed_.load()) break;
      parked_.emplace(index, std::move(p));
      if (applying_) continue;  // the current applier will reach it
      applying_ = true;
      for (auto it = parked_.find(next_to_apply_); it != parked_.end(); it = parked_.find(next_to_apply_)) {
        Planned q = std::move(it->second);
        parked_.erase(it);
        lock.unlock();
        PrintWarnings(q);
        const bool ok = Apply(q.ops, q.buf.data());
        if (ok) Applied(q);
        lock.lock();
        if (!ok) break;
        next_to_apply_++;
        if (!q.buf.empty()) spare_buffers_.push_back(std::move(q.buf));
        applied_.notify_all();
      }
      applying_ = false;
    }
  } catch (const std::exception& e) {  // e.g. bad_alloc: nothing may leave a thread
    Fail(e.what());
  }
}

void ConvertJob::Applied(const Planned& p) {
  std::lock_guard<std::mutex> lock(progress_mu_);
  s_.progress->Advance(static_cast<float>(p.end - p.start) * 100.0f / static_cast<float>(total_size_));
}

bool ConvertJob::HasData(const std::vector<Extent>& extents) const {
  for (const Extent& e : extents) {
    // With -S 0 zeros are written as data too (a fully allocated target).
    if (e.state == State::kData || (e.state == State::kZero && s_.min_sparse == 0)) return true;
  }
  return false;
}

// Chunks with data are planned one at a time, as they always were. A chunk
// without data starts a hole piece, extended by whole chunks while one
// block-status run covers them: a run that ends inside a chunk leaves that
// chunk to be planned as a chunk, so every chunk with data is cut and
// scanned exactly as in a walk of fixed chunks.
bool ConvertJob::PlanNext(Planned* p) {
  if (failed_.load() || plan_pos_ >= total_size_) return false;
  p->index = plan_index_++;
  p->start = plan_pos_;
  p->end = std::min(plan_pos_ + chunk_size_, total_size_);
  if (!Describe(p->start, p->end, &p->extents, &p->warnings)) return false;
  p->hole = s_.plan_holes && !HasData(p->extents);
  while (p->hole && p->end < total_size_ && p->extents.size() < kMaxHoleExtents) {
    // Asked first for the next chunk only, so that a long data run after
    // the hole is not scanned to its end here, under the lock; then, if the
    // hole goes on, for the whole run.
    Extent run;
    const uint64_t next_end = std::min(total_size_, p->end + chunk_size_);
    if (!DescribeRun(p->end, next_end, &run, &p->warnings)) return false;
    if (HasData({run}) || run.offset + run.length < next_end) break;
    if (next_end < total_size_ && !DescribeRun(p->end, total_size_, &run, &p->warnings)) return false;
    const uint64_t run_end = run.offset + run.length;
    const uint64_t whole = run_end == total_size_ ? run_end : run_end / chunk_size_ * chunk_size_;
    if (whole <= p->end) break;
    run.length = whole - run.offset;
    Extent& last = p->extents.back();
    if (last.state == run.state && last.offset + last.length == run.offset) {
      last.length += run.length;
    } else {
      p->extents.push_back(run);
    }
    p->end = whole;
  }
  plan_pos_ = p->end;
  return true;
}

bool ConvertJob::Fail(const std::string& msg) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (error_.empty() && !msg.empty()) error_ = msg;
    failed_.store(true);
  }
  applied_.notify_all();
  return false;
}

// The state of the first run of [offset, end), in target coordinates.
bool ConvertJob::DescribeRun(uint64_t offset, uint64_t end, Extent* out, std::vector<std::string>* warnings) {
  uint64_t base = 0;
  for (Image* src : s_.sources) {
    const uint64_t size = src->virtual_size();
    if (offset >= base + size) {
      base += size;
      continue;
    }
    const uint64_t in_src = offset - base;
    const uint64_t max_len = std::min(end, base + size) - offset;
    uint64_t len = 0;
    State state = State::kData;
    auto query = [&](uint64_t ask) {
      Status st;
      if (s_.top_layer_only) {
        LayerExtent e;
        st = src->GetLayerStatus(in_src, ask, &e);
        len = e.length;
        state = e.state == ClusterState::kZero || e.host_hole ? State::kZero
                : e.state != ClusterState::kUnallocated       ? State::kData
                : src->backing()                              ? State::kSkip
                                                              : State::kZero;
      } else {
        MapExtent e;
        st = GetMapExtent(src, in_src, ask, &e);
        len = e.length;
        state = e.zero ? State::kZero : State::kData;
      }
      if (st.ok() && len == 0) st = Status::Corrupt("empty block status");
      return st;
    };
    uint64_t ask = max_len;
    for (Status st = query(ask); !st.ok(); st = query(ask)) {
      const std::string what = "error while reading block status at offset " + std::to_string(in_src) + ": ";
      if (!s_.salvage) return Fail(what + st.ToString());
      const uint64_t sectors = (ask + kSector - 1) / kSector;
      if (sectors > 1) {  // a shorter question, as qemu-img asks
        ask = std::min(max_len, (sectors + 3) / 4 * kSector);
        continue;
      }
      warnings->push_back("warning: " + what + st.ToString());
      len = ask;  // one sector, or what is left of the source: read it as data
      state = State::kData;
      break;
    }
    *out = Extent{offset, std::min(len, max_len), state};
    return true;
  }
  return Fail("error while reading block status at offset " + std::to_string(offset) + ": beyond the end");
}

// The state of each run of [offset, end), in target coordinates.
bool ConvertJob::Describe(uint64_t offset, uint64_t end, std::vector<Extent>* out, std::vector<std::string>* warnings) {
  out->clear();
  while (offset < end) {
    Extent e;
    if (!DescribeRun(offset, end, &e, warnings)) return false;
    if (!out->empty() && out->back().state == e.state && out->back().offset + out->back().length == offset) {
      out->back().length += e.length;
    } else {
      out->push_back(e);
    }
    offset += e.length;
  }
  return true;
}

bool ConvertJob::ReadGuest(uint64_t offset, uint8_t* buf, uint64_t len, std::vector<std::string>* warnings) {
  uint64_t base = 0;
  for (Image* src : s_.sources) {
    const uint64_t size = src->virtual_size();
    if (len > 0 && offset < base + size) {
      const uint64_t n = std::min(len, base + size - offset);
      if (!ReadSource(src, offset, offset - base, buf, n, warnings)) return false;
      offset += n;
      buf += n;
      len -= n;
    }
    base += size;
  }
  return true;
}

bool ConvertJob::ReadSource(Image* src, uint64_t offset, uint64_t in_src, uint8_t* buf, uint64_t len,
                            std::vector<std::string>* warnings) {
  Status st = src->Read(in_src, buf, static_cast<size_t>(len));
  if (st.ok()) return true;
  if (!s_.salvage) return Fail("error while reading at byte " + std::to_string(offset) + ": " + st.ToString());
  for (uint64_t done = 0; done < len; done += kSector) {
    const uint64_t n = std::min(kSector, len - done);
    st = src->Read(in_src + done, buf + done, static_cast<size_t>(n));
    if (st.ok()) continue;
    std::memset(buf + done, 0, n);
    warnings->push_back("warning: error while reading offset " + std::to_string(in_src + done) + ": " + st.ToString());
  }
  return true;
}

void ConvertJob::PrintWarnings(const Planned& p) {
  if (s_.quiet) return;
  for (const std::string& w : p.warnings) PrintError(w);
}

void ConvertJob::AddData(uint64_t start, uint64_t offset, uint64_t length, std::vector<Op>* ops) const {
  if (length == 0) return;
  if (!ops->empty() && ops->back().kind == Kind::kData && ops->back().offset + ops->back().length == offset) {
    ops->back().length += length;
  } else {
    ops->push_back(Op{Kind::kData, offset, length, static_cast<size_t>(offset - start)});
  }
}

void ConvertJob::AddZero(uint64_t offset, uint64_t length, std::vector<Op>* ops) const {
  if (s_.zero_init || length == 0) return;
  if (!ops->empty() && ops->back().kind == Kind::kZero && ops->back().offset + ops->back().length == offset) {
    ops->back().length += length;
    return;
  }
  ops->push_back(Op{Kind::kZero, offset, length});
}

bool ConvertJob::ProcessChunk(Planned* p) {
  if (p->hole) {  // zero runs and -B skips only: what a chunk walk would plan for each chunk
    for (const Extent& e : p->extents) {
      if (e.state == State::kZero) AddZero(e.offset, e.length, &p->ops);
    }
    return true;
  }
  if (s_.compress) {
    PlanCompressed(p);
    return !failed_.load();
  }
  return PlanPlain(p);
}

// Data is written except its zero runs, which need no write on a target that
// starts zeroed (qemu-img's is_allocated_sectors_min): runs that are zero in
// the source's block status, runs at the edges of a chunk, and inner runs of
// at least min_sparse bytes. Runs are made of granules aligned in the
// target: sectors for raw targets, clusters for qcow ones, whose zero runs
// only save space when they cover whole clusters.
bool ConvertJob::PlanPlain(Planned* p) {
  const uint64_t start = p->start;
  const std::vector<Extent>& extents = p->extents;
  std::vector<uint8_t>* buf = &p->buf;
  std::vector<Op>* ops = &p->ops;
  const uint64_t end = std::min(start + chunk_size_, total_size_);
  bool any_data = false, any_skip = false;
  for (const Extent& e : extents) {
    any_data |= e.state == State::kData;
    any_skip |= e.state == State::kSkip;
  }
  if (s_.min_sparse == 0 || any_skip || !any_data) {
    // Extent by extent: -S 0 writes everything as data; with -B, ranges
    // left to the backing file must not be touched; zero-only chunks need
    // no scan.
    for (const Extent& e : extents) {
      uint8_t* at = buf->data() + (e.offset - start);
      if (e.state == State::kSkip) continue;
      if (e.state == State::kZero && s_.min_sparse != 0) {
        AddZero(e.offset, e.length, ops);
        continue;
      }
      if (e.state == State::kZero) {
        std::memset(at, 0, e.length);
      } else if (!ReadGuest(e.offset, at, e.length, &p->warnings)) {
        return false;
      }
      if (s_.min_sparse == 0) {
        AddData(start, e.offset, e.length, ops);
      } else {
        PlanZeroRuns(start, e.offset, e.offset + e.length, nullptr, buf->data(), ops);
      }
    }
    return true;
  }
  // Granules entirely inside zero extents are known to be zero; the others
  // are scanned.
  const uint64_t g = std::max(kSector, s_.cluster_size);
  std::vector<char> known_zero((end - start + g - 1) / g, 0);
  for (const Extent& e : extents) {
    uint8_t* at = buf->data() + (e.offset - start);
    if (e.state == State::kData) {
      if (!ReadGuest(e.offset, at, e.length, &p->warnings)) return false;
      continue;
    }
    std::memset(at, 0, e.length);
    const uint64_t e_end = e.offset + e.length;
    for (uint64_t at_g = (e.offset + g - 1) / g * g; at_g < e_end && at_g < end; at_g += g) {
      if (std::min(at_g + g, end) <= e_end) known_zero[(at_g - start) / g] = 1;
    }
  }
  PlanZeroRuns(start, start, end, &known_zero, buf->data(), ops);
  return true;
}

void ConvertJob::PlanZeroRuns(uint64_t start, uint64_t from, uint64_t to, const std::vector<char>* known_zero,
                              const uint8_t* buf, std::vector<Op>* ops) {
  const uint64_t g = std::max(kSector, s_.cluster_size);
  auto piece_end = [&](uint64_t p) { return std::min(to, (p / g + 1) * g); };
  auto known = [&](uint64_t p) { return known_zero && (*known_zero)[(p - start) / g]; };
  // A partial granule is zero only at the image's end: for a qcow target,
  // writing it whole is cheaper than a copy-on-write.
  auto piece_zero = [&](uint64_t p) {
    if (known(p)) return true;
    const uint64_t n = piece_end(p) - p;
    const bool whole = n == g || (p % g == 0 && p + n == total_size_);
    if (s_.cluster_size > kSector && !whole) return false;
    return IsZero(buf + (p - start), n);
  };
  uint64_t pos = from;
  while (pos < to) {
    const uint64_t zero_start = pos;
    while (pos < to && piece_zero(pos)) pos = piece_end(pos);
    AddZero(zero_start, pos - zero_start, ops);
    if (pos == to) break;
    // Data, extended over inner zero runs that are short and not known zero.
    uint64_t data_end = pos, scan = pos;
    while (scan < to) {
      if (!piece_zero(scan)) {
        scan = data_end = piece_end(scan);
        continue;
      }
      const uint64_t run = scan;
      bool has_known = false;
      while (scan < to && piece_zero(scan)) {
        has_known |= known(scan);
        scan = piece_end(scan);
      }
      if (scan - run >= s_.min_sparse || scan == to || has_known) break;
    }
    AddData(start, pos, data_end - pos, ops);
    pos = data_end;
  }
}

// Whole clusters: a cluster with any data is read entirely (through the
// chain), and stored compressed unless it is all zeros or does not shrink.
void ConvertJob::PlanCompressed(Planned* p) {
  const uint64_t start = p->start;
  const std::vector<Extent>& extents = p->extents;
  std::vector<uint8_t>* buf = &p->buf;
  std::vector<Op>* ops = &p->ops;
  const uint64_t cs = s_.cluster_size;
  const uint64_t end = std::min(start + chunk_size_, total_size_);
  size_t next = 0;
  for (uint64_t c = start; c < end; c += cs) {
    const uint64_t c_end = std::min(c + cs, end);
    while (next < extents.size() && extents[next].offset + extents[next].length <= c) next++;
    bool any_data = false;
    for (size_t i = next; i < extents.size() && extents[i].offset < c_end; i++) {
      any_data |= extents[i].state == State::kData || (s_.min_sparse == 0 && extents[i].state == State::kZero);
    }
    uint8_t* at = buf->data() + (c - start);
    if (!any_data) {
      for (size_t i = next; i < extents.size() && extents[i].offset < c_end; i++) {
        if (extents[i].state != State::kZero) continue;
        const uint64_t from = std::max(c, extents[i].offset);
        AddZero(from, std::min(c_end, extents[i].offset + extents[i].length) - from, ops);
      }
      continue;
    }
    if (!ReadGuest(c, at, c_end - c, &p->warnings)) return;
    std::memset(at + (c_end - c), 0, cs - (c_end - c));
    if (s_.min_sparse != 0 && IsZero(at, cs)) {
      AddZero(c, c_end - c, ops);
      continue;
    }
    Op op{Kind::kCompressed, c, c_end - c, static_cast<size_t>(c - start)};
    if (!CompressCluster(s_.compression, at, cs, &op.payload)) op.kind = Kind::kData;
    ops->push_back(std::move(op));
  }
}

bool ConvertJob::Apply(const std::vector<Op>& ops, const uint8_t* buf) {
  for (const Op& op : ops) {
    Status st;
    switch (op.kind) {
      case Kind::kData:
        if (s_.rate_limiter) s_.rate_limiter->Account(op.length);
        st = s_.target->Write(op.offset, buf + op.buf_offset, static_cast<size_t>(op.length));
        break;
      case Kind::kZero: st = s_.target->WriteZeroesMayUnmap(op.offset, op.length); break;
      case Kind::kCompressed:
        if (s_.rate_limiter) s_.rate_limiter->Account(op.payload.size());
        st = s_.target->WriteCompressedCluster(op.offset, op.payload.data(), op.payload.size());
        break;
    }
    if (!st.ok()) return Fail("error while writing at byte " + std::to_string(op.offset) + ": " + st.ToString());
  }
  return true;
}

}  // namespace dmcow::cli
