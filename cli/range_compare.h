// RangeComparer: compare's data check, on several threads.
//
// qemu-img compare walks both images' block status; for each run it reads
// up to 2 MiB of one image, then of the other, and compares the two in one
// thread (or, where one image reads as zeros, checks the other for zeros).
// Here the runs are queued and cut into 256 KiB pieces, dealt to the threads
// in turn; each thread reads its piece of both images and compares it while
// it is still in the core's cache. Short runs (a compressed image's are one
// cluster each) are queued together, so they too are read on every core.
//
// The outcome is qemu-img's, whatever the threads' timing: the first chunk
// (2 MiB from its run's start, or the rest of the run) holding an event
// decides, and within it a read error of the first image, then one of the
// second, then the first 512-byte block that differs: qemu-img reads a
// whole chunk of each image before it compares them.
#ifndef DMCOW_CLI_RANGE_COMPARE_H_
#define DMCOW_CLI_RANGE_COMPARE_H_

#include <cstdint>
#include <vector>

#include "dmcow/image.h"

namespace dmcow::cli {

struct RangeOutcome {
  enum class Kind { kSame, kReadErrorFirst, kReadErrorSecond, kMismatch };
  Kind kind = Kind::kSame;
  // kMismatch: the first differing 512-byte block's guest offset; a read
  // error: the start of the chunk that could not be read (qemu-img's).
  uint64_t offset = 0;
  Status error;  // a read error's
};

class RangeComparer {
 public:
  static constexpr uint64_t kChunk = 2 << 20;  // qemu-img's IO_BUF_SIZE
  static constexpr uint64_t kPiece = 256 << 10;

  // `threads` (at least 1) read at once; each makes its buffers (a piece or
  // a chunk of each image it reads) when it first needs them.
  // `second` may be null: every run is then first against zeros.
  RangeComparer(Image* first, Image* second, unsigned threads);

  // Queues the run [offset, offset + len) of the guest, after those queued
  // before it. `first_zero` / `second_zero`: that image reads as zeros
  // there (its block status says so); it is not read and the other image
  // is checked for zeros (both: nothing is read). `whole_chunks`: read a
  // chunk at once, not in pieces (a compressed cluster is decompressed
  // whole for any part of it read, and may be up to 2 MiB). The queue
  // holds a record per piece: callers bound what they queue between
  // flushes (compare: about 128 MiB).
  void Add(uint64_t offset, uint64_t len, bool first_zero, bool second_zero, bool whole_chunks = false);

  // Bytes queued and not yet compared, runs of zeros against zeros included.
  uint64_t queued() const { return queued_; }

  // Compares every queued run and empties the queue.
  RangeOutcome Flush();

 private:
  struct Piece {
    uint64_t offset, len;
    uint64_t chunk;        // number of its chunk, counted over the queue
    uint64_t chunk_start;  // guest offset of its chunk
    bool read_first, read_second;
  };
  struct Buffers {
    std::vector<char> first, second;
  };

  Image* first_;
  Image* second_;
  std::vector<Buffers> buffers_;  // one per thread, grown on first use
  std::vector<Piece> pieces_;     // the queue
  uint64_t chunks_ = 0;
  uint64_t queued_ = 0;
};

}  // namespace dmcow::cli

#endif  // DMCOW_CLI_RANGE_COMPARE_H_
