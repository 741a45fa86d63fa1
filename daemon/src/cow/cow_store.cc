// CowStore: the cow plugin's COW file (format in cow_format.h and
// daemon/DESIGN.md). What must reach the disk before what, enforced here
// (as qcow/src/qcow2/qcow2_write.cc's rules (2) and (5)):
//
// (1) Format writes the zeroed table and syncs, then writes the header and
//     syncs: the header makes the format visible.
// (2) A mapping's table entry is written only by Persist(durable_batch), and
//     only for mappings of batches <= durable_batch, which the kernel has
//     already made durable (its flush epochs): data copied by the kernel is
//     durable before the entry that makes it visible.
// (3) Persist writes the changed table sectors, fdatasyncs, then acknowledges:
//     a flush is durable.
// (4) Before a chunk at or above alloc_limit is handed out, the header with
//     a raised limit (in steps) is written and synced, so a restarted daemon
//     that finds the kernel still holding its predecessor's mappings can
//     allocate above every chunk that may be in use.
// (5) Entries only go from 0 to a value and never change afterwards (chunks
//     never move or are freed). A 512-byte sector write is assumed atomic,
//     as qcow2 and file systems assume: after a crash each table sector is
//     old or new, and either way every mapped entry points at durable data.
// The first failed write or sync ends writing (FailStopFile).
#include "cow/cow_store.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "dmcow/fail_stop_file.h"

namespace dmcowd::cow {

namespace {

constexpr size_t kIoBytes = 1 << 20;  // table reads and zeroing, per call

void Put64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint64_t Get64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

bool AllZero(const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (p[i]) return false;
  }
  return true;
}

}  // namespace

CowStore::CowStore(std::unique_ptr<dmcow::File> file, const Header& h) : file_(std::move(file)), header_(h) {}

Status CowStore::Open(dmcow::Env* env, const std::string& path, const Options& options,
                      std::unique_ptr<CowStore>* out) {
  std::unique_ptr<dmcow::File> file;
  Status s = env->OpenFile(path, dmcow::OpenMode::kReadWrite, &file);
  if (s.IsNotFound()) s = env->OpenFile(path, dmcow::OpenMode::kCreateTruncate, &file);
  DMCOW_RETURN_IF_ERROR(s);
  // After a failed write or sync nothing more is written or acknowledged
  // (dmcow/fail_stop_file.h): the device's flushes fail from then on.
  file = std::make_unique<dmcow::FailStopFile>(std::move(file));
  uint64_t size = 0;
  DMCOW_RETURN_IF_ERROR(file->Size(&size));

  std::unique_ptr<CowStore> store(new CowStore(std::move(file), Header()));
  store->alloc_step_ = std::max<uint64_t>(1, options.alloc_step);
  if (size == 0 || options.format) {
    DMCOW_RETURN_IF_ERROR(store->Format(options, size));
  } else {
    uint8_t raw[kHeaderSector];
    DMCOW_RETURN_IF_ERROR(store->file_->ReadExact(0, sizeof(raw), raw, "cow header"));
    if (!HasMagic(raw)) {
      return Status::InvalidArgument(path + ": not a dmcow COW (no header); --format initialises it, destroying " +
                                     (AllZero(raw, sizeof(raw)) ? "its content" : "what it holds"));
    }
    DMCOW_RETURN_IF_ERROR(DecodeHeader(raw, size, path, &store->header_));
    const Header& h = store->header_;
    if (h.base_sectors != options.base_sectors || h.virtual_sectors != options.base_sectors) {
      return Status::InvalidArgument(path + ": formatted for a base of " + std::to_string(h.base_sectors) +
                                     " sectors, but the base has " + std::to_string(options.base_sectors));
    }
    if (options.chunk_sectors && options.chunk_sectors != h.chunk_sectors) {
      return Status::InvalidArgument(path + ": formatted with chunks of " + std::to_string(h.chunk_sectors) +
                                     " sectors, not " + std::to_string(options.chunk_sectors) +
                                     " (leave out --chunk-size)");
    }
    DMCOW_RETURN_IF_ERROR(store->LoadTable());
  }
  *out = std::move(store);
  return Status::OK();
}

Status CowStore::Format(const Options& options, uint64_t size) {
  const uint32_t cs = options.chunk_sectors ? options.chunk_sectors : kDefaultChunkSectors;
  Header h;
  DMCOW_RETURN_IF_ERROR(MakeLayout(options.base_sectors, cs, size, path(), &h));
  if (size == 0) {
    // A new file: sparse, zeros everywhere, room for every chunk.
    DMCOW_RETURN_IF_ERROR(file_->Truncate(h.end()));
  } else {
    // Old content: first the header goes (a crash now leaves "no header"),
    // then the table is zeroed and made durable.
    std::vector<uint8_t> zeros(kIoBytes, 0);
    DMCOW_RETURN_IF_ERROR(file_->Write(0, zeros.data(), kHeaderSector));
    DMCOW_RETURN_IF_ERROR(file_->Sync());
    for (uint64_t off = 0; off < h.table_bytes(); off += kIoBytes) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(kIoBytes, h.data_offset - kTableOffset - off));
      DMCOW_RETURN_IF_ERROR(file_->Write(kTableOffset + off, zeros.data(), n));
    }
    DMCOW_RETURN_IF_ERROR(file_->Sync());
  }
  header_ = h;
  table_.assign(h.table_entries, 0);
  next_free_ = 0;
  return WriteHeader();  // makes the format visible
}

Status CowStore::LoadTable() {
  const Header& h = header_;
  table_.assign(h.table_entries, 0);
  std::vector<bool> used(h.data_chunks, false);
  std::vector<uint8_t> buf(kIoBytes);
  uint64_t top = 0;  // 1 + highest data chunk in use
  for (uint64_t first = 0; first < h.table_entries;) {
    const uint64_t n = std::min<uint64_t>(kIoBytes / 8, h.table_entries - first);
    DMCOW_RETURN_IF_ERROR(file_->ReadExact(kTableOffset + first * 8, n * 8, buf.data(), "cow table"));
    for (uint64_t i = 0; i < n; i++) {
      const uint64_t v = Get64(&buf[i * 8]);
      if (!v) continue;
      const uint64_t chunk = first + i;
      if (v > h.data_chunks) {
        return Status::Corrupt(path() + ": cow table: chunk " + std::to_string(chunk) + " maps to data chunk " +
                               std::to_string(v - 1) + ", beyond the data area (" + std::to_string(h.data_chunks) +
                               " chunks)");
      }
      if (used[v - 1]) {
        return Status::Corrupt(path() + ": cow table: data chunk " + std::to_string(v - 1) +
                               " is mapped twice (the second time by chunk " + std::to_string(chunk) + ")");
      }
      used[v - 1] = true;
      table_[chunk] = v | kPersisted;
      top = std::max(top, v);
    }
    first += n;
  }
  // The kernel holds nothing of an earlier run (the daemon creates the
  // device), so chunks handed out but never persisted are free again.
  next_free_ = top;
  return Status::OK();
}

Status CowStore::WriteHeader() {
  uint8_t raw[kHeaderSector];
  EncodeHeader(header_, raw);
  DMCOW_RETURN_IF_ERROR(file_->Write(0, raw, sizeof(raw)));
  return file_->Sync();
}

Status CowStore::Decide(uint64_t chunk, uint64_t batch, Decision* d) {
  *d = Decision();
  if (chunk >= table_.size()) {
    return Status::InvalidArgument(path() + ": chunk " + std::to_string(chunk) + " is beyond the device (" +
                                   std::to_string(table_.size()) + " chunks)");
  }
  uint64_t e = table_[chunk];
  if (e & kPersisted) {
    d->data_chunk = (e & ~kPersisted) - 1;
    d->durable = true;
    return Status::OK();
  }
  if (!e) {
    if (next_free_ >= header_.data_chunks) {
      d->error = ENOSPC;
      return Status::OK();
    }
    if (next_free_ >= header_.alloc_limit) {
      const uint64_t old = header_.alloc_limit;
      header_.alloc_limit = std::min(header_.data_chunks, next_free_ + alloc_step_);
      Status s = WriteHeader();
      if (!s.ok()) {
        header_.alloc_limit = old;
        return s;
      }
    }
    e = ++next_free_;  // data chunk next_free_ - 1, stored plus one
    table_[chunk] = e;
  }
  d->data_chunk = e - 1;
  pending_.push_back(Pending{chunk, batch, e});
  return Status::OK();
}

void CowStore::Retract(uint64_t chunk, uint64_t data_chunk) {
  if (chunk < table_.size() && table_[chunk] == data_chunk + 1) table_[chunk] = 0;  // the data chunk leaks
}

Status CowStore::Persist(uint64_t durable_batch) {
  std::vector<Pending> taken;
  std::vector<uint64_t> sectors;
  while (!pending_.empty() && pending_.front().batch <= durable_batch) {
    const Pending p = pending_.front();
    pending_.pop_front();
    if (table_[p.chunk] != p.entry) continue;  // retracted, or persisted by an earlier item
    table_[p.chunk] |= kPersisted;
    taken.push_back(p);
    sectors.push_back(p.chunk / kEntriesPerSector);
  }
  if (taken.empty()) return Status::OK();
  std::sort(sectors.begin(), sectors.end());
  sectors.erase(std::unique(sectors.begin(), sectors.end()), sectors.end());
  Status s = WriteTableSectors(sectors);
  if (s.ok()) s = file_->Sync();
  if (!s.ok()) {
    // Not durable, and never will be through this open: the file refuses
    // every later write and sync (FailStopFile), so every later flush fails
    // too. Entries that reached the disk anyway point at durable data.
    for (auto it = taken.rbegin(); it != taken.rend(); ++it) {
      table_[it->chunk] = it->entry;
      pending_.push_front(*it);
    }
    return s;
  }
  persisted_generation_++;
  return Status::OK();
}

Status CowStore::WriteTableSectors(const std::vector<uint64_t>& sectors) {
  constexpr size_t kMaxRun = 256;  // sectors per write
  std::vector<uint8_t> buf;
  for (size_t i = 0; i < sectors.size();) {
    size_t n = 1;
    while (i + n < sectors.size() && n < kMaxRun && sectors[i + n] == sectors[i] + n) n++;
    buf.assign(n * 512, 0);
    for (uint64_t k = 0; k < n * kEntriesPerSector; k++) {
      const uint64_t chunk = sectors[i] * kEntriesPerSector + k;
      if (chunk < table_.size() && (table_[chunk] & kPersisted)) Put64(&buf[k * 8], table_[chunk] & ~kPersisted);
    }
    DMCOW_RETURN_IF_ERROR(file_->Write(kTableOffset + sectors[i] * 512, buf.data(), buf.size()));
    i += n;
  }
  return Status::OK();
}

void CowStore::PersistedRuns(std::vector<Extent>* out) const {
  out->clear();
  for (uint64_t c = 0; c < table_.size(); c++) {
    const uint64_t e = table_[c];
    if (!(e & kPersisted)) continue;
    const uint64_t sector = CowSector((e & ~kPersisted) - 1);
    if (!out->empty()) {
      Extent& last = out->back();
      if (last.chunk + last.nr_chunks == c && last.cow_sector + last.nr_chunks * header_.chunk_sectors == sector) {
        last.nr_chunks++;
        continue;
      }
    }
    out->push_back(Extent{c, 1, sector});
  }
}

bool CowStore::Lookup(uint64_t chunk, uint64_t* data_chunk, bool* durable) const {
  if (chunk >= table_.size() || !table_[chunk]) return false;
  *data_chunk = (table_[chunk] & ~kPersisted) - 1;
  *durable = (table_[chunk] & kPersisted) != 0;
  return true;
}

}  // namespace dmcowd::cow
