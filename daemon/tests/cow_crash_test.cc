// Crash simulation for the cow plugin's ordering (daemon/DESIGN.md): the
// power fails after the k-th write or sync, for every k, and unsynced writes
// are applied, dropped or torn per 512-byte sector (tests/crash_env.h).
// The store plays its part as under the kernel: a write's mapping is
// decided in one batch, its data written after the reply; a flush syncs the
// data (the kernel's cow flush) and then persists batches < the FLUSH's.
// After the crash the COW must attach, every flushed write must be there,
// and every mapping must point at data written for its chunk.
#include <catch2/catch.hpp>

#include <cstring>
#include <random>

#include "cow/cow_store.h"
#include "crash_env.h"
#include "dmcow/mem_env.h"

using dmcow_test::CrashEnv;
using dmcowd::cow::CowStore;

namespace {

constexpr uint32_t kCs = 8;        // 4 KiB chunks, 8 sectors
constexpr uint64_t kChunks = 150;  // a table of 3 sectors
constexpr uint64_t kSectors = kChunks * kCs;

// Sector `s` of a chunk's data for write `version`.
void Tag(uint8_t* p, uint64_t chunk, uint32_t version, unsigned s) {
  std::memset(p, 0, 512);
  std::memcpy(p, &chunk, 8);
  std::memcpy(p + 8, &version, 4);
  p[12] = static_cast<uint8_t>(s);
  p[511] = 0x5a;
}

struct Model {
  std::vector<uint32_t> latest;   // newest write issued per chunk (0: none)
  std::vector<uint32_t> flushed;  // newest write a completed flush covers
};

CowStore::Options Opts() {
  CowStore::Options o;
  o.base_sectors = kSectors;
  o.chunk_sectors = kCs;
  o.alloc_step = 5;
  return o;
}

// Runs a seeded sequence until the power fails (or to the end).
Model RunUntilCrash(CrashEnv* env, uint64_t seed) {
  Model m{std::vector<uint32_t>(kChunks, 0), std::vector<uint32_t>(kChunks, 0)};
  std::unique_ptr<CowStore> store;
  if (!CowStore::Open(env, "cow", Opts(), &store).ok()) return m;
  std::unique_ptr<dmcow::File> cow;
  if (!env->OpenFile("cow", dmcow::OpenMode::kReadWrite, &cow).ok()) return m;
  std::mt19937_64 rng(seed);
  uint64_t batch = 0;
  uint32_t version = 0;
  uint8_t sector[512];

  // The kernel's part of a write: the data reaches the chunk's location.
  auto write_data = [&](uint64_t chunk, uint64_t data_chunk) {
    const uint32_t v = ++version;
    m.latest[chunk] = v;  // in flight: any of its sectors may land
    const uint64_t off = store->header().DataOffset(data_chunk);
    for (unsigned s = 0; s < kCs; s++) {
      Tag(sector, chunk, v, s);
      if (!cow->Write(off + s * 512, sector, 512).ok()) return false;
    }
    return true;
  };
  auto decide = [&](uint64_t chunk, uint64_t* data_chunk) {
    CowStore::Decision d;
    if (!store->Decide(chunk, batch, &d).ok() || d.error) return false;
    *data_chunk = d.data_chunk;
    return true;
  };

  for (int op = 0; op < 60; op++) {
    const uint64_t chunk = rng() % 12 < 9 ? rng() % 20 : rng() % kChunks;  // mostly a hot set
    if (rng() % 4) {
      // A write: its MAP_WRITE in a new batch, the data once the reply is out.
      batch++;
      uint64_t d;
      if (!decide(chunk, &d) || !write_data(chunk, d)) return m;
    } else {
      // A flush: the kernel syncs the data, then the FLUSH is read in a new
      // batch, maybe with a MAP_WRITE before it in the same batch.
      if (!cow->Sync().ok()) return m;
      batch++;
      const bool same_batch = rng() % 2;
      uint64_t d = 0;
      if (same_batch && !decide(chunk, &d)) return m;
      const std::vector<uint32_t> before = m.latest;
      if (!store->Persist(batch - 1).ok()) return m;
      m.flushed = before;  // acknowledged: every write completed before is durable
      if (same_batch && !write_data(chunk, d)) return m;
    }
  }
  return m;
}

uint32_t VersionOf(const uint8_t* p, uint64_t chunk, unsigned s) {
  uint64_t c;
  uint32_t v;
  std::memcpy(&c, p, 8);
  std::memcpy(&v, p + 8, 4);
  if (c != chunk || p[12] != s || p[511] != 0x5a) return 0;
  return v;
}

void CheckCrashed(const std::vector<uint8_t>& disk, const Model& m) {
  dmcow::MemEnv env;
  env.PutFile("cow", disk);
  std::unique_ptr<CowStore> store;
  dmcow::Status st = CowStore::Open(&env, "cow", Opts(), &store);
  INFO(st.ToString());
  REQUIRE(st.ok());  // never torn or inconsistent metadata
  for (uint64_t c = 0; c < kChunks; c++) {
    uint64_t d;
    bool durable;
    if (!store->Lookup(c, &d, &durable)) {
      if (m.flushed[c] == 0) continue;
      INFO("chunk " << c << ": a flushed write was lost");
      REQUIRE(false);
    }
    if (d >= store->header().alloc_limit) {
      INFO("chunk " << c << " at data chunk " << d << ", above the allocation limit");
      REQUIRE(false);
    }
    const uint64_t off = store->header().DataOffset(d);
    for (unsigned s = 0; s < kCs; s++) {
      // Never data not written for this chunk, nor older than a flushed write.
      const uint32_t v = VersionOf(&disk[off + s * 512], c, s);
      if (v != 0 && v >= m.flushed[c] && v <= m.latest[c]) continue;
      INFO("chunk " << c << " sector " << s << " version " << v << " flushed " << m.flushed[c] << " latest "
                    << m.latest[c]);
      REQUIRE(false);
    }
  }
}

}  // namespace

TEST_CASE("cow store: a crash at any write or sync keeps flushed writes and consistent metadata") {
  // A freshly formatted COW (formatting has its own test below), with room
  // for the 60 chunks a run may write at most: small, so that the ~8,000
  // crashed images below are quick to build and check.
  std::vector<uint8_t> fresh;
  {
    dmcow::MemEnv mem;
    mem.PutFile("cow", std::vector<uint8_t>(4096 + 4096 + 60 * 4096, 0));
    CowStore::Options o = Opts();
    o.format = true;
    std::unique_ptr<CowStore> s;
    REQUIRE(CowStore::Open(&mem, "cow", o, &s).ok());
    REQUIRE(s->header().data_chunks == 60);
    REQUIRE(mem.GetFile("cow", &fresh));
  }
  for (uint64_t seed = 1; seed <= 6; seed++) {
    // The number of writes and syncs of an uncrashed run.
    uint64_t total;
    {
      CrashEnv env(~uint64_t{0});
      env.PutFile("cow", fresh);
      RunUntilCrash(&env, seed);
      total = env.ops();
    }
    // Every point (the sanitizer pass: a sample, DMCOW_CRASH_SAMPLE).
    for (uint64_t k : dmcow_test::CrashPointsToTry(0, total, 0)) {
      CrashEnv env(k);
      env.PutFile("cow", fresh);
      const Model m = RunUntilCrash(&env, seed);
      for (uint64_t r = 0; r < 3; r++) {
        std::mt19937_64 rng(seed * 1000003 + k * 7 + r);
        INFO("seed " << seed << " crash after " << k << " of " << total << " ops, variant " << r);
        CheckCrashed(env.CrashedContent("cow", rng), m);
      }
    }
  }
}

TEST_CASE("cow store: a crash while formatting leaves no COW or an empty one") {
  uint64_t total;
  {
    CrashEnv env(~uint64_t{0});
    std::unique_ptr<CowStore> s;
    REQUIRE(CowStore::Open(&env, "cow", Opts(), &s).ok());
    total = env.ops();
  }
  for (uint64_t k = 0; k < total; k++) {
    CrashEnv env(k);
    std::unique_ptr<CowStore> s;
    CHECK_FALSE(CowStore::Open(&env, "cow", Opts(), &s).ok());
    if (!env.FileExists("cow")) continue;
    std::mt19937_64 rng(k);
    dmcow::MemEnv mem;
    mem.PutFile("cow", env.CrashedContent("cow", rng));
    dmcow::Status st = CowStore::Open(&mem, "cow", Opts(), &s);
    INFO("crash after " << k << ": " << st.ToString());
    CHECK((st.ok() || st.message().find("no header") != std::string::npos));
  }
}

// A failed sync may have lost the kernel's data pages of the COW file with
// it, and Linux reports the next fdatasync as fine: the store must not
// acknowledge any flush after the failure (dmcow/fail_stop_file.h).
TEST_CASE("cow store: after a failed sync no later flush succeeds") {
  CrashEnv env(~uint64_t{0});
  std::unique_ptr<CowStore> store;
  REQUIRE(CowStore::Open(&env, "cow", Opts(), &store).ok());
  CowStore::Decision d;
  REQUIRE(store->Decide(0, 1, &d).ok());
  env.InjectFault(env.ops() + 2, CrashEnv::Fault::kEio);  // Persist: one table write, then the sync
  const dmcow::Status failed = store->Persist(1);
  INFO(failed.ToString());
  REQUIRE(!failed.ok());
  REQUIRE(store->Decide(1, 2, &d).ok());
  const dmcow::Status later = store->Persist(2);
  INFO(later.ToString());
  CHECK(!later.ok());
  CHECK(later.ToString().find("Input/output error (injected)") != std::string::npos);
}
