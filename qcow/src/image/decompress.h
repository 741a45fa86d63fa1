// Decompression of qcow/qcow2 compressed clusters.
#ifndef DMCOW_QCOW_DECOMPRESS_H_
#define DMCOW_QCOW_DECOMPRESS_H_

#include <cstddef>
#include <cstdint>

#include "dmcow/status.h"

namespace dmcow {

enum class CompressionType { kDeflate = 0, kZstd = 1 };

// Decompresses `in` into exactly `out_len` bytes. Input may carry trailing
// bytes (it is rounded up to sectors on disk) and, for zstd, several frames;
// decoding stops once `out_len` bytes are produced. Producing fewer is an
// error. Memory used does not depend on the input (zstd windows are capped).
// On failure the returned message is completed by the caller with file and
// offset. Thread-safe; contexts are reused per thread.
Status DecompressCluster(CompressionType type, const uint8_t* in, size_t in_len, uint8_t* out, size_t out_len);

}  // namespace dmcow

#include <vector>
#include "dmcow/mutex.h"

#include "dmcow/env.h"

namespace dmcow {

// Reads compressed clusters and keeps the one most recently decompressed for a
// partial read, so that small sequential reads inside one compressed cluster
// decompress it once (a whole-cluster read goes straight to the caller).
// Thread-safe: decompression itself runs outside the lock.
class CompressedClusterReader {
 public:
  CompressedClusterReader(File* file, uint64_t cluster_size, CompressionType type)
      : file_(file), cluster_size_(cluster_size), type_(type) {}

  // Copies guest bytes [in_cluster, in_cluster + len) of the cluster whose
  // compressed data is `compressed_bytes` bytes at `compressed_offset`
  // (bytes past the end of the file read as zeros, as in QEMU).
  Status Read(uint64_t compressed_offset, uint64_t compressed_bytes, uint64_t in_cluster, uint8_t* out, size_t len);

  // Forgets the cached cluster. A writer calls it before host bytes that
  // held compressed data can be reused, since the cache is keyed by offset.
  void Invalidate() {
    MutexLock lock(&mu_);
    cached_offset_ = UINT64_MAX;
  }

 private:
  File* const file_;
  const uint64_t cluster_size_;
  const CompressionType type_;
  Mutex mu_;
  uint64_t cached_offset_ GUARDED_BY(mu_) = UINT64_MAX;
  std::vector<uint8_t> cached_ GUARDED_BY(mu_);
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_DECOMPRESS_H_
