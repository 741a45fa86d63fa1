// Qcow2Mapper: the qcow2 plugin's decisions, without devices (for qcow2 and
// legacy qcow v1 images alike: the engine answers for the format). Given the
// engine's view of an image, it answers the kernel's MAP requests, keeps the
// clusters it reserved until their data is durable, then links them.
//
// Where things live on the cow device (a dm-linear "store" the plugin
// builds): sectors [0, scratch_sectors) are scratch space, a sparse file
// with room for every chunk once (chunks the daemon must assemble itself:
// compressed clusters, partly allocated clusters, small clusters that are
// not contiguous), then the image file from image_sector on: image byte h
// is cow sector image_sector + h / 512.
//
// Scratch is a log: assembled runs take the next free slots in the order
// they are assembled, not a slot at chunk * chunk bytes. Random reads then
// fill the file from its start instead of scattering pages over a sparse
// file the size of the disk, which costs the page cache much more (tmpfs,
// 64 KiB writes: 534 us scattered vs 347 us in order under the benchmark's
// emulated CPU, 17 vs 14 us on the host; bench/RESULTS.md). A chunk holds
// at most one slot, so without reclaim the log never outgrows the file.
//
// Scratch has a budget (SetScratchBudget): past it the mapper wants a
// reclaim, and the daemon has the kernel forget the oldest runs' RO
// mappings under a suspend (Plugin::Reclaim); their slots are punched and
// reused, first fit, before the log grows. A disk under twice the budget
// is never reclaimed: its scratch cannot pass its own size anyway.
//
// A chunk is one cluster, or, for clusters under 4 KiB, the 4 KiB that hold
// several (the kernel's smallest chunk). What a chunk gets:
//
//   this layer holds               read             write
//   data, refcount 1, contiguous   FILLED_RW        (already writable)
//   nothing, over a backing        BASE             new clusters, RW: the kernel
//                                                   copies the backing data
//   nothing, no backing            ZERO             new clusters zeroed here
//                                                   (fallocate, no copy), FILLED_RW
//   zeros                          ZERO             new clusters zeroed here, FILLED_RW
//   shared data (snapshots)        RO at the data   new clusters filled here, FILLED_RW
//   compressed, partial, mixed     RO at scratch    new clusters filled here, FILLED_RW
//
// Assembled chunks are assembled once (a chunk's scratch copy stays valid
// while it stays assembled); reads that continue where the last assembled
// run ended get runs assembled ahead, doubling up to 2 MiB a reply.
//
// A write covering the whole chunk gets RW (the kernel skips the copy) only
// where the base device holds the chunk's content (nothing in this layer;
// zeros without a backing file): a whole-chunk write that a suspend pushes
// back is replayed after a kernel copy from the base device. New clusters are linked into the L2 tables only in Flush,
// for replies the kernel has made durable (ABI section 6), and the write engine's own Flush then orders data, refcounts
// and tables (qcow/src/qcow2/qcow2_write.cc; qcow v1, which has no refcounts and no shared or zero clusters:
// qcow/src/qcow1/qcow1_write.cc).
//
// Thread safety: none (the daemon serialises plugin calls).
#ifndef DMCOWD_QCOW2_QCOW2_MAPPER_H_
#define DMCOWD_QCOW2_QCOW2_MAPPER_H_

#include <cstdint>
#include <deque>
#include <map>
#include <unordered_map>
#include <vector>

#include "dmcow/device_image.h"
#include "dmcow/image.h"
#include "dmcowd/plugin.h"

namespace dmcowd {

// What the mapper needs from the devices around it.
class CowSpace {
 public:
  virtual ~CowSpace() = default;
  // Writes assembled chunk data at byte `offset` of the scratch area.
  virtual Status WriteScratch(uint64_t offset, const void* buf, size_t len) = 0;
  // Makes image bytes [0, end) reachable through the cow device.
  virtual Status EnsureImageBytes(uint64_t end) = 0;
  // Scratch bytes no longer read by anyone: their storage may go.
  virtual Status ReleaseScratch(uint64_t /*offset*/, uint64_t /*len*/) { return Status::OK(); }
};

struct Qcow2Geometry {
  uint32_t chunk_sectors = 0;
  uint64_t clusters_per_chunk = 1;
  uint64_t chunks = 0;
  uint64_t scratch_sectors = 0;  // = image_sector
};

class Qcow2Mapper {
 public:
  // `image` open (writable unless read-only), `space` outlives the mapper.
  // The mapper reads through `image` and places clusters through its
  // DeviceImage (AsDeviceImage); Init refuses an image without one (raw).
  Qcow2Mapper(dmcow::Image* image, CowSpace* space, bool writable, bool has_backing);

  static Qcow2Geometry GeometryFor(const dmcow::Image& image);
  const Qcow2Geometry& geometry() const { return geo_; }

  // Checks the image can be served. Finds nothing yet: ScanStable does.
  Status Init();

  // Looks for chunks the image holds writable in place from before the
  // attach, continuing where the last call stopped: at most
  // `max_chunks` data chunks classified (and as many block-status runs),
  // so each call is short. *more while part of the image is not looked at
  // yet. What it finds joins StableExtents (and bumps the generation). It
  // waits (finds nothing, *more) while linked clusters are not durable, so
  // it never reports a chunk whose metadata could still be lost. Attach
  // costs in proportion to what one call scans, not to the image.
  Status ScanStable(uint64_t max_chunks, bool* more);

  Status Map(const MapRequest& req, Answer* answer);
  void Retract(const MapRequest& req, const Mapping& mapping);
  Status Flush(uint64_t durable_batch);
  Status StableExtents(std::vector<Extent>* out);
  uint64_t stable_generation() const { return generation_; }

  // Scratch budget in bytes (0: none); at least two 2 MiB runs.
  void SetScratchBudget(uint64_t bytes);
  bool WantsReclaim() const { return scratch_budget_ != 0 && scratch_live_ + orphans_.size() > scratch_budget_; }
  // What the kernel must forget: slots left by chunks written since they
  // were assembled, what it refused last time, and the oldest runs, down to
  // half the budget. All are forgotten here at once.
  void Reclaim(std::vector<Extent>* forget);
  // Per extent of the last Reclaim, the INVALIDATE's errno: 0 or EINVAL (a
  // chunk beyond the kernel's cow targets) frees the slots; else they wait
  // for the next Reclaim.
  void Reclaimed(const std::vector<int>& errors);
  uint64_t scratch_live_chunks() const { return scratch_live_; }
  uint64_t scratch_end_chunks() const { return scratch_end_; }

 private:
  enum class ChunkKind { kWritable, kUnallocated, kZero, kShared, kAssembled };
  struct ChunkState {
    ChunkKind kind = ChunkKind::kAssembled;
    uint64_t host_offset = 0;  // kWritable, kShared: first byte of the chunk in the image
  };
  struct Reserved {
    uint64_t chunk, host_offset, batch;
  };

  Status Classify(uint64_t chunk, ChunkState* out);
  uint64_t ClustersIn(uint64_t chunk) const;
  uint64_t ImageSector(uint64_t host) const { return geo_.scratch_sectors + host / 512; }
  Status MapRead(uint64_t chunk, const ChunkState& st, Mapping* m);
  Status MapWrite(const MapRequest& req, const ChunkState& st, Answer* answer);
  // Same-kind neighbours after `chunk`, up to `limit` chunks in all (for
  // kAssembled, none already in scratch).
  Status ExtendRun(uint64_t chunk, ChunkKind kind, uint64_t host_offset, uint64_t limit, uint64_t* n);
  // The scratch slot (in chunks) of an assembled chunk, if it has one.
  bool InScratch(uint64_t chunk, uint64_t* slot = nullptr) const;
  struct ScratchRun {
    uint64_t nr_chunks, slot;
  };
  // The assembled run that holds `chunk`, or scratch_runs_.end().
  std::map<uint64_t, ScratchRun>::const_iterator RunHolding(uint64_t chunk) const;
  // `n` consecutive free slots: a freed run that fits, else the log's end.
  bool AllocSlots(uint64_t n, uint64_t* slot);
  // A chunk about to get new clusters leaves its scratch run; its slot
  // waits for the next reclaim (the kernel may still read it until then).
  void LeaveScratch(uint64_t chunk);
  void FreeSlots(uint64_t first, uint64_t count);

  dmcow::Image* const image_;
  dmcow::DeviceImage* const device_;  // image_->AsDeviceImage(), checked by Init
  CowSpace* const space_;
  const bool has_backing_;
  const bool writable_;
  const uint64_t cluster_size_;
  Qcow2Geometry geo_;
  std::unordered_map<uint64_t, Reserved> reserved_;  // by chunk: handed out, not linked yet
  std::vector<Extent> linked_;                       // linked since the last successful image flush
  std::vector<Extent> stable_;                       // chunks writable in place, linked and durable
  bool stable_sorted_ = true;
  uint64_t scan_pos_ = 0;    // ScanStable: the next byte to ask block status about
  uint64_t scan_chunk_ = 0;  // and the first chunk not classified yet
  uint64_t generation_ = 1;
  // Assembled runs by first chunk, and where each sits in scratch: their
  // content cannot change while they stay assembled (a write moves a chunk
  // to new clusters first). One entry per reply, bounded by what was read.
  std::map<uint64_t, ScratchRun> scratch_runs_;
  std::deque<uint64_t> scratch_order_;       // first chunks of scratch_runs_, oldest first
  std::map<uint64_t, uint64_t> free_slots_;  // first slot -> count, reclaimed and reusable
  struct Forgotten {
    uint64_t chunk, nr_chunks, slot;
  };
  std::vector<Forgotten> orphans_;                // slots of chunks written since assembled, one each
  std::vector<Forgotten> reclaiming_;             // named by the last Reclaim, in its order
  uint64_t scratch_end_ = 0;                      // the log's end, in slots
  uint64_t scratch_live_ = 0;                     // slots held by scratch_runs_
  uint64_t scratch_budget_ = 0;                   // in slots; 0: never reclaim
  uint64_t ahead_ = 1, ahead_next_ = UINT64_MAX;  // sequential assembly
  std::vector<uint8_t> assembly_;                 // reused: at most 2 MiB
};

}  // namespace dmcowd

#endif  // DMCOWD_QCOW2_QCOW2_MAPPER_H_
