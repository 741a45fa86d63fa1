#include "image/decompress.h"

#include <isa-l/igzip_lib.h>
#include <libdeflate.h>
#include <zstd.h>

#include <climits>
#include <memory>
#include <string>

namespace dmcow {
namespace {

// The largest zstd window a qcow2 cluster can need: clusters are at most
// 2 MiB. A frame asking for more is refused rather than allocated.
constexpr int kZstdMaxWindowLog = 22;

// ISA-L's inflate: about twice zlib's speed on qcow2 clusters. Any window up
// to 32 KiB is accepted, so QEMU's 4 KiB-window streams too (as zlib's
// inflate with windowBits -15). It also takes what libdeflate refuses below.
Status InflateIsal(const uint8_t* in, size_t in_len, uint8_t* out, size_t out_len) {
  thread_local std::unique_ptr<inflate_state> state = std::make_unique<inflate_state>();
  isal_inflate_init(state.get());
  state->crc_flag = ISAL_DEFLATE;
  state->next_in = const_cast<uint8_t*>(in);
  state->avail_in = static_cast<uint32_t>(in_len);
  state->next_out = out;
  state->avail_out = static_cast<uint32_t>(out_len);
  const int ret = isal_inflate(state.get());
  // Input is sector-rounded, so the stream may be cut or carry slack after
  // its end; what matters is a full cluster of output.
  if (ret >= 0 && state->avail_out == 0) return Status::OK();
  if (ret >= 0) return Status::Corrupt("invalid deflate data (ends early)");
  return Status::Corrupt("invalid deflate data (igzip error " + std::to_string(ret) + ")");
}

struct DeflateDecompressor {
  libdeflate_decompressor* d = libdeflate_alloc_decompressor();
  ~DeflateDecompressor() { libdeflate_free_decompressor(d); }
};

// libdeflate first: whole-buffer inflate, 25-30% less CPU than ISA-L on the
// host and 1.2x its speed under TCG (bench/RESULTS.md, qconvert), but only
// for complete streams that fit. Streams that run on past the cluster (QEMU
// accepts a full cluster, as zlib's Z_BUF_ERROR with no room left) go to
// ISA-L, which stops when the output is full; so do the broken ones, for
// its error message.
Status Inflate(const uint8_t* in, size_t in_len, uint8_t* out, size_t out_len) {
  thread_local DeflateDecompressor dec;
  size_t in_used = 0, produced = 0;
  if (dec.d &&
      libdeflate_deflate_decompress_ex(dec.d, in, in_len, out, out_len, &in_used, &produced) == LIBDEFLATE_SUCCESS &&
      produced == out_len) {
    return Status::OK();
  }
  return InflateIsal(in, in_len, out, out_len);
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
    MutexLock lock(&mu_);
    if (cached_offset_ == compressed_offset) {
      std::memcpy(out, cached_.data() + in_cluster, len);
      return Status::OK();
    }
  }
  thread_local std::vector<uint8_t> compressed, cluster;
  compressed.resize(compressed_bytes);  // bounded by the descriptor width: at most two clusters
  // A read of the whole cluster decompresses straight into the caller's
  // buffer (whole-cluster readers, such as the daemon assembling chunks, do
  // not come back for the rest of it: nothing to cache).
  const bool whole = in_cluster == 0 && len == cluster_size_;
  if (!whole) cluster.resize(cluster_size_);
  uint8_t* const dest = whole ? out : cluster.data();
  size_t got = 0;
  DMCOW_RETURN_IF_ERROR(file_->Read(compressed_offset, compressed.size(), compressed.data(), &got));
  // (a qcow v1 entry may claim 0 bytes: the buffer may then be null, which memset must not get)
  if (got < compressed.size()) std::memset(compressed.data() + got, 0, compressed.size() - got);
  Status s = DecompressCluster(type_, compressed.data(), compressed.size(), dest, cluster_size_);
  if (!s.ok()) {
    return Status::Corrupt(file_->name() + ": compressed cluster at host offset " + Hex(compressed_offset) + ": " +
                           s.message());
  }
  if (whole) return Status::OK();
  std::memcpy(out, cluster.data() + in_cluster, len);
  MutexLock lock(&mu_);
  cached_.swap(cluster);
  cached_offset_ = compressed_offset;
  return Status::OK();
}

}  // namespace dmcow
