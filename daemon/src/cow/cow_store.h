// CowStore: the cow plugin's mapping store (chunk -> data chunk of the COW)
// over one dmcow::File, with the crash-safe ordering of daemon/DESIGN.md:
// a mapping reaches the disk only in Persist, after the kernel made its
// data durable; Persist syncs before it returns; the allocation limit in
// the header is durable before a chunk above it is handed out.
//
// Not thread-safe: the plugin serialises calls.
#ifndef DMCOWD_COW_COW_STORE_H_
#define DMCOWD_COW_COW_STORE_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "cow/cow_format.h"
#include "dmcow/env.h"
#include "dmcowd/plugin.h"

namespace dmcowd::cow {

class CowStore {
 public:
  struct Options {
    uint64_t base_sectors = 0;   // size of the base now: the device size
    uint32_t chunk_sectors = 0;  // 0: the header's, or kDefaultChunkSectors for a new COW
    bool format = false;         // overwrite whatever the COW holds
    uint64_t alloc_step = 4096;  // chunks the allocation limit grows by
  };
  static constexpr uint32_t kDefaultChunkSectors = 128;  // 64 KiB

  // Opens `path`: a missing or empty file is created and formatted, a COW
  // with our header is attached, anything else needs options.format.
  static Status Open(dmcow::Env* env, const std::string& path, const Options& options, std::unique_ptr<CowStore>* out);

  const Header& header() const { return header_; }
  const std::string& path() const { return file_->name(); }

  struct Decision {
    uint64_t data_chunk = 0;
    bool durable = false;  // already persisted: its data is there (FILLED_RW)
    int error = 0;         // ENOSPC: no free data chunk
  };
  // Where `chunk` lives; allocates a data chunk for an unmapped one. A
  // decision not yet durable is remembered with `batch` for Persist.
  Status Decide(uint64_t chunk, uint64_t batch, Decision* d);

  // Forgets an undurable decision for `chunk` (the kernel refused it).
  void Retract(uint64_t chunk, uint64_t data_chunk);

  // Makes durable every decision made in batches <= durable_batch.
  Status Persist(uint64_t durable_batch);

  // Persisted mappings as runs consecutive in both chunk and data chunk.
  void PersistedRuns(std::vector<Extent>* out) const;
  uint64_t persisted_generation() const { return persisted_generation_; }

  // For tests and statistics.
  bool Lookup(uint64_t chunk, uint64_t* data_chunk, bool* durable) const;
  uint64_t next_free() const { return next_free_; }
  size_t pending() const { return pending_.size(); }

  uint64_t CowSector(uint64_t data_chunk) const { return header_.DataOffset(data_chunk) / 512; }

 private:
  CowStore(std::unique_ptr<dmcow::File> file, const Header& h);

  Status Format(const Options& options, uint64_t size);
  Status LoadTable();
  Status WriteHeader();
  Status WriteTableSectors(const std::vector<uint64_t>& sectors);

  static constexpr uint64_t kPersisted = uint64_t{1} << 63;

  struct Pending {
    uint64_t chunk;
    uint64_t batch;
    uint64_t entry;  // the decision (1 + data chunk) it persists
  };

  std::unique_ptr<dmcow::File> file_;
  Header header_;
  std::vector<uint64_t> table_;  // per chunk: 0, or 1 + data chunk (| kPersisted)
  std::deque<Pending> pending_;  // in batch order
  uint64_t next_free_ = 0;       // next data chunk to hand out
  uint64_t alloc_step_ = 4096;
  uint64_t persisted_generation_ = 0;
};

}  // namespace dmcowd::cow

#endif  // DMCOWD_COW_COW_STORE_H_
