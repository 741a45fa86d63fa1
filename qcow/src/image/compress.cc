#include "dmcow/compress.h"

#include <isa-l/igzip_lib.h>
#include <zlib.h>
#include <zstd.h>

#include <memory>

namespace dmcow {
namespace {

// QEMU's deflate settings for compressed clusters: raw deflate, 4 KiB
// window (windowBits -12), memLevel 9. A larger window would make clusters
// that QEMU (which inflates with the same 4 KiB window) cannot read.
constexpr int kWindowBits = -12;
constexpr int kMemLevel = 9;
constexpr int kIsalHistBits = 12;
constexpr int kDefaultZlibLevel = 6;
// Level 6 with its hash chains cut from 128 to 48 entries (good, lazy and
// nice lengths stay level 6's). Same window and format as QEMU's; measured
// on the bench disk: output 0.5% larger than qemu-img -c, 15-18% less CPU,
// which is what lets -c beat qemu-img on two cores (bench/RESULTS.md).
// tests/convert_test.cc holds the output within 1% of qemu-img's.
constexpr int kTunedGoodLength = 8;
constexpr int kTunedMaxLazy = 16;
constexpr int kTunedNiceLength = 128;
constexpr int kTunedMaxChain = 48;
constexpr int kDefaultZstdLevel = 3;
// zlib levels 1-3 are served by igzip at its strongest setting. On the bench
// disk (bench/RESULTS.md) igzip levels 1 and 2 gave output 11-12% larger
// than zlib level 6, outside the 10% budget a user of the fast levels is
// promised, while level 3 gives +9.5% at 6.6 times zlib's speed, which is
// fast enough that the file writes, not compression, bound a conversion.
constexpr int kMaxZlibLevelForIsal = 3;
constexpr uint32_t kIsalLevel = 3;
// An igzip result above 7/10 of the cluster is retried with zlib level 1
// (on the bench disk: 29 clusters of 7,707, output 1.101 -> 1.098 of zlib 6).
constexpr size_t kIsalRetryTenths = 7;

struct ZlibStream {
  z_stream strm{};
  int level = -1;
  ~ZlibStream() {
    if (level >= 0) deflateEnd(&strm);
  }
};

// Compressors write into one buffer per thread, sized once, and the payload
// gets only the compressed bytes. A payload sized to the cluster for each
// call cost a 64 KiB zero fill per cluster and, with several threads, fresh
// pages from the allocator every time: convert -c -m 2 took 34,201 page
// faults against 1,966 with -m 1, and 33% more CPU.
uint8_t* OutputScratch(size_t n) {
  thread_local std::vector<uint8_t> scratch;
  if (scratch.size() < n) scratch.resize(n);
  return scratch.data();
}

bool CompressZlib(int level, const uint8_t* data, size_t n, std::vector<uint8_t>* out) {
  thread_local ZlibStream z;
  if (z.level != level) {
    if (z.level >= 0) deflateEnd(&z.strm);
    z.strm = z_stream{};
    z.level = -1;
    if (deflateInit2(&z.strm, level, Z_DEFLATED, kWindowBits, kMemLevel, Z_DEFAULT_STRATEGY) != Z_OK) return false;
    z.level = level;
  } else if (deflateReset(&z.strm) != Z_OK) {
    return false;
  }
  // deflateReset restores the level's search parameters, so the tuning is
  // applied to every cluster.
  if (level == kDefaultZlibLevel &&
      deflateTune(&z.strm, kTunedGoodLength, kTunedMaxLazy, kTunedNiceLength, kTunedMaxChain) != Z_OK) {
    return false;
  }
  uint8_t* const buf = OutputScratch(n - 1);  // must come out strictly smaller than the cluster
  z.strm.next_in = const_cast<Bytef*>(data);
  z.strm.avail_in = static_cast<uInt>(n);
  z.strm.next_out = buf;
  z.strm.avail_out = static_cast<uInt>(n - 1);
  if (deflate(&z.strm, Z_FINISH) != Z_STREAM_END) return false;
  out->assign(buf, buf + (n - 1 - z.strm.avail_out));
  return true;
}

bool CompressIsal(const uint8_t* data, size_t n, std::vector<uint8_t>* out) {
  thread_local std::vector<uint8_t> level_buf(ISAL_DEF_LVL3_DEFAULT);
  thread_local std::unique_ptr<isal_zstream> stream = std::make_unique<isal_zstream>();
  isal_zstream* s = stream.get();
  isal_deflate_init(s);
  s->level = kIsalLevel;
  s->level_buf = level_buf.data();
  s->level_buf_size = static_cast<uint32_t>(level_buf.size());
  s->hist_bits = kIsalHistBits;
  s->gzip_flag = IGZIP_DEFLATE;
  s->flush = NO_FLUSH;
  s->end_of_stream = 1;
  uint8_t* const buf = OutputScratch(n - 1);
  s->next_in = const_cast<uint8_t*>(data);
  s->avail_in = static_cast<uint32_t>(n);
  s->next_out = buf;
  s->avail_out = static_cast<uint32_t>(n - 1);
  if (isal_deflate(s) != COMP_OK || s->internal_state.state != ZSTATE_END) return false;
  out->assign(buf, buf + (n - 1 - s->avail_out));
  return true;
}

bool CompressZstd(int level, const uint8_t* data, size_t n, std::vector<uint8_t>* out) {
  struct CtxFree {
    void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
  };
  thread_local std::unique_ptr<ZSTD_CCtx, CtxFree> cctx(ZSTD_createCCtx());
  if (!cctx) return false;
  ZSTD_CCtx_reset(cctx.get(), ZSTD_reset_session_and_parameters);
  if (ZSTD_isError(ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_compressionLevel, level))) return false;
  uint8_t* const buf = OutputScratch(n - 1);
  const size_t r = ZSTD_compress2(cctx.get(), buf, n - 1, data, n);
  if (ZSTD_isError(r)) return false;
  out->assign(buf, buf + r);
  return true;
}

}  // namespace

Status CheckCompressionSettings(const CompressionSettings& settings) {
  if (settings.type == "zlib") {
    if (settings.level < 0 || settings.level > 9) {
      return Status::InvalidArgument("compression_level must be between 1 and 9 for zlib, not " +
                                     std::to_string(settings.level));
    }
    return Status::OK();
  }
  if (settings.type == "zstd") {
    if (settings.level < 0 || settings.level > ZSTD_maxCLevel()) {
      return Status::InvalidArgument("compression_level must be between 1 and " + std::to_string(ZSTD_maxCLevel()) +
                                     " for zstd, not " + std::to_string(settings.level));
    }
    return Status::OK();
  }
  return Status::InvalidArgument("unknown compression type '" + settings.type + "' (zlib or zstd)");
}

bool CompressCluster(const CompressionSettings& settings, const uint8_t* data, size_t cluster_size,
                     std::vector<uint8_t>* payload) {
  if (cluster_size < 2) return false;
  if (settings.type == "zstd") {
    return CompressZstd(settings.level == 0 ? kDefaultZstdLevel : settings.level, data, cluster_size, payload);
  }
  const int level = settings.level == 0 ? kDefaultZlibLevel : settings.level;
  if (level <= kMaxZlibLevelForIsal) {
    const bool fits = CompressIsal(data, cluster_size, payload);
    if (fits && payload->size() * 10 <= cluster_size * kIsalRetryTenths) return true;
    // igzip's matcher does worst on poorly compressible clusters, where
    // zlib's fastest level often finds more; trying it there costs little
    // (few clusters) and keeps the output within the fast levels' budget.
    thread_local std::vector<uint8_t> retry;
    if (!CompressZlib(1, data, cluster_size, &retry)) return fits;
    if (!fits || retry.size() < payload->size()) payload->swap(retry);
    return true;
  }
  return CompressZlib(level, data, cluster_size, payload);
}

}  // namespace dmcow
