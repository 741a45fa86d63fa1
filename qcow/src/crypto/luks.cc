#include "crypto/luks.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <chrono>

#include <algorithm>
#include <cstring>
#include <vector>

#include "util.h"

namespace dmcow {
namespace {

const uint8_t kLuksMagic[6] = {'L', 'U', 'K', 'S', 0xba, 0xbe};

Status Bad(const std::string& who, const std::string& what) { return Status::Corrupt(who + ": LUKS header: " + what); }

// A NUL-terminated string in a fixed field; false if it fills the field.
bool FieldString(const uint8_t* p, size_t n, std::string* out) {
  const void* nul = std::memchr(p, 0, n);
  if (nul == nullptr) return false;
  out->assign(reinterpret_cast<const char*>(p), static_cast<const uint8_t*>(nul) - p);
  return true;
}

// "xts-plain64" -> mode xts, ivgen plain64; "cbc-essiv:sha256" -> mode cbc,
// ivgen essiv, its hash sha256 (the spec's cipher-mode grammar).
Status ParseCipher(const std::string& who, LuksHeader* h) {
  if (h->cipher_name != "aes") {
    return Status::NotSupported(who + ": LUKS cipher '" + h->cipher_name + "' is not supported (dmcow has aes)");
  }
  const std::string& mode = h->cipher_mode;
  const size_t dash = mode.find('-');
  CipherSpec& spec = h->spec;
  spec.mode = mode.substr(0, dash);
  if (dash != std::string::npos) {
    const std::string ivgen = mode.substr(dash + 1);
    const size_t colon = ivgen.find(':');
    spec.ivgen = ivgen.substr(0, colon);
    if (colon != std::string::npos) spec.ivgen_hash = ivgen.substr(colon + 1);
  }
  const uint32_t alg_bytes = spec.mode == "xts" ? h->key_bytes / 2 : h->key_bytes;
  if (alg_bytes == 16 || alg_bytes == 24 || alg_bytes == 32) spec.alg = "aes-" + std::to_string(alg_bytes * 8);
  if (spec.alg.empty() || CipherKeyBytes(spec) != h->key_bytes) {
    return Status::NotSupported(who + ": LUKS cipher " + h->cipher_name + "-" + mode + " with a " +
                                std::to_string(h->key_bytes) + "-byte key is not supported");
  }
  if (spec.mode != "ecb" && spec.ivgen != "plain" && spec.ivgen != "plain64" && spec.ivgen != "essiv") {
    return Status::NotSupported(who + ": LUKS cipher mode '" + mode + "' is not supported");
  }
  return Status::OK();
}

Status Pbkdf2(const std::string& hash, const uint8_t* pass, size_t pass_len, const uint8_t* salt, size_t salt_len,
              uint32_t iterations, uint8_t* out, size_t out_len, const std::string& who) {
  const EVP_MD* md = EVP_get_digestbyname(hash.c_str());
  if (md == nullptr) return Status::NotSupported(who + ": LUKS hash '" + hash + "' is not supported");
  if (PKCS5_PBKDF2_HMAC(reinterpret_cast<const char*>(pass), static_cast<int>(pass_len), salt,
                        static_cast<int>(salt_len), static_cast<int>(iterations), md, static_cast<int>(out_len),
                        out) != 1) {
    return Status::IOError(who + ": PBKDF2 failed");
  }
  return Status::OK();
}

// The AF splitter's diffusion (LUKS1 spec, section 2.4): each digest-sized
// piece of `block` replaced by H(be32(index) || piece), the last piece
// truncated.
Status Diffuse(const EVP_MD* md, uint8_t* block, size_t len, const std::string& who) {
  const size_t digest = static_cast<size_t>(EVP_MD_get_size(md));
  uint8_t out[EVP_MAX_MD_SIZE];
  for (size_t i = 0, at = 0; at < len; i++, at += digest) {
    const size_t n = std::min(digest, len - at);
    uint8_t index[4];
    StoreBE32(index, static_cast<uint32_t>(i));
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    unsigned int got = 0;
    const bool ok = ctx != nullptr && EVP_DigestInit_ex(ctx, md, nullptr) == 1 &&
                    EVP_DigestUpdate(ctx, index, 4) == 1 && EVP_DigestUpdate(ctx, block + at, n) == 1 &&
                    EVP_DigestFinal_ex(ctx, out, &got) == 1;
    EVP_MD_CTX_free(ctx);
    if (!ok) return Status::IOError(who + ": AF diffusion hash failed");
    std::memcpy(block + at, out, n);
  }
  OPENSSL_cleanse(out, sizeof(out));
  return Status::OK();
}

// AF-merge: the key from its `stripes` split blocks.
Status AfMerge(const std::string& hash, const uint8_t* split, size_t key_bytes, uint32_t stripes, uint8_t* key,
               const std::string& who) {
  const EVP_MD* md = EVP_get_digestbyname(hash.c_str());
  if (md == nullptr) return Status::NotSupported(who + ": LUKS hash '" + hash + "' is not supported");
  SecureBytes block(key_bytes);
  for (uint32_t i = 0; i + 1 < stripes; i++) {
    for (size_t j = 0; j < key_bytes; j++) block.data()[j] ^= split[i * key_bytes + j];
    DMCOW_RETURN_IF_ERROR(Diffuse(md, block.data(), key_bytes, who));
  }
  for (size_t j = 0; j < key_bytes; j++) key[j] = block.data()[j] ^ split[(stripes - 1) * key_bytes + j];
  return Status::OK();
}

uint64_t MaterialBytes(const LuksHeader& h) {
  return RoundUp(uint64_t{h.key_bytes} * h.slots[0].stripes, kCryptSectorSize);
}

constexpr uint64_t kKeySlotAlign = 4096;   // QCRYPTO_BLOCK_LUKS_KEY_SLOT_OFFSET, and each slot's alignment
constexpr uint32_t kMinIterations = 1000;  // QEMU's minimum for slots and the master key digest

uint64_t SlotStride(size_t key_bytes) { return RoundUp(uint64_t{key_bytes} * kLuksStripes, kKeySlotAlign); }

Status Random(uint8_t* out, size_t n, const std::string& who) {
  if (RAND_bytes(out, static_cast<int>(n)) != 1) return Status::IOError(who + ": no random bytes from OpenSSL");
  return Status::OK();
}

// PBKDF2 iterations `hash` runs in `ms` milliseconds here, as QEMU's
// qcrypto_pbkdf2_count_iters measures them, at least kMinIterations and at
// most kLuksMaxIterations.
Status CountIterations(const std::string& hash, uint64_t ms, const std::string& who, uint32_t* out) {
  uint8_t salt[kLuksSaltBytes] = {}, key[64];
  const uint8_t pass[8] = {};
  uint64_t iterations = 1 << 12;
  for (;;) {
    const auto start = std::chrono::steady_clock::now();
    DMCOW_RETURN_IF_ERROR(
        Pbkdf2(hash, pass, sizeof(pass), salt, sizeof(salt), static_cast<uint32_t>(iterations), key, sizeof(key), who));
    const auto spent =
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start).count();
    if (spent >= 100000 || iterations >= kLuksMaxIterations) {
      const double per_ms = static_cast<double>(iterations) * 1000.0 / static_cast<double>(std::max<int64_t>(spent, 1));
      const double want = per_ms * static_cast<double>(ms);
      *out = static_cast<uint32_t>(std::clamp<double>(want, kMinIterations, kLuksMaxIterations));
      return Status::OK();
    }
    iterations *= 4;
  }
}

// AF-split (LUKS1 spec, section 2.4): stripes-1 random blocks, the last
// one the key XOR the diffused sum of those before it.
Status AfSplit(const std::string& hash, const uint8_t* key, size_t key_bytes, uint32_t stripes, uint8_t* split,
               const std::string& who) {
  const EVP_MD* md = EVP_get_digestbyname(hash.c_str());
  if (md == nullptr) return Status::NotSupported(who + ": LUKS hash '" + hash + "' is not supported");
  SecureBytes block(key_bytes);
  DMCOW_RETURN_IF_ERROR(Random(split, key_bytes * (stripes - 1), who));
  for (uint32_t i = 0; i + 1 < stripes; i++) {
    for (size_t j = 0; j < key_bytes; j++) block.data()[j] ^= split[i * key_bytes + j];
    DMCOW_RETURN_IF_ERROR(Diffuse(md, block.data(), key_bytes, who));
  }
  for (size_t j = 0; j < key_bytes; j++) split[(stripes - 1) * key_bytes + j] = block.data()[j] ^ key[j];
  return Status::OK();
}

std::string NewUuid(const uint8_t r[16]) {
  uint8_t b[16];
  std::memcpy(b, r, 16);
  b[6] = (b[6] & 0x0f) | 0x40;  // version 4
  b[8] = (b[8] & 0x3f) | 0x80;  // RFC 4122 variant
  static const char kHex[] = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < 16; i++) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s += '-';
    s += kHex[b[i] >> 4];
    s += kHex[b[i] & 15];
  }
  return s;
}

void PutString(uint8_t* field, size_t n, const std::string& v) {
  std::memcpy(field, v.data(), std::min(n - 1, v.size()));
}

}  // namespace

uint64_t LuksRegionBytes(const CipherSpec& spec) {
  const size_t key_bytes = CipherKeyBytes(spec);
  return key_bytes == 0 ? 0 : kKeySlotAlign + kLuksSlots * SlotStride(key_bytes);
}

Status BuildLuks(const LuksCreateOptions& options, const std::string& passphrase, const std::string& who,
                 std::vector<uint8_t>* region, uint64_t* region_length) {
  const CipherSpec& spec = options.spec;
  const size_t key_bytes = CipherKeyBytes(spec);
  // Refuses a cipher, IV generator or hash OpenSSL or dmcow lacks, before
  // any work: a cipher made with a throwaway key.
  {
    SecureBytes probe(key_bytes == 0 ? 16 : key_bytes);
    std::unique_ptr<SectorCipher> check;
    DMCOW_RETURN_IF_ERROR(SectorCipher::Create(spec, probe.data(), probe.size(), who, &check));
  }
  if (EVP_get_digestbyname(options.hash.c_str()) == nullptr) {
    return Status::NotSupported(who + ": LUKS hash '" + options.hash + "' is not supported");
  }
  const uint64_t stride = SlotStride(key_bytes);
  *region_length = LuksRegionBytes(spec);
  region->assign(kKeySlotAlign + stride, 0);
  uint8_t* h = region->data();
  std::memcpy(h, kLuksMagic, sizeof(kLuksMagic));
  h[7] = 1;  // version
  PutString(h + 8, 32, "aes");
  std::string mode = spec.mode + "-" + spec.ivgen;
  if (spec.ivgen == "essiv") mode += ":" + spec.ivgen_hash;
  PutString(h + 40, 32, mode);
  PutString(h + 72, 32, options.hash);
  StoreBE32(h + 104, static_cast<uint32_t>(*region_length / kCryptSectorSize));
  StoreBE32(h + 108, static_cast<uint32_t>(key_bytes));

  SecureBytes master(key_bytes);
  uint8_t uuid[16];
  DMCOW_RETURN_IF_ERROR(Random(master.data(), master.size(), who));
  DMCOW_RETURN_IF_ERROR(Random(h + 132, kLuksSaltBytes, who));  // master key digest salt
  DMCOW_RETURN_IF_ERROR(Random(uuid, sizeof(uuid), who));
  PutString(h + 168, 40, NewUuid(uuid));
  uint32_t slot_iterations = 0;
  DMCOW_RETURN_IF_ERROR(CountIterations(options.hash, options.iter_time_ms, who, &slot_iterations));
  const uint32_t mk_iterations = std::max(kMinIterations, slot_iterations / 8);
  StoreBE32(h + 164, mk_iterations);
  DMCOW_RETURN_IF_ERROR(
      Pbkdf2(options.hash, master.data(), master.size(), h + 132, kLuksSaltBytes, mk_iterations, h + 112, 20, who));

  for (int i = 0; i < kLuksSlots; i++) {
    uint8_t* slot = h + 208 + 48 * i;
    StoreBE32(slot, i == 0 ? kLuksSlotActive : kLuksSlotInactive);
    StoreBE32(slot + 40, static_cast<uint32_t>((kKeySlotAlign + i * stride) / kCryptSectorSize));
    StoreBE32(slot + 44, kLuksStripes);
  }
  // Slot 0: the master key split, encrypted under the passphrase's key.
  uint8_t* slot0 = h + 208;
  StoreBE32(slot0 + 4, slot_iterations);
  DMCOW_RETURN_IF_ERROR(Random(slot0 + 8, kLuksSaltBytes, who));
  SecureBytes slot_key(key_bytes);
  DMCOW_RETURN_IF_ERROR(Pbkdf2(options.hash, reinterpret_cast<const uint8_t*>(passphrase.data()), passphrase.size(),
                               slot0 + 8, kLuksSaltBytes, slot_iterations, slot_key.data(), slot_key.size(), who));
  SecureBytes split(RoundUp(uint64_t{key_bytes} * kLuksStripes, kCryptSectorSize));
  DMCOW_RETURN_IF_ERROR(AfSplit(options.hash, master.data(), key_bytes, kLuksStripes, split.data(), who));
  std::unique_ptr<SectorCipher> slot_cipher;
  DMCOW_RETURN_IF_ERROR(SectorCipher::Create(spec, slot_key.data(), slot_key.size(), who, &slot_cipher));
  DMCOW_RETURN_IF_ERROR(slot_cipher->Encrypt(0, split.data(), split.size()));
  std::memcpy(h + kKeySlotAlign, split.data(), split.size());
  return Status::OK();
}

Status ReadLuksHeader(File* file, uint64_t offset, uint64_t length, const std::string& who, LuksHeader* h) {
  if (length < kLuksHeaderBytes) {
    return Bad(who, "the encryption header region (" + std::to_string(length) + " bytes) is smaller than a header");
  }
  uint8_t raw[kLuksHeaderBytes];
  size_t got = 0;
  DMCOW_RETURN_IF_ERROR(file->Read(offset, sizeof(raw), raw, &got));
  if (got != sizeof(raw)) return Bad(who, "the header at " + Hex(offset) + " is past the end of the file");
  if (std::memcmp(raw, kLuksMagic, sizeof(kLuksMagic)) != 0) {
    return Bad(who, "no LUKS magic at " + Hex(offset) + " (not a LUKS header)");
  }
  const uint16_t version = static_cast<uint16_t>(raw[6] << 8 | raw[7]);
  if (version != 1)
    return Status::NotSupported(who + ": LUKS version " + std::to_string(version) + " is not supported");
  if (!FieldString(raw + 8, 32, &h->cipher_name) || !FieldString(raw + 40, 32, &h->cipher_mode) ||
      !FieldString(raw + 72, 32, &h->hash_spec) || !FieldString(raw + 168, 40, &h->uuid)) {
    return Bad(who, "a name field is not NUL-terminated");
  }
  h->payload_offset_sectors = LoadBE32(raw + 104);
  h->key_bytes = LoadBE32(raw + 108);
  std::memcpy(h->mk_digest, raw + 112, kLuksDigestBytes);
  std::memcpy(h->mk_digest_salt, raw + 132, kLuksSaltBytes);
  h->mk_digest_iterations = LoadBE32(raw + 164);
  if (h->key_bytes == 0 || h->key_bytes > 64) {
    return Bad(who, "master key length " + std::to_string(h->key_bytes) + " is outside 1..64 bytes");
  }
  if (h->mk_digest_iterations == 0 || h->mk_digest_iterations > kLuksMaxIterations) {
    return Bad(who, "master key digest iterations " + std::to_string(h->mk_digest_iterations) + " outside 1.." +
                        std::to_string(kLuksMaxIterations));
  }
  DMCOW_RETURN_IF_ERROR(ParseCipher(who, h));
  if (EVP_get_digestbyname(h->hash_spec.c_str()) == nullptr) {
    return Status::NotSupported(who + ": LUKS hash '" + h->hash_spec + "' is not supported");
  }
  const uint64_t material = RoundUp(uint64_t{h->key_bytes} * kLuksStripes, kCryptSectorSize);
  const uint64_t header_sectors = DivRoundUp(kLuksHeaderBytes, kCryptSectorSize);
  for (int i = 0; i < kLuksSlots; i++) {
    const uint8_t* p = raw + 208 + 48 * i;
    LuksKeySlot& slot = h->slots[i];
    const uint32_t state = LoadBE32(p);
    const std::string name = "key slot " + std::to_string(i);
    if (state != kLuksSlotActive && state != kLuksSlotInactive) {
      return Bad(who, name + " has state " + Hex(state) + ", neither active nor inactive");
    }
    slot.active = state == kLuksSlotActive;
    slot.iterations = LoadBE32(p + 4);
    std::memcpy(slot.salt, p + 8, kLuksSaltBytes);
    slot.key_offset_sectors = LoadBE32(p + 40);
    slot.stripes = LoadBE32(p + 44);
    // Inactive slots' places are checked too: a slot added later goes there.
    if (slot.stripes != kLuksStripes) {
      return Bad(who, name + " has " + std::to_string(slot.stripes) + " stripes, not " + std::to_string(kLuksStripes));
    }
    const uint64_t start = uint64_t{slot.key_offset_sectors} * kCryptSectorSize;
    if (slot.key_offset_sectors < header_sectors) return Bad(who, name + " overlaps the LUKS header");
    if (start > length || material > length - start) {
      return Bad(who, name + "'s key material (" + std::to_string(material) + " bytes at " + Hex(start) +
                          ") is outside the encryption header region of " + std::to_string(length) + " bytes");
    }
    if (slot.active && (slot.iterations == 0 || slot.iterations > kLuksMaxIterations)) {
      return Bad(who, name + " iterations " + std::to_string(slot.iterations) + " outside 1.." +
                          std::to_string(kLuksMaxIterations));
    }
    for (int j = 0; j < i; j++) {
      const uint64_t other = uint64_t{h->slots[j].key_offset_sectors} * kCryptSectorSize;
      if (start < other + material && other < start + material) {
        return Bad(who, name + "'s key material overlaps key slot " + std::to_string(j) + "'s");
      }
    }
  }
  return Status::OK();
}

void DescribeLuks(const LuksHeader& h, EncryptionInfo* info) {
  info->format = "luks";
  info->cipher_alg = h.spec.alg;
  info->cipher_mode = h.spec.mode;
  info->ivgen_alg = h.spec.ivgen;
  info->ivgen_hash_alg = h.spec.ivgen_hash;
  info->hash_alg = h.hash_spec;
  info->uuid = h.uuid;
  info->slots.clear();
  for (const LuksKeySlot& slot : h.slots) {
    LuksSlotInfo s;
    s.active = slot.active;
    s.iterations = slot.iterations;
    s.key_offset = uint64_t{slot.key_offset_sectors} * kCryptSectorSize;
    s.stripes = slot.stripes;
    info->slots.push_back(s);
  }
  info->payload_offset = uint64_t{h.payload_offset_sectors} * kCryptSectorSize;
  info->master_key_iterations = h.mk_digest_iterations;
}

namespace {

// QEMU's qcrypto_block_luks_load_key: the master key active slot `index`
// holds under `passphrase` into *key (key_bytes), *opens whether it
// matches the header's digest.
Status LoadKey(File* file, uint64_t offset, const LuksHeader& h, int index, const std::string& passphrase,
               const std::string& who, SecureBytes* key, bool* opens) {
  const LuksKeySlot& slot = h.slots[index];
  *opens = false;
  SecureBytes split(MaterialBytes(h));
  SecureBytes slot_key(h.key_bytes);
  DMCOW_RETURN_IF_ERROR(Pbkdf2(h.hash_spec, reinterpret_cast<const uint8_t*>(passphrase.data()), passphrase.size(),
                               slot.salt, kLuksSaltBytes, slot.iterations, slot_key.data(), slot_key.size(), who));
  size_t got = 0;
  const uint64_t at = offset + uint64_t{slot.key_offset_sectors} * kCryptSectorSize;
  DMCOW_RETURN_IF_ERROR(file->Read(at, split.size(), split.data(), &got));
  if (got != split.size()) return Bad(who, "key material at " + Hex(at) + " is past the end of the file");
  std::unique_ptr<SectorCipher> slot_cipher;
  DMCOW_RETURN_IF_ERROR(SectorCipher::Create(h.spec, slot_key.data(), slot_key.size(), who, &slot_cipher));
  DMCOW_RETURN_IF_ERROR(slot_cipher->Decrypt(0, split.data(), split.size()));
  *key = SecureBytes(h.key_bytes);
  DMCOW_RETURN_IF_ERROR(AfMerge(h.hash_spec, split.data(), h.key_bytes, slot.stripes, key->data(), who));
  uint8_t digest[kLuksDigestBytes];
  DMCOW_RETURN_IF_ERROR(Pbkdf2(h.hash_spec, key->data(), key->size(), h.mk_digest_salt, kLuksSaltBytes,
                               h.mk_digest_iterations, digest, sizeof(digest), who));
  *opens = CRYPTO_memcmp(digest, h.mk_digest, sizeof(digest)) == 0;
  return Status::OK();
}

// The header's 592 bytes as `h` holds them now.
void EncodeSlots(const LuksHeader& h, uint8_t* raw) {
  for (int i = 0; i < kLuksSlots; i++) {
    uint8_t* p = raw + 208 + 48 * i;
    const LuksKeySlot& slot = h.slots[i];
    StoreBE32(p, slot.active ? kLuksSlotActive : kLuksSlotInactive);
    StoreBE32(p + 4, slot.iterations);
    std::memcpy(p + 8, slot.salt, kLuksSaltBytes);
    StoreBE32(p + 40, slot.key_offset_sectors);
    StoreBE32(p + 44, slot.stripes);
  }
}

Status WriteSlotHeader(File* file, uint64_t offset, const LuksHeader& h, const std::string& who) {
  uint8_t raw[kLuksHeaderBytes];
  size_t got = 0;
  DMCOW_RETURN_IF_ERROR(file->Read(offset, sizeof(raw), raw, &got));
  if (got != sizeof(raw)) return Bad(who, "the header at " + Hex(offset) + " is past the end of the file");
  EncodeSlots(h, raw);
  DMCOW_RETURN_IF_ERROR(file->Write(offset, raw, sizeof(raw)));
  return file->Sync();
}

}  // namespace

Status UnlockLuks(File* file, uint64_t offset, const LuksHeader& h, const std::string& passphrase,
                  const std::string& who, std::unique_ptr<SectorCipher>* data_cipher) {
  for (int i = 0; i < kLuksSlots; i++) {
    if (!h.slots[i].active) continue;
    SecureBytes key;
    bool opens = false;
    DMCOW_RETURN_IF_ERROR(LoadKey(file, offset, h, i, passphrase, who, &key, &opens));
    if (opens) return SectorCipher::Create(h.spec, key.data(), key.size(), who, data_cipher);
  }
  return Status::KeyRefused(Status::KeyRefusal::kWrong, who, kWrongKeyMessage);
}

Status LuksSlotOpens(File* file, uint64_t offset, const LuksHeader& h, int slot, const std::string& passphrase,
                     const std::string& who, bool* opens) {
  *opens = false;
  if (slot < 0 || slot >= kLuksSlots || !h.slots[slot].active) return Status::OK();
  SecureBytes key;
  return LoadKey(file, offset, h, slot, passphrase, who, &key, opens);
}

Status LuksAddSlot(File* file, uint64_t offset, LuksHeader* h, int slot, const uint8_t* master_key,
                   const std::string& passphrase, uint64_t iter_time_ms, const std::string& who) {
  LuksKeySlot& s = h->slots[slot];
  DMCOW_RETURN_IF_ERROR(CountIterations(h->hash_spec, iter_time_ms, who, &s.iterations));
  DMCOW_RETURN_IF_ERROR(Random(s.salt, kLuksSaltBytes, who));
  SecureBytes slot_key(h->key_bytes);
  DMCOW_RETURN_IF_ERROR(Pbkdf2(h->hash_spec, reinterpret_cast<const uint8_t*>(passphrase.data()), passphrase.size(),
                               s.salt, kLuksSaltBytes, s.iterations, slot_key.data(), slot_key.size(), who));
  SecureBytes split(MaterialBytes(*h));
  DMCOW_RETURN_IF_ERROR(AfSplit(h->hash_spec, master_key, h->key_bytes, s.stripes, split.data(), who));
  std::unique_ptr<SectorCipher> slot_cipher;
  DMCOW_RETURN_IF_ERROR(SectorCipher::Create(h->spec, slot_key.data(), slot_key.size(), who, &slot_cipher));
  DMCOW_RETURN_IF_ERROR(slot_cipher->Encrypt(0, split.data(), split.size()));
  DMCOW_RETURN_IF_ERROR(
      file->Write(offset + uint64_t{s.key_offset_sectors} * kCryptSectorSize, split.data(), split.size()));
  DMCOW_RETURN_IF_ERROR(file->Sync());  // the material before the header names it
  s.active = true;
  return WriteSlotHeader(file, offset, *h, who);
}

Status LuksEraseSlot(File* file, uint64_t offset, LuksHeader* h, int slot, const std::string& who) {
  LuksKeySlot& s = h->slots[slot];
  s.active = false;
  s.iterations = 0;
  std::memset(s.salt, 0, kLuksSaltBytes);
  DMCOW_RETURN_IF_ERROR(WriteSlotHeader(file, offset, *h, who));
  std::vector<uint8_t> noise(MaterialBytes(*h));
  DMCOW_RETURN_IF_ERROR(Random(noise.data(), noise.size(), who));
  DMCOW_RETURN_IF_ERROR(
      file->Write(offset + uint64_t{s.key_offset_sectors} * kCryptSectorSize, noise.data(), noise.size()));
  return file->Sync();
}

}  // namespace dmcow
