// RangeComparer: compare's data check, on several threads.
//
// qemu-img compare reads both images in 2 MiB chunks, one after the other,
// and compares each pair of chunks in one thread. Here a guest range is cut
// into 256 KiB pieces, dealt to the threads in turn; each thread reads its
// piece of both images and compares it while it is still in the core's
// cache. Two such threads read 2 GiB pairs in 0.2 s where one thread
// reading 2 MiB chunks took 0.5 s (bench/RESULTS.md, issue 17).
//
// The outcome is qemu-img's, whatever the threads' timing: the first chunk
// (2 MiB from the range's start) holding an event decides, and within it a
// read error of the first image, then one of the second, then the first
// 512-byte block that differs: qemu-img reads a whole chunk of each image
// before it compares them.
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

  // `threads` (at least 1) read at once; each holds two pieces' buffers.
  explicit RangeComparer(unsigned threads);

  // Compares [offset, offset + len) of `first` with the same range of
  // `second`, or with zeros where `second` is null.
  RangeOutcome Compare(Image* first, Image* second, uint64_t offset, uint64_t len);

 private:
  struct Buffers {
    std::vector<char> first, second;
  };
  std::vector<Buffers> buffers_;  // one per thread
};

}  // namespace dmcow::cli

#endif  // DMCOW_CLI_RANGE_COMPARE_H_
