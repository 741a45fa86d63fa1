#include "decompress.h"

#include <zlib.h>
#include <zstd.h>

#include <climits>

namespace dmcow {
namespace {

// The largest zstd window a qcow2 cluster can need: clusters are at most
// 2 MiB. A frame asking for more is refused rather than allocated.
constexpr int kZstdMaxWindowLog = 22;

struct InflateContext {
  z_stream strm{};
  bool ready = false;
  ~InflateContext() {
    if (ready) inflateEnd(&strm);
  }
};

Status Inflate(const uint8_t* in, size_t in_len, uint8_t* out, size_t out_len) {
  thread_local InflateContext ctx;
  if (!ctx.ready) {
    // Raw deflate; a 32 KiB window also accepts QEMU's 4 KiB-window streams.
    if (inflateInit2(&ctx.strm, -15) != Z_OK) return Status::IOError("zlib initialisation failed");
    ctx.ready = true;
  } else {
    inflateReset(&ctx.strm);
  }
  ctx.strm.next_in = const_cast<uint8_t*>(in);
  ctx.strm.avail_in = static_cast<uInt>(in_len);
  ctx.strm.next_out = out;
  ctx.strm.avail_out = static_cast<uInt>(out_len);
  int ret = inflate(&ctx.strm, Z_FINISH);
  // Input is sector-rounded, so the stream may be cut (Z_BUF_ERROR) or carry
  // slack after its end; what matters is a full cluster of output.
  if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR || ret == Z_OK) && ctx.strm.avail_out == 0) return Status::OK();
  return Status::Corrupt(std::string("invalid deflate data (") + (ctx.strm.msg ? ctx.strm.msg : "ends early") + ")");
}

struct ZstdContext {
  ZSTD_DCtx* dctx = nullptr;
  ~ZstdContext() { ZSTD_freeDCtx(dctx); }
};

Status Unzstd(const uint8_t* in, size_t in_len, uint8_t* out, size_t out_len) {
  thread_local ZstdContext ctx;
  if (!ctx.dctx) {
    ctx.dctx = ZSTD_createDCtx();
    if (!ctx.dctx) return Status::IOError("zstd initialisation failed");
    ZSTD_DCtx_setParameter(ctx.dctx, ZSTD_d_windowLogMax, kZstdMaxWindowLog);
  } else {
    ZSTD_DCtx_reset(ctx.dctx, ZSTD_reset_session_only);
  }
  ZSTD_inBuffer input = {in, in_len, 0};
  ZSTD_outBuffer output = {out, out_len, 0};
  while (output.pos < output.size) {
    size_t in_before = input.pos, out_before = output.pos;
    size_t ret = ZSTD_decompressStream(ctx.dctx, &output, &input);
    if (ZSTD_isError(ret)) return Status::Corrupt(std::string("invalid zstd data (") + ZSTD_getErrorName(ret) + ")");
    if (input.pos == in_before && output.pos == out_before) break;  // no progress: input exhausted
  }
  if (output.pos != output.size) return Status::Corrupt("invalid zstd data (ends early)");
  return Status::OK();
}

}  // namespace

Status DecompressCluster(CompressionType type, const uint8_t* in, size_t in_len, uint8_t* out, size_t out_len) {
  if (in_len > UINT_MAX || out_len > UINT_MAX) return Status::InvalidArgument("compressed cluster too large");
  return type == CompressionType::kZstd ? Unzstd(in, in_len, out, out_len) : Inflate(in, in_len, out, out_len);
}

}  // namespace dmcow

#include <cstring>

#include "util.h"

namespace dmcow {

Status CompressedClusterReader::Read(uint64_t compressed_offset, uint64_t compressed_bytes, uint64_t in_cluster,
                                     uint8_t* out, size_t len) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (cached_offset_ == compressed_offset) {
      std::memcpy(out, cached_.data() + in_cluster, len);
      return Status::OK();
    }
  }
  thread_local std::vector<uint8_t> compressed, cluster;
  compressed.resize(compressed_bytes);  // bounded by the descriptor width: at most two clusters
  cluster.resize(cluster_size_);
  size_t got = 0;
  DMCOW_RETURN_IF_ERROR(file_->Read(compressed_offset, compressed.size(), compressed.data(), &got));
  // (a qcow v1 entry may claim 0 bytes: the buffer may then be null, which memset must not get)
  if (got < compressed.size()) std::memset(compressed.data() + got, 0, compressed.size() - got);
  Status s = DecompressCluster(type_, compressed.data(), compressed.size(), cluster.data(), cluster.size());
  if (!s.ok()) {
    return Status::Corrupt(file_->name() + ": compressed cluster at host offset " + Hex(compressed_offset) + ": " +
                           s.message());
  }
  std::memcpy(out, cluster.data() + in_cluster, len);
  std::lock_guard<std::mutex> lock(mu_);
  cached_.swap(cluster);
  cached_offset_ = compressed_offset;
  return Status::OK();
}

}  // namespace dmcow
