// ConvertJob: copies the guest content of one or more source images,
// concatenated, into a target image opened for writing, as qemu-img convert
// does (zero detection, -S, -B, -c), on several threads.
//
// Work in proportion to the data. The guest range is cut into fixed chunks
// (2 MiB or a cluster), but a run of chunks that holds no data in the
// sources' block status (unallocated, zero, or left to the backing file by
// -B) is planned as one piece from one block-status answer, with no buffer
// and no read: an empty 16 TiB image costs a few block-status calls, not
// eight million chunks. Chunks with data are planned exactly as before, so
// the output does not depend on how the holes were walked.
//
// Reproducible output. Worker threads read, scan and compress chunks in
// parallel, but a qcow/qcow2 target receives each chunk's writes strictly in
// chunk order, and every decision (what is zero, what is compressed, what is
// skipped) depends only on the source content and the options. The engine's
// allocator is deterministic, so the same sources and options always give a
// byte-identical image, whatever the thread count or timing.
#ifndef DMCOW_CLI_CONVERT_JOB_H_
#define DMCOW_CLI_CONVERT_JOB_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "cli_common.h"
#include "dmcow/compress.h"
#include "dmcow/image.h"
#include "rate_limiter.h"

namespace dmcow::cli {

struct ConvertSettings {
  std::vector<Image*> sources;  // concatenated in this order
  Image* target = nullptr;      // opened writable; at least the sources' total size
  bool ordered_writes = true;   // false: writes may land in any order (raw targets)
  uint64_t cluster_size = 512;  // target's allocation unit; zero runs are aligned to it
  bool compress = false;        // -c: whole clusters, stored compressed
  CompressionSettings compression;
  uint64_t min_sparse = 4096;   // -S; 0: write everything as data (fully allocate)
  bool zero_init = true;        // the target reads zeros where nothing is written
  bool top_layer_only = false;  // -B: ranges the sources' top layers leave unallocated stay so
  int threads = 2;
  Progress* progress = nullptr;
  RateLimiter* rate_limiter = nullptr;  // -r; null: no limit
  // --salvage: a source range whose block status cannot be read is read as
  // data, sector by sector; a sector that cannot be read is written as
  // zeros. Each such sector gets a warning (unless quiet), in guest order.
  bool salvage = false;
  bool quiet = false;
  // false: every chunk is planned on its own, holes included (the walk
  // before hole planning). Only tests set it, to show both give the same
  // bytes (tests/convert_job_test.cc).
  bool plan_holes = true;
};

class ConvertJob {
 public:
  explicit ConvertJob(const ConvertSettings& settings);

  // Runs the copy and flushes the target; on failure returns the first
  // error, in qemu-img's words.
  bool Run(std::string* error);

  // Pieces of work planned by the last Run: chunks with data plus hole
  // pieces. Tests read it to show that the work follows the data.
  uint64_t pieces_planned() const { return plan_index_; }

 private:
  enum class Kind { kData, kZero, kCompressed };
  struct Op {
    Kind kind;
    uint64_t offset;
    uint64_t length;
    size_t buf_offset = 0;         // kData: where in the chunk buffer
    std::vector<uint8_t> payload;  // kCompressed
  };
  enum class State { kData, kZero, kSkip };
  struct Extent {
    uint64_t offset;
    uint64_t length;
    State state;
  };

  struct Planned {
    uint64_t index = 0;  // order of application (ordered targets)
    uint64_t start = 0;  // guest range [start, end): one chunk with data, or a run of chunks without
    uint64_t end = 0;
    bool hole = false;  // no data anywhere in the range: no buffer, no read
    std::vector<Extent> extents;
    std::vector<uint8_t> buf;
    std::vector<Op> ops;
    std::vector<std::string> warnings;  // --salvage: printed when the piece is applied
  };
  static constexpr size_t kMaxParked = 2;
  // Bound on the extents one hole piece collects (zero and -B skip runs
  // alternating), so a hostile block status cannot grow memory.
  static constexpr size_t kMaxHoleExtents = 4096;

  void Worker();
  void Applied(const Planned& p);  // progress
  // The next piece of work, in guest order; false when the end is reached
  // or on error (then failed_ is set).
  bool PlanNext(Planned* p);
  bool HasData(const std::vector<Extent>& extents) const;
  bool ProcessChunk(Planned* p);
  // The first run of [offset, end): one block-status answer. With
  // --salvage, an error narrows the question (to a quarter each time, as
  // qemu-img) down to one sector, which is then taken as data, with a
  // warning added to *warnings.
  bool DescribeRun(uint64_t offset, uint64_t end, Extent* out, std::vector<std::string>* warnings);
  bool Describe(uint64_t offset, uint64_t end, std::vector<Extent>* out, std::vector<std::string>* warnings);
  // With --salvage, a failed read is read again sector by sector; a sector
  // that still fails reads as zeros, with a warning added to *warnings.
  bool ReadGuest(uint64_t offset, uint8_t* buf, uint64_t len, std::vector<std::string>* warnings);
  // Reads [offset, offset + len) of one source, at `in_src` in it.
  bool ReadSource(Image* src, uint64_t offset, uint64_t in_src, uint8_t* buf, uint64_t len,
                  std::vector<std::string>* warnings);
  void PlanCompressed(Planned* p);
  bool PlanPlain(Planned* p);
  void PrintWarnings(const Planned& p);
  // Plans [from, to) of a chunk read into `buf`: data, except zero runs.
  void PlanZeroRuns(uint64_t start, uint64_t from, uint64_t to, const std::vector<char>* known_zero, const uint8_t* buf,
                    std::vector<Op>* ops);
  // Data at [offset, offset+length) of the chunk starting at `start`,
  // merged with the previous op when contiguous.
  void AddData(uint64_t start, uint64_t offset, uint64_t length, std::vector<Op>* ops) const;
  void AddZero(uint64_t offset, uint64_t length, std::vector<Op>* ops) const;
  bool Apply(const std::vector<Op>& ops, const uint8_t* buf);
  bool Fail(const std::string& msg);

  const ConvertSettings s_;
  uint64_t total_size_ = 0;
  uint64_t chunk_size_ = 0;
  std::mutex plan_mu_;  // guards the two below; taken before mu_ (PlanNext may Fail), never after
  uint64_t plan_pos_ = 0;
  uint64_t plan_index_ = 0;
  std::atomic<bool> failed_{false};
  std::mutex mu_;  // guards the members below
  std::condition_variable applied_;
  uint64_t next_to_apply_ = 0;
  bool applying_ = false;  // a worker is applying parked chunks
  std::map<uint64_t, Planned> parked_;
  std::vector<std::vector<uint8_t>> spare_buffers_;
  std::string error_;
  std::mutex progress_mu_;
};

}  // namespace dmcow::cli

#endif  // DMCOW_CLI_CONVERT_JOB_H_
