#include "crypto/sector_cipher.h"

#include <openssl/evp.h>

#include <cstring>
#include <memory>

namespace dmcow {
namespace {

struct CtxFree {
  void operator()(EVP_CIPHER_CTX* c) const { EVP_CIPHER_CTX_free(c); }
};
using CtxPtr = std::unique_ptr<EVP_CIPHER_CTX, CtxFree>;

size_t AlgKeyBytes(const std::string& alg) {
  if (alg == "aes-128") return 16;
  if (alg == "aes-192") return 24;
  if (alg == "aes-256") return 32;
  return 0;
}

void StoreLE64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

}  // namespace

size_t CipherKeyBytes(const CipherSpec& spec) {
  const size_t bytes = AlgKeyBytes(spec.alg);
  if (spec.mode == "xts") return 2 * bytes;
  if (spec.mode == "cbc" || spec.mode == "ecb" || spec.mode == "ctr") return bytes;
  return 0;
}

Status SectorCipher::Create(const CipherSpec& spec, const uint8_t* key, size_t key_len, const std::string& who,
                            std::unique_ptr<SectorCipher>* out) {
  const size_t want = CipherKeyBytes(spec);
  if (want == 0) {
    return Status::NotSupported(who + ": cipher " + spec.alg + "-" + spec.mode + " is not supported (dmcow has AES" +
                                " in ecb, cbc, xts and ctr modes)");
  }
  if (key_len != want) {
    return Status::InvalidArgument(who + ": cipher " + spec.alg + "-" + spec.mode + " needs a " + std::to_string(want) +
                                   "-byte key, not " + std::to_string(key_len));
  }
  std::unique_ptr<SectorCipher> c(new SectorCipher);
  c->spec_ = spec;
  c->who_ = who;
  c->cipher_ = EVP_get_cipherbyname((spec.alg + "-" + spec.mode).c_str());
  if (c->cipher_ == nullptr) return Status::NotSupported(who + ": OpenSSL lacks " + spec.alg + "-" + spec.mode);
  c->key_ = SecureBytes(key, key_len);
  c->iv_bytes_ = static_cast<size_t>(EVP_CIPHER_get_iv_length(c->cipher_));
  if (spec.mode == "ecb") {
    if (!spec.ivgen.empty() && spec.ivgen != "plain" && spec.ivgen != "plain64") {
      return Status::NotSupported(who + ": IV generator " + spec.ivgen + " with ecb");
    }
    c->spec_.ivgen.clear();
    *out = std::move(c);
    return Status::OK();
  }
  if (spec.ivgen == "essiv") {
    const EVP_MD* md = EVP_get_digestbyname(spec.ivgen_hash.c_str());
    if (md == nullptr) return Status::NotSupported(who + ": unknown ESSIV hash '" + spec.ivgen_hash + "'");
    const size_t digest = static_cast<size_t>(EVP_MD_get_size(md));
    // QEMU's qcrypto_block_luks_essiv_cipher: an AES whose key is the digest.
    const std::string essiv_alg = digest == 16 ? "aes-128" : digest == 24 ? "aes-192" : digest == 32 ? "aes-256" : "";
    if (essiv_alg.empty()) {
      return Status::NotSupported(who + ": No AES cipher with key size " + std::to_string(digest) + " available");
    }
    c->essiv_key_ = SecureBytes(digest);
    unsigned int got = 0;
    if (EVP_Digest(key, key_len, c->essiv_key_.data(), &got, md, nullptr) != 1 || got != digest) {
      return Status::IOError(who + ": ESSIV hash failed");
    }
    c->essiv_cipher_ = EVP_get_cipherbyname((essiv_alg + "-ecb").c_str());
    if (c->essiv_cipher_ == nullptr) return Status::NotSupported(who + ": OpenSSL lacks " + essiv_alg + "-ecb");
  } else if (spec.ivgen != "plain" && spec.ivgen != "plain64") {
    return Status::NotSupported(who + ": IV generator '" + spec.ivgen + "' is not supported");
  }
  *out = std::move(c);
  return Status::OK();
}

Status SectorCipher::MakeIv(uint64_t sector, EVP_CIPHER_CTX* essiv, uint8_t* iv) const {
  std::memset(iv, 0, iv_bytes_);
  if (spec_.ivgen == "plain") sector &= 0xffffffffu;
  StoreLE64(iv, sector);
  if (essiv == nullptr) return Status::OK();
  int n = 0;
  uint8_t block[16] = {};
  if (EVP_EncryptUpdate(essiv, block, &n, iv, 16) != 1 || n != 16) {
    return Status::IOError(who_ + ": ESSIV encryption failed");
  }
  std::memcpy(iv, block, iv_bytes_ < 16 ? iv_bytes_ : 16);
  return Status::OK();
}

Status SectorCipher::Run(uint64_t first_sector, uint8_t* buf, size_t len, int encrypt) const {
  if (len % kCryptSectorSize != 0) {
    return Status::InvalidArgument(who_ + ": encrypted I/O of " + std::to_string(len) + " bytes, not whole sectors");
  }
  CtxPtr ctx(EVP_CIPHER_CTX_new());
  if (!ctx || EVP_CipherInit_ex(ctx.get(), cipher_, nullptr, key_.data(), nullptr, encrypt) != 1 ||
      EVP_CIPHER_CTX_set_padding(ctx.get(), 0) != 1) {
    return Status::IOError(who_ + ": cipher setup failed");
  }
  CtxPtr essiv;
  if (essiv_cipher_ != nullptr) {
    essiv.reset(EVP_CIPHER_CTX_new());
    if (!essiv || EVP_EncryptInit_ex(essiv.get(), essiv_cipher_, nullptr, essiv_key_.data(), nullptr) != 1 ||
        EVP_CIPHER_CTX_set_padding(essiv.get(), 0) != 1) {
      return Status::IOError(who_ + ": ESSIV setup failed");
    }
  }
  uint8_t iv[32];
  for (size_t done = 0; done < len; done += kCryptSectorSize) {
    const uint64_t sector = first_sector + done / kCryptSectorSize;
    if (iv_bytes_ != 0) {
      DMCOW_RETURN_IF_ERROR(MakeIv(sector, essiv.get(), iv));
      if (EVP_CipherInit_ex(ctx.get(), nullptr, nullptr, nullptr, iv, encrypt) != 1) {
        return Status::IOError(who_ + ": cipher IV setup failed at sector " + std::to_string(sector));
      }
    }
    int n = 0;
    if (EVP_CipherUpdate(ctx.get(), buf + done, &n, buf + done, static_cast<int>(kCryptSectorSize)) != 1 ||
        n != static_cast<int>(kCryptSectorSize)) {
      return Status::IOError(who_ + ": cipher failed at sector " + std::to_string(sector));
    }
  }
  return Status::OK();
}

}  // namespace dmcow
