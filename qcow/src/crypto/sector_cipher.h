// The cipher of an encrypted image's data: 512-byte sectors, each with its
// own IV made from a sector number, as QEMU's crypto/block.c applies them
// (and dm-crypt, which names the same modes "aes-xts-plain64" etc.).
//
// Names are QEMU's (qapi/crypto.json): the algorithm "aes-128", "aes-192"
// or "aes-256"; the mode "ecb", "cbc", "xts" or "ctr"; the IV generator
// "plain" (the sector number's low 32 bits, little-endian), "plain64" (all
// 64 bits) or "essiv" (the sector number encrypted in ECB mode under the
// hash, by `ivgen_hash`, of the key). XTS keys are twice the algorithm's.
// Which sector number a sector gets is the caller's: the host sector for
// LUKS in qcow2, the guest sector for legacy AES.
#ifndef DMCOW_QCOW_CRYPTO_SECTOR_CIPHER_H_
#define DMCOW_QCOW_CRYPTO_SECTOR_CIPHER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "crypto/secure_bytes.h"
#include "dmcow/status.h"

typedef struct evp_cipher_st EVP_CIPHER;
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;

namespace dmcow {

inline constexpr size_t kCryptSectorSize = 512;

struct CipherSpec {
  std::string alg;         // "aes-256"
  std::string mode;        // "xts"
  std::string ivgen;       // "plain64"; empty for ecb
  std::string ivgen_hash;  // essiv only: "sha256"
};

// Bytes of key `spec` needs (0 if it names no cipher dmcow has).
size_t CipherKeyBytes(const CipherSpec& spec);

class SectorCipher {
 public:
  // A cipher for `spec` keyed with `key`; NotSupported naming `who` for a
  // cipher, mode or IV generator OpenSSL or dmcow lacks, InvalidArgument
  // for a key of the wrong length.
  static Status Create(const CipherSpec& spec, const uint8_t* key, size_t key_len, const std::string& who,
                       std::unique_ptr<SectorCipher>* out);

  // In place, `len` a multiple of 512; the first sector's number is
  // `first_sector`, the next ones follow. Safe from many threads at once.
  Status Encrypt(uint64_t first_sector, uint8_t* buf, size_t len) const { return Run(first_sector, buf, len, 1); }
  Status Decrypt(uint64_t first_sector, uint8_t* buf, size_t len) const { return Run(first_sector, buf, len, 0); }

  const CipherSpec& spec() const { return spec_; }
  const SecureBytes& key() const { return key_; }  // for a new LUKS key slot

 private:
  SectorCipher() = default;
  Status Run(uint64_t first_sector, uint8_t* buf, size_t len, int encrypt) const;
  Status MakeIv(uint64_t sector, EVP_CIPHER_CTX* essiv, uint8_t* iv) const;

  CipherSpec spec_;
  std::string who_;
  const EVP_CIPHER* cipher_ = nullptr;
  SecureBytes key_;
  const EVP_CIPHER* essiv_cipher_ = nullptr;  // ECB, keyed with essiv_key_
  SecureBytes essiv_key_;
  size_t iv_bytes_ = 0;
};

}  // namespace dmcow

#endif  // DMCOW_QCOW_CRYPTO_SECTOR_CIPHER_H_
