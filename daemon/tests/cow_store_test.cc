// The cow plugin's mapping store on the host, without a kernel: format,
// attach, persistence, refusals of damaged COWs, allocation limits.
#include <catch2/catch.hpp>

#include <cerrno>
#include <cstring>

#include "cow/cow_store.h"
#include "dmcow/mem_env.h"

using dmcowd::cow::CowStore;
using dmcowd::cow::Header;

namespace {

constexpr uint32_t kCs = 8;                        // 4 KiB chunks
constexpr uint64_t kBaseSectors = 1000 * kCs + 3;  // the last chunk is short

CowStore::Options Opts(uint64_t base_sectors = kBaseSectors) {
  CowStore::Options o;
  o.base_sectors = base_sectors;
  o.chunk_sectors = kCs;
  return o;
}

std::unique_ptr<CowStore> MustOpen(dmcow::Env* env, const CowStore::Options& o, const std::string& path = "cow") {
  std::unique_ptr<CowStore> s;
  dmcow::Status st = CowStore::Open(env, path, o, &s);
  INFO(st.ToString());
  REQUIRE(st.ok());
  return s;
}

dmcow::Status TryOpen(dmcow::Env* env, const CowStore::Options& o) {
  std::unique_ptr<CowStore> s;
  return CowStore::Open(env, "cow", o, &s);
}

uint64_t Decide(CowStore* s, uint64_t chunk, uint64_t batch, bool* durable = nullptr) {
  CowStore::Decision d;
  REQUIRE(s->Decide(chunk, batch, &d).ok());
  REQUIRE(d.error == 0);
  if (durable) *durable = d.durable;
  return d.data_chunk;
}

void Put64(std::vector<uint8_t>* b, uint64_t off, uint64_t v) {
  for (int i = 0; i < 8; i++) (*b)[off + i] = static_cast<uint8_t>(v >> (8 * i));
}

}  // namespace

TEST_CASE("a new COW file is formatted sparse, with room for every chunk") {
  dmcow::MemEnv env;
  auto s = MustOpen(&env, Opts());
  const Header& h = s->header();
  CHECK(h.table_entries == 1001);
  CHECK(h.data_chunks == 1001);
  CHECK(h.data_offset % 4096 == 0);
  CHECK(h.data_offset >= 4096 + 1001 * 8);
  std::vector<uint8_t> bytes;
  REQUIRE(env.GetFile("cow", &bytes));
  CHECK(bytes.size() == h.end());
  CHECK(std::memcmp(bytes.data(), "DMCOWCOW", 8) == 0);
}

TEST_CASE("persisted mappings survive a reattach; undurable ones do not") {
  dmcow::MemEnv env;
  auto s = MustOpen(&env, Opts());
  const uint64_t a = Decide(s.get(), 3, 1);
  const uint64_t b = Decide(s.get(), 1000, 1);  // the short last chunk
  const uint64_t c = Decide(s.get(), 500, 2);
  CHECK(a != b);
  CHECK(Decide(s.get(), 3, 2) == a);  // asked again: the same place
  REQUIRE(s->Persist(1).ok());        // batch 2's data is not vouched for yet
  bool durable = false;
  Decide(s.get(), 3, 3, &durable);
  CHECK(durable);
  s.reset();

  s = MustOpen(&env, Opts());
  uint64_t where;
  REQUIRE(s->Lookup(3, &where, &durable));
  CHECK((where == a && durable));
  REQUIRE(s->Lookup(1000, &where, &durable));
  CHECK(where == b);
  CHECK_FALSE(s->Lookup(500, &where, &durable));
  (void)c;
  // Allocation restarts above the highest persisted chunk.
  CHECK(s->next_free() == std::max(a, b) + 1);
  std::vector<dmcowd::Extent> runs;
  s->PersistedRuns(&runs);
  CHECK(runs.size() == 2);
}

TEST_CASE("a retracted decision is never persisted") {
  dmcow::MemEnv env;
  auto s = MustOpen(&env, Opts());
  const uint64_t a = Decide(s.get(), 7, 1);
  s->Retract(7, a);
  const uint64_t b = Decide(s.get(), 7, 2);  // asked again later: a new place
  CHECK(b != a);
  REQUIRE(s->Persist(1).ok());  // the batch-1 item refers to the retracted decision
  uint64_t where;
  bool durable;
  REQUIRE(s->Lookup(7, &where, &durable));
  CHECK_FALSE(durable);
  REQUIRE(s->Persist(2).ok());
  s = MustOpen(&env, Opts());
  REQUIRE(s->Lookup(7, &where, &durable));
  CHECK(where == b);
}

TEST_CASE("consecutive chunks in consecutive places form one run") {
  dmcow::MemEnv env;
  auto s = MustOpen(&env, Opts());
  for (uint64_t c = 10; c < 20; c++) Decide(s.get(), c, 1);
  Decide(s.get(), 5, 1);
  for (uint64_t c = 20; c < 25; c++) Decide(s.get(), c, 1);
  REQUIRE(s->Persist(1).ok());
  std::vector<dmcowd::Extent> runs;
  s->PersistedRuns(&runs);
  REQUIRE(runs.size() == 3);
  CHECK((runs[0].chunk == 5 && runs[0].nr_chunks == 1));
  CHECK((runs[1].chunk == 10 && runs[1].nr_chunks == 10));
  CHECK((runs[2].chunk == 20 && runs[2].nr_chunks == 5));
  CHECK(runs[1].cow_sector == s->CowSector(0));
  CHECK(s->persisted_generation() == 1);
}

TEST_CASE("the allocation limit is durable before a chunk above it is handed out") {
  dmcow::MemEnv env;
  CowStore::Options o = Opts();
  o.alloc_step = 3;
  auto s = MustOpen(&env, o);
  CHECK(s->header().alloc_limit == 0);
  for (uint64_t c = 0; c < 7; c++) {
    const uint64_t d = Decide(s.get(), c, 1);
    // What is on disk already covers the chunk just handed out.
    std::vector<uint8_t> bytes;
    REQUIRE(env.GetFile("cow", &bytes));
    Header h;
    REQUIRE(dmcowd::cow::DecodeHeader(bytes.data(), bytes.size(), "cow", &h).ok());
    CHECK(h.alloc_limit > d);
  }
  CHECK(s->header().alloc_limit == 9);
}

TEST_CASE("a full COW refuses with ENOSPC") {
  dmcow::MemEnv env;
  // An existing 'device' of fixed size: header, table, two data chunks.
  CowStore::Options o = Opts(64 * kCs);
  o.format = true;
  env.PutFile("cow", std::vector<uint8_t>(4096 + 4096 + 2 * 4096, 0xab));
  auto s = MustOpen(&env, o);
  CHECK(s->header().data_chunks == 2);
  Decide(s.get(), 0, 1);
  Decide(s.get(), 1, 1);
  CowStore::Decision d;
  REQUIRE(s->Decide(2, 1, &d).ok());
  CHECK(d.error == ENOSPC);
  // The old content of the table area was zeroed by the format.
  s.reset();
  o.format = false;
  s = MustOpen(&env, o);
  uint64_t where;
  bool durable;
  CHECK_FALSE(s->Lookup(0, &where, &durable));
}

TEST_CASE("attaching checks the base, the chunk size and the header") {
  dmcow::MemEnv env;
  {
    auto s = MustOpen(&env, Opts());
    Decide(s.get(), 1, 1);
    Decide(s.get(), 2, 1);
    REQUIRE(s->Persist(1).ok());
  }
  std::vector<uint8_t> good;
  REQUIRE(env.GetFile("cow", &good));

  SECTION("another base size") {
    dmcow::Status st = TryOpen(&env, Opts(kBaseSectors + 8));
    CHECK(st.code() == dmcow::Status::Code::kInvalidArgument);
    CHECK(st.message().find("formatted for a base of 8003 sectors") != std::string::npos);
  }
  SECTION("another chunk size") {
    CowStore::Options o = Opts();
    o.chunk_sectors = 16;
    CHECK(TryOpen(&env, o).message().find("leave out --chunk-size") != std::string::npos);
    o.chunk_sectors = 0;  // the header's
    CHECK(TryOpen(&env, o).ok());
  }
  SECTION("foreign content needs --format") {
    std::vector<uint8_t> bytes(good.size(), 0);
    env.PutFile("cow", bytes);
    dmcow::Status st = TryOpen(&env, Opts());
    CHECK(st.message().find("--format") != std::string::npos);
  }
  SECTION("a damaged header is corrupt") {
    good[30] ^= 1;
    env.PutFile("cow", good);
    CHECK(TryOpen(&env, Opts()).message() == "cow: cow header: checksum mismatch");
  }
  SECTION("a newer version is not supported") {
    good[8] = 2;
    env.PutFile("cow", good);
    CHECK(TryOpen(&env, Opts()).IsNotSupported());
  }
  SECTION("a truncated COW is corrupt") {
    good.resize(good.size() - 4096);
    env.PutFile("cow", good);
    CHECK(TryOpen(&env, Opts()).message().find("beyond the end of the COW") != std::string::npos);
  }
  SECTION("a mapping beyond the data area is corrupt") {
    Put64(&good, 4096 + 5 * 8, 1002);
    env.PutFile("cow", good);
    CHECK(TryOpen(&env, Opts()).message() ==
          "cow: cow table: chunk 5 maps to data chunk 1001, beyond the data area (1001 chunks)");
  }
  SECTION("a data chunk mapped twice is corrupt") {
    Put64(&good, 4096 + 9 * 8, 1);
    env.PutFile("cow", good);
    CHECK(TryOpen(&env, Opts()).message() ==
          "cow: cow table: data chunk 0 is mapped twice (the second time by chunk 9)");
  }
}
