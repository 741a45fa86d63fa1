// Content checksum: SHA-256 of the guest-visible bytes.
#include <openssl/evp.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "dmcow/image.h"

namespace dmcow {

Status ComputeContentSha256(Image* image, std::string* hex) {
  constexpr size_t kChunk = 4 << 20;
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    return Status::IOError("SHA-256 initialisation failed");
  }
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
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_len = 0;
  EVP_DigestFinal_ex(ctx.get(), digest, &digest_len);
  static const char kHex[] = "0123456789abcdef";
  hex->clear();
  for (unsigned int i = 0; i < digest_len; i++) {
    hex->push_back(kHex[digest[i] >> 4]);
    hex->push_back(kHex[digest[i] & 15]);
  }
  return Status::OK();
}

}  // namespace dmcow
