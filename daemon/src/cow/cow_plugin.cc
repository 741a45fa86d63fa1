// The `cow` plugin: many machines share one read-only base, each with its
// own COW file or device. A chunk is copied into the COW at its first write
// and stays there; the mapping persists in the COW (cow_store.h).
//
//   dmcowd --plugin cow --name NAME [--chunk-size SIZE] [--format] BASE COW
//
// Settings (--opt KEY=VALUE): alloc_step=N, chunks the header's allocation
// limit grows by (default 4096).
#include <cerrno>
#include <cstdlib>

#include "cow/cow_store.h"
#include "plugins.h"

namespace dmcowd {

namespace {

using cow::CowStore;

class CowPlugin final : public Plugin {
 public:
  explicit CowPlugin(const PluginOptions& options) : options_(options) {}

  Status Open(DeviceSpec* spec) override {
    dmcow::Env* env = options_.env;
    const std::string& base = options_.args[0];
    std::unique_ptr<dmcow::File> base_file;
    DMCOW_RETURN_IF_ERROR(env->OpenFile(base, dmcow::OpenMode::kReadOnly, &base_file));
    uint64_t base_bytes = 0;
    DMCOW_RETURN_IF_ERROR(base_file->Size(&base_bytes));
    if (base_bytes < 512) return Status::InvalidArgument(base + ": base is smaller than one sector");

    CowStore::Options o;
    o.base_sectors = base_bytes / 512;
    o.chunk_sectors = options_.chunk_sectors;
    o.format = options_.format;
    auto it = options_.params.find("alloc_step");
    if (it != options_.params.end()) o.alloc_step = std::strtoull(it->second.c_str(), nullptr, 0);
    DMCOW_RETURN_IF_ERROR(CowStore::Open(env, options_.args[1], o, &store_));

    spec->base_path = base;
    spec->cow_path = options_.args[1];
    spec->sectors = store_->header().virtual_sectors;
    spec->chunk_sectors = store_->header().chunk_sectors;
    spec->read_to_daemon = false;
    return Status::OK();
  }

  Status InitialMappings(std::vector<Mapping>* out) override {
    std::vector<Extent> runs;
    store_->PersistedRuns(&runs);
    out->clear();
    for (const Extent& e : runs) out->push_back(Mapping{MapKind::kFilledRW, e.chunk, e.nr_chunks, e.cow_sector});
    return Status::OK();
  }

  Status Map(const MapRequest& req, Answer* answer) override {
    *answer = Answer();
    Mapping& m = answer->mapping;
    m.chunk = req.chunk;
    m.nr_chunks = 1;
    uint64_t data_chunk = 0;
    bool durable = false;
    if (!req.write) {
      // Not asked for without read_to_daemon; answer what a read would see.
      if (store_->Lookup(req.chunk, &data_chunk, &durable) && durable) {
        m.kind = MapKind::kFilledRW;
        m.cow_sector = store_->CowSector(data_chunk);
      } else {
        m.kind = MapKind::kBase;
      }
      return Status::OK();
    }
    CowStore::Decision d;
    DMCOW_RETURN_IF_ERROR(store_->Decide(req.chunk, req.batch, &d));
    if (d.error) {
      answer->error = d.error;
      return Status::OK();
    }
    // A fresh (or never filled) location is filled by the kernel; a
    // persisted one already holds the chunk's data.
    m.kind = d.durable ? MapKind::kFilledRW : MapKind::kRW;
    m.cow_sector = store_->CowSector(d.data_chunk);
    return Status::OK();
  }

  void Retract(const MapRequest& req, const Mapping& mapping) override {
    if (mapping.kind != MapKind::kRW) return;
    const uint64_t cs = store_->header().chunk_sectors;
    store_->Retract(req.chunk, (mapping.cow_sector - store_->header().data_offset / 512) / cs);
  }

  Status Flush(uint64_t durable_batch) override { return store_->Persist(durable_batch); }

  Status StableExtents(std::vector<Extent>* out) override {
    store_->PersistedRuns(out);
    return Status::OK();
  }

  uint64_t StableGeneration() const override { return store_->persisted_generation(); }

  Status Close() override {
    store_.reset();
    return Status::OK();
  }

 private:
  PluginOptions options_;
  std::unique_ptr<CowStore> store_;
};

}  // namespace

Status MakeCowPlugin(const PluginOptions& options, std::unique_ptr<Plugin>* out) {
  if (options.args.size() != 2) {
    return Status::InvalidArgument("the cow plugin takes two arguments, BASE and COW (got " +
                                   std::to_string(options.args.size()) + ")");
  }
  for (const auto& [key, value] : options.params) {
    if (key != "alloc_step") return Status::InvalidArgument("the cow plugin has no setting '" + key + "'");
    if (value.empty() || value.find_first_not_of("0123456789") != std::string::npos || std::stoull(value) == 0) {
      return Status::InvalidArgument("alloc_step=" + value + ": expected a positive number of chunks");
    }
  }
  out->reset(new CowPlugin(options));
  return Status::OK();
}

}  // namespace dmcowd
