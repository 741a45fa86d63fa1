// Compression of guest clusters as qcow and qcow2 images store them.
//
// Kept apart from Image so that callers (convert) compress on several
// threads and hand finished payloads to Image::WriteCompressedCluster, which
// only allocates and stores them.
#ifndef DMCOW_COMPRESS_H_
#define DMCOW_COMPRESS_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "dmcow/status.h"

namespace dmcow {

struct CompressionSettings {
  // "zlib" (raw deflate with a 4 KiB window, which every QEMU can inflate) or
  // "zstd" (qcow2 v3 images created with compression_type=zstd).
  std::string type = "zlib";
  // 0 is the type's default (zlib 6 with shorter hash chains, see
  // qcow/src/image/compress.cc: within 1% of QEMU's output size; zstd 3,
  // as QEMU). zlib: 1..9;
  // levels 1-3 use ISA-L's igzip (same 4 KiB window, its strongest
  // setting), several times faster for output up to 10% larger.
  // zstd: 1..19, passed to libzstd.
  int level = 0;
};

// Validates settings (type known, level in range) with a one-line message.
Status CheckCompressionSettings(const CompressionSettings& settings);

// Compresses one guest cluster of `cluster_size` bytes (a short last cluster
// is padded with zeros by the caller). Returns true and fills *payload when
// the result is smaller than the cluster, as both formats require; returns
// false when the cluster does not compress (it is then stored uncompressed).
// Thread-safe: compression contexts are per thread.
bool CompressCluster(const CompressionSettings& settings, const uint8_t* data, size_t cluster_size,
                     std::vector<uint8_t>* payload);

}  // namespace dmcow

#endif  // DMCOW_COMPRESS_H_
