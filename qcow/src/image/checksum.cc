// Content digests: plain SHA-256 of the guest-visible bytes, and the block
// digest "blk-sha256" of docs/checksum.md, which skips what block status
// says is zero.
#include <openssl/evp.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "dmcow/image.h"

namespace dmcow {

namespace {

using Digest = std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)>;

Status NewSha256(Digest* ctx) {
  ctx->reset(EVP_MD_CTX_new());
  if (!*ctx || EVP_DigestInit_ex(ctx->get(), EVP_sha256(), nullptr) != 1) {
    return Status::IOError("SHA-256 initialisation failed");
  }
  return Status::OK();
}

void FinishHex(EVP_MD_CTX* ctx, std::string* hex) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_len = 0;
  EVP_DigestFinal_ex(ctx, digest, &digest_len);
  static const char kHex[] = "0123456789abcdef";
  hex->clear();
  for (unsigned int i = 0; i < digest_len; i++) {
    hex->push_back(kHex[digest[i] >> 4]);
    hex->push_back(kHex[digest[i] & 15]);
  }
}

bool AllZero(const uint8_t* p, size_t len) {
  if (len == 0) return true;
  return p[0] == 0 && std::memcmp(p, p + 1, len - 1) == 0;
}

void PutLe(uint64_t v, int bytes, std::vector<uint8_t>* out) {
  for (int i = 0; i < bytes; i++) out->push_back(static_cast<uint8_t>(v >> (8 * i)));
}

// The outer hash of blk-sha256 and its pending run of zero blocks.
class BlockDigest {
 public:
  static constexpr uint64_t kBlock = 64 << 10;

  explicit BlockDigest(EVP_MD_CTX* outer) : outer_(outer) {}

  void Zero(uint64_t blocks) { zero_run_ += blocks; }

  void Data(const uint8_t* block, size_t len) {
    unsigned char h[EVP_MAX_MD_SIZE];
    unsigned int h_len = 0;
    EVP_Digest(block, len, h, &h_len, EVP_sha256(), nullptr);
    EndZeroRun();
    const uint8_t tag = 1;
    EVP_DigestUpdate(outer_, &tag, 1);
    EVP_DigestUpdate(outer_, h, h_len);
  }

  void EndZeroRun() {
    if (zero_run_ == 0) return;
    std::vector<uint8_t> record{0};
    PutLe(zero_run_, 8, &record);
    EVP_DigestUpdate(outer_, record.data(), record.size());
    zero_run_ = 0;
  }

 private:
  EVP_MD_CTX* outer_;
  uint64_t zero_run_ = 0;
};

}  // namespace

Status ComputeContentSha256(Image* image, std::string* hex) {
  constexpr size_t kChunk = 4 << 20;
  Digest ctx(nullptr, EVP_MD_CTX_free);
  DMCOW_RETURN_IF_ERROR(NewSha256(&ctx));
  std::vector<uint8_t> buf(kChunk);
  const std::vector<uint8_t> zeros(kChunk, 0);
  const uint64_t size = image->virtual_size();
  for (uint64_t offset = 0; offset < size;) {
    MapExtent ext;
    DMCOW_RETURN_IF_ERROR(GetMapExtent(image, offset, kChunk, &ext));
    // Ranges known to read as zeros are hashed without reading them.
    const size_t n = static_cast<size_t>(ext.length);
    const uint8_t* data = zeros.data();
    if (!ext.zero) {
      DMCOW_RETURN_IF_ERROR(image->Read(offset, buf.data(), n));
      data = buf.data();
    }
    EVP_DigestUpdate(ctx.get(), data, n);
    offset += n;
  }
  FinishHex(ctx.get(), hex);
  return Status::OK();
}

// Blocks wholly inside a range block status calls zero are counted without
// reading; every other block is read (through the chain) and tested, so a
// block of written zeros counts as zero too and the digest does not depend
// on how zeros are stored.
Status ComputeBlockDigest(Image* image, std::string* hex) {
  constexpr uint64_t B = BlockDigest::kBlock;
  constexpr uint64_t kReadMax = 64 * B;  // blocks read at once
  Digest outer(nullptr, EVP_MD_CTX_free);
  DMCOW_RETURN_IF_ERROR(NewSha256(&outer));
  const uint64_t size = image->virtual_size();
  static constexpr char kMagic[] = "dmcow-blk-sha256-v1";  // 19 bytes, no terminator
  std::vector<uint8_t> header(kMagic, kMagic + sizeof(kMagic) - 1);
  PutLe(size, 8, &header);
  PutLe(B, 4, &header);
  EVP_DigestUpdate(outer.get(), header.data(), header.size());

  BlockDigest digest(outer.get());
  std::vector<uint8_t> buf;
  for (uint64_t pos = 0; pos < size;) {  // pos is always at a block's start
    MapExtent ext;
    DMCOW_RETURN_IF_ERROR(GetMapExtent(image, pos, size - pos, &ext));
    if (ext.length == 0) {
      return Status::Corrupt(image->filename() + ": empty block status at offset " + std::to_string(pos));
    }
    const uint64_t run_end = pos + std::min(ext.length, size - pos);
    if (ext.zero) {
      const uint64_t whole = run_end == size ? size : run_end / B * B;
      if (whole > pos) {
        digest.Zero((whole - pos + B - 1) / B);
        pos = whole;
        continue;
      }
    }
    // Data, or a zero run that ends inside this block: read whole blocks up
    // to the block holding the run's end, kReadMax at a time, without asking
    // again (a data run of 1 TiB is looked up once, not once per read).
    const uint64_t read_to = std::min(size, (run_end + B - 1) / B * B);
    while (pos < read_to) {
      const uint64_t read_end = std::min(read_to, pos + kReadMax);
      buf.resize(static_cast<size_t>(read_end - pos));
      DMCOW_RETURN_IF_ERROR(image->Read(pos, buf.data(), buf.size()));
      for (uint64_t b = 0; b < buf.size(); b += B) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(B, buf.size() - b));
        if (AllZero(buf.data() + b, n)) {
          digest.Zero(1);
        } else {
          digest.Data(buf.data() + b, n);
        }
      }
      pos = read_end;
    }
  }
  digest.EndZeroRun();
  FinishHex(outer.get(), hex);
  return Status::OK();
}

}  // namespace dmcow
