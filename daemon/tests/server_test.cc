// The event loop's batch handling against a fake kernel: one write per
// batch, flush epochs, refused replies, errors.
#include <catch2/catch.hpp>

#include <cerrno>

#include "server.h"

using namespace dmcowd;

namespace {

class FakeKernel final : public ReplySink {
 public:
  ssize_t Write(const dmcow_reply* replies, size_t n) override {
    calls.push_back(n);
    for (size_t i = 0; i < n; i++) {
      if (replies[i].seq == refuse_seq && refusals > 0) {
        refusals--;
        return i ? static_cast<ssize_t>(i * sizeof(dmcow_reply)) : -refuse_errno;
      }
      applied.push_back(replies[i]);
    }
    return static_cast<ssize_t>(n * sizeof(dmcow_reply));
  }
  std::vector<size_t> calls;
  std::vector<dmcow_reply> applied;
  uint64_t refuse_seq = 0;
  int refusals = 0;
  int refuse_errno = EINVAL;
};

class FakePlugin final : public Plugin {
 public:
  Status Open(DeviceSpec*) override { return Status::OK(); }
  Status InitialMappings(std::vector<Mapping>*) override { return Status::OK(); }
  Status Map(const MapRequest& req, Answer* a) override {
    maps.push_back(req);
    if (req.chunk == 66) return Status::IOError("disk on fire");
    if (req.chunk == 77) {
      a->error = ENOSPC;
      return Status::OK();
    }
    a->mapping = Mapping{req.write ? MapKind::kRW : MapKind::kBase, req.chunk, 1, req.write ? 8 * req.chunk : 0};
    return Status::OK();
  }
  void Retract(const MapRequest& req, const Mapping&) override { retracted.push_back(req.chunk); }
  Status Flush(uint64_t durable_batch) override {
    flushes.push_back(durable_batch);
    return fail_flush ? Status::IOError("sync failed") : Status::OK();
  }
  Status StableExtents(std::vector<Extent>*) override { return Status::OK(); }
  uint64_t StableGeneration() const override { return 0; }
  Status Close() override { return Status::OK(); }

  std::vector<MapRequest> maps;
  std::vector<uint64_t> retracted;
  std::vector<uint64_t> flushes;
  bool fail_flush = false;
};

dmcow_request Req(uint64_t seq, uint32_t kind, uint64_t chunk = 0) {
  dmcow_request r{};
  r.seq = seq;
  r.kind = kind;
  r.chunk = chunk;
  if (kind != DMCOW_REQ_FLUSH) r.nr_chunks = 1;
  return r;
}

}  // namespace

TEST_CASE("a batch is answered in order with one write") {
  FakeKernel k;
  FakePlugin p;
  std::mutex mu;
  Server s(&k, &p, &mu);
  dmcow_request reqs[] = {Req(1, DMCOW_REQ_MAP_WRITE, 5), Req(2, DMCOW_REQ_MAP_READ, 6),
                          Req(3, DMCOW_REQ_MAP_WRITE, 7)};
  reqs[2].flags = DMCOW_REQ_F_FULL_CHUNK;
  REQUIRE(s.ProcessBatch(reqs, 3).ok());
  REQUIRE(k.calls == std::vector<size_t>{3});
  REQUIRE(k.applied.size() == 3);
  CHECK((k.applied[0].kind == DMCOW_REP_MAP && k.applied[0].map == DMCOW_MAP_RW && k.applied[0].seq == 1));
  CHECK(k.applied[0].cow_sector == 40);
  CHECK((k.applied[1].map == DMCOW_MAP_BASE && k.applied[1].cow_sector == 0));
  REQUIRE(p.maps.size() == 3);
  CHECK((p.maps[0].write && !p.maps[1].write && p.maps[2].full_chunk && !p.maps[0].full_chunk));
  CHECK(p.maps[0].batch == 1);
}

TEST_CASE("a FLUSH read in batch b persists batches before b") {
  FakeKernel k;
  FakePlugin p;
  std::mutex mu;
  Server s(&k, &p, &mu);
  dmcow_request b1[] = {Req(1, DMCOW_REQ_MAP_WRITE, 1)};
  dmcow_request b2[] = {Req(2, DMCOW_REQ_MAP_WRITE, 2), Req(3, DMCOW_REQ_FLUSH)};
  REQUIRE(s.ProcessBatch(b1, 1).ok());
  REQUIRE(s.ProcessBatch(b2, 2).ok());
  REQUIRE(p.flushes == std::vector<uint64_t>{1});  // not batch 2: its replies were not out yet
  CHECK(p.maps[1].batch == 2);
  CHECK((k.applied.back().kind == DMCOW_REP_FLUSH_ACK && k.applied.back().seq == 3));

  p.fail_flush = true;
  dmcow_request b3[] = {Req(4, DMCOW_REQ_FLUSH)};
  REQUIRE(s.ProcessBatch(b3, 1).ok());
  CHECK((k.applied.back().kind == DMCOW_REP_ERROR && k.applied.back().error == EIO));
}

TEST_CASE("a refused reply is retracted and answered with an error") {
  FakeKernel k;
  FakePlugin p;
  std::mutex mu;
  Server s(&k, &p, &mu);
  k.refuse_seq = 2;
  k.refusals = 2;  // the batch write, then the resend that learns the errno
  dmcow_request reqs[] = {Req(1, DMCOW_REQ_MAP_WRITE, 1), Req(2, DMCOW_REQ_MAP_WRITE, 2),
                          Req(3, DMCOW_REQ_MAP_WRITE, 3)};
  REQUIRE(s.ProcessBatch(reqs, 3).ok());
  CHECK(p.retracted == std::vector<uint64_t>{2});
  REQUIRE(k.applied.size() == 3);
  CHECK(k.applied[0].seq == 1);
  CHECK((k.applied[1].seq == 2 && k.applied[1].kind == DMCOW_REP_ERROR && k.applied[1].error == EIO));
  CHECK(k.applied[2].seq == 3);
  CHECK(s.stats().refused == 1);
}

TEST_CASE("plugin failures and refusals become ERROR replies") {
  FakeKernel k;
  FakePlugin p;
  std::mutex mu;
  Server s(&k, &p, &mu);
  dmcow_request reqs[] = {Req(1, DMCOW_REQ_MAP_WRITE, 66), Req(2, DMCOW_REQ_MAP_WRITE, 77), Req(3, 99)};
  REQUIRE(s.ProcessBatch(reqs, 3).ok());
  REQUIRE(k.applied.size() == 3);
  CHECK((k.applied[0].kind == DMCOW_REP_ERROR && k.applied[0].error == EIO));
  CHECK(k.applied[1].error == ENOSPC);
  CHECK(k.applied[2].error == EINVAL);
}
